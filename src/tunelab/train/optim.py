"""AdamW with the usual decay groups, and the learning-rate schedule (from transformers)."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.methods.bitsandbytes_support import import_peft

# transformers' scheduler module imports PEFT when it is installed, and PEFT alone would import bitsandbytes.
import_peft()
from transformers import get_scheduler  # noqa: E402

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, name: str = "adamw",
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """No weight decay on biases and norm weights (1-D tensors): decaying them only hurts.

    adamw runs torch's fused kernel on CUDA (one launch for all parameters instead of several per tensor) and
    its default (foreach) elsewhere. adamw_8bit keeps both moments in 8 bits with block-wise scales (Dettmers et
    al. 2022); bitsandbytes keeps tensors under 4,096 elements in 32 bits.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if name == "adamw_8bit":
        from tunelab.methods.bitsandbytes_support import import_bitsandbytes

        return import_bitsandbytes().optim.AdamW8bit(groups, lr=lr)
    fused = True if device is not None and device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def build_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))
    return get_scheduler(SCHEDULES[name], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

"""AdamW with the usual decay groups, and the learning-rate schedule (from transformers)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """No weight decay on biases and norm weights (1-D tensors): decaying them only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))
    return get_scheduler(SCHEDULES[name], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

"""LoRA and DoRA through PEFT.

LoRA freezes a weight W and learns a low-rank update: h = W x + (alpha / r) * B A x, with A (r x d_in)
random and B (d_out x r) zero at the start, so the model is unchanged at step 0. Only A and B train:
for rank 8 on all linear layers of MiniLM that is about 1.3% of the weights. DoRA (use_dora) also learns
a per-column magnitude of W + BA; it tends to help at low rank and costs extra time per step.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from tunelab.methods.base import Method


class Lora(Method):
    name = "lora"
    # Adapters start at zero and have few weights: they want a learning rate ~10x that of full FT.
    default_lr = 5e-4

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        peft_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.use_dora,
            # BERT's pooler is never used by our pooling head: adapting it would only inflate the count.
            exclude_modules=r".*pooler.*" if any("pooler" in n for n, _ in backbone.named_modules()) else None,
            task_type=TaskType.CAUSAL_LM if task != "classification" else TaskType.FEATURE_EXTRACTION,
        )
        model = get_peft_model(backbone, peft_config)
        checkpointing = getattr(backbone, "is_activation_checkpointing", None)  # transformers >= 5
        if checkpointing is None:
            checkpointing = getattr(backbone, "is_gradient_checkpointing", False)
        if checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        return model

    def save(self, backbone: nn.Module, out_dir: Path) -> None:
        backbone.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        return PeftModel.from_pretrained(base_backbone, out_dir)

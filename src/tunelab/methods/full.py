"""Full fine-tuning: every weight of the backbone is updated.

The most capacity and the most memory: AdamW keeps two fp32 moments per weight, so weights + gradients +
optimizer state take about 16 bytes per parameter before any activation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tunelab.methods.base import Method, MethodSettings

if TYPE_CHECKING:
    from torch import nn


class FullMethod(MethodSettings):
    name: Literal["full"] = "full"


class FullFineTuning(Method):
    name = "full"
    config_class = FullMethod
    default_lr = 5e-5
    adapter_refusal = "full fine-tuning changes every weight, so there is no adapter to export: use --format merged"
    named_adapters_refusal = "full fine-tuning trains the base weights themselves, so no frozen base is left to share"

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        backbone.requires_grad_(True)
        return backbone

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        backbone.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        return type(base_backbone).from_pretrained(out_dir)

    def merged(self, backbone: nn.Module, saved_dir: Path) -> nn.Module:
        return backbone  # nothing to fold in: the trained backbone is the whole model

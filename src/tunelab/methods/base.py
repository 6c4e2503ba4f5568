"""The interface every technique implements.

A technique acts on the backbone only: it freezes, wraps or adds modules there and hands back the
module to train. The task head (if any) stays fully trainable and is saved by the run, so the training
loop never asks which technique it is running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn


class Method(Protocol):
    name: str
    default_lr: float  # used when train.lr is null: a value that works on the bundled models

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        """Return the backbone ready to train (parameters to update have requires_grad=True)."""

    def save(self, backbone: nn.Module, out_dir: Path) -> None:
        """Write what this technique trained, as safetensors, into out_dir."""

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        """Rebuild the trained backbone from a fresh base and what save() wrote."""


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total

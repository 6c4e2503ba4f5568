"""The interface every technique implements, and the base of every technique's config section.

A technique owns everything about itself: its config section (a `MethodSettings` subclass in its own
module), its default learning rate, what it can be combined with, and what it adds to memory. It acts on
the backbone only: it freezes, wraps or adds modules there and hands back the module to train. The task
head (if any) stays fully trainable and is saved by the run, so the training loop, the planner and the
task models ask a technique through this interface and never branch on its name.

Modules here import no torch or PEFT at the top: config.py builds the run schema from the config sections,
and loading a config must not wait for torch (a bad key is reported in a fraction of a second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn


class MethodSettings(BaseModel):
    """Base of a technique's config section (`method:`): unknown keys are refused, like every section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


@dataclass
class ActivationCost:
    """What one wrapped module makes autograd keep, in elements per token (the planner multiplies by tokens and
    the element size)."""

    kept: float = 0.0  # saved for backward until the step's backward reaches it
    masks: float = 0.0  # of `kept`, elements that also keep a 1-byte dropout mask
    transient: float = 0.0  # allocated and freed within the forward pass (CPU allocator slack)


@dataclass
class FormulaCounts:
    """Parameter counts by formula, for a technique that cannot be applied to a meta-device model."""

    added: int  # parameters the technique adds (all trainable)
    trainable_matmul: int  # of which matmul weights
    activation_elements: float  # per token per layer, see ActivationCost.kept
    transient_elements: float  # per token per layer, see ActivationCost.transient
    note: str


class Method:
    """Base of every technique. Subclasses set `name`, `config_class` and `default_lr` and implement
    apply/save/load; the other hooks have defaults that suit a technique with nothing special about them."""

    name: str
    config_class: type[MethodSettings]
    default_lr: float  # used when train.lr is null: a value that works on the bundled models
    # Why data.packing cannot be used with this technique; None = it can. Packed rows need attention kept
    # within each example (data/packing.py); a technique that changes the sequence or the attention cache
    # can break that.
    packing_refusal: str | None = None
    # Why what this technique trained cannot be folded into the base weights (`tunelab export --format merged`,
    # and onnx and gguf, which start from the merged model); None = it can (merged() does it).
    merge_refusal: str | None = None
    # Why it has no PEFT adapter folder (`tunelab export --format adapter`); None = save() writes one.
    adapter_refusal: str | None = None
    # Why it cannot keep one named adapter per task on one copy of the base model (multi-task
    # `sharing: adapter_per_task`); None = add_adapter, set_adapter and save_adapter work.
    named_adapters_refusal: str | None = "it has no named adapters to keep one per task on a shared base"

    def learning_rate(self, cfg) -> float:
        """The rate used when train.lr is null; a technique whose knobs change what a good rate is overrides it."""
        return self.default_lr

    def check(self, cfg, hf_config, task: str) -> None:
        """Raise ConfigError (one line) if this technique cannot apply to this model or task.

        Runs before any weights load or a run directory exists.
        """

    def check_sharded_save(self, cfg) -> None:
        """Raise ConfigError (one line) if save() cannot write weights gathered from FSDP/ZeRO-3 shards.

        Runs at setup, so a run that could not be saved is refused before it trains.
        """

    def pretrained_kwargs(self, cfg, precision: str) -> dict:
        """Extra `from_pretrained` arguments for the base model (QLoRA loads it quantized)."""
        return {}

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        """Return the backbone ready to train (parameters to update have requires_grad=True)."""
        raise NotImplementedError

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        """Write what this technique trained, as safetensors, into out_dir.

        state_dict: the backbone's whole weights, gathered from the processes that hold them under FSDP or
        ZeRO-3 (where the module's own parameters are shards or empty placeholders); None = read the module.
        """
        raise NotImplementedError

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        """Rebuild the trained backbone from a fresh base and what save() wrote."""
        raise NotImplementedError

    def add_adapter(self, backbone: nn.Module, cfg, task: str, adapter_name: str) -> None:
        """Add a freshly initialised adapter named `adapter_name` beside those `backbone` (from apply()) carries;
        it is not made active. Only called when named_adapters_refusal is None."""
        raise NotImplementedError

    def set_adapter(self, backbone: nn.Module, adapter_name: str) -> None:
        """Make `adapter_name` the adapter the forward pass goes through (so the only one that gets gradients)."""
        raise NotImplementedError

    def save_adapter(self, backbone: nn.Module, out_dir: Path, adapter_name: str) -> None:
        """Write one named adapter exactly as save() writes a run's only adapter, so load() reads it back."""
        raise NotImplementedError

    def merged(self, backbone: nn.Module, saved_dir: Path) -> nn.Module:
        """The plain transformers model with what this technique trained folded into its weights.

        backbone: the run's trained backbone (it may be changed in place: pass one loaded for this);
        saved_dir: what save() wrote. Only called when merge_refusal is None.
        """
        raise NotImplementedError

    def blocks_packing(self, backbone: nn.Module) -> bool:
        """True when `backbone` carries this technique and the technique cannot run packed rows (see
        packing_refusal). The task models ask, for a backbone built outside a run's config checks."""
        return False

    # ------------------------------------------------------------------ what the planner asks (plan/)

    def for_meta_count(self, cfg) -> tuple[Method, Any]:
        """The technique and config to apply to a meta-device model (shapes, no storage) to count parameters
        exactly; override when applying this one there would need real weights or files."""
        return self, cfg

    def quantized_weight_bytes(self, cfg) -> float | None:
        """Bytes per base linear weight when the technique stores the frozen base quantized; None = fp32."""
        return None

    def activation_cost(self, module: nn.Module, cfg) -> ActivationCost | None:
        """What `module`, one the technique wrapped or added, makes autograd keep; None for other modules."""
        return None

    def virtual_tokens(self, cfg) -> int:
        """Tokens prepended to every input row (prompt tuning)."""
        return 0

    def prefix_tokens(self, cfg) -> int:
        """Extra keys/values prepended in every attention layer (prefix tuning)."""
        return 0

    def formula_counts(self, cfg, hidden: int, layers: int) -> FormulaCounts | None:
        """Counts by formula, used when applying to a meta-device model fails; None = no formula."""
        return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameters: what the model computes with, not how it is stored.

    Tied weights are counted once. A 4-bit weight (QLoRA) counts its logical shape: bitsandbytes stores two
    weights per byte, and counting that storage made QLoRA's trainable share read 2.91% against LoRA's
    1.78% for the same adapters on SmolLM2.
    """
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: the shape before packing
        n = math.prod(quant_state.shape) if quant_state is not None else p.numel()
        n = getattr(p, "ds_numel", n)  # DeepSpeed ZeRO-3 leaves an empty placeholder in p
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total

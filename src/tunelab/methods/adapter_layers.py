"""The modules behind bottleneck adapters (methods/adapters.py): the bottleneck MLP, the wrapper that puts
adapters at an insertion point, the placement table per architecture family, and insertion and removal.

The math, the placements and the composition rules are in methods/adapters.py's docstring. Kept apart from
it because these are torch modules: the technique's config section must load without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.errors import ConfigError

SETUP_ATTR = "tunelab_adapters"  # the setup dict, kept on the backbone between apply() and save()

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Family:
    """Where adapters go in one family of architectures; module paths are relative to a block."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # regex ending a block's module path
    attention_output: str  # the attention output projection
    ffn_output: str  # the FFN output projection
    ffn: str  # the module a parallel adapter spans, from the FFN input to the FFN output
    ffn_reads: str  # "input": ffn(x) + delta(x); "residual": BertOutput(h, x) -> BertOutput(h, x + delta(x))


FAMILIES = (
    Family("bert-like", ("bert", "roberta"), r"encoder\.layer\.\d+",
           "attention.output.dense", "output.dense", "output", "residual"),
    Family("llama-like", ("llama", "mistral", "qwen2"), r"layers\.\d+",
           "self_attn.o_proj", "mlp.down_proj", "mlp", "input"),
)

PLACEMENTS = {"houlsby": ("attention_output", "ffn_output"), "pfeiffer": ("ffn_output",), "parallel": ("ffn",)}


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"method 'adapter' does not support model type '{model_type}'; supported: {supported}")


class Bottleneck(nn.Module):
    """delta(v) = scaling * (W_up f(W_down v + b_down) + b_up), with W_up and b_up zero at the start."""

    def __init__(self, hidden_size: int, reduction_factor: int, non_linearity: str, scaling: float):
        super().__init__()
        width = hidden_size // reduction_factor
        self.down = nn.Linear(hidden_size, width)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden_size)
        self.scaling = scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.act(self.down(v)))


class AdapterPoint(nn.Module):
    """A wrapped module of the backbone and the adapters at that point; the wrapped module is unchanged."""

    def __init__(self, base: nn.Module, key: str, reads: str, composition: str):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.key = key  # "<layer>.<point>", names this point in the saved file
        self.reads = reads  # "output", "input" or "residual" (see Family.ffn_reads)
        self.composition = composition

    def delta(self, v: torch.Tensor) -> torch.Tensor:
        """The total change the adapters make to v, composed as in the module docstring."""
        deltas = []
        for adapter in self.adapters.values():
            deltas.append(adapter(v + sum(deltas) if self.composition == "stack" else v))
        total = sum(deltas)
        return total / len(deltas) if self.composition == "average" else total

    def forward(self, *args, **kwargs):
        if self.reads == "output":  # houlsby, pfeiffer
            y = self.base(*args, **kwargs)
            return y + self.delta(y)
        if self.reads == "input":  # parallel, Llama's mlp(x)
            return self.base(*args, **kwargs) + self.delta(args[0])
        hidden, residual = args  # parallel, BertOutput(hidden_states, input_tensor)
        return self.base(hidden, residual + self.delta(residual))


# --------------------------------------------------------------------------- insertion


def _blocks(backbone: nn.Module, family: Family) -> list[nn.Module]:
    pattern = re.compile(rf"(^|\.){family.blocks}$")
    blocks = [m for name, m in backbone.named_modules() if pattern.search(name)]
    expected = backbone.config.num_hidden_layers
    if len(blocks) != expected:  # a model of a listed type laid out differently: a table bug, not a user error
        raise RuntimeError(f"found {len(blocks)} blocks matching {family.blocks!r}, expected {expected}")
    return blocks


def _points(family: Family, placement: str) -> list[tuple[str, str, str]]:
    """(point name, module path in a block, what the adapter reads) for a placement."""
    where = {
        "attention_output": (family.attention_output, "output"),
        "ffn_output": (family.ffn_output, "output"),
        "ffn": (family.ffn, family.ffn_reads),
    }
    return [(point, *where[point]) for point in PLACEMENTS[placement]]


def insert_adapters(backbone: nn.Module, setup: dict) -> list[AdapterPoint]:
    """Wrap the insertion points of `setup` and add its adapters there, freshly initialised."""
    family = family_of(backbone.config.model_type)
    reference = next(backbone.parameters())
    inserted = []
    for layer, block in enumerate(_blocks(backbone, family)):
        for point, path, reads in _points(family, setup["placement"]):
            parent_path, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            wrapper = AdapterPoint(getattr(parent, child), f"{layer}.{point}", reads, setup["composition"])
            for spec in setup["adapters"]:
                wrapper.adapters[spec["name"]] = Bottleneck(
                    backbone.config.hidden_size, spec["reduction_factor"], spec["non_linearity"], spec["scaling"]
                ).to(device=reference.device, dtype=reference.dtype)
            setattr(parent, child, wrapper)
            inserted.append(wrapper)
    setattr(backbone, SETUP_ATTR, setup)
    return inserted


def adapter_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter under its saved name, "<adapter>.<layer>.<point>.<param>"."""
    out = {}
    for module in backbone.modules():
        if isinstance(module, AdapterPoint):
            for name, adapter in module.adapters.items():
                for param_name, param in adapter.named_parameters():
                    out[f"{name}.{module.key}.{param_name}"] = param
    return out


def load_adapter_weights(backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = adapter_parameters(backbone)
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"adapter weights with no place in this model: {unknown[:3]}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)


def remove_adapters(backbone: nn.Module) -> nn.Module:
    """Put the wrapped modules back: the plain base model, with the very weights it had before apply()."""
    for name, module in list(backbone.named_modules()):
        if isinstance(module, AdapterPoint):
            parent_path, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_path) if parent_path else backbone, child, module.base)
    if hasattr(backbone, SETUP_ATTR):
        delattr(backbone, SETUP_ATTR)
    return backbone

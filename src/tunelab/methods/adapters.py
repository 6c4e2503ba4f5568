"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and their composition, in plain torch.

Why our own module: PEFT has no bottleneck adapters, and AdapterHub's `adapters` 1.3 pins
transformers ~=4.57, a major version behind ours. The technique is a two-layer MLP and a placement
table, small enough to own and read in one file.

An adapter is a bottleneck MLP added inside a residual branch. At an insertion point it reads a state v
and adds to the sublayer output y:

    delta(v) = scaling * (W_up f(W_down v + b_down) + b_up)          y <- y + delta(v)

W_down is (hidden/reduction_factor x hidden), W_up (hidden x hidden/reduction_factor), f is relu, gelu,
swish or tanh. W_up and b_up start at zero, so the model is unchanged at step 0; W_down keeps nn.Linear's
Kaiming-uniform init (as LoRA's A does), so W_up gets a gradient from the first step. Each adapter costs
2 * hidden * bottleneck + bottleneck + hidden weights per insertion point.

Where they go (method.config):
  houlsby   Houlsby et al. 2019: after the attention output projection and after the FFN output
            projection, v = y = that projection's output. Two points per layer.
  pfeiffer  Pfeiffer et al. 2020: after the FFN output projection only. Half the weights of houlsby,
            about the same quality in their experiments.
  parallel  He et al. 2022: beside the FFN, v = the FFN *input*, delta added to the FFN output. They
            use scaling 4; scaling applies to every placement here.

We insert by wrapping: `dense` becomes `dense(h) + delta(dense(h))`. BERT is post-LN: BertSelfOutput and
BertOutput compute LayerNorm(dropout(dense(h)) + input), so the delta lands inside the residual, before
the LayerNorm, which is Houlsby's placement. Llama is pre-LN: o_proj and down_proj end the branch that is
added to the residual stream, so the same wrapping puts the adapter at the end of that branch. Two small
differences from AdapterHub: the adapter reads the projection's output before dropout (identical at eval
time), and pfeiffer reads the FFN output itself, not the LayerNorm'd sum AdapterHub feeds it.

Parallel in BERT: no module spans the FFN (BertLayer calls intermediate(x), then output(h, x)), but
BertOutput adds its residual input x inside the LayerNorm, so adding delta(x) to that argument is the same
sum as adding it to the FFN output. In Llama the FFN is `mlp`, wrapped as mlp(x) + delta(x).

Composition (method.compose_with, method.composition): adapters trained in other runs are loaded frozen
beside the new one, which trains. Each adapter is a residual map g_i(v) = v + delta_i(v); at each point
  stack     v -> g_n(...g_1(v)): each sees the one before's output; the composed runs in the order given,
            the new adapter last
  parallel  v -> v + sum_i delta_i(v)
  average   v -> v + mean_i delta_i(v)
and the total change is added to the sublayer output. With one adapter the three are the same.

Saved (no pickle) into the method's output folder:
  adapters.safetensors   every adapter, composed ones included, keyed "<adapter>.<layer>.<point>.<param>"
                         (e.g. "trained.3.ffn_output.down.weight"): independent of the backbone's class,
                         so an adapter trained for classification composes into a causal LM run
  adapter_config.json    placement, composition, and each adapter's settings and source run
so a finished run loads without the runs it composed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.base import Method

WEIGHTS_FILE = "adapters.safetensors"
SETUP_FILE = "adapter_config.json"
SETUP_ATTR = "tunelab_adapters"  # the setup dict, kept on the backbone between apply() and save()
TRAINED = "trained"  # the name of the adapter a run trains, in its own saved files

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


def _points(family: Family, config: str) -> list[tuple[str, str, str]]:
    """(point name, module path in a block, what the adapter reads) for a placement."""
    where = {
        "attention_output": (family.attention_output, "output"),
        "ffn_output": (family.ffn_output, "output"),
        "ffn": (family.ffn, family.ffn_reads),
    }
    return [(point, *where[point]) for point in PLACEMENTS[config]]


def _insert(backbone: nn.Module, setup: dict) -> list[AdapterPoint]:
    """Wrap the insertion points of `setup` and add its adapters there, freshly initialised."""
    family = family_of(backbone.config.model_type)
    reference = next(backbone.parameters())
    inserted = []
    for layer, block in enumerate(_blocks(backbone, family)):
        for point, path, reads in _points(family, setup["config"]):
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


def _load_weights(backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
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


# --------------------------------------------------------------------------- composed runs


def _run_adapter_dir(run_dir: str) -> Path:
    return Path(run_dir) / "model" / "backbone"  # where the training loop writes method.save()


def _read_run_setup(run_dir: str) -> dict:
    path = _run_adapter_dir(run_dir) / SETUP_FILE
    if not path.is_file():
        raise ConfigError(f"method.compose_with: '{run_dir}' has no trained adapter ({path} not found)")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_composable(run_dir: str, run_setup: dict, model_type: str, hidden_size: int, layers: int, config: str):
    mine = (model_type, hidden_size, layers)
    theirs = (run_setup["model_type"], run_setup["hidden_size"], run_setup["num_layers"])
    if theirs != mine:
        raise ConfigError(
            f"method.compose_with: '{run_dir}' was trained on a {theirs[0]} model with hidden size {theirs[1]} "
            f"and {theirs[2]} layers; this model is {mine[0]}, {mine[1]}, {mine[2]}"
        )
    if run_setup["config"] != config:
        raise ConfigError(
            f"method.compose_with: '{run_dir}' has {run_setup['config']} adapters and composed adapters "
            f"must share one placement; set method.config: {run_setup['config']}"
        )


def _unique_name(run_dir: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", Path(run_dir).resolve().name) or "adapter"
    while name in taken or hasattr(nn.ModuleDict, name):  # e.g. a run folder named "eval"
        name += "_"
    return name


def _composed(cfg, model_type: str, hidden_size: int, layers: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The adapter each compose_with run trained, renamed after its run, and its weights."""
    specs, tensors, taken = [], {}, {TRAINED}
    for run_dir in cfg.compose_with:
        run_setup = _read_run_setup(run_dir)
        _check_composable(run_dir, run_setup, model_type, hidden_size, layers, cfg.config)
        spec = next(s for s in run_setup["adapters"] if s["name"] == run_setup["trained"])
        name = _unique_name(run_dir, taken)
        taken.add(name)
        specs.append({**spec, "name": name, "source": str(run_dir)})
        prefix = run_setup["trained"] + "."
        for key, tensor in load_file(_run_adapter_dir(run_dir) / WEIGHTS_FILE).items():
            if key.startswith(prefix):
                tensors[name + "." + key[len(prefix):]] = tensor
    return specs, tensors


# --------------------------------------------------------------------------- the method


class BottleneckAdapter(Method):
    name = "adapter"
    # 1e-3: 20x full fine-tuning's rate and 2x LoRA's. W_up starts at zero and the bottleneck is narrow
    # (24 units for MiniLM at reduction 16), so smaller rates barely move the model in a short run.
    # Houlsby et al. searched up to 3e-3; AdapterHub's 1e-4 goes with its 10+ epoch recipes.
    default_lr = 1e-3

    def check(self, cfg, hf_config, task: str) -> None:
        family_of(hf_config.model_type)
        if hf_config.hidden_size // cfg.reduction_factor < 1:
            raise ConfigError(
                f"method.reduction_factor {cfg.reduction_factor} leaves no bottleneck for hidden size "
                f"{hf_config.hidden_size}; use at most {hf_config.hidden_size}"
            )
        for run_dir in cfg.compose_with:
            _check_composable(
                run_dir, _read_run_setup(run_dir), hf_config.model_type, hf_config.hidden_size,
                hf_config.num_hidden_layers, cfg.config,
            )

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        hf_config = backbone.config
        self.check(cfg, hf_config, task)
        composed, tensors = _composed(cfg, hf_config.model_type, hf_config.hidden_size, hf_config.num_hidden_layers)
        own = {
            "name": TRAINED, "reduction_factor": cfg.reduction_factor, "non_linearity": cfg.non_linearity,
            "scaling": cfg.scaling, "source": None,
        }
        setup = {
            "model_type": hf_config.model_type, "hidden_size": hf_config.hidden_size,
            "num_layers": hf_config.num_hidden_layers, "config": cfg.config, "composition": cfg.composition,
            "trained": TRAINED, "adapters": composed + [own],
        }
        points = _insert(backbone, setup)
        backbone.requires_grad_(False)  # the base and the composed adapters stay frozen
        for point in points:
            point.adapters[TRAINED].requires_grad_(True)
        _load_weights(backbone, tensors)
        return backbone

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        params = adapter_parameters(backbone)
        if state_dict is not None:  # the same tensors, found under their module paths in the gathered dict
            path = {id(p): name for name, p in backbone.named_parameters()}
            params = {k: state_dict[path[id(p)]] for k, p in params.items()}
        tensors = {k: p.detach().cpu().contiguous() for k, p in params.items()}
        save_file(tensors, out_dir / WEIGHTS_FILE)
        (out_dir / SETUP_FILE).write_text(json.dumps(getattr(backbone, SETUP_ATTR), indent=1), encoding="utf-8")

    def load(self, base_backbone: nn.Module, out_dir: Path) -> nn.Module:
        setup = json.loads((Path(out_dir) / SETUP_FILE).read_text(encoding="utf-8"))
        tensors = load_file(Path(out_dir) / WEIGHTS_FILE)
        _insert(base_backbone, setup)
        base_backbone.requires_grad_(False)  # a loaded run is for inference: nothing trains
        missing = sorted(set(adapter_parameters(base_backbone)) - set(tensors))
        if missing:
            raise ValueError(f"{out_dir / WEIGHTS_FILE} lacks adapter weights, e.g. {missing[:3]}")
        _load_weights(base_backbone, tensors)
        return base_backbone

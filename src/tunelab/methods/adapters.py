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

Where they go (method.placement):
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

The torch modules (the bottleneck, the wrapper at an insertion point, the placement table) are in
adapter_layers.py, so this module, and the config section in it, load without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field

from tunelab.errors import ConfigError
from tunelab.methods.base import ActivationCost, FormulaCounts, Method, MethodSettings
from tunelab.runtime.run_dir import RunDir

if TYPE_CHECKING:
    from torch import nn

WEIGHTS_FILE = "adapters.safetensors"
SETUP_FILE = "adapter_config.json"
TRAINED = "trained"  # the name of the adapter a run trains, in its own saved files


def read_setup(path: Path) -> dict:
    """A saved adapter_config.json. Runs saved before the placement key was named `placement` call it `config`."""
    setup = json.loads(path.read_text(encoding="utf-8"))
    if "config" in setup and "placement" not in setup:
        setup["placement"] = setup.pop("config")
    return setup


class AdapterMethod(MethodSettings):
    name: Literal["adapter"] = "adapter"
    placement: Literal["pfeiffer", "houlsby", "parallel"] = Field(
        "pfeiffer",
        # `config` was this key's first name; configs and runs that use it still load.
        validation_alias=AliasChoices("placement", "config"),
        description="Where bottlenecks go: pfeiffer = after each FFN; houlsby = after attention and FFN; "
        "parallel = beside each FFN.",
    )
    reduction_factor: int = Field(16, ge=1, description="Bottleneck width = hidden size / reduction_factor.")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = Field(
        "relu", description="The bottleneck's activation."
    )
    scaling: float = Field(1.0, gt=0, description="Multiplier on the adapter's output (He et al. use 4 for parallel adapters).")
    compose_with: list[str] = Field(
        default_factory=list, description="Run directories of trained adapters, loaded frozen and composed with the new one."
    )
    composition: Literal["stack", "parallel", "average"] = Field(
        "stack",
        description="How the adapters combine: stack = one after another; parallel = side by side, outputs summed; "
        "average = outputs averaged.",
    )


# --------------------------------------------------------------------------- composed runs


def _read_run_setup(run_dir: str) -> dict:
    path = RunDir(run_dir).model_files.backbone / SETUP_FILE  # where the training loop writes method.save()
    if not path.is_file():
        raise ConfigError(f"method.compose_with: '{run_dir}' has no trained adapter ({path} not found)")
    return read_setup(path)


def _check_composable(run_dir: str, run_setup: dict, model_type: str, hidden_size: int, layers: int,
                      placement: str):
    mine = (model_type, hidden_size, layers)
    theirs = (run_setup["model_type"], run_setup["hidden_size"], run_setup["num_layers"])
    if theirs != mine:
        raise ConfigError(
            f"method.compose_with: '{run_dir}' was trained on a {theirs[0]} model with hidden size {theirs[1]} "
            f"and {theirs[2]} layers; this model is {mine[0]}, {mine[1]}, {mine[2]}"
        )
    theirs = run_setup["placement"]
    if theirs != placement:
        raise ConfigError(
            f"method.compose_with: '{run_dir}' has {theirs} adapters and composed adapters "
            f"must share one placement; set method.placement: {theirs}"
        )


def _unique_name(run_dir: str, taken: set[str]) -> str:
    from torch import nn

    name = re.sub(r"\W", "_", Path(run_dir).resolve().name) or "adapter"
    while name in taken or hasattr(nn.ModuleDict, name):  # e.g. a run folder named "eval"
        name += "_"
    return name


def _composed(cfg, model_type: str, hidden_size: int, layers: int) -> tuple[list[dict], dict]:
    """The adapter each compose_with run trained, renamed after its run, and its weights."""
    from safetensors.torch import load_file

    specs, tensors, taken = [], {}, {TRAINED}
    for run_dir in cfg.compose_with:
        run_setup = _read_run_setup(run_dir)
        _check_composable(run_dir, run_setup, model_type, hidden_size, layers, cfg.placement)
        spec = next(s for s in run_setup["adapters"] if s["name"] == run_setup["trained"])
        name = _unique_name(run_dir, taken)
        taken.add(name)
        specs.append({**spec, "name": name, "source": str(run_dir)})
        prefix = run_setup["trained"] + "."
        for key, tensor in load_file(RunDir(run_dir).model_files.backbone / WEIGHTS_FILE).items():
            if key.startswith(prefix):
                tensors[name + "." + key[len(prefix):]] = tensor
    return specs, tensors


# --------------------------------------------------------------------------- the method


class BottleneckAdapter(Method):
    name = "adapter"
    config_class = AdapterMethod
    merge_refusal = ("its adapter layers add nonlinear modules that no base weight can absorb: serve the run with "
                     "`tunelab serve RUN_DIR`")
    adapter_refusal = ("its adapter layers are tunelab's own modules, not a PEFT layout: serve the run with "
                       "`tunelab serve RUN_DIR`")
    named_adapters_refusal = "its adapter layers are tunelab's own modules, one unnamed set per model"
    # 1e-3: 20x full fine-tuning's rate and 2x LoRA's. W_up starts at zero and the bottleneck is narrow
    # (24 units for MiniLM at reduction 16), so smaller rates barely move the model in a short run.
    # Houlsby et al. searched up to 3e-3; AdapterHub's 1e-4 goes with its 10+ epoch recipes.
    default_lr = 1e-3

    def check(self, cfg, hf_config, task: str) -> None:
        from tunelab.methods.adapter_layers import family_of

        family_of(hf_config.model_type)
        if hf_config.hidden_size // cfg.reduction_factor < 1:
            raise ConfigError(
                f"method.reduction_factor {cfg.reduction_factor} leaves no bottleneck for hidden size "
                f"{hf_config.hidden_size}; use at most {hf_config.hidden_size}"
            )
        for run_dir in cfg.compose_with:
            _check_composable(
                run_dir, _read_run_setup(run_dir), hf_config.model_type, hf_config.hidden_size,
                hf_config.num_hidden_layers, cfg.placement,
            )

    def apply(self, backbone: nn.Module, cfg, task: str) -> nn.Module:
        from tunelab.methods.adapter_layers import insert_adapters, load_adapter_weights

        hf_config = backbone.config
        self.check(cfg, hf_config, task)
        composed, tensors = _composed(cfg, hf_config.model_type, hf_config.hidden_size, hf_config.num_hidden_layers)
        own = {
            "name": TRAINED, "reduction_factor": cfg.reduction_factor, "non_linearity": cfg.non_linearity,
            "scaling": cfg.scaling, "source": None,
        }
        setup = {
            "model_type": hf_config.model_type, "hidden_size": hf_config.hidden_size,
            "num_layers": hf_config.num_hidden_layers, "placement": cfg.placement, "composition": cfg.composition,
            "trained": TRAINED, "adapters": composed + [own],
        }
        points = insert_adapters(backbone, setup)
        backbone.requires_grad_(False)  # the base and the composed adapters stay frozen
        for point in points:
            point.adapters[TRAINED].requires_grad_(True)
        load_adapter_weights(backbone, tensors)
        return backbone

    def save(self, backbone: nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        from tunelab.methods.adapter_layers import SETUP_ATTR, adapter_parameters

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
        from safetensors.torch import load_file

        from tunelab.methods.adapter_layers import adapter_parameters, insert_adapters, load_adapter_weights

        setup = read_setup(Path(out_dir) / SETUP_FILE)
        tensors = load_file(Path(out_dir) / WEIGHTS_FILE)
        insert_adapters(base_backbone, setup)
        base_backbone.requires_grad_(False)  # a loaded run is for inference: nothing trains
        missing = sorted(set(adapter_parameters(base_backbone)) - set(tensors))
        if missing:
            raise ValueError(f"{out_dir / WEIGHTS_FILE} lacks adapter weights, e.g. {missing[:3]}")
        load_adapter_weights(base_backbone, tensors)
        return base_backbone

    # ------------------------------------------------------------------ what the planner asks

    def activation_cost(self, module: nn.Module, cfg) -> ActivationCost | None:
        """An insertion point: each adapter keeps its input, its down-projection and the activation; the
        up-projection and its scaled copy are freed once added."""
        from tunelab.methods.adapter_layers import AdapterPoint

        if not isinstance(module, AdapterPoint):
            return None
        cost = ActivationCost()
        for adapter in module.adapters.values():
            hidden, width = adapter.down.in_features, adapter.down.out_features
            cost.kept += hidden + 2 * width
            cost.transient += 2 * hidden
        return cost

    def formula_counts(self, cfg, hidden: int, layers: int) -> FormulaCounts:
        """layers x points x (2 h b + b + h) weights, b = hidden / reduction_factor: for runs that compose
        adapters of other runs, whose weights cannot be loaded into a meta-device model."""
        from tunelab.methods.adapter_layers import PLACEMENTS

        bottleneck = max(1, hidden // cfg.reduction_factor)
        points = len(PLACEMENTS[cfg.placement])
        return FormulaCounts(
            added=layers * points * (2 * hidden * bottleneck + bottleneck + hidden),
            trainable_matmul=layers * points * 2 * hidden * bottleneck,
            activation_elements=points * (hidden + 2 * bottleneck),
            transient_elements=points * 2 * hidden,
            note="adapter parameters by formula: layers x points x (2 h b + b + h), b = hidden/reduction_factor",
        )

"""Bottleneck adapters against hand-computed references on tiny BERT and Llama models.

Each reference recomputes one sublayer with plain torch ops from the inputs captured by a hook and the
adapter's known weights, so it checks both the adapter's math and where it sits (inside the residual,
before BERT's LayerNorm; beside the FFN for parallel).
"""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, BertModel, GPT2Config

from tunelab.errors import ConfigError
from tunelab.methods.adapter_layers import FAMILIES, AdapterPoint, adapter_parameters, remove_adapters
from tunelab.methods.adapters import AdapterMethod, BottleneckAdapter

CONFIGS = ["houlsby", "pfeiffer", "parallel"]
POINTS_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}
# Where each placement wraps, relative to a block: what the table in adapters.py must produce.
WRAPPED = {
    ("bert", "houlsby"): {"attention.output.dense", "output.dense"},
    ("bert", "pfeiffer"): {"output.dense"},
    ("bert", "parallel"): {"output"},
    ("llama", "houlsby"): {"self_attn.o_proj", "mlp.down_proj"},
    ("llama", "pfeiffer"): {"mlp.down_proj"},
    ("llama", "parallel"): {"mlp"},
}
METHOD = BottleneckAdapter()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run ~30x slower on two threads than on one when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tiny_encoder, tiny_decoder):
    """Makers of fresh copies of the tiny base models (the same weights every call)."""
    loaded = {
        "bert": BertModel.from_pretrained(tiny_encoder).eval(),
        "llama": AutoModelForCausalLM.from_pretrained(tiny_decoder).eval(),
    }
    return {arch: (lambda m=model: copy.deepcopy(m)) for arch, model in loaded.items()}


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 7), generator=g)  # within every tiny vocabulary
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomize(model, seed: int, names=None) -> None:
    """Known non-zero adapter weights, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(adapter_parameters(model).items()):
            if names is None or key.split(".")[0] in names:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _bottleneck(adapter, v):
    """The adapter by hand: scaling * (W_up relu(W_down v + b_down) + b_up)."""
    hidden = torch.relu(v @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scaling * (hidden @ adapter.up.weight.T + adapter.up.bias)


def _block(model):
    return model.encoder.layer[0] if hasattr(model, "encoder") else model.model.layers[0]


def _capture(module, run):
    """(args, output) of module's call while run() runs."""
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    run()
    handle.remove()
    return seen["args"], seen["out"]


# ------------------------------------------------------------------ hand-computed references


def _reference(arch: str, config: str, block):
    """(module to hook, expected output of that module from its inputs, computed by hand)."""
    def a(point):
        return point.adapters["trained"]

    if arch == "bert":
        attn_out, ffn_out = block.attention.output, block.output

        def post_ln(sub, dense, h, residual, residual_delta=0):
            """LayerNorm(dense(h) + delta(dense(h)) + residual), dropout being off."""
            linear = dense.base if isinstance(dense, AdapterPoint) else dense
            y = h @ linear.weight.T + linear.bias
            if isinstance(dense, AdapterPoint):
                y = y + _bottleneck(a(dense), y)
            y = y + residual_delta
            ln = sub.LayerNorm
            return F.layer_norm(y + residual, (y.shape[-1],), ln.weight, ln.bias, ln.eps)

        if config == "houlsby":
            return attn_out, lambda h, x: post_ln(attn_out, attn_out.dense, h, x)
        if config == "pfeiffer":
            return ffn_out, lambda h, x: post_ln(ffn_out, ffn_out.dense, h, x)
        # parallel: `output` itself is wrapped; the delta reads the FFN input x (BertOutput's residual).
        base = ffn_out.base
        return ffn_out, lambda h, x: post_ln(base, base.dense, h, x, residual_delta=_bottleneck(a(ffn_out), x))

    attn, mlp = block.self_attn, block.mlp
    if config == "houlsby":
        def o_proj(x):
            y = x @ attn.o_proj.base.weight.T
            return y + _bottleneck(a(attn.o_proj), y)
        return attn.o_proj, o_proj
    if config == "pfeiffer":
        def down_proj(x):
            y = x @ mlp.down_proj.base.weight.T
            return y + _bottleneck(a(mlp.down_proj), y)
        return mlp.down_proj, down_proj
    base = mlp.base

    def parallel_mlp(x):  # SwiGLU FFN of x, plus the adapter of the same x
        y = (F.silu(x @ base.gate_proj.weight.T) * (x @ base.up_proj.weight.T)) @ base.down_proj.weight.T
        return y + _bottleneck(a(mlp), x)
    return mlp, parallel_mlp


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_hand_computed_reference(models, arch, config):
    model = METHOD.apply(models[arch](), AdapterMethod(config=config, reduction_factor=4), "causal_lm").eval()
    _randomize(model, seed=1)
    module, by_hand = _reference(arch, config, _block(model))
    args, out = _capture(module, lambda: _output(model))
    torch.testing.assert_close(out, by_hand(*args), atol=1e-5, rtol=1e-5)
    assert (_output(model) - _output(models[arch]())).abs().max() > 1e-3  # the adapters really act


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", CONFIGS)
def test_wraps_the_placement_of_the_paper(models, arch, config):
    model = METHOD.apply(models[arch](), AdapterMethod(config=config), "causal_lm")
    wrapped = {name for name, m in _block(model).named_modules() if isinstance(m, AdapterPoint)}
    assert wrapped == WRAPPED[(arch, config)]


# ------------------------------------------------------------------ step 0, trainable weights, base untouched


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", CONFIGS)
def test_zero_up_projection_leaves_the_model_unchanged(models, arch, config):
    base = models[arch]()
    cfg = AdapterMethod(config=config, reduction_factor=4, non_linearity="gelu", scaling=4.0)
    adapted = METHOD.apply(models[arch](), cfg, "causal_lm")
    torch.testing.assert_close(_output(adapted), _output(base), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", CONFIGS)
def test_only_adapters_train_and_their_count_matches_the_formula(models, arch, config):
    model = models[arch]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = {n: p.data_ptr() for n, p in model.named_parameters()}
    model = METHOD.apply(model, AdapterMethod(config=config, reduction_factor=4), "causal_lm")

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.trained." in n for n in trainable)
    h, layers = model.config.hidden_size, model.config.num_hidden_layers
    width = h // 4
    expected = layers * POINTS_PER_LAYER[config] * (2 * h * width + width + h)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    # apply() wraps, never copies or edits: the same tensors, the same values, back in place on removal.
    _randomize(model, seed=2)
    plain = remove_adapters(model)
    assert {n: p.data_ptr() for n, p in plain.named_parameters()} == data
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)


def test_adapters_get_gradients_and_the_base_does_not(models):
    model = METHOD.apply(models["llama"]().train(), AdapterMethod(config="houlsby", reduction_factor=4), "causal_lm")
    model(**_inputs()).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters.trained." in n for n in grads)
    assert any(n.endswith("up.weight") and g.abs().sum() > 0 for n, g in grads.items())  # zero W_up still learns


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("arch,config", [("bert", "houlsby"), ("llama", "parallel")])
def test_save_load_round_trip(models, tmp_path, arch, config):
    cfg = AdapterMethod(config=config, reduction_factor=8, non_linearity="tanh", scaling=2.0)
    model = METHOD.apply(models[arch](), cfg, "causal_lm")
    _randomize(model, seed=3)
    METHOD.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapters.safetensors"]

    loaded = METHOD.load(models[arch](), tmp_path)
    torch.testing.assert_close(_output(loaded), _output(model), atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert _output(loaded).sub(_output(models[arch]())).abs().max() > 1e-3


# ------------------------------------------------------------------ composition


def _trained_run(models, tmp_path, name: str, seed: int, **cfg) -> str:
    """A run directory holding a 'trained' adapter with known weights, as the training loop saves it."""
    model = METHOD.apply(models["bert"](), AdapterMethod(**cfg), "classification")
    _randomize(model, seed)
    run = tmp_path / name
    METHOD.save(model, run / "model" / "backbone")
    return str(run)


@pytest.mark.parametrize("composition", ["stack", "parallel", "average"])
def test_composition_matches_hand_computed_reference(models, tmp_path, composition):
    run_a = _trained_run(models, tmp_path, "sst2-a", seed=4, config="pfeiffer", reduction_factor=4)
    run_b = _trained_run(models, tmp_path, "sst2-b", seed=5, config="pfeiffer", reduction_factor=8, scaling=0.5)
    cfg = AdapterMethod(config="pfeiffer", reduction_factor=16, compose_with=[run_a, run_b], composition=composition)
    model = METHOD.apply(models["bert"](), cfg, "classification").eval()
    _randomize(model, seed=6, names={"trained"})  # the new adapter too, so all three count
    point = _block(model).output.dense
    assert list(point.adapters) == ["sst2_a", "sst2_b", "trained"]
    a, b, new = point.adapters.values()

    args, out = _capture(point, lambda: _output(model))
    y = args[0] @ point.base.weight.T + point.base.bias
    if composition == "stack":
        v = y + _bottleneck(a, y)
        v = v + _bottleneck(b, v)
        expected = v + _bottleneck(new, v)
    elif composition == "parallel":
        expected = y + _bottleneck(a, y) + _bottleneck(b, y) + _bottleneck(new, y)
    else:
        expected = y + (_bottleneck(a, y) + _bottleneck(b, y) + _bottleneck(new, y)) / 3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.trained." in n for n in trainable)


def test_composed_run_saves_and_loads_without_its_sources(models, tmp_path):
    run_a = _trained_run(models, tmp_path, "a", seed=7, config="houlsby", reduction_factor=4)
    cfg = AdapterMethod(config="houlsby", reduction_factor=4, compose_with=[run_a], composition="average")
    model = METHOD.apply(models["bert"](), cfg, "classification")
    # The composed adapter arrives with the weights its run saved.
    frozen = adapter_parameters(model)["a.1.attention_output.down.weight"]
    assert not frozen.requires_grad
    _randomize(model, seed=8, names={"trained"})
    METHOD.save(model, tmp_path / "out")

    setup = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert setup["composition"] == "average"
    assert [(s["name"], s["source"]) for s in setup["adapters"]] == [("a", run_a), ("trained", None)]

    shutil.rmtree(run_a)  # the run loads without the run it composed
    loaded = METHOD.load(models["bert"](), tmp_path / "out")
    torch.testing.assert_close(_output(loaded), _output(model), atol=0, rtol=0)


def test_composed_runs_must_match_placement_and_model(models, tmp_path):
    run_a = _trained_run(models, tmp_path, "a", seed=9, config="parallel")
    with pytest.raises(ConfigError, match="set method.placement: parallel"):
        METHOD.check(AdapterMethod(config="pfeiffer", compose_with=[run_a]), models["bert"]().config, "classification")
    with pytest.raises(ConfigError, match="trained on a bert model"):
        METHOD.check(AdapterMethod(config="parallel", compose_with=[run_a]), models["llama"]().config, "causal_lm")
    with pytest.raises(ConfigError, match="has no trained adapter"):
        METHOD.check(AdapterMethod(compose_with=[str(tmp_path / "missing")]), models["bert"]().config, "classification")


def test_placement_keeps_its_first_name(models, tmp_path):
    """`placement` was first called `config`: configs and saved runs that use the old name still load."""
    assert AdapterMethod.model_validate({"name": "adapter", "config": "houlsby"}).placement == "houlsby"
    model = METHOD.apply(models["bert"](), AdapterMethod(placement="houlsby", reduction_factor=4), "classification")
    METHOD.save(model, tmp_path)
    setup = json.loads((tmp_path / "adapter_config.json").read_text())
    setup["config"] = setup.pop("placement")  # as runs saved before the rename wrote it
    (tmp_path / "adapter_config.json").write_text(json.dumps(setup))
    loaded = METHOD.load(models["bert"](), tmp_path)
    assert len([m for m in loaded.modules() if isinstance(m, AdapterPoint)]) == 2 * model.config.num_hidden_layers


# ------------------------------------------------------------------ architectures


def test_unsupported_architecture_is_one_line_config_error():
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100)
    with pytest.raises(ConfigError) as err:
        METHOD.check(AdapterMethod(), config, "causal_lm")
    message = str(err.value)
    assert "\n" not in message and "'gpt2'" in message and "bert" in message and "llama" in message
    with pytest.raises(ConfigError):
        METHOD.apply(AutoModel.from_config(config), AdapterMethod(), "causal_lm")


def test_reduction_factor_larger_than_hidden_size_is_config_error(models):
    with pytest.raises(ConfigError, match="method.reduction_factor"):
        METHOD.check(AdapterMethod(reduction_factor=64), models["bert"]().config, "classification")


@pytest.mark.parametrize("model_type", [t for f in FAMILIES for t in f.model_types])
def test_every_listed_model_type_has_the_modules_of_its_family(model_type):
    """The table is only a claim until a model of each type is built and adapted."""
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 100, "num_key_value_heads": 2}
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **sizes)).eval()
    base_out = _output(model)
    for config in CONFIGS:  # every placement finds its modules; removing the adapters gives the plain model back
        plain = remove_adapters(METHOD.apply(model, AdapterMethod(config=config, reduction_factor=4), "x"))
        assert not any(isinstance(m, AdapterPoint) for m in plain.modules())
    model = METHOD.apply(model, AdapterMethod(config="houlsby", reduction_factor=4), "x")
    assert sum(isinstance(m, AdapterPoint) for m in model.modules()) == 2 * 2
    torch.testing.assert_close(_output(model), base_out, atol=0, rtol=0)

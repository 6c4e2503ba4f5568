"""The merged export's arithmetic: merged in fp64 and rounded to fp32 once, and a gate that still refuses a wrong
merge. On tiny models (2 layers, width 64), each test in about a second once the shared runs exist."""

from __future__ import annotations

import copy
import json

import pytest
import torch

ADAPTERS = {"lora": {"peft": "LoraConfig", "r": 4}, "dora": {"peft": "LoraConfig", "r": 4, "use_dora": True},
            "ia3": {"peft": "IA3Config"}}


def tiny_adapted(technique: str):
    """A 2-layer Llama with the technique applied and its adapter weights drawn at random (trained-looking: at
    their initial values LoRA's B is zero and IA3's vectors are one, so there would be nothing to merge)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    kwargs = {k: v for k, v in ADAPTERS[technique].items() if k != "peft"}
    if technique != "ia3":
        kwargs["target_modules"] = "all-linear"
    model = peft.get_peft_model(LlamaForCausalLM(config), getattr(peft, ADAPTERS[technique]["peft"])(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def merged_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("technique", sorted(ADAPTERS))
def test_the_merge_is_computed_in_fp64_and_rounded_once(technique):
    from tunelab.methods.peft_base import merge_in_fp64

    model = tiny_adapted(technique)
    exact = merged_weights(copy.deepcopy(model).to(torch.float64).merge_and_unload())  # the whole model in fp64
    fp32 = merged_weights(copy.deepcopy(model).merge_and_unload())
    ours = merged_weights(merge_in_fp64(copy.deepcopy(model)))
    assert ours.keys() == exact.keys() and {v.dtype for v in ours.values()} == {torch.float32}
    rounded_differently = 0
    for name, w in exact.items():
        assert torch.equal(ours[name], w.to(torch.float32)), name  # layer by layer = the whole model upcast
        # Rounding once gives the fp32 weight nearest the fp64 merge, element by element; the fp32 merge can't do
        # better anywhere, and for LoRA and DoRA does worse somewhere (so this test tells the two paths apart).
        ours_err, fp32_err = (ours[name].double() - w).abs(), (fp32[name].double() - w).abs()
        assert (ours_err <= fp32_err).all(), name
        rounded_differently += int((ours_err < fp32_err).sum())
    # IA3's merge is one product W * l: two fp32 numbers multiply exactly in fp64, and fp32's own product is that
    # exact result rounded once, so both paths give the same weights.
    assert rounded_differently > 0 if technique != "ia3" else rounded_differently == 0


def test_the_export_merges_through_merge_in_fp64(serve_runs, tmp_path, monkeypatch):
    from tunelab.export.run import export_run
    from tunelab.methods import peft_base

    calls = []
    real = peft_base.merge_in_fp64
    monkeypatch.setattr(peft_base, "merge_in_fp64", lambda model: calls.append(1) or real(model))
    export_run(serve_runs["chat-lora"], "merged", tmp_path / "out")
    assert calls == [1]


def doubled_scaling(real):
    """A wrong merge: every LoRA layer's alpha/r read as twice what it is."""

    def merge(model):
        for module in model.modules():
            if hasattr(module, "lora_B") and len(module.lora_B):
                module.scaling = {k: 2 * v for k, v in module.scaling.items()}
        return real(model)

    return merge


def one_step_off(real):
    """A wrong merge: one merged tensor moved by 1e-5 per weight, random signs (one Adam step at lr 1e-5)."""

    def merge(model):
        merged = real(model)
        w = next(p for n, p in merged.named_parameters() if n.endswith("layers.1.mlp.down_proj.weight"))
        signs = torch.randint(0, 2, w.shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
        with torch.no_grad():
            w.add_(1e-5 * signs)
        return merged

    return merge


@pytest.mark.parametrize("mistake", [doubled_scaling, one_step_off])
def test_a_wrong_merge_is_refused(serve_runs, tmp_path, monkeypatch, mistake):
    """Negative controls for the gate as it is now (the fixed limit, or the run's noise floor when that is higher)."""
    from tunelab.export.parity import ParityError
    from tunelab.export.run import export_run
    from tunelab.methods import peft_base

    monkeypatch.setattr(peft_base, "merge_in_fp64", mistake(peft_base.merge_in_fp64))
    # The tiny chatty decoder's logits are large (weights drawn 15x wide): its own fp32 noise floor is ~5e-5, so
    # the limit is 3 x that, ~1.4e-4; doubled scaling measures ~2.4 and the 1e-5 step ~3.7e-4.
    with pytest.raises(ParityError, match=r"merged export refused: parity check 'max_abs_logit_diff' is [0-9.e-]+, "
                                          r"must be below [0-9.e-]+ \(.*the run's fp32 noise floor [0-9.e-]+.*\) "
                                          r"\(measured on .*nothing was written"):
        export_run(serve_runs["chat-lora"], "merged", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("floor,limit,why", [
    (None, 1e-4, "the fixed limit: the run's fp32 noise floor could not be measured"),
    (1e-6, 1e-4, "the fixed limit: 3 x the run's fp32 noise floor 1e-06 is below it"),
    (1.26e-4, 3.78e-4, "3 x the run's fp32 noise floor 0.000126 (its fp32 vs fp64 logits): fp32 rounding alone"),
    (5e-4, 1e-3, "the ceiling: 3 x the run's fp32 noise floor 0.0005 is above it"),
])
def test_the_limit_follows_the_run_s_noise_floor_within_a_ceiling(floor, limit, why):
    from tunelab.export.parity import limit_from_floor

    got, reason = limit_from_floor(1e-4, floor)
    assert got == pytest.approx(limit) and reason.startswith(why)


def test_the_gate_records_the_floor_and_keeps_the_measured_number():
    from tunelab.export.parity import ParityError, gate

    base = {"inputs": 63, "source": "test.jsonl", "max_abs_logit_diff": 1.81e-4, "fp32_noise_floor": 1.26e-4}
    check = gate(dict(base), "merged")["checks"][0]
    assert check["passed"] and check["value"] == 1.81e-4 and check["limit"] == pytest.approx(3.78e-4)
    assert (check["fixed_limit"], check["noise_floor"], check["noise_floor_factor"]) == (1e-4, 1.26e-4, 3.0)
    with pytest.raises(ParityError, match=r"is 0.0005, must be below 0.000378 \(3 x the run's fp32 noise floor "
                                          r"0.000126 \(its fp32 vs fp64 logits\): .* than the fixed 0.0001\)"):
        gate({**base, "max_abs_logit_diff": 5e-4}, "merged")
    unmeasured = gate({**base, "max_abs_logit_diff": 5e-5, "fp32_noise_floor": None}, "adapter")["checks"][0]
    assert unmeasured["limit"] == 1e-4 and "could not be measured" in unmeasured["limit_reason"]
    with pytest.raises(ParityError):  # only the fp32 formats' gates follow the floor
        gate({**base, "max_abs_logit_diff": 2e-3, "fp32_noise_floor": 9e-4}, "onnx")


def test_the_noise_floor_is_measured_in_fp64_and_leaves_the_model_as_it_was():
    from tunelab.export.noise_floor import fp32_noise_floor
    from tunelab.export.parity import ParityInputs
    from tunelab.models.task_models import CausalLM

    model = CausalLM(tiny_adapted("lora")).eval()
    rows = [list(range(3, 3 + n)) for n in (12, 7, 20)]
    inputs = ParityInputs("causal_lm", [{"input_ids": r, "labels": r} for r in rows], "rows", pad_id=0)
    before = merged_weights(model)
    floor = fp32_noise_floor(model, inputs)
    assert 0 < floor < 1e-4
    after = merged_weights(model)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert fp32_noise_floor(model.to(torch.bfloat16), inputs) is None  # a model not in fp32 has no fp32 floor


def test_over_the_fixed_limit_the_floor_is_measured_and_recorded(serve_runs, tmp_path, monkeypatch):
    """The fixed limit lowered below what the tiny DoRA run's merge measures: the export measures the run's own
    fp32 noise floor, passes under 3 x that floor, and export.json says so."""
    from tunelab.export import parity
    from tunelab.export.run import export_run

    monkeypatch.setitem(parity.FORMAT_GATES, "merged", [("max_abs_logit_diff", 1e-12, "max")])
    record = export_run(serve_runs["chat-dora"], "merged", tmp_path / "out")
    check = record["parity"]["merged"]["checks"][0]
    assert 0 < check["noise_floor"] < 1e-4 and check["fixed_limit"] == 1e-12
    assert check["limit"] == 3 * check["noise_floor"] and check["value"] < check["limit"] and check["passed"]
    assert json.loads((tmp_path / "out" / "export.json").read_text())["parity"]["merged"]["checks"] == [check]

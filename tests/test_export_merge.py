"""The merged export's arithmetic: merged in fp64 and rounded to fp32 once. On tiny models (2 layers, width 64), each test in about a second once the shared runs exist."""

from __future__ import annotations

import copy

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


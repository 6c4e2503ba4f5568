"""`--format onnx` for decoders: the graph has a KV cache (past key/values in, present out), its logits and
greedy continuations through the cache match the run, and the cache checks can fail (negative controls).
Tiny trained runs of conftest's serve_runs; the classifier graph is covered in test_export.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def export(run, out, **kw):
    from tunelab.export import export_run

    return export_run(run, "onnx", out, **kw)


@pytest.mark.parametrize("name,quantize", [("chat-lora", None), ("text-lora", "int8")])
def test_decoder_graph_has_a_kv_cache_that_matches_the_run(serve_runs, tmp_path, name, quantize):
    import onnx
    import onnxruntime as ort

    from tunelab.inference.trained import TrainedModel

    out = tmp_path / "onnx"
    record = export(serve_runs[name], out, quantize=quantize, max_quality_loss=0.2)
    report = record["parity"]["onnx"]
    assert [c["check"] for c in report["checks"]] == ["max_abs_logit_diff", "cached_max_abs_logit_diff",
                                                      "greedy_cached_identical"]
    assert report["passed"] and report["cached_max_abs_logit_diff"] < 1e-3 and report["max_abs_logit_diff"] < 1e-3
    assert report["greedy_cached_identical"] == 1.0 and report["greedy_cached_token_agreement"] == 1.0
    assert 0 < report["cached_positions_after_prefill"] < report["cached_positions_compared"]
    notes = record["notes"]["onnx"]
    layers = notes["layers"]
    assert notes["kv_cache"] is True and layers == 2
    assert notes["inputs"][:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                   "past_key_values.0.value"] and len(notes["inputs"]) == 3 + 2 * layers
    assert notes["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    per_token = record["speed"]["per_token"]
    assert per_token["onnx_cached_s"] > 0 and per_token["onnx_uncached_s"] > 0 and per_token["torch_cached_s"] > 0
    if quantize:
        assert record["parity"]["onnx-int8"]["passed"] and per_token["onnx_int8_cached_s"] > 0
        assert "greedy_cached_identical" in record["parity"]["onnx-int8"]  # reported; int8 is gated on quality

    graph = onnx.load(out / "model.onnx")
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", notes["kv_heads"], "past_sequence", notes["head_dim"]]

    # Independently of tunelab's parity code: onnxruntime by hand, a prefill over an empty past then three
    # single-token steps feeding present back, against the run's torch model over the whole sequence.
    run = TrainedModel(serve_runs[name])
    ids = run.tokenizer(["the film was long and the day was fine"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = run.model(ids, torch.ones_like(ids)).logits[0]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names = [n for n in notes["inputs"] if n.startswith("past_key_values.")]
    past = [np.zeros((1, notes["kv_heads"], 0, notes["head_dim"]), np.float32) for _ in past_names]
    n, prefill = ids.shape[1], ids.shape[1] - 3
    got = []
    for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, n)]:
        logits, *past = sess.run(None, {"input_ids": ids[:, start:end].numpy(),
                                        "attention_mask": np.ones((1, end), np.int64),
                                        "position_ids": np.arange(start, end)[None], **dict(zip(past_names, past))})
        got.append(logits[0])
        assert past[0].shape[2] == end  # present grows by the tokens fed
    assert (torch.from_numpy(np.concatenate(got)) - want).abs().max() < 1e-3


def zeroed_past(run):
    def corrupted(self, input_ids, attention_mask, positions, past):
        if past[0].shape[2]:
            past = [np.zeros_like(p) for p in past]
        return run(self, input_ids, attention_mask, positions, past)

    return corrupted


def positions_off_by_one(run):
    def corrupted(self, input_ids, attention_mask, positions, past):
        return run(self, input_ids, attention_mask, positions + (1 if past[0].shape[2] else 0), past)

    return corrupted


@pytest.mark.parametrize("corruption", [zeroed_past, positions_off_by_one])
def test_a_cache_fed_back_wrong_fails_the_cached_gate_and_leaves_nothing(serve_runs, tmp_path, monkeypatch,
                                                                        corruption):
    """Negative controls: the graph is right and the whole-sequence check passes; only the steps that read
    the cache are wrong (its past zeroed, or the new token's position one too far), and the cached gate must
    refuse the export."""
    from tunelab.export import ParityError
    from tunelab.export.onnx_kv import OnnxDecoder

    monkeypatch.setattr(OnnxDecoder, "run", corruption(OnnxDecoder.run))
    with pytest.raises(ParityError, match=r"onnx export refused: parity check 'cached_max_abs_logit_diff' is "
                                          r"[0-9.e-]+, must be below 0.001 .*nothing was written"):
        export(serve_runs["chat-lora"], tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_a_greedy_continuation_that_differs_fails_the_greedy_gate(serve_runs, tmp_path, monkeypatch):
    """Negative control for greedy_cached_identical: the last token of every cached continuation changed."""
    from tunelab.export import ParityError
    from tunelab.export.onnx_kv import OnnxDecoder

    real = OnnxDecoder.generate
    monkeypatch.setattr(OnnxDecoder, "generate", lambda self, prompt, n, eos_token_id=None:
                        real(self, prompt, n)[:-1] + [real(self, prompt, n)[-1] + 1])
    with pytest.raises(ParityError, match="onnx export refused: parity check 'greedy_cached_identical' is 0, must "
                                          "be at least 1"):
        export(serve_runs["chat-lora"], tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_onnx_decoder_generates_like_the_run(serve_runs, tmp_path):
    """OnnxDecoder on its own, as a user would load it: greedy text equal to tunelab's torch greedy."""
    import onnxruntime as ort

    from tunelab.export.onnx_kv import OnnxDecoder
    from tunelab.export.parity import greedy
    from tunelab.inference.trained import TrainedModel

    export(serve_runs["chat-lora"], tmp_path / "onnx")
    decoder = OnnxDecoder(ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx")))
    run = TrainedModel(serve_runs["chat-lora"])
    prompt = run.tokenizer("Repeat the word apple.")["input_ids"]

    def torch_logits(ids, mask):
        return run.model(ids, mask).logits

    assert decoder.generate(prompt, 12) == greedy(torch_logits, prompt, 12)
    first = decoder.generate(prompt, 12)[0]
    assert decoder.generate(prompt, 12, eos_token_id=first) == [first]  # stops at EOS

"""`tunelab export`: every format's parity against the run's own model, on the tiny trained runs of every
technique (conftest's serve_runs); refusals leave nothing behind; an export loads back and serves.

Each export is loaded back from disk by the runtime that would serve it (transformers, PEFT, onnxruntime,
transformers' GGUF reader) before its parity is measured, so these tests check the written files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tunelab.errors import TunelabError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def leftovers(folder):
    """Anything an export left beside its output: temporary folders, or the output itself."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def export(run, fmt, out, **kw):
    from tunelab.export import export_run

    return export_run(run, fmt, out, **kw)


@pytest.mark.parametrize("name", ["chat-lora", "chat-dora", "chat-ia3", "chat-full", "text-lora", "sentiment-lora",
                                  "sentiment-ia3"])
def test_merged_export_matches_the_run_and_loads_without_tunelab(serve_runs, tmp_path, name):
    from transformers import AutoModel, AutoModelForCausalLM

    from tunelab.inference.trained import TrainedModel

    out = tmp_path / "merged"
    record = export(serve_runs[name], "merged", out)
    report = record["parity"]["merged"]
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-4
    assert report["argmax_agreement"] == 1.0 and report["inputs"] > 0
    assert leftovers(tmp_path) == ["merged"]
    saved = json.loads((out / "export.json").read_text())
    assert saved["files"] == record["files"] and "model.safetensors" in saved["files"]
    # Without tunelab: plain transformers on the folder computes the run's logits (the classifier's head is a
    # linear layer over the mean of the real tokens' states, as export.json says).
    run = TrainedModel(serve_runs[name])
    ids = run.tokenizer(["a small test sentence for the export"], return_tensors="pt")
    with torch.inference_mode():
        if run.task == "classification":
            from safetensors.torch import load_file

            assert saved["classifier"]["pooling"] == "mean"
            hidden = AutoModel.from_pretrained(out).eval()(**ids).last_hidden_state
            pooled = (hidden * ids["attention_mask"][..., None]).sum(1) / ids["attention_mask"].sum(1, keepdim=True)
            head = load_file(out / saved["classifier"]["head_file"])
            plain = pooled @ head["weight"].T + head["bias"]
        else:
            plain = AutoModelForCausalLM.from_pretrained(out).eval()(**ids).logits
        ours = run.model(ids["input_ids"], ids["attention_mask"]).logits
    assert (plain - ours).abs().max() < 1e-4
    if run.task != "classification":
        assert saved["tokenizer"]["eos_token_id"] == run.tokenizer.eos_token_id
        assert saved["tokenizer"]["chat_template"] == run.tokenizer.chat_template
        assert report["greedy_identical"] == 1.0


def test_qlora_merges_into_the_dequantized_base_and_reports_the_loss(serve_runs, tmp_path):
    record = export(serve_runs["chat-qlora"], "merged", tmp_path / "merged")
    report = record["parity"]["merged"]
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-4  # against the 4-bit model it trained on
    assert "4-bit" in record["notes"]["qlora"]
    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:  # plain fp32 weights, no 4-bit packing
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}


@pytest.mark.parametrize("name", ["chat-lora", "chat-dora", "chat-ia3", "chat-prompt", "chat-prefix", "chat-qlora",
                                  "sentiment-lora"])
def test_adapter_export_is_the_peft_layout_with_the_tokenizer(serve_runs, tmp_path, name):
    out = tmp_path / "adapter"
    record = export(serve_runs[name], "adapter", out)
    assert record["parity"]["adapter"]["max_abs_logit_diff"] < 1e-4
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(record["files"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == record["base_model_path"]


@pytest.mark.parametrize("name,fmt,says", [
    ("chat-prompt", "merged", "--format adapter"), ("chat-prefix", "merged", "--format adapter"),
    ("chat-adapter", "merged", "tunelab serve RUN_DIR"), ("chat-adapter", "adapter", "tunelab serve RUN_DIR"),
    ("chat-full", "adapter", "use --format merged"), ("chat-prompt", "gguf", "--format adapter"),
    ("sentiment-lora", "gguf", "classification run"),
])
def test_refusals_name_the_format_that_serves_it_and_leave_nothing(serve_runs, tmp_path, name, fmt, says):
    with pytest.raises(TunelabError, match=f"--format {fmt}.*{says}") as err:
        export(serve_runs[name], fmt, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path) == []


def test_bad_requests_are_refused_in_one_line(serve_runs, tmp_path):
    with pytest.raises(TunelabError, match="--format tflite: choose one of merged, adapter, onnx, gguf"):
        export(serve_runs["chat-lora"], "tflite", tmp_path / "o")
    with pytest.raises(TunelabError, match="--quantize int8: not offered for --format merged"):
        export(serve_runs["chat-lora"], "merged", tmp_path / "o", quantize="int8")
    with pytest.raises(TunelabError, match="not a run directory"):
        export(tmp_path, "merged", tmp_path / "o")
    (tmp_path / "taken").mkdir()
    with pytest.raises(TunelabError, match="already there; pick another --output or add --overwrite"):
        export(serve_runs["chat-lora"], "merged", tmp_path / "taken")


def test_a_corrupted_weight_fails_parity_and_leaves_nothing_that_looks_finished(serve_runs, tmp_path, monkeypatch):
    """Negative control: one weight changed after the merge, before the files are written."""
    from tunelab.export import ParityError, hf_formats

    real = hf_formats.merged_backbone

    def corrupted(trained):
        backbone = real(trained)
        with torch.no_grad():
            next(p for n, p in backbone.named_parameters() if "layers.1.mlp.down_proj" in n).add_(0.05)
        return backbone

    monkeypatch.setattr(hf_formats, "merged_backbone", corrupted)
    (tmp_path / ".out.export-999999999.tmp").mkdir()  # a killed export's leftover: cleared by the next export
    with pytest.raises(ParityError, match=r"merged export refused: parity check 'max_abs_logit_diff' is [0-9.e-]+, "
                                          r"must be below [0-9.e-]+ .*nothing was written"):
        export(serve_runs["chat-lora"], "merged", tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_after_the_new_export_passed(serve_runs, tmp_path):
    out = tmp_path / "out"
    first = export(serve_runs["chat-lora"], "adapter", out)
    second = export(serve_runs["chat-lora"], "adapter", out, overwrite=True)
    assert second["created"] >= first["created"] and leftovers(tmp_path) == ["out"]


def test_load_export_verifies_hashes_and_predicts_like_the_run(serve_runs, tmp_path):
    from tunelab.export import load_export
    from tunelab.inference.trained import TrainedModel

    texts = ["a wonderful film", "dull and far too long"]
    for fmt in ("merged", "adapter"):
        out = tmp_path / fmt
        export(serve_runs["sentiment-lora"], fmt, out)
        loaded = load_export(out)
        got, want = loaded.predict(texts), TrainedModel(serve_runs["sentiment-lora"]).predict(texts)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want)) < 1e-5
    head = tmp_path / "merged" / "classifier_head.safetensors"
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TunelabError, match="classifier_head.safetensors does not match its sha256"):
        load_export(tmp_path / "merged")


def test_serve_an_export_answers_like_tunelab_generate(serve_runs, tmp_path):
    from serve_helpers import LiveServer, post

    from tunelab.inference.trained import TrainedModel
    from tunelab.serve.state import ServeSettings

    run = serve_runs["chat-lora"]
    export(run, "merged", tmp_path / "m")
    export(run, "adapter", tmp_path / "a")
    prompt = "Repeat the word apple."
    expected = TrainedModel(run).generate([prompt], max_new_tokens=12)[0]["completion"]
    settings = ServeSettings(sources=[("m", tmp_path / "m"), ("a", tmp_path / "a")], batch_window_ms=0)
    with LiveServer(settings) as server:
        models = {m["id"] for m in __import__("httpx").get(server.url + "/v1/models").json()["data"]}
        assert models == {"m", "a"}
        for name in ("m", "a"):
            res = post(server.url + "/v1/chat/completions", {
                "model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0})
            assert res.status_code == 200, res.text
            assert res.json()["choices"][0]["message"]["content"] == expected
        lineage = {m.name: m.lineage for m in server.state.registry.models()}
        assert lineage["m"]["source_type"] == "export" and lineage["a"]["export_format"] == "adapter"


def test_cli_export_prints_the_parity_and_refuses_in_one_line(serve_runs, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "tunelab", "export", str(serve_runs["sentiment-ia3"]), "--format",
                         "merged", "--output", str(tmp_path / "e")], capture_output=True, text=True, env=ENV,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "merged: max_abs_logit_diff" in ok.stdout and "accuracy" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tunelab", "export", str(serve_runs["chat-prefix"]), "--format",
                          "merged", "--output", str(tmp_path / "f")], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--format adapter" in bad.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("name,quantize", [("sentiment-lora", "int8"), ("chat-lora", None), ("text-lora", "int8")])
def test_onnx_export_runs_in_onnxruntime_like_torch(serve_runs, tmp_path, name, quantize):
    import numpy as np
    import onnxruntime as ort

    from tunelab.inference.trained import TrainedModel

    out = tmp_path / "onnx"
    # The tiny classifier's 16 test examples: one flipped prediction is a 0.0625 accuracy drop.
    record = export(serve_runs[name], "onnx", out, quantize=quantize, max_quality_loss=0.2)
    assert record["parity"]["onnx"]["max_abs_logit_diff"] < 1e-3
    assert record["speed"]["torch_s"] > 0 and record["speed"]["onnx_s"] > 0
    if quantize:
        int8 = record["parity"]["onnx-int8"]
        assert int8["passed"] and (out / "model.int8.onnx").is_file() and record["speed"]["onnx_int8_s"] > 0
        assert {c["check"]: c["limit"] for c in int8["checks"]} == {"accuracy_drop" if name.startswith("sentiment")
                                                                    else "perplexity_increase": 0.2}
        assert ("accuracy_after" in int8) == (name.startswith("sentiment"))
        assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size
    # Independently of tunelab's parity code: onnxruntime on the file against the run's torch model.
    run = TrainedModel(serve_runs[name])
    enc = run.tokenizer(["the film was long", "a fine day"], return_tensors="pt", padding=True)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    if name.startswith("sentiment"):  # the classifier's graph is unchanged: ids and mask only
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
        assert record["notes"]["onnx"]["kv_cache"] is None
    else:  # a decoder's graph has a KV cache: the whole sequence is one pass over an empty past
        mask = feeds["attention_mask"]
        feeds["position_ids"] = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
        for i in sess.get_inputs()[3:]:
            feeds[i.name] = np.zeros((len(mask), i.shape[1], 0, i.shape[3]), np.float32)
    got = sess.run(["logits"], feeds)[0]
    with torch.inference_mode():
        want = run.model(enc["input_ids"], enc["attention_mask"]).logits
    real = enc["attention_mask"].bool() if want.dim() == 3 else slice(None)
    assert (torch.from_numpy(got)[real] - want[real]).abs().max() < 1e-3


def test_onnx_refuses_what_cannot_merge_and_gguf_only_quantizes_itself(serve_runs, tmp_path):
    with pytest.raises(TunelabError, match="--format onnx: method 'prefix' cannot be merged"):
        export(serve_runs["chat-prefix"], "onnx", tmp_path / "o")
    with pytest.raises(TunelabError, match="not offered for --format gguf .gguf always writes F16 and Q8_0."):
        export(serve_runs["chat-lora"], "gguf", tmp_path / "o", quantize="int8")
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # both files loaded back and compared: ~70 s; the refusal test below runs the same path fast
def test_gguf_round_trips_through_transformers_gguf_reader(serve_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.inference.trained import TrainedModel

    out = tmp_path / "gguf"
    record = export(serve_runs["chat-lora"], "gguf", out)
    f16, q8 = record["parity"]["gguf-f16"], record["parity"]["gguf-q8_0"]
    assert f16["passed"] and q8["passed"] and f16["tokenizer_agreement"] == 1.0
    assert f16["relative_logit_diff"] < q8["relative_logit_diff"]  # 8-bit blocks round more than F16
    assert (out / "model-q8_0.gguf").stat().st_size < 0.7 * (out / "model-f16.gguf").stat().st_size
    run = TrainedModel(serve_runs["chat-lora"])
    ids = run.tokenizer(["Repeat the word river."], return_tensors="pt")
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf").eval()
    with torch.inference_mode():
        want = run.model(ids["input_ids"], ids["attention_mask"]).logits
        got = back(**ids).logits
    assert (got - want).abs().max() / want.abs().max() < 0.02


def test_gguf_without_the_rotary_permutation_is_refused(serve_runs, tmp_path, monkeypatch):
    """Negative control: the mistake a hand-written converter makes; the round trip must catch it."""
    from tunelab.export import ParityError, gguf_format

    monkeypatch.setattr(gguf_format, "_permute", lambda weight, heads: weight)
    with pytest.raises(ParityError, match="gguf-f16 export refused: parity check '(relative_logit_diff|perplexity_"
                                          "increase)'"):
        export(serve_runs["chat-lora"], "gguf", tmp_path / "g")
    assert leftovers(tmp_path) == []

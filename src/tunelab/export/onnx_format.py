"""`--format onnx`: the merged model as one ONNX graph for onnxruntime.

- Classifiers: (input_ids, attention_mask) -> logits, the whole task model (backbone, pooling, head) in one
  graph, so the logits come out of onnxruntime with nothing left to do in Python.
- Decoders: the graph has a KV cache (onnx_kv.py): past key/values in, present key/values out, with the
  names optimum-onnx uses. A prompt is prefilled with an empty past, then each new token is one call over
  one token; `OnnxDecoder` does greedy decoding with it. Parity checks both the whole-sequence logits and
  the logits and greedy continuations through the cache; `speed.per_token` times generation per token with
  the cache, without it (the same graph rerunning the whole sequence each token) and in torch.
- `--quantize int8` adds model.int8.onnx: onnxruntime's dynamic quantization (weights of MatMul/Gemm stored in
  int8, activations quantized on the fly). Its accuracy (classifiers, whole test set) or perplexity
  (language models, held-out inputs) is measured against the run, and its speed against torch on the same
  inputs, median of 3 passes.

Parity: onnxruntime against torch on the held-out inputs (parity.py); fp32 gate 1e-3, int8 gated on quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.export.hf_formats import merged_backbone
from tunelab.export.parity import gate, measure, measure_cached, time_logits

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 18


class LogitsGraph(nn.Module):
    """What a classifier's ONNX graph computes: the task model's logits from ids and mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask).logits


def _require() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelabError(f"--format onnx needs {', '.join(missing)}: pip install 'tunelab[export]'")


def _classifier_graph(trained) -> LogitsGraph:
    """The merged classifier in fp32 (its own head and pooling), wrapped for export."""
    trained.model.backbone = merged_backbone(trained)
    model = trained.model.float().eval()
    model.dropout.p = 0.0
    return LogitsGraph(model).eval()


def _example(inputs) -> dict:
    first = inputs.features[: min(2, len(inputs.features))]
    width = max(len(f["input_ids"]) for f in first)
    example = {"input_ids": torch.full((len(first), width), inputs.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(first), width), dtype=torch.long)}
    for i, f in enumerate(first):
        example["input_ids"][i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        example["attention_mask"][i, :len(f["input_ids"])] = 1
    return example


def export_graph(graph: LogitsGraph, path: Path, example: dict) -> None:
    ids, mask = example["input_ids"], example["attention_mask"]
    dims = {0: "batch", 1: "sequence"}
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            graph, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": dims, "attention_mask": dims, "logits": dims}, opset_version=OPSET,
            dynamo=False,
        )


def session(path: Path):
    import onnxruntime as ort

    from tunelab.runtime.hardware import usable_cores

    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_logits(sess):
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = sess.run(["logits"], {"input_ids": input_ids.numpy().astype("int64"),
                                    "attention_mask": attention_mask.numpy().astype("int64")})[0]
        return torch.from_numpy(out).float()

    return logits


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _load(path: Path, decoder: bool):
    """(whole-sequence logits function, OnnxDecoder or None) for a written graph."""
    if not decoder:
        return session_logits(session(path)), None
    from tunelab.export.onnx_kv import OnnxDecoder

    runtime = OnnxDecoder(session(path))
    return runtime.logits, runtime


def _checked(ref_fn, logits_fn, runtime, inputs, gate_name: str, max_quality_loss: float | None = None) -> dict:
    report = measure(ref_fn, logits_fn, inputs)
    if runtime is not None:  # a decoder: the same again through its KV cache
        report.update(measure_cached(ref_fn, runtime.cached_logits, runtime.generate, inputs))
    return gate(report, gate_name, max_quality_loss)


def write_onnx(load_copy, ref_fn, inputs, out: Path, quantize: str | None, record: dict, say,
               max_quality_loss: float | None = None) -> dict:
    """Export, load back in onnxruntime, gate parity (and int8 quality), then time; returns the parity reports."""
    _require()
    trained = load_copy()
    decoder = trained.task != "classification"
    say("merging the technique into the base weights")
    say(f"exporting {MODEL_FILE} (opset {OPSET}{', with a KV cache' if decoder else ''})")
    if decoder:
        from tunelab.export.onnx_kv import export_cached_graph, torch_cached_greedy

        backbone = merged_backbone(trained)
        layout = export_cached_graph(backbone, out / MODEL_FILE, inputs.features[0]["input_ids"], OPSET)
        torch_generate = torch_cached_greedy(backbone)  # the per-token speed baseline, timed last
        record["notes"]["onnx"] = {
            "inputs": layout["inputs"], "outputs": layout["outputs"], "opset": OPSET, "kv_cache": True,
            "cache_layout": "(batch, kv_heads, past_sequence, head_dim) per layer, key and value",
            **{k: layout[k] for k in ("layers", "kv_heads", "head_dim")},
            "graph": "decoder with a KV cache: prefill with past_sequence 0, then one token per call, feeding "
                     "present.* back as past_key_values.*; attention_mask covers past and new tokens; "
                     "position_ids = attention_mask.cumsum(-1) - 1 at the new tokens",
        }
    else:
        export_graph(_classifier_graph(trained), out / MODEL_FILE, _example(inputs))
        record["notes"]["onnx"] = {"inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "opset": OPSET,
                                   "kv_cache": None, "graph": "whole classifier (backbone, pooling, head)"}
    trained.tokenizer.save_pretrained(out)
    del trained
    say(f"loading {MODEL_FILE} in onnxruntime")
    fp32, fp32_runtime = _load(out / MODEL_FILE, decoder)
    reports = {"onnx": _checked(ref_fn, fp32, fp32_runtime, inputs, "onnx")}
    int8 = int8_runtime = None
    if quantize == "int8":
        say(f"quantizing to {INT8_FILE} (onnxruntime dynamic int8)")
        quantize_int8(out / MODEL_FILE, out / INT8_FILE)
        int8, int8_runtime = _load(out / INT8_FILE, decoder)
        reports["onnx-int8"] = _checked(ref_fn, int8, int8_runtime, inputs, "onnx-int8", max_quality_loss)
    say("timing torch and onnxruntime on the parity inputs")
    speed = {"repeats": 3, "inputs": len(inputs.features), "threads": torch.get_num_threads(),
             "torch_s": time_logits(ref_fn, inputs), "onnx_s": time_logits(fp32, inputs)}
    if quantize == "int8":
        speed["onnx_int8_s"] = time_logits(int8, inputs)
    for key in [k for k in speed if k.startswith("onnx") and k.endswith("_s")]:
        speed[key.replace("_s", "_speedup_vs_torch")] = speed["torch_s"] / max(speed[key], 1e-9)
    if decoder:
        from tunelab.export.onnx_kv import per_token_speed

        speed["per_token"] = per_token_speed(torch_generate, fp32_runtime, int8_runtime, inputs.prompts)
    speed["cpu"] = _cpu_name()
    record["speed"] = speed
    return reports


def _cpu_name() -> str:
    from tunelab.runtime.cpuinfo import cpu_model

    try:
        return f"{cpu_model()}, {os.cpu_count()} cores"
    except Exception:  # noqa: BLE001 -- a label only
        return f"{os.cpu_count()} cores"

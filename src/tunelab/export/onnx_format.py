"""`--format onnx`: the merged model as one ONNX graph, (input_ids, attention_mask) -> logits, for onnxruntime.

- Classifiers: the whole task model (backbone, pooling, head) is one graph, so the logits come out of
  onnxruntime with nothing left to do in Python.
- Decoders: the graph returns next-token logits for every position, without a KV cache: each generated token
  reruns the whole sequence. A graph with past key/values in and out (what optimum-onnx builds for its
  ORTModelForCausalLM) is not written yet: torch's exporter does not take transformers' cache objects as
  inputs, and a hand-built cache signature per architecture is its own piece of work. For short prompts the
  cost is small; for long generations use --format gguf (llama.cpp) or merged.
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
from tunelab.export.parity import gate, measure, time_logits

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 18


class LogitsGraph(nn.Module):
    """What the ONNX graph computes: the task model's logits from ids and mask."""

    def __init__(self, model: nn.Module, decoder: bool):
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.decoder:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids, attention_mask).logits


def _require() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelabError(f"--format onnx needs {', '.join(missing)}: pip install 'tunelab[export]'")


def _task_graph(trained) -> LogitsGraph:
    """The merged model in fp32, wrapped for export (classifiers keep their own head and pooling)."""
    backbone = merged_backbone(trained)
    if trained.task == "classification":
        trained.model.backbone = backbone
        model = trained.model.float().eval()
        model.dropout.p = 0.0
        return LogitsGraph(model, decoder=False).eval()
    backbone.config.use_cache = False
    return LogitsGraph(backbone, decoder=True).eval()


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


def write_onnx(load_copy, ref_fn, inputs, out: Path, quantize: str | None, record: dict, say,
               max_quality_loss: float | None = None) -> dict:
    """Export, load back in onnxruntime, gate parity (and int8 quality); returns the parity reports."""
    _require()
    trained = load_copy()
    say("merging the technique into the base weights")
    graph = _task_graph(trained)
    first = inputs.features[: min(2, len(inputs.features))]
    width = max(len(f["input_ids"]) for f in first)
    example = {"input_ids": torch.full((len(first), width), inputs.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(first), width), dtype=torch.long)}
    for i, f in enumerate(first):
        example["input_ids"][i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        example["attention_mask"][i, :len(f["input_ids"])] = 1
    say(f"exporting {MODEL_FILE} (opset {OPSET})")
    export_graph(graph, out / MODEL_FILE, example)
    trained.tokenizer.save_pretrained(out)
    del graph, trained
    say(f"loading {MODEL_FILE} in onnxruntime")
    fp32 = session_logits(session(out / MODEL_FILE))
    reports = {"onnx": gate(measure(ref_fn, fp32, inputs), "onnx")}
    record["notes"]["onnx"] = {
        "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "opset": OPSET,
        "kv_cache": False if inputs.task != "classification" else None,
        "graph": "whole classifier (backbone, pooling, head)" if inputs.task == "classification" else
                 "decoder: logits for every position, no past key/values (each new token reruns the sequence)",
    }
    speed = {"repeats": 3, "inputs": len(inputs.features), "threads": torch.get_num_threads(),
             "torch_s": time_logits(ref_fn, inputs), "onnx_s": time_logits(fp32, inputs)}
    if quantize == "int8":
        say(f"quantizing to {INT8_FILE} (onnxruntime dynamic int8)")
        quantize_int8(out / MODEL_FILE, out / INT8_FILE)
        int8 = session_logits(session(out / INT8_FILE))
        reports["onnx-int8"] = gate(measure(ref_fn, int8, inputs), "onnx-int8", max_quality_loss)
        speed["onnx_int8_s"] = time_logits(int8, inputs)
    for key in [k for k in speed if k.startswith("onnx") and k.endswith("_s")]:
        speed[key.replace("_s", "_speedup_vs_torch")] = speed["torch_s"] / max(speed[key], 1e-9)
    speed["cpu"] = _cpu_name()
    record["speed"] = speed
    return reports


def _cpu_name() -> str:
    from tunelab.runtime.cpuinfo import cpu_model

    try:
        return f"{cpu_model()}, {os.cpu_count()} cores"
    except Exception:  # noqa: BLE001 -- a label only
        return f"{os.cpu_count()} cores"

"""Where a decoder's ONNX int8 perplexity goes: the KV-cache graph against the whole-sequence graph, and two
common remedies (weights per channel, the output projection kept in fp32), on the first 32 held-out inputs.

    python examples/intermediate/export/onnx_int8_probe.py RUN_DIR OUT.json [WORK_DIR]

Each graph is onnxruntime's dynamic int8 (`quantize_dynamic`, what `--quantize int8` writes) of the run's merged
model; perplexity is on the same held-out targets the export's parity uses.
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from tunelab.export.hf_formats import merged_backbone
from tunelab.export.onnx_format import OPSET, export_graph, session, session_logits
from tunelab.export.onnx_kv import OnnxDecoder, export_cached_graph
from tunelab.export.parity import IGNORE_INDEX, batches
from tunelab.export.source import load_run, parity_inputs, reference_logits

INPUTS = 32


class WholeSequence(nn.Module):
    """The graph without a cache: (input_ids, attention_mask) -> logits of every position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def perplexity(logits_fn, inputs) -> float:
    nll, targets = 0.0, 0
    for ids, mask, labels, _ in batches(inputs.features, inputs.pad_id, 8):
        logits, has_target = logits_fn(ids, mask).float(), labels[:, 1:] != IGNORE_INDEX
        nll += float(F.cross_entropy(logits[:, :-1][has_target], labels[:, 1:][has_target], reduction="sum"))
        targets += int(has_target.sum())
    return math.exp(nll / targets)


def main(run_dir: str, out_file: str, work: Path) -> None:
    reference = load_run(run_dir)
    inputs = parity_inputs(reference)
    inputs.features = inputs.features[:INPUTS]
    backbone = merged_backbone(load_run(run_dir))
    export_cached_graph(backbone, work / "kv.onnx", inputs.features[0]["input_ids"], OPSET)
    ids, mask, _, _ = next(batches(inputs.features[:2], inputs.pad_id, 2))
    export_graph(WholeSequence(backbone), work / "whole.onnx", {"input_ids": ids, "attention_mask": mask})
    lm_head = [n.name for n in onnx.load(work / "kv.onnx", load_external_data=False).graph.node
               if n.op_type == "MatMul"][-1]  # the output projection is the graph's last MatMul
    base = perplexity(reference_logits(reference), inputs)
    variants = {
        "kv_fp32": ("kv", None),
        "kv_int8_per_tensor": ("kv", {}),
        "whole_sequence_int8_per_tensor": ("whole", {}),
        "kv_int8_per_channel": ("kv", {"per_channel": True}),
        "kv_int8_per_tensor_output_projection_fp32": ("kv", {"nodes_to_exclude": [lm_head]}),
    }
    results = {"run": str(Path(run_dir).resolve()), "inputs": len(inputs.features), "perplexity_run": base}
    for name, (graph, options) in variants.items():
        path = work / f"{graph}.onnx"
        if options is not None:
            path = work / f"{name}.onnx"
            quantize_dynamic(work / f"{graph}.onnx", path, weight_type=QuantType.QInt8, **options)
        sess = session(path)
        logits = OnnxDecoder(sess).logits if graph == "kv" else session_logits(sess)
        ppl = perplexity(logits, inputs)
        results[name] = {"perplexity": ppl, "perplexity_increase": ppl / base - 1, "bytes": path.stat().st_size}
        print(f"{name}: perplexity {ppl:.4f} ({ppl / base - 1:+.2%}), {path.stat().st_size / 1e6:.0f} MB", flush=True)
    Path(out_file).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        main(sys.argv[1], sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tmp))

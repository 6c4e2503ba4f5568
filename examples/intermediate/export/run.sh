#!/usr/bin/env bash
# Train the four small runs and export each the ways the README reports, then collect every export.json and
# a summary table into results/. From the repository root:
#   bash examples/intermediate/export/run.sh [RUNS_DIR] [EXPORTS_DIR]
set -euo pipefail
RUNS=${1:-runs}
EXPORTS=${2:-exports}
HERE=examples/intermediate/export
for m in lora dora ia3; do
  [ -f "$RUNS/export-minilm-$m/metrics.json" ] || tunelab train "$HERE/minilm-sst2-$m.yaml" output.dir="$RUNS"
  tunelab export "$RUNS/export-minilm-$m" --format merged --output "$EXPORTS/minilm-$m-merged" --overwrite
done
tunelab export "$RUNS/export-minilm-lora" --format onnx --quantize int8 --output "$EXPORTS/minilm-lora-onnx" --overwrite
[ -f "$RUNS/export-smollm2-lora/metrics.json" ] || tunelab train "$HERE/smollm2-alpaca-lora.yaml" output.dir="$RUNS"
for f in merged adapter gguf; do
  tunelab export "$RUNS/export-smollm2-lora" --format $f --output "$EXPORTS/smollm2-lora-$f" --overwrite
done
tunelab export "$RUNS/export-smollm2-lora" --format onnx --output "$EXPORTS/smollm2-lora-onnx" --overwrite
# int8 is refused on this run (perplexity +85%, the gate is +10%; see the README): kept to show the refusal
tunelab export "$RUNS/export-smollm2-lora" --format onnx --quantize int8 --output "$EXPORTS/smollm2-lora-onnx-int8" \
  --overwrite || true
# Why: int8 of the graph with and without the cache, per-channel weights, the output projection kept in fp32.
python "$HERE/onnx_int8_probe.py" "$RUNS/export-smollm2-lora" "$HERE/results/smollm2-lora-onnx/int8-probe.json"
# Where the merged export's max |delta logit| comes from (the run's fp32 noise floor) and what wrong merges measure.
python "$HERE/merge_precision.py" "$RUNS/export-smollm2-lora" "$HERE/results/smollm2-lora-merge-precision.json"
python "$HERE/collect.py" "$EXPORTS" "$HERE/results"

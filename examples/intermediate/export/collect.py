"""Copy every export.json under EXPORTS_DIR into RESULTS_DIR/<export>/ and write RESULTS_DIR/summary.md.

    python examples/intermediate/export/collect.py exports examples/intermediate/export/results
"""

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def row(name: str, gate: str, r: dict) -> str:
    quality = (f"accuracy {r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} ({r['test_examples']} test)"
               if "accuracy_before" in r else
               f"perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f}; greedy identical "
               f"{r['greedy_identical']:.0%}, tokens {r['greedy_token_agreement']:.0%}")
    if "cached_max_abs_logit_diff" in r:
        quality += (f"; KV cache: max abs dlogit {r['cached_max_abs_logit_diff']:.2e}, greedy identical "
                    f"{r['greedy_cached_identical']:.0%}, tokens {r['greedy_cached_token_agreement']:.0%}")
    return (f"| {name} | {gate} | {r['inputs']} | {r['max_abs_logit_diff']:.2e} | {r['relative_logit_diff']:.2e} | "
            f"{r['argmax_agreement']:.4f} | {quality} | {'pass' if r['passed'] else 'FAIL'} |")


def main(exports: Path, results: Path) -> None:
    lines = ["| export | check | inputs | max abs dlogit | relative | argmax agreement | quality | gate |",
             "|---|---|---|---|---|---|---|---|"]
    speed_lines, token_lines = [], []
    for record_file in sorted(exports.glob("*/export.json")):
        name = record_file.parent.name
        (results / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(record_file, results / name / "export.json")
        record = json.loads(record_file.read_text())
        for gate, report in record["parity"].items():
            lines.append(row(name, gate, report))
        if "speed" in record:
            s = record["speed"]
            speed_lines.append(
                f"| {name} | {s['torch_s']:.3f} | {s['onnx_s']:.3f} ({s['onnx_speedup_vs_torch']:.2f}x) | "
                + (f"{s['onnx_int8_s']:.3f} ({s['onnx_int8_speedup_vs_torch']:.2f}x)" if "onnx_int8_s" in s else "-")
                + f" | {s['inputs']} | {s['threads']} |")
            if "per_token" in s:
                t = s["per_token"]
                token_lines.append(
                    f"| {name} | {t['torch_cached_s'] * 1e3:.1f} | {t['onnx_uncached_s'] * 1e3:.1f} | "
                    f"{t['onnx_cached_s'] * 1e3:.1f} ({t['onnx_cached_speedup_vs_uncached']:.2f}x) | "
                    + (f"{t['onnx_int8_cached_s'] * 1e3:.1f}" if "onnx_int8_cached_s" in t else "-")
                    + f" | {t['prompts']} x {t['new_tokens']} |")
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), platform.processor())
    text = ["# Export parity", "", f"CPU: {cpu}; load at collection: {Path('/proc/loadavg').read_text().split()[:3]}",
            "", *lines, ""]
    if speed_lines:
        text += ["## ONNX speed (median of 3 passes over the parity inputs, seconds)", "",
                 "| export | torch | onnx fp32 | onnx int8 | inputs | threads |", "|---|---|---|---|---|---|",
                 *speed_lines, ""]
    if token_lines:
        text += ["## Decoders: milliseconds per generated token (greedy, median of 3 passes)", "",
                 "| export | torch, its KV cache | onnx, no cache | onnx, KV cache (vs no cache) | onnx int8, KV cache "
                 "| prompts x tokens |", "|---|---|---|---|---|---|", *token_lines, ""]
    (results / "summary.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

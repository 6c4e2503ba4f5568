"""`tunelab export`: a finished run to a format another runtime loads, checked against the run before it is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.cli.common import app, err, out, quiet_libraries


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    format: str = typer.Option(..., "--format", help="merged (plain transformers folder), adapter (PEFT folder: "
                               "vLLM, LoRAX), onnx (onnxruntime) or gguf (llama.cpp, Ollama; F16 and Q8_0)."),
    output: Path = typer.Option(..., "--output", help="Folder to create; it appears only once parity passed."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="onnx: int8 adds onnxruntime dynamic int8 "
                                           "quantization, its quality change and speed measured."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Held-out examples (the run's data format) to "
                                          "measure parity on; default: the run's data.test."),
    max_quality_loss: Optional[float] = typer.Option(None, "--max-quality-loss", min=0.0, help="Quantized formats "
                                                     "(onnx int8, gguf): the accuracy drop or relative perplexity "
                                                     "increase to accept; default 0.05/0.10 (onnx), 0.01/0.05 (gguf)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder at --output (only once "
                                   "the new export passed)."),
):
    """Export a run (merged, adapter, onnx or gguf) and write export.json with its parity report."""
    from tunelab.export import export_run

    quiet_libraries()
    record = export_run(run_dir, format, output, quantize, str(inputs) if inputs else None, overwrite,
                        say=lambda line: err.print(f"[dim]{line}[/]", highlight=False),
                        max_quality_loss=max_quality_loss)
    for name, report in record["parity"].items():
        checks = ", ".join(f"{c['check']} {c['value']:.3g} (limit {c['limit']:.3g}"
                           + (f": {c['limit_reason']}" if c["limit"] != c.get("fixed_limit", c["limit"]) else "") + ")"
                           for c in report["checks"])
        quality = ""
        if "accuracy_before" in report:
            quality = f"; accuracy {report['accuracy_before']:.4f} -> {report['accuracy_after']:.4f}"
        elif "perplexity_before" in report:
            quality = (f"; perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f}, "
                       f"greedy identical {report['greedy_identical']:.0%}")
        out.print(f"{name}: {checks}; argmax agreement {report['argmax_agreement']:.4f}{quality}", highlight=False)
    per_token = record.get("speed", {}).get("per_token")
    if per_token:
        out.print(f"per generated token: onnx with KV cache {per_token['onnx_cached_s'] * 1e3:.1f} ms, without "
                  f"{per_token['onnx_uncached_s'] * 1e3:.1f} ms ({per_token['onnx_cached_speedup_vs_uncached']:.2f}x), "
                  f"torch with its cache {per_token['torch_cached_s'] * 1e3:.1f} ms", highlight=False)
    out.print(f"wrote {output} ({len(record['files'])} files, export.json)", highlight=False)

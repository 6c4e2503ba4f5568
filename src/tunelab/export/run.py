"""`tunelab export RUN_DIR --format FORMAT --output DIR`, top to bottom: refuse early what cannot be exported,
load the run's model as the reference, write the format into a temporary folder, load it back from disk,
measure parity, and publish the folder only if every gate passed (bundle.py)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

from tunelab.errors import TunelabError
from tunelab.export.bundle import publish, staging
from tunelab.export.hf_formats import (
    classifier_record, load_adapter_model, load_merged_model, logits_of, refuse_unless, write_adapter, write_merged,
)
from tunelab.export.noise_floor import fp32_noise_floor
from tunelab.export.parity import fixed_limit_fails, gate, measure
from tunelab.export.source import load_run, parity_inputs, reference_logits, source_record, tokenizer_record

FORMATS = ("merged", "adapter", "onnx", "gguf")
QUANTIZE = {"onnx": ("int8",)}


def check_request(run_dir: str | Path, fmt: str, quantize: str | None) -> None:
    """Everything that can be refused from the config alone, before any weight loads."""
    from tunelab.config import load_config
    from tunelab.runtime.run_dir import RunDir

    if fmt not in FORMATS:
        raise TunelabError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if quantize and quantize not in QUANTIZE.get(fmt, ()):
        offered = ", ".join(f"--format {f} --quantize {q}" for f, qs in QUANTIZE.items() for q in qs)
        extra = " (gguf always writes F16 and Q8_0)" if fmt == "gguf" else ""
        raise TunelabError(f"--quantize {quantize}: not offered for --format {fmt}{extra}; offered: {offered}")
    run = RunDir(run_dir)
    if not run.is_run():
        raise TunelabError(f"{run_dir}: not a run directory (no config.yaml)")
    if not run.has_model():
        raise TunelabError(f"{run_dir}: has no trained model (run status: {run.status()})")
    cfg = load_config(run.config_path)
    refuse_unless(cfg.method.name, fmt)
    if fmt == "gguf" and cfg.task == "classification":
        raise TunelabError("--format gguf: llama.cpp and Ollama run language models; this is a classification run "
                           "(use --format onnx or merged)")


def export_run(run_dir: str | Path, fmt: str, output: str | Path, quantize: str | None = None,
               inputs_file: str | None = None, overwrite: bool = False,
               say: Callable[[str], None] = lambda line: None, max_quality_loss: float | None = None) -> dict:
    """Export a finished run; returns the export.json record. Raises TunelabError (ParityError when a parity
    gate fails), leaving nothing at `output`. max_quality_loss: replaces the accuracy-drop and perplexity-increase
    limits of the quantized formats (onnx int8, gguf), for a user who accepts more (or less)."""
    check_request(run_dir, fmt, quantize)
    output = Path(output)
    say(f"loading the run's model from {run_dir} (the reference)")
    reference = load_run(run_dir)
    inputs = parity_inputs(reference, inputs_file)
    ref_fn = reference_logits(reference)
    cfg, labels = reference.cfg, reference.labels
    record = {
        "format": fmt, "quantize": quantize, "max_quality_loss": max_quality_loss, "source": source_record(reference),
        "tokenizer": tokenizer_record(reference), "labels": labels, "classifier": classifier_record(reference),
        "notes": {},
    }
    with staging(output, overwrite) as tmp:
        if fmt == "merged":
            say("merging the technique into the base weights")
            write_merged(load_run(run_dir), tmp)  # a second copy: the merge changes weights in place
            gc.collect()
            candidate = load_merged_model(tmp, cfg, labels, record["classifier"])
            if cfg.method.name == "qlora":
                record["notes"]["qlora"] = (
                    "merged into the dequantized 4-bit base (the weights training multiplied with); parity is "
                    "measured against the run's 4-bit model, and max_abs_logit_diff is the loss of the merge")
            parity = {"merged": _checked(reference, ref_fn, logits_of(candidate), inputs, "merged", say)}
        elif fmt == "adapter":
            record.update(write_adapter(reference, tmp))
            candidate = load_adapter_model(tmp, cfg, labels, record["classifier"])
            parity = {"adapter": _checked(reference, ref_fn, logits_of(candidate), inputs, "adapter", say)}
        elif fmt == "onnx":
            from tunelab.export.onnx_format import write_onnx

            parity = write_onnx(lambda: load_run(run_dir), ref_fn, inputs, tmp, quantize, record, say,
                                max_quality_loss)
        else:
            from tunelab.export.gguf_format import write_gguf

            parity = write_gguf(load_run(run_dir), ref_fn, inputs, tmp, record, say, max_quality_loss)
        record["parity"] = parity
        say(f"parity passed; writing {output}")
        return publish(tmp, output, record)


def _checked(reference, ref_fn, cand_fn, inputs, gate_name: str, say) -> dict:
    say(f"measuring parity ({gate_name}) on {len(inputs.features)} held-out inputs from {inputs.source}")
    report = measure(ref_fn, cand_fn, inputs)
    if fixed_limit_fails(report, gate_name):  # a deep model's own fp32 rounding may be above the fixed limit
        say(f"max |delta logit| {report['max_abs_logit_diff']:.3g} is over the fixed limit: measuring the run's "
            "own fp32 noise floor (its model in fp32 against itself in fp64)")
        report["fp32_noise_floor"] = fp32_noise_floor(reference.model, inputs)
    return gate(report, gate_name)

"""The report of one run: report.md, a self-contained report.html and plots/*.png, in the run directory.

Works on any run directory: a completed run gets its metrics, a failed or still-running one gets its status,
its error and whatever its training log holds so far.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.report import plots
from tunelab.report.document import Document
from tunelab.report.run_data import RunData, load_run
from tunelab.report.units import MISSING, human_bytes, human_count, human_duration, number, percent


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md, report.html and plots/ into run_dir; return (md_path, html_path)."""
    run = load_run(run_dir)
    doc = build_run_document(run)
    md_path, html_path = run.files.report_md, run.files.report_html
    md_path.write_text(doc.to_markdown(), encoding="utf-8")
    html_path.write_text(doc.to_html(), encoding="utf-8")
    return md_path, html_path


def report_after_run(run_dir: str | Path, console) -> Path | None:
    """The per-run report, written once a run finished; returns report.html, or None when it failed.

    The run's results are already on disk, so a plotting failure costs only the report: it is printed on
    `console` (anything with rich's print), and `tunelab report RUN_DIR` can retry.
    """
    try:
        _, html = write_run_report(run_dir)
    except Exception as err:  # noqa: BLE001
        console.print(f"[yellow]report not written ({type(err).__name__}: {err}); retry with `tunelab report {run_dir}`[/]")
        return None
    console.print(f"report {html}")
    return html


def build_run_document(run: RunData) -> Document:
    doc = Document(f"Run report: {run.name}")
    facts = [f"task {run.task or MISSING}", f"model {run.model or MISSING}", f"method {run.method or MISSING}",
             f"status {run.status}"]
    doc.paragraph(" · ".join(facts))
    _status(doc, run)
    if run.metrics is not None:
        _headline(doc, run)
    _training(doc, run)
    _loss(doc, run)
    if run.is_classification and run.eval:
        _classification(doc, run)
    elif run.eval.get("perplexity") is not None:
        _perplexity(doc, run)
    if run.metrics and run.metrics.get("samples"):
        _samples(doc, run)
    _provenance(doc, run)
    return doc


def _status(doc: Document, run: RunData) -> None:
    if run.status == "completed":
        return
    doc.heading("Status")
    if run.status == "running":
        doc.paragraph("This run has not finished (if it runs on another host, it may also have been killed there). "
                      "The numbers below come from its training log so far.")
    elif run.status == "killed":
        doc.paragraph("This run was killed (SIGKILL, out of memory, a power loss): its process is gone and recorded "
                      "no failure. The numbers below come from its training log up to then.")
    elif run.status == "interrupted":
        doc.paragraph("This run was interrupted (Ctrl-C). The numbers below come from its training log up to then.")
    elif run.status == "failed":
        doc.paragraph("This run failed. The numbers below come from its training log up to the failure.")
    else:
        doc.paragraph(f"Status '{run.status}': no metrics.json, so the run did not complete.")
    if run.error:
        doc.preformatted(run.error)


def _headline(doc: Document, run: RunData) -> None:
    doc.heading("Headline metrics (test set)")
    e = run.eval
    if not e:
        doc.paragraph("No test set was evaluated.")
        return
    if run.is_classification:
        rows = [("accuracy", number(e.get("accuracy"))), ("macro F1", number(e.get("f1_macro"))),
                ("macro precision", number(e.get("precision_macro"))), ("macro recall", number(e.get("recall_macro"))),
                ("test examples", number(e.get("num_examples")))]
        val = (run.metrics or {}).get("validation", {})
        if val.get("accuracy") is not None:
            rows += [("validation accuracy", number(val.get("accuracy"))),
                     ("validation macro F1", number(val.get("f1_macro")))]
        doc.key_values(rows)
        return
    untuned = run.eval_untuned
    rows = [("test loss (tuned)", number(e.get("loss"))), ("test perplexity (tuned)", number(e.get("perplexity"), 2))]
    if untuned.get("perplexity") is not None:
        change = 100 * (e["perplexity"] - untuned["perplexity"]) / untuned["perplexity"]
        rows += [("test loss (untuned)", number(untuned.get("loss"))),
                 ("test perplexity (untuned)", number(untuned.get("perplexity"), 2)),
                 ("perplexity change", f"{change:+.1f}%")]
    rows.append(("test tokens", number(e.get("num_tokens"))))
    if run.metrics.get("samples_stopped_at_eos") is not None:
        rows.append(("samples ending with EOS (tuned)", percent(100 * run.metrics["samples_stopped_at_eos"], 0)))
    if untuned.get("samples_stopped_at_eos") is not None:
        rows.append(("samples ending with EOS (untuned)", percent(100 * untuned["samples_stopped_at_eos"], 0)))
    doc.key_values(rows)


def _training(doc: Document, run: RunData) -> None:
    t = run.train
    doc.heading("Training")
    if not t:
        log = run.train_log
        if not log:
            doc.paragraph("No training step was logged.")
            return
        speeds = [r["real_tokens_per_s"] for r in log if r.get("real_tokens_per_s") is not None]
        doc.key_values([
            ("last logged step", number(log[-1]["step"])),
            ("last logged loss", number(log[-1].get("loss"))),
            ("real tokens/s (mean of logged windows)", number(sum(speeds) / len(speeds), 1) if speeds else MISSING),
            ("peak memory (measured so far)", human_bytes(run.peak_memory_bytes)),
        ])
        return
    rows = [
        ("steps", number(t.get("steps"))),
        ("train wall time", human_duration(t.get("wall_s"))),
        ("total wall time (with evaluation)", human_duration((run.metrics or {}).get("total_wall_s"))),
        ("real (non-pad) tokens", number(t.get("real_tokens"))),
        ("real tokens/s", number(t.get("real_tokens_per_s"), 1)),
        ("peak memory (measured)", human_bytes(t.get("peak_memory_bytes"))),
    ]
    estimated = run.estimated_peak_memory_bytes
    if estimated is not None:
        rows.append(("peak memory (estimated)", human_bytes(estimated)))
        if t.get("peak_memory_bytes"):
            rows.append(("estimate / measured", f"{estimated / t['peak_memory_bytes']:.2f}x"))
    rows += [
        ("trainable parameters", _params(t)),
        ("precision", str(t.get("precision", MISSING))),
        ("learning rate (peak)", f"{t['lr']:.2e}" if isinstance(t.get("lr"), (int, float)) else MISSING),
    ]
    if "flops_per_token" in t:
        fpt = t["flops_per_token"]
        rows.append(("FLOPs per token", f"{human_count(fpt)} FLOPs" if fpt is not None else "unknown"))
    if "mfu" in t:
        mfu = t["mfu"]  # a fraction of the device's peak FLOP/s; null where that peak is unknown (e.g. CPU)
        rows.append(("model FLOPs utilisation (MFU)", percent(100 * mfu, 1) if mfu is not None else "unknown"))
    if t.get("num_processes", 1) != 1:
        rows.append(("processes", number(t["num_processes"])))
    rows.append(("saved artifact (model/)", human_bytes(run.artifact_bytes)))
    doc.key_values(rows)
    plan = run.plan
    if plan is not None:
        doc.heading("Memory plan (estimated before training)", 3)
        doc.paragraph(f"Bytes at the peak of a training step and of the largest evaluation pass, {plan.device}, "
                      f"{plan.precision}; the run's estimated peak is the {plan.peak_phase} phase's "
                      f"({human_bytes(plan.peak_memory_bytes)}).")
        doc.table(["held by", "train step", "eval pass"],
                  [[label, human_bytes(train), human_bytes(ev)] for label, train, ev in plan.memory_rows()],
                  numeric={1, 2})


def _link(run: RunData, png: Path) -> str:
    """A plot's path as report.md links it: relative to the run directory."""
    return png.relative_to(run.path).as_posix()


def _params(t: dict) -> str:
    if t.get("trainable_params") is None:
        return MISSING
    text = f"{human_count(t['trainable_params'])} of {human_count(t.get('total_params'))}"
    if t.get("trainable_percent") is not None:
        text += f" ({t['trainable_percent']:.3g}%)"
    return text


def _loss(doc: Document, run: RunData) -> None:
    what = "cross-entropy per example" if run.is_classification else "mean NLL per target token"
    png = plots.loss_curve(run.files.plots_dir / "loss.png", run.train_log, run.validation_log,
                           f"Training loss — {run.name}", loss_label=f"loss ({what}, nats)")
    if png is None:
        return
    doc.heading("Loss curve")
    if run.validation_log and not any("loss" in r for r in run.validation_log):
        doc.paragraph("Training loss by step; periodic validation scores on the right-hand axis.")
    doc.image("loss curve", png, _link(run, png))


def _classification(doc: Document, run: RunData) -> None:
    per_class = run.eval.get("per_class", {})
    if per_class:
        doc.heading("Per-class metrics (test set)")
        doc.table(
            ["label", "precision", "recall", "F1", "support"],
            [[name, number(m.get("precision")), number(m.get("recall")), number(m.get("f1")), number(m.get("support"))]
             for name, m in per_class.items()],
            numeric={1, 2, 3, 4},
        )
    matrix = run.eval.get("confusion_matrix")
    if matrix:
        labels = run.labels if len(run.labels) == len(matrix) else list(per_class)
        png = plots.confusion_matrix(run.files.plots_dir / "confusion.png", matrix, labels,
                                     f"Confusion matrix (test) — {run.name}")
        doc.heading("Confusion matrix (test set)")
        doc.paragraph("Rows are the true label, columns the prediction; each cell shows the count and its share "
                      "of the true class.")
        doc.image("confusion matrix", png, _link(run, png))


def _perplexity(doc: Document, run: RunData) -> None:
    png = plots.perplexity_bars(run.files.plots_dir / "perplexity.png", run.eval["perplexity"],
                                run.eval_untuned.get("perplexity"), f"Test perplexity — {run.name}")
    doc.heading("Perplexity, tuned vs untuned")
    doc.image("perplexity tuned vs untuned", png, _link(run, png))


def _samples(doc: Document, run: RunData) -> None:
    untuned = run.eval_untuned.get("samples", [])
    doc.heading("Generation samples (greedy)")
    if untuned:
        doc.paragraph("The same test prompts, answered by the tuned model and by the untuned base model.")
    for i, sample in enumerate(run.metrics["samples"]):
        doc.heading(f"Sample {i + 1}", 3)
        doc.preformatted(sample.get("prompt", ""))
        columns = [(f"tuned ({_ending(sample)})", sample.get("completion", ""))]
        if i < len(untuned):
            columns.append((f"untuned ({_ending(untuned[i])})", untuned[i].get("completion", "")))
        if sample.get("reference"):
            columns.append(("reference", sample["reference"]))
        doc.side_by_side(columns)


def _ending(sample: dict) -> str:
    tokens = sample.get("new_tokens")
    count = f"{tokens} tokens, " if tokens is not None else ""
    return count + ("ends with EOS" if sample.get("stopped_at_eos") else "no EOS: cut at max_new_tokens")


def _provenance(doc: Document, run: RunData) -> None:
    m = run.manifest
    if not m:
        return
    doc.heading("Provenance")
    command = m.get("command")
    rows = [
        ("command", " ".join(command) if isinstance(command, list) else str(command or MISSING)),
        ("started", str(m.get("started", MISSING))),
        ("finished", str(m.get("finished", MISSING))),
        ("seed", number(m.get("seed"))),
        ("git commit", str(m.get("git_commit") or MISSING)),
    ]
    hardware = m.get("hardware") or {}
    if hardware:
        if hardware.get("gpu"):
            device = f"{hardware['gpu']} x{hardware.get('gpu_count', 1)}"
        else:
            device = f"{hardware.get('cpu', MISSING)}, {hardware.get('usable_cores', MISSING)} cores, no GPU"
        rows.append(("hardware", device))
    packages = m.get("packages") or {}
    if packages:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v)))
    tracked = m.get("mlflow") or {}
    if tracked.get("run_id"):
        rows.append(("MLflow run", _mlflow_link(tracked)))
    doc.key_values(rows, numeric=False)


def _mlflow_link(tracked: dict) -> str:
    """Where the run is in MLflow: a URL on a server, the run id and the command to browse an embedded store."""
    uri, run_id = tracked.get("tracking_uri", ""), tracked["run_id"]
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{tracked.get('experiment_id')}/runs/{run_id}"
    return f"{run_id} in {uri} (browse with `tunelab ui` or `mlflow ui --backend-store-uri {uri}`)"

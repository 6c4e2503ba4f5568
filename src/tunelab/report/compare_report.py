"""The comparison of several runs (one per method): a table, five plots and a note on how to read them.

Writes comparison.md, a self-contained comparison.html, comparison.csv and comparison.json (raw numbers,
one row per method) and plots/*.png into the comparison directory. A failed method keeps its row, with its
error, and is left out of the plots. A row names the method's run directory and, when the entry gives one, the
folder (relative to the comparison directory) holding copies of its config, manifest and metrics.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tunelab.report import plots
from tunelab.report.document import Document
from tunelab.report.run_data import LM_TASKS, RunData, load_run
from tunelab.report.units import GIB, MISSING, human_bytes, human_count, human_duration, number

CSV_FIELDS = [
    "method", "status", "task", "technique", "model",
    "accuracy", "f1_macro", "perplexity", "untuned_perplexity", "loss",
    "train_wall_s", "real_tokens_per_s", "peak_memory_bytes", "estimated_peak_memory_bytes",
    "trainable_params", "total_params", "trainable_percent", "artifact_bytes",
    "test_examples", "test_tokens", "run_dir", "evidence_dir", "error",
]


def write_compare_report(compare_dir: str | Path, entries: list[dict]) -> dict[str, Path]:
    """entries: [{"method": str, "run_dir": str | None, "status": "completed" | "failed", "error": str | None,
    "evidence_dir": str | None (optional)}].

    Returns the written paths: md, html, csv, json, and one key per plot that had data to draw
    (quality_plot, loss_plot, params_plot, memory_plot, cost_plot).
    """
    out = Path(compare_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    loaded = [_load(entry) for entry in entries]
    rows = [row for row, _ in loaded]
    for row, name in zip(rows, _unique([row["method"] for row in rows])):
        row["method"] = name
    task = _main_task(rows)
    ok = [(row, run) for row, run in loaded if _plotted(row, task)]
    pngs = _plots(out / "plots", task, ok)
    notes = reading_notes(rows, task)

    paths = {"md": out / "comparison.md", "html": out / "comparison.html", "csv": out / "comparison.csv",
             "json": out / "comparison.json"}
    doc = _document(rows, task, notes, pngs, out)
    paths["md"].write_text(doc.to_markdown(), encoding="utf-8")
    paths["html"].write_text(doc.to_html(), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = {"task": task, "quality_metric": _quality_key(task), "rows": rows, "reading": notes}
    paths["json"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return {**paths, **pngs}


# --------------------------------------------------------------------- rows


def _load(entry: dict) -> tuple[dict, RunData | None]:
    row = {key: None for key in CSV_FIELDS}
    row.update(method=entry["method"], status=entry.get("status", "completed"), error=entry.get("error"))
    run_dir = entry.get("run_dir")
    row["run_dir"] = str(run_dir) if run_dir else None
    row["evidence_dir"] = entry.get("evidence_dir")
    if not run_dir or not Path(run_dir).is_dir():
        if row["status"] == "completed":
            row.update(status="failed", error=row["error"] or f"run directory not found: {run_dir}")
        return row, None
    run = load_run(run_dir)
    row.update(task=run.task, technique=run.method, model=run.model, error=row["error"] or run.error)
    if row["status"] == "completed" and run.metrics is None:
        # The caller thought it finished, but the run never wrote metrics.json: say so instead of empty cells.
        row.update(status=run.status if run.status != "completed" else "failed",
                   error=row["error"] or "no metrics.json: the run did not complete")
    if row["status"] != "completed":
        return row, run
    t, e = run.train, run.eval
    row.update(
        accuracy=e.get("accuracy"),
        f1_macro=e.get("f1_macro"),
        perplexity=e.get("perplexity"),
        untuned_perplexity=run.eval_untuned.get("perplexity"),
        loss=e.get("loss"),
        train_wall_s=t.get("wall_s"),
        real_tokens_per_s=t.get("real_tokens_per_s"),
        peak_memory_bytes=t.get("peak_memory_bytes"),
        estimated_peak_memory_bytes=run.estimated_peak_memory_bytes,
        trainable_params=t.get("trainable_params"),
        total_params=t.get("total_params"),
        trainable_percent=t.get("trainable_percent"),
        artifact_bytes=run.artifact_bytes,
        test_examples=e.get("num_examples"),
        test_tokens=e.get("num_tokens"),
    )
    return row, run


def _unique(names: list[str]) -> list[str]:
    """A method entered twice (e.g. two LoRA ranks both called "lora") becomes "lora (2)" everywhere, so the
    table, the note and the plot labels can tell the rows apart."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def _main_task(rows: list[dict]) -> str | None:
    """The task of the first completed row: its quality metric is the one plotted and ranked."""
    return next((r["task"] for r in rows if r["status"] == "completed" and r["task"]), None)


def _quality_key(task: str | None) -> str:
    return "perplexity" if task in LM_TASKS else "accuracy"


def _plotted(row: dict, task: str | None) -> bool:
    return row["status"] == "completed" and row["task"] == task and row.get(_quality_key(task)) is not None


# --------------------------------------------------------------------- reading note


def reading_notes(rows: list[dict], task: str | None) -> list[str]:
    """Plain sentences computed from the rows: best on quality, cheapest, and the gap to full fine-tuning."""
    key = _quality_key(task)
    lower_better = key == "perplexity"
    done = [r for r in rows if _plotted(r, task)]
    notes = []
    if not done:
        notes.append("No method completed, so there is nothing to rank.")
    else:
        best = (min if lower_better else max)(done, key=lambda r: r[key])
        ties = [r["method"] for r in done if r is not best and r[key] == best[key]]
        text = f"Best on quality: {best['method']} ({_quality_text(best, task)})"
        notes.append(text + (f", tied with {', '.join(ties)}." if ties else "."))
        if key == "accuracy":
            done_f1 = [r for r in done if r["f1_macro"] is not None]
            best_f1 = max(done_f1, key=lambda r: r["f1_macro"]) if done_f1 else None
            if best_f1 is not None and best_f1["f1_macro"] > (best["f1_macro"] or -1):
                notes.append(f"On macro F1 (classes weighed equally) {best_f1['method']} leads instead "
                             f"({best_f1['f1_macro']:.4f}).")
            if best.get("test_examples"):
                half = 100 * 1.96 * math.sqrt(best[key] * (1 - best[key]) / best["test_examples"])
                notes.append(f"With {best['test_examples']:,} test examples, a 95% interval on accuracy is about "
                             f"±{half:.1f} points: smaller gaps are not evidence of a difference.")
        notes += _comparability(done)
        notes += _cheapest(done)
        notes += _versus_full(done, key)
    other = [r for r in rows if r["status"] == "completed" and r not in done]
    if other:
        notes.append("Not ranked (another task, or no test metric): " + ", ".join(r["method"] for r in other) + ".")
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        notes.append("Did not complete: " + "; ".join(f"{r['method']} ({_first_line(r['error'])})" for r in failed)
                     + ".")
    return notes


def _comparability(done: list[dict]) -> list[str]:
    """Quality is only comparable on the same base model and the same test set: say when it is not."""
    notes = []
    models = sorted({r["model"] for r in done if r["model"]})
    if len(models) > 1:
        notes.append(f"Caution: the runs fine-tune different base models ({', '.join(models)}), so the gaps mix "
                     "the method with the model.")
    for field, what in (("test_examples", "test examples"), ("test_tokens", "test tokens")):
        sizes = sorted({r[field] for r in done if r[field] is not None})
        if len(sizes) > 1:
            notes.append(f"Caution: the runs were scored on test sets of different sizes "
                         f"({', '.join(f'{n:,}' for n in sizes)} {what}), so their quality is not directly comparable.")
    return notes


def _quality_text(row: dict, task: str | None) -> str:
    if _quality_key(task) == "perplexity":
        return f"test perplexity {row['perplexity']:.2f}"
    f1 = f", macro F1 {row['f1_macro']:.4f}" if row["f1_macro"] is not None else ""
    return f"accuracy {row['accuracy']:.4f}{f1}"


def _cheapest(done: list[dict]) -> list[str]:
    notes = []
    for field, what, subject, fmt in (
        ("peak_memory_bytes", "Least peak memory", "Peak memory", human_bytes),
        ("trainable_params", "Fewest trainable parameters", "Trainable parameters", human_count),
        ("train_wall_s", "Fastest to train", "Training time", human_duration),
    ):
        have = [r for r in done if r[field] is not None]
        if len(have) < 2:
            continue
        low, high = min(have, key=lambda r: r[field]), max(have, key=lambda r: r[field])
        if low[field] == high[field]:
            notes.append(f"{subject}: the same for every method ({fmt(low[field])}).")
            continue
        extra = ""
        if field == "trainable_params" and low["trainable_percent"] is not None:
            extra = f", {low['trainable_percent']:.3g}% of the model"
        notes.append(f"{what}: {low['method']} ({fmt(low[field])}{extra}; the most is {high['method']} at "
                     f"{fmt(high[field])}).")
    return notes


def _versus_full(done: list[dict], key: str) -> list[str]:
    """Each other technique against full fine-tuning: only when one row is full fine-tuning. When every row is
    (variants of one setting, e.g. learning rates), there is no "full fine-tuning" to compare against."""
    if all(r["technique"] == "full" for r in done):
        return []
    named = [r for r in done if r["method"].lower() == "full"]
    fulls = named or [r for r in done if r["technique"] == "full"]
    if len(fulls) != 1:
        return []
    full = fulls[0]
    notes = []
    for r in done:
        if r is full:
            continue
        if key == "accuracy":
            gap = 100 * (r["accuracy"] - full["accuracy"])
            text = f"{r['method']} vs full fine-tuning: {gap:+.1f} points of accuracy ({r['accuracy']:.4f} vs " \
                   f"{full['accuracy']:.4f})"
            if r["f1_macro"] is not None and full["f1_macro"] is not None:
                text += f", {100 * (r['f1_macro'] - full['f1_macro']):+.1f} points of macro F1"
        else:
            change = 100 * (r["perplexity"] - full["perplexity"]) / full["perplexity"]
            text = f"{r['method']} vs full fine-tuning: perplexity {r['perplexity']:.2f} vs {full['perplexity']:.2f} " \
                   f"({change:+.1f}%, lower is better)"
        costs = []
        if r["trainable_params"] and full["trainable_params"]:
            costs.append(f"{_ratio(r['trainable_params'], full['trainable_params'])} of its trainable parameters")
        if r["peak_memory_bytes"] and full["peak_memory_bytes"]:
            costs.append(f"{_ratio(r['peak_memory_bytes'], full['peak_memory_bytes'])} of its peak memory")
        notes.append(text + (", with " + " and ".join(costs) if costs else "") + ".")
    return notes


def _ratio(a: float, b: float) -> str:
    share = 100 * a / b
    return f"{share:.2g}%" if share < 10 else f"{share:.0f}%"


def _first_line(text: str | None) -> str:
    if not text:
        return "no error recorded"
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 160 else line[:157] + "..."


# --------------------------------------------------------------------- plots


def _plots(folder: Path, task: str | None, ok: list[tuple[dict, RunData]]) -> dict[str, Path]:
    if not ok:
        return {}
    methods = [row["method"] for row, _ in ok]
    rows = [row for row, _ in ok]
    key = _quality_key(task)
    pngs = {}
    if key == "accuracy":
        series = {"accuracy": [r["accuracy"] for r in rows], "macro F1": [r["f1_macro"] for r in rows]}
        pngs["quality_plot"] = plots.grouped_bars(folder / "quality.png", methods, series, "test score (0-1)",
                                                  "Test accuracy and macro F1 by method")
        quality_label, y_max = "test accuracy", 1.0
    else:
        series = {"untuned": [r["untuned_perplexity"] for r in rows], "tuned": [r["perplexity"] for r in rows]}
        if all(v is None for v in series["untuned"]):
            del series["untuned"]
        colors = [plots.UNTUNED_COLOR, plots.TRAIN_COLOR][-len(series):]
        pngs["quality_plot"] = plots.grouped_bars(folder / "quality.png", methods, series,
                                                  "test perplexity (lower is better)", "Test perplexity by method",
                                                  digits=2, colors=colors)
        quality_label, y_max = "test perplexity (lower is better)", None
    curves = {row["method"]: [(r["step"], r["loss"]) for r in run.train_log if r.get("loss") is not None]
              for row, run in ok}
    optional = {
        "loss_plot": plots.loss_curves(folder / "loss_curves.png", curves, "Training loss by method"),
        "params_plot": plots.scatter(
            folder / "quality_vs_params.png", [(r["method"], r["trainable_params"], r[key]) for r in rows],
            "trainable parameters (log scale)", quality_label, "Quality vs trainable parameters", log_x=True,
            y_max=y_max),
        "memory_plot": plots.scatter(
            folder / "quality_vs_memory.png",
            [(r["method"], r["peak_memory_bytes"] / GIB if r["peak_memory_bytes"] else None, r[key])
             for r in rows],
            "peak memory, measured (GiB)", quality_label, "Quality vs peak memory", y_max=y_max),
    }
    pngs.update({name: path for name, path in optional.items() if path is not None})
    pngs["cost_plot"] = plots.cost_bars(folder / "cost.png", methods, [r["train_wall_s"] for r in rows],
                                        [r["peak_memory_bytes"] for r in rows],
                                        [r["estimated_peak_memory_bytes"] for r in rows])
    return pngs


# --------------------------------------------------------------------- document

_PLOT_TITLES = {
    "quality_plot": "Quality by method",
    "loss_plot": "Training loss curves",
    "params_plot": "Quality vs trainable parameters",
    "memory_plot": "Quality vs peak memory",
    "cost_plot": "Training time and peak memory",
}


def _document(rows: list[dict], task: str | None, notes: list[str], pngs: dict[str, Path], out: Path) -> Document:
    doc = Document("Method comparison")
    done = sum(r["status"] == "completed" for r in rows)
    doc.paragraph(f"task {task or MISSING} · {len(rows)} methods · {done} completed")
    doc.heading("Results")
    headers, table = results_table(rows, task)
    doc.table(headers, table, numeric={i for i, h in enumerate(headers) if h not in ("method", "status", "error")})
    doc.heading("Reading this table")
    doc.bullets(notes)
    for name, path in pngs.items():
        doc.heading(_PLOT_TITLES[name])
        doc.image(_PLOT_TITLES[name], path, path.relative_to(out).as_posix())
    long_errors = [r for r in rows if r["error"] and _first_line(r["error"]) != r["error"].strip()]
    if long_errors:
        doc.heading("Errors in full")
        for r in long_errors:
            doc.paragraph(f"{r['method']}:")
            doc.preformatted(r["error"].strip())
    runs = [f"{r['method']}: {r['run_dir']}"
            + (f" (config, manifest and metrics copied to {r['evidence_dir']}/)" if r["evidence_dir"] else "")
            for r in rows if r["run_dir"]]
    if runs:
        doc.heading("Run directories")
        doc.bullets(runs)
    return doc


def results_table(rows: list[dict], task: str | None) -> tuple[list[str], list[list[str]]]:
    """The comparison as (headers, rows of cells): the report's table, and what `tunelab compare` prints."""
    lm = task in LM_TASKS
    headers = ["method", "status"]
    headers += ["test perplexity", "untuned perplexity"] if lm else ["accuracy", "macro F1"]
    headers += ["train time", "real tokens/s", "peak memory (measured)"]
    with_estimate = any(r["estimated_peak_memory_bytes"] is not None for r in rows)
    if with_estimate:
        headers.append("peak memory (estimated)")
    headers += ["trainable params (% of total)", "artifact size"]
    with_error = any(r["error"] for r in rows)
    if with_error:
        headers.append("error")
    table = []
    for r in rows:
        cells = [r["method"], r["status"]]
        cells += [number(r["perplexity"], 2), number(r["untuned_perplexity"], 2)] if lm else \
            [number(r["accuracy"]), number(r["f1_macro"])]
        cells += [human_duration(r["train_wall_s"]), number(r["real_tokens_per_s"], 1),
                  human_bytes(r["peak_memory_bytes"])]
        if with_estimate:
            cells.append(human_bytes(r["estimated_peak_memory_bytes"]))
        params = MISSING
        if r["trainable_params"] is not None:
            pct = f" ({r['trainable_percent']:.3g}%)" if r["trainable_percent"] is not None else ""
            params = human_count(r["trainable_params"]) + pct
        cells += [params, human_bytes(r["artifact_bytes"])]
        if with_error:
            cells.append(_first_line(r["error"]) if r["error"] else "")
        table.append(cells)
    return headers, table

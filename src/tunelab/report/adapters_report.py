"""Reports of `tunelab merge` and `tunelab route build`, from the metrics.json they wrote: a Markdown table
and one plot each (report.md and plots/*.png in the folder)."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.report import plots
from tunelab.runtime.atomic import atomic_write_text
from tunelab.runtime.run_dir import RunDir

BASE_COLOR, SOURCE_COLOR, MERGED_COLOR = plots.UNTUNED_COLOR, "#1f77b4", "#ff7f0e"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def write_merge_report(folder: str | Path) -> Path:
    run = RunDir(folder)
    data = json.loads(run.metrics_path.read_text())
    recipe, table = data["recipe"], data["tasks"]
    density = f", density {recipe['density']}" if recipe.get("density") is not None else ""
    lines = [
        f"# Merge: {recipe['method']} of {len(recipe['sources'])} adapters on {recipe['base']}", "",
        f"Weights {recipe['weights']}{density}, seed {recipe['seed']}. Each task keeps its own head; "
        "`tasks/NAME/` is a run directory that `tunelab eval`, `predict`, `serve` and `export` take.", "",
        "| task | metric | base (adapter off) | own adapter | merged | merged - own |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        if "skipped" in row:
            lines.append(f"| {name} | – | – | – | – | skipped: {row['skipped']} |")
            continue
        m = row["metric"]
        lines.append(f"| {name} | {m} | {_fmt(row['base'][m])} | {_fmt(row['source'][m])} | "
                     f"{_fmt(row['merged'][m])} | {row['delta']:+.4f} |")
    summary = data.get("summary") or {}
    if summary:
        lines += ["", f"Mean accuracy over {summary['tasks']} tasks: base {summary['mean_accuracy_base']:.4f}, "
                      f"own adapters {summary['mean_accuracy_source']:.4f}, merged "
                      f"{summary['mean_accuracy_merged']:.4f} ({summary['mean_delta']:+.4f})."]
    rows = {n: r for n, r in table.items() if r.get("metric") == "accuracy"}
    if rows:
        png = plots.grouped_bars(
            run.plots_dir / "merge.png", list(rows),
            {"base (adapter off)": [r["base"]["accuracy"] for r in rows.values()],
             "own adapter": [r["source"]["accuracy"] for r in rows.values()],
             f"merged ({recipe['method']})": [r["merged"]["accuracy"] for r in rows.values()]},
            ylabel="test accuracy", title=f"What a {recipe['method']} merge costs each task", digits=3,
            colors=[BASE_COLOR, SOURCE_COLOR, MERGED_COLOR], xlabel="task")
        lines += ["", f"![accuracy per task]({png.relative_to(run.path).as_posix()})"]
    atomic_write_text(run.report_md, "\n".join(lines) + "\n")
    return run.report_md


def _router_kind(info: dict) -> str:
    """What the router is: routers from before the n-grams recorded only "logistic regression"."""
    kind = info["kind"]
    return kind if " on " in kind else f"{kind} on {info['encoder']} embeddings"


def write_route_report(folder: str | Path) -> Path:
    run = RunDir(folder)
    data = json.loads(run.metrics_path.read_text())
    routing, e2e = data["routing"], data["end_to_end"]
    lines = [
        f"# Router over {len(routing['per_task'])} adapters", "",
        f"{_router_kind(data['router'])} "
        f"({data['router']['train_inputs']} training inputs). Routing accuracy on the tasks' test inputs: "
        f"**{routing['accuracy']:.4f}**. End to end, mean over tasks: router {e2e['mean_routed']:.4f}, "
        f"oracle (the task is known) {e2e['mean_oracle']:.4f} ({e2e['mean_routed'] - e2e['mean_oracle']:+.4f}).", "",
        "| task | test inputs | routed correctly | accuracy, router picks | accuracy, oracle | difference |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in routing["per_task"].items():
        r, o = e2e["per_task"][name]["routed"], e2e["per_task"][name]["oracle"]
        lines.append(f"| {name} | {row['num_examples']} | {row['accuracy']:.4f} | {r:.4f} | {o:.4f} | {r - o:+.4f} |")
    names = list(routing["per_task"])
    lines += ["", "Where misrouted inputs went (rows: true task, columns: chosen adapter):", "",
              "| true \\ chosen | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, counts in zip(names, routing["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    png = plots.grouped_bars(
        run.plots_dir / "routing.png", names,
        {"routing accuracy": [routing["per_task"][n]["accuracy"] for n in names],
         "end to end, router": [e2e["per_task"][n]["routed"] for n in names],
         "end to end, oracle": [e2e["per_task"][n]["oracle"] for n in names]},
        ylabel="accuracy", title="Routing each input to its task's adapter", digits=3, xlabel="task")
    lines += ["", f"![routing and end-to-end accuracy]({png.relative_to(run.path).as_posix()})"]
    atomic_write_text(run.report_md, "\n".join(lines) + "\n")
    return run.report_md


def write_multitask_report(folder: str | Path) -> Path:
    run = RunDir(folder)
    data = json.loads(run.metrics_path.read_text())
    recipe, train, table = data["recipe"], data["train"], data["tasks"]
    sampling = recipe["sampling"]
    how = sampling["strategy"] + (f" (T={sampling['temperature']})" if sampling["strategy"] == "temperature" else "")
    sharing = recipe.get("sharing", "shared_adapter")  # runs written before the key existed shared one adapter
    shared = {"shared_adapter": "one shared adapter, one head per task",
              "adapter_per_task": "one adapter and one head per task on a shared frozen base"}[sharing]
    lines = [
        f"# Multi-task run: {len(table)} tasks, {shared}", "",
        f"Sharing: `{sharing}`. {train['steps']} steps in all ({train['wall_s']:.0f} s, {train['precision']}), "
        f"tasks sampled {how}; loss weights {recipe['loss_weights']}.", "",
        "| task | training rows | sampling p | steps | multi-task accuracy | single-task accuracy | single-task steps "
        "| multi - single |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        single = row.get("single_task_accuracy")
        gain = f"{row['accuracy'] - single:+.4f}" if single is not None else "–"
        lines.append(f"| {name} | {recipe['train_rows'][name]} | {recipe['probabilities'][name]:.2f} | {row['steps']} | "
                     f"{_fmt(row['accuracy'])} | {_fmt(single)} | {row.get('single_task_steps', '–')} | {gain} |")
    names = list(table)
    series = {"multi-task": [table[n]["accuracy"] for n in names]}
    if all("single_task_accuracy" in table[n] for n in names):
        series = {"single-task": [table[n]["single_task_accuracy"] for n in names], **series}
    title = f"Multi-task ({sharing})" + (" vs single-task runs" if len(series) > 1 else "")
    png = plots.grouped_bars(run.plots_dir / "multitask.png", names, series, ylabel="test accuracy", title=title,
                             digits=3, xlabel="task")
    lines += ["", f"![accuracy per task]({png.relative_to(run.path).as_posix()})"]
    atomic_write_text(run.report_md, "\n".join(lines) + "\n")
    return run.report_md

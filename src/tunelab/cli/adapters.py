"""Commands on several finished runs at once: merge their adapters, or build a router between them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.cli.common import app, err, out, quiet_libraries

route_app = typer.Typer(no_args_is_help=True, help="Route each input to the right adapter.")
app.add_typer(route_app, name="route")


@app.command()
def merge(
    run_dirs: list[Path] = typer.Argument(..., help="Finished LoRA runs on one base model."),
    method: str = typer.Option(..., "--method", help="linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per run, comma-separated; default 1/n each."),
    density: Optional[float] = typer.Option(None, "--density", help="ties, dare_* and magnitude_prune: fraction of each update kept (default 0.5)."),
    output: Path = typer.Option(..., "--output", help="Folder to write: tasks/NAME/ holds one run directory per source task."),
    seed: int = typer.Option(0, "--seed", help="DARE drops values at random: the seed makes the merge reproducible."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Score base, own adapter and merged adapter on every task's test set."),
):
    """Merge several adapters into one (PEFT add_weighted_adapter); each task keeps its own head."""
    from tunelab.adapters.merge import merge_runs, parse_weights
    from tunelab.report.adapters_report import write_merge_report

    quiet_libraries()
    folder = merge_runs(run_dirs, method, parse_weights(weights), density, output, seed=seed, evaluate=evaluate, log=err)
    if evaluate:
        out.print(write_merge_report(folder.path).read_text().split("\n![")[0])
    for name in folder.task_names():
        out.print(f"task {name}: {folder.task_dir(name)}")


@route_app.command("build")
def route_build(
    run_dirs: list[Path] = typer.Argument(..., help="Finished classification runs, one per task."),
    output: Path = typer.Option(..., "--output", help="Router folder to write."),
    per_task: int = typer.Option(5000, "--per-task", min=10, help="At most this many training inputs from each task (seeded draw)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure routing and end-to-end accuracy on the test sets."),
):
    """Train a router that picks each input's adapter; measured against the oracle that knows the task."""
    from tunelab.adapters.router import build_router
    from tunelab.report.adapters_report import write_route_report

    quiet_libraries()
    folder = build_router(run_dirs, output, per_task=per_task, evaluate=evaluate, log=err)
    if evaluate:
        out.print(write_route_report(folder.path).read_text().split("\n![")[0])
    out.print(f"router: {folder.path}")

"""Commands that run many trainings or look inside one: compare, sweep, plan, profile."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.cli.common import app, err, out, quiet_libraries


@app.command()
def compare(
    config: Path = typer.Argument(..., help="Run config YAML, optionally with a compare: section."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides for every run, e.g. train.max_steps=50"),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated, e.g. full,lora,ia3 (default: compare.methods)."),
):
    """Train several techniques on the same data, seed and budget; write one side-by-side report."""
    from tunelab.experiments.compare import run_comparison

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    quiet_libraries()
    compare_dir, entries = run_comparison(config, chosen, overrides or [], err)
    print_comparison(compare_dir)
    out.print(f"report: {compare_dir / 'comparison.html'} (also comparison.md, .csv, .json; plots in plots/)")
    if any(e["status"] != "completed" for e in entries):
        raise typer.Exit(1)


def print_comparison(compare_dir: Path) -> None:
    """The comparison's results table and reading notes, as the report has them (comparison.json)."""
    import json

    from tunelab.report.compare_report import results_table

    summary = json.loads((compare_dir / "comparison.json").read_text(encoding="utf-8"))
    headers, rows = results_table(summary["rows"], summary["task"])
    table = Table(title=f"comparison: {compare_dir.name}", show_header=True)
    for h in headers:
        table.add_column(h, justify="left" if h in ("method", "status", "error") else "right")
    for cells in rows:
        table.add_row(*(escape(c) for c in cells))
    # A terminal gets its own width; a log file or pipe gets every column instead of rich's default 80.
    console = out if out.is_terminal else Console(file=out.file, width=200)
    console.print(table)
    for note in summary["reading"]:
        console.print(f"- {escape(note)}", highlight=False)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.batch_size=32"),
):
    """Estimate a run's peak memory (weights, gradients, optimizer, activations) and FLOPs/token before training."""
    from tunelab.config import load_config
    from tunelab.plan import estimate, format_plan

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    out.print(format_plan(estimate(cfg)), highlight=False, markup=False)


@app.command()
def profile(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.batch_size=32"),
    steps: int = typer.Option(5, "--steps", min=1, help="Training steps to record."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Steps run first and not recorded (warm-up, compilation)."),
    rows: int = typer.Option(15, "--rows", min=1, help="Ops in the terminal table (ops.txt has 100)."),
):
    """Profile a few training steps: top-ops table, forward/backward/optimizer split, Chrome trace file."""
    from tunelab.config import load_config
    from tunelab.experiments.profile import run_profile

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    run, _ = run_profile(cfg, steps=steps, warmup=warmup, rows=rows, console=err)
    out.print(f"profile directory: {run.path} (ops.txt, trace.json: open it in https://ui.perfetto.dev)")


@app.command()
def sweep(
    config: Optional[Path] = typer.Argument(None, help="Run config with a sweep: section (not needed with --resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. sweep.trials=20"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this sweep directory (finished trials are kept)."),
):
    """Search hyperparameters with Optuna (TPE, median pruning); writes best_config.yaml and plots."""
    from tunelab.experiments.sweep import run_sweep

    # `tunelab sweep --resume DIR sweep.trials=12`: the override lands in the CONFIG slot.
    if config is not None and "=" in config.name and not config.is_file():
        overrides, config = [str(config), *(overrides or [])], None
    quiet_libraries()
    sweep_dir = run_sweep(str(config) if config else None, overrides or [], str(resume) if resume else None, err)
    out.print(f"sweep directory: {sweep_dir} (best_config.yaml, trials.csv, history.png, importance.png)")

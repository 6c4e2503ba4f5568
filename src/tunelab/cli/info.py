"""Commands that read what exists: reports of finished runs, the bundled models."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tunelab.cli.common import app, out


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (finished, failed or still running).")):
    """Write report.md and a self-contained report.html (plots embedded) into a run directory."""
    from tunelab.report import write_run_report

    md, html = write_run_report(run_dir)
    out.print(f"report: {html} (and {md.name})")


@app.command()
def models():
    """List the bundled models (they work offline)."""
    from tunelab.models.registry import BUNDLED

    table = Table(show_header=True)
    for col in ("name", "kind", "parameters", "size", "licence", "description"):
        table.add_column(col)
    for m in BUNDLED.values():
        table.add_row(m.name, m.architecture, m.params, m.size, m.licence, m.description)
    out.print(table)
    out.print("Also accepted: a local Hugging Face model folder, or a hub id when online.")

"""`tunelab data check`: the data checks, a one-screen summary and an HTML report, an exit status for pipelines."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from tunelab.cli.common import app, err, out
from tunelab.errors import ConfigError

data_app = typer.Typer(no_args_is_help=True, help="Check data files before they cost a training run.")
app.add_typer(data_app, name="data")


def _columns(text: str | None) -> dict[str, str]:
    columns = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--columns '{part}': write FIELD=COLUMN, e.g. text=review,label=sentiment")
        field, column = (x.strip() for x in part.split("=", 1))
        columns[field] = column
    return columns


@data_app.command("check")
def check(
    files: list[Path] = typer.Argument(..., help="Data files to check (.jsonl, .csv, .parquet)."),
    against: Optional[Path] = typer.Option(None, "--against", help="A held-out file (test set) to check for leakage."),
    model: Optional[str] = typer.Option(None, "--model", help="Count tokens with this model's tokenizer."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1,
                                             help="Report rows longer than this (default with --model: data.max_length's default)."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Exit 1 when a rule is met, e.g. duplicates>1%,leakage>0."),
    task: Optional[str] = typer.Option(None, "--task", help="classification, causal_lm or instruction (default: from the fields)."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Map fields to your columns: text=review,label=sentiment."),
    output: Optional[Path] = typer.Option(None, "--output", help="Report folder (default runs/data-check-TIMESTAMP)."),
    near: bool = typer.Option(True, "--near/--exact-only", help="Also search near duplicates (MinHash LSH)."),
):
    """Duplicates, near duplicates, leakage, labels, broken text, token lengths: summary + HTML report."""
    from tunelab.config import DataConfig
    from tunelab.data.quality import SHOWN, check_files, parse_rules, rules_met
    from tunelab.report.data_report import write_data_report

    rules = parse_rules(fail_on)
    if task is not None and task not in ("classification", "causal_lm", "instruction"):
        raise ConfigError(f"--task '{task}': choose classification, causal_lm or instruction")
    tokenizer, length = None, None
    if model:
        from tunelab.cli.common import quiet_libraries
        from tunelab.config import ModelConfig
        from tunelab.models.loading import load_hf_config, load_tokenizer

        quiet_libraries()
        # main() turns tokenizer threads off so forked workers cannot deadlock; nothing forks here, and
        # counting tokens on every core halves this step on two cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        source, _ = load_hf_config(ModelConfig(name=model))
        tokenizer = load_tokenizer(source, ModelConfig(name=model))
        length = max_length or DataConfig.model_fields["max_length"].default
    report = check_files([str(f) for f in files], str(against) if against else None, task=task,
                         columns=_columns(columns), tokenizer=tokenizer, model=model, max_length=length, near=near)
    met = rules_met(report, rules)

    table = Table(title="data check", show_header=True)
    for col in ("check", "looks for", "found"):
        table.add_column(col)
    for row in report.summary_rows():
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    for f in report.findings:
        if f.count and f.rows and f.check != "imbalance":
            shown = "; ".join(f.rows[:SHOWN]) + (f"; ... {len(f.rows) - SHOWN:,} more" if len(f.rows) > SHOWN else "")
            out.print(f"[bold]{f.check}[/] {escape(Path(f.file).name)}: {escape(shown)}", soft_wrap=True)
    if report.lengths:
        from tunelab.data.quality import length_stats

        for path, values in report.lengths.items():
            s = length_stats(values, length)
            out.print(f"tokens {Path(path).name}: p50 {s['p50']}, p90 {s['p90']}, p99 {s['p99']}, max {s['max']}; "
                      f"{100 * s['truncated_share']:.1f}% over max_length {length}")
    folder = output or Path("runs") / f"data-check-{datetime.now():%Y%m%d-%H%M%S}"
    payload = {**report.to_json(), "rules": [str(r) for r in rules], "rules_met": met}
    paths = write_data_report(payload, report.lengths, folder)
    out.print(f"report: {paths['html']} (also data_check.md, data_check.json)")
    if met:
        err.print(f"[red]data check failed:[/] {escape('; '.join(met))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)

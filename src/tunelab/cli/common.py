"""What every command group shares: the typer app, the two consoles, and how results are printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_write_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Fine-tune language models, offline-first.")
out = Console()
err = Console(stderr=True)


def quiet_libraries() -> None:
    from tunelab.models.loading import quiet_transformers

    quiet_transformers()


def format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"


def metric_text(key: str, value, device: str | None = None) -> str:
    """A metric as a learner reads it: memory in GiB (on a CPU, the whole process's resident memory, so it is
    named), times in seconds or minutes, other numbers as they are."""
    from tunelab.report.units import human_bytes, human_duration

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.endswith("_bytes"):
            what = {"cpu": " (process RSS)", "cuda": " (allocated tensors)"}.get(device or "", "")
            return human_bytes(value) + (" (estimate)" if key.startswith("estimated") else what)
        if key.endswith("wall_s"):
            return human_duration(value)
    return format_value(value)


def print_metrics(metrics: dict, labels: list[str]) -> None:
    from tunelab.evaluate.metrics import format_confusion

    device = (metrics.get("plan") or {}).get("device")
    table = Table(title="results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for section in ("eval", "validation", "eval_untuned", "train"):
        for key, value in metrics.get(section, {}).items():
            if isinstance(value, (dict, list)) or value is None:
                continue
            table.add_row(f"{section}.{key}", metric_text(key, value, device))
    if metrics.get("total_wall_s") is not None:
        table.add_row("total_wall_s", metric_text("total_wall_s", metrics["total_wall_s"]))
    out.print(table)
    cm = metrics.get("eval", {}).get("confusion_matrix")
    if cm and labels:
        out.print("confusion matrix (test):\n" + format_confusion(cm, labels))
    untuned = metrics.get("eval_untuned", {}).get("samples", [])
    for i, sample in enumerate(metrics.get("samples", [])):
        out.print(f"[bold]sample {i + 1}[/] tuned   {sample_line(sample)}")
        if i < len(untuned):
            out.print(f"[bold]sample {i + 1}[/] untuned {sample_line(untuned[i])}")


def sample_line(sample: dict) -> str:
    end = "ends with EOS" if sample["stopped_at_eos"] else "NO EOS: cut at max_new_tokens"
    return f"({end}) {escape(repr(sample['completion'][:300]))}"


def read_inputs(single: Optional[str], file: Optional[Path], what: str) -> list[str]:
    if (single is None) == (file is None):
        raise TunelabError(f"give one {what} as an argument, or --file FILE (not both)")
    if single is not None:
        return [single]
    if file.suffix.lower() in (".jsonl", ".csv", ".parquet"):
        from tunelab.data.sources import read_records

        field = "text" if what == "text" else "prompt"
        texts = []
        for rec in read_records(str(file)):
            value = rec.fields.get(field, rec.fields.get("instruction"))
            if not isinstance(value, str) or not value.strip():
                raise TunelabError(f"{rec.where}: needs a non-empty '{field}' field")
            texts.append(value)
        return texts
    if not file.is_file():
        raise TunelabError(f"{file}: file not found")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise TunelabError(f"{file}: file is empty")
    return lines


def write_jsonl(rows: list[dict], output: Optional[Path]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        sys.stdout.write(text)
        return
    atomic_write_text(output, text)
    err.print(f"wrote {len(rows)} rows to {output}")

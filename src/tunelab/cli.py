"""The `tunelab` command: one sub-command per verb, each a thin call into a stage.

User mistakes (TunelabError) print one line, `error: ...`, and exit with status 2. Only bugs show a
traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Fine-tune language models, offline-first.")
out = Console()
err = Console(stderr=True)


def _quiet_libraries() -> None:
    from tunelab.models.loading import quiet_transformers

    quiet_transformers()


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="Run config YAML (not needed with --resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=1e-4"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory from its latest checkpoint."),
):
    """Train a model from a config; prints test metrics and the run directory."""
    from tunelab.config import load_config
    from tunelab.train.run import resume_config, run_training

    if resume is None and config is None:
        raise TunelabError("give a config file, or --resume RUN_DIR")
    if resume is not None and (config is not None or overrides):
        raise TunelabError("a resumed run keeps its own config.yaml: give --resume RUN_DIR alone")
    cfg = resume_config(str(resume)) if resume else load_config(config, overrides or [])
    run, metrics = run_training(cfg, str(resume) if resume else None, err)
    from tunelab.train.distributed import is_main_process

    if is_main_process():  # under accelerate launch, one table, not one per process
        _print_metrics(metrics, run.labels())
        out.print(f"run directory: {run.path}")


def _format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"


def _print_metrics(metrics: dict, labels: list[str]) -> None:
    from tunelab.evaluate.metrics import format_confusion

    table = Table(title="results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for section in ("eval", "eval_untuned", "train"):
        for key, value in metrics.get(section, {}).items():
            if isinstance(value, (dict, list)) or value is None:
                continue
            table.add_row(f"{section}.{key}", _format_value(value))
    out.print(table)
    cm = metrics.get("eval", {}).get("confusion_matrix")
    if cm and labels:
        out.print("confusion matrix (test):\n" + format_confusion(cm, labels))
    untuned = metrics.get("eval_untuned", {}).get("samples", [])
    for i, sample in enumerate(metrics.get("samples", [])):
        out.print(f"[bold]sample {i + 1}[/] tuned   {_sample_line(sample)}")
        if i < len(untuned):
            out.print(f"[bold]sample {i + 1}[/] untuned {_sample_line(untuned[i])}")


def _sample_line(sample: dict) -> str:
    end = "ends with EOS" if sample["stopped_at_eos"] else "NO EOS: cut at max_new_tokens"
    return f"({end}) {escape(repr(sample['completion'][:300]))}"


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    data: Path = typer.Option(..., "--data", help="Labelled file in the run's task format."),
):
    """Evaluate a trained run on another labelled file."""
    from tunelab.inference.trained import TrainedModel

    _quiet_libraries()
    model = TrainedModel(run_dir)
    metrics = model.evaluate_file(str(data))
    _print_metrics({"eval": metrics}, model.labels)
    out.print_json(json.dumps({k: v for k, v in metrics.items() if k != "per_class"}))


def _inputs(single: Optional[str], file: Optional[Path], what: str) -> list[str]:
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


def _write_jsonl(rows: list[dict], output: Optional[Path]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)
    err.print(f"wrote {len(rows)} rows to {output}")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A finished classification run."),
    text: Optional[str] = typer.Argument(None, help="Text to classify."),
    file: Optional[Path] = typer.Option(None, "--file", help="One text per line (.txt), or .jsonl/.csv with 'text'."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write JSONL here instead of stdout."),
):
    """Classify text with a trained run; prints one JSON line per input."""
    from tunelab.inference.trained import TrainedModel

    texts = _inputs(text, file, "text")
    _quiet_libraries()
    _write_jsonl(TrainedModel(run_dir).predict(texts), output)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="A finished causal_lm or instruction run."),
    prompt: Optional[str] = typer.Argument(None, help="Instruction (instruction runs) or text to continue."),
    file: Optional[Path] = typer.Option(None, "--file", help="One prompt per line (.txt), or .jsonl/.csv with 'prompt'."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", min=1.0,
                                                       help="Default: the run's eval.repetition_penalty."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write JSONL here instead of stdout."),
):
    """Generate text with a trained run (greedy); prints one JSON line per prompt."""
    from tunelab.inference.trained import TrainedModel

    prompts = _inputs(prompt, file, "prompt")
    _quiet_libraries()
    _write_jsonl(TrainedModel(run_dir).generate(prompts, max_new_tokens, repetition_penalty), output)


@app.command()
def compare(
    config: Path = typer.Argument(..., help="Run config YAML, optionally with a compare: section."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides for every run, e.g. train.max_steps=50"),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated, e.g. full,lora,ia3 (default: compare.methods)."),
):
    """Train several techniques on the same data, seed and budget; write one side-by-side report."""
    from tunelab.compare import run_comparison

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    _quiet_libraries()
    compare_dir, entries = run_comparison(config, chosen, overrides or [], err)
    table = Table(title="comparison", show_header=True)
    for col in ("method", "status", "detail"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["method"], e["status"], escape(e["error"] or e["run_dir"] or ""))
    out.print(table)
    out.print(f"report: {compare_dir / 'comparison.html'} (also comparison.md, .csv, .json)")
    if any(e["status"] != "completed" for e in entries):
        raise typer.Exit(1)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.batch_size=32"),
):
    """Estimate a run's peak memory (weights, gradients, optimizer, activations) and FLOPs/token before training."""
    from tunelab.config import load_config
    from tunelab.plan import estimate, format_plan

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
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
    from tunelab.profile import run_profile

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    run, _ = run_profile(cfg, steps=steps, warmup=warmup, rows=rows, console=err)
    out.print(f"profile directory: {run.path} (ops.txt, trace.json: open it in https://ui.perfetto.dev)")


@app.command()
def sweep(
    config: Optional[Path] = typer.Argument(None, help="Run config with a sweep: section (not needed with --resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. sweep.trials=20"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this sweep directory (finished trials are kept)."),
):
    """Search hyperparameters with Optuna (TPE, median pruning); writes best_config.yaml and plots."""
    from tunelab.sweep import run_sweep

    # `tunelab sweep --resume DIR sweep.trials=12`: the override lands in the CONFIG slot.
    if config is not None and "=" in config.name and not config.is_file():
        overrides, config = [str(config), *(overrides or [])], None
    _quiet_libraries()
    sweep_dir = run_sweep(str(config) if config else None, overrides or [], str(resume) if resume else None, err)
    out.print(f"sweep directory: {sweep_dir} (best_config.yaml, trials.csv, history.png, importance.png)")


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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except TunelabError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise

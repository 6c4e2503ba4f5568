"""Commands on one run: train it, then evaluate, predict or generate with what it saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tunelab.cli.common import app, err, out, print_metrics, quiet_libraries, read_inputs, write_jsonl
from tunelab.errors import TunelabError

REGISTRY_HELP = "registry:NAME@ALIAS (or NAME/VERSION) from the MLflow registry"


def resolve_source(arg: Path) -> Path:
    """A RUN_DIR argument as given, or a registry reference resolved to its local directory (offline).

    A `tunelab merge` folder of one task stands for that task's run; of several, the user picks one."""
    if str(arg).startswith("registry:"):
        from tunelab.track.registry import resolve_source as resolve

        return resolve(str(arg))
    from tunelab.runtime.run_dir import RunDir

    folder = RunDir(arg)
    if folder.is_merge():
        tasks = folder.task_names()
        if len(tasks) == 1:
            return folder.task_dir(tasks[0])
        raise TunelabError(f"{arg} merges {len(tasks)} tasks, each with its own head: give one of "
                           + ", ".join(str(folder.task_dir(t)) for t in tasks))
    if folder.is_router():
        raise TunelabError(f"{arg} is a router: use tunelab predict {arg} TEXT, or one of its runs")
    return arg


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="Run config YAML (not needed with --resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=1e-4"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory from its latest checkpoint."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data",
                                            help="With --resume: go on although a data file changed since the run started."),
):
    """Train a model from a config; prints test metrics and the run directory."""
    from tunelab.config import is_multitask, load_config, read_config_file
    from tunelab.train.run import resume_config, run_training

    if resume is None and config is None:
        raise TunelabError("give a config file, or --resume RUN_DIR")
    if resume is not None and (config is not None or overrides):
        raise TunelabError("a resumed run keeps its own config.yaml: give --resume RUN_DIR alone")
    if allow_changed_data and resume is None:
        raise TunelabError("--allow-changed-data goes with --resume RUN_DIR")
    if config is not None and is_multitask(read_config_file(config)):
        _train_multitask(config, overrides or [])
        return
    cfg = resume_config(str(resume)) if resume else load_config(config, overrides or [])
    run, metrics = run_training(cfg, str(resume) if resume else None, err, allow_changed_data=allow_changed_data)
    from tunelab.runtime.distributed import is_main_process

    if is_main_process():  # under accelerate launch, one report and one table, not one per process
        from tunelab.report import report_after_run

        report_after_run(run.path, err)
        from tunelab.track.tracking import log_report

        log_report(run.path, err)
        print_metrics(metrics, run.labels())
        out.print(f"run directory: {run.path}")


def _train_multitask(config: Path, overrides: list[str]) -> None:
    """A `tasks:` config: one shared adapter, a head per task (train/multitask.py)."""
    from tunelab.config import load_multitask_config
    from tunelab.report.adapters_report import write_multitask_report
    from tunelab.train.multitask import train_multitask

    quiet_libraries()
    folder = train_multitask(load_multitask_config(config, overrides), err)
    out.print(write_multitask_report(folder.path).read_text().split("\n![")[0])
    for name in folder.task_names():
        out.print(f"task {name}: {folder.task_dir(name)}")


@app.command("eval")
def eval_cmd(
    run_dir: Path = typer.Argument(..., help=f"A finished run directory, or {REGISTRY_HELP}."),
    data: Path = typer.Option(..., "--data", help="Labelled file in the run's task format."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the metrics here as JSON (e.g. for dvc metrics)."),
):
    """Evaluate a trained run on another labelled file."""
    from tunelab.inference.trained import TrainedModel
    from tunelab.runtime.atomic import atomic_write_json as write_json_atomic

    quiet_libraries()
    model = TrainedModel(resolve_source(run_dir))
    metrics = model.evaluate_file(str(data))
    print_metrics({"eval": metrics}, model.labels)
    flat = {k: v for k, v in metrics.items() if k != "per_class"}
    out.print_json(json.dumps(flat))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output, flat)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help=f"A finished classification run, a router folder (route build), or {REGISTRY_HELP}."),
    text: Optional[str] = typer.Argument(None, help="Text to classify."),
    file: Optional[Path] = typer.Option(None, "--file", help="One text per line (.txt), or .jsonl/.csv with 'text'."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write JSONL here instead of stdout."),
    task: Optional[str] = typer.Option(None, "--task", help="Router folders: route by this task tag instead of the router."),
):
    """Classify text with a trained run; prints one JSON line per input (with a router: the chosen adapter too)."""
    from tunelab.runtime.run_dir import RunDir

    texts = read_inputs(text, file, "text")
    quiet_libraries()
    if RunDir(run_dir).is_router():
        from tunelab.adapters.router import Router

        write_jsonl(Router(run_dir).predict(texts, task), output)
        return
    if task is not None:
        raise TunelabError("--task picks an adapter of a router folder; this is a single run")
    from tunelab.inference.trained import TrainedModel

    write_jsonl(TrainedModel(resolve_source(run_dir)).predict(texts), output)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help=f"A finished causal_lm or instruction run, or {REGISTRY_HELP}."),
    prompt: Optional[str] = typer.Argument(None, help="Instruction (instruction runs) or text to continue."),
    file: Optional[Path] = typer.Option(None, "--file", help="One prompt per line (.txt), or .jsonl/.csv with 'prompt'."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", min=1.0,
                                                       help="Default: the run's eval.repetition_penalty."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write JSONL here instead of stdout."),
):
    """Generate text with a trained run (greedy); prints one JSON line per prompt."""
    from tunelab.inference.trained import TrainedModel

    prompts = read_inputs(prompt, file, "prompt")
    quiet_libraries()
    write_jsonl(TrainedModel(resolve_source(run_dir)).generate(prompts, max_new_tokens, repetition_penalty), output)

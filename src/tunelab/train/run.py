"""One training run end to end: check data, open the run directory, train, save, evaluate, record."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from rich.console import Console

from tunelab.config import RunConfig, dump_config, load_config
from tunelab.data.examples import label_summary, load_splits
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir


def resume_config(run_dir: str) -> RunConfig:
    """A resumed run keeps the config it started with: changing it midway would make the run directory
    describe a run that never happened."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise TunelabError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    if run.is_complete():
        raise TunelabError(f"--resume {run_dir}: this run already completed")
    return load_config(run.config_path)


def create_run_dir(cfg: RunConfig) -> RunDir:
    """A new run directory for cfg: output.dir/output.name, or <model>-<method>-<timestamp>.

    Under `accelerate launch` call it on the main process only and share the result
    (runtime/distributed.py `on_main_then_share`): the default name holds a timestamp.
    """
    from tunelab.runtime.hardware import describe

    name = cfg.output.name or f"{Path(cfg.model.name).name}-{cfg.method.name}-{datetime.now():%Y%m%d-%H%M%S}"
    data = {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test}
    return RunDir.create(Path(cfg.output.dir) / name, dump_config(cfg), seed=cfg.train.seed, data_files=data,
                         hardware=describe())


def run_training(
    cfg: RunConfig, resume_dir: str | None = None, console: Console | None = None, on_eval=None
) -> tuple[RunDir, dict]:
    """Train, save and evaluate one run; returns its directory and the metrics it recorded (metrics.json).
    on_eval(step, metrics) sees each periodic validation (see FineTune).

    Under `accelerate launch` every process runs this; only the main one prints and writes the run directory
    (see runtime/distributed.py). The report is not written here (the training stage does not know about
    reports): `tunelab train` and the experiment runner write it after.
    """
    from tunelab.runtime.distributed import is_main_process

    console = console or Console(stderr=True)
    if not is_main_process():
        console = Console(stderr=True, quiet=True)
    started = time.perf_counter()
    # Every data check runs here, before a model is loaded or a run directory exists.
    splits = load_splits(cfg.data, cfg.task, cfg.train.seed)
    sizes = f"train {len(splits.train)}, validation {len(splits.validation)}, test {len(splits.test)}"
    console.print(f"data  {sizes}")
    if cfg.task == "classification":
        for name in ("train", "validation", "test"):
            if getattr(splits, name):
                console.print(f"data  {name} labels: {label_summary(getattr(splits, name))}")

    # Heavy imports (torch, transformers) only after the data passed: a bad line is reported in seconds.
    from tunelab.methods import get_method
    from tunelab.models.loading import check_attention, load_hf_config, quiet_transformers
    from tunelab.runtime.distributed import on_main_then_share
    from tunelab.train.loop import FineTune

    quiet_transformers()
    # An unknown model name, or a technique that cannot apply to it, fails here: before a run directory exists.
    _, hf_config = load_hf_config(cfg.model)
    get_method(cfg.method.name).check(cfg.method, hf_config, cfg.task)
    check_attention(cfg.model.attention)
    run = RunDir(resume_dir) if resume_dir else on_main_then_share(lambda: create_run_dir(cfg))
    console.print(f"run   {run.path}")
    try:
        recipe = FineTune(cfg, splits, run, console, on_eval=on_eval)
        recipe.setup(resume=resume_dir is not None)
        baseline = _baseline(recipe, run, console)
        recipe.train()
        recipe.save()
        metrics: dict = {"train": recipe.train_metrics().to_dict(), "plan": recipe.plan.to_dict()}
        if recipe.features.test:
            console.print("eval  test set ...")
            metrics["eval"] = recipe.evaluate(recipe.features.test)
        if recipe.features.validation:
            metrics["validation"] = recipe.evaluate(recipe.features.validation)
        if baseline:
            metrics["eval_untuned"] = baseline
        samples = recipe.samples()
        if samples:
            metrics["samples"] = samples
            metrics["samples_stopped_at_eos"] = _eos_rate(samples)
        metrics["total_wall_s"] = round(time.perf_counter() - started, 2)
        if is_main_process():
            run.finish(metrics)
    except BaseException as err:
        # The main process records its failure. Another records its own only if none is recorded yet: when it
        # fails first, the launcher kills the main process mid-step, which would leave the run "running"
        # forever; when the main one failed first, the others only see their connection to it close.
        if is_main_process() or run.status() == "running":
            run.fail(err)
        raise
    return run, metrics


def _baseline(recipe, run: RunDir, console: Console) -> dict | None:
    """For LM tasks, the untuned model's test loss (and, for instruction runs, its greedy samples on the
    same prompts), so the run shows what training bought and what it did to the model's answers.

    Measured before step 1 (at step 0 a LoRA model equals its base). Saved to the run directory so a
    resumed run reports the same numbers.
    """
    saved = run.untuned_eval()
    if saved is not None:
        return saved
    if (recipe.cfg.task == "classification" or not recipe.cfg.eval.untuned or not recipe.features.test
            or recipe.state["step"] > 0):
        return None
    console.print("eval  untuned model on the test set ...")
    metrics = recipe.evaluate(recipe.features.test)
    samples = recipe.samples()
    if samples:
        metrics["samples"] = samples
        metrics["samples_stopped_at_eos"] = _eos_rate(samples)
    # Every process evaluated (see FineTune.evaluate); none may see the file before all have checked for it.
    recipe.accelerator.wait_for_everyone()
    if recipe.accelerator.is_main_process:
        run.write_untuned_eval(metrics)
    return metrics


def _eos_rate(samples: list[dict]) -> float:
    return sum(s["stopped_at_eos"] for s in samples) / len(samples)

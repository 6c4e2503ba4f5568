"""One training run end to end: check data, open the run directory, train, save, evaluate, record."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console

from tunelab.config import RunConfig, dump_config, load_config
from tunelab.data.examples import label_summary, load_splits
from tunelab.errors import DataError, TunelabError
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


def check_resumable(run: RunDir, cfg: RunConfig, allow_changed_data: bool = False) -> None:
    """Refuse, in one line, to resume a run that is still running or whose data files changed since it
    started: the batch plan is drawn from the data, so other rows would make the resumed half another run."""
    if run.status() == "running" and run.owner_alive():
        owner = run.manifest().get("process") or {}
        raise TunelabError(f"--resume {run.path}: the run is still running (pid {owner.get('pid')}); stop it first")
    if allow_changed_data:
        return
    changed = run.changed_data({"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test})
    if changed:
        raise DataError(f"--resume {run.path}: the data is not what the run started with ({'; '.join(changed)}); "
                        "restore it, or pass --allow-changed-data to resume anyway")


def run_training(
    cfg: RunConfig, resume_dir: str | None = None, console: Console | None = None, on_eval=None,
    allow_changed_data: bool = False,
) -> tuple[RunDir, dict]:
    """Train, save and evaluate one run; returns its directory and the metrics it recorded (metrics.json).
    on_eval(step, metrics) sees each periodic validation (see FineTune). allow_changed_data: resume even
    though a data file differs from the one the run started with (see check_resumable).

    Under `accelerate launch` every process runs this; only the main one prints and writes the run directory
    (see runtime/distributed.py). The report is not written here (the training stage does not know about
    reports): `tunelab train` and the experiment runner write it after.
    """
    from tunelab.runtime.distributed import is_main_process

    console = console or Console(stderr=True)
    if not is_main_process():
        console = Console(stderr=True, quiet=True)
    started = time.perf_counter()
    if resume_dir and is_main_process():
        check_resumable(RunDir(resume_dir), cfg, allow_changed_data)
    # Every data check runs here, before a model is loaded or a run directory exists.
    splits = load_splits(cfg.data, cfg.task, cfg.train.seed)
    sizes = f"train {len(splits.train)}, validation {len(splits.validation)}, test {len(splits.test)}"
    console.print(f"data  {sizes}")
    if cfg.task == "classification":
        for name in ("train", "validation", "test"):
            if getattr(splits, name):
                console.print(f"data  {name} labels: {label_summary(getattr(splits, name))}")
    if cfg.data.checks != "off" and not resume_dir:
        _check_data(cfg, splits, console)

    tracker = None
    if is_main_process():
        from tunelab.track.tracking import open_tracking

        # Tracking's slow start (import mlflow, open the store) runs in a process of its own from here, on
        # another core while this one imports torch and loads the model (track/worker.py).
        tracker = open_tracking(cfg, console, resume_dir)
    try:
        run = _open_run(cfg, resume_dir)
    except BaseException:
        if tracker is not None:
            tracker.close()
        raise
    if resume_dir and is_main_process():
        run.claim()  # running again, owned by this process
        for leftover in run.clean_temporary():
            console.print(f"[dim]run   removed {leftover.name}, left by a write that was cut short[/]")
    console.print(f"run   {run.path}")
    if tracker is not None:
        tracker.start(run, cfg.track, cfg.output.dir, resume=resume_dir is not None)
    from tunelab.train.loop import FineTune

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
            _record_failure(run, err)
        if tracker is not None:
            tracker.finish(run, failed=err)
        raise
    if tracker is not None:
        tracker.finish(run)  # the report is logged to the same MLflow run once written (tracking.log_report)
    return run, metrics


def _open_run(cfg: RunConfig, resume_dir: str | None) -> RunDir:
    """Heavy imports (torch, transformers) only after the data passed: a bad line is reported in seconds.
    An unknown model name, or a technique that cannot apply to it, fails here: before a run directory exists."""
    from tunelab.methods import get_method
    from tunelab.models.loading import check_attention, load_hf_config, quiet_transformers
    from tunelab.runtime.distributed import on_main_then_share
    from tunelab.train.loop import FineTune  # noqa: F401 -- torch and transformers load here, tracking starts meanwhile

    quiet_transformers()
    _, hf_config = load_hf_config(cfg.model)
    get_method(cfg.method.name).check(cfg.method, hf_config, cfg.task)
    check_attention(cfg.model.attention)
    return RunDir(resume_dir) if resume_dir else on_main_then_share(lambda: create_run_dir(cfg))


def _record_failure(run: RunDir, err: BaseException) -> None:
    """failed, or interrupted for Ctrl-C. A second Ctrl-C (an impatient user, or a terminal and a parent
    process both passing it on) must not cut the manifest write short: SIGINT waits until it is written."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot be set, nor delivered here
        previous, restore = None, False
    else:
        restore = True
    try:
        run.fail(err)
    finally:
        if restore:  # None: the handler was set outside Python; Python's own Ctrl-C handler is the safe default
            # Left at SIG_IGN, every process started after this one failed run would inherit an ignored Ctrl-C.
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def _check_data(cfg: RunConfig, splits, console: Console) -> None:
    """The cheap checks (exact duplicates, exact train/test leakage), before any model loads: what
    data.check_rules finds is a warning, or stops the run with data.checks: stop."""
    from tunelab.data.quality import parse_rules, quick_check, rules_met

    held = [(splits.validation, cfg.data.validation or f"{cfg.data.train} (validation_split)"),
            (splits.test, cfg.data.test or "")]
    report = quick_check(splits.train, [h for h, _ in held], cfg.task, cfg.data.train, [p for _, p in held])
    met = rules_met(report, parse_rules(cfg.data.check_rules))
    if not met:
        return
    where = {f.check: f for f in report.findings if f.count}
    first = "; ".join(f"{f.check} in {f.file}: {f.rows[0]}" for f in where.values() if f.rows)[:300]
    message = f"data checks: {', '.join(met)} (e.g. {first}); see `tunelab data check` for every row"
    if cfg.data.checks == "stop":
        raise DataError(message + " (data.checks: stop)")
    console.print(f"[yellow]warning: {message}[/]", highlight=False, soft_wrap=True)


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

"""The search: an Optuna study in the sweep directory, one trial after another (each in its own process),
pruning, and resuming a sweep that was stopped."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape  # a list choice such as [query, value] is not console markup

from tunelab.config import validate_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments.sweep.outputs import best_trial, write_outputs, write_tables
from tunelab.experiments.sweep.space import FloatParam, IntParam, Sweep, describe_values, load_sweep
from tunelab.experiments.trials import run_trial
from tunelab.runtime.run_dir import RunDir
from tunelab.track.tracking import parent_run

STUDY_NAME = "tunelab-sweep"


def run_sweep(config_path: str | None, overrides: list[str] | None, resume_dir: str | None,
              console: Console | None = None) -> Path:
    """Run (or continue) a sweep until sweep.trials trials completed or were pruned; returns the sweep directory."""
    from filelock import FileLock, Timeout

    console = console or Console(stderr=True)
    sweep, sweep_dir = _open(config_path, overrides or [], resume_dir, console)
    lock = FileLock(str(sweep_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TunelabError(f"sweep {sweep_dir} is running in another process") from None
    try:
        study = _study(sweep, sweep_dir)
        _retry_interrupted(study, console)
        base = sweep.base
        # Every trial's MLflow run is filed under one parent run, which gets the sweep's tables and plots.
        with parent_run(base.track, base.output.dir, sweep_dir.name, "sweep", console,
                        {"sweep.metric": sweep.section.metric, "sweep.trials": sweep.section.trials}) as parent:
            try:
                _search(study, sweep, sweep_dir, console)
            finally:
                write_tables(study, sweep, sweep_dir)
            write_outputs(study, sweep, sweep_dir, console)
            if parent is not None:
                best = best_trial(study)
                parent.log_report(sweep_dir, {f"best.validation.{sweep.section.metric}": best.value} if best else None)
    finally:
        lock.release()
    return sweep_dir


def _open(
    config_path: str | None, overrides: list[str], resume_dir: str | None, console: Console
) -> tuple[Sweep, Path]:
    """The sweep and its directory; a directory that already holds a sweep must hold this one."""
    if resume_dir:
        sweep_dir = Path(resume_dir)
        if not (sweep_dir / "sweep.yaml").is_file():
            raise TunelabError(f"--resume {resume_dir}: not a sweep directory (no sweep.yaml)")
        sweep = load_sweep(config_path or sweep_dir / "sweep.yaml", overrides)
    else:
        if config_path is None:
            raise TunelabError("give a sweep file, or --resume SWEEP_DIR")
        sweep = load_sweep(config_path, overrides)
        out = sweep.base.output
        sweep_dir = Path(out.dir) / (out.name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}")

    saved = sweep_dir / "sweep.yaml"
    if saved.is_file():
        previous = load_sweep(saved)
        changed = _differences(previous.identity(), sweep.identity())
        if changed:
            raise TunelabError(f"{sweep_dir} holds a different sweep (changed: {', '.join(changed[:4])}); continue "
                               "it unchanged (only sweep.trials may change) or pick another output.name")
        console.print(f"sweep continuing {sweep_dir}")
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise TunelabError(f"{sweep_dir} exists and is not a sweep directory; pick another output.name")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    header = f"# tunelab sweep, resolved. Continue with: tunelab sweep --resume {sweep_dir}\n"
    (sweep_dir / "sweep.yaml").write_text(header + sweep.to_yaml(), encoding="utf-8")
    return sweep, sweep_dir


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict) and not prefix.startswith("sweep.space"):
            keys += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys


def _study(sweep: Sweep, sweep_dir: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner() if sweep.section.pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=f"sqlite:///{(sweep_dir / 'study.db').resolve()}", study_name=STUDY_NAME,
        direction=sweep.direction, pruner=pruner, load_if_exists=True,
    )
    # Seeded per start: a resumed sweep reseeded with train.seed alone would redraw trial 0's params.
    trials = sweep.section.trials
    study.sampler = optuna.samplers.TPESampler(
        seed=sweep.base.train.seed + len(study.trials), n_startup_trials=max(2, min(10, trials // 2))
    )
    return study


def _retry_interrupted(study, console: Console) -> None:
    """Trials cut short by Ctrl-C or a killed process are failed, and their params queued to run again, once.

    A trial still RUNNING here belongs to a dead process: the lock file rules out a live one.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        stale = t.state == TrialState.RUNNING
        if not (stale or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))):
            continue
        if stale:
            study.tell(t.number, state=TrialState.FAIL)
            run = RunDir(t.user_attrs.get("run_dir", ""))
            if run.status() in ("running", "killed"):  # killed: the trial died with the sweep (PR_SET_PDEATHSIG)
                run.update_manifest(status="failed", error="interrupted: the sweep process stopped during this trial")
        if t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            console.print(f"sweep trial {t.number} was interrupted; its params will run again")


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _search(study, sweep: Sweep, sweep_dir: Path, console: Console) -> None:
    import optuna
    from optuna.trial import TrialState

    metric, target = sweep.section.metric, sweep.section.trials
    failures = 0
    while (done := _finished(study)) < target:
        trial = study.ask()
        values = {key: _suggest(trial, key, param) for key, param in sweep.section.space.items()}
        name = f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(sweep_dir / name))
        console.rule(escape(f"trial {trial.number} ({done + 1} of {target})  {describe_values(values)}"))
        try:
            cfg = validate_config(sweep.trial_raw(values, str(sweep_dir), name))
            # In a process of its own: the trial's peak memory is its own, not the largest of the sweep so far.
            metrics = run_trial(cfg, console, on_eval=_pruning_hook(trial, metric))
        except optuna.TrialPruned as err:
            study.tell(trial, state=TrialState.PRUNED)
            console.print(f"sweep trial {trial.number} pruned: {err}")
            continue
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except ConfigError as err:
            study.tell(trial, state=TrialState.FAIL)
            raise ConfigError(f"trial {trial.number} ({describe_values(values)}): {err}") from None
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        if "validation" not in metrics:
            study.tell(trial, state=TrialState.FAIL)
            raise TunelabError("the validation split is empty: raise data.validation_split or give data.validation")
        value = metrics["validation"][metric]
        if not math.isfinite(value):
            # Diverged (e.g. lr too high): a failed trial, not a score. Stop if the space keeps producing them.
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            console.print(f"sweep trial {trial.number}: validation {metric} is {value}; counted as failed")
            if failures >= target:
                raise TunelabError(f"{failures} trials gave a non-finite validation {metric}; narrow the space "
                                   "(a learning rate too high?)")
            continue
        study.tell(trial, value)
        console.print(f"sweep trial {trial.number}: validation {metric} {value:.4f}")
        write_tables(study, sweep, sweep_dir)


def _suggest(trial, key: str, param) -> Any:
    if isinstance(param, IntParam):
        return trial.suggest_int(key, param.low, param.high, step=param.step, log=param.log)
    if isinstance(param, FloatParam):
        return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)
    return param.value_of(trial.suggest_categorical(key, param.labels()))


def _pruning_hook(trial, metric: str):
    """Report each periodic validation to Optuna; the pruner (median, or none) decides whether to stop.

    Runs in the sweep's process (the study lives there); run_trial relays each validation of the trial to it."""
    import optuna

    def on_eval(step: int, metrics: dict) -> None:
        value = float(metrics[metric])
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation {metric} {value:.4f} at step {step} is worse than the median "
                                     "of earlier trials at that step")

    return on_eval

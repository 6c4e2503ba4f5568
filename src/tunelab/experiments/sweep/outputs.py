"""What a sweep leaves behind: trials.csv and best_config.yaml (rewritten after every trial, so an interrupted
sweep still has them), the plots, and the summary printed at the end."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tunelab.config import dump_config, validate_config
from tunelab.experiments.sweep.space import Sweep, describe_values
from tunelab.runtime.atomic import atomic_write_text, atomic_writer


def best_trial(study):
    """The best completed trial, None before the first completes."""
    from optuna.trial import TrialState

    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def write_tables(study, sweep: Sweep, sweep_dir: Path) -> None:
    """trials.csv and best_config.yaml, rewritten after every trial so an interrupted sweep still has them."""
    from optuna.trial import TrialState

    metric = sweep.section.metric
    keys = list(sweep.section.space)
    rows = []
    for t in study.get_trials(deepcopy=False):
        # A failed trial's end is when it was marked failed, perhaps long after its process died.
        ran = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if ran else None
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({
            "number": t.number, "state": t.state.name.lower(), metric: t.value,
            **{k: t.params.get(k) for k in keys},
            "last_validation_step": last_step, "duration_s": round(duration, 2) if duration is not None else None,
            "retry_of": t.user_attrs.get("retry_of"), "run_dir": t.user_attrs.get("run_dir"),
        })
    with atomic_writer(sweep_dir / "trials.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["number", "state", metric, *keys, "last_validation_step",
                                               "duration_s", "retry_of", "run_dir"])
        writer.writeheader()
        writer.writerows(rows)

    best = best_trial(study)
    if best is None:
        return
    values = sweep.values_of(best.params)
    cfg = validate_config(sweep.trial_raw(values, None, None))
    header = (
        f"# Best of sweep {sweep_dir}: trial {best.number}, validation {metric} {best.value:.4f}\n"
        f"# ({describe_values(values)}). Its trained model: {best.user_attrs.get('run_dir')}\n"
        f"# Retrain (e.g. on more data) with: tunelab train {sweep_dir / 'best_config.yaml'}\n"
    )
    atomic_write_text(sweep_dir / "best_config.yaml", header + dump_config(cfg))


def write_outputs(study, sweep: Sweep, sweep_dir: Path, console: Console) -> None:
    """The plots (history.png, importance.png) and the summary, once the search stops."""
    from optuna.trial import TrialState

    from tunelab.report.sweep_plots import plot_sweep

    skipped = plot_sweep(study, sweep.section.metric, list(sweep.section.space), sweep.base.train.seed,
                         sweep_dir / "history.png", sweep_dir / "importance.png")
    for reason in skipped:
        console.print(f"sweep {reason}")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in
                       (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) if states.count(s))
    console.print(f"sweep {counts}")
    best = best_trial(study)
    if best is not None:
        console.print(f"sweep best: trial {best.number}, validation {sweep.section.metric} {best.value:.4f}  "
                      f"{escape(describe_values(sweep.values_of(best.params)))}")
        console.print(f"sweep best config: {sweep_dir / 'best_config.yaml'}")

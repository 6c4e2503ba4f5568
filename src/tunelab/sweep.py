"""`tunelab sweep`: search a run config's hyperparameters with Optuna.

A sweep file is an ordinary run config plus one `sweep:` section, so the search and the run it varies
read as one file (delete `sweep:` and it is the base run for `tunelab train`):

    task: classification
    model: {name: minilm-l6}
    data: {train: data/sst2/train.jsonl, validation_split: 0.1}   # trials are scored on validation
    method: {name: lora}
    train: {max_steps: 200, eval_every: 50, seed: 42}             # eval_every feeds the pruner
    sweep:
      trials: 8            # completed + pruned trials to reach; more = a better optimum, a longer sweep
      metric: accuracy     # classification: accuracy, f1_macro, precision_macro, recall_macro, loss;
                           # causal_lm/instruction: loss, perplexity. loss/perplexity are minimised.
      pruner: median       # median = stop a trial whose validation metric is worse than the median of
                           # earlier trials at the same step, once 5 trials completed (Optuna's default);
                           # none. Default: median when train.eval_every is set.
      space:               # dotted config key -> distribution
        method.rank: {type: int, low: 4, high: 64, log: true}     # log: as many draws in 4-8 as in 32-64
        method.alpha: {type: categorical, choices: [8, 16, 32]}
        train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}
        method.target_modules: {type: categorical, choices: [[query, value], all-linear]}

Trials are scored on the validation split (data.validation or data.validation_split), never on the test
set: choosing hyperparameters on the test set would make its score an overestimate.

The sweep directory, `<output.dir>/<output.name or sweep-TIMESTAMP>/`:

  sweep.yaml        the sweep as resolved (overrides applied); --resume reads it
  study.db          the Optuna study in SQLite: each trial's params, state, value, validation curve
  trial-000/ ...    one ordinary run directory per trial (`tunelab eval/predict` work on them)
  trials.csv        one row per trial: number, state, metric, params, run directory
  best_config.yaml  the base config with the best trial's params: `tunelab train best_config.yaml`
  history.png       the metric of each trial and the best so far
  importance.png    fANOVA parameter importance (needs two completed trials whose params differ)

Resuming (`--resume SWEEP_DIR`, or the same file with the same output.name) continues the study: finished
trials are kept, and a trial that was running when the process died is marked failed and its params are
tried again, once. Only completed and pruned trials count toward `trials`. The resumed sweep must be the
same sweep; only `sweep.trials` may change (raise it to search further).

The sampler is TPE seeded from train.seed (plus the number of trials already in the study, so a resumed
sweep does not redraw the first trials' params). Its first trials are random: max(2, min(10, trials // 2)).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from rich.markup import escape  # a list choice such as [query, value] is not console markup

from tunelab.config import RunConfig, apply_overrides, dump_config, read_config_file, validate_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.track.tracking import parent_run

# Which direction is better, per task family. Loss and perplexity fall as a model improves.
METRICS = {
    "classification": {"accuracy": "maximize", "f1_macro": "maximize", "precision_macro": "maximize",
                       "recall_macro": "maximize", "loss": "minimize"},
    "lm": {"loss": "minimize", "perplexity": "minimize"},
}
STUDY_NAME = "tunelab-sweep"


# --------------------------------------------------------------------------- the sweep section


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_range(low: float, high: float, log: bool, stepped: bool) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high}); a fixed value belongs in the base config")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got {low})")
    if log and stepped:
        raise ValueError("step and log: true cannot be combined")


class IntParam(_Spec):
    type: Literal["int"]
    low: int
    high: int
    log: bool = Field(False, description="Sample on a log scale: as many draws in 4-8 as in 32-64.")
    step: int = Field(1, ge=1, description="Only multiples of step above low.")

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step != 1)
        return self

    def sample_values(self) -> list:
        return [self.low, self.high]


class FloatParam(_Spec):
    type: Literal["float"]
    low: float
    high: float
    log: bool = Field(False, description="Sample on a log scale; right for learning rates.")
    step: float | None = Field(None, gt=0, description="Discretise to multiples of step above low; null = continuous.")

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step is not None)
        return self

    def sample_values(self) -> list:
        return [self.low, self.high]


class CategoricalParam(_Spec):
    type: Literal["categorical"]
    choices: list[Any] = Field(
        min_length=1, description="Values to choose from; lists allowed, e.g. [[query, value], all-linear]."
    )

    def sample_values(self) -> list:
        return list(self.choices)

    def labels(self) -> list:
        """Optuna stores only scalars, so a list choice is stored as its YAML flow text, e.g. '[query, value]'."""
        return [_label(c) for c in self.choices]

    def value_of(self, label) -> Any:
        return self.choices[self.labels().index(label)]


ParamSpec = Annotated[IntParam | FloatParam | CategoricalParam, Field(discriminator="type")]
PARAM_TYPES = {"int": IntParam, "float": FloatParam, "categorical": CategoricalParam}


def _label(choice: Any) -> Any:
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True).strip()


class SweepSection(_Spec):
    trials: int = Field(ge=1, description="Completed + pruned trials to reach.")
    metric: str | None = Field(None, description="Validation metric to optimise; null = accuracy or loss by task.")
    pruner: Literal["median", "none"] | None = Field(None, description="null = median when train.eval_every is set.")
    space: dict[str, ParamSpec] = Field(min_length=1, description="Dotted config key -> distribution.")


def _sweep_error(err: ValidationError) -> str:
    """One line naming the sweep key, like config.py does for run config keys."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    section: type[BaseModel] = SweepSection
    if loc[:1] == ["space"] and len(loc) > 1:
        param = f"sweep.space.{loc[1]}"
        rest = loc[2:]
        if rest and rest[0] in PARAM_TYPES:
            section, rest = PARAM_TYPES[rest[0]], rest[1:]
        key = ".".join([param] + rest)
    else:
        key = ".".join(["sweep"] + loc)
    kind = first["type"]
    if kind == "union_tag_not_found":
        return f"sweep key '{key}' needs a type: {', '.join(PARAM_TYPES)}"
    if kind == "union_tag_invalid":
        return (f"sweep key '{key}.type': unknown parameter type {first['input'].get('type')!r}; "
                f"choose one of: {', '.join(PARAM_TYPES)}")
    if kind == "extra_forbidden":
        return f"sweep key '{key}' is not known; valid keys here: {', '.join(sorted(section.model_fields))}"
    if kind == "missing":
        return f"sweep key '{key}' is required"
    msg = first["msg"].removeprefix("Value error, ")
    return f"sweep key '{key}': {msg}" + ("" if kind == "value_error" else f" (got {first.get('input')!r})")


class Sweep:
    """A parsed sweep file: the base run config (as written, and validated) and the sweep section."""

    def __init__(self, raw: dict, base: RunConfig, section: SweepSection):
        self.raw, self.base, self.section = raw, base, section

    @property
    def direction(self) -> str:
        return METRICS[_family(self.base.task)][self.section.metric]

    def trial_raw(self, values: dict[str, Any], output_dir: str | None, name: str | None) -> dict:
        """The run config of one trial: the base as written, the sampled values, and the trial's output."""
        raw = apply_overrides(copy.deepcopy(self.raw), [f"{k}={json.dumps(v)}" for k, v in values.items()])
        raw["output"] = {**raw.get("output", {}), "dir": output_dir or self.base.output.dir, "name": name}
        return raw

    def values_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's stored params -> config values (list choices are stored as their labels)."""
        space = self.section.space
        return {k: space[k].value_of(v) if isinstance(space[k], CategoricalParam) else v for k, v in params.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump({**self.raw, "sweep": self.section.model_dump(mode="json")}, sort_keys=False)

    def identity(self) -> dict:
        """What must not change when a sweep is continued: everything but the trial budget and the output."""
        base = self.base.model_dump(mode="json")
        base.pop("output")
        return {**base, "sweep": self.section.model_dump(mode="json", exclude={"trials"})}


def _family(task: str) -> str:
    return "classification" if task == "classification" else "lm"


def parse_sweep(raw: dict) -> Sweep:
    """Validate a sweep file's contents; every mistake is one line naming the key."""
    raw = copy.deepcopy(raw)
    if "sweep" not in raw:
        raise ConfigError("no 'sweep:' section; a sweep file is a run config plus sweep: {trials, metric, space}")
    section_raw = raw.pop("sweep")
    if not isinstance(section_raw, dict):
        raise ConfigError("sweep key 'sweep' must be a mapping with trials, metric, space (and pruner)")
    base = validate_config(raw)
    try:
        section = SweepSection.model_validate(section_raw)
    except ValidationError as err:
        raise ConfigError(_sweep_error(err)) from None

    metrics = METRICS[_family(base.task)]
    if section.metric is None:
        section.metric = "accuracy" if base.task == "classification" else "loss"
    if section.metric not in metrics:
        raise ConfigError(f"sweep key 'sweep.metric': {section.metric!r} is not a {base.task} metric; "
                          f"choose one of: {', '.join(metrics)}")
    if not (base.data.validation or base.data.validation_split):
        raise ConfigError("a sweep scores each trial on a validation split: set data.validation or "
                          "data.validation_split (choosing on the test set would overstate its score)")
    if section.pruner is None:
        section.pruner = "median" if base.train.eval_every else "none"
    if section.pruner == "median" and not base.train.eval_every:
        raise ConfigError("sweep key 'sweep.pruner': median pruning compares periodic validation scores; "
                          "set train.eval_every, or sweep.pruner: none")
    sweep = Sweep(raw, base, section)
    _check_space(sweep)
    return sweep


def _check_space(sweep: Sweep) -> None:
    """Each space key must be a real config key and each of its values valid: apply them and validate."""
    space = sweep.section.space
    for key in space:
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"sweep key 'sweep.space.{key}': name one setting with a dotted key, e.g. train.lr")
        if parts[0] in ("output", "sweep"):
            raise ConfigError(f"sweep key 'sweep.space.{key}': the sweep sets {parts[0]} itself; it cannot be searched")
    firsts = {k: p.sample_values()[0] for k, p in space.items()}
    for key, param in space.items():
        for value in param.sample_values():
            for others in ({}, {k: v for k, v in firsts.items() if k != key}):
                try:
                    validate_config(sweep.trial_raw({**others, key: value}, None, None))
                except ConfigError as err:
                    joint = f" (with {_describe(others)})" if others else ""
                    raise ConfigError(f"sweep key 'sweep.space.{key}' = {value!r}{joint}: {err}") from None


def _read_yaml(path: Path) -> dict:
    return read_config_file(path, kind="sweep")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file; dotted overrides work as for `tunelab train` (sweep.trials=20 included)."""
    path = Path(path)
    raw = apply_overrides(_read_yaml(path), overrides or [])
    try:
        return parse_sweep(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- the search


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
                _write_tables(study, sweep, sweep_dir)
            _plot(study, sweep, sweep_dir, console)
            _summary(study, sweep, sweep_dir, console)
            if parent is not None:
                best = _best(study)
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

    from tunelab.track.run_dir import RunDir

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        stale = t.state == TrialState.RUNNING
        if not (stale or (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))):
            continue
        if stale:
            study.tell(t.number, state=TrialState.FAIL)
            run = RunDir(t.user_attrs.get("run_dir", ""))
            if (run.path / "manifest.json").is_file() and run.manifest().get("status") == "running":
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

    from tunelab.train.run import run_training

    metric, target = sweep.section.metric, sweep.section.trials
    failures = 0
    while (done := _finished(study)) < target:
        trial = study.ask()
        values = {key: _suggest(trial, key, param) for key, param in sweep.section.space.items()}
        name = f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(sweep_dir / name))
        console.rule(escape(f"trial {trial.number} ({done + 1} of {target})  {_describe(values)}"))
        try:
            cfg = validate_config(sweep.trial_raw(values, str(sweep_dir), name))
            _, metrics = run_training(cfg, console=console, on_eval=_pruning_hook(trial, metric))
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
            raise ConfigError(f"trial {trial.number} ({_describe(values)}): {err}") from None
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
        _write_tables(study, sweep, sweep_dir)


def _suggest(trial, key: str, param) -> Any:
    if isinstance(param, IntParam):
        return trial.suggest_int(key, param.low, param.high, step=param.step, log=param.log)
    if isinstance(param, FloatParam):
        return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)
    return param.value_of(trial.suggest_categorical(key, param.labels()))


def _pruning_hook(trial, metric: str):
    """Report each periodic validation to Optuna; the pruner (median, or none) decides whether to stop."""
    import optuna

    def on_eval(step: int, metrics: dict) -> None:
        value = float(metrics[metric])
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation {metric} {value:.4f} at step {step} is worse than the median "
                                     "of earlier trials at that step")

    return on_eval


def _describe(values: dict) -> str:
    return "  ".join(f"{k}={_format(v)}" for k, v in values.items())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(_label(value))


# --------------------------------------------------------------------------- outputs


def _best(study):
    from optuna.trial import TrialState

    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def _write_tables(study, sweep: Sweep, sweep_dir: Path) -> None:
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
    tmp = sweep_dir / ".trials.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["number", "state", metric, *keys, "last_validation_step",
                                               "duration_s", "retry_of", "run_dir"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(sweep_dir / "trials.csv")

    best = _best(study)
    if best is None:
        return
    values = sweep.values_of(best.params)
    cfg = validate_config(sweep.trial_raw(values, None, None))
    header = (
        f"# Best of sweep {sweep_dir}: trial {best.number}, validation {metric} {best.value:.4f}\n"
        f"# ({_describe(values)}). Its trained model: {best.user_attrs.get('run_dir')}\n"
        f"# Retrain (e.g. on more data) with: tunelab train {sweep_dir / 'best_config.yaml'}\n"
    )
    tmp = sweep_dir / ".best_config.yaml.tmp"
    tmp.write_text(header + dump_config(cfg), encoding="utf-8")
    tmp.replace(sweep_dir / "best_config.yaml")


def _plot(study, sweep: Sweep, sweep_dir: Path, console: Console) -> None:
    """history.png always (given a completed trial); importance.png when importance can be estimated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        console.print("sweep no completed trial yet: no plots")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        target = f"validation {sweep.section.metric}"
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=target)
        ax.figure.savefig(sweep_dir / "history.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)

        varied = [k for k in sweep.section.space if len({repr(t.params.get(k)) for t in completed}) > 1]
        if len(completed) < 2 or not varied:
            console.print("sweep parameter importance needs two completed trials with different params: skipped")
            return
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=sweep.base.train.seed)
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=evaluator, params=varied, target_name=target
            )
        except (ValueError, RuntimeError) as err:
            console.print(f"sweep parameter importance skipped: {err}")
            return
        ax.figure.savefig(sweep_dir / "importance.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)


def _summary(study, sweep: Sweep, sweep_dir: Path, console: Console) -> None:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in
                       (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) if states.count(s))
    console.print(f"sweep {counts}")
    best = _best(study)
    if best is not None:
        console.print(f"sweep best: trial {best.number}, validation {sweep.section.metric} {best.value:.4f}  "
                      f"{escape(_describe(sweep.values_of(best.params)))}")
        console.print(f"sweep best config: {sweep_dir / 'best_config.yaml'}")

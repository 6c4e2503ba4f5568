"""The sweep section of a sweep file: the distributions to search, the metric, the pruner, and every check that
runs before a trial trains (see the package docstring for the file format)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.config import RunConfig, apply_overrides, one_line_error, read_config_file, validate_config
from tunelab.errors import ConfigError

# Which direction is better, per task family. Loss and perplexity fall as a model improves.
METRICS = {
    "classification": {"accuracy": "maximize", "f1_macro": "maximize", "precision_macro": "maximize",
                       "recall_macro": "maximize", "loss": "minimize"},
    "lm": {"loss": "minimize", "perplexity": "minimize"},
}


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


def _label(choice: Any) -> Any:
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True).strip()


class SweepSection(_Spec):
    trials: int = Field(ge=1, description="Completed + pruned trials to reach.")
    metric: str | None = Field(None, description="Validation metric to optimise; null = accuracy or loss by task.")
    pruner: Literal["median", "none"] | None = Field(None, description="null = median when train.eval_every is set.")
    space: dict[str, ParamSpec] = Field(min_length=1, description="Dotted config key -> distribution.")


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
        raise ConfigError(one_line_error(err, SweepSection, kind="sweep", prefix="sweep",
                                         tag_nouns={"type": "parameter type"})) from None

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
                    joint = f" (with {describe_values(others)})" if others else ""
                    raise ConfigError(f"sweep key 'sweep.space.{key}' = {value!r}{joint}: {err}") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file; dotted overrides work as for `tunelab train` (sweep.trials=20 included)."""
    path = Path(path)
    raw = apply_overrides(read_config_file(path, kind="sweep"), overrides or [])
    try:
        return parse_sweep(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def describe_values(values: dict) -> str:
    """Sampled values as one line, e.g. `train.lr=0.0003  method.target_modules=[query, value]`."""
    return "  ".join(f"{k}={_format(v)}" for k, v in values.items())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(_label(value))



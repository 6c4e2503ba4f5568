"""Read a run directory into one object, tolerating runs that failed or are still running.

A report must open any run ever written, so this reads the raw files (config.yaml as plain YAML, not through
the current config schema, which may have gained or renamed keys since the run) and treats every file but
the directory itself as optional.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.results import Plan
from tunelab.runtime.run_dir import RunDir, live_status

LM_TASKS = ("causal_lm", "instruction")


@dataclass
class RunData:
    path: Path
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    metrics: dict | None = None  # metrics.json; None until the run completed
    train_log: list[dict] = field(default_factory=list)  # metrics.jsonl training lines, one per step
    validation_log: list[dict] = field(default_factory=list)  # metrics.jsonl periodic validation lines
    labels: list[str] = field(default_factory=list)
    artifact_bytes: int | None = None  # bytes on disk under model/; None when nothing was saved

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def files(self) -> RunDir:
        return RunDir(self.path)

    @property
    def status(self) -> str:
        if self.metrics is not None:
            return "completed"
        return self.manifest.get("status", "unknown")

    @property
    def error(self) -> str | None:
        return self.manifest.get("error")

    @property
    def task(self) -> str | None:
        if self.config.get("task"):
            return self.config["task"]
        eval_metrics = (self.metrics or {}).get("eval", {})
        if "accuracy" in eval_metrics:
            return "classification"
        return "causal_lm" if "perplexity" in eval_metrics else None

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @property
    def method(self) -> str | None:
        return (self.config.get("method") or {}).get("name")

    @property
    def model(self) -> str | None:
        return (self.config.get("model") or {}).get("name")

    @property
    def train(self) -> dict:
        return (self.metrics or {}).get("train", {})

    @property
    def eval(self) -> dict:
        return (self.metrics or {}).get("eval", {})

    @property
    def eval_untuned(self) -> dict:
        return (self.metrics or {}).get("eval_untuned", {})

    @property
    def plan(self) -> Plan | None:
        """The preflight memory/compute plan the run recorded (metrics.json "plan"); None when it has none or
        one this version cannot read."""
        recorded = (self.metrics or {}).get("plan")
        if not isinstance(recorded, dict):
            return None
        try:
            return Plan.from_dict(recorded)
        except (KeyError, TypeError):
            return None

    @property
    def estimated_peak_memory_bytes(self) -> int | None:
        value = self.train.get("estimated_peak_memory_bytes")
        if value is None and self.plan is not None:
            return self.plan.peak_memory_bytes
        return value

    @property
    def peak_memory_bytes(self) -> int | None:
        """Measured peak: the final figure, or the largest logged one for a run that never finished."""
        if self.train.get("peak_memory_bytes") is not None:
            return self.train["peak_memory_bytes"]
        logged = [r["peak_memory_bytes"] for r in self.train_log if r.get("peak_memory_bytes") is not None]
        return max(logged) if logged else None


def load_run(path: str | Path) -> RunData:
    files = RunDir(path)
    if not files.path.is_dir():
        raise TunelabError(f"{files.path}: not a run directory (no such folder)")
    run = RunData(path=files.path)
    run.config = _read_yaml(files.config_path)
    run.manifest = live_status(_read_json(files.manifest_path) or {})  # a dead owner's `running` reads `killed`
    run.metrics = _read_json(files.metrics_path)
    run.train_log, run.validation_log = read_metrics_log(files.metrics_log_path)
    labels = _read_json(files.labels_path)
    run.labels = labels if isinstance(labels, list) else list(run.eval.get("per_class", {}))
    run.artifact_bytes = disk_bytes(files.model_dir)
    return run


def read_metrics_log(path: Path) -> tuple[list[dict], list[dict]]:
    """Training and validation lines of metrics.jsonl, each sorted by step with one record per step.

    A resumed run logs again the steps between its last checkpoint and the crash, so a step can appear
    twice: the later line wins, since it belongs to the history that led to the saved model. A run killed
    mid-write can leave a torn last line; it is skipped.
    """
    train: dict[int, dict] = {}
    validation: dict[int, dict] = {}
    if not path.is_file():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        target = validation if record.get("split") == "validation" else train
        target[record["step"]] = record
    return [train[s] for s in sorted(train)], [validation[s] for s in sorted(validation)]


def disk_bytes(folder: Path) -> int | None:
    """Total size of the regular files under folder (symlinks not followed), None if it does not exist."""
    if not folder.is_dir():
        return None
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}

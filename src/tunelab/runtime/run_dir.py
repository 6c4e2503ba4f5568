"""The run directory: everything needed to trust, reproduce and reuse a run. `RunDir` is the one owner of its
layout: every stage that writes or reads a run (training, inference, reports, comparisons, sweeps, and later
export, serving and the registry) asks it for a path instead of spelling one.

  config.yaml        the resolved config (every default filled in)
  manifest.json      versions, git commit, sha256 of each data file, seed, hardware, status
  metrics.jsonl      one line per logging step and per periodic evaluation
  metrics.json       final metrics; written last, so its presence means the run completed
  labels.json        classification label names, in head order
  eval_untuned.json  LM runs: the untuned model's test loss/perplexity, measured before step 1
  model/backbone/    the trained artifact: the adapter (PEFT methods) or the whole backbone (full FT)
  model/head.safetensors  classification head
  model/tokenizer/   the tokenizer, saved with the model
  checkpoints/       resumable states (see train/checkpoint.py, which owns the layout inside)
  report.md, report.html, plots/   the run's report (see report/run_report.py)
  trace.json, ops.txt              `tunelab profile` runs: the profiler's trace and op table

`tunelab merge` and `tunelab route build` write a folder of the same kind around several runs:
  recipe.json        merge: method, weights, density and the source runs; route: the tasks and their runs
  tasks/NAME/        merge: one complete run directory per source task (the merged adapter, that task's head)
  router.safetensors route: the router's weights (a linear classifier over sentence embeddings)
  metrics.json, report.md, plots/  as for a run

`manifest.json` carries `status`: running, completed, failed (with the error), interrupted (Ctrl-C), or
killed; and `process`, the pid, host and start time of the process that owns the run (runtime/processes.py).
`killed` is never written by the run itself: a process killed by SIGKILL or the out-of-memory killer writes
nothing, so a reader that finds `running` with the owner gone reads `killed`. When the run is tracked, the
manifest also holds `mlflow`: its MLflow run id, experiment and store (track/tracking.py).

This module sits at the floor (it imports nothing above runtime/), so the config arrives as text: the
caller serialises it (config.dump_config).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_write_json, atomic_write_text, remove_temporaries
from tunelab.runtime.processes import owner_state, this_process

PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "bitsandbytes")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, timeout=5)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def live_status(manifest: dict) -> dict:
    """The manifest as a reader should see it: `running` whose owning process is gone reads `killed`."""
    if manifest.get("status") == "running" and owner_state(manifest.get("process")) == "dead":
        return {**manifest, "status": "killed",
                "error": manifest.get("error") or "killed: the process that ran it ended without recording why "
                                                   "(SIGKILL, out of memory, or a power loss)"}
    return manifest


class ModelFiles:
    """The saved model's layout under any root: a run's model/ folder, or the temporary folder it is
    written in before being renamed into place."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def head(self) -> Path:
        return self.root / "head.safetensors"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # Called with each metrics.jsonl record after it is written (the MLflow tracker batches them).
        self.listeners: list = []

    @classmethod
    def create(cls, path: str | Path, config_text: str, *, seed: int, data_files: dict[str, str | None],
               hardware: dict) -> RunDir:
        """Make a new run directory holding the resolved config and a `running` manifest.

        data_files: split -> file, each recorded with its sha256. Under `accelerate launch` call this on the
        main process only and share the path (runtime/distributed.py `on_main_then_share`).
        """
        run = cls(path)
        if run.manifest_path.exists():
            raise TunelabError(f"run directory {run.path} already exists; pick another output.name or use "
                               f"--resume {run.path}")
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config_path, config_text)
        data = {split: {"path": src, "sha256": sha256(src) if Path(src).is_file() else None}
                for split, src in data_files.items() if src}
        run.write_manifest({
            "status": "running",
            "started": _now(),
            "command": sys.argv,
            "process": this_process(),
            "seed": seed,
            "git_commit": _git_commit(),
            "packages": _versions(),
            "data": data,
            "hardware": hardware,
        })
        return run

    # ----------------------------------------------------------------- paths

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        """metrics.json: final metrics, written last."""
        return self.path / "metrics.json"

    @property
    def metrics_log_path(self) -> Path:
        """metrics.jsonl: one line per logging step and per periodic evaluation."""
        return self.path / "metrics.jsonl"

    @property
    def labels_path(self) -> Path:
        return self.path / "labels.json"

    @property
    def untuned_eval_path(self) -> Path:
        return self.path / "eval_untuned.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def model_files(self) -> ModelFiles:
        return ModelFiles(self.model_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def recipe_path(self) -> Path:
        """recipe.json of a merge or router folder: what it was built from."""
        return self.path / "recipe.json"

    def task_dir(self, name: str) -> Path:
        """A merge folder's run directory for one source task."""
        return self.path / "tasks" / name

    def task_names(self) -> list[str]:
        tasks = self.path / "tasks"
        return sorted(p.name for p in tasks.iterdir() if p.is_dir()) if tasks.is_dir() else []

    @property
    def router_weights(self) -> Path:
        return self.path / "router.safetensors"

    def is_router(self) -> bool:
        return self.router_weights.is_file() and self.recipe_path.is_file()

    def is_merge(self) -> bool:
        return self.recipe_path.is_file() and not self.router_weights.is_file()

    def recipe(self) -> dict:
        return json.loads(self.recipe_path.read_text())

    @property
    def profile_trace(self) -> Path:
        return self.path / "trace.json"

    @property
    def profile_ops(self) -> Path:
        return self.path / "ops.txt"

    # ----------------------------------------------------------------- state

    def is_run(self) -> bool:
        """A run directory holds its config from the moment it is created."""
        return self.config_path.is_file()

    def is_complete(self) -> bool:
        return self.metrics_path.is_file()

    def has_model(self) -> bool:
        return self.model_files.backbone.is_dir()

    def status(self) -> str:
        """running, completed, failed, interrupted or killed; unknown without a manifest."""
        return self.manifest().get("status", "unknown") if self.manifest_path.is_file() else "unknown"

    def owner_alive(self) -> bool:
        """Whether the process that owns this run is alive (on this host; False when it cannot be told)."""
        return owner_state(self.manifest().get("process")) == "alive" if self.manifest_path.is_file() else False

    # ----------------------------------------------------------------- manifest and metrics

    def manifest(self) -> dict:
        """manifest.json, with a dead owner's `running` read as `killed` (see live_status)."""
        return live_status(json.loads(self.manifest_path.read_text()))

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def update_manifest(self, **fields) -> None:
        self.write_manifest({**self.manifest(), **fields})

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener(record)

    def finish(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_path, metrics)
        self.update_manifest(status="completed", finished=_now())

    def fail(self, error: BaseException) -> None:
        if isinstance(error, KeyboardInterrupt):
            self.update_manifest(status="interrupted", error="interrupted (Ctrl-C or SIGINT)")
        else:
            self.update_manifest(status="failed", error=f"{type(error).__name__}: {error}")

    def claim(self) -> None:
        """Make the calling process the owner of a run it resumes: `running` again, with its pid."""
        manifest = {k: v for k, v in self.manifest().items() if k not in ("error", "finished")}
        self.write_manifest({**manifest, "status": "running", "process": this_process(), "resumed": _now()})

    def changed_data(self, data_files: dict[str, str | None]) -> list[str]:
        """The splits whose file is not the one the run started with: another path, or other bytes (sha256).
        A split the manifest holds no checksum for is not compared."""
        recorded = self.manifest().get("data") or {}
        changed = []
        for split, src in data_files.items():
            before = recorded.get(split) or {}
            if not src and not before:
                continue
            if not src or not before or before.get("path") != src:
                changed.append(f"{split}: was {before.get('path')}, now {src}")
            elif before.get("sha256") and (not Path(src).is_file() or sha256(src) != before["sha256"]):
                changed.append(f"{split}: {src} changed since the run started (sha256 differs)")
        return changed

    def clean_temporary(self) -> list[Path]:
        """Remove what writes killed midway left behind (`.NAME.tmp`, `.NAME.PID.tmp`); returns what went."""
        return remove_temporaries(self.path) + remove_temporaries(self.checkpoint_dir)

    def labels(self) -> list[str]:
        return json.loads(self.labels_path.read_text()) if self.labels_path.is_file() else []

    def write_labels(self, labels: list[str]) -> None:
        atomic_write_json(self.labels_path, labels)

    def untuned_eval(self) -> dict | None:
        path = self.untuned_eval_path
        return json.loads(path.read_text()) if path.is_file() else None

    def write_untuned_eval(self, metrics: dict) -> None:
        atomic_write_json(self.untuned_eval_path, metrics)

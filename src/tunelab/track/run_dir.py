"""The run directory: everything needed to trust, reproduce and reuse a run.

  config.yaml      the resolved config (every default filled in)
  manifest.json    versions, git commit, sha256 of each data file, seed, hardware, status
  metrics.jsonl    one line per logging step and per periodic evaluation
  metrics.json     final metrics; written last, so its presence means the run completed
  labels.json      classification label names, in head order
  eval_untuned.json  LM runs: the untuned model's test loss/perplexity, measured before step 1
  model/backbone/  the trained artifact: the adapter (PEFT methods) or the whole backbone (full FT)
  model/head.safetensors  classification head
  model/tokenizer/ the tokenizer, saved with the model
  checkpoints/     resumable states (see train/checkpoint.py)

`manifest.json` carries `status`: running, failed (with the error) or completed, and, when the run is
tracked, `mlflow`: its MLflow run id, experiment and store (track/tracking.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tunelab.config import RunConfig, dump_config

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


def write_json_atomic(path: Path, obj) -> None:
    # The temp name is per process: under `accelerate launch` two processes may record a failure at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # Called with each metrics.jsonl record after it is written (the MLflow tracker batches them).
        self.listeners: list = []

    @classmethod
    def create(cls, cfg: RunConfig, hardware: dict) -> RunDir:
        """Make a new run directory. Under `accelerate launch` call it on the main process only and share the
        path (train/distributed.py `on_main_then_share`): the default name holds a timestamp."""
        name = cfg.output.name or "{}-{}-{}".format(
            Path(cfg.model.name).name, cfg.method.name, datetime.now().strftime("%Y%m%d-%H%M%S")
        )
        path = Path(cfg.output.dir) / name
        if (path / "manifest.json").exists():
            from tunelab.errors import TunelabError

            raise TunelabError(f"run directory {path} already exists; pick another output.name or use --resume {path}")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        (path / "config.yaml").write_text(dump_config(cfg))
        data_files = {
            split: {"path": src, "sha256": sha256(src) if Path(src).is_file() else None}
            for split, src in (("train", cfg.data.train), ("validation", cfg.data.validation), ("test", cfg.data.test))
            if src
        }
        run.write_manifest(
            {
                "status": "running",
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": sys.argv,
                "seed": cfg.train.seed,
                "git_commit": _git_commit(),
                "packages": _versions(),
                "data": data_files,
                "hardware": hardware,
            }
        )
        return run

    # ----------------------------------------------------------------- manifest and metrics

    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.path / "manifest.json", manifest)

    def update_manifest(self, **fields) -> None:
        self.write_manifest({**self.manifest(), **fields})

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener(record)

    def finish(self, metrics: dict) -> None:
        write_json_atomic(self.path / "metrics.json", metrics)
        self.update_manifest(status="completed", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def fail(self, error: BaseException) -> None:
        self.update_manifest(status="failed", error=f"{type(error).__name__}: {error}")

    # ----------------------------------------------------------------- paths

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def labels(self) -> list[str]:
        p = self.path / "labels.json"
        return json.loads(p.read_text()) if p.is_file() else []

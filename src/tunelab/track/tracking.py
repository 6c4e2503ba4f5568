"""Experiment tracking in MLflow: each run directory mirrored as an MLflow run that people can list and compare.

Embedded by default: the store is a SQLite file beside the run directories (`<output.dir>/mlflow.db`, artifacts
in `<output.dir>/mlartifacts`), so it needs no server and no network. `track.uri` or MLFLOW_TRACKING_URI
points it at a team's server instead. What a run logs:

  params    the resolved config, flattened (model.name, method.rank, train.lr, ...)
  metrics   every line of metrics.jsonl at its step (train.loss, train.lr, validation.accuracy, ...), sent in
            batches every FLUSH_S seconds and at the end, not one call per step; then the final metrics
            (test.accuracy, train.wall_s, ...)
  tags      hardware, precision, package versions, git commit, the run directory's path
  inputs    each data file as a dataset with its sha256 (see _dataset for MLflow's 36-character digest)
  artifacts config.yaml, manifest.json, metrics.json(l), report.html/.md, plots/

Tracking never fails a training run: the first error (a store that cannot be opened or written, a server
that went away) prints one warning line, tracking stops for the rest of the run, and the run directory,
which is the record, is complete as always. mlflow is imported here only, and only when a run is tracked,
so `import tunelab` stays light.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from tunelab.runtime.run_dir import RunDir

FLUSH_S = 30.0  # seconds between batches of step metrics sent during training
DB_NAME, ARTIFACTS_NAME = "mlflow.db", "mlartifacts"
PARENT_ENV = "TUNELAB_MLFLOW_PARENT_RUN_ID"  # compare and sweep file their runs under a parent run
DIGEST_CHARS = 36  # MLflow's datasets table holds a 36-character digest (a VARCHAR(36) on PostgreSQL)


def planned_uri(track_cfg, output_dir: str | Path, manifest: dict | None = None) -> str:
    """The store a run logs to: a resumed run's own (its manifest names it), else tracking_uri."""
    previous = (manifest or {}).get("mlflow") or {}
    return previous.get("tracking_uri") or tracking_uri(track_cfg.uri, output_dir)


def tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """track.uri, else $MLFLOW_TRACKING_URI, else the SQLite file under the run folder (absolute, so the
    manifest's copy works from any directory)."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    return "sqlite:///" + str((Path(output_dir) / DB_NAME).resolve())


def artifact_location(uri: str) -> str | None:
    """Artifacts sit beside a SQLite store; a server decides for itself (its --artifacts-destination)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_NAME).resolve().as_uri()
    return None


def quiet_mlflow() -> None:
    """A new SQLite store runs its schema migrations with INFO lines from alembic; they say nothing to a user."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_client(uri: str):
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    """Get or create the experiment; a new one on a SQLite store keeps its artifacts beside the database."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException:  # created by another process a moment ago
        return client.get_experiment_by_name(name).experiment_id


def flat_params(cfg_dict: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def step_metrics(record: dict) -> tuple[int, int, dict[str, float]]:
    """(step, timestamp ms, {name: value}) of one metrics.jsonl line: train.* for training windows,
    validation.* for periodic validation; non-numbers are left out."""
    split = record.get("split", "train")
    values = {f"{split}.{k}": float(v) for k, v in record.items()
              if k not in ("time", "step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(record.get("step", 0)), int(1000 * record.get("time", time.time())), values


SECTIONS = {"eval": "test", "validation": "validation", "eval_untuned": "untuned_test", "train": "train"}


def final_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's numbers, named by the split they were measured on (eval -> test.accuracy, ...)."""
    out = {}
    for section, prefix in SECTIONS.items():
        for key, value in (metrics.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}.{key}"] = float(value)
    for key in ("total_wall_s", "samples_stopped_at_eos"):
        if isinstance(metrics.get(key), (int, float)):
            out[key] = float(metrics[key])
    return out


def run_tags(manifest: dict) -> dict[str, str]:
    tags = {"tunelab.run_dir": str(Path(manifest.get("_path", ".")).resolve())}
    for key, value in (manifest.get("hardware") or {}).items():
        tags[f"hardware.{key}"] = str(value)
    for key, value in (manifest.get("packages") or {}).items():
        if value:
            tags[f"packages.{key}"] = str(value)
    for key in ("precision", "attention", "num_processes", "distributed_type", "seed", "status"):
        if manifest.get(key) is not None:
            tags[f"tunelab.{key}"] = str(manifest[key])
    if manifest.get("git_commit"):
        tags["mlflow.source.git.commit"] = manifest["git_commit"].removesuffix("-dirty")
        tags["tunelab.git_commit"] = manifest["git_commit"]
    return tags


def _dataset(split: str, entry: dict):
    """An MLflow dataset input for one data file. The digest is the sha256's first 36 hex digits (144 bits)
    because MLflow's datasets table holds 36 characters; the profile carries the whole sha256."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(entry["path"])
    sha = entry.get("sha256") or ""
    dataset = Dataset(
        name=f"{path.resolve().parent.name}/{path.name}", digest=sha[:DIGEST_CHARS] or "unknown", source_type="local",
        source=json.dumps({"uri": str(path.resolve())}), profile=json.dumps({"sha256": sha, "split": split}),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)])


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Tracker:
    """The MLflow run of one run directory. Every method is guarded: see the module docstring."""

    def __init__(self, console: Console):
        self.console = console
        self.client = None
        self.uri: str | None = None
        self.experiment: tuple[str, str] | None = None  # (name, id) once found or made
        self.run_id: str | None = None
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()
        self.broken = False

    # ------------------------------------------------------------------ guarded calls

    def _safely(self, what: str, fn, *args) -> bool:
        if self.broken:
            return False
        try:
            fn(*args)
            return True
        except Exception as err:  # noqa: BLE001 -- tracking must never end a training run
            self.broken = True
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            self.console.print(f"[yellow]tracking off: MLflow {what} failed ({type(err).__name__}: {detail}); "
                               "the run directory is complete[/]", highlight=False, soft_wrap=True)
            return False

    # ------------------------------------------------------------------ a training run

    def start(self, run: RunDir, track_cfg, output_dir: str, resume: bool = False) -> None:
        """Open (or, on --resume, reopen) the MLflow run and record its id in the manifest."""
        self._safely("store", self._start, run, track_cfg, output_dir, resume)

    def _start(self, run: RunDir, track_cfg, output_dir: str, resume: bool) -> None:
        if self.client is None:
            self.open(planned_uri(track_cfg, output_dir, run.manifest() if resume else None),
                      None if resume else track_cfg.experiment)
        record = self.create(run, track_cfg.experiment, resume)
        if record:
            run.update_manifest(mlflow=record)
        run.listeners.append(self.on_log)

    def open(self, uri: str, experiment: str | None = None) -> None:
        """The slow part, done once: import mlflow, open the store (a new SQLite store runs its schema
        migrations) and find or make the experiment. track/worker.py does it in its own process."""
        self.uri = uri
        self.client = open_client(uri)
        if experiment:
            self.experiment = (experiment, experiment_id(self.client, experiment, uri))

    def create(self, run: RunDir, experiment: str, resume: bool) -> dict | None:
        """Make the MLflow run of `run` and log its params and data inputs; returns the manifest's `mlflow`
        entry (None when a resumed run reopens the MLflow run its manifest names)."""
        from tunelab.config import load_config

        manifest = run.manifest()
        previous = manifest.get("mlflow") or {}
        if resume and previous.get("run_id"):
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return None
        if self.experiment is None or self.experiment[0] != experiment:
            self.experiment = (experiment, experiment_id(self.client, experiment, self.uri))
        exp = self.experiment[1]
        tags = run_tags({**manifest, "_path": run.path})
        tags["mlflow.source.name"] = "tunelab train"
        if os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        created = self.client.create_run(exp, tags=tags, run_name=run.path.name)
        self.run_id = created.info.run_id
        record = {"run_id": self.run_id, "experiment_id": exp, "experiment": experiment, "tracking_uri": self.uri,
                  "artifact_uri": created.info.artifact_uri}
        params = flat_params(load_config(run.config_path).model_dump(mode="json"))
        self._log_batch(params=params)
        datasets = [_dataset(split, entry) for split, entry in (manifest.get("data") or {}).items()]
        if datasets:
            self.client.log_inputs(self.run_id, datasets=datasets)
        return record

    def _log_batch(self, metrics: list | None = None, params: dict | None = None, tags: dict | None = None) -> None:
        """MLflow takes at most 1,000 metrics and 100 params or tags per call."""
        from mlflow.entities import Param, RunTag

        for chunk in _chunks(metrics or [], 1000):
            self.client.log_batch(self.run_id, metrics=chunk)
        for chunk in _chunks([Param(k, v) for k, v in (params or {}).items()], 100):
            self.client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks([RunTag(k, v) for k, v in (tags or {}).items()], 100):
            self.client.log_batch(self.run_id, tags=chunk)

    def on_log(self, record: dict) -> None:
        """Called by RunDir.log for each metrics.jsonl line; sends a batch every FLUSH_S seconds."""
        if self.run_id is None or self.broken:
            return
        self.pending.append(record)
        if time.monotonic() - self.last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self.pending or self.run_id is None:
            return
        records, self.pending, self.last_flush = self.pending, [], time.monotonic()
        self._safely("metric logging", self._send, records)

    def _send(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for record in records:
            step, stamp, values = step_metrics(record)
            metrics += [Metric(k, v, stamp, step) for k, v in values.items()]
        self._log_batch(metrics=metrics)

    def finish(self, run: RunDir, failed: BaseException | str | None = None) -> None:
        """Send what is left, the final metrics, tags and artifacts, and close the MLflow run. `failed`: the
        error that ended the run, or its "Type: message" line."""
        if self.run_id is None:
            return
        self.flush()
        if isinstance(failed, BaseException):
            failed = f"{type(failed).__name__}: {failed}"
        self._safely("final logging", self._finish, run, failed)

    def close(self) -> None:
        """Nothing to end in-process (a TrackingWorker ends its process here)."""

    def _finish(self, run: RunDir, failed: str | None) -> None:
        from mlflow.entities import Metric

        manifest = run.manifest()
        if run.is_complete():
            metrics = json.loads(run.metrics_path.read_text())
            step, stamp = int((metrics.get("train") or {}).get("steps") or 0), int(time.time() * 1000)
            self._log_batch(metrics=[Metric(k, v, stamp, step) for k, v in final_metrics(metrics).items()])
        tags = run_tags({**manifest, "_path": run.path})
        if failed is not None:
            tags["tunelab.error"] = failed[:4000]
        self._log_batch(tags=tags)
        log_run_artifacts(self.client, self.run_id, run)
        self.client.set_terminated(self.run_id, status="FAILED" if failed is not None else "FINISHED")


def log_run_artifacts(client, run_id: str, run: RunDir) -> None:
    files = (run.config_path, run.manifest_path, run.metrics_path, run.metrics_log_path, run.labels_path,
             run.report_html, run.report_md)
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    if run.plots_dir.is_dir():
        client.log_artifacts(run_id, str(run.plots_dir), run.plots_dir.name)


def log_report(run_dir: str | Path, console: Console) -> None:
    """Log a run's report (report.html, report.md, plots/), written after training, to its MLflow run;
    a failure is one warning line, as for the rest of tracking."""
    from tunelab.track.worker import open_worker

    worker = open_worker(run_dir)
    if worker is not None:  # the run's own tracking process, still open: it logs the report and ends
        worker.report_and_close()
        return
    run = RunDir(run_dir)
    tracked = (run.manifest().get("mlflow") or {}) if run.is_run() else {}
    if not tracked.get("run_id"):
        return
    tracker = Tracker(console)
    tracker.run_id = tracked["run_id"]

    def send() -> None:
        tracker.client = open_client(tracked["tracking_uri"])
        log_run_artifacts(tracker.client, tracker.run_id, run)

    tracker._safely("report logging", send)


IN_PROCESS = False  # True: a training run's tracking runs in the training process (tests that patch MlflowClient)


def open_tracking(cfg, console: Console, resume_dir: str | None = None):
    """The tracker of a training run, or None when track.enabled is off; call it as early as the run is known to
    go ahead, then .start(run, ...) once its directory exists.

    By default a TrackingWorker (track/worker.py): a process of its own that imports mlflow and opens the store
    while this one loads torch and the model, on another core, and then does every MLflow call of the run.
    The training process never imports mlflow, so tracking costs it a few pipe writes. IN_PROCESS: a Tracker
    here, which does the same calls in this process when .start is called.
    """
    if not cfg.track.enabled:
        return None
    if IN_PROCESS:
        return Tracker(console)
    from tunelab.track.worker import TrackingWorker

    manifest = RunDir(resume_dir).manifest() if resume_dir else None
    return TrackingWorker(console, planned_uri(cfg.track, cfg.output.dir, manifest),
                          None if resume_dir else cfg.track.experiment)


# --------------------------------------------------------------------------- parent runs (compare, sweep)


@contextmanager
def parent_run(track_cfg, output_dir: str, name: str, kind: str, console: Console, params: dict | None = None):
    """An MLflow run that the runs started inside this block file themselves under (as children).

    Children find it through the environment (PARENT_ENV, and MLFLOW_TRACKING_URI for the same store), so this
    works for runs in this process (sweep) and in child processes (compare). Yields a ParentRun, or None when
    tracking is off or the store cannot be opened (one warning line, as for a single run).
    """
    if not track_cfg.enabled:
        yield None
        return
    tracker = Tracker(console)
    uri = tracking_uri(track_cfg.uri, output_dir)
    parent = ParentRun(tracker, uri)
    if not tracker._safely("store", parent.open, track_cfg.experiment, name, kind, params or {}):
        yield None
        return
    saved = {k: os.environ.get(k) for k in (PARENT_ENV, "MLFLOW_TRACKING_URI")}
    os.environ[PARENT_ENV], os.environ["MLFLOW_TRACKING_URI"] = tracker.run_id, uri
    status = "FAILED"
    try:
        yield parent
        status = "FINISHED"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tracker._safely("closing the parent run", tracker.client.set_terminated, tracker.run_id, status)


class ParentRun:
    def __init__(self, tracker: Tracker, uri: str):
        self.tracker, self.uri = tracker, uri

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def open(self, experiment: str, name: str, kind: str, params: dict) -> None:
        t = self.tracker
        t.client = open_client(self.uri)
        exp = experiment_id(t.client, experiment, self.uri)
        t.run_id = t.client.create_run(exp, tags={"tunelab.kind": kind, "mlflow.source.name": f"tunelab {kind}"},
                                       run_name=name).info.run_id
        if params:
            t._log_batch(params={k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()})

    def log_report(self, folder: Path, metrics: dict[str, float] | None = None) -> None:
        """The comparison or sweep report (and its headline numbers) on the parent run."""
        t = self.tracker

        def send() -> None:
            from mlflow.entities import Metric

            if metrics:
                stamp = int(time.time() * 1000)
                t._log_batch(metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
            for f in sorted(folder.iterdir()):
                if f.is_file() and f.suffix in (".html", ".md", ".csv", ".json", ".png", ".yaml"):
                    t.client.log_artifact(t.run_id, str(f))

        t._safely("report logging", send)


def track_finished_run(run: RunDir, uri: str, console: Console) -> str | None:
    """Log a finished run directory that was trained untracked (or into another store), as it would have been
    logged live; returns its MLflow run id, or None if the store failed (the warning line is printed)."""
    from tunelab.config import load_config

    cfg = load_config(run.config_path)
    tracker = Tracker(console)
    tracker.start(run, cfg.track.model_copy(update={"uri": uri}), cfg.output.dir)
    if tracker.run_id is None or tracker.broken:
        return None
    if run.metrics_log_path.is_file():
        lines = run.metrics_log_path.read_text().splitlines()
        tracker.pending = [json.loads(line) for line in lines if line.strip()]
    tracker.finish(run)
    return None if tracker.broken else tracker.run_id

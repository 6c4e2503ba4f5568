"""MLflow tracking: what a run logs, that a broken store never fails a run, parent runs for compare and sweep."""

import json

import pytest
from rich.console import Console

from conftest import make_config
from tunelab.config import validate_config
from tunelab.runtime.run_dir import sha256
from tunelab.train.run import run_training


def _cfg(tmp_path, tiny_encoder, sentiment_files, **sections):
    train, test = sentiment_files
    base = dict(model={"name": tiny_encoder}, data={"train": str(train), "test": str(test), "max_train_samples": 48},
                train={"max_steps": 6, "log_every": 1}, output={"dir": str(tmp_path / "runs"), "name": "tracked"},
                track={"enabled": True})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate_config(make_config(**base))


def _console():
    return Console(stderr=False, record=True, width=300, file=open("/dev/null", "w"))


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


def test_a_run_logs_params_metrics_tags_artifacts_and_data(tmp_path, tiny_encoder, sentiment_files):
    from tunelab.report import report_after_run
    from tunelab.track.tracking import log_report

    cfg = _cfg(tmp_path, tiny_encoder, sentiment_files)
    console = _console()
    run, metrics = run_training(cfg, console=console)
    report_after_run(run.path, console)  # as `tunelab train` does once training is over
    log_report(run.path, console)
    tracked = run.manifest()["mlflow"]
    assert tracked["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = _client(tmp_path)
    logged = client.get_run(tracked["run_id"])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tracked"
    params = logged.data.params
    assert params["model.name"] == tiny_encoder and params["train.max_steps"] == "6" and params["method.name"] == "full"
    steps = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(tracked["run_id"], "train.loss")
    assert [m.step for m in history] == [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx([s["loss"] for s in steps])
    assert logged.data.metrics["test.accuracy"] == pytest.approx(metrics["eval"]["accuracy"])
    assert logged.data.metrics["train.wall_s"] == pytest.approx(metrics["train"]["wall_s"])
    tags = logged.data.tags
    assert tags["tunelab.precision"] == "fp32" and tags["packages.torch"] and tags["hardware.cpu"]
    assert tags["tunelab.run_dir"] == str(run.path.resolve())
    artifacts = {a.path for a in client.list_artifacts(tracked["run_id"])}
    assert {"config.yaml", "manifest.json", "metrics.json", "report.html", "plots"} <= artifacts
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # artifacts beside the store
    inputs = {i.dataset.name.split("/")[-1]: i for i in logged.inputs.dataset_inputs}
    for split, path in (("train", cfg.data.train), ("test", cfg.data.test)):
        ds = inputs[path.split("/")[-1]].dataset
        assert ds.digest == sha256(path)[:36] and json.loads(ds.profile)["sha256"] == sha256(path)
    report = (run.path / "report.md").read_text()
    assert tracked["run_id"] in report


def test_step_metrics_go_in_batches(tmp_path, tiny_encoder, sentiment_files, monkeypatch):
    from mlflow.tracking import MlflowClient

    calls = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kw):
        if metrics:
            calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr("tunelab.track.tracking.IN_PROCESS", True)  # the patch reaches MlflowClient in this process
    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    monkeypatch.setattr(MlflowClient, "log_metric", lambda *a, **k: pytest.fail("one call per metric"))
    run_training(_cfg(tmp_path, tiny_encoder, sentiment_files), console=_console())
    # Six steps of training metrics in one batch at the end (the run is shorter than FLUSH_S), then the finals.
    assert len(calls) == 2 and calls[0] >= 6 * 4


@pytest.mark.parametrize("uri", ["sqlite:////proc/no-such-dir/mlflow.db", "http://127.0.0.1:9/"])
def test_a_broken_store_costs_one_warning_line_not_the_run(tmp_path, tiny_encoder, sentiment_files, monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    console = _console()
    run, _ = run_training(_cfg(tmp_path, tiny_encoder, sentiment_files, track={"uri": uri}), console=console)
    lines = [line for line in console.export_text().splitlines() if "tracking off" in line]
    assert len(lines) == 1 and "the run directory is complete" in lines[0]
    assert run.manifest()["status"] == "completed" and "mlflow" not in run.manifest()
    assert (run.path / "metrics.json").is_file() and (run.path / "model").is_dir()


def test_a_store_failing_mid_run_warns_once(tmp_path, tiny_encoder, sentiment_files, monkeypatch):
    from mlflow.tracking import MlflowClient

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tunelab.track.tracking.IN_PROCESS", True)
    monkeypatch.setattr(MlflowClient, "log_artifact", broken)
    console = _console()
    run, _ = run_training(_cfg(tmp_path, tiny_encoder, sentiment_files), console=console)
    lines = [line for line in console.export_text().splitlines() if "tracking off" in line]
    assert len(lines) == 1 and "OSError: disk full" in lines[0]
    assert run.manifest()["status"] == "completed" and (run.path / "metrics.json").is_file()


def test_tracking_off_writes_no_store(tmp_path, tiny_encoder, sentiment_files):
    run, _ = run_training(_cfg(tmp_path, tiny_encoder, sentiment_files, track={"enabled": False}), console=_console())
    assert not (tmp_path / "runs" / "mlflow.db").exists() and "mlflow" not in run.manifest()


def test_mlflow_tracking_uri_environment_is_honoured(tmp_path, tiny_encoder, sentiment_files, monkeypatch):
    store = tmp_path / "team" / "mlflow.db"
    store.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    run, _ = run_training(_cfg(tmp_path, tiny_encoder, sentiment_files), console=_console())
    assert store.is_file() and not (tmp_path / "runs" / "mlflow.db").exists()
    assert run.manifest()["mlflow"]["tracking_uri"] == f"sqlite:///{store}"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, tiny_encoder, sentiment_files):
    cfg = _cfg(tmp_path, tiny_encoder, sentiment_files, train={"save_every": 3})

    def stop_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    from tunelab.train import loop

    original_train = loop.FineTune.train

    def interrupted(self):
        self.on_step = stop_at_4
        return original_train(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.FineTune, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, console=_console())
    run_dir = tmp_path / "runs" / "tracked"
    first_id = json.loads((run_dir / "manifest.json").read_text())["mlflow"]["run_id"]
    assert _client(tmp_path).get_run(first_id).info.status == "FAILED"
    run, _ = run_training(cfg, resume_dir=str(run_dir), console=_console())
    assert run.manifest()["mlflow"]["run_id"] == first_id
    logged = _client(tmp_path).get_run(first_id)
    assert logged.info.status == "FINISHED" and "test.accuracy" in logged.data.metrics
    assert len(_client(tmp_path).search_runs([logged.info.experiment_id])) == 1


def test_sweep_files_trials_under_a_parent_run(tmp_path, tiny_encoder, sentiment_files):
    import yaml

    from tunelab.experiments.sweep.search import run_sweep

    train, _ = sentiment_files
    raw = make_config(model={"name": tiny_encoder}, data={"train": str(train), "validation_split": 0.2,
                                                          "max_train_samples": 40},
                      train={"max_steps": 2}, output={"dir": str(tmp_path / "runs"), "name": "sw"},
                      track={"enabled": True})
    raw["sweep"] = {"trials": 2, "metric": "accuracy", "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_sweep(str(path), [], None, _console())
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    parents = [r for r in runs if r.data.tags.get("tunelab.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["trial-000", "trial-001"]
    assert "trials.csv" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_mlflow_is_imported_only_when_a_run_is_tracked():
    import subprocess
    import sys

    code = ("import sys, tunelab.cli, tunelab.train.run, tunelab.experiments.sweep.search, tunelab.experiments.compare, tunelab.track.registry; "
            "print(sorted(m for m in ('mlflow', 'datasketch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow  # two trainings in their own processes
def test_compare_files_techniques_under_a_parent_run(tmp_path, tiny_encoder, sentiment_files):
    import yaml

    from tunelab.experiments.compare import run_comparison

    train, test = sentiment_files
    raw = make_config(model={"name": tiny_encoder}, data={"train": str(train), "test": str(test), "max_train_samples": 32},
                      train={"max_steps": 2}, output={"dir": str(tmp_path / "runs"), "name": "cmp"},
                      track={"enabled": True})
    raw["compare"] = {"methods": ["full", "lora"]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    _, entries = run_comparison(path, None, [], _console())
    assert [e["status"] for e in entries] == ["completed", "completed"]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tunelab.kind") == "compare"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["full", "lora"]
    assert "comparison.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "full.test.accuracy" in parent.data.metrics


def test_a_tracking_worker_that_dies_costs_one_warning_line_not_the_run(tmp_path, tiny_encoder, sentiment_files,
                                                                        monkeypatch):
    from tunelab.track.worker import TrackingWorker

    original = TrackingWorker.start

    def start_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.proc.kill()

    monkeypatch.setattr(TrackingWorker, "start", start_then_die)
    console = _console()
    run, _ = run_training(_cfg(tmp_path, tiny_encoder, sentiment_files), console=console)
    lines = [line for line in console.export_text().splitlines() if "tracking off" in line]
    assert len(lines) == 1 and "MLflow worker" in lines[0] and "the run directory is complete" in lines[0]
    assert run.manifest()["status"] == "completed" and (run.path / "metrics.json").is_file()


def test_the_training_process_leaves_mlflow_to_the_worker(tmp_path, tiny_encoder, sentiment_files):
    """Tracked, the training process never imports mlflow: the worker process does every MLflow call."""
    import subprocess
    import sys

    cfg = _cfg(tmp_path, tiny_encoder, sentiment_files)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    code = ("import json, sys; from rich.console import Console; from tunelab.config import RunConfig; "
            "from tunelab.train.run import run_training; from tunelab.track.tracking import log_report; "
            f"cfg = RunConfig.model_validate_json(open({str(tmp_path / 'cfg.json')!r}).read()); "
            "from tunelab.report import report_after_run; run, _ = run_training(cfg, console=Console(stderr=True)); "
            "report_after_run(run.path, Console(stderr=True)); log_report(run.path, Console(stderr=True)); "
            "print(json.dumps(['mlflow' in sys.modules, run.manifest()['mlflow']['run_id']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported, run_id = json.loads(out.strip().splitlines()[-1])
    assert imported is False
    logged = _client(tmp_path).get_run(run_id)
    assert logged.info.status == "FINISHED" and "test.accuracy" in logged.data.metrics
    assert "report.html" in {a.path for a in _client(tmp_path).list_artifacts(run_id)}

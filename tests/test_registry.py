"""The model registry: register runs and exports, aliases, bad references, lineage, offline resolution."""

import json
import os
import socket
import subprocess
import sys

import pytest
from rich.console import Console

from conftest import make_config
from tunelab.config import validate_config
from tunelab.errors import TunelabError
from tunelab.track import registry
from tunelab.track.lineage import format_lineage, lineage
from tunelab.runtime.run_dir import sha256
from tunelab.train.run import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder):
    """Two finished runs in one embedded store (the second trained with tracking off) and the store's URI."""
    from conftest import DATA, write_jsonl

    root = tmp_path_factory.mktemp("registry")
    rows = [json.loads(line) for line in (DATA / "sst2" / "train.jsonl").read_text().splitlines()[:120]]
    train, test = write_jsonl(root / "train.jsonl", rows[:96]), write_jsonl(root / "test.jsonl", rows[96:])
    console = Console(file=open(os.devnull, "w"))
    runs = []
    for name, enabled in (("first", True), ("untracked", False)):
        cfg = validate_config(make_config(
            model={"name": tiny_encoder}, data={"train": str(train), "test": str(test)}, method={"name": "lora"},
            train={"max_steps": 2}, track={"enabled": enabled}, output={"dir": str(root / "runs"), "name": name}))
        runs.append(run_training(cfg, console=console)[0])
    return root, runs, f"sqlite:///{(root / 'runs' / 'mlflow.db').resolve()}"


def tunelab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


def test_register_alias_list_show_lineage(trained):
    root, (first, _), uri = trained
    mv = registry.register(first.path, "sentiment", uri)
    assert str(mv.version) == "1" and mv.run_id == first.manifest()["mlflow"]["run_id"]
    assert mv.tags["technique"] == "lora" and mv.tags["task"] == "classification"
    assert mv.tags["data.train.sha256"] == sha256(first.manifest()["data"]["train"]["path"])
    assert float(mv.tags["test.accuracy"]) == pytest.approx(json.loads((first.path / "metrics.json").read_text())
                                                            ["eval"]["accuracy"], abs=1e-5)
    assert registry.set_alias("sentiment@champion", "1", uri) == (None, "1")
    assert str(registry.register(first.path, "sentiment", uri).version) == "2"
    assert registry.set_alias("sentiment@champion", "2", uri) == ("1", "2")  # moving it is one command

    res = tunelab("registry", "alias", "sentiment@champion", "1", "--uri", uri, cwd=root)
    assert res.returncode == 0 and "sentiment@champion: moved from version 2 to 1" in res.stdout
    res = tunelab("registry", "list", "--uri", uri, cwd=root)
    assert res.returncode == 0 and "sentiment" in res.stdout and "champion→v1" in res.stdout
    res = tunelab("registry", "show", "sentiment@champion", "--uri", uri, cwd=root)
    assert res.returncode == 0 and "sentiment version 1" in res.stdout and mv.run_id in res.stdout
    res = tunelab("registry", "lineage", "sentiment@champion", "--uri", uri, cwd=root)
    assert res.returncode == 0, res.stderr
    saved = json.loads((root / "runs" / "lineage" / "sentiment-v1.json").read_text())
    train_file = first.manifest()["data"]["train"]["path"]
    assert saved["data"][0] == {"split": "train", "name": f"{root.name}/train.jsonl", "path": train_file,
                                "sha256": sha256(train_file)}
    assert saved["run"]["run_id"] == mv.run_id and saved["run"]["config"]["method.name"] == "lora"
    assert saved["model_version"]["version"] == "1" and saved["model_version"]["aliases"] == ["champion"]
    # data -> run -> version, top to bottom
    text = res.stdout
    assert text.index(sha256(train_file)) < text.index(mv.run_id) < text.index("sentiment version 1")


@pytest.mark.parametrize("ref, message", [
    ("registry:nope@champion", "no model 'nope'; registered models: sentiment"),
    ("registry:sentiment@staging", "has no alias 'staging'; aliases: champion (v1); versions: 1, 2"),
    ("registry:sentiment/9", "has no version 9; aliases: champion (v1); versions: 1, 2"),
    ("registry:bad name", "is not a registry reference"),
])
def test_bad_references_name_what_exists(trained, ref, message):
    _, _, uri = trained
    with pytest.raises(TunelabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        registry.resolve_reference(ref, uri)


def test_resolves_offline_and_never_reaches_a_hub(trained, monkeypatch):
    from tunelab.inference.trained import TrainedModel

    root, (first, _), uri = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def loopback_only(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail(f"name lookup {a[:2]}"))
    resolved = registry.resolve_reference("registry:sentiment@champion", uri)
    assert resolved.version == "1" and (resolved.path / "config.yaml").is_file()
    assert not (resolved.path / "checkpoints").exists()
    texts = ["a wonderful film", "a dull, empty film"]
    assert TrainedModel(resolved.path).predict(texts) == TrainedModel(first.path).predict(texts)
    # The command line resolves it too, from the store under ./runs
    res = tunelab("predict", "registry:sentiment@champion", "a wonderful film", cwd=root)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["label"] == TrainedModel(first.path).predict(["a wonderful film"])[0]["label"]


def test_an_untracked_run_is_logged_when_registered(trained):
    _, (_, untracked), uri = trained
    assert "mlflow" not in untracked.manifest()
    mv = registry.register(untracked.path, "untracked-model", uri)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(mv.run_id)
    assert run.data.params["output.name"] == "untracked" and "test.accuracy" in run.data.metrics
    assert untracked.manifest()["mlflow"]["run_id"] == mv.run_id  # the run directory links back


def test_an_export_registers_with_its_parity_and_shows_in_lineage(trained):
    root, (first, _), uri = trained
    export = root / "exports" / "sentiment-merged"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"\0" * 16)
    (export / "export.json").write_text(json.dumps({
        "source_run": str(first.path), "format": "merged",
        "parity": {"max_abs_logit_diff": 3.1e-6, "argmax_agreement": 1.0, "passed": True},
    }))
    mv = registry.register(export, "sentiment-merged", uri)
    assert mv.tags["tunelab.kind"] == "export" and mv.tags["export.format"] == "merged"
    assert mv.tags["parity.max_abs_logit_diff"] == "3.1e-06" and mv.tags["parity.passed"] == "1"
    assert mv.run_id == first.manifest()["mlflow"]["run_id"]  # an export's source is its training run
    resolved = registry.resolve_reference(f"registry:sentiment-merged/{mv.version}", uri)
    assert (resolved.path / "export.json").is_file() and resolved.kind == "export"
    registry.record_serving(resolved, "http://127.0.0.1:8000", "sentiment", uri)
    chain = lineage("sentiment@champion", uri)
    assert chain["exports"][0]["folder"] == "sentiment-merged"
    assert chain["exports"][0]["served"][0]["where"] == "http://127.0.0.1:8000"
    text = "\n".join(format_lineage(chain))
    assert "sentiment-merged  format merged  registered as sentiment-merged/1" in text
    assert "http://127.0.0.1:8000 as 'sentiment'" in text


def test_register_refuses_what_is_not_a_finished_model(trained, tmp_path):
    _, _, uri = trained
    with pytest.raises(TunelabError, match="neither a run directory"):
        registry.register(tmp_path, "x", uri)
    with pytest.raises(TunelabError, match="no MLflow store at"):
        registry.resolve_reference("registry:x@champion", f"sqlite:///{tmp_path / 'missing.db'}")

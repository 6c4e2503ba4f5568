"""A run directory cannot switch on remote code: only `--trust-remote-code` on the command line can.

A run directory is data (downloaded, shared, pulled from a registry). If its config.yaml could set
model.trust_remote_code, loading it for eval, predict, generate, batch or serve would run whatever Python the
model repository it names ships. Checked at the one place every load passes: the keyword arguments that reach
transformers' from_pretrained.
"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.config import validate_config
from tunelab.models import loading
from tunelab.train.run import run_training

from conftest import make_config


@pytest.fixture
def hostile_run(tmp_path, monkeypatch, tiny_encoder, sentiment_files):
    """A finished run whose config.yaml asks for remote code, and a list of what each load passed."""
    monkeypatch.chdir(tmp_path)
    train, test = sentiment_files
    raw = make_config(
        model={"name": tiny_encoder, "dropout": 0.0},
        data={"train": str(train), "test": str(test), "max_length": 32, "max_train_samples": 16},
        method={"name": "lora", "rank": 4},
        train={"max_steps": 1},
        output={"dir": "runs", "name": "downloaded"},
    )
    run, _ = run_training(validate_config(raw))
    config = yaml.safe_load(run.config_path.read_text())
    config["model"]["trust_remote_code"] = True  # what a hostile or careless run directory could say
    run.config_path.write_text(yaml.safe_dump(config))

    seen: list[bool] = []
    real = loading._pretrained_kwargs

    def spy(cfg):
        kwargs = real(cfg)
        seen.append(kwargs["trust_remote_code"])
        return kwargs

    monkeypatch.setattr(loading, "_pretrained_kwargs", spy)
    return run.path, test, seen


def test_eval_predict_and_generate_ignore_the_run_directorys_setting(hostile_run):
    from tunelab.cli import app

    path, test, seen = hostile_run
    runner = CliRunner()
    for args in (["predict", str(path), "a fine film"], ["eval", str(path), "--data", str(test)]):
        seen.clear()
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert seen and not any(seen), args  # every from_pretrained call: config, tokenizer, model
        seen.clear()
        result = runner.invoke(app, [*args, "--trust-remote-code"])
        assert result.exit_code == 0, result.output
        assert seen and all(seen), args  # ... and the flag does reach them
    # generate takes the same path (cli/run.py load_trained); this classification run refuses it after loading
    seen.clear()
    result = runner.invoke(app, ["generate", str(path), "hello"])
    assert seen and not any(seen)
    assert "generate needs a causal_lm or instruction run" in str(result.exception or result.output)


def test_serve_and_batch_ignore_the_run_directorys_setting(hostile_run, tmp_path):
    from tunelab.serve.batch_job import run_batch
    from tunelab.serve.registry import ModelRegistry
    from tunelab.serve.state import ServeSettings, ServerState

    path, _, seen = hostile_run
    served = ModelRegistry().load("m", path)
    assert seen and not any(seen) and served.trained.cfg.model.trust_remote_code is False
    seen.clear()
    ModelRegistry(trust_remote_code=True).load("m", path)
    assert seen and all(seen)
    # `tunelab serve` builds its registry from its settings; the default is off
    assert ServerState(ServeSettings()).registry.trust_remote_code is False
    assert ServerState(ServeSettings(trust_remote_code=True)).registry.trust_remote_code is True

    seen.clear()
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"id": "1", "text": "a fine film"}\n')
    run_batch(path, inputs, tmp_path / "out.jsonl")
    assert seen and not any(seen)

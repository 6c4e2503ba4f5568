"""`tunelab sweep` on the tiny encoder: a full sweep, a sweep killed mid-trial and resumed, bad sweep keys."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from tunelab.config import load_config, validate_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments.sweep import STUDY_NAME, load_sweep, run_sweep
from tunelab.experiments.sweep.search import _pruning_hook
from tunelab.train.run import run_training

from conftest import make_config


@pytest.fixture
def sweep_file(tmp_path, monkeypatch, tiny_encoder, sentiment_files):
    """Write a sweep file over the tiny encoder (a trial takes a second or two); returns its path."""
    monkeypatch.chdir(tmp_path)
    train, _ = sentiment_files

    def write(name="sweep", **sweep):
        raw = make_config(
            model={"name": tiny_encoder, "dropout": 0.0},
            data={"train": str(train), "validation_split": 0.25, "max_length": 32, "max_train_samples": 32},
            method={"name": "lora", "dropout": 0.0},
            train={"max_steps": 4, "eval_every": 2, "batch_size": 8, "precision": "fp32", "log_every": 2, "seed": 0},
            output={"dir": "sweeps", "name": name},
        )
        raw["sweep"] = {
            "trials": 3,
            "metric": "accuracy",
            "space": {
                "method.rank": {"type": "int", "low": 2, "high": 8, "log": True},
                "train.lr": {"type": "float", "low": "1e-4", "high": "1e-2", "log": True},
                "method.target_modules": {"type": "categorical", "choices": [["query", "value"], "all-linear"]},
            },
            **sweep,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


def _trials(sweep_dir):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{sweep_dir / 'study.db'}").trials


@pytest.mark.slow  # over a minute on 2 busy cores; `make test-slow` runs it
def test_sweep_completes_with_best_config_table_and_plots(sweep_file):
    path = sweep_file(trials=2)
    sweep_dir = run_sweep(str(path), [], None)
    assert len(_trials(sweep_dir)) == 2
    # The same file again (same output.name) continues the study; a raised budget adds exactly one trial.
    assert run_sweep(str(path), ["sweep.trials=3"], None) == sweep_dir
    trials = _trials(sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.intermediate_values.keys() == {2, 4} for t in trials)  # the on_eval hook reported to optuna
    for t in trials:
        manifest = json.loads((sweep_dir / f"trial-{t.number:03d}" / "manifest.json").read_text())
        assert manifest["status"] == "completed" and t.user_attrs["run_dir"] == str(sweep_dir / f"trial-{t.number:03d}")

    best = load_config(sweep_dir / "best_config.yaml")  # loads as a plain run config
    best_trial = max(trials, key=lambda t: t.value)
    assert best.train.lr == pytest.approx(best_trial.params["train.lr"])
    assert best.method.rank == best_trial.params["method.rank"]
    assert best.output.dir == "sweeps" and best.output.name is None
    assert best.method.target_modules in (["query", "value"], "all-linear")

    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete"] * 3 and {"accuracy", "train.lr", "run_dir"} <= rows[0].keys()
    assert (sweep_dir / "history.png").stat().st_size > 1000
    assert (sweep_dir / "importance.png").stat().st_size > 1000

    with pytest.raises(TunelabError, match=r"holds a different sweep \(changed: train.max_steps\)"):
        run_sweep(str(path), ["sweep.trials=3", "train.max_steps=6"], None)


def test_median_pruner_stops_a_trial_worse_than_earlier_ones(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file())
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    # an earlier trial that was perfect at every validation
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={2: 1.0, 4: 1.0}))
    trial = study.ask()
    raw = sweep.trial_raw({}, "sweeps", "pruned")
    with pytest.raises(optuna.TrialPruned, match="validation accuracy .* at step 2 is worse than the median"):
        run_training(validate_config(raw), on_eval=_pruning_hook(trial, "accuracy"))
    manifest = json.loads((tmp_path / "sweeps" / "pruned" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("TrialPruned")


KILLED_RUN = """
import os, sys, time
from tunelab.train import run as run_module
from tunelab.experiments.sweep import run_sweep

real = run_module.run_training

def slow_second_trial(cfg, resume_dir=None, console=None, on_eval=None):
    def stall(step, metrics):
        open("trial-001-started", "w").close()
        time.sleep(120)  # killed here, mid-trial

    return real(cfg, resume_dir, console, stall if cfg.output.name == "trial-001" else on_eval)

run_module.run_training = slow_second_trial
run_sweep(sys.argv[1], ["sweep.trials=2"], None)
"""


def test_killed_sweep_resumes_without_repeating_finished_trials(sweep_file, tmp_path):
    path = sweep_file("killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "trial-001-started").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "trial 1 never started"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    sweep_dir = tmp_path / "sweeps" / "killed"
    before = _trials(sweep_dir)
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    trial0_started = json.loads((sweep_dir / "trial-000" / "manifest.json").read_text())["started"]

    run_sweep(None, [], str(sweep_dir))  # the directory alone: sweep.yaml holds the sweep

    after = _trials(sweep_dir)
    states = [t.state.name for t in after]
    assert len(after) == 3 and states.count("COMPLETE") + states.count("PRUNED") == 2
    assert after[0].datetime_start == before[0].datetime_start and after[0].value == before[0].value
    assert json.loads((sweep_dir / "trial-000" / "manifest.json").read_text())["started"] == trial0_started
    assert states[1] == "FAIL"  # the killed trial ...
    retry = after[2]  # ... runs again first, with the same params
    assert retry.user_attrs["retry_of"] == 1 and retry.params == before[1].params
    assert [t.user_attrs.get("retry_of") for t in after].count(1) == 1
    assert sorted(p.name for p in sweep_dir.glob("trial-*")) == [f"trial-{t.number:03d}" for t in after]
    assert json.loads((sweep_dir / "trial-001" / "manifest.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trails": 3}, "sweep key 'sweep.trails' is not known; valid keys here: metric, pruner, space, trials"),
        ({"space": {"train.lr": {"type": "loguniform", "low": 1, "high": 2}}},
         ("sweep key 'sweep.space.train.lr.type': unknown parameter type 'loguniform'; "
          "choose one of: int, float, categorical")),
        ({"space": {"train.lr": {"low": 1, "high": 2}}}, "sweep key 'sweep.space.train.lr' needs a type"),
        ({"space": {"train.lrr": {"type": "float", "low": 1e-5, "high": 1e-3}}},
         "sweep key 'sweep.space.train.lrr' = 1e-05: config key 'train.lrr' is not known"),
        ({"space": {"method.num_virtual_tokens": {"type": "int", "low": 4, "high": 8}}},
         "config key 'method.num_virtual_tokens' is not known"),
        ({"space": {"train.batch_size": {"type": "int", "low": 0, "high": 8}}},
         "sweep key 'sweep.space.train.batch_size' = 0: config key 'train.batch_size'"),
        ({"space": {"method.rank": {"type": "int", "low": 8, "high": 4}}},
         "sweep key 'sweep.space.method.rank': low (8) must be below high (4)"),
        ({"space": {"method.rank": {"type": "int", "low": 2, "high": 8, "lg": True}}},
         "sweep key 'sweep.space.method.rank.lg' is not known; valid keys here: high, log, low, step, type"),
        ({"space": {"output.name": {"type": "categorical", "choices": ["a"]}}}, "the sweep sets output itself"),
        ({"metric": "perplexity"}, "'perplexity' is not a classification metric; choose one of: accuracy"),
        ({"pruner": "hyperband"}, "sweep key 'sweep.pruner'"),
    ],
)
def test_bad_sweep_keys_are_one_line_errors(sweep_file, change, message):
    path = sweep_file()
    raw = yaml.safe_load(path.read_text())
    raw["sweep"].update(change)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sweep_needs_a_validation_split(sweep_file):
    path = sweep_file()
    with pytest.raises(ConfigError, match="scores each trial on a validation split"):
        load_sweep(path, ["data.validation_split=0"])
    with pytest.raises(ConfigError, match="median pruning compares periodic validation scores"):
        load_sweep(path, ["train.eval_every=null", "sweep.pruner=median"])
    assert load_sweep(path, ["train.eval_every=null"]).section.pruner == "none"

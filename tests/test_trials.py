"""The experiment runner (experiments/trials.py): each trial in its own process, so each reports its own peak."""

import json

import yaml

from tunelab.config import validate_config
from tunelab.experiments.sweep import run_sweep, search
from tunelab.train.run import run_training

from conftest import make_config


def _peak(run_dir) -> int:
    return json.loads((run_dir / "metrics.json").read_text())["train"]["peak_memory_bytes"]


def test_a_later_sweep_trial_does_not_report_an_earlier_larger_peak(tmp_path, monkeypatch, tiny_encoder,
                                                                     sentiment_files):
    """Trial 0 fully fine-tunes MiniLM (22.7M weights, with their gradients and AdamW state: ~0.4 GB), trial 1
    a 2-layer, 32-wide encoder. The peak is the process's high-water mark (ru_maxrss): run in one process, the
    small trial would report the large one's peak. Each in a process of its own, it reports its own."""
    monkeypatch.chdir(tmp_path)
    train, _ = sentiment_files
    raw = make_config(
        model={"name": tiny_encoder, "dropout": 0.0},
        data={"train": str(train), "validation_split": 0.25, "max_length": 32, "max_train_samples": 32},
        train={"max_steps": 2, "batch_size": 8},
        output={"dir": "sweeps", "name": "peaks"},
    )
    big, small = "minilm-l6", tiny_encoder
    raw["sweep"] = {"trials": 2, "metric": "accuracy", "pruner": "none",
                    "space": {"model.name": {"type": "categorical", "choices": [big, small]}}}
    (tmp_path / "peaks.yaml").write_text(yaml.safe_dump(raw))

    real_study = search._study

    def larger_first(sweep, sweep_dir):  # the sampler's order is its own: fix it, the larger trial first
        study = real_study(sweep, sweep_dir)
        for name in (big, small):
            study.enqueue_trial({"model.name": name})
        return study

    monkeypatch.setattr(search, "_study", larger_first)
    sweep_dir = run_sweep(str(tmp_path / "peaks.yaml"), [], None)
    large, later = _peak(sweep_dir / "trial-000"), _peak(sweep_dir / "trial-001")
    print(f"peaks, a process per trial: {large / 2**20:,.0f} MiB then {later / 2**20:,.0f} MiB")  # pytest -s
    assert later < large - 100 * 2**20, (large, later)

    # The negative control: the same two runs one after the other in this one process.
    del raw["sweep"]
    first = run_training(validate_config({**raw, "model": {"name": big}, "output": {"dir": "one", "name": "a"}}))
    second = run_training(validate_config({**raw, "model": {"name": small}, "output": {"dir": "one", "name": "b"}}))
    print(f"peaks, one process: {_peak(first[0].path) / 2**20:,.0f} MiB then {_peak(second[0].path) / 2**20:,.0f} MiB")
    assert _peak(second[0].path) >= _peak(first[0].path)

"""Multi-task training on the tiny encoder: the sampling strategies' arithmetic, a two-task run whose task
folders reload to the accuracy it recorded, one adapter shared by both, a head each, and config refusals."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_config
from test_merge import lora_run, task_files

from tunelab.config import ConfigError, MultiTaskConfig, load_multitask_config
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir
from tunelab.train.multitask import task_probabilities, task_schedule, train_multitask


@pytest.mark.parametrize("strategy, temperature, want", [
    ("proportional", 2.0, {"big": 0.9, "small": 0.1}),
    ("temperature", 2.0, {"big": 0.75, "small": 0.25}),  # sqrt(900) : sqrt(100) = 30 : 10
    ("round_robin", 2.0, {"big": 0.5, "small": 0.5}),
])
def test_task_probabilities(strategy, temperature, want):
    got = task_probabilities({"big": 900, "small": 100}, strategy, temperature)
    assert got == pytest.approx(want)


def test_task_schedule_is_seeded_and_round_robin_alternates():
    sizes = {"a": 900, "b": 100}
    assert task_schedule(sizes, "round_robin", 1.0, 5, 0) == ["a", "b", "a", "b", "a"]
    drawn = task_schedule(sizes, "proportional", 1.0, 2000, 7)
    assert drawn == task_schedule(sizes, "proportional", 1.0, 2000, 7)
    assert 0.87 < drawn.count("a") / 2000 < 0.93


def multitask_raw(folder, tiny_encoder, **extra) -> dict:
    raw = make_config(model={"name": tiny_encoder, "dropout": 0.0}, method={"name": "lora", "rank": 4},
                      train={"max_steps": 6, "batch_size": 8, "lr": 2e-2, "log_every": 1},
                      output={"dir": str(folder), "name": "both"})
    raw.pop("data")
    tasks = []
    for name, source in (("reviews", "sst2-test"), ("questions", "trec")):
        train, test = task_files(folder, name, source)
        tasks.append({"name": name, "data": {"train": str(train), "test": str(test), "max_length": 32}})
    raw["tasks"] = tasks
    raw["sampling"] = {"strategy": "round_robin"}
    raw.update(extra)
    return raw


def test_two_tasks_share_one_adapter_and_reload_to_their_recorded_accuracy(tmp_path, tiny_encoder):
    from tunelab.inference.trained import TrainedModel
    from tunelab.report.adapters_report import write_multitask_report

    (tmp_path / "alone").mkdir()
    baseline = lora_run(tmp_path / "alone", "reviews", tiny_encoder, "sst2-test")  # same rows, another folder
    other = lora_run(tmp_path / "alone", "questions", tiny_encoder, "trec")
    with pytest.raises(TunelabError, match="contents differ"):  # a baseline tested on other data is refused
        train_multitask(MultiTaskConfig.model_validate(multitask_raw(tmp_path, tiny_encoder,
                                                                     baselines={"reviews": str(other)})))
    raw = multitask_raw(tmp_path, tiny_encoder, baselines={"reviews": str(baseline)})
    folder = train_multitask(MultiTaskConfig.model_validate(raw))
    metrics = json.loads(folder.metrics_path.read_text())
    assert metrics["recipe"]["steps_per_task"] == {"reviews": 3, "questions": 3}
    assert folder.task_names() == ["questions", "reviews"]
    adapters = {}
    for name in ("reviews", "questions"):
        run = RunDir(folder.task_dir(name))
        model = TrainedModel(run.path)
        test = str(tmp_path / f"{name}-test.jsonl")
        assert model.evaluate_file(test)["accuracy"] == pytest.approx(metrics["tasks"][name]["accuracy"])
        adapters[name] = (run.model_files.backbone / "adapter_model.safetensors").read_bytes()
        assert len(run.labels()) == (2 if name == "reviews" else len(model.labels))
    assert adapters["reviews"] == adapters["questions"]  # one shared adapter
    assert metrics["tasks"]["reviews"]["single_task_run"] == str(baseline)
    assert "single_task_accuracy" not in metrics["tasks"]["questions"]
    report = write_multitask_report(folder.path).read_text()
    assert "| reviews |" in report and (folder.plots_dir / "multitask.png").is_file()


def test_multitask_config_refusals_are_one_line(tmp_path, tiny_encoder):
    raw = multitask_raw(tmp_path, tiny_encoder)
    cases = [
        ({"train": {**raw["train"], "max_steps": None}}, "train.max_steps is required with tasks"),
        ({"tasks": raw["tasks"][:1]}, "tasks"),
        ({"tasks": [raw["tasks"][0], raw["tasks"][0]]}, "two tasks share a name"),
        ({"baselines": {"spam": "runs/x"}}, "spam is not a task name"),
        ({"sampling": {"strategy": "uniform"}}, "sampling.strategy"),
    ]
    for change, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(ConfigError, match=message) as info:
            load_multitask_config(path)
        assert "\n" not in str(info.value)

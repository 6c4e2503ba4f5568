"""Multi-task training on the tiny encoder: the sampling strategies' arithmetic, a two-task run whose task
folders reload to the accuracy it recorded, one adapter shared by both, a head each, the same with an adapter per
task (each step watched: it changes only its own task's adapter and head), and config refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import make_config
from test_merge import lora_run, task_files

from tunelab.config import ConfigError, MultiTaskConfig, load_multitask_config
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir
from tunelab.train import multitask
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
    assert metrics["recipe"]["sharing"] == "shared_adapter"  # the default
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
    assert "one shared adapter, one head per task" in report and "`shared_adapter`" in report


def watch_steps(monkeypatch) -> list[tuple[str, str | None, set[str]]]:
    """Wrap every multi-task step; record (task, its adapter, the tensors the step changed), over the whole
    backbone (the base included) and every head seen so far, compared bitwise."""
    real, heads, record = multitask._train_step, {}, []

    def tensors(backbone) -> dict:
        found = {f"backbone.{k}": v.detach().clone() for k, v in backbone.state_dict().items()}
        for name, head in heads.items():
            found.update({f"head.{name}.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        return found

    def watched(method, backbone, task, *args):
        heads[task.name] = task.model.head
        before = tensors(backbone)
        loss = real(method, backbone, task, *args)
        after = tensors(backbone)
        record.append((task.name, task.adapter, {k for k, v in before.items() if not torch.equal(v, after[k])}))
        return loss

    monkeypatch.setattr(multitask, "_train_step", watched)
    return record


def per_task_raw(folder, tiny_encoder, **extra) -> dict:
    # Weight decay and a decaying schedule on: a task whose weights an optimizer still touched on other tasks'
    # steps (a zero gradient, old momentum) would move.
    raw = multitask_raw(folder, tiny_encoder, **{"sharing": "adapter_per_task", **extra})
    raw["train"].update(weight_decay=0.1, scheduler="linear", warmup_ratio=0.0)
    return raw


def test_adapter_per_task_saves_each_task_its_own_adapter_that_reloads_to_the_recorded_accuracy(tmp_path,
                                                                                                tiny_encoder):
    from safetensors.torch import load_file

    from tunelab.inference.trained import TrainedModel
    from tunelab.report.adapters_report import write_multitask_report

    folder = train_multitask(MultiTaskConfig.model_validate(per_task_raw(tmp_path, tiny_encoder)))
    metrics = json.loads(folder.metrics_path.read_text())
    assert metrics["recipe"]["sharing"] == "adapter_per_task"
    assert json.loads(folder.recipe_path.read_text())["sharing"] == "adapter_per_task"
    adapters, heads = {}, {}
    for name in ("reviews", "questions"):
        run = RunDir(folder.task_dir(name))
        files = run.model_files
        # only this task's adapter, at the top of the folder, as the default adapter a single-task run writes
        assert sorted(p.name for p in files.backbone.iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]
        adapters[name] = load_file(str(files.backbone / "adapter_model.safetensors"))
        heads[name] = load_file(str(files.head))
        assert all(".task1." not in k and ".default." not in k for k in adapters[name])
        assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapters[name].items())  # trained
        model = TrainedModel(run.path)
        # the load took every saved tensor (PEFT would leave a key it does not recognise at its initial value)
        loaded = {k: v for k, v in model.model.backbone.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(adapters[name])
        assert all(torch.equal(loaded[k.replace(".weight", ".default.weight")], t) for k, t in adapters[name].items())
        test = str(tmp_path / f"{name}-test.jsonl")
        assert model.evaluate_file(test)["accuracy"] == pytest.approx(metrics["tasks"][name]["accuracy"])
        assert json.loads(run.metrics_path.read_text())["multitask"]["sharing"] == "adapter_per_task"
    assert adapters["reviews"].keys() == adapters["questions"].keys()
    different = [k for k in adapters["reviews"] if not torch.equal(adapters["reviews"][k], adapters["questions"][k])]
    assert len(different) == len(adapters["reviews"])  # every tensor its own, none shared
    # what the optimizers updated is exactly the two adapters and the two heads
    saved = sum(t.numel() for d in (*adapters.values(), *heads.values()) for t in d.values())
    assert metrics["train"]["trainable_params"] == saved
    report = write_multitask_report(folder.path).read_text()
    assert "one adapter and one head per task" in report and "`adapter_per_task`" in report


def test_a_step_of_one_task_leaves_the_other_tasks_adapter_and_head_bitwise_unchanged(tmp_path, tiny_encoder,
                                                                                      monkeypatch):
    record = watch_steps(monkeypatch)
    train_multitask(MultiTaskConfig.model_validate(per_task_raw(tmp_path, tiny_encoder)))
    assert [(name, adapter) for name, adapter, _ in record] == [("reviews", "default"), ("questions", "task1")] * 3
    for step, (name, adapter, changed) in enumerate(record, 1):
        assert changed, f"step {step} ({name}) changed nothing"
        strays = [k for k in changed if not (k.startswith(f"head.{name}.") or f".{adapter}." in k)]
        assert not strays, f"step {step} ({name}) changed what it does not own: {strays[:3]}"
        assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("head.") for k in changed)

    # Negative control: the same watch on one shared adapter sees both tasks' steps change the same tensors.
    record.clear()
    raw = per_task_raw(tmp_path, tiny_encoder, sharing="shared_adapter", output={"dir": str(tmp_path), "name": "s"})
    raw["train"]["max_steps"] = 2  # one step of each task is enough to see it
    train_multitask(MultiTaskConfig.model_validate(raw))
    touched = {"reviews": set(), "questions": set()}
    for name, adapter, changed in record:
        assert adapter is None
        touched[name] |= {k for k in changed if k.startswith("backbone.")}
    assert touched["reviews"] & touched["questions"]


def test_multitask_config_refusals_are_one_line(tmp_path, tiny_encoder):
    raw = multitask_raw(tmp_path, tiny_encoder)
    cases = [
        ({"train": {**raw["train"], "max_steps": None}}, "train.max_steps is required with tasks"),
        ({"tasks": raw["tasks"][:1]}, "tasks"),
        ({"tasks": [raw["tasks"][0], raw["tasks"][0]]}, "two tasks share a name"),
        ({"baselines": {"spam": "runs/x"}}, "spam is not a task name"),
        ({"sampling": {"strategy": "uniform"}}, "sampling.strategy"),
        ({"sharing": "per_task"}, "sharing"),
        # techniques that cannot keep a named adapter per task on one base are refused at load, naming the key
        ({"sharing": "adapter_per_task", "method": {"name": "full"}},
         "sharing: adapter_per_task .* method 'full' cannot .* use one of lora, dora, qlora, ia3, prompt, prefix"),
        ({"sharing": "adapter_per_task", "method": {"name": "adapter"}}, "sharing: adapter_per_task .* 'adapter'"),
    ]
    for change, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(ConfigError, match=message) as info:
            load_multitask_config(path)
        assert "\n" not in str(info.value)

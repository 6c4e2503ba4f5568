"""tunelab merge on tiny adapters: a one-adapter linear merge is that adapter (logits to 1e-5), every PEFT
method runs and gives a loadable run per task, merges PEFT or tunelab cannot do are refused in one line and
leave no folder behind, and the evaluation table scores base, own adapter and merged adapter per task."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import DATA, write_jsonl
from serve_helpers import train_run

from tunelab.adapters.merge import METHODS, merge_runs
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir

TEXTS = ["a gripping , funny and moving film", "what is the capital of peru ?", "dull and far too long",
         "call now to win a free prize"]


def task_files(folder, name: str, source: str, n: int = 48):
    """n training and 16 test rows of a bundled set. SST-2's train file is mostly phrases ("gates", "amused"),
    its test file whole sentences: "sst2-test" draws both from the latter."""
    source, _, split = source.partition("-")
    rows = [json.loads(line) for line in (DATA / source / f"{split or 'train'}.jsonl").read_text().splitlines()[:n + 16]]
    return write_jsonl(folder / f"{name}-train.jsonl", rows[:n]), write_jsonl(folder / f"{name}-test.jsonl", rows[n:])


def lora_run(folder, name, model, source, method=None, **train):
    train_file, test_file = task_files(folder, name, source)
    # lr high enough that 3 steps move the adapter visibly off the base (B starts at zero)
    return train_run(folder, name, model, "classification", method or {"name": "lora", "rank": 4}, train_file,
                     test_file, train={"lr": 2e-2, "max_steps": 3, **train})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder):
    folder = tmp_path_factory.mktemp("merge-runs")
    return {
        "sentiment": lora_run(folder, "sentiment", tiny_encoder, "sst2"),
        "questions": lora_run(folder, "questions", tiny_encoder, "trec"),
        "rank2": lora_run(folder, "rank2", tiny_encoder, "trec", {"name": "lora", "rank": 2}),
        "ia3": lora_run(folder, "ia3", tiny_encoder, "sst2", {"name": "ia3"}),
        "dora": lora_run(folder, "dora", tiny_encoder, "sst2", {"name": "lora", "rank": 4, "use_dora": True}),
        "folder": folder,
    }


def logits(model, texts=TEXTS) -> torch.Tensor:
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model.model(enc["input_ids"], enc["attention_mask"]).logits


def test_linear_merge_of_one_adapter_with_weight_1_reproduces_its_logits(runs, tmp_path):
    from tunelab.inference.trained import TrainedModel

    folder = merge_runs([runs["sentiment"]], "linear", [1.0], None, tmp_path / "one", evaluate=False)
    source = TrainedModel(runs["sentiment"])
    merged = TrainedModel(folder.task_dir("sentiment"))
    want, got = logits(source), logits(merged)
    assert source.precision == "fp32" and want.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-5
    # negative controls: the adapter really moves the logits, and a weight of 0.5 really changes the merge
    with source.model.backbone.disable_adapter():
        assert (logits(source) - want).abs().max().item() > 1e-3
    half = merge_runs([runs["sentiment"]], "linear", [0.5], None, tmp_path / "half", evaluate=False)
    assert (logits(TrainedModel(half.task_dir("sentiment"))) - want).abs().max().item() > 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_each_method_merges_two_adapters_into_a_run_per_task(runs, tmp_path, method):
    from tunelab.inference.trained import TrainedModel

    folder = merge_runs([runs["sentiment"], runs["questions"]], method, None, None, tmp_path / method,
                        evaluate=False)
    assert folder.task_names() == ["questions", "sentiment"]
    recipe = folder.recipe()
    assert recipe["method"] == method and recipe["weights"] == [0.5, 0.5]
    assert recipe["density"] == (0.5 if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else None)
    heads = {}
    for name, source in (("sentiment", runs["sentiment"]), ("questions", runs["questions"])):
        task = RunDir(folder.task_dir(name))
        assert task.is_complete() and task.labels() == RunDir(source).labels()
        model = TrainedModel(task.path)
        out = logits(model)
        assert torch.isfinite(out).all() and out.shape[1] == len(task.labels())
        # the backbone is the merge, not the source: its logits differ from the source adapter's
        assert (out - logits(TrainedModel(source))).abs().max().item() > 1e-6
        heads[name] = json.loads((task.path / "model" / "backbone" / "adapter_config.json").read_text())["r"]
    assert heads["sentiment"] == (8 if method == "cat" else 4)  # cat stacks the ranks


def test_merge_evaluates_base_source_and_merged_on_every_task_and_reports(runs, tmp_path):
    from tunelab.report.adapters_report import write_merge_report

    folder = merge_runs([runs["sentiment"], runs["questions"]], "ties", [0.7, 0.3], 0.6, tmp_path / "ties", seed=3)
    table = json.loads(folder.metrics_path.read_text())["tasks"]
    for name in ("sentiment", "questions"):
        row = table[name]
        assert row["metric"] == "accuracy"
        assert {"base", "source", "merged"} <= set(row) and row["merged"]["num_examples"] == 16
        assert row["delta"] == pytest.approx(row["merged"]["accuracy"] - row["source"]["accuracy"])
        task_metrics = json.loads(RunDir(folder.task_dir(name)).metrics_path.read_text())
        assert task_metrics["eval"]["accuracy"] == row["merged"]["accuracy"]
    report = write_merge_report(folder.path).read_text()
    assert "| sentiment | accuracy |" in report and (folder.plots_dir / "merge.png").stat().st_size > 1000


def expect_refusal(tmp_path, match, *args, **kwargs):
    out = tmp_path / "refused"
    with pytest.raises(TunelabError, match=match) as info:
        merge_runs(*args, output=out, evaluate=False, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".refused*"))  # nothing half-written left behind


def test_refusals_are_one_line_and_leave_nothing(runs, tmp_path, tiny_encoder):
    s, q = runs["sentiment"], runs["questions"]
    expect_refusal(tmp_path, "different techniques", [s, runs["ia3"]], method="linear", weights=None, density=None)
    expect_refusal(tmp_path, "plain LoRA adapters only", [runs["ia3"]], method="linear", weights=None, density=None)
    expect_refusal(tmp_path, "DoRA", [s, runs["dora"]], method="linear", weights=None, density=None)
    expect_refusal(tmp_path, "PEFT cannot merge .* same r", [s, runs["rank2"]], method="ties", weights=None,
                   density=None)
    expect_refusal(tmp_path, "2 values for 1 runs", [s], method="linear", weights=[1, 1], density=None)
    expect_refusal(tmp_path, "--density applies to", [s, q], method="linear", weights=None, density=0.3)
    expect_refusal(tmp_path, "not one of", [s, q], method="average", weights=None, density=None)
    other_base = runs["folder"] / "other-base"
    if not other_base.exists():
        shutil.copytree(tiny_encoder, other_base)
    moved = lora_run(runs["folder"], "other", str(other_base), "sst2")
    expect_refusal(tmp_path, "different base models", [s, moved], method="linear", weights=None, density=None)


def test_merge_of_different_ranks_works_with_cat_and_svd(runs, tmp_path):
    for method in ("cat", "svd"):
        folder = merge_runs([runs["sentiment"], runs["rank2"]], method, None, None, tmp_path / method, evaluate=False)
        assert folder.task_names() == ["rank2", "sentiment"]


def test_a_merge_folder_stands_for_its_task_run_or_names_them(runs, tmp_path):
    from tunelab.cli.run import resolve_source

    one = merge_runs([runs["sentiment"]], "linear", None, None, tmp_path / "one", evaluate=False)
    assert resolve_source(one.path) == one.task_dir("sentiment")
    two = merge_runs([runs["sentiment"], runs["questions"]], "svd", None, None, tmp_path / "two", evaluate=False)
    with pytest.raises(TunelabError, match="merges 2 tasks, each with its own head: give one of"):
        resolve_source(two.path)
    assert resolve_source(runs["sentiment"]) == runs["sentiment"]


@pytest.mark.slow  # four CLI subprocesses (~3 min on 2 loaded cores); the paths run in-process above
def test_merge_command_prints_one_line_refusal_and_eval_takes_the_task_run(runs, tmp_path):
    import subprocess
    import sys

    def tunelab(*args):
        return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300)

    bad = tunelab("merge", str(runs["sentiment"]), str(runs["ia3"]), "--method", "ties", "--output",
                  str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "different techniques" in bad.stderr
    folder = tmp_path / "good"
    ok = tunelab("merge", str(runs["sentiment"]), str(runs["questions"]), "--method", "dare_ties", "--weights",
                 "1,1", "--density", "0.7", "--output", str(folder), "--no-eval")
    assert ok.returncode == 0, ok.stderr
    whole = tunelab("eval", str(folder), "--data", str(runs["folder"] / "sentiment-test.jsonl"))
    assert whole.returncode == 2 and "give one of" in whole.stderr
    one = tunelab("eval", str(folder / "tasks" / "sentiment"), "--data", str(runs["folder"] / "sentiment-test.jsonl"))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout[one.stdout.index("{"):])["num_examples"] == 16


def test_output_that_holds_something_else_is_refused_not_replaced(tmp_path):
    """merge/route build rebuild a folder of their own kind, but never replace another folder."""
    from tunelab.adapters.sources import output_folder

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for kind in ("merge", "router"):
        with pytest.raises(TunelabError, match=f"notes exists and is not a {kind} folder; pick another --output"):
            output_folder(other, kind)
    assert (other / "keep.txt").read_text() == "mine"
    fresh = output_folder(tmp_path / "new" / "merged", "merge")  # a new path is fine; its parent is made
    assert fresh.parent.is_dir() and not fresh.exists()

"""`tunelab compare`: same data and budget for every technique, failures reported, one report."""

import json
import re

import pytest
import yaml

from tunelab.experiments.compare import plan_comparison, run_comparison
from tunelab.errors import ConfigError, TunelabError
from tunelab.runtime.run_dir import RunDir

from conftest import make_config


@pytest.fixture
def compare_config(tmp_path, tiny_encoder, sentiment_files):
    train, test = sentiment_files

    def write(**extra):
        raw = make_config(
            model={"name": tiny_encoder, "dropout": 0.0},
            data={"train": str(train), "test": str(test), "max_length": 32, "max_train_samples": 24},
            train={"max_steps": 2, "batch_size": 8},
            output={"dir": str(tmp_path / "runs"), "name": "cmp"},
        )
        raw.update(extra)
        path = tmp_path / "compare.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def test_every_technique_gets_the_same_data_seed_and_budget(compare_config):
    path = compare_config(compare={"methods": ["full", "lora", "prompt"], "per_method": {"lora": {"method": {"rank": 2}}}})
    configs, _ = plan_comparison(path, None, ["train.seed=7"])
    assert list(configs) == ["full", "lora", "prompt"]
    assert configs["lora"].method.rank == 2
    for cfg in configs.values():
        assert cfg.data == configs["full"].data
        assert (cfg.train.seed, cfg.train.max_steps, cfg.train.batch_size) == (7, 2, 8)
        assert cfg.train.lr is None  # each technique keeps its own default learning rate


def test_variants_of_one_technique_by_label(compare_config):
    per = {f"lora-r{r}": {"method": {"name": "lora", "rank": r}} for r in (2, 16)}
    configs, _ = plan_comparison(compare_config(compare={"methods": list(per), "per_method": per}), None, [])
    assert {k: (c.method.name, c.method.rank, c.output.name) for k, c in configs.items()} == {
        "lora-r2": ("lora", 2, "lora-r2"), "lora-r16": ("lora", 16, "lora-r16")
    }


@pytest.mark.parametrize(
    "compare, match",
    [
        ({"methods": ["full", "lora2"]}, "unknown method 'lora2'"),
        ({"methods": ["v1"], "per_method": {"v1": {"method": {"name": "lorra"}}}}, "unknown method 'lorra'"),
        ({"methods": ["lora", "lora"]}, "lists a method twice"),
        ({"methods": ["lora"], "per_method": {"lora": {"method": {"rnk": 4}}}}, "method 'lora'.*'method.rnk' is not known"),
        ({"methodz": ["lora"]}, "compare.methodz"),
        ({"methods": ["evidence"], "per_method": {"evidence": {"method": {"name": "lora"}}}},
         "'evidence' cannot label a technique"),
    ],
)
def test_bad_comparison_config_stops_before_training(compare_config, compare, match):
    with pytest.raises(ConfigError, match=match):
        plan_comparison(compare_config(compare=compare), None, [])


@pytest.mark.slow  # over a minute on 2 busy cores; `make test-slow` runs it
def test_failed_technique_is_reported_and_the_others_still_run(compare_config, tmp_path, capsys):
    from rich.console import Console

    from tunelab.cli.experiments import print_comparison

    # An adapter composed with a run that does not exist cannot start: its row must say why.
    path = compare_config(compare={
        "methods": ["lora", "broken", "ia3"],
        "per_method": {"broken": {"method": {"name": "adapter", "compose_with": [str(tmp_path / "no-such-run")]}}},
    })
    compare_dir, entries = run_comparison(path, None, [], Console(stderr=True))
    status = {e["method"]: e["status"] for e in entries}
    assert status == {"lora": "completed", "broken": "failed", "ia3": "completed"}
    assert "no-such-run" in next(e["error"] for e in entries if e["method"] == "broken")
    # broken stopped before its run directory existed: nothing to keep; the others keep their evidence.
    assert {e["method"]: e["evidence_dir"] for e in entries} == {
        "lora": "evidence/lora", "broken": None, "ia3": "evidence/ia3"}
    rows = json.loads((compare_dir / "comparison.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["method"] for r in rows] == ["lora", "broken", "ia3"]
    for name in ("comparison.md", "comparison.html", "comparison.csv"):
        assert (compare_dir / name).is_file()
    assert "data:image/png;base64," in (compare_dir / "comparison.html").read_text()
    for method in ("lora", "ia3"):
        metrics = json.loads((compare_dir / method / "metrics.json").read_text())
        assert metrics["train"]["steps"] == 2
        # Each technique ran in its own process, so each peak is its own, not the largest so far.
        assert metrics["train"]["peak_memory_bytes"] > 0

    # `tunelab compare` prints the results table itself, not only where the report is.
    capsys.readouterr()
    print_comparison(compare_dir)
    printed = capsys.readouterr().out
    for text in ("accuracy", "peak memory (measured)", "broken", "failed", "Best on quality", "Did not complete"):
        assert text in printed, text
    assert re.search(r"\d MiB|\d GiB", printed), "memory in binary units, not raw bytes"


def test_each_technique_takes_only_the_base_method_knobs_that_apply_to_it(compare_config):
    """A LoRA config compared with full fine-tuning: full gets its defaults (no rank), the LoRA family shares the
    knobs, ia3 keeps its own defaults; per_method still wins."""
    path = compare_config(method={"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "use_dora": False},
                          compare={"per_method": {"qlora": {"method": {"rank": 2}}}})
    configs, _ = plan_comparison(path, ["full", "lora", "dora", "qlora", "ia3"], [])
    assert configs["full"].method.model_dump() == {"name": "full"}
    assert (configs["lora"].method.rank, configs["lora"].method.alpha) == (4, 8)
    assert (configs["dora"].method.rank, configs["dora"].method.alpha, configs["dora"].method.use_dora) == (4, 8, True)
    assert (configs["qlora"].method.rank, configs["qlora"].method.alpha) == (2, 8)
    assert configs["ia3"].method == type(configs["ia3"].method)()  # every knob its default


def test_base_method_knobs_without_a_technique_name_are_one_line(compare_config):
    with pytest.raises(ConfigError, match=r"method\.rank is set but method\.name is not.*compare\.per_method"):
        plan_comparison(compare_config(method={"rank": 4}), ["full", "lora"], [])
    with pytest.raises(ConfigError, match=r"method 'full'.*'method\.rank' is not known.*compare\.per_method\.full\.method"):
        plan_comparison(compare_config(compare={"per_method": {"full": {"method": {"rank": 4}}}}), ["full"], [])


@pytest.fixture
def in_process_trials(monkeypatch):
    """run_trial without a process per technique (fast: torch is already loaded here); records each call."""
    from rich.console import Console

    from tunelab.experiments import compare as compare_module
    from tunelab.train.run import run_training

    calls = []

    def trial(cfg, console, on_eval=None, resume_dir=None):
        calls.append((cfg.output.name, resume_dir is not None))
        return run_training(cfg, resume_dir, Console(stderr=True))[1]

    monkeypatch.setattr(compare_module, "run_trial", trial)
    return calls


def test_rerun_keeps_completed_techniques_and_resumes_the_stopped_one(compare_config, in_process_trials, capsys,
                                                                      monkeypatch):
    from rich.console import Console

    from tunelab.train import loop as loop_module

    per = {"lora": {"train": {"max_steps": 4, "save_every": 2}}}
    path = compare_config(compare={"methods": ["ia3", "lora"], "per_method": per})
    real_save = loop_module.FineTune._save_checkpoint

    def save_then_ctrl_c(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module.FineTune, "_save_checkpoint", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(path, None, [], Console(stderr=True))
    compare_dir = path.parent / "runs" / "cmp"
    assert RunDir(compare_dir / "lora").status() == "interrupted"
    # Evidence is copied once a technique ends: the interrupted one has none yet.
    stopped = compare_dir / "evidence" / "lora"
    assert (compare_dir / "evidence" / "ia3" / "metrics.json").is_file() and not stopped.exists()
    monkeypatch.setattr(loop_module.FineTune, "_save_checkpoint", real_save)
    capsys.readouterr()

    _, entries = run_comparison(path, None, [], Console(stderr=True))
    err = capsys.readouterr().err
    assert in_process_trials == [("ia3", False), ("lora", False), ("lora", True)]
    assert "ia3: completed earlier under the same config and data; kept, not trained again" in err
    assert "lora: the earlier attempt interrupted; resuming it" in err and "resumed from" in err
    assert [(e["method"], e["status"]) for e in entries] == [("ia3", "completed"), ("lora", "completed")]
    assert RunDir(stopped).status() == "completed" and RunDir(stopped).is_complete()

    # Once more: nothing trains at all.
    _, entries = run_comparison(path, None, [], Console(stderr=True))
    assert len(in_process_trials) == 3 and all(e.get("reused") for e in entries)

    # A completed technique is never replaced by another config's run: one line, before anything trains.
    with pytest.raises(TunelabError, match=r"cmp/ia3 completed under another config or data; set output\.name"):
        run_comparison(path, None, ["train.seed=1"], Console(stderr=True))
    assert len(in_process_trials) == 3


def test_a_second_compare_on_the_same_output_is_refused(compare_config, in_process_trials):
    from filelock import FileLock
    from rich.console import Console

    path = compare_config(compare={"methods": ["ia3"]})
    compare_dir = path.parent / "runs" / "cmp"
    compare_dir.mkdir(parents=True)
    with FileLock(str(compare_dir / ".lock")):  # another compare holds it
        with pytest.raises(TunelabError, match="another tunelab compare is running on it"):
            run_comparison(path, None, [], Console(stderr=True))
    assert in_process_trials == []
    run_comparison(path, None, [], Console(stderr=True))  # ... and once it is released, this one runs
    assert in_process_trials == [("ia3", False)]


def test_compare_into_a_folder_that_is_no_comparison_is_refused(compare_config, in_process_trials):
    from rich.console import Console

    path = compare_config(compare={"methods": ["ia3"]})
    (path.parent / "runs" / "cmp").mkdir(parents=True)
    (path.parent / "runs" / "cmp" / "notes.txt").write_text("mine")
    with pytest.raises(TunelabError, match="holds no comparison"):
        run_comparison(path, None, [], Console(stderr=True))


def test_each_technique_leaves_its_manifest_and_metrics_in_the_comparison_folder(compare_config, in_process_trials):
    """The run directories hold the weights and are not committed: evidence/<label>/ keeps the small files that
    show what ran and what it measured, so committing the comparison folder commits them."""
    from rich.console import Console

    path = compare_config(compare={"methods": ["ia3", "lora"]})
    compare_dir, entries = run_comparison(path, None, [], Console(stderr=True))
    assert [e["evidence_dir"] for e in entries] == ["evidence/ia3", "evidence/lora"]
    rows = json.loads((compare_dir / "comparison.json").read_text())["rows"]
    for entry, row in zip(entries, rows):
        kept, run = compare_dir / entry["evidence_dir"], RunDir(entry["run_dir"])
        assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "manifest.json", "metrics.json"]
        for name in ("config.yaml", "manifest.json", "metrics.json"):
            assert (kept / name).read_bytes() == (run.path / name).read_bytes(), name
        assert json.loads((kept / "metrics.json").read_text())["eval"]["accuracy"] == row["accuracy"]
        assert row["evidence_dir"] == entry["evidence_dir"]
    assert not list((compare_dir / "evidence").glob(".*.tmp"))  # copied whole, nothing half-written left
    assert "config, manifest and metrics copied to evidence/lora/" in (compare_dir / "comparison.md").read_text()

"""`tunelab compare`: same data and budget for every technique, failures reported, one report."""

import json
import re

import pytest
import yaml

from tunelab.experiments.compare import plan_comparison, run_comparison
from tunelab.errors import ConfigError

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
    ],
)
def test_bad_comparison_config_stops_before_training(compare_config, compare, match):
    with pytest.raises(ConfigError, match=match):
        plan_comparison(compare_config(compare=compare), None, [])


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

import pytest

from tunelab.config import apply_overrides, load_config, parse_override, validate_config
from tunelab.errors import ConfigError

from conftest import REPO, make_config


def test_shipped_configs_load():
    """Every config we ship validates: run configs, comparison files and sweep files alike."""
    import yaml

    from tunelab.config import is_multitask, load_multitask_config
    from tunelab.experiments.compare import plan_comparison
    from tunelab.experiments.sweep import load_sweep

    for path in sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "examples").rglob("*.yaml")]):
        raw = yaml.safe_load(path.read_text())
        if "compare" in raw:
            plan_comparison(path, None, [])
        elif "sweep" in raw:
            load_sweep(str(path))
        elif is_multitask(raw):
            load_multitask_config(path)
        elif "task" in raw:
            load_config(path)


def test_dotted_overrides_are_typed():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("method.target_modules=[query,value]") == (["method", "target_modules"], ["query", "value"])
    raw = apply_overrides(make_config(), ["train.batch_size=4", "method.name=lora", "method.rank=16"])
    cfg = validate_config(raw)
    assert cfg.train.batch_size == 4 and cfg.method.name == "lora" and cfg.method.rank == 16


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.lrr=1"], "config key 'train.lrr' is not known; valid keys here: batch_size"),
        (["method.name=lorax"], "unknown method 'lorax'; choose one of: full, lora"),
        (["train.scheduler=step"], "config key 'train.scheduler': Input should be 'linear', 'cosine' or 'constant'"),
        (["method.name=lora", "method.rnak=4"], "config key 'method.rnak' is not known; valid keys here: alpha"),
        (["train.batch_size=0"], "config key 'train.batch_size'"),
        (["data.validation_split=0.1", "data.validation=v.jsonl"], "set data.validation or data.validation_split"),
        (["lr=3"], "config key 'lr' is not known"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(apply_overrides(make_config(), overrides))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classification\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_override("train.lr")

"""Every technique through the same run: train a few steps, save, reload, and get the same numbers.

One row per technique (table-driven), on the tiny encoder (classification) and the tiny decoder
(instruction tuning), so a new technique is one more row.
"""

import sys

import pytest

from tunelab.config import validate_config
from tunelab.errors import ConfigError
from tunelab.inference.trained import TrainedModel
from tunelab.train.run import run_training

from conftest import make_config, write_jsonl

METHODS = [
    {"name": "full"},
    {"name": "lora", "rank": 4, "dropout": 0.0},
    {"name": "dora", "rank": 4, "dropout": 0.0},
    {"name": "qlora", "rank": 4, "dropout": 0.0},
    {"name": "ia3"},
    {"name": "prompt", "num_virtual_tokens": 4},
    {"name": "prompt", "num_virtual_tokens": 4, "init": "text", "init_text": "Is this review positive?"},
    {"name": "prefix", "num_virtual_tokens": 4},
    {"name": "adapter", "reduction_factor": 4},
]


def _id(method: dict) -> str:
    return method["name"] + ("-text" if method.get("init") == "text" else "")


def _instruction_files(tmp_path):
    words = ["apple", "river", "stone", "cloud", "music", "green", "light", "paper"]
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}."} for w in words * 4]
    return write_jsonl(tmp_path / "train.jsonl", rows[:24]), write_jsonl(tmp_path / "test.jsonl", rows[24:])


@pytest.fixture
def run_method(tmp_path, monkeypatch, tiny_encoder, tiny_decoder, sentiment_files):
    monkeypatch.chdir(tmp_path)

    def run(method: dict, task: str):
        if task == "classification":
            train, test = sentiment_files
            rows = test.read_text().splitlines()[:16]  # evaluate_file reads the whole file: keep it small
            test.write_text("\n".join(rows) + "\n")
            model = tiny_encoder
        else:
            train, test = _instruction_files(tmp_path)
            model = tiny_decoder
        raw = make_config(
            task=task,
            model={"name": model, "dropout": 0.0},
            # SmolLM2's chat template adds a ~30-token system prompt: instruction rows need room beyond it.
            data={"train": str(train), "test": str(test), "max_length": 32 if task == "classification" else 64,
                  "max_train_samples": 24},
            method=method,
            train={"max_steps": 3, "batch_size": 8},
            eval={"num_samples": 0},
            output={"dir": "runs", "name": f"{_id(method)}-{task}"},
        )
        return run_training(validate_config(raw)), test

    return run


@pytest.mark.parametrize("task", ["classification", "instruction"])
@pytest.mark.parametrize("method", METHODS, ids=_id)
def test_technique_trains_saves_and_reloads(run_method, method, task):
    (run, metrics), test = run_method(method, task)
    train = metrics["train"]
    if method["name"] == "full":
        assert train["trainable_percent"] == pytest.approx(100.0)
    else:
        assert 0 < train["trainable_percent"] < 25, "a parameter-efficient technique trained too much"

    # The saved artifact (safetensors only) rebuilds the trained model: same held-out loss after reloading.
    assert not list((run.path / "model").rglob("*.bin")) and not list((run.path / "model").rglob("*.pt"))
    reloaded = TrainedModel(run.path).evaluate_file(str(test))
    assert reloaded["loss"] == pytest.approx(metrics["eval"]["loss"], abs=1e-5)

    if task == "instruction":
        # No task head here: only the technique's own weights can have moved the loss away from the base's.
        assert abs(metrics["eval"]["loss"] - metrics["eval_untuned"]["loss"]) > 1e-4


def test_qlora_without_bitsandbytes_is_one_clear_line(run_method, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ConfigError, match="qlora' needs bitsandbytes") as err:
        run_method({"name": "qlora"}, "classification")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists(), "no run directory for a run that never started"


@pytest.mark.parametrize("method", [m for m in METHODS if m["name"] != "qlora"], ids=_id)
def test_save_writes_the_given_state_dict_not_the_module(tiny_encoder, tmp_path, method):
    """Under FSDP/ZeRO-3 the module holds shards; the run passes the gathered weights as state_dict and the
    method must write those. Shift every gathered tensor by 1 and check the reloaded weights carry the shift."""
    import torch
    from transformers import AutoModel

    from pydantic import TypeAdapter

    from tunelab.config import MethodConfig
    from tunelab.methods import get_method

    cfg = TypeAdapter(MethodConfig).validate_python(method)
    technique = get_method(cfg.name)
    backbone = technique.apply(AutoModel.from_pretrained(tiny_encoder), cfg, "classification")
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    gathered = {k: v + 1.0 if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    technique.save(backbone, tmp_path / "saved", state_dict=gathered)

    reloaded = technique.load(AutoModel.from_pretrained(tiny_encoder), tmp_path / "saved")
    weights = dict(reloaded.named_parameters())
    for name in trained:
        assert torch.equal(weights[name], gathered[name]), name

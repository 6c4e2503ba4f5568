"""Correctness of the loop on tiny models: accumulation, resume, learning, EOS."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import validate_config
from tunelab.train import loop as loop_module
from tunelab.train.run import run_training

from conftest import make_config, write_jsonl


def _weights(run_path) -> dict[str, torch.Tensor]:
    model = run_path / "model"
    out = {f"head.{k}": v for k, v in load_file(model / "head.safetensors").items()}
    for f in (model / "backbone").glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"parameter {k} differs")


@pytest.fixture
def tiny_run(tmp_path, monkeypatch, tiny_encoder, sentiment_files):
    monkeypatch.chdir(tmp_path)
    train, test = sentiment_files

    def run(name, **sections):
        raw = make_config(
            model={"name": tiny_encoder, "dropout": 0.0},
            data={"train": str(train), "test": str(test), "max_length": 32, "max_train_samples": 32},
            output={"dir": "runs", "name": name},
        )
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value}
        return run_training(validate_config(raw))

    return run


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "rank": 4, "dropout": 0.0}])
def test_grad_accumulation_matches_full_batch(tiny_run, method):
    common = {"group_by_length": False, "max_steps": 4, "lr": 1e-3, "max_grad_norm": None}
    full, _ = tiny_run(f"b8-{method['name']}", method=method, train={**common, "batch_size": 8, "grad_accum": 1})
    accum, _ = tiny_run(f"b2x4-{method['name']}", method=method, train={**common, "batch_size": 2, "grad_accum": 4})
    before = tiny_run(f"b8-{method['name']}-0", method=method, train={**common, "batch_size": 8, "lr": 1e-12})[0]
    _assert_same(_weights(full.path), _weights(accum.path), atol=2e-6)
    # ... and the check can fail: the trained weights moved well beyond that tolerance.
    moved = max((a - b).abs().max().item() for a, b in zip(_weights(full.path).values(), _weights(before.path).values()))
    assert moved > 1e-4


def test_resumed_run_equals_uninterrupted(tiny_run, monkeypatch):
    sections = {"model": {"dropout": 0.1}, "train": {"max_steps": 6, "save_every": 3, "lr": 1e-3}}
    straight, straight_metrics = tiny_run("straight", **sections)

    real_save = loop_module.FineTune._save_checkpoint

    def save_then_crash(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt  # the user pressed Ctrl-C right after the step-3 checkpoint

    monkeypatch.setattr(loop_module.FineTune, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_run("interrupted", **sections)
    run_path = straight.path.parent / "interrupted"
    assert json.loads((run_path / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run_path / "metrics.json").exists() and not (run_path / "model").exists()
    assert [p.name for p in (run_path / "checkpoints").iterdir()] == ["step-000003"]

    monkeypatch.setattr(loop_module.FineTune, "_save_checkpoint", real_save)
    cfg = validate_config(__import__("yaml").safe_load((run_path / "config.yaml").read_text()))
    resumed, resumed_metrics = run_training(cfg, resume_dir=str(run_path))
    _assert_same(_weights(straight.path), _weights(resumed.path), atol=1e-6)
    assert resumed_metrics["train"]["steps"] == straight_metrics["train"]["steps"] == 6
    assert json.loads((run_path / "manifest.json").read_text())["status"] == "completed"


def test_run_directory_records(tiny_run):
    run, metrics = tiny_run("records", train={"max_steps": 3})
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "metrics.json", "labels.json"):
        assert (run.path / name).is_file(), name
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["data"]["train"]["sha256"]) == 64
    assert manifest["packages"]["torch"] and manifest["seed"] == 0
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(x["real_tokens_per_s"] > 0 for x in lines)
    saved = json.loads((run.path / "metrics.json").read_text())
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "confusion_matrix", "per_class"):
        assert key in saved["eval"]
    for key in ("wall_s", "real_tokens_per_s", "peak_memory_bytes", "trainable_params"):
        assert saved["train"][key] > 0
    assert sum(map(sum, saved["eval"]["confusion_matrix"])) == saved["eval"]["num_examples"] == 80


def test_instruction_tuning_learns_to_stop_at_eos(tmp_path, monkeypatch, tiny_decoder):
    """A random-init decoder never emits EOS on purpose; after tuning it must end its answers with it."""
    monkeypatch.chdir(tmp_path)
    rows = [
        {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}."}
        for w in ("apple", "river", "stone", "cloud")
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = make_config(
        task="instruction",
        model={"name": tiny_decoder},
        data={"train": str(train), "test": str(train), "max_length": 128},
        train={"batch_size": 4, "max_steps": 60, "lr": 5e-3, "warmup_ratio": 0.0, "log_every": 20},
        eval={"num_samples": 4, "max_new_tokens": 24},
    )
    _, metrics = run_training(validate_config(raw))
    assert metrics["eval"]["loss"] < 0.5 * metrics["eval_untuned"]["loss"]
    for sample in metrics["samples"]:
        assert sample["stopped_at_eos"], sample
        assert sample["completion"].strip() == sample["reference"]


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "rank": 4, "dropout": 0.0}])
def test_gradient_checkpointing_changes_memory_not_math(tmp_path, monkeypatch, tiny_decoder, method):
    """Recomputing activations in backward must give the same weights as keeping them."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"The number {i} follows {i - 1} and comes before {i + 1}."} for i in range(16)]
    train = write_jsonl(tmp_path / "lm.jsonl", rows)

    def run(name, checkpointing):
        raw = make_config(
            task="causal_lm",
            model={"name": tiny_decoder, "gradient_checkpointing": checkpointing},
            data={"train": str(train), "max_length": 32},
            method=method,
            train={"batch_size": 4, "max_steps": 3, "lr": 1e-3},
            output={"dir": "runs", "name": name},
        )
        return run_training(validate_config(raw))[0]

    plain, checkpointed = run("plain", False), run("ckpt", True)
    load = lambda p: {k: v for f in (p / "model" / "backbone").glob("*.safetensors") for k, v in load_file(f).items()}
    _assert_same(load(plain.path), load(checkpointed.path), atol=1e-5)


@pytest.mark.slow  # compiling the tiny model takes ~1 minute on 2 cores
def test_compiled_backbone_trains_the_same_weights(tiny_run):
    """train.compile fuses kernels; it must not change the math (beyond float reassociation), and the saved
    names must stay the module's own (compile in place, no _orig_mod. prefix)."""
    plain, _ = tiny_run("plain", train={"max_steps": 3})
    compiled, _ = tiny_run("compiled", train={"max_steps": 3, "compile": True})
    _assert_same(_weights(plain.path), _weights(compiled.path), atol=1e-5)


def test_attention_kernels_train_the_same_weights(tiny_run):
    sdpa, _ = tiny_run("sdpa", train={"max_steps": 2}, model={"attention": "sdpa"})
    eager, _ = tiny_run("eager", train={"max_steps": 2}, model={"attention": "eager"})
    assert (sdpa.manifest()["attention"], eager.manifest()["attention"]) == ("sdpa", "eager")
    _assert_same(_weights(sdpa.path), _weights(eager.path), atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_flash_attention_without_a_gpu_is_one_line_before_any_run_directory(tiny_run, tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="flash_attention_2 runs on CUDA GPUs only") as err:
        tiny_run("flash", model={"attention": "flash_attention_2"})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs" / "flash").exists()

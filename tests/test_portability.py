"""The same suite on every CPU: AVX2-only, AVX512-BF16 and AMX hosts.

What differs by host is chosen from the CPU's flags, so each test here sets the flags itself (monkeypatch)
and runs every branch on whichever machine runs the suite:

- tunelab's precision: `auto` resolves to bf16 only where bf16 is native, and a run's recorded precision is
  used again by resume, eval, predict, generate and serve (with one line where this host can't);
- bitsandbytes' 4-bit layers: on an AVX512-BF16 CPU bitsandbytes 0.50 converts them at eval time to a packed
  inference-only layout that breaks on small layers and has no backward; tunelab turns that conversion off
  (methods/bitsandbytes_support.py), and QLoRA must train, evaluate, save and reload on both branches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.config import validate_config
from tunelab.errors import ConfigError
from tunelab.inference.trained import TrainedModel
from tunelab.runtime import hardware
from tunelab.train import loop as loop_module
from tunelab.train.run import run_training

from conftest import make_config, write_jsonl

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})  # e.g. AMD EPYC Rome/Milan
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}  # AVX-512 without bf16 (Skylake-SP, Ice Lake)
AVX512_BF16 = AVX512 | {"avx512_bf16"}  # e.g. AMD EPYC Genoa, Intel Cooper Lake
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}  # Intel Sapphire Rapids and later
HOSTS = {"avx2": AVX2, "avx512": AVX512, "avx512_bf16": AVX512_BF16, "amx": AMX}


@pytest.fixture
def cpu_host(monkeypatch):
    """host(name): make this process believe it runs on that CPU, with no GPU."""

    def host(name: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: HOSTS[name])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    return host


# (host, requested) -> resolved; None = a one-line ConfigError
RESOLVE = [
    ("avx2", "auto", "fp32"), ("avx512", "auto", "fp32"), ("avx512_bf16", "auto", "bf16"), ("amx", "auto", "bf16"),
    *[(h, "fp32", "fp32") for h in HOSTS],
    *[(h, "bf16", "bf16") for h in HOSTS],  # asked for by name: the user's choice, even where it is emulated
    *[(h, "fp16", None) for h in HOSTS],  # fp16 autocast is a GPU feature
]


@pytest.mark.parametrize("host, requested, resolved", RESOLVE)
def test_resolve_precision_for_each_cpu(cpu_host, host, requested, resolved):
    cpu_host(host)
    if resolved is None:
        with pytest.raises(ConfigError, match="'fp16' needs a CUDA GPU"):
            hardware.resolve_precision(requested)
    else:
        assert hardware.resolve_precision(requested) == resolved


@pytest.mark.parametrize("bf16_supported, resolved", [(True, "bf16"), (False, "fp16")])
def test_resolve_precision_on_a_gpu(monkeypatch, bf16_supported, resolved):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: AVX2)  # the host CPU does not matter beside a GPU
    assert hardware.resolve_precision("auto") == resolved
    assert hardware.resolve_precision("fp16") == "fp16"


def test_a_run_records_which_host_it_ran_on(cpu_host):
    """Every manifest's hardware block names the flags that chose its paths, so a result says its host."""
    cpu_host("avx2")
    assert hardware.describe()["cpu_isa"] == ["avx2", "fma"]
    cpu_host("amx")
    assert {"avx512_bf16", "amx_bf16"} <= set(hardware.describe()["cpu_isa"])
    assert hardware.describe()["cpu_fast_bf16"] is True


# (recorded in the run, host) -> (used here, whether a note is printed)
REUSE = [
    ("fp32", "avx2", "fp32", False), ("fp32", "amx", "fp32", False),  # never re-resolved to bf16 on a bf16 host
    ("bf16", "avx512_bf16", "bf16", False), ("bf16", "amx", "bf16", False),
    ("bf16", "avx2", "fp32", True), ("bf16", "avx512", "fp32", True),  # emulated bf16: fp32, said in one line
    ("fp16", "amx", "fp32", True),  # a GPU run on a CPU
    (None, "avx2", "fp32", False), (None, "amx", "bf16", False),  # a run from before precision was recorded
]


@pytest.mark.parametrize("recorded, host, used, noted", REUSE)
def test_a_runs_recorded_precision_is_used_again(cpu_host, recorded, host, used, noted):
    cpu_host(host)
    precision, note = hardware.precision_for_run(recorded, "auto")
    assert precision == used
    assert (note is not None) == noted
    if note:
        assert "\n" not in note and recorded in note and "using fp32" in note


# ---------------------------------------------------------------- a run carries its precision


def _new_accelerator_state() -> None:
    """Accelerate keeps one mixed-precision setting per process; each run here is a fresh process's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@pytest.fixture(autouse=True)
def _leave_no_bf16_state_behind():
    yield
    _new_accelerator_state()  # the next test (or module) starts in the fp32 every other test expects


@pytest.fixture
def auto_run(tmp_path, monkeypatch, tiny_encoder, sentiment_files):
    """A tiny classification run with train.precision: auto (resolved on the host cpu_host set)."""
    monkeypatch.chdir(tmp_path)
    train, test = sentiment_files

    def run(name: str, **train_section):
        _new_accelerator_state()
        raw = make_config(
            model={"name": tiny_encoder, "dropout": 0.0},
            data={"train": str(train), "test": str(test), "max_length": 32, "max_train_samples": 16},
            train={"precision": "auto", "max_steps": 2, "batch_size": 8, **train_section},
            output={"dir": "runs", "name": name},
        )
        return run_training(validate_config(raw))

    return run, test


def test_eval_and_predict_use_the_precision_the_run_trained_in(cpu_host, auto_run, capsys):
    from tunelab.cli.run import load_trained

    run, test = auto_run
    cpu_host("avx2")
    fp32_run, fp32_metrics = run("fp32-run")
    cpu_host("avx512_bf16")
    bf16_run, bf16_metrics = run("bf16-run")
    assert json.loads((fp32_run.path / "manifest.json").read_text())["precision"] == "fp32"
    assert json.loads((bf16_run.path / "manifest.json").read_text())["precision"] == "bf16"
    assert (fp32_metrics["train"]["precision"], bf16_metrics["train"]["precision"]) == ("fp32", "bf16")

    # On a bf16 host, the fp32 run is still evaluated in fp32: the same loss it recorded, not a bf16 one.
    model = TrainedModel(fp32_run.path)
    assert (model.precision, model.precision_note) == ("fp32", None)
    assert model.evaluate_file(str(test))["loss"] == pytest.approx(fp32_metrics["eval"]["loss"], abs=1e-6)
    assert TrainedModel(bf16_run.path).precision == "bf16"

    # On an AVX2 host the bf16 run can't be honoured natively: fp32, and one line on stderr says so.
    cpu_host("avx2")
    capsys.readouterr()
    model = load_trained(bf16_run.path, trust_remote_code=False)
    assert model.precision == "fp32"
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and "trained in bf16" in lines[0] and "using fp32" in lines[0]
    # ... and no line where there is nothing to say
    load_trained(fp32_run.path, trust_remote_code=False)
    assert capsys.readouterr().err.strip() == ""


@pytest.mark.parametrize("started, resumed_on, used", [("avx2", "amx", "fp32"), ("avx512_bf16", "avx2", "fp32")])
def test_a_resumed_run_keeps_its_precision(cpu_host, auto_run, monkeypatch, started, resumed_on, used):
    """An fp32 run resumed on a bf16 host stays fp32; a bf16 run resumed on an AVX2 host goes on in fp32, and
    its manifest keeps the precision it started in beside the one it was resumed in."""
    run, _ = auto_run
    real_save = loop_module.FineTune._save_checkpoint

    def save_then_crash(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt

    cpu_host(started)
    monkeypatch.setattr(loop_module.FineTune, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run("resumed", max_steps=4, save_every=2)
    monkeypatch.setattr(loop_module.FineTune, "_save_checkpoint", real_save)
    run_path = Path("runs/resumed").resolve()
    first = json.loads((run_path / "manifest.json").read_text())["precision"]
    cfg = validate_config(yaml.safe_load((run_path / "config.yaml").read_text()))
    cpu_host(resumed_on)
    _new_accelerator_state()
    _, metrics = run_training(cfg, resume_dir=str(run_path))
    assert metrics["train"]["precision"] == used
    manifest = json.loads((run_path / "manifest.json").read_text())
    assert manifest["precision"] == first  # what the run started in
    assert manifest.get("resumed_in_precision") == (None if first == used else used)


# ---------------------------------------------------------------- bf16 autocast really runs


def test_bf16_autocast_changes_the_step_and_fp32_is_bitwise_reproducible(auto_run, cpu_host):
    """The loss of a bf16-autocast step differs from the fp32 step's (autocast is applied in the training
    step, not only at evaluation), while two fp32 runs give bitwise the same losses and weights."""
    from safetensors.torch import load_file

    run, _ = auto_run
    cpu_host("avx2")
    results = {name: run(name, precision=p, max_steps=3)
               for name, p in [("fp32-a", "fp32"), ("fp32-b", "fp32"), ("bf16", "bf16")]}

    def losses(name):
        lines = (results[name][0].path / "metrics.jsonl").read_text().splitlines()
        return [x["loss"] for x in map(json.loads, lines) if "loss" in x and "split" not in x]

    def weights(name):
        return load_file(results[name][0].path / "model" / "backbone" / "model.safetensors")

    assert losses("fp32-a") == losses("fp32-b")  # exactly: same seed, same threads, same order
    a, b = weights("fp32-a"), weights("fp32-b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Step 1 sees the same weights and batch in both: only the arithmetic differs.
    assert losses("bf16")[0] != losses("fp32-a")[0]
    assert abs(losses("bf16")[0] - losses("fp32-a")[0]) < 0.05  # ... by rounding, not by a different model
    assert results["bf16"][1]["train"]["precision"] == "bf16"


# ---------------------------------------------------------------- QLoRA on both bitsandbytes CPU paths


@pytest.fixture(params=["avx2", "avx512_bf16"])
def bnb_cpu_path(request, monkeypatch):
    """bitsandbytes decides per layer, when the layer is built, from has_avx512bf16(): set its answer."""
    bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param == "avx512_bf16")
    return request.param


def _packed_layers(model) -> int:
    return sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
               for m in model.modules() if type(m).__name__ == "Linear4bit")


def _instruction_files(tmp_path):
    words = ["apple", "river", "stone", "cloud", "music", "green", "light", "paper"]
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}."} for w in words * 3]
    return write_jsonl(tmp_path / "itrain.jsonl", rows[:16]), write_jsonl(tmp_path / "itest.jsonl", rows[16:])


@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_qlora_trains_evaluates_saves_and_reloads_on_both_cpu_paths(
        bnb_cpu_path, task, tmp_path, monkeypatch, tiny_encoder, tiny_decoder, sentiment_files):
    monkeypatch.chdir(tmp_path)
    if task == "classification":
        train, test = sentiment_files
        test.write_text("".join(test.read_text().splitlines(keepends=True)[:16]))
    else:
        train, test = _instruction_files(tmp_path)
    raw = make_config(
        task=task, model={"name": tiny_encoder if task == "classification" else tiny_decoder, "dropout": 0.0},
        data={"train": str(train), "test": str(test), "max_length": 32 if task == "classification" else 64,
              "max_train_samples": 16},
        method={"name": "qlora", "rank": 4, "dropout": 0.0},
        # eval_every: a validation pass mid-run, where bitsandbytes would convert and lose the gradient
        train={"max_steps": 3, "batch_size": 8, "eval_every": 1},
        eval={"num_samples": 0},
        output={"dir": "runs", "name": f"qlora-{task}-{bnb_cpu_path}"},
    )
    raw["data"]["validation_split"] = 0.25
    run, metrics = run_training(validate_config(raw))
    reloaded = TrainedModel(run.path)
    layers = [m for m in reloaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers, "the base was not quantized"
    assert reloaded.evaluate_file(str(test))["loss"] == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    assert _packed_layers(reloaded.model) == 0  # evaluation ran the training layout on either path
    # The adapters trained at every step, evaluations between them included.
    steps = [x for x in map(json.loads, (run.path / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in x]
    assert len(steps) == 3 and all(s["grad_norm"] and s["grad_norm"] > 0 for s in steps)


def test_the_avx512_path_is_really_taken_when_not_turned_off(monkeypatch):
    """Negative control for the test above: with the flag set and tunelab's switch not applied, an evaluation
    converts the layer, and on a 32-wide layer fails as it did for users (absmax reshaped to [32, 0])."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    from tunelab.methods.bitsandbytes_support import keep_4bit_layers_trainable

    def layer():
        torch.manual_seed(0)
        out = bnb.nn.Linear4bit(32, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        out.weight = bnb.nn.Params4bit(torch.randn(32, 32), requires_grad=False, quant_type="nf4")
        return out.to("cpu").eval()

    x = torch.randn(2, 32)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"shape '\[32, 0\]' is invalid"):
        layer()(x)
    kept = layer()
    assert keep_4bit_layers_trainable(kept) == 1
    with torch.no_grad():
        assert kept(x).shape == (2, 32)
    assert not kept.weight.quant_state.__dict__.get("packing_format_for_cpu", False)

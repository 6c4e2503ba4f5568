"""Several processes train like one: DDP over 2 CPU processes (gloo) against one process with the same global batch.

2 processes x batch_size B must see, step by step, the same examples as 1 process x batch_size 2B (the batch
plan is one of global batches, each split across the processes), and the loss normalisation must make their
gradients equal. Both runs then end with the same loss and the same weights, up to float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.config import validate_config
from tunelab.train.run import run_training

from conftest import make_config, write_jsonl

# A script, not `-m tunelab train` twice: the two processes then pay the torch/transformers import once for both
# techniques. It still goes through the CLI's own entry point.
LAUNCHED = "import sys\nfrom tunelab.cli import app\nfor cfg in sys.argv[1:]:\n    app(['train', cfg], standalone_mode=False)\n"

CASES = {
    # full fine-tuning, random batches; 36 rows = 4 global batches of 8 and a short one of 4 (steps 5)
    "full": dict(method={"name": "full"}, train={"batch_size": 4, "grad_accum": 1, "group_by_length": False}),
    # LoRA with length grouping and accumulation: no_sync on the first micro-batch, sync on the second
    "lora": dict(
        method={"name": "lora", "rank": 4, "dropout": 0.0},
        train={"batch_size": 2, "grad_accum": 2, "group_by_length": True},
    ),
    # Instruction tuning, 21 rows of different lengths: the ranks hold different token counts in every
    # micro-batch, an epoch is 5 global batches of 4 and one of 1 row (rank 0 runs a stand-in there, see
    # FineTune._micro_batches), and its last accumulation step has one micro-batch, not two.
    "lora-instruction": dict(
        task="instruction",
        method={"name": "lora", "rank": 4, "dropout": 0.0},
        train={"batch_size": 2, "grad_accum": 2, "group_by_length": True},
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_path: Path) -> dict[str, torch.Tensor]:
    model = run_path / "model"
    head = model / "head.safetensors"
    out = {f"head.{k}": v for k, v in load_file(head).items()} if head.is_file() else {}
    for f in (model / "backbone").glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _train_losses(run_path: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_path / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "split" not in x]


def _raw_config(name, case, models, files, processes) -> dict:
    task = case.get("task", "classification")
    train, test = files[task]
    raw = make_config(
        task=task,
        model={"name": models[task], "dropout": 0.0},
        data={"train": str(train), "test": str(test), "max_length": 32 if task == "classification" else 64,
              "max_train_samples": 36},
        eval={"num_samples": 0, "untuned": False},
        method=case["method"],
        track={"enabled": True},  # checked below: a DDP run is one MLflow run
        output={"dir": "runs", "name": name},
    )
    batch = case["train"]["batch_size"] * (2 // processes)  # one process takes both processes' share
    raw["train"] = {**raw["train"], **case["train"], "batch_size": batch, "max_steps": 5, "lr": 2e-3,
                    "max_grad_norm": None, "warmup_ratio": 0.0}
    return raw


@pytest.mark.slow  # over a minute on 2 busy cores; `make test-slow` runs it
def test_ddp_two_processes_match_one(tmp_path, monkeypatch, tiny_encoder, tiny_decoder, sentiment_files):
    from test_accumulation_lm import lm_rows

    monkeypatch.chdir(tmp_path)
    rows = lm_rows("instruction")
    instruction = write_jsonl(tmp_path / "i-train.jsonl", rows), write_jsonl(tmp_path / "i-test.jsonl", rows[:8])
    files = {"classification": sentiment_files, "instruction": instruction}
    models = {"classification": tiny_encoder, "instruction": tiny_decoder}
    configs = []
    for method, case in CASES.items():
        path = tmp_path / f"ddp-{method}.yaml"
        path.write_text(yaml.safe_dump(_raw_config(f"ddp-{method}", case, models, files, processes=2)))
        configs.append(str(path))
    (tmp_path / "launched.py").write_text(LAUNCHED)
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is the torchrun launcher; with no GPU each process gets a CPU and gloo. (`--cpu
    # --num_processes 2` starts ONE process unless an MPI hostfile is given.)
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "launched.py", *configs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    for method, case in CASES.items():
        ddp = tmp_path / "runs" / f"ddp-{method}"
        single, _ = run_training(validate_config(
            _raw_config(f"single-{method}", case, models, files, processes=1)))
        manifest = json.loads((ddp / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["num_processes"] == 2
        # only the main process wrote: one line per step, one run directory per run
        assert len(_train_losses(ddp)) == 5
        assert json.loads((ddp / "metrics.json").read_text())["train"]["num_processes"] == 2

        ddp_losses, single_losses = _train_losses(ddp), _train_losses(single.path)
        assert ddp_losses == pytest.approx(single_losses, rel=0, abs=1e-5), method
        eval_ddp = json.loads((ddp / "metrics.json").read_text())["eval"]
        eval_single = json.loads((single.path / "metrics.json").read_text())["eval"]
        assert eval_ddp["loss"] == pytest.approx(eval_single["loss"], rel=0, abs=1e-5)

        a, b = _weights(ddp), _weights(single.path)
        assert a.keys() == b.keys()
        print(f"{method}: final loss {ddp_losses[-1]:.6f} vs {single_losses[-1]:.6f}, max |weight difference| "
              f"{max((a[k] - b[k]).abs().max().item() for k in a):.2e}")  # seen with pytest -s
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=f"{method}: parameter {k} differs")
        # ... and the check can fail: training moved the weights far beyond that tolerance.
        if method == "full":
            start = load_file(Path(tiny_encoder) / "model.safetensors")
            moved = max((a[k] - start[k]).abs().max().item() for k in start if k in a)
        else:
            moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # LoRA B starts at zero
        assert moved > 1e-3, (method, moved)
        print(f"{method}: largest weight change from the start {moved:.2e}")
    # One run directory per run (no process made its own), beside the MLflow store only the main process wrote
    tracking = {"mlflow.db", "mlartifacts"}
    names = sorted([f"ddp-{m}" for m in CASES] + [f"single-{m}" for m in CASES])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name not in tracking) == names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    logged = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert sorted(r.info.run_name for r in logged) == names  # one MLflow run per run, not one per process

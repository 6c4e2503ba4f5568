"""Accumulation over causal-LM and instruction data: the step's loss is a mean over its target tokens.

The classification tests (test_train.py) have equal micro-batches, so a loop that averaged each micro-batch
and then the micro-batches would pass them. Here rows have different lengths and the file an odd number of
rows, so micro-batches hold different numbers of target tokens, the epoch ends in a short batch, and only a
per-token mean over the whole step (and a step that ends with its epoch) matches one full batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import validate_config
from tunelab.data.batching import batch_plan, collate
from tunelab.models.task_models import IGNORE_INDEX
from tunelab.train import loop as loop_module
from tunelab.train.run import run_training

from conftest import make_config, write_jsonl

WORDS = ["apple", "river", "stone", "cloud", "music", "green", "light"]
ROWS = 21  # odd: the last full-batch step (8, 8, 5) and the last micro-batch (1 row) are short


def lm_rows(task: str) -> list[dict]:
    """Rows whose lengths vary from a few tokens to a few dozen."""
    rows = []
    for i in range(ROWS):
        word, times = WORDS[i % len(WORDS)], 1 + (i * 5) % 9
        if task == "instruction":
            rows.append({"instruction": f"Say {word} {times} times.", "input": "", "output": " ".join([word] * times)})
        else:
            rows.append({"text": f"{word.title()} " + " and ".join([word] * times) + "."})
    return rows


def _weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in (path / "model" / "backbone").glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _losses(path) -> list[float]:
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "split" not in x]


@pytest.fixture
def lm_run(tmp_path, monkeypatch, tiny_decoder):
    monkeypatch.chdir(tmp_path)

    def run(name: str, task: str, method: dict, **train):
        data = write_jsonl(tmp_path / f"{task}.jsonl", lm_rows(task))
        raw = make_config(
            task=task, model={"name": tiny_decoder, "dropout": 0.0},
            data={"train": str(data), "max_length": 64},
            method=method,
            train={"epochs": 2, "lr": 2e-3, "max_grad_norm": None, "warmup_ratio": 0.0, "group_by_length": False,
                   **train},
            eval={"num_samples": 0, "untuned": False},
            output={"dir": "runs", "name": name},
        )
        return run_training(validate_config(raw))

    return run


CASES = [("causal_lm", {"name": "full"}), ("instruction", {"name": "lora", "rank": 4, "dropout": 0.0})]


@pytest.mark.parametrize("task, method", CASES, ids=[c[0] for c in CASES])
def test_lm_accumulation_matches_the_full_batch(lm_run, task, method):
    full, full_metrics = lm_run(f"b8-{task}", task, method, batch_size=8, grad_accum=1)
    accum, accum_metrics = lm_run(f"b2x4-{task}", task, method, batch_size=2, grad_accum=4)
    # 2 epochs of 21 rows: 3 steps each (8 + 8 + 5 rows); accumulation's third step is 3 micro-batches, not 4
    assert full_metrics["train"]["steps"] == accum_metrics["train"]["steps"] == 6
    assert accum_metrics["train"]["real_tokens"] == full_metrics["train"]["real_tokens"]
    a, b = _weights(full.path), _weights(accum.path)
    assert a.keys() == b.keys()
    # Summation order differs (4 small matmuls vs 1 big one), and Adam divides by sqrt(v): a weight with a
    # near-zero gradient moves by up to lr either way. Measured: at most 5e-6 apart after 6 steps at lr 2e-3;
    # the epoch-crossing loop below is more than 1e-4 apart.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0, msg=f"{task}: parameter {k} differs")
    assert _losses(accum.path) == pytest.approx(_losses(full.path), rel=0, abs=1e-5)


def test_the_micro_batches_really_hold_different_token_counts(tiny_decoder):
    """What makes the test above able to fail: a mean per micro-batch would weight these unequally."""
    from tunelab.data.tokenize import tokenize_causal_lm
    from tunelab.models.loading import load_tokenizer
    from tunelab.config import ModelConfig

    tok = load_tokenizer(tiny_decoder, ModelConfig(name=tiny_decoder))
    feats = tokenize_causal_lm([{**r, "where": "x"} for r in lm_rows("causal_lm")], tok, 64)
    plan = batch_plan([len(f["input_ids"]) for f in feats], 2, 0, 0, False)
    counts = [int((collate([feats[i] for i in b], tok.pad_token_id)["labels"][:, 1:] != IGNORE_INDEX).sum())
              for b in plan[:4]]
    assert len(set(counts)) > 1, counts


def test_a_step_that_crossed_into_the_next_epoch_would_not_match(lm_run, monkeypatch):
    """Negative control: grouping grad_accum micro-batches regardless of the epoch (the loop before) puts the
    first micro-batch of epoch 2 into epoch 1's last step, and the weights then differ from the full batch's."""
    task, method = CASES[0]
    full, _ = lm_run("b8", task, method, batch_size=8, grad_accum=1)
    monkeypatch.setattr(loop_module.FineTune, "_next_step",
                        lambda self, micro: [next(micro) for _ in range(self.cfg.train.grad_accum)])
    crossed, _ = lm_run("b2x4-crossed", task, method, batch_size=2, grad_accum=4)
    a, b = _weights(full.path), _weights(crossed.path)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4

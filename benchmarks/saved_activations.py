"""Bytes kept for the backward pass by one training step of the IMDB benchmark's two fastest setups.

    .venv/bin/python benchmarks/saved_activations.py [--batch 16 --length 512]

vs_hf_trainer.py measures peak process RSS, which on CPU also counts what glibc's heap keeps after tensors
are freed. This script counts the tensors themselves: every storage that autograd saves during one forward
pass (torch.autograd.graph.saved_tensors_hooks), for the best HF Trainer setup's model (BERT's stock
classification head, LoRA on query and value, pooler and classifier trained, dropout 0) and for tunelab's
(the same backbone and LoRA, mean pooling and a linear head), on the same full-width batch. If the two are
equal, a difference in peak RSS between the setups is the allocator's, not the step's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def saved_bytes(loss_fn) -> tuple[int, int]:
    """(bytes, storages) saved for backward while loss_fn runs; each storage counted once."""
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()  # the step completes, as in training
    return sum(storages.values()), len(storages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=512)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tunelab.config import validate_config
    from tunelab.methods import get_method
    from tunelab.models.loading import load_task_model, quiet_transformers
    from tunelab.models.registry import resolve_model

    quiet_transformers()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch,))
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "value"]}

    source = resolve_model("minilm-l6")
    hf = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, dtype=torch.float32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    hf = get_peft_model(hf, LoraConfig(**lora, task_type=TaskType.SEQ_CLS, modules_to_save=["classifier", "pooler"]))
    rows = [("best HF Trainer setup", *saved_bytes(lambda: hf(input_ids=ids, attention_mask=mask, labels=labels).loss))]

    cfg = validate_config({
        "task": "classification", "model": {"name": "minilm-l6", "dropout": 0.0},
        "data": {"train": str(ROOT / "data/imdb/train.jsonl"), "max_length": args.length},
        "method": {"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]},
    })
    model, _, _ = load_task_model(cfg.model, cfg.task, num_labels=2)
    model.backbone = get_method("lora").apply(model.backbone, cfg.method, cfg.task)
    rows.append(("tunelab", *saved_bytes(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss_sum)))

    print(f"minilm-l6 LoRA (query, value), one step at batch {args.batch} x {args.length} tokens, fp32:\n")
    print("| setup | saved for backward | storages |\n|---|---:|---:|")
    for name, nbytes, count in rows:
        print(f"| {name} | {nbytes / 2**20:,.0f} MiB | {count} |")


if __name__ == "__main__":
    main()

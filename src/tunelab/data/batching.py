"""Batch plans and padding.

A batch plan is a list of index lists, fixed by (seed, epoch). Because it is a pure function of those two
numbers, a resumed run rebuilds the same plan and skips the batches it already trained on, which is what
makes resumed and uninterrupted runs agree exactly.

Length grouping: random batches of IMDB reviews pad to the longest review in the batch; sorting within
mega-batches of 50 batches makes neighbours similar in length and cuts padding sharply while keeping
the batch order random. Padding goes to a multiple of 8, which tensor cores and AMX tiles like.
"""

from __future__ import annotations

import random

import torch

from tunelab.models.task_models import IGNORE_INDEX

MEGA_BATCH = 50  # batches sorted together; larger = less padding, less randomness


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = batch_size * MEGA_BATCH
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_plan(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sorted by length: evaluation order does not matter, so padding can be almost zero."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(features: list[dict], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch, rounded up to `multiple`.

    Packed rows (data/packing.py) also carry `position_ids`; the padding gets positions 0, 1, ... of its own,
    so the packed-sequence mask sees it as one more sequence, and causal attention never lets a real token
    look ahead into it.
    """
    longest = max(len(f["input_ids"]) for f in features)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    token_labels = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        attention_mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(f["labels"])
    if not token_labels:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor(
            [f["position_ids"] + list(range(width - len(f["position_ids"]))) for f in features], dtype=torch.long
        )
    return batch

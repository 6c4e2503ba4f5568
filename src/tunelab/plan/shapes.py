"""What the estimate knows about the data: the padded batch shapes the run will see (exact when the data can
be read, else from max_length)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.config import RunConfig
from tunelab.models.task_models import IGNORE_INDEX


# ------------------------------------------------------------------------------------------ data shapes


@dataclass
class Batch:
    rows: int
    width: int  # padded sequence length, as collate pads (a multiple of 8)
    targets: int  # positions with a loss target (LM) or rows (classification)


@dataclass
class Shapes:
    train: list[Batch]
    eval: list[Batch]
    mean_tokens: float  # mean real tokens per training row
    target_fraction: float  # LM: share of real tokens that carry a target
    source: str


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def _targets(feature: dict) -> int:
    labels = feature["labels"]
    if isinstance(labels, list):
        return sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    return 1


def data_shapes(cfg: RunConfig, tokenizer=None, features=None) -> Shapes:
    """Micro-batch shapes of the run, from the tokenized data (`features`, a data.pipeline.Features, when the
    caller has them) and the loop's batch plan; max_length shapes when the data cannot be read."""
    try:
        return _shapes_from_data(cfg, tokenizer, features)
    except Exception as err:  # noqa: BLE001 -- a plan still helps without data; say why it fell back
        return shapes_from_max_length(cfg, f"data.max_length (training data not read: {str(err).splitlines()[0]})")


def shapes_from_max_length(cfg: RunConfig, source: str) -> Shapes:
    t, e, length = cfg.train, cfg.eval, cfg.data.max_length
    targets_per_row = length - 1 if cfg.task != "classification" else 1
    has_eval = bool(cfg.data.test or cfg.data.validation)
    return Shapes(
        train=[Batch(t.batch_size, _ceil8(length), t.batch_size * targets_per_row)],
        eval=[Batch(e.batch_size, _ceil8(length), e.batch_size * targets_per_row)] if has_eval else [],
        mean_tokens=float(length),
        target_fraction=1.0,
        source=source,
    )


def _shapes_from_data(cfg: RunConfig, tokenizer, features) -> Shapes:
    from tunelab.data.batching import batch_plan, eval_plan

    if features is None:
        from tunelab.data.examples import load_splits
        from tunelab.data.pipeline import tokenize_splits

        if tokenizer is None:
            from tunelab.models.loading import load_hf_config, load_tokenizer

            source, _ = load_hf_config(cfg.model)
            tokenizer = load_tokenizer(source, cfg.model)
        features = tokenize_splits(load_splits(cfg.data, cfg.task, cfg.train.seed), cfg, tokenizer)
    train = features.train
    lengths = [len(f["input_ids"]) for f in train]
    targets = [_targets(f) for f in train]
    t = cfg.train
    per_epoch = max(1, math.ceil(len(train) / t.batch_size))
    steps = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(per_epoch / t.grad_accum)))  # as train/loop.py
    micro = steps * t.grad_accum
    batches: list[Batch] = []
    epoch = 0
    while len(batches) < micro:
        for idx in batch_plan(lengths, t.batch_size, t.seed, epoch, t.group_by_length):
            batches.append(Batch(len(idx), _ceil8(max(lengths[i] for i in idx)), sum(targets[i] for i in idx)))
            if len(batches) == micro:
                break
        epoch += 1
    evals: list[Batch] = []
    for split in (features.test, features.validation):
        if split:
            split_lengths = [len(f["input_ids"]) for f in split]
            first = eval_plan(split_lengths, cfg.eval.batch_size)[0]  # longest first: the largest batch
            width = _ceil8(max(split_lengths[i] for i in first))
            evals.append(Batch(len(first), width, sum(_targets(split[i]) for i in first)))
    real = sum(lengths)
    fraction = sum(targets) / max(real, 1) if cfg.task != "classification" else 0.0
    seen = "every micro-batch" if micro >= per_epoch else f"the first {micro} micro-batches"
    return Shapes(
        train=batches,
        eval=evals,
        mean_tokens=real / max(len(train), 1),
        target_fraction=fraction,
        source=f"tokenized training set ({len(train)} rows, mean {real / max(len(train), 1):.0f} tokens); "
        f"{seen} of the loop's batch plan",
    )

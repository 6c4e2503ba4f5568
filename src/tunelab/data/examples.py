"""Turn raw records into checked task examples, and build the train/validation/test splits.

All checks run before any model is loaded, so a bad line costs the user seconds, not a training run.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from tunelab.config import DataConfig
from tunelab.data.sources import Record, read_records
from tunelab.errors import DataError

# The fields each task reads, before column mapping. `input` may be empty; the rest may not.
TASK_FIELDS = {
    "classification": ("text", "label"),
    "causal_lm": ("text",),
    "instruction": ("instruction", "input", "output"),
}
MAY_BE_EMPTY = {"input"}
ROLES = ("system", "user", "assistant")


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # classification: index -> name


def _field(record: Record, name: str, columns: dict[str, str], optional: bool = False) -> str:
    column = columns.get(name, name)
    if column not in record.fields or record.fields[column] is None:
        if optional:
            return ""
        hint = f"; set data.columns.{name} to the column that holds it" if column == name else ""
        found = ", ".join(map(str, record.fields)) or "none"
        raise DataError(f"{record.where}: field '{column}' is missing (found: {found}){hint}")
    value = record.fields[column]
    if name == "label" and isinstance(value, bool):
        # Kept as written: `true` in JSON (or Parquet) is the class "true", as "true" in a CSV is. str(int())
        # would make it "1", and a file mixing `true` and 1 would silently merge two spellings.
        value = "true" if value else "false"
    elif name == "label" and isinstance(value, int):
        value = str(value)  # integer class ids are fine; they become names "0", "1", ...
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field '{column}' must be a string, got {type(value).__name__} ({value!r:.40})")
    if not value.strip() and name not in MAY_BE_EMPTY:
        raise DataError(f"{record.where}: field '{column}' is empty")
    return value.strip() if name == "label" else value


def _messages(record: Record, columns: dict[str, str]) -> list[dict]:
    column = columns.get("messages", "messages")
    msgs = record.fields[column]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{record.where}: field '{column}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(
                f"{record.where}: {column}[{i}] must be an object with 'role' ({'/'.join(ROLES)}) and string 'content'"
            )
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{record.where}: the last message in '{column}' must be a non-empty assistant reply")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def to_example(record: Record, task: str, columns: dict[str, str]) -> dict:
    if task == "instruction" and columns.get("messages", "messages") in record.fields:
        return {"messages": _messages(record, columns), "where": record.where}
    example = {
        name: _field(record, name, columns, optional=name in MAY_BE_EMPTY) for name in TASK_FIELDS[task]
    }
    example["where"] = record.where
    return example


def load_examples(source: str, task: str, columns: dict[str, str]) -> list[dict]:
    return [to_example(r, task, columns) for r in read_records(source)]


def _subset(examples: list[dict], limit: int | None, rng: random.Random) -> list[dict]:
    """A seeded shuffle, then the first `limit`. Never `train[:N]` of the file as it lies: a file
    sorted by label would give a single-class sample."""
    examples = examples[:]
    rng.shuffle(examples)
    return examples[:limit] if limit else examples


def _stratified_split(examples: list[dict], fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    by_label: dict[str, list[dict]] = {}
    for ex in examples:
        by_label.setdefault(ex.get("label", ""), []).append(ex)
    train, held = [], []
    for group in by_label.values():
        n_held = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held += group[:n_held]
        train += group[n_held:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def _check_labels(splits: Splits, cfg: DataConfig) -> None:
    counts = Counter(ex["label"] for ex in splits.train)
    if len(counts) < 2:
        (only,) = counts
        raise DataError(
            f"{cfg.train}: all {len(splits.train)} training examples have label '{only}'; a classifier needs at "
            "least two classes (is the file sorted by label and cut short?)"
        )
    known = set(counts)
    for ex in splits.validation + splits.test:
        if ex["label"] not in known:
            raise DataError(
                f"{ex['where']}: label '{ex['label']}' never appears in the training data "
                f"(training labels: {', '.join(sorted(known))})"
            )


def load_splits(cfg: DataConfig, task: str, seed: int) -> Splits:
    rng = random.Random(seed)
    train = _subset(load_examples(cfg.train, task, cfg.columns), cfg.max_train_samples, rng)
    validation: list[dict] = []
    if cfg.validation:
        validation = _subset(load_examples(cfg.validation, task, cfg.columns), cfg.max_eval_samples, rng)
    elif cfg.validation_split:
        train, validation = _stratified_split(train, cfg.validation_split, rng)
    test = _subset(load_examples(cfg.test, task, cfg.columns), cfg.max_eval_samples, rng) if cfg.test else []
    splits = Splits(train, validation, test)
    if task == "classification":
        _check_labels(splits, cfg)
        splits.labels = sorted({ex["label"] for ex in train})
    return splits


def label_summary(examples: list[dict]) -> str:
    counts = Counter(ex["label"] for ex in examples)
    total = sum(counts.values())
    return ", ".join(f"{name} {n} ({n / total:.0%})" for name, n in sorted(counts.items()))

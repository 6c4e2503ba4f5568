"""From checked examples to token features for every split, with a short log of what was done."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config import RunConfig
from tunelab.data.examples import Splits
from tunelab.data.packing import pack_features
from tunelab.data.templates import choose_template
from tunelab.data.tokenize import tokenize_causal_lm, tokenize_classification, tokenize_instruction


@dataclass
class Features:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    template: str | None = None
    notes: list[str] = field(default_factory=list)  # human-readable lines for the log


def tokenize_splits(splits: Splits, cfg: RunConfig, tokenizer) -> Features:
    max_length = cfg.data.max_length
    if cfg.task == "classification":

        def run(examples: list[dict]) -> list[dict]:
            return examples and tokenize_classification(
                examples, tokenizer, max_length, splits.labels, cfg.data.truncation
            )

        features = Features(run(splits.train), run(splits.validation), run(splits.test))
    elif cfg.task == "causal_lm":

        def run(examples: list[dict]) -> list[dict]:
            return examples and tokenize_causal_lm(examples, tokenizer, max_length)

        features = Features(run(splits.train), run(splits.validation), run(splits.test))
    else:
        template = choose_template(cfg.data.template, tokenizer)
        out, notes = {}, []
        for name in ("train", "validation", "test"):
            examples = getattr(splits, name)
            out[name], truncated = tokenize_instruction(examples, tokenizer, max_length, template) if examples else ([], 0)
            dropped = len(examples) - len(out[name])
            if truncated or dropped:
                notes.append(
                    f"{name}: {truncated} of {len(examples)} examples truncated to {max_length} tokens"
                    + (f", {dropped} dropped (prompt alone fills max_length)" if dropped else "")
                )
        features = Features(out["train"], out["validation"], out["test"], template, notes)
    for name in ("train", "validation", "test"):
        feats = getattr(features, name)
        if feats:
            n_trunc = sum(len(f["input_ids"]) >= max_length for f in feats)
            mean_len = sum(len(f["input_ids"]) for f in feats) / len(feats)
            features.notes.append(f"{name}: {len(feats)} examples, mean {mean_len:.0f} tokens, {n_trunc} at max_length")
    if cfg.data.packing and features.train:
        # Training only: evaluation stays one example per row, so its loss compares with unpacked runs.
        n_examples, n_tokens = len(features.train), sum(len(f["input_ids"]) for f in features.train)
        features.train = pack_features(features.train, max_length)
        fill = n_tokens / (len(features.train) * max_length)
        features.notes.append(
            f"train: packed {n_examples} examples into {len(features.train)} rows of up to {max_length} tokens "
            f"({fill:.0%} full); train.batch_size now counts rows"
        )
    return features

"""Examples -> token ids and labels, one dict per example (padding happens per batch, in batching.py)."""

from __future__ import annotations

from tunelab.data.templates import render_prompt, response_text
from tunelab.errors import ModelError
from tunelab.models.task_models import IGNORE_INDEX


def head_tail(ids: list[int], max_length: int) -> list[int]:
    """Keep the first quarter and the last three quarters of the budget (Sun et al. 2019, "How to Fine-Tune
    BERT for Text Classification?", found head+tail best on IMDB). Special tokens at both ends survive."""
    if len(ids) <= max_length:
        return ids
    head = max_length // 4
    return ids[:head] + ids[len(ids) - (max_length - head):]


def tokenize_classification(examples: list[dict], tokenizer, max_length: int, labels: list[str],
                            truncation: str = "head") -> list[dict]:
    index = {name: i for i, name in enumerate(labels)}
    texts = [ex["text"] for ex in examples]
    if truncation == "head_tail":
        ids = [head_tail(x, max_length) for x in tokenizer(texts)["input_ids"]]
    else:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": x, "labels": index[ex["label"]]} for x, ex in zip(ids, examples, strict=True)]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError("this tokenizer has no EOS token, so a tuned model could not learn to stop")
    return tokenizer.eos_token_id


def tokenize_causal_lm(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Plain text: every token is trained, and EOS closes each document."""
    eos = _eos_id(tokenizer)
    enc = tokenizer([ex["text"] for ex in examples], truncation=True, max_length=max_length - 1)
    return [{"input_ids": ids + [eos], "labels": ids + [eos]} for ids in enc["input_ids"]]


def tokenize_instruction(examples: list[dict], tokenizer, max_length: int, template: str) -> tuple[list[dict], int]:
    """Loss on the response and its EOS only. Returns (features, number of examples truncated).

    Chat templates already contain any BOS they need, so the rendered prompt is tokenized without
    adding special tokens again.
    """
    eos = _eos_id(tokenizer)
    add_special = template != "chat"
    prompts = tokenizer([render_prompt(ex, tokenizer, template) for ex in examples], add_special_tokens=add_special)
    responses = tokenizer([response_text(ex) for ex in examples], add_special_tokens=False)
    features, truncated = [], 0
    for prompt_ids, response_ids in zip(prompts["input_ids"], responses["input_ids"], strict=True):
        target = response_ids + [eos]
        ids = prompt_ids + target
        labels = [IGNORE_INDEX] * len(prompt_ids) + target
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            continue  # the prompt alone fills max_length: nothing left to learn from this example
        features.append({"input_ids": ids, "labels": labels})
    return features, truncated

"""Run a task model over tokenized features: predictions, held-out loss, generations."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tunelab.data.batching import collate, eval_plan
from tunelab.data.templates import render_prompt
from tunelab.evaluate.metrics import classification_metrics, lm_metrics


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(features: list[dict], batch_size: int, pad_id: int, device: torch.device):
    for idx in eval_plan([len(f["input_ids"]) for f in features], batch_size):
        batch = collate([features[i] for i in idx], pad_id)
        yield idx, {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def predict_classes(model: nn.Module, features: list[dict], batch_size: int, pad_id: int, precision: str,
                    device: torch.device) -> tuple[list[int], torch.Tensor]:
    """(predicted class ids, probabilities), in the order of `features`."""
    model.eval()
    probs = torch.zeros(len(features), model.head.out_features)
    for idx, batch in _batches(features, batch_size, pad_id, device):
        with autocast(device, precision):
            logits = model(batch["input_ids"], batch["attention_mask"]).logits
        probs[idx] = logits.float().softmax(-1).cpu()
    return probs.argmax(-1).tolist(), probs


def evaluate_classification(model, features, labels, batch_size, pad_id, precision, device) -> dict:
    preds, probs = predict_classes(model, features, batch_size, pad_id, precision, device)
    y_true = [f["labels"] for f in features]
    metrics = classification_metrics(y_true, preds, labels)
    # Mean cross-entropy: moves before accuracy does, and shows over-confidence that accuracy hides.
    metrics["loss"] = float(-probs[torch.arange(len(y_true)), y_true].clamp_min(1e-12).log().mean())
    return metrics


@torch.inference_mode()
def evaluate_lm(model: nn.Module, features: list[dict], batch_size: int, pad_id: int, precision: str,
                device: torch.device) -> dict:
    model.eval()
    loss_sum, count = 0.0, 0
    for _, batch in _batches(features, batch_size, pad_id, device):
        with autocast(device, precision):
            out = model(**batch)
        loss_sum += float(out.loss_sum)
        count += out.count
    return lm_metrics(loss_sum, count)


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device,
             precision: str = "fp32", add_special_tokens: bool = False, repetition_penalty: float = 1.0) -> list[dict]:
    """Greedy decoding, one prompt at a time (no padding, so no left/right padding pitfalls).

    Returns the completion text and whether the model stopped by emitting EOS.
    """
    model.eval()
    backbone = model.backbone
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        with autocast(device, precision):
            ids = backbone.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )[0, enc["input_ids"].shape[1]:]
        stopped = bool(len(ids) and ids[-1].item() == tokenizer.eos_token_id)
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids, skip_special_tokens=True),
                    "stopped_at_eos": stopped, "new_tokens": len(ids)})
    return out


def instruction_prompts(examples: list[dict], tokenizer, template: str) -> list[str]:
    return [render_prompt(ex, tokenizer, template) for ex in examples]

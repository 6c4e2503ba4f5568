"""Does the exported model compute what the run's own model computes? Measured, then gated.

Every format is checked the same way: the run's model (loaded from the run directory, as `tunelab evaluate`
loads it) and the exported files (loaded back from disk by the runtime that will serve them) both read the
same held-out inputs, and their logits are compared:

- max |delta logit| over every real position (every class score for a classifier);
- argmax agreement: the share of positions (rows, for a classifier) where both pick the same token or class;
- greedy agreement (language models): up to 8 prompts continued 16 tokens greedily by each model; the share
  of prompts whose continuation is identical token for token, and the share of tokens that match;
- quality before and after: a classifier's accuracy on the whole test set; a language model's perplexity on
  the held-out inputs (the loss a quantized format costs is written down, not hidden);
- a decoder with a KV cache (ONNX): the same logits and greedy continuations through its cache
  (measure_cached), since a cache fed back wrong leaves the whole-sequence logits untouched.

A format passes when every gate in FORMAT_GATES holds; ParityError names the check that failed and by how much.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError

MAX_INPUTS = 64  # held-out inputs the logits are compared on
GREEDY_PROMPTS = 8
GREEDY_TOKENS = 16
IGNORE_INDEX = -100

# (name, limit, "max" = value must stay below, "min" = value must reach), per format and quantization.
# fp32 formats hold the same arithmetic, reordered: 1e-4 is fp32 rounding over a small network (MiniLM's 6 layers
# land at 1e-6), far below any change a training step makes. On a deep decoder the run's own fp32 logits are
# further than that from its exact ones (SmolLM2-135M: 1.26e-4 from its fp64 self), so when 1e-4 fails, the run's
# fp32 noise floor is measured (noise_floor.py) and the limit becomes limit_from_floor's. ONNX Runtime fuses and
# reorders more (layer norm, attention): 1e-3.
# Quantized formats round every weight on purpose; their gate is a relative one (max |delta| over the largest
# reference logit) plus the quality change, loose enough for the rounding and tight enough that a wrong tensor
# (a transposed or mis-permuted matrix) fails it. Q8_0's are loose because the tiny test decoders (random
# weights drawn wide) amplify rounding: there F16 moves the logits by 0.8% of the largest and Q8_0 by 18%
# (perplexity +0.01% and +3.6%); SmolLM2's numbers are in examples/intermediate/export/results/.
FORMAT_GATES: dict[str, list[tuple[str, float, str]]] = {
    "merged": [("max_abs_logit_diff", 1e-4, "max")],
    "adapter": [("max_abs_logit_diff", 1e-4, "max")],
    # A decoder's graph has a KV cache: its logits through the cache (a prefill, then one token per call) must
    # meet the same limit, and its greedy continuations must equal the run's token for token. A classifier's
    # report has no cached checks (gate() skips what a report lacks).
    "onnx": [("max_abs_logit_diff", 1e-3, "max"), ("cached_max_abs_logit_diff", 1e-3, "max"),
             ("greedy_cached_identical", 1.0, "min")],
    # int8 activations are quantized per input on the fly: logits move by a share of their own size (tiny test
    # classifiers, whose logits sit near 0, by more than half), so only what it costs in quality is gated.
    "onnx-int8": [("accuracy_drop", 0.05, "max"), ("perplexity_increase", 0.10, "max")],
    "gguf-f16": [("relative_logit_diff", 0.02, "max"), ("perplexity_increase", 0.01, "max"),
                 ("tokenizer_agreement", 1.0, "min")],
    "gguf-q8_0": [("relative_logit_diff", 0.25, "max"), ("perplexity_increase", 0.05, "max"),
                  ("tokenizer_agreement", 1.0, "min")],
}

# The formats whose max |delta logit| limit may rise to NOISE_FLOOR_FACTOR x the run's fp32 noise floor (its model
# in fp32 against itself in fp64), never above NOISE_FLOOR_CEILING. Why 3: two fp32 computations of one function,
# each as far from the exact logits as the run's own (the floor), are at most 2 floors apart (triangle
# inequality); SmolLM2 + LoRA's merged model measured 1.1 floors from the exact logits and 1.1-1.5 from the run's.
# The third floor is margin for a maximum over millions of logits, and 3 floors (3.7e-4 there) stay well below a
# wrong merge: one LoRA step on one of its 210 layers moved those logits by 8.9e-3, a 1e-5 step on one merged
# tensor by 2.5e-3 (examples/intermediate/export/README.md). The ceiling (ONNX's limit) keeps the gate a gate: a
# model whose fp32 logits wander further than that from their own fp64 ones is refused, its floor named.
FLOOR_GATES = ("merged", "adapter")
NOISE_FLOOR_FACTOR = 3.0
NOISE_FLOOR_CEILING = 1e-3

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits
CachedLogits = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # ... and the tokens to prefill
Generate = Callable[[list[int], int], list[int]]  # (prompt ids, new tokens) -> greedy continuation


class ParityError(TunelabError):
    """An export whose parity failed a gate; nothing was published."""


@dataclass
class ParityInputs:
    """What parity is measured on, tokenized the way the run itself evaluates."""

    task: str
    features: list[dict]  # up to MAX_INPUTS, each with input_ids and labels
    source: str  # the file they came from
    pad_id: int
    full_test: list[dict] = field(default_factory=list)  # classification: the whole test set
    prompts: list[list[int]] = field(default_factory=list)  # LMs: prompt ids for the greedy check

    @property
    def classification(self) -> bool:
        return self.task == "classification"


def batches(features: list[dict], pad_id: int, batch_size: int):
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        width = max(len(f["input_ids"]) for f in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(rows):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
            if isinstance(f["labels"], list):
                labels[i, :n] = torch.tensor(f["labels"])
        class_labels = None if isinstance(rows[0]["labels"], list) else torch.tensor([f["labels"] for f in rows])
        yield ids, mask, labels, class_labels


def _accuracy(logits_fn: Logits, features: list[dict], pad_id: int, batch_size: int) -> float:
    right = 0
    for ids, mask, _, class_labels in batches(features, pad_id, batch_size):
        right += int((logits_fn(ids, mask).float().argmax(-1) == class_labels).sum())
    return right / max(len(features), 1)


@torch.inference_mode()
def greedy(logits_fn: Logits, prompt: list[int], new_tokens: int = GREEDY_TOKENS) -> list[int]:
    """Greedy continuation by full forward passes (no KV cache): the same loop for every runtime compared."""
    ids = list(prompt)
    for _ in range(new_tokens):
        x = torch.tensor([ids])
        ids.append(int(logits_fn(x, torch.ones_like(x))[0, -1].float().argmax()))
    return ids[len(prompt):]


@torch.inference_mode()
def measure(reference: Logits, candidate: Logits, inputs: ParityInputs, batch_size: int = 8) -> dict:
    """The parity report of `candidate` against `reference` (both logits functions)."""
    max_abs, max_ref, agree, positions = 0.0, 0.0, 0, 0
    nll_ref = nll_cand = 0.0
    targets = 0
    for ids, mask, labels, _ in batches(inputs.features, inputs.pad_id, batch_size):
        ref, cand = reference(ids, mask).float(), candidate(ids, mask).float()
        if ref.shape != cand.shape:
            raise ParityError(f"parity check 'logit shape' failed: exported model gives {tuple(cand.shape)}, "
                              f"the run's model {tuple(ref.shape)}")
        if inputs.classification:
            keep_ref, keep_cand = ref, cand
        else:
            real = mask.bool()
            keep_ref, keep_cand = ref[real], cand[real]
            shifted, has_target = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
            if has_target.any():
                nll_ref += float(F.cross_entropy(ref[:, :-1][has_target], shifted[has_target], reduction="sum"))
                nll_cand += float(F.cross_entropy(cand[:, :-1][has_target], shifted[has_target], reduction="sum"))
                targets += int(has_target.sum())
        max_abs = max(max_abs, float((keep_ref - keep_cand).abs().max()))
        max_ref = max(max_ref, float(keep_ref.abs().max()))
        agree += int((keep_ref.argmax(-1) == keep_cand.argmax(-1)).sum())
        positions += keep_ref.shape[0]
    report = {
        "inputs": len(inputs.features), "source": inputs.source, "positions_compared": positions,
        "max_abs_logit_diff": max_abs, "max_abs_reference_logit": max_ref,
        "relative_logit_diff": max_abs / max(max_ref, 1e-12), "argmax_agreement": agree / max(positions, 1),
    }
    if inputs.classification:
        before = _accuracy(reference, inputs.full_test, inputs.pad_id, batch_size)
        after = _accuracy(candidate, inputs.full_test, inputs.pad_id, batch_size)
        report.update(test_examples=len(inputs.full_test), accuracy_before=before, accuracy_after=after,
                      accuracy_drop=before - after)
    else:
        ppl_ref = math.exp(min(nll_ref / max(targets, 1), 50.0))
        ppl_cand = math.exp(min(nll_cand / max(targets, 1), 50.0))
        report.update(target_tokens=targets, perplexity_before=ppl_ref, perplexity_after=ppl_cand,
                      perplexity_increase=ppl_cand / ppl_ref - 1)
        identical, token_agreement = _greedy_agreement(
            inputs.prompts, lambda p: greedy(reference, p), lambda p: greedy(candidate, p))
        report.update(greedy_prompts=len(inputs.prompts), greedy_new_tokens=GREEDY_TOKENS,
                      greedy_identical=identical, greedy_token_agreement=token_agreement)
    return report


@torch.inference_mode()
def measure_cached(reference: Logits, cached: CachedLogits, generate: Generate, inputs: ParityInputs,
                   batch_size: int = 8) -> dict:
    """The KV-cache checks of a decoder runtime against `reference` (the run, whole sequences, no cache).

    Logits: each batch of held-out inputs is prefilled for half its shortest row, then fed one token per call
    through the cache to the end; every real position is compared (prefill and cached steps alike), so an
    error that grows with the cache's length shows. Greedy: the parity prompts continued by `generate` (which
    feeds its cache back itself) against the run's full-pass greedy, token for token."""
    max_abs, agree, positions, stepped = 0.0, 0, 0, 0
    for ids, mask, _, _ in batches(inputs.features, inputs.pad_id, batch_size):
        prefill = max(1, int(mask.sum(1).min()) // 2)
        ref, cand = reference(ids, mask).float(), cached(ids, mask, prefill).float()
        if ref.shape != cand.shape:
            raise ParityError(f"parity check 'cached logit shape' failed: the cached path gives "
                              f"{tuple(cand.shape)}, the run's model {tuple(ref.shape)}")
        real = mask.bool()
        max_abs = max(max_abs, float((ref[real] - cand[real]).abs().max()))
        agree += int((ref[real].argmax(-1) == cand[real].argmax(-1)).sum())
        positions += int(real.sum())
        stepped += int(real[:, prefill:].sum())
    identical, token_agreement = _greedy_agreement(
        inputs.prompts, lambda p: greedy(reference, p), lambda p: generate(p, GREEDY_TOKENS))
    return {"cached_max_abs_logit_diff": max_abs, "cached_argmax_agreement": agree / max(positions, 1),
            "cached_positions_compared": positions, "cached_positions_after_prefill": stepped,
            "greedy_cached_identical": identical, "greedy_cached_token_agreement": token_agreement}


def _greedy_agreement(prompts, expected, got) -> tuple[float, float]:
    """(share of prompts continued identically, share of the GREEDY_TOKENS new tokens that match)."""
    same_tokens, same_prompts = 0, 0
    for prompt in prompts:
        a, b = expected(prompt), got(prompt)
        same_tokens += sum(x == y for x, y in zip(a, b))
        same_prompts += a == b
    n = len(prompts)
    return same_prompts / max(n, 1), same_tokens / max(n * GREEDY_TOKENS, 1)


QUALITY_CHECKS = ("accuracy_drop", "perplexity_increase")


def fixed_limit_fails(report: dict, gate_name: str) -> bool:
    """True when max |delta logit| is over the fixed limit of a gate that may use the run's noise floor instead."""
    fixed = dict((name, limit) for name, limit, _ in FORMAT_GATES[gate_name]).get("max_abs_logit_diff")
    return gate_name in FLOOR_GATES and fixed is not None and report["max_abs_logit_diff"] >= fixed


def limit_from_floor(fixed: float, floor: float | None) -> tuple[float, str]:
    """The max |delta logit| limit of an fp32 format once the run's fp32 noise floor was measured, and why."""
    if floor is None:
        return fixed, "the fixed limit: the run's fp32 noise floor could not be measured (no fp64 for its model)"
    scaled = NOISE_FLOOR_FACTOR * floor
    if scaled <= fixed:
        return fixed, f"the fixed limit: {NOISE_FLOOR_FACTOR:g} x the run's fp32 noise floor {floor:.3g} is below it"
    if scaled > NOISE_FLOOR_CEILING:
        return NOISE_FLOOR_CEILING, (f"the ceiling: {NOISE_FLOOR_FACTOR:g} x the run's fp32 noise floor {floor:.3g} is "
                                     f"above it; fp32 does not reproduce this model")
    return scaled, (f"{NOISE_FLOOR_FACTOR:g} x the run's fp32 noise floor {floor:.3g} (its fp32 vs fp64 logits): fp32 "
                    f"rounding alone moves this model's logits by more than the fixed {fixed:.3g}")


def gate(report: dict, gate_name: str, max_quality_loss: float | None = None) -> dict:
    """Add the checks of `gate_name` to the report; raise ParityError on the first that fails.
    max_quality_loss: the user's own limit for the quality checks of a quantized format (--max-quality-loss).
    A report holding "fp32_noise_floor" (measured by noise_floor.py, None when it could not be) gets its max
    |delta logit| limit from limit_from_floor; the check then records the fixed limit, the factor and why."""
    checks = []
    for name, limit, kind in FORMAT_GATES[gate_name]:
        if max_quality_loss is not None and name in QUALITY_CHECKS:
            limit = max_quality_loss
        if name not in report:  # e.g. accuracy_drop on a language model
            continue
        extra = {}
        if name == "max_abs_logit_diff" and gate_name in FLOOR_GATES and "fp32_noise_floor" in report:
            fixed, (limit, why) = limit, limit_from_floor(limit, report["fp32_noise_floor"])
            extra = {"fixed_limit": fixed, "noise_floor": report["fp32_noise_floor"],
                     "noise_floor_factor": NOISE_FLOOR_FACTOR, "noise_floor_ceiling": NOISE_FLOOR_CEILING,
                     "limit_reason": why}
        value = report[name]
        passed = value < limit if kind == "max" else value >= limit
        checks.append({"check": name, "value": value, "limit": limit, "must_be": "below" if kind == "max" else
                       "at least", "passed": passed, **extra})
    report["gate"] = gate_name
    report["checks"] = checks
    report["passed"] = all(c["passed"] for c in checks)
    for c in checks:
        if not c["passed"]:
            raise ParityError(
                f"{gate_name} export refused: parity check '{c['check']}' is {c['value']:.4g}, must be "
                f"{c['must_be']} {c['limit']:.4g}{' (' + c['limit_reason'] + ')' if 'limit_reason' in c else ''} "
                f"(measured on {report['inputs']} held-out inputs from {report['source']}); nothing was written"
            )
    return report


@torch.inference_mode()
def time_logits(logits_fn: Logits, inputs: ParityInputs, repeats: int = 3, batch_size: int = 8) -> float:
    """Median seconds for one pass over the parity inputs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for ids, mask, _, _ in batches(inputs.features, inputs.pad_id, batch_size):
            logits_fn(ids, mask)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

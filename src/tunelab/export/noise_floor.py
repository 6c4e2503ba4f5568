"""How far fp32 rounding alone moves the run's own logits: its model in fp32 against the same model in fp64.

An fp32 export (merged, adapter) computes the run's function with the same weights rounded at most once, but
in another order: W x + s B (A x) becomes (W + s B A) x. Each of the two fp32 forward passes lands within a
few ulps of the exact logits at every layer, and on a deep decoder those ulps add up: on SmolLM2-135M (30
layers, logits up to ~45) the run's own fp32 model is 1.26e-4 away from its fp64 self, above the fixed 1e-4,
so that limit refused exports that compute the same thing as the run (examples/intermediate/export/README.md).
Merging in fp64 does not change that: rounding the merged weights to fp32 costs 8e-6 there; the rest is the
arithmetic of the forward pass.

parity.py's gate then allows NOISE_FLOOR_FACTOR times the floor, within a ceiling (the reasons are there).

The floor is measured only when the fixed limit fails (small models never pay for it): each batch of the
parity inputs is run in fp32, then the same model, cast in place to fp64 and back (exact both ways), runs it
again. Memory: the reference model at twice its fp32 size while it runs in fp64. Time: one more pass over the
parity inputs at fp64 speed (SmolLM2-135M: about a minute on 2 CPU cores). transformers still normalises in
fp32 (Llama's RMSNorm casts to fp32 whatever the model's dtype), so this fp64 model rounds there: on SmolLM2 it
gives 1.23e-4, against 1.26e-4 with the norms in fp64 too (examples/intermediate/export/merge_precision.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.export.parity import ParityInputs, batches


@torch.inference_mode()
def fp32_noise_floor(model: nn.Module, inputs: ParityInputs, batch_size: int = 8) -> float | None:
    """max |fp32 logit - fp64 logit| of `model` (a task model in fp32) over the positions parity compares; None
    when it cannot run in fp64 (quantized weights, a weight not in fp32, a device without fp64 such as MPS)."""
    params = list(model.parameters())
    if not params or any(p.dtype != torch.float32 for p in params):
        return None
    device = params[0].device
    if device.type not in ("cpu", "cuda"):
        return None
    worst = 0.0
    try:
        for ids, mask, _, _ in batches(inputs.features, inputs.pad_id, batch_size):
            ids, mask = ids.to(device), mask.to(device)
            fp32 = _compared(model, ids, mask, inputs.classification)
            model.to(torch.float64)
            fp64 = _compared(model, ids, mask, inputs.classification)
            model.to(torch.float32)
            worst = max(worst, float((fp32.double() - fp64).abs().max()))
            del fp32, fp64
    finally:
        model.to(torch.float32)
    return worst


def _compared(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, classification: bool) -> torch.Tensor:
    """The logits parity.measure compares: every class score, or the real positions of a language model."""
    out = model(ids, mask).logits
    if classification:
        return out
    return out[:, out.size(1) - ids.size(1):][mask.bool()]  # prompt tuning's virtual tokens come first

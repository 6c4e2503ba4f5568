"""Task wrappers around a Hugging Face backbone.

Every technique acts on `.backbone` only (it wraps or adds modules there); the wrapper owns the task:
the pooling and head for classification, the shifted next-token loss for language modelling.

Both return the *sum* of the loss and the count it was summed over, never a mean. The training loop
divides by the count of the whole optimizer step, so 4 micro-batches of 2 give exactly the gradient of one
batch of 8, and for language modelling every real token weighs the same whatever batch it landed in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import method_blocking_packing

IGNORE_INDEX = -100

# Logits the LM loss holds at once: 2**23 fp32 values = 32 MB per copy (170 rows of SmolLM2's 49,152-token
# vocabulary). Smaller = less memory but smaller, less efficient matmuls.
LOSS_CHUNK_LOGITS = 2**23


@dataclass
class TaskOutput:
    logits: torch.Tensor | None  # None for CausalLM given labels: its loss never materialises full logits
    loss_sum: torch.Tensor | None = None
    count: int = 0


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence.

    mean: average of the real (non-pad) token states. all-MiniLM-L6-v2 was trained this way; its BERT
          pooler output barely varies across inputs (std 0.028), which is why the stock
          BertForSequenceClassification head stays near chance with LoRA.
    last: the state of the last real token, the only one a causal decoder lets see the whole text.
          Assumes right padding.
    cls:  the first token's state.
    """
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "last":
        last = attention_mask.sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last].float()
    if pooling == "cls":
        return hidden[:, 0].float()
    raise ValueError(f"unknown pooling {pooling!r}")


class SequenceClassifier(nn.Module):
    """backbone -> pooled state -> dropout -> linear head over the labels."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels=None, **_) -> TaskOutput:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Prompt tuning prepends its virtual tokens to the sequence: pool over the real tokens only (they
        # have attended to the virtual ones).
        hidden = hidden[:, hidden.size(1) - attention_mask.size(1):]
        logits = self.head(self.dropout(pool(hidden, attention_mask, self.pooling)).to(self.head.weight.dtype))
        if labels is None:
            return TaskOutput(logits)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return TaskOutput(logits, loss_sum, labels.numel())


class _ChunkedLMLoss(torch.autograd.Function):
    """Cross-entropy of head(hidden) summed over rows, a chunk of rows at a time, gradients taken in forward.

    Plain autograd keeps every chunk's logits (rows x vocab, fp32) alive until backward, so chunking alone
    saves nothing in training. Here each chunk's gradients with respect to the hidden rows and the head's
    trainable weights are computed as soon as its loss is, and its logits are freed; backward only scales
    the stored gradients by the incoming one (the loss is a sum, so that is exact). The matmuls are those
    of the plain loss (logits, d hidden, d weight), none is recomputed. The idea of Liger-Kernel's fused
    linear cross-entropy, here generic over the head module, so a LoRA-wrapped lm_head works too.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, rows, *params):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden)
        d_params = [torch.zeros_like(p) for p in params]
        for start in range(0, hidden.size(0), rows):
            chunk = hidden[start : start + rows].detach().requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(head(chunk).float(), targets[start : start + rows], reduction="sum")
            grads = torch.autograd.grad(loss, [chunk, *params])
            d_hidden[start : start + rows] = grads[0]
            for acc, grad in zip(d_params, grads[1:]):
                acc += grad
            total += loss.detach()
        ctx.save_for_backward(d_hidden, *d_params)
        return total

    @staticmethod
    def backward(ctx, d_loss):
        d_hidden, *d_params = ctx.saved_tensors
        return d_hidden * d_loss, None, None, None, *(grad * d_loss for grad in d_params)


def lm_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, vocab_size: int) -> torch.Tensor:
    """sum_i cross_entropy(head(hidden[i]), targets[i]) for hidden (N, H) and targets (N,), in fp32, holding
    at most LOSS_CHUNK_LOGITS logits at a time."""
    rows = max(1, LOSS_CHUNK_LOGITS // vocab_size)
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedLMLoss.apply(hidden, targets, head, rows, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), rows):  # evaluation: nothing is kept for backward, chunks suffice
        logits = head(hidden[start : start + rows]).float()
        total += F.cross_entropy(logits, targets[start : start + rows], reduction="sum")
    return total


class CausalLM(nn.Module):
    """Next-token loss over the positions whose label is not IGNORE_INDEX.

    Labels mark what is trained by position, never by token id: SmolLM2's pad id equals its EOS id, and
    masking "every pad id" would also mask the EOS the model must learn to stop with.

    The loss comes from the final hidden states, not from full logits: only positions with a target are
    projected onto the vocabulary, a chunk at a time (lm_loss_sum). Full fp32 logits over SmolLM2's
    49,152-token vocabulary are 400 MB for 8 x 256 tokens, and the plain loss kept several copies alive.
    The backbone is called through its own forward (with output_hidden_states), so every PEFT wrapper,
    prompt tuning's virtual tokens and prefix tuning's cache included, runs exactly as it would for logits.

    Packed rows (data/packing.py) come with position_ids that restart at every example; the 2D mask is then
    dropped, because transformers builds the block-diagonal mask from those restarts only when it gets no
    mask and no KV cache (and Llama makes a cache unless told use_cache=False, in training mode too).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def _hf_model(self) -> nn.Module:
        """The transformers model under any PEFT wrapper (techniques replace .backbone after __init__)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def forward(self, input_ids, attention_mask, labels=None, position_ids=None, **_) -> TaskOutput:
        if position_ids is not None:
            method = method_blocking_packing(self.backbone)  # the technique owns the rule (Method.packing_refusal)
            if method is not None:
                raise ConfigError(f"data.packing does not work with method '{method.name}' ({method.packing_refusal}); "
                                  "set data.packing: false")
            attention_mask = None
        # No KV cache: training never reuses one, and transformers ignores packing whenever a cache exists.
        inputs = {
            "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False
        }
        if labels is None:
            return TaskOutput(self.backbone(**inputs).logits)
        hf_model = self._hf_model()
        if "logits_to_keep" in inspect.signature(hf_model.forward).parameters:
            inputs["logits_to_keep"] = 1  # the loss needs no logits from the backbone; it makes its own
        hidden = self.backbone(**inputs, output_hidden_states=True).hidden_states[-1]
        hidden = hidden[:, hidden.size(1) - labels.size(1) :]  # prompt tuning's virtual tokens come first
        targets = labels[:, 1:]
        has_target = targets != IGNORE_INDEX
        head = hf_model.get_output_embeddings()
        loss_sum = lm_loss_sum(hidden[:, :-1][has_target], targets[has_target], head, hf_model.config.vocab_size)
        return TaskOutput(None, loss_sum, int(has_target.sum()))

"""Task wrappers around a Hugging Face backbone.

Every technique acts on `.backbone` only (it wraps or adds modules there); the wrapper owns the task:
the pooling and head for classification, the shifted next-token loss for language modelling.

Both return the *sum* of the loss and the count it was summed over, never a mean. The training loop
divides by the count of the whole optimizer step, so 4 micro-batches of 2 give exactly the gradient of one
batch of 8, and for language modelling every real token weighs the same whatever batch it landed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class TaskOutput:
    logits: torch.Tensor
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
        logits = self.head(self.dropout(pool(hidden, attention_mask, self.pooling)).to(self.head.weight.dtype))
        if labels is None:
            return TaskOutput(logits)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return TaskOutput(logits, loss_sum, labels.numel())


class CausalLM(nn.Module):
    """Next-token loss over the positions whose label is not IGNORE_INDEX.

    Labels mark what is trained by position, never by token id: SmolLM2's pad id equals its EOS id, and
    masking "every pad id" would also mask the EOS the model must learn to stop with.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, labels=None, **_) -> TaskOutput:
        logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits
        if labels is None:
            return TaskOutput(logits)
        shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
        shift_labels = labels[:, 1:].reshape(-1)
        loss_sum = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return TaskOutput(logits, loss_sum, int((shift_labels != IGNORE_INDEX).sum()))

"""Classification and language-modelling metrics."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix (rows = true label)."""
    ids = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(mp),
        "recall_macro": float(mr),
        "f1_macro": float(mf),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "num_examples": len(y_true),
    }


def lm_metrics(loss_sum: float, num_tokens: int) -> dict:
    """Token-weighted: the mean NLL over every predicted token, so long texts count by their length
    (averaging per-batch means would let a short batch weigh as much as a long one)."""
    loss = loss_sum / max(num_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": int(num_tokens)}


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    width = max(len(x) for x in labels + ["true\\pred"]) + 1
    cells = np.asarray(matrix)
    col = max(len(str(cells.max())), max(len(x) for x in labels)) + 1
    lines = ["true\\pred".ljust(width) + "".join(x.rjust(col) for x in labels)]
    lines += [name.ljust(width) + "".join(str(v).rjust(col) for v in row) for name, row in zip(labels, matrix)]
    return "\n".join(lines)

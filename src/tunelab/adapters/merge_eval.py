"""What a merge cost each task: every source task's test set scored three ways.

- source: the task's own adapter (what merging starts from);
- merged: the merged adapter with the task's own head (what merging gives);
- base: the same head on the base model with the adapter switched off (the floor: the untuned backbone).

Classification rows compare accuracy (macro F1 beside it); language-model rows compare perplexity.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.adapters.sources import Source

KEEP = ("accuracy", "f1_macro", "loss", "perplexity", "num_examples", "num_tokens")


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in KEEP}


def evaluate_merge(sources: list[Source], merged_runs: dict[str, Path], say) -> dict:
    from tunelab.inference.trained import TrainedModel

    table = {}
    for source in sources:
        test = source.test_file
        if not test or not Path(test).is_file():
            say(f"eval   {source.name}: skipped, its test file {test!r} is not here")
            table[source.name] = {"skipped": f"test file {test!r} not found"}
            continue
        own = TrainedModel(source.path)
        source_metrics = _flat(own.evaluate_file(test))
        with own.model.backbone.disable_adapter():
            base_metrics = _flat(own.evaluate_file(test))
        del own
        merged_metrics = _flat(TrainedModel(merged_runs[source.name]).evaluate_file(test))
        metric = "accuracy" if "accuracy" in source_metrics else "perplexity"
        row = {"metric": metric, "test_file": test, "base": base_metrics, "source": source_metrics,
               "merged": merged_metrics, "delta": merged_metrics[metric] - source_metrics[metric]}
        say(f"eval   {source.name}: {metric} base {base_metrics[metric]:.4f}, own adapter "
            f"{source_metrics[metric]:.4f}, merged {merged_metrics[metric]:.4f} ({row['delta']:+.4f})")
        table[source.name] = row
    return table


def summary(table: dict) -> dict:
    """Mean accuracy over the classification tasks, and the mean change from each task's own adapter."""
    rows = [r for r in table.values() if r.get("metric") == "accuracy"]
    if not rows:
        return {}
    mean = lambda key: sum(r[key]["accuracy"] for r in rows) / len(rows)  # noqa: E731
    return {"tasks": len(rows), "mean_accuracy_base": mean("base"), "mean_accuracy_source": mean("source"),
            "mean_accuracy_merged": mean("merged"),
            "mean_delta": sum(r["delta"] for r in rows) / len(rows)}

"""How well a router routes, and what its mistakes cost: measured on every task's test inputs.

- routing accuracy: the share of a task's test inputs sent to that task's adapter;
- end to end, router: each input answered by the adapter the router chose (an input sent to another task's
  adapter counts as right only if that adapter's label is the gold label, which for other label sets it is not);
- end to end, oracle: each input answered by its own task's adapter (routing by an explicit task tag).
Means are over tasks (each task weighs the same, whatever its test size); `pooled` weighs every input.
"""

from __future__ import annotations

from tunelab.adapters.sources import Source
from tunelab.errors import TunelabError


def evaluate_router(router, sources: list[Source], say) -> dict:
    from tunelab.adapters.router import _texts

    texts, gold_task, gold_label = [], [], []
    for k, s in enumerate(sources):
        if not s.test_file:
            raise TunelabError(f"{s.path}: its config names no data.test; the router is measured on test inputs")
        rows = _texts(s.test_file, s)
        texts += [r["text"] for r in rows]
        gold_label += [r["label"] for r in rows]
        gold_task += [k] * len(rows)
    say(f"route  embedding {len(texts)} test inputs")
    routes = router.route(texts, router.embed(texts))
    chosen = [router.tasks.index(t) for t, _ in routes]
    n = len(sources)
    confusion = [[0] * n for _ in range(n)]
    for g, c in zip(gold_task, chosen):
        confusion[g][c] += 1

    oracle_ok, routed_ok = [False] * len(texts), [False] * len(texts)
    for k, s in enumerate(sources):
        own = [i for i, g in enumerate(gold_task) if g == k]
        foreign = [i for i, (g, c) in enumerate(zip(gold_task, chosen)) if c == k and g != k]
        say(f"route  {s.name}: its adapter on {len(own)} own test inputs and {len(foreign)} misrouted here")
        preds = router.model(s.name).predict([texts[i] for i in own + foreign])
        for j, (i, p) in enumerate(zip(own + foreign, preds)):
            ok = p["label"] == gold_label[i]
            if j < len(own):
                oracle_ok[i] = ok
                if chosen[i] == k:
                    routed_ok[i] = ok
            else:
                routed_ok[i] = ok

    def share(flags, idx):
        return sum(flags[i] for i in idx) / max(len(idx), 1)

    per_task_routing, per_task_e2e = {}, {}
    for k, s in enumerate(sources):
        idx = [i for i, g in enumerate(gold_task) if g == k]
        per_task_routing[s.name] = {"accuracy": confusion[k][k] / max(len(idx), 1), "num_examples": len(idx)}
        per_task_e2e[s.name] = {"routed": share(routed_ok, idx), "oracle": share(oracle_ok, idx)}
        say(f"route  {s.name}: routed {per_task_routing[s.name]['accuracy']:.4f}; end to end "
            f"{per_task_e2e[s.name]['routed']:.4f} vs oracle {per_task_e2e[s.name]['oracle']:.4f}")
    everyone = range(len(texts))
    mean = lambda key: sum(r[key] for r in per_task_e2e.values()) / n  # noqa: E731
    return {
        "routing": {"accuracy": sum(confusion[k][k] for k in range(n)) / len(texts),
                    "mean_accuracy": sum(r["accuracy"] for r in per_task_routing.values()) / n,
                    "per_task": per_task_routing, "confusion_matrix": confusion, "tasks": router.tasks},
        "end_to_end": {"mean_routed": mean("routed"), "mean_oracle": mean("oracle"),
                       "pooled_routed": share(routed_ok, everyone), "pooled_oracle": share(oracle_ok, everyone),
                       "per_task": per_task_e2e},
    }

"""A sweep's figures, from its Optuna study: the metric of each trial with the best so far (history.png), and
fANOVA parameter importance (importance.png).

Drawn with Optuna's matplotlib plots on the Agg backend (no window, works headless). The caller passes the
study and where to write; what could not be drawn comes back as sentences to print.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def plot_sweep(study, metric: str, params: list[str], seed: int, history: Path, importance: Path) -> list[str]:
    """history always (given a completed trial); importance when it can be estimated: two completed trials
    whose params differ. Returns why a plot was skipped, if one was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return ["no completed trial yet: no plots"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        target = f"validation {metric}"
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=target)
        ax.figure.savefig(history, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)

        varied = [k for k in params if len({repr(t.params.get(k)) for t in completed}) > 1]
        if len(completed) < 2 or not varied:
            return ["parameter importance needs two completed trials with different params: skipped"]
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=evaluator, params=varied, target_name=target
            )
        except (ValueError, RuntimeError) as err:
            return [f"parameter importance skipped: {err}"]
        ax.figure.savefig(importance, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
    return []

"""`tunelab sweep`: search a run config's hyperparameters with Optuna.

A sweep file is an ordinary run config plus one `sweep:` section, so the search and the run it varies
read as one file (delete `sweep:` and it is the base run for `tunelab train`):

    task: classification
    model: {name: minilm-l6}
    data: {train: data/sst2/train.jsonl, validation_split: 0.1}   # trials are scored on validation
    method: {name: lora}
    train: {max_steps: 200, eval_every: 50, seed: 42}             # eval_every feeds the pruner
    sweep:
      trials: 8            # completed + pruned trials to reach; more = a better optimum, a longer sweep
      metric: accuracy     # classification: accuracy, f1_macro, precision_macro, recall_macro, loss;
                           # causal_lm/instruction: loss, perplexity. loss/perplexity are minimised.
      pruner: median       # median = stop a trial whose validation metric is worse than the median of
                           # earlier trials at the same step, once 5 trials completed (Optuna's default);
                           # none. Default: median when train.eval_every is set.
      space:               # dotted config key -> distribution
        method.rank: {type: int, low: 4, high: 64, log: true}     # log: as many draws in 4-8 as in 32-64
        method.alpha: {type: categorical, choices: [8, 16, 32]}
        train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}
        method.target_modules: {type: categorical, choices: [[query, value], all-linear]}

Trials are scored on the validation split (data.validation or data.validation_split), never on the test
set: choosing hyperparameters on the test set would make its score an overestimate.

The sweep directory, `<output.dir>/<output.name or sweep-TIMESTAMP>/`:

  sweep.yaml        the sweep as resolved (overrides applied); --resume reads it
  study.db          the Optuna study in SQLite: each trial's params, state, value, validation curve
  trial-000/ ...    one ordinary run directory per trial (`tunelab eval/predict` work on them)
  trials.csv        one row per trial: number, state, metric, params, run directory
  best_config.yaml  the base config with the best trial's params: `tunelab train best_config.yaml`
  history.png       the metric of each trial and the best so far
  importance.png    fANOVA parameter importance (needs two completed trials whose params differ)

Resuming (`--resume SWEEP_DIR`, or the same file with the same output.name) continues the study: finished
trials are kept, and a trial that was running when the process died is marked failed and its params are
tried again, once. Only completed and pruned trials count toward `trials`. The resumed sweep must be the
same sweep; only `sweep.trials` may change (raise it to search further).

The sampler is TPE seeded from train.seed (plus the number of trials already in the study, so a resumed
sweep does not redraw the first trials' params). Its first trials are random: max(2, min(10, trials // 2)).

The work is split by job: space.py (the sweep section: its parameters and checks), search.py (the study, the
trials, resuming), outputs.py (trials.csv, best_config.yaml, the summary); the plots are drawn by
report/sweep_plots.py. Each trial trains in its own process (experiments/trials.py).
"""

from tunelab.experiments.sweep.search import STUDY_NAME, run_sweep
from tunelab.experiments.sweep.space import Sweep, load_sweep, parse_sweep

__all__ = ["STUDY_NAME", "Sweep", "load_sweep", "parse_sweep", "run_sweep"]

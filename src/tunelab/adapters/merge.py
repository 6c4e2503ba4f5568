"""`tunelab merge`: several LoRA adapters trained on one base, combined into one through PEFT's
`add_weighted_adapter`, and measured as they merge.

The methods are PEFT's (`peft.utils.merge_utils`), applied per adapted layer:

- linear: sum_i w_i * s_i * B_i A_i, kept at rank r by combining A and B apart (A = sum sqrt(w_i s_i) A_i, likewise
  B). Exact for one adapter; for several it adds cross terms B_i A_j, so it is only an approximation of the
  sum of the updates.
- cat: A and B stacked: rank sum(r_i), and exactly the sum of the weighted updates.
- svd: the exact weighted sum of updates B_i A_i, cut back to rank max(r_i) by SVD.
- ties (Yadav et al. 2023): trim each update to its largest `density` fraction, elect a sign per weight by
  total mass, and average only the values that agree with it.
- dare_linear / dare_ties (Yu et al. 2023): drop each value at random with probability 1 - density and rescale
  the survivors by 1/density, then sum (linear) or elect signs as ties does.
- magnitude_prune: keep each update's largest `density` fraction, then sum.
ties, dare_* and magnitude_prune work on A and B apart, like linear, and need one rank for all adapters.

The output is a folder with one complete run directory per source task under `tasks/`: the merged adapter
beside that task's own classification head, labels, tokenizer and config. So `tunelab eval`, `predict`,
`serve` and `export` take `OUTPUT/tasks/NAME` as they take any run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.adapters.sources import Source, output_folder, check_mergeable, read_sources
from tunelab.errors import TunelabError
from tunelab.runtime.atomic import atomic_dir, atomic_write_json
from tunelab.runtime.run_dir import RunDir

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Methods that keep a fraction `density` of each update (PEFT ignores density for the others).
DENSITY_METHODS = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
MERGED = "merged"  # the PEFT adapter name while merging; saved as the default adapter


def check_recipe(sources: list[Source], method: str, weights: list[float] | None,
                 density: float | None) -> tuple[list[float], float | None]:
    """The weights (default: 1/n each) and density (default 0.5 where the method uses it), checked."""
    if method not in METHODS:
        raise TunelabError(f"--method '{method}' is not one of {', '.join(METHODS)}")
    n = len(sources)
    if weights is None:
        weights = [1.0 / n] * n  # the mean of the updates: each task keeps 1/n of its own
    if len(weights) != n:
        raise TunelabError(f"--weights has {len(weights)} values for {n} runs; give one per run, in order")
    if method in DENSITY_METHODS:
        density = 0.5 if density is None else density
        if not 0 < density <= 1:
            raise TunelabError(f"--density must be in (0, 1] (the fraction of each update kept), got {density}")
    elif density is not None:
        raise TunelabError(f"--density applies to {', '.join(sorted(DENSITY_METHODS))}, not '{method}'")
    return weights, density


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise TunelabError(f"--weights '{text}': give numbers separated by commas, e.g. 0.5,0.5") from None


def build_merged_adapter(sources: list[Source], method: str, weights: list[float], density: float | None,
                         seed: int, out_dir: Path) -> None:
    """Load every source adapter onto one copy of the base, merge them with PEFT and save the result as a
    plain (default-named) PEFT adapter in out_dir."""
    import torch

    from tunelab.methods.bitsandbytes_support import import_peft
    from tunelab.models.loading import load_task_model

    import_peft()  # PEFT without bitsandbytes (see bitsandbytes_support)
    from peft import PeftModel

    first = sources[0]
    model, _, _ = load_task_model(first.cfg.model, first.cfg.task, num_labels=max(len(first.labels), 1))
    names = [f"source{i}" for i in range(len(sources))]
    peft_model = PeftModel.from_pretrained(model.backbone, first.run.model_files.backbone, adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:]):
        peft_model.load_adapter(source.run.model_files.backbone, adapter_name=name)
    torch.manual_seed(seed)  # DARE drops at random: the seed makes a merge reproducible
    try:
        peft_model.add_weighted_adapter(names, weights, MERGED, combination_type=method, density=density)
    except (ValueError, TypeError) as err:
        reason = str(err).splitlines()[0]
        raise TunelabError(f"PEFT cannot merge these adapters with '{method}': {reason}") from None
    staging = out_dir.with_name(out_dir.name + ".peft")
    peft_model.save_pretrained(staging, selected_adapters=[MERGED], safe_serialization=True)
    # A non-default adapter is saved in a subfolder of its name; the task runs load it as the default one.
    shutil.move(str(staging / MERGED), str(out_dir))
    shutil.rmtree(staging, ignore_errors=True)


def write_task_run(source: Source, merged_adapter: Path, task_dir: Path, recipe: dict) -> RunDir:
    """A run directory for one source task: the merged adapter, the task's own head, labels and tokenizer."""
    from tunelab.runtime.hardware import describe

    run = RunDir.create(task_dir, source.run.config_path.read_text(), seed=source.cfg.train.seed,
                        data_files={"train": source.cfg.data.train, "test": source.cfg.data.test},
                        hardware=describe())
    run.update_manifest(merged=recipe)
    files, src = run.model_files, source.run.model_files
    files.root.mkdir(parents=True)
    shutil.copytree(merged_adapter, files.backbone)
    if src.head.is_file():
        shutil.copy2(src.head, files.head)
    shutil.copytree(src.tokenizer, files.tokenizer)
    if source.labels:
        run.write_labels(source.labels)
    return run


def merge_runs(run_dirs: list[Path], method: str, weights: list[float] | None, density: float | None,
               output: Path, seed: int = 0, evaluate: bool = True, log=None) -> RunDir:
    """Merge, write one run per task, evaluate (source, merged, untuned base on every task) and finish.

    Everything is written in a temporary folder that takes the name `output` only once complete."""
    from tunelab.adapters.merge_eval import evaluate_merge, summary

    say = log.print if log is not None else (lambda *a, **k: None)
    sources = read_sources(run_dirs)
    check_mergeable(sources)
    weights, density = check_recipe(sources, method, weights, density)
    recipe = {"kind": "merge", "method": method, "weights": weights, "density": density, "seed": seed,
              "base": sources[0].cfg.model.name,
              "sources": [{"task": s.name, "run_dir": str(s.path), "labels": s.labels} for s in sources]}
    output = output_folder(output, "merge")
    with atomic_dir(output) as tmp:
        folder = RunDir(tmp)
        say(f"merge  {method} of {len(sources)} adapters ({', '.join(s.name for s in sources)}), "
            f"weights {weights}" + (f", density {density}" if density is not None else ""))
        adapter = tmp / ".merged-adapter"
        build_merged_adapter(sources, method, weights, density, seed, adapter)
        tasks = {s.name: write_task_run(s, adapter, folder.task_dir(s.name), recipe) for s in sources}
        shutil.rmtree(adapter)
        table = evaluate_merge(sources, {n: r.path for n, r in tasks.items()}, say) if evaluate else {}
        for s in sources:
            row = table.get(s.name, {})
            tasks[s.name].finish({"eval": row.get("merged"), "merge": recipe})
        atomic_write_json(folder.recipe_path, recipe)
        atomic_write_json(folder.metrics_path, {"recipe": recipe, "tasks": table, "summary": summary(table)})
    return RunDir(output)

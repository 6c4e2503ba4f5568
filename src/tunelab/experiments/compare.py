"""`tunelab compare`: several techniques on the same data, seed and budget, and one report.

The config is a normal run config plus a `compare:` section:

    compare:
      methods: [full, lora, dora, ia3, prompt, prefix, adapter]   # --methods on the command line wins
      per_method:                                                  # partial sections merged over the base
        lora:   {method: {rank: 8}}
        prompt: {method: {num_virtual_tokens: 20}, train: {lr: 3.0e-2}}

An entry of `methods` can also be a label for a variant, whose per_method section names the technique:

    compare:
      methods: [lora-r4, lora-r64]
      per_method:
        lora-r4:  {method: {name: lora, rank: 4}}
        lora-r64: {method: {name: lora, rank: 64}}

Every technique trains with the base config's data, seed and steps (its own default learning rate unless
the base or per_method sets one), as a normal run with its own run directory inside the comparison
directory. A technique that fails is reported with its error and the others still run.

The base config's `method:` knobs belong to the technique it names. Another technique gets its own defaults
for them, except for the knobs its own config section shares with the base's technique within one family
(lora, dora and qlora share rank, alpha, dropout and target_modules): `method: {name: lora, rank: 4}`
compared with `--methods full,dora` trains full fine-tuning with no rank and DoRA at rank 4. A knob for one
technique alone goes under `compare.per_method.<technique>.method`.

Running the same comparison again (same file, same output.name) resumes it: a technique whose run completed
under the same config and data is kept and not trained again (the console says so), one that stopped
(failed, interrupted, killed) under the same config resumes from its checkpoint, and one whose config changed
trains again, except that a completed run is never replaced: change output.name for a new comparison. A lock
file stops a second `tunelab compare` on the same directory.

Once a technique ends, its config.yaml, manifest.json and metrics.json (those it wrote) are copied into
`evidence/<label>/` of the comparison directory: the few small files that show what ran, on what, and what it
measured, without the weights. Committing the comparison folder without its run directories keeps them.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import typing
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from tunelab.config import (
    RunConfig, apply_overrides, dump_config, method_names, one_line_error, read_config_file, validate_config,
)
from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments.trials import TrialFailed, run_trial
from tunelab.methods import METHODS
from tunelab.runtime.atomic import atomic_dir, atomic_write_json, atomic_write_text
from tunelab.runtime.run_dir import RunDir
from tunelab.track.tracking import parent_run

# The folder of a comparison directory that holds each technique's small files (see the module docstring).
EVIDENCE_DIR = "evidence"
# Folders of a comparison directory that a technique's run directory (named by its label) must not take.
RESERVED_LABELS = (EVIDENCE_DIR, "plots")


class CompareSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(default_factory=lambda: ["full", "lora"])
    per_method: dict[str, dict] = Field(default_factory=dict)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def plan_comparison(path: str | Path, methods: list[str] | None, overrides: list[str]) -> tuple[dict[str, RunConfig], Path]:
    """Validate everything up front: the comparison section and every technique's full run config.

    A typo in the tenth technique's knobs should stop the comparison before the first one trains.
    """
    path = Path(path)
    raw = read_config_file(path)
    try:
        section = CompareSection.model_validate(raw.pop("compare", None) or {})
    except ValidationError as err:
        raise ConfigError(f"{path}: {one_line_error(err, CompareSection, prefix='compare')}") from None
    raw = apply_overrides(raw, overrides)
    chosen = methods or section.methods
    known = method_names()
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{path}: compare lists a method twice: {', '.join(chosen)}")
    taken = [label for label in chosen if label in RESERVED_LABELS]
    if taken:
        raise ConfigError(f"{path}: '{taken[0]}' cannot label a technique: the comparison directory keeps its own "
                          f"{taken[0]}/ folder; rename it under compare.per_method (with method.name)")
    techniques = {}
    for label in dict.fromkeys(list(chosen) + list(section.per_method)):
        name = ((section.per_method.get(label) or {}).get("method") or {}).get("name", label)
        if name not in known:
            raise ConfigError(
                f"{path}: unknown method '{name}' in compare (a variant label needs per_method.{label}.method.name); "
                f"choose from: {', '.join(known)}"
            )
        techniques[label] = name

    base_method = raw.get("method") or {}
    if base_method and "name" not in base_method:
        knob = next(iter(base_method))
        raise ConfigError(f"{path}: method.{knob} is set but method.name is not, so it belongs to no technique; "
                          f"name one, or move it under compare.per_method.<technique>.method")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path((raw.get("output") or {}).get("dir", "runs"))
    name = (raw.get("output") or {}).get("name") or f"compare-{stamp}"
    compare_dir = out_dir / name
    configs = {}
    for label in chosen:
        name = techniques[label]
        run_raw = {**raw, "method": {"name": name, **carried_method_knobs(base_method, name)}}
        run_raw = _merge(run_raw, section.per_method.get(label, {}))
        run_raw["output"] = {"dir": str(compare_dir), "name": label}
        try:
            configs[label] = validate_config(run_raw)
        except ConfigError as err:
            how = (f" (a knob for '{label}' alone goes under compare.per_method.{label}.method)"
                   if "'method." in str(err) else "")
            raise ConfigError(f"{path}: method '{label}': {err}{how}") from None
    return configs, compare_dir


def carried_method_knobs(base_method: dict, name: str) -> dict:
    """The base config's `method:` knobs that technique `name` takes over: all of them when the base names
    it; when the base names a technique of the same family (one config section extends the other, as dora's
    and qlora's extend lora's), the knobs both declare, save those `name` fixes (dora's use_dora); else none,
    and `name` keeps its defaults."""
    base_name = base_method.get("name")
    knobs = {k: v for k, v in base_method.items() if k != "name"}
    if base_name == name:
        return knobs
    if base_name not in METHODS:
        return {}
    mine, theirs = METHODS[name].config_class, METHODS[base_name].config_class
    if not (issubclass(mine, theirs) or issubclass(theirs, mine)):
        return {}
    fields = mine.model_fields
    return {k: v for k, v in knobs.items() if k in fields and not _fixed(fields[k].annotation)}


def _fixed(annotation) -> bool:
    """A field that can hold one value only, e.g. Literal[True]."""
    return typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1


def run_comparison(path: str | Path, methods: list[str] | None, overrides: list[str], console: Console) -> tuple[Path, list[dict]]:
    """Each technique trains in its own process (experiments/trials.py), so each reports its own peak memory
    and a crash (out of memory included) stays inside its own technique's row."""
    from filelock import FileLock, Timeout

    configs, compare_dir = plan_comparison(path, methods, overrides)
    if compare_dir.exists() and any(compare_dir.iterdir()) and not _is_comparison(compare_dir):
        raise TunelabError(f"{compare_dir} already exists and holds no comparison; set output.name to a new name")
    compare_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(compare_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TunelabError(f"{compare_dir}: another tunelab compare is running on it; wait for it to end, or set "
                           "output.name to a new name") from None
    try:
        plans = {label: _earlier_attempt(RunDir(compare_dir / label), cfg) for label, cfg in configs.items()}
        first = next(iter(configs.values()))
        # Each technique's MLflow run is filed under one parent run, which gets the comparison report.
        with parent_run(first.track, compare_dir.parent, compare_dir.name, "compare", console,
                        {"compare.methods": ",".join(configs)}) as parent:
            entries = _train_each(configs, plans, compare_dir, console)
            from tunelab.report import write_compare_report  # after the trials: matplotlib is no part of theirs

            write_compare_report(compare_dir, entries)
            if parent is not None:
                parent.log_report(compare_dir, _headline_metrics(entries))
    finally:
        lock.release()
    return compare_dir, entries


def _is_comparison(folder: Path) -> bool:
    """A folder a `tunelab compare` wrote (entries.json, or a technique's <label>.yaml beside its run) or holds
    the lock of (one that has only just started)."""
    return ((folder / "entries.json").is_file() or (folder / ".lock").exists()
            or any((folder / p.stem).is_dir() for p in folder.glob("*.yaml")))


def _data_files(cfg: RunConfig) -> dict[str, str | None]:
    return {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test}


def _earlier_attempt(run: RunDir, cfg: RunConfig) -> str:
    """What to do with a technique's run directory from an earlier run of this comparison: "new" (there is
    none), "keep" (completed under the same config and data), "resume" (stopped under the same config and
    data), "restart" (stopped under another). A completed run under another config stops the comparison
    before anything trains: it is never replaced."""
    if not run.is_run() or not run.manifest_path.is_file():
        return "new"
    same = run.config_path.read_text(encoding="utf-8") == dump_config(cfg) and not run.changed_data(_data_files(cfg))
    if run.is_complete():
        if not same:
            raise TunelabError(f"{run.path} completed under another config or data; set output.name to a new name "
                               f"for a new comparison, or remove {run.path} to train it again")
        return "keep"
    if run.status() == "running" and run.owner_alive():
        raise TunelabError(f"{run.path} is being trained by another process; wait for it to end")
    return "resume" if same else "restart"


def _train_each(configs: dict[str, RunConfig], plans: dict[str, str], compare_dir: Path,
                console: Console) -> list[dict]:
    entries = []
    for i, (label, cfg) in enumerate(configs.items(), 1):
        console.rule(f"[bold]{i}/{len(configs)}  {label}")
        run = RunDir(compare_dir / label)
        entry = {"method": label, "run_dir": str(run.path), "status": "completed", "error": None}
        plan = plans[label]
        if plan == "keep":
            console.print(f"{label}: completed earlier under the same config and data; kept, not trained again "
                          f"({run.path})", highlight=False)
            entry["reused"] = True
            entry["evidence_dir"] = keep_evidence(run, compare_dir, label)
            entries.append(entry)
            atomic_write_json(compare_dir / "entries.json", entries)
            continue
        if plan == "restart":
            console.print(f"{label}: the earlier attempt ({run.status()}) had another config or data; "
                          "training it again from the start", highlight=False)
            shutil.rmtree(run.path)
        elif plan == "resume":
            console.print(f"{label}: the earlier attempt {run.status()}; resuming it", highlight=False)
        # The exact config of each technique, beside the comparison: `tunelab train <label>.yaml` reruns it alone.
        atomic_write_text(compare_dir / f"{label}.yaml", dump_config(cfg))
        try:
            run_trial(cfg, console, resume_dir=str(run.path) if plan == "resume" else None)
        except (TunelabError, TrialFailed) as err:
            entry.update(status="failed", error=str(err).splitlines()[0] if str(err) else type(err).__name__)
            if not run.is_run():
                entry["run_dir"] = None
            elif run.status() in ("killed", "interrupted"):
                entry["status"] = run.status()  # a trial killed by the out-of-memory killer reads `killed`
            console.print(f"[red]{label} failed:[/] {entry['error']}")
        entry["evidence_dir"] = keep_evidence(run, compare_dir, label)
        entries.append(entry)
        atomic_write_json(compare_dir / "entries.json", entries)
    return entries


def keep_evidence(run: RunDir, compare_dir: Path, label: str) -> str | None:
    """Copy the technique's config.yaml, manifest.json and metrics.json (those that exist) into
    `evidence/<label>/` as one folder that appears whole or not at all, replacing an earlier attempt's.

    Returns the folder relative to the comparison directory, or None when the run wrote none of them (it
    failed before its run directory existed). A failed run keeps its manifest, which holds the error."""
    files = [p for p in (run.config_path, run.manifest_path, run.metrics_path) if p.is_file()]
    final = compare_dir / EVIDENCE_DIR / label
    if not files:
        shutil.rmtree(final, ignore_errors=True)  # an earlier attempt's files would describe another run
        return None
    final.parent.mkdir(exist_ok=True)
    with atomic_dir(final) as tmp:
        for src in files:
            shutil.copyfile(src, tmp / src.name)
    return f"{EVIDENCE_DIR}/{label}"


def _headline_metrics(entries: list[dict]) -> dict[str, float]:
    """Each completed technique's test accuracy or perplexity, for the parent run's metrics."""
    out = {}
    for e in entries:
        run = RunDir(e["run_dir"] or "")
        if e["status"] == "completed" and run.is_complete():
            test = json.loads(run.metrics_path.read_text()).get("eval") or {}
            for key in ("accuracy", "perplexity"):
                if isinstance(test.get(key), (int, float)):
                    out[f"{e['method']}.test.{key}"] = test[key]
    return out

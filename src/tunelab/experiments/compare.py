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
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from tunelab.config import (
    RunConfig, apply_overrides, dump_config, method_names, one_line_error, read_config_file, validate_config,
)
from tunelab.errors import ConfigError, TunelabError
from tunelab.experiments.trials import TrialFailed, run_trial
from tunelab.runtime.run_dir import RunDir


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
    techniques = {}
    for label in dict.fromkeys(list(chosen) + list(section.per_method)):
        name = ((section.per_method.get(label) or {}).get("method") or {}).get("name", label)
        if name not in known:
            raise ConfigError(
                f"{path}: unknown method '{name}' in compare (a variant label needs per_method.{label}.method.name); "
                f"choose from: {', '.join(known)}"
            )
        techniques[label] = name

    base_method = {k: v for k, v in (raw.get("method") or {}).items() if k != "name"}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path((raw.get("output") or {}).get("dir", "runs"))
    name = (raw.get("output") or {}).get("name") or f"compare-{stamp}"
    compare_dir = out_dir / name
    configs = {}
    for label in chosen:
        name = techniques[label]
        # The base's method knobs apply only to the technique they were written for.
        method_raw = base_method if (raw.get("method") or {}).get("name") == name else {}
        run_raw = _merge(raw, {"method": {"name": name, **method_raw}})
        run_raw = _merge(run_raw, section.per_method.get(label, {}))
        run_raw["output"] = {"dir": str(compare_dir), "name": label}
        try:
            configs[label] = validate_config(run_raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: method '{label}': {err}") from None
    return configs, compare_dir


def run_comparison(path: str | Path, methods: list[str] | None, overrides: list[str], console: Console) -> tuple[Path, list[dict]]:
    """Each technique trains in its own process (experiments/trials.py), so each reports its own peak memory
    and a crash (out of memory included) stays inside its own technique's row."""
    configs, compare_dir = plan_comparison(path, methods, overrides)
    if compare_dir.exists() and any(compare_dir.iterdir()):
        raise TunelabError(f"{compare_dir} already exists; set output.name to a new name or remove it")
    compare_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (label, cfg) in enumerate(configs.items(), 1):
        console.rule(f"[bold]{i}/{len(configs)}  {label}")
        # The exact config of each technique, beside the comparison: `tunelab train <label>.yaml` reruns it alone.
        (compare_dir / f"{label}.yaml").write_text(dump_config(cfg), encoding="utf-8")
        run = RunDir(compare_dir / label)
        entry = {"method": label, "run_dir": str(run.path), "status": "completed", "error": None}
        try:
            run_trial(cfg, console)
        except (TunelabError, TrialFailed) as err:
            entry.update(status="failed", error=str(err).splitlines()[0] if str(err) else type(err).__name__)
            if not run.is_run():
                entry["run_dir"] = None
            console.print(f"[red]{label} failed:[/] {entry['error']}")
        entries.append(entry)
        (compare_dir / "entries.json").write_text(json.dumps(entries, indent=2))
    from tunelab.report import write_compare_report  # after the trials: matplotlib is no part of their process

    write_compare_report(compare_dir, entries)
    return compare_dir, entries

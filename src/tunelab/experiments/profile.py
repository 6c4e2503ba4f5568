"""`tunelab profile CONFIG`: a few real training steps under torch.profiler.

The steps are FineTune.train's own, on the config's data, model and technique, so the table shows what
`tunelab train` spends its time on. The first `warmup` steps run unrecorded (lazy initialisation, allocator
growth, torch.compile's compilation), then `steps` are recorded. Written to a run directory of its own:

    ops.txt      torch's full key_averages table (self time, total time, calls, shapes collapsed)
    trace.json   Chrome trace: open in https://ui.perfetto.dev or chrome://tracing
    metrics.json the top ops, the forward/backward/optimizer split and the steps' tokens/s

The forward, backward and optimizer phases are marked in the loop with `record_function`, so their rows in
the table give the split without reading the trace.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tunelab.config import RunConfig
from tunelab.data.examples import load_splits
from tunelab.runtime.run_dir import RunDir

PHASES = ("tunelab.forward", "tunelab.backward", "tunelab.optimizer")


def _profile_config(cfg: RunConfig, steps: int, warmup: int) -> RunConfig:
    """The run's own config, cut to the profiled steps: no periodic eval, checkpoints or samples."""
    raw = cfg.model_dump()
    raw["train"].update(max_steps=warmup + steps, eval_every=None, save_every=None, log_every=1)
    raw["eval"].update(num_samples=0, untuned=False)
    if not raw["output"]["name"]:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        raw["output"]["name"] = f"profile-{Path(cfg.model.name).name}-{cfg.method.name}-{stamp}"
    return RunConfig.model_validate(raw)


def _rows(events, device: bool) -> list[dict]:
    key = "self_device_time_total" if device else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": getattr(e, key) / 1e3,
            "self_percent": 100 * getattr(e, key) / total,
            "total_ms": (e.device_time_total if device else e.cpu_time_total) / 1e3,
        }
        for e in events
    ]
    return sorted(rows, key=lambda r: -r["self_ms"])


def run_profile(cfg: RunConfig, steps: int = 5, warmup: int = 2, rows: int = 15,
                console: Console | None = None) -> tuple[RunDir, dict]:
    from tunelab.train.loop import FineTune
    from tunelab.train.run import create_run_dir

    console = console or Console(stderr=True)
    cfg = _profile_config(cfg, steps, warmup)
    splits = load_splits(cfg.data, cfg.task, cfg.train.seed)
    run = create_run_dir(cfg)
    run.update_manifest(kind="profile")
    console.print(f"run   {run.path}")
    try:
        recipe = FineTune(cfg, splits, run, console)
        recipe.setup()
        on_gpu = recipe.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
        # wait: run unrecorded; warmup (1 step): profiler on, results dropped (its own start-up cost); active.
        schedule = torch.profiler.schedule(wait=max(warmup - 1, 0), warmup=min(warmup, 1), active=steps, repeat=1)
        with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False) as prof:
            recipe.on_step = lambda step: prof.step()
            recipe.train()
        trace = run.profile_trace
        prof.export_chrome_trace(str(trace))
        averages = prof.key_averages()
        sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        run.profile_ops.write_text(averages.table(sort_by=sort, row_limit=100))
        table = [r for r in _rows(averages, on_gpu) if r["op"] not in PHASES and not r["op"].startswith("ProfilerStep")]
        phases = {e.key.removeprefix("tunelab."): e.cpu_time_total / 1e3 / steps for e in averages if e.key in PHASES}
        records = [r for r in _read_log(run) if r["step"] > warmup]
        summary = {
            "steps": steps,
            "warmup_steps": warmup,
            "device": str(recipe.device),
            "precision": recipe.precision,
            "phase_ms_per_step": phases,
            "real_tokens_per_s": (sum(r["real_tokens_per_s"] for r in records) / len(records)) if records else None,
            "top_ops": table[:rows],
            "trace": trace.name,
        }
        run.finish({"profile": summary})
    except BaseException as err:
        run.fail(err)
        raise
    _print(summary, on_gpu, console)
    return run, summary


def _read_log(run: RunDir) -> list[dict]:
    path = run.metrics_log_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _print(summary: dict, on_gpu: bool, console: Console) -> None:
    where = "GPU" if on_gpu else "CPU"
    table = Table(title=f"top ops by self {where} time, {summary['steps']} profiled steps", show_header=True)
    for col, justify in (("op", "left"), ("calls", "right"), (f"self {where} ms", "right"), ("share", "right")):
        table.add_column(col, justify=justify)
    for r in summary["top_ops"]:
        table.add_row(r["op"], f"{r['calls']:,}", f"{r['self_ms']:,.1f}", f"{r['self_percent']:.1f}%")
    console.print(table)
    phases = summary["phase_ms_per_step"]
    if phases:
        console.print("per step (CPU time): " + ", ".join(f"{k} {v:,.0f} ms" for k, v in phases.items()))
    if summary["real_tokens_per_s"]:
        console.print(f"profiled steps ran at {summary['real_tokens_per_s']:,.0f} real tokens/s (profiler overhead included)")

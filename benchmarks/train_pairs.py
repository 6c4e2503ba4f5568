"""One config, two or more settings, several rounds: paired ratios of whole `tunelab train` runs, with evidence.

The optimization guide's pairs (gradient checkpointing on/off, AdamW vs 8-bit AdamW) are whole training
runs, not one switch inside a benchmark harness, so this runs the real command line. Each round runs every
variant once, in alternating order (rounds.run_order), each in its own process so that each peak memory is
its own; a ratio is taken within a round (rounds.paired_ratios) and quoted as the median with its min-max.
Every run's config.yaml, manifest.json and metrics.json are copied next to the table, so the numbers in the
docs point at files.

    .venv/bin/python benchmarks/train_pairs.py checkpointing configs/smollm2-alpaca-lora.yaml \\
        --common "train.max_steps=4 data.max_train_samples=32 eval.num_samples=0 eval.untuned=false data.max_eval_samples=8" \\
        --variant off= --variant on=model.gradient_checkpointing=true --rounds 3

writes benchmarks/results/train_pairs_checkpointing.{md,json} and benchmarks/results/train_pairs/checkpointing/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import paired_ratios, run_order, spread_cell  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EVIDENCE_FILES = ("config.yaml", "manifest.json", "metrics.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="names the results: train_pairs_NAME.md/.json and train_pairs/NAME/")
    p.add_argument("config", help="the tunelab config every variant trains")
    p.add_argument("--common", default="", help="overrides every variant gets (space-separated key=value)")
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=OVERRIDES",
                   help="a label and its overrides (space-separated key=value, may be empty); the first is the "
                        "baseline the others are divided by")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    variants = {}
    for spec in args.variant:
        label, sep, overrides = spec.partition("=")
        if not sep or not label:
            p.error(f"--variant {spec!r}: expected LABEL=OVERRIDES (overrides may be empty, as in 'off=')")
        if label in variants:
            p.error(f"--variant {label!r} is given twice")
        variants[label] = shlex.split(overrides)
    if len(variants) < 2:
        p.error("give at least two --variant: a baseline and what it is compared with")
    args.variants = variants
    return args


def run_variant(args: argparse.Namespace, label: str, round_index: int, work: Path) -> dict:
    """One `tunelab train` in its own process; its metrics, or the error that stopped it."""
    name = f"{args.name}-{label}-r{round_index + 1}"
    cmd = [sys.executable, "-m", "tunelab", "train", args.config, *shlex.split(args.common),
           *args.variants[label], f"output.dir={work}", f"output.name={name}"]
    print(f"\n### round {round_index + 1}: {label}: {shlex.join(cmd[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run_dir = work / name
    if proc.returncode != 0 or not (run_dir / "metrics.json").is_file():
        return {"error": f"exit status {proc.returncode}", "command": shlex.join(cmd[2:])}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dest = args.results / "train_pairs" / args.name / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in EVIDENCE_FILES:
        shutil.copy2(run_dir / f, dest / f)
    train, ev = metrics["train"], metrics.get("eval", {})
    return {"real_tokens_per_s": train["real_tokens_per_s"], "wall_s": train["wall_s"],
            "peak_memory_bytes": train["peak_memory_bytes"],
            "estimated_peak_memory_bytes": train.get("estimated_peak_memory_bytes"),
            "precision": train["precision"], "steps": train["steps"], "eval_loss": ev.get("loss"),
            "command_wall_s": round(time.perf_counter() - started, 1),
            "evidence": rel(dest), "command": shlex.join(cmd[2:])}


def rel(path: Path) -> str:
    """A path as the docs should quote it: relative to the project when it lies inside."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def table(rounds: list[dict[str, dict]], labels: list[str]) -> list[str]:
    base = labels[0]
    lines = [f"| variant | precision | real tokens/s (median, min-max) | vs {base}, paired | peak memory (median) | "
             f"vs {base}, paired | estimated peak | eval loss |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        runs = [r[label] for r in rounds if "error" not in r[label]]
        if len(runs) < len(rounds):
            failed = next(r[label] for r in rounds if "error" in r[label])
            lines.append(f"| {label} | failed: {failed['error']} in {len(rounds) - len(runs)} of {len(rounds)} "
                         f"rounds | | | | | | |")
            continue
        speeds = [r["real_tokens_per_s"] for r in runs]
        peaks = sorted(r["peak_memory_bytes"] for r in runs)
        losses = sorted({f"{r['eval_loss']:.4f}" for r in runs if r["eval_loss"] is not None})
        speed_ratio = spread_cell(paired_ratios(rounds, label, base)) if label != base else "1.00x"
        peak_ratio = (spread_cell(paired_ratios(rounds, label, base, "peak_memory_bytes")) if label != base
                      else "1.00x")
        lines.append(f"| {label} | {runs[0]['precision']} | {spread_cell(speeds, ',.1f', '')} | {speed_ratio} | "
                     f"{gib(peaks[(len(peaks) - 1) // 2])} | {peak_ratio} | "
                     f"{gib(runs[0]['estimated_peak_memory_bytes'])} | {' / '.join(losses) or '—'} |")
    return lines


def machine_line() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = list(args.variants)
    shutil.rmtree(args.results / "train_pairs" / args.name, ignore_errors=True)  # evidence of this run only
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-pairs-") as tmp:
        for i in range(max(1, args.rounds)):
            ran = {label: run_variant(args, label, i, Path(tmp)) for label in run_order(labels, i)}
            rounds.append({label: ran[label] for label in labels})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/train_pairs.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# `{args.name}`: {len(rounds)} rounds, {when}", "", f"Command: `{command}`", "",
             f"Machine: {machine_line()}", "", *table(rounds, labels), "",
             f"- Each round ran every variant once, in alternating order, each in its own process; a ratio is "
             f"taken within a round and quoted as the median (min-max) over rounds.",
             f"- Each run's config, manifest and metrics: `{rel(args.results / 'train_pairs' / args.name)}/`."]
    md = args.results / f"train_pairs_{args.name}.md"
    md.write_text("\n".join(lines) + "\n")
    md.with_suffix(".json").write_text(json.dumps(
        {"name": args.name, "date": when, "command": command, "machine": machine_line(), "config": args.config,
         "common": args.common, "variants": args.variants, "rounds": rounds}, indent=1) + "\n")
    print("\n".join(lines))
    failed = any("error" in run for r in rounds for run in r.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

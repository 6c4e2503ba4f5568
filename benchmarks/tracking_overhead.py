"""What MLflow tracking costs a training run: the quickstart with track.enabled true vs false, paired.

    flock /tmp/tunelab-measure.lock python benchmarks/tracking_overhead.py --pairs 3

Runs `tunelab train examples/beginner/full-fine-tuning/config.yaml` (the quickstart, `make demo`) as a fresh
process per run, in pairs whose order alternates (off then on, on then off, ...) so that a drift in machine speed (other
work on a shared machine) and any cost of running second fall on both sides alike. Each run writes into its own folder under --workdir; the tracked runs share
one embedded store there, so the first tracked run also pays creating the SQLite store (its schema
migrations), as a user's first run does. Reported: each pair's wall times (process start to exit) and ratio,
the median ratio over pairs with its spread, and /proc/loadavg before and after every run.

Writes benchmarks/results/tracking_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "examples/beginner/full-fine-tuning/config.yaml"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def one_run(tracked: bool, workdir: Path, name: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tunelab", "train", CONFIG, f"track.enabled={str(tracked).lower()}",
           f"output.dir={workdir}", f"output.name={name}", *overrides]
    before = loadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((workdir / name / "metrics.json").read_text())
    manifest = json.loads((workdir / name / "manifest.json").read_text())
    warned = [line for line in proc.stderr.splitlines() if "tracking off" in line]
    if tracked and ("mlflow" not in manifest or warned):
        raise SystemExit(f"{name}: tracking did not run ({warned})")
    return {"name": name, "tracking": tracked, "wall_s": round(wall, 2), "total_wall_s": metrics["total_wall_s"],
            "train_wall_s": metrics["train"]["wall_s"], "accuracy": metrics["eval"]["accuracy"],
            "precision": metrics["train"]["precision"], "loadavg_before": before, "loadavg_after": loadavg(),
            "mlflow_run_id": (manifest.get("mlflow") or {}).get("run_id")}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-tracking")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tracking_overhead")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides for every run (smoke tests: train.max_steps=2)")
    args = parser.parse_args()
    if args.workdir.exists() and any(args.workdir.iterdir()):
        raise SystemExit(f"{args.workdir} is not empty; remove it or give --workdir")
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs, pairs = [], []
    for i in range(args.pairs):
        # Odd pairs run on before off: a run that is slower for being second (page cache, the previous run's
        # writes still being flushed, a machine that slows as it warms) then counts against both sides.
        if i % 2 == 0:
            off = one_run(False, args.workdir, f"off-{i}", args.overrides)
            on = one_run(True, args.workdir, f"on-{i}", args.overrides)
        else:
            on = one_run(True, args.workdir, f"on-{i}", args.overrides)
            off = one_run(False, args.workdir, f"off-{i}", args.overrides)
        runs += [off, on]
        pairs.append({"pair": i, "off_s": off["wall_s"], "on_s": on["wall_s"], "ratio": round(on["wall_s"] / off["wall_s"], 4),
                      "train_loop_ratio": round(on["train_wall_s"] / off["train_wall_s"], 4)})
        print(f"pair {i}: off {off['wall_s']:.1f} s, on {on['wall_s']:.1f} s, ratio {pairs[-1]['ratio']:.4f} "
              f"(load {off['loadavg_before']} -> {on['loadavg_after']})", flush=True)
    ratios = [p["ratio"] for p in pairs]
    result = {
        "command": " ".join(["python", "benchmarks/tracking_overhead.py", "--pairs", str(args.pairs), *args.overrides]),
        "config": CONFIG, "commit": os.environ.get("TUNELAB_COMMIT") or _commit(), "cpu": cpu_model(), "cores": os.cpu_count(), "precision": runs[0]["precision"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
        "pairs": pairs, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Tracking overhead: the quickstart with MLflow tracking on vs off",
        "",
        f"`{result['command']}` on {result['cpu']} ({result['cores']} cores), precision {result['precision']}.",
        "Even pairs ran off then on, odd pairs on then off, as fresh processes; wall time is process start to exit.",
        "",
        "| pair | off (s) | on (s) | on / off | training loop on / off | load before and after the pair |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for p, (off, on) in zip(pairs, zip(runs[::2], runs[1::2])):
        first, second = (off, on) if p["pair"] % 2 == 0 else (on, off)
        lines.append(f"| {p['pair']} | {p['off_s']:.1f} | {p['on_s']:.1f} | {p['ratio']:.4f} | "
                     f"{p['train_loop_ratio']:.4f} | {first['loadavg_before']} -> {second['loadavg_after']} |")
    lines += ["", f"Median on/off ratio: **{result['median_ratio']:.4f}** (range {result['min_ratio']:.4f} to "
              f"{result['max_ratio']:.4f}). Test accuracy, identical on both sides: "
              f"{sorted({r['accuracy'] for r in runs})}.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

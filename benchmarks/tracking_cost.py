"""What tracking one run costs by itself: the MLflow part of `tunelab train`, without the training.

    python benchmarks/tracking_cost.py RUN_DIR [--repeats 3] [--profile] [--where in-process|worker]

RUN_DIR is any finished run directory (an untracked one: `track.enabled=false`). Each repeat copies it (without
model/) into a fresh folder and, in a fresh Python process, does what a tracked `tunelab train` does around its
training: start the MLflow run (import mlflow, open the store, create the run, log params and data inputs),
send metrics.jsonl as the training loop would, finish (final metrics, tags, artifacts), then log the report.
--where worker times the default instead: the same work in the tracking worker process, from its start until it
has finished; nothing runs beside it here, so this is the work itself, not what it adds to a training run that
it overlaps. Two cases: a new store (the first tracked run under an output folder pays creating the SQLite store) and a
store that already exists (every later run). Printed: each process's wall time of that part and its CPU time,
in the timed process and in the worker (CPU time barely depends on what else the machine runs), and the
median wall time.
--profile prints the cProfile of one process (cumulative time, top 35).

The paired quickstart benchmark (benchmarks/tracking_overhead.py) is the one the 3% target is measured by; this
one says where the fixed cost goes, in seconds, without the noise of a training run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from rich.console import Console
from tunelab.config import load_config
from tunelab.runtime.run_dir import RunDir
run = RunDir(sys.argv[1])
cfg = load_config(run.config_path)
cfg = cfg.model_copy(update={"track": cfg.track.model_copy(update={"enabled": True}),
                             "output": cfg.output.model_copy(update={"dir": sys.argv[2]})})
console = Console(stderr=True)
lines = [json.loads(l) for l in run.metrics_log_path.read_text().splitlines() if l.strip()]
t1, cpu1 = time.perf_counter(), time.process_time()

def tracked():
    from tunelab.track import tracking
    tracking.IN_PROCESS = sys.argv[4] == "in-process"
    tracker = tracking.open_tracking(cfg, console)
    tracker.start(run, cfg.track, cfg.output.dir)
    for record in lines:
        for listener in run.listeners:
            listener(record)
    tracker.finish(run)
    tracking.log_report(run.path, console)
    return tracker

if sys.argv[3] == "profile":
    import cProfile, pstats
    prof = cProfile.Profile()
    tracker = prof.runcall(tracked)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
else:
    tracker = tracked()
t2, cpu2 = time.perf_counter(), time.process_time()
children = resource.getrusage(resource.RUSAGE_CHILDREN)
assert tracker.run_id and not tracker.broken, "tracking failed"
print(json.dumps({"setup_s": t1 - t0, "tracking_s": t2 - t1, "cpu_s": cpu2 - cpu1,
                  "worker_cpu_s": children.ru_utime + children.ru_stime}))
"""


def one(template: Path, root: Path, name: str, mode: str, where: str) -> dict:
    run = root / name
    shutil.copytree(template, run, ignore=shutil.ignore_patterns("model", "checkpoints"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("mlflow", None)
    (run / "manifest.json").write_text(json.dumps(manifest))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), str(root), mode, where], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    if mode == "profile":
        print(proc.stdout)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"name": name, "process_wall_s": round(wall, 2), "tracking_s": round(result["tracking_s"], 2),
            "cpu_s": round(result["cpu_s"], 2), "worker_cpu_s": round(result["worker_cpu_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one tracked process (new store)")
    parser.add_argument("--where", choices=("in-process", "worker"), default="in-process",
                        help="in-process: all of it in the timed process; worker: the default, a process of its own")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracking-cost-") as tmp:
        if args.profile:
            one(args.run_dir, Path(tmp) / "profile", "run", "profile", args.where)
            return
        cases = {}
        one(args.run_dir, Path(tmp) / "existing", "prime", "plain", args.where)  # creates the store the second case reuses
        for case in ("new store", "existing store"):
            times = []
            for i in range(args.repeats):
                root = Path(tmp) / (f"new-{i}" if case == "new store" else "existing")
                result = one(args.run_dir, root, f"run-{i}", "plain", args.where)
                times.append(result["tracking_s"])
                print(f"{case} {i}: tracking {result['tracking_s']:.2f} s wall, CPU {result['cpu_s']:.2f} s in the "
                      f"timed process + {result['worker_cpu_s']:.2f} s in its worker "
                      f"(process {result['process_wall_s']:.2f} s)", flush=True)
            cases[case] = statistics.median(times)
        print(json.dumps({k: round(v, 2) for k, v in cases.items()}))


if __name__ == "__main__":
    main()

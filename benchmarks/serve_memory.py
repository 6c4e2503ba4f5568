"""Memory of N adapters served on one base vs N models loaded the usual way (one TrainedModel each).

Each setup runs in a fresh subprocess that loads the run N times under N names and reports its resident
memory (VmRSS) before and after, so the numbers are the process's own. `shared` is how `tunelab serve`
loads (ModelRegistry: one base, N module trees over its tensors); `separate` is N independent loads.

    .venv/bin/python benchmarks/serve_memory.py --run runs/serving-assistant --copies 1 4 8

Results are appended to benchmarks/results/serve_memory.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import cpu_name, loadavg, results_path  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(run: str, copies: int, setup: str) -> None:
    import gc

    import torch  # noqa: F401  (imported before the baseline, so the baseline holds the libraries)
    import transformers  # noqa: F401

    from tunelab.inference.trained import TrainedModel
    from tunelab.serve.registry import ModelRegistry

    gc.collect()
    before = rss_mb()
    if setup == "shared":
        registry = ModelRegistry()
        models = [registry.load(f"m{i}", run) for i in range(copies)]
    else:
        models = [TrainedModel(run) for _ in range(copies)]
    gc.collect()
    print(json.dumps({"setup": setup, "copies": copies, "rss_before_mb": round(before, 1),
                      "rss_after_mb": round(rss_mb(), 1), "loaded": len(models)}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--results", default="serve_memory")
    ap.add_argument("--child", nargs=2, metavar=("COPIES", "SETUP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.run, int(args.child[0]), args.child[1])
    rows = []
    for copies in args.copies:
        for setup in ("shared", "separate"):
            out = subprocess.run([sys.executable, __file__, "--run", args.run, "--child", str(copies), setup],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["added_mb"] = round(row["rss_after_mb"] - row["rss_before_mb"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": args.run,
               "command": " ".join(shlex.quote(a) for a in sys.argv), "cpu": cpu_name(), "loadavg": loadavg(),
               "rows": rows}
    path = results_path(args.results, "json")
    path.write_text(json.dumps((json.loads(path.read_text()) if path.exists() else []) + [summary], indent=2) + "\n")
    lines = [f"\n## {summary['date']}\n", f"`{summary['command']}`\n",
             f"CPU: {summary['cpu']}; memory is load-independent (loadavg {summary['loadavg']})\n",
             "| copies of the run | served on one base (MB added) | loaded separately (MB added) |", "|---:|---:|---:|"]
    for copies in args.copies:
        shared = next(r for r in rows if r["copies"] == copies and r["setup"] == "shared")
        separate = next(r for r in rows if r["copies"] == copies and r["setup"] == "separate")
        lines.append(f"| {copies} | {shared['added_mb']:,} | {separate['added_mb']:,} |")
    with open(results_path(args.results, "md"), "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

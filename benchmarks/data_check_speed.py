"""How long `tunelab data check` takes on every bundled data set against its own test split, with --model.

    flock /tmp/tunelab-measure.lock python benchmarks/data_check_speed.py

One fresh process per data set (imports, reading, every check, tokenising with the model's tokenizer, the
HTML report): wall time from start to exit, the checks' own split (read / checks / tokenize), what each
check found, and /proc/loadavg before and after. The target: under 30 s each on the 2-core CPU.

Writes benchmarks/results/data_check_speed.json and .md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = {  # data set -> (model whose tokens are counted, max_length its shipped configs use)
    "imdb": ("minilm-l6", 128), "sst2": ("minilm-l6", 64), "sms_spam": ("minilm-l6", 128),
    "trec": ("minilm-l6", 64), "alpaca_2k": ("smollm2-135m", 256),
}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    rows = []
    for name, (model, max_length) in SETS.items():
        out = Path(tempfile.mkdtemp(prefix=f"check-{name}-"))
        cmd = ["tunelab", "data", "check", f"data/{name}/train.jsonl", "--against", f"data/{name}/test.jsonl",
               "--model", model, "--max-length", str(max_length), "--output", str(out)]
        before = loadavg()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tunelab", *cmd[1:]], cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        report = json.loads((out / "data_check.json").read_text())
        rows.append({"data": name, "command": " ".join(cmd[:-2]), "wall_s": round(wall, 2), "seconds": report["seconds"],
                     "rows": sum(f["rows"] for f in report["files"]), "loadavg_before": before, "loadavg_after": loadavg(),
                     "totals": report["totals"], "token_lengths": report["token_lengths"]})
        print(f"{name}: {wall:.1f} s ({report['seconds']}), load {before} -> {rows[-1]['loadavg_after']}", flush=True)
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    result = {"command": "python benchmarks/data_check_speed.py", "cpu": cpu, "cores": os.cpu_count(), "runs": rows}
    dest = REPO / "benchmarks" / "results" / "data_check_speed"
    dest.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `tunelab data check` speed on the bundled data sets", "",
             f"`{result['command']}` on {cpu} ({os.cpu_count()} cores). Each row: train against its test split, "
             "with --model tokenisation, one fresh process.", "",
             "| data | rows | wall (s) | read / checks / tokenize (s) | load before -> after |", "|---|---:|---:|---|---|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['data']} | {r['rows']:,} | {r['wall_s']:.1f} | {s.get('read')} / {s.get('checks')} / "
                     f"{s.get('tokenize')} | {r['loadavg_before']} -> {r['loadavg_after']} |")
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Two runs of the distributed example side by side: the logged training losses, the test metrics and the
largest weight difference (backbone and head), written as JSON.

    python examples/expert/distributed-fine-tuning/results/compare_runs.py runs/dist-1proc runs/dist-2proc \
        > examples/expert/distributed-fine-tuning/results/compare-1proc-2proc.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), "the two files hold different tensors"
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def main(a: Path, b: Path) -> dict:
    out = {"runs": [str(a), str(b)]}
    for name, run in (("a", a), ("b", b)):
        metrics = json.loads((run / "metrics.json").read_text())
        out[name] = {"losses": losses(run), "eval": {k: metrics["eval"][k] for k in ("accuracy", "f1_macro", "loss")},
                     "train_wall_s": metrics["train"]["wall_s"], "peak_memory_bytes": metrics["train"]["peak_memory_bytes"],
                     "num_processes": metrics["train"].get("num_processes")}
    la, lb = out["a"]["losses"], out["b"]["losses"]
    out["max_loss_diff"] = max(abs(la[s] - lb[s]) for s in la.keys() & lb.keys())
    out["max_weight_diff"] = {
        "backbone": max_diff(a / "model/backbone/model.safetensors", b / "model/backbone/model.safetensors"),
        "head": max_diff(a / "model/head.safetensors", b / "model/head.safetensors"),
    }
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))

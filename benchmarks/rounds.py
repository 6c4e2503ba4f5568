"""Several rounds of one benchmark, summarised as medians with their spread and as paired ratios.

A single timing on a shared 2-core machine moves by 10-20% from one run to the next, so a ratio between two
setups is only worth quoting as the median of several rounds. Each round runs every setup once; the ratio is
taken within a round (paired), so a change in machine load during the benchmark hits both sides of a ratio
alike. Used by vs_hf_trainer.py (--repeats); kept apart so that file stays readable.
"""

from __future__ import annotations

import statistics

SPEED = "real_tokens_per_s"


def run_order(names: list[str], round_index: int) -> list[str]:
    """Alternate the order between rounds, so no setup always runs first (on a cold page cache) or last."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def median_row(runs: list[dict]) -> dict:
    """The run with the median speed stands for the setup (its memory and accuracy come from one real run,
    not a mix), with every run's speed and wall time attached. A setup that failed in any round is a failure."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"error": f"{failed[0]['error']} (in {len(failed)} of {len(runs)} rounds)"}
    ranked = sorted(runs, key=lambda r: r[SPEED])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["runs"] = len(runs)
    row["speed_runs"] = [r[SPEED] for r in runs]
    row["wall_runs"] = [r["wall_s"] for r in runs]
    row[SPEED] = statistics.median(row["speed_runs"])
    row["wall_s"] = statistics.median(row["wall_runs"])
    return row


def summarise(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    names = list(rounds[0])
    return {n: median_row([r[n] for r in rounds]) for n in names}


def paired_ratios(rounds: list[dict[str, dict]], ours: str, baseline: str, key: str = SPEED) -> list[float]:
    """ours / baseline for each round where both ran."""
    out = []
    for r in rounds:
        a, b = r.get(ours, {}), r.get(baseline, {})
        if "error" not in a and "error" not in b and a.get(key) and b.get(key):
            out.append(a[key] / b[key])
    return out


def spread_cell(values: list[float], spec: str = ".2f", suffix: str = "x") -> str:
    """'1.16x (0.90-1.20x, 3 runs)': the median, then min-max."""
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:{spec}}{suffix} (1 run)"
    return f"{med:{spec}}{suffix} ({min(values):{spec}}-{max(values):{spec}}{suffix}, {len(values)} runs)"


def paired_table(rounds: list[dict[str, dict]], labels: dict[str, str], ours: str = "tunelab") -> list[str]:
    """tunelab over each baseline, paired per round: speed, wall time and peak memory."""
    baselines = [n for n in rounds[0] if n != ours]
    lines = ["| tunelab ÷ (paired per round: median, min-max) | real tokens/s (higher is better) | train wall "
             "| peak memory |", "|---|---:|---:|---:|"]
    for name in baselines:
        speed = paired_ratios(rounds, ours, name)
        if not speed:
            continue
        wall = paired_ratios(rounds, ours, name, "wall_s")
        peak = paired_ratios(rounds, ours, name, "peak_memory_bytes")
        lines.append(f"| {labels[name]} | {spread_cell(speed)} | {spread_cell(wall)} | {spread_cell(peak)} |")
    return lines if len(lines) > 2 else []


def attach_paired(rows: dict[str, dict], rounds: list[dict[str, dict]], baseline: str) -> None:
    """Each row's speed over the baseline's, paired within each round (an ablation's 'vs baseline' column)."""
    if len(rounds) < 2 or baseline not in rows:
        return
    for name, row in rows.items():
        if "error" not in row:
            row["vs_baseline_runs"] = paired_ratios(rounds, name, baseline)
            row["peak_vs_baseline_runs"] = paired_ratios(rounds, name, baseline, "peak_memory_bytes")


def paired_cell(row: dict, key: str = "vs_baseline_runs") -> str:
    """'1.22x (1.18-1.25x, 3 runs)' where the row has paired ratios; '' where it was a single run."""
    return spread_cell(row[key]) if row.get(key) else ""

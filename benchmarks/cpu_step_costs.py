"""What a MiniLM training step costs on this CPU, by setting: dropout and precision.

Measures real tokens/s of forward + backward + AdamW step on a fixed batch (16 x 256 tokens, no padding),
each setting against the fp32-with-dropout baseline measured in the same round. It explains two defaults:
`precision: auto` only picks bf16 where the CPU runs it natively, and the shipped configs set
`model.dropout: 0.0`.

The bf16 row is also compared like for like, with the fp32 row of the same dropout (all 0): against the
dropout-0.1 baseline it would mix two changes. Each ratio is taken within a round (every setting once), and
the table gives the median over the rounds with the spread (benchmarks/rounds.py, as vs_hf_trainer.py).

    .venv/bin/python benchmarks/cpu_step_costs.py [ROUNDS]   # default 3

It writes benchmarks/results/cpu_step_costs.md (+ .json, every round's numbers) on a CPU that emulates bf16,
and cpu_step_costs_native_bf16.md (+ .json) on one with AVX512-BF16 or AMX, so both hosts keep their table.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).parent))
from rounds import SPEED, paired_ratios, run_order, spread_cell  # noqa: E402

from tunelab.models.loading import quiet_transformers
from tunelab.models.registry import minilm_dir
from tunelab.runtime.hardware import cpu_has_fast_bf16, describe, usable_cores

BATCH, SEQ, STEPS = 16, 256, 3
RESULTS_DIR = Path(__file__).parent / "results"
LIKE_FOR_LIKE = {"bf16 autocast, all dropout 0": "fp32, all dropout 0"}  # same dropout, only the precision differs
SETTINGS = [
    ("fp32, model's dropout (0.1)", {}, None),
    ("fp32, attention dropout 0", {"attention_probs_dropout_prob": 0.0}, None),
    ("fp32, all dropout 0", {"attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0}, None),
    ("bf16 autocast, all dropout 0", {"attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0}, torch.bfloat16),
]


def tokens_per_s(overrides: dict, dtype) -> float:
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32, **overrides).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 20000, (BATCH, SEQ))
    mask = torch.ones_like(ids)

    def step():
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden.float().mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return BATCH * SEQ * STEPS / (time.perf_counter() - start)


def main() -> None:
    rounds_wanted = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    torch.set_num_threads(usable_cores())
    quiet_transformers()
    hw = describe()
    settings = {name: (overrides, dtype) for name, overrides, dtype in SETTINGS}
    rounds: list[dict[str, dict]] = []
    for r in range(rounds_wanted):
        ran = {}
        for name in run_order(list(settings), r):
            ran[name] = {SPEED: tokens_per_s(*settings[name])}
            print(f"round {r + 1}: {name:32s} {ran[name][SPEED]:8.0f} tok/s", flush=True)
        rounds.append({name: ran[name] for name in settings})
    base = SETTINGS[0][0]
    lines = [
        "# MiniLM training-step cost by setting",
        "",
        f"Machine: {hw['cpu']}, {hw['usable_cores']} cores, torch {torch.__version__}, "
        f"native bf16 (AMX/AVX512-BF16): {cpu_has_fast_bf16()}. Python {platform.python_version()}.",
        f"Fixed batch {BATCH} x {SEQ} tokens, forward + backward + AdamW, mean of {STEPS} steps after one warm-up; "
        f"{rounds_wanted} rounds of every setting, median (min-max); each ratio is paired within its round.",
        "",
        f"Command: `.venv/bin/python benchmarks/cpu_step_costs.py {rounds_wanted}`",
        "",
        "| setting | real tokens/s | vs baseline | like for like |",
        "|---|---:|---:|---:|",
    ]
    for name in settings:
        speeds = [r[name][SPEED] for r in rounds]
        pair = LIKE_FOR_LIKE.get(name)
        like = f"{spread_cell(paired_ratios(rounds, name, pair), '.3f')} vs {pair}" if pair else ""
        lines.append(f"| {name} | {spread_cell(speeds, ',.0f', '')} | {spread_cell(paired_ratios(rounds, name, base))} "
                     f"| {like} |")
    stem = "cpu_step_costs_native_bf16" if cpu_has_fast_bf16() else "cpu_step_costs"
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{stem}.md").write_text("\n".join(lines) + "\n")
    raw = {"cpu": hw["cpu"], "cores": hw["usable_cores"], "native_bf16": cpu_has_fast_bf16(),
           "torch": torch.__version__, "batch": BATCH, "seq": SEQ, "steps": STEPS,
           "command": f".venv/bin/python benchmarks/cpu_step_costs.py {rounds_wanted}",
           "rounds": [{name: r[name][SPEED] for name in settings} for r in rounds]}
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {RESULTS_DIR / stem}.md and .json")


if __name__ == "__main__":
    main()

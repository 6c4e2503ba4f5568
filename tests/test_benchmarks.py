"""The benchmark scripts' own logic (arguments, tables), fast; one end-to-end smoke run marked slow."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


vs = _load("vs_hf_trainer")


def _row(tokens_per_s: float, wall: float, peak: int, accuracy: float = 0.8) -> dict:
    return {"precision": "fp32", "trainable_params": 1000, "steps": 3, "real_tokens": int(tokens_per_s * wall),
            "real_tokens_per_s": tokens_per_s, "wall_s": wall, "peak_memory_bytes": peak,
            "eval": {"accuracy": accuracy}, "mfu": None}


def test_every_child_gets_the_parents_budget():
    args = vs.parse_args(["--workload", "alpaca", "--smoke", "--lora-targets", "q_proj,v_proj", "--seed", "7"])
    assert (args.train_samples, args.eval_samples, args.max_steps) == (32, 32, 3)
    child = vs.parse_args(vs.child_argv(args, "hf-best", Path("r.json"))[2:])
    for key in ("workload", "train_samples", "eval_samples", "epochs", "max_steps", "batch_size", "seed",
                "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
        assert getattr(child, key) == getattr(args, key), key
    assert child.one == "hf-best"


def test_workload_defaults_fill_what_is_not_given():
    args = vs.parse_args(["--workload", "imdb-512"])
    w = vs.WORKLOADS["imdb-512"]
    assert (args.train_samples, args.batch_size, args.lora_targets, args.max_steps) == (
        w.train_samples, w.batch_size, w.lora_targets, None)


def test_unknown_setup_is_refused():
    with pytest.raises(SystemExit):
        vs.parse_args(["--setups", "tunelab,trl"])


def test_ratios_are_tunelab_over_each_baseline_and_a_failure_stays_a_row():
    rows = {"hf-tutorial": _row(100, 40, 2 * 2**30), "hf-best": {"error": "exit status 1"},
            "tunelab": _row(250, 16, 2**30)}
    text = "\n".join(vs.compare_tables(vs.WORKLOADS["sst2"], rows))
    assert "| HF tutorial recipe | 2.50x | 0.40x | 0.50x |" in text
    assert "failed: exit status 1" in text
    assert "best HF Trainer setup | 2" not in text  # no ratio against a failed baseline


def test_ablation_rows_compare_with_the_baseline():
    rows = {"baseline": {**_row(200, 10, 2**30), "setting": "tuned"},
            "pad-to-max": {**_row(50, 40, 2**30), "setting": "pad"},
            "precision": {**_row(20, 5, 2**30), "setting": "bf16", "capped": True}}
    text = "\n".join(vs.ablation_table(vs.WORKLOADS["imdb-512"], rows))
    assert "| pad-to-max | pad | fp32 | 3 | 50 | 0.25x |" in text
    assert "— (capped)" in text  # a capped row's accuracy is not comparable and is not shown



def test_ablation_rounds_give_paired_ratios_against_the_baseline():
    """--ablation --repeats 3: each switch's 'vs baseline' is the median of ratios taken within a round."""
    rounds_mod = _load("rounds")
    base = {"setting": "tuned"}
    rounds = [{"baseline": {**_row(100, 10, 2**30), **base}, "lora-dropout-0": {**_row(125, 8, 2**30), "setting": "d0"}},
              {"baseline": {**_row(50, 20, 2**30), **base}, "lora-dropout-0": {**_row(55, 18, 2**30), "setting": "d0"}},
              {"baseline": {**_row(110, 9, 2**30), **base}, "lora-dropout-0": {**_row(132, 8, 2**30), "setting": "d0"}}]
    rows = rounds_mod.summarise(rounds)
    rounds_mod.attach_paired(rows, rounds, "baseline")
    text = "\n".join(vs.ablation_table(vs.WORKLOADS["alpaca"], rows))
    # Paired: 1.25, 1.10, 1.20 -> 1.20x; unpaired medians would give 125/100 = 1.25x.
    assert "| lora-dropout-0 | d0 | fp32 | 3 | 125 (55-132, 3 runs) | 1.20x (1.10-1.25x, 3 runs) |" in text
    assert "| baseline | tuned | fp32 | 3 | 100 (50-110, 3 runs) | 1.00x (1.00-1.00x, 3 runs) |" in text
    assert "| 1.00 GiB; 1.00x (1.00-1.00x, 3 runs) of the baseline's, paired |" in text
    single = {"baseline": {**_row(100, 10, 2**30), **base}}
    rounds_mod.attach_paired(single, [single], "baseline")  # one round: the plain ratio, no spread
    assert "| 100 | 1.00x |" in "\n".join(vs.ablation_table(vs.WORKLOADS["alpaca"], single))

@pytest.mark.slow
def test_vs_hf_trainer_smoke_writes_the_table(tmp_path):
    """Every setup runs end to end on a tiny budget (minutes on 2 busy cores)."""
    out = tmp_path / "vs.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_hf_trainer.py"), "--workload", "sst2", "--smoke",
           "--results", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    record = json.loads(out.with_suffix(".json").read_text())[-1]
    assert record["smoke"] and set(record["rows"]) == set(vs.SETUPS)  # hf-tutorial, hf-best, hf-best-heap, tunelab
    for row in record["rows"].values():
        assert "error" not in row and row["steps"] == 3 and row["real_tokens"] > 0
    # Same seeded data and budget: every setup trains the same real tokens.
    assert len({row["real_tokens"] for row in record["rows"].values()}) == 1
    assert "SMOKE TEST" in out.read_text()


def test_rounds_give_medians_and_paired_ratios():
    """--repeats: a row is the median-speed run, and ratios are paired within a round, with their spread."""
    rounds_mod = _load("rounds")
    rounds = [{"hf-best": _row(100, 10, 2**30), "tunelab": _row(120, 8, 2**30)},
              {"hf-best": _row(50, 20, 2**30), "tunelab": _row(55, 18, 2**30)},    # a loaded round: both slow
              {"hf-best": _row(110, 9, 2**30), "tunelab": _row(99, 11, 2**30)}]
    rows = rounds_mod.summarise(rounds)
    assert rows["tunelab"]["real_tokens_per_s"] == 99 and rows["tunelab"]["speed_runs"] == [120, 55, 99]
    assert rounds_mod.paired_ratios(rounds, "tunelab", "hf-best") == [1.2, 1.1, 0.9]
    table = "\n".join(rounds_mod.paired_table(rounds, vs.SETUPS))
    assert "| best HF Trainer setup | 1.10x (0.90-1.20x, 3 runs) |" in table
    # Unpaired medians would say 99/100 = 0.99x: pairing keeps the loaded round from mixing into the ratio.
    assert rounds_mod.run_order(["a", "b"], 1) == ["b", "a"]
    failed = rounds_mod.summarise([{"x": _row(1, 1, 1)}, {"x": {"error": "exit status 1"}}])
    assert failed["x"]["error"].startswith("exit status 1 (in 1 of 2 rounds)")


def test_cpu_step_costs_compares_bf16_like_for_like(tmp_path, monkeypatch):
    """The bf16 row's like-for-like ratio is against fp32 at the same dropout, paired per round; the old
    "vs baseline" ratio against the dropout-0.1 row mixes two changes (0.08x where like for like is 0.044x)."""
    costs = _load("cpu_step_costs")
    speeds = iter([721, 1089, 1255, 55, 55, 1255, 1089, 721])  # round 2 runs in reverse order (rounds.run_order)
    monkeypatch.setattr(costs, "tokens_per_s", lambda overrides, dtype: float(next(speeds)))
    monkeypatch.setattr(costs, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(costs, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(sys, "argv", ["cpu_step_costs.py", "2"])
    costs.main()
    bf16 = next(line for line in (tmp_path / "cpu_step_costs.md").read_text().splitlines() if line.startswith("| bf16"))
    assert "0.044x (0.044-0.044x, 2 runs) vs fp32, all dropout 0" in bf16
    assert "| 0.08x (0.08-0.08x, 2 runs) |" in bf16
    raw = json.loads((tmp_path / "cpu_step_costs.json").read_text())
    assert raw["native_bf16"] is False and raw["rounds"][1]["bf16 autocast, all dropout 0"] == 55


def test_cpu_step_costs_keeps_one_table_per_host_kind(tmp_path, monkeypatch):
    """An AVX512-BF16/AMX host writes its own table: the emulated-bf16 host's table is not overwritten."""
    costs = _load("cpu_step_costs")
    monkeypatch.setattr(costs, "tokens_per_s", lambda overrides, dtype: 2000.0 if dtype else 1000.0)
    monkeypatch.setattr(costs, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(costs, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(sys, "argv", ["cpu_step_costs.py", "1"])
    costs.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu_step_costs_native_bf16.json",
                                                          "cpu_step_costs_native_bf16.md"]
    assert "2.000x (1 run) vs fp32, all dropout 0" in (tmp_path / "cpu_step_costs_native_bf16.md").read_text()


def test_train_pairs_refuses_a_malformed_variant_and_a_lone_one():
    pairs = _load("train_pairs")
    with pytest.raises(SystemExit):
        pairs.parse_args(["x", "c.yaml", "--variant", "off="])  # nothing to compare with
    with pytest.raises(SystemExit):
        pairs.parse_args(["x", "c.yaml", "--variant", "off=", "--variant", "model.gradient_checkpointing"])
    args = pairs.parse_args(["x", "c.yaml", "--variant", "off=", "--variant", "on=a.b=1 c=2"])
    assert args.variants == {"off": [], "on": ["a.b=1", "c=2"]}


def test_train_pairs_pairs_within_rounds_and_a_failure_is_a_row_and_exit_1(tmp_path, monkeypatch):
    pairs = _load("train_pairs")
    speeds = {("off", 0): 100, ("on", 0): 66, ("off", 1): 50, ("on", 1): 35, ("off", 2): 110, ("on", 2): 70}
    order = []

    def fake(args, label, i, work):
        order.append((i, label))
        return {"real_tokens_per_s": speeds[label, i], "wall_s": 1.0, "peak_memory_bytes": 2**30 * (1 if label == "on" else 2),
                "estimated_peak_memory_bytes": None, "precision": "fp32", "steps": 4, "eval_loss": 1.96561,
                "evidence": "x", "command": "c"}
    monkeypatch.setattr(pairs, "run_variant", fake)
    argv = ["ckpt", "c.yaml", "--variant", "off=", "--variant", "on=m.g=true", "--results", str(tmp_path)]
    assert pairs.main(argv) == 0
    assert order[:4] == [(0, "off"), (0, "on"), (1, "on"), (1, "off")]  # alternating order
    text = (tmp_path / "train_pairs_ckpt.md").read_text()
    # 0.66, 0.70, 0.636 paired -> 0.66x; the peak halves in every round.
    assert "| on | fp32 | 66.0 (35.0-70.0, 3 runs) | 0.66x (0.64-0.70x, 3 runs) | 1.00 GiB | 0.50x (0.50-0.50x, 3 runs) |" in text
    record = json.loads((tmp_path / "train_pairs_ckpt.json").read_text())
    assert len(record["rounds"]) == 3 and record["variants"] == {"off": [], "on": ["m.g=true"]}
    monkeypatch.setattr(pairs, "run_variant", lambda args, label, i, work: {"error": "exit status 2", "command": "c"}
                        if label == "on" else fake(args, label, i, work))
    assert pairs.main(argv) == 1
    assert "| on | failed: exit status 2 in 3 of 3 rounds |" in (tmp_path / "train_pairs_ckpt.md").read_text()

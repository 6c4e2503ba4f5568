"""tunelab against the Hugging Face Trainer + PEFT recipe: same model, data, LoRA, budget and seed.

Four setups per workload, run one after another, each in its own subprocess so that each peak memory
(process RSS on CPU) is its own:

    hf-tutorial  AutoModelForSequenceClassification / AutoModelForCausalLM + PEFT LoRA + Trainer, written the
                 way the tutorials write it: every example padded to max_length, fp32, the model's own dropout,
                 random batches, default_data_collator.
    hf-best      the fastest honest Trainer setup: dynamic padding to a multiple of 8, length-grouped batches
                 (train_sampling_strategy="group_by_length"), the model's dropout set to 0 through its config,
                 bf16 only where the CPU runs it natively (AMX/AVX512-BF16; elsewhere it is emulated and ~12x
                 slower, so fp32).
    hf-best-heap hf-best started with the glibc settings that tunelab's default train.cpu_heap=keep applies
                 (not a Trainer setting: it shows how much of the difference is the allocator).
    tunelab      run_training on the equivalent config (mean-pooling head for classification, as tunelab does).

All of them train the same seeded subset with the same LoRA (rank, alpha, dropout, targets), learning rate,
schedule, warmup, weight decay and clipping. Neither side evaluates or saves a checkpoint during training:
train time is training only. Real tokens are the attention-mask sums of every training batch (Trainer counts
them itself with include_num_input_tokens_seen="non_padding"); peak memory is read right after training,
before evaluation. MFU uses one model-FLOPs-per-real-token figure per workload (tunelab.plan), so it is
proportional to real tokens/s: padding is work the hardware did, not work the model needed.

    .venv/bin/python benchmarks/vs_hf_trainer.py --workload imdb-512
    .venv/bin/python benchmarks/vs_hf_trainer.py --workload sst2
    .venv/bin/python benchmarks/vs_hf_trainer.py --workload alpaca
    .venv/bin/python benchmarks/vs_hf_trainer.py --workload imdb-512 --ablation   # tunelab only, one switch at a time
    .venv/bin/python benchmarks/vs_hf_trainer.py --workload sst2 --smoke --results /tmp/smoke.md   # every path, tiny

Results are appended to benchmarks/results/vs_hf_trainer.md (command, machine, date, tables) and
benchmarks/results/vs_hf_trainer.json (one record per invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # hf_recipe.py beside this file, also when loaded by path

from hf_recipe import headline, run_hf  # noqa: E402
from vs_hf_notes import ABLATION_NOTES, SETUP_NOTES  # noqa: E402
from rounds import attach_paired, paired_cell, paired_table, run_order, spread_cell, summarise  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results" / "vs_hf_trainer.md"


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    task: str  # tunelab task: classification or instruction
    train: str
    test: str
    max_length: int  # truncation everywhere; what the tutorial recipe pads every example to
    train_samples: int
    eval_samples: int
    batch_size: int
    eval_batch_size: int
    lr: float
    scheduler: str
    warmup_ratio: float
    lora_targets: tuple[str, ...] | str
    about: str


WORKLOADS = {
    w.name: w
    for w in [
        Workload(
            "imdb-512", "minilm-l6", "classification", "data/imdb/train.jsonl", "data/imdb/test.jsonl",
            512, 2000, 1000, 16, 64, 5e-4, "linear", 0.06, ("query", "value"),
            "IMDB reviews (mean ~280 tokens, half reach 512): padding to max_length wastes about half the batch.",
        ),
        Workload(
            "sst2", "minilm-l6", "classification", "data/sst2/train.jsonl", "data/sst2/test.jsonl",
            128, 8000, 872, 32, 64, 5e-4, "linear", 0.06, ("query", "value"),
            "SST-2 phrases (mean ~13 tokens) padded to GLUE's usual 128: ~90% of a padded batch is padding.",
        ),
        Workload(
            "alpaca", "smollm2-135m", "instruction", "data/alpaca_2k/train.jsonl", "data/alpaca_2k/test.jsonl",
            256, 240, 64, 8, 16, 5e-4, "cosine", 0.05, "all-linear",
            "Alpaca instructions in SmolLM2's chat template, loss on the response and its EOS only.",
        ),
    ]
}

SETUPS = {
    "hf-tutorial": "HF tutorial recipe",
    "hf-best": "best HF Trainer setup",
    "hf-best-heap": "best HF Trainer setup + tunelab's heap setting",
    "tunelab": "tunelab",
}

# Ablation switches, each toggled alone from tunelab's tuned config (torchtune's way of attributing speed).
# name -> (what the row changes, config overrides). "pad-to-max" and "precision" are handled in code.
SWITCHES = {
    "baseline": ("tuned config: dynamic padding, length grouping, dropout 0, precision auto", []),
    "pad-to-max": ("pad every training batch to max_length (collate patched)", []),
    "no-grouping": ("random batches (train.group_by_length=false)", ["train.group_by_length=false"]),
    "model-dropout": ("the model's own dropout (model.dropout=null)", ["model.dropout=null"]),
    "lora-dropout-0": ("no dropout on the LoRA input (method.dropout=0)", ["method.dropout=0.0"]),
    "packing": ("pack examples into max_length rows (data.packing=true)", ["data.packing=true"]),
    "compile": ("torch.compile the backbone (train.compile=true; compile time counts)", ["train.compile=true"]),
    "checkpointing": ("gradient checkpointing (model.gradient_checkpointing=true)", ["model.gradient_checkpointing=true"]),
    "adamw-8bit": ("8-bit AdamW from bitsandbytes (train.optimizer=adamw_8bit)", ["train.optimizer=adamw_8bit"]),
    "precision": ("the other precision (set below)", []),
    "cpu-heap-release": ("glibc returns freed blocks to the kernel (train.cpu_heap=release)", ["train.cpu_heap=release"]),
}


# ------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="imdb-512")
    p.add_argument("--train-samples", type=int, help="seeded training subset (default: the workload's)")
    p.add_argument("--eval-samples", type=int, help="seeded test subset (default: the workload's)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps; overrides --epochs")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the workload's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", help="comma-separated module names or all-linear (default: the workload's)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every setup: medians and paired ratios")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {', '.join(SETUPS)}")
    p.add_argument("--ablation", action="store_true", help="tunelab only: toggle one switch at a time")
    p.add_argument("--switches", help=f"ablation rows (default: all that apply): {', '.join(SWITCHES)}")
    p.add_argument("--slow-row-steps", type=int, default=10,
                   help="ablation: cap a row that runs emulated bf16 (~12x slower) at this many steps; tokens/s only")
    p.add_argument("--smoke", action="store_true",
                   help="tiny budget (32 train, 32 eval, 3 steps) to check every path; labelled SMOKE in the output")
    p.add_argument("--results", type=Path, default=RESULTS, help="Markdown file to append to (JSON goes beside it)")
    p.add_argument("--keep-runs", type=Path, help="keep tunelab run directories and Trainer output here")
    # internal: one setup in this process, its record written to --result
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    w = WORKLOADS[args.workload]
    if args.smoke:
        args.train_samples = args.train_samples or 32
        args.eval_samples = args.eval_samples or 32
        args.max_steps = args.max_steps or 3
        args.repeats = 1
    args.train_samples = args.train_samples or w.train_samples
    args.eval_samples = args.eval_samples or w.eval_samples
    args.batch_size = args.batch_size or w.batch_size
    if args.lora_targets:
        args.lora_targets = "all-linear" if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
    else:
        args.lora_targets = w.lora_targets
    unknown = set(args.setups.split(",")) - set(SETUPS)
    if unknown:
        p.error(f"--setups: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SETUPS)}")
    unknown = set(args.switches.split(",")) - set(SWITCHES) if args.switches else set()
    if unknown:
        p.error(f"--switches: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SWITCHES)}")
    return args


def child_argv(args: argparse.Namespace, one: str, result: Path) -> list[str]:
    """The same budget for every setup: the child re-parses exactly these flags."""
    targets = args.lora_targets if isinstance(args.lora_targets, str) else ",".join(args.lora_targets)
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--workload", args.workload,
        "--one", one, "--result", str(result),
        "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
        "--lora-dropout", str(args.lora_dropout), "--lora-targets", targets,
        "--slow-row-steps", str(args.slow_row_steps),
    ]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    if args.keep_runs:
        argv += ["--keep-runs", str(args.keep_runs)]
    return argv


# ------------------------------------------------------------------------------------------ tunelab


def tunelab_raw_config(w: Workload, args: argparse.Namespace, out_dir: str, name: str) -> dict:
    """tunelab's tuned config for the workload, on the shared budget."""
    return {
        "task": w.task,
        "model": {"name": w.model, "dropout": 0.0},
        "data": {
            "train": str(ROOT / w.train), "test": str(ROOT / w.test), "max_length": w.max_length,
            "truncation": "head",  # what the tokenizer's truncation=True does on the HF side
            "max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples, "packing": False,
        },
        "method": {
            "name": "lora", "rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "target_modules": args.lora_targets if isinstance(args.lora_targets, str) else list(args.lora_targets),
        },
        "train": {
            "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size, "lr": w.lr,
            "scheduler": w.scheduler, "warmup_ratio": w.warmup_ratio, "weight_decay": 0.01, "max_grad_norm": 1.0,
            "precision": "auto", "group_by_length": True, "seed": args.seed, "log_every": 10,
        },
        # No greedy samples and no untuned-model pass: the Trainer runs neither, and the untuned pass would count
        # in the process's peak RSS.
        "eval": {"batch_size": w.eval_batch_size, "num_samples": 0, "untuned": False},
        "output": {"dir": out_dir, "name": name},
    }


def other_precision(precision: str) -> str | None:
    """The precision the ablation's precision row switches to; None where there is no other to try."""
    import torch

    if precision == "fp32":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def applicable_switches(w: Workload) -> list[str]:
    from tunelab.models.loading import DROPOUT_KEYS
    from transformers import AutoConfig

    from tunelab.models.registry import resolve_model

    hf = AutoConfig.from_pretrained(resolve_model(w.model))
    names = list(SWITCHES)
    if w.task == "classification":
        names.remove("packing")  # packing is for causal LM tasks
    if not any(getattr(hf, k, 0) for k in DROPOUT_KEYS):
        names.remove("model-dropout")  # already 0 in the model (SmolLM2): the row would repeat the baseline
    return names


def run_tunelab(w: Workload, args: argparse.Namespace, switch: str, work: str) -> dict:
    import functools

    import torch
    from rich.console import Console

    import tunelab.train.loop as loop
    import tunelab.train.run as run_module
    from tunelab.config import apply_overrides, validate_config
    from tunelab.data.batching import collate
    from tunelab.runtime.hardware import cpu_has_fast_bf16, resolve_precision

    name = "tunelab" + (f"-{switch}" if switch != "baseline" else "")
    raw = apply_overrides(tunelab_raw_config(w, args, work, name), SWITCHES[switch][1])
    record: dict = {"switch": switch, "notes": []}
    if switch == "pad-to-max":
        # Rounding the width up to a multiple of max_length pads every training batch to max_length, exactly;
        # evaluation keeps its own (dynamic) padding.
        loop.collate = functools.partial(collate, multiple=w.max_length)
    if switch == "precision":
        other = other_precision(resolve_precision("auto"))
        raw["train"]["precision"] = other
        if other == "bf16" and not torch.cuda.is_available() and not cpu_has_fast_bf16():
            cap = args.slow_row_steps
            raw["train"]["max_steps"] = min(args.max_steps or cap, cap)
            raw["data"]["max_eval_samples"] = min(args.eval_samples, 16)  # its evaluation is not reported
            record["capped"] = True
            record["notes"].append(f"emulated bf16 on this CPU: first {raw['train']['max_steps']} steps only, "
                                   "tokens/s only (evaluation after so few steps is not comparable)")
    cfg = validate_config(raw)
    _, metrics = run_module.run_training(cfg, console=Console(stderr=True))
    t = metrics["train"]
    record.update(
        precision=t["precision"], steps=t["steps"], real_tokens=t["real_tokens"], wall_s=t["wall_s"],
        real_tokens_per_s=t["real_tokens_per_s"], peak_memory_bytes=t["peak_memory_bytes"],
        trainable_params=t["trainable_params"], eval=headline(metrics.get("eval", {})),
        setting=SWITCHES[switch][0] if switch != "precision" else f"precision {cfg.train.precision}",
    )
    return record


# ------------------------------------------------------------------------------------------ one setup


def run_one(args: argparse.Namespace) -> None:
    """Child process: run one setup and write its record as JSON to --result."""
    import shutil

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    w = WORKLOADS[args.workload]
    work = tempfile.mkdtemp(prefix=f"vs-hf-{args.one.replace(':', '-')}-", dir=args.keep_runs)
    started = time.perf_counter()
    try:
        if args.one == "hf-tutorial":
            record = run_hf(w, args, best=False, work=work)
        elif args.one in ("hf-best", "hf-best-heap"):  # the same setup; spawn() gave the second KEEP_HEAP_ENV
            record = run_hf(w, args, best=True, work=work)
        elif args.one.startswith("tunelab"):
            switch = args.one.partition(":")[2] or "baseline"
            record = run_tunelab(w, args, switch, work)
        else:
            raise SystemExit(f"unknown setup {args.one!r}")
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    record["process_wall_s"] = round(time.perf_counter() - started, 1)  # load + tokenize + train + eval
    args.result.write_text(json.dumps(record))


def spawn(args: argparse.Namespace, one: str) -> dict:
    """Run one setup in a fresh interpreter; its failure becomes a row saying so, not the end of the benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if one == "hf-best-heap":
            # What tunelab's default train.cpu_heap=keep sets through mallopt, given to the Trainer's process
            from tunelab.runtime.hardware import KEEP_HEAP_ENV

            env.update(KEEP_HEAP_ENV)
        print(f"\n=== {one} ===", file=sys.stderr, flush=True)
        proc = subprocess.run(child_argv(args, one, result), cwd=ROOT, env=env)
        if proc.returncode != 0 or not result.is_file():
            return {"error": f"exit status {proc.returncode} (see the log above)"}
        return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------ report


def model_flops_per_token(w: Workload, args: argparse.Namespace) -> float | None:
    """Training FLOPs per real token for the workload (tunelab.plan: 4N frozen base + 2N trainable + attention,
    LM head on the loss's target positions); None where tunelab.plan is unavailable."""
    try:
        from tunelab.config import validate_config
        from tunelab.plan import estimate
    except ImportError:
        return None
    try:
        cfg = validate_config(tunelab_raw_config(w, args, tempfile.gettempdir(), "flops"))
        return float(estimate(cfg).flops_per_token.train)
    except Exception as err:  # noqa: BLE001 - MFU is a column, not a reason to lose the benchmark
        print(f"flops per token unknown ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def add_mfu(rows: dict[str, dict], flops_per_token: float | None) -> None:
    try:
        from tunelab.train.flops import mfu, peak_flops
    except ImportError:
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for row in rows.values():
        if "error" not in row:
            row["mfu"] = mfu(flops_per_token, row.get("real_tokens_per_s"), peak_flops(device, row["precision"]))


def human_bytes(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "—" if x is None else format(x, spec)


def eval_cell(row: dict) -> str:
    ev = row.get("eval") or {}
    if row.get("capped"):
        return "— (capped)"
    if "accuracy" in ev:
        return f"{ev['accuracy']:.3f}"
    if "perplexity" in ev:
        return f"{ev['perplexity']:.2f}"
    return "—"


def mfu_cell(row: dict) -> str:
    m = row.get("mfu")
    return "unknown" if m is None else f"{100 * m:.2f}%"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def machine_line() -> str:
    import peft
    import torch
    import transformers

    from tunelab.runtime.hardware import cpu_has_fast_bf16, describe, usable_cores

    torch.set_num_threads(usable_cores())
    hw = describe()
    where = f"{hw['gpu']}" if hw.get("gpu") else f"{hw['cpu']}, {hw['usable_cores']} usable cores"
    bf16 = ("native bf16 (AMX/AVX512-BF16): yes" if cpu_has_fast_bf16()
            else "native bf16: no, so bf16 autocast would be emulated (~12x slower) and every setup runs fp32")
    if hw.get("gpu"):
        bf16 = "GPU"
    return (f"{where}; {bf16}. torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, Python {hw['python']}, {hw['platform']}.")


def workload_line(w: Workload, args: argparse.Namespace, flops: float | None) -> str:
    targets = args.lora_targets if isinstance(args.lora_targets, str) else ", ".join(args.lora_targets)
    budget = f"max {args.max_steps} steps" if args.max_steps else f"{args.epochs:g} epoch(s)"
    return (
        f"`{w.name}`: {w.model}, LoRA r{args.lora_rank} alpha {args.lora_alpha:g} dropout {args.lora_dropout:g} on "
        f"[{targets}]; {w.train} ({args.train_samples:,} seeded examples), test on {w.test} ({args.eval_samples:,}); "
        f"max_length {w.max_length}, batch {args.batch_size}, {budget}, lr {w.lr:g} {w.scheduler} "
        f"(warmup {w.warmup_ratio:g}), weight decay 0.01, clip 1.0, seed {args.seed}. {w.about} "
        f"Model FLOPs per real training token: {fmt(flops / 1e6, ',.1f') + ' M' if flops else 'unknown'}."
    )


def compare_tables(w: Workload, rows: dict[str, dict]) -> list[str]:
    metric = "test accuracy" if w.task == "classification" else "test perplexity"
    lines = [
        f"| setup | precision | trainable params | steps | real tokens | real tokens/s | train wall | peak memory "
        f"| {metric} | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {SETUPS[name]} | failed: {row['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {SETUPS[name]} | {row['precision']} | {row['trainable_params']:,} | {row['steps']:,} | "
            f"{row['real_tokens']:,} | {speed_cell(row)} | {fmt(row['wall_s'], ',.1f')} s | "
            f"{human_bytes(row['peak_memory_bytes'])} | "
            f"{eval_cell(row)} | {mfu_cell(row)} |"
        )
    ours = rows.get("tunelab")
    baselines = [n for n in ("hf-tutorial", "hf-best", "hf-best-heap") if n in rows and "error" not in rows[n]]
    if ours and "error" not in ours and baselines:
        lines += ["", "| tunelab ÷ | real tokens/s (higher is better) | train wall | peak memory |",
                  "|---|---:|---:|---:|"]
        for name in baselines:
            base = rows[name]
            lines.append(
                f"| {SETUPS[name]} | {ratio(ours['real_tokens_per_s'], base['real_tokens_per_s'])} | "
                f"{ratio(ours['wall_s'], base['wall_s'])} | "
                f"{ratio(ours['peak_memory_bytes'], base['peak_memory_bytes'])} |"
            )
    return lines


def speed_cell(row: dict) -> str:
    runs = row.get("speed_runs") or []
    return spread_cell(runs, ",.0f", "") if len(runs) > 1 else fmt(row["real_tokens_per_s"])


def ablation_table(w: Workload, rows: dict[str, dict]) -> list[str]:
    metric = "test accuracy" if w.task == "classification" else "test perplexity"
    base = rows.get("baseline", {}).get("real_tokens_per_s")
    lines = [
        f"| switch | setting | precision | steps | real tokens/s | vs baseline | train wall | peak memory | {metric} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for switch, row in rows.items():
        if "error" in row:
            lines.append(f"| {switch} | failed: {row['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {switch} | {row['setting']} | {row['precision']} | {row['steps']:,} | "
            f"{speed_cell(row)} | "
            f"{paired_cell(row) or ratio(row['real_tokens_per_s'], base)} | {fmt(row['wall_s'], ',.1f')} s | "
            f"{human_bytes(row['peak_memory_bytes'])}{peak_note(row)} | {eval_cell(row)} |"
        )
    return lines


def peak_note(row: dict) -> str:
    cell = paired_cell(row, "peak_vs_baseline_runs")
    return f"; {cell} of the baseline's, paired" if cell else ""


def write_results(args: argparse.Namespace, title: str, table: list[str], notes: list[str], record: dict) -> None:
    w = WORKLOADS[args.workload]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # Allocator and thread settings change the numbers; the children inherit them, so the command shows them.
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith("MALLOC_") or k == "OMP_NUM_THREADS"]
    command = " ".join([*env, ".venv/bin/python benchmarks/vs_hf_trainer.py", *map(shlex.quote, sys.argv[1:])])
    smoke = " — SMOKE TEST (tiny budget, busy machine: the numbers only show the paths work)" if args.smoke else ""
    lines = [
        f"## {title}: `{w.name}`, {when}{smoke}",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {record['machine']}",
        "",
        f"Workload: {record['workload_line']}",
        "",
        *table,
        "",
        *notes,
        "",
    ]
    md = args.results
    md.parent.mkdir(parents=True, exist_ok=True)
    if not md.is_file():
        md.write_text(
            "# tunelab against the Hugging Face Trainer + PEFT recipe\n\n"
            "Written by `benchmarks/vs_hf_trainer.py`; newest runs last. Each section gives its command, machine and "
            "date. Re-measure before quoting: timings depend on the machine and on what else runs on it.\n\n"
        )
    with md.open("a") as f:
        f.write("\n".join(lines) + "\n")
    js = md.with_suffix(".json")
    history = json.loads(js.read_text()) if js.is_file() else []
    history.append({"title": title, "date": when, "command": command.strip(), "smoke": args.smoke, **record})
    js.write_text(json.dumps(history, indent=1) + "\n")
    print("\n".join(lines))
    print(f"appended to {md} and {js}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        run_one(args)
        return
    w = WORKLOADS[args.workload]
    machine = machine_line()
    flops = model_flops_per_token(w, args)
    if args.ablation:
        switches = args.switches.split(",") if args.switches else applicable_switches(w)
        rounds = []
        for i in range(max(1, args.repeats)):
            print(f"\n##### round {i + 1} of {args.repeats}", file=sys.stderr, flush=True)
            ran = {s: spawn(args, f"tunelab:{s}") for s in run_order(switches, i)}
            rounds.append({s: ran[s] for s in switches})
        rows = summarise(rounds)
        attach_paired(rows, rounds, "baseline")
        add_mfu(rows, flops)
        notes = list(ABLATION_NOTES)
        notes += [f"- {s}: {n}" for s, row in rows.items() for n in row.get("notes", [])]
        title = "tunelab ablation (one switch at a time from the tuned config)"
        table = ablation_table(w, rows)
    else:
        names, rounds = [s for s in SETUPS if s in args.setups.split(",")], []
        for i in range(max(1, args.repeats)):
            print(f"\n##### round {i + 1} of {args.repeats}", file=sys.stderr, flush=True)
            ran = {s: spawn(args, s) for s in run_order(names, i)}
            rounds.append({s: ran[s] for s in names})
        rows = summarise(rounds)
        add_mfu(rows, flops)
        notes = list(SETUP_NOTES)
        seen = set()
        for row in rows.values():
            for n in row.get("notes", []):
                if n not in seen:
                    notes.append(f"- {n}")
                    seen.add(n)
        title = "tunelab vs HF Trainer"
        table = compare_tables(w, rows)
        if len(rounds) > 1:  # the single-run ratio table gives way to ratios paired within each round
            cut = next((i for i, line in enumerate(table) if line.startswith("| tunelab ÷")), len(table))
            table = table[:max(0, cut - 1)] + ["", *paired_table(rounds, SETUPS)]
    if len(rounds) > 1:
        notes.insert(0, f"- {len(rounds)} rounds, each running every row once in alternating order; a row is "
                     "its median-speed run; its tokens/s cell, the median (min-max) over rounds, and a ratio, the "
                     "median (min-max) of the ratios taken within each round.")
    record = {
        "workload": w.name, "machine": machine, "workload_line": workload_line(w, args, flops),
        "budget": {k: getattr(args, k) for k in ("train_samples", "eval_samples", "epochs", "max_steps", "batch_size",
                                                 "seed", "lora_rank", "lora_alpha", "lora_dropout")},
        "lora_targets": args.lora_targets, "workload_spec": asdict(w), "flops_per_token": flops, "rows": rows,
        "rounds": rounds,
    }
    write_results(args, title, table, notes, record)


if __name__ == "__main__":
    main()

"""What batching buys `tunelab serve`: throughput at 16 concurrent clients with batching on vs batch size 1, and
the naive way, a transformers pipeline(...) called one request at a time, all in the same run.

Three setups, measured in turn, --repeats rounds (each round runs all three, so a change in machine load
hits them alike); the table gives the median and the spread (min-max) over rounds:

    batched     `tunelab serve --max-batch 16 --batch-window-ms 10`, 16 concurrent HTTP clients
    batch-1     `tunelab serve --max-batch 1`, the same 16 clients: every request runs alone
    pipeline    transformers pipeline(...) in this process, one request after another (no HTTP at all)

Classification: SST-2 test sentences (or --classify-data), one per request (requests/s). The pipeline row is a
"feature-extraction" pipeline on the run's backbone followed by the run's own pooling and head (a tunelab
classifier is not an AutoModelForSequenceClassification).
Generation: Alpaca test instructions, chat template applied, 64 new tokens at most, greedy (generated
tokens/s, counted by the server's usage; for the pipeline, by tokenizing its output). The pipeline is a
"text-generation" pipeline on the run's PEFT model, given the conversation as messages.

Both servers run the run's own precision (bf16 autocast where the CPU has native bf16); the pipeline runs
as pipelines do by default, in fp32.

    flock /tmp/tunelab-measure.lock .venv/bin/python benchmarks/serve_batching.py \\
        --classifier runs/serving-sentiment --generator runs/serving-assistant --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, cpu_name, drive, loadavg, results_path, start_server, stop_server  # noqa: E402

CLIENTS = 16


def workloads(n_classify: int, n_generate: int, max_tokens: int, classify_data: str = "data/sst2/test.jsonl"):
    texts = [json.loads(x)["text"] for x in (ROOT / classify_data).read_text().splitlines()][:n_classify]
    asks = [json.loads(x)["instruction"] for x in (ROOT / "data/alpaca_2k/test.jsonl").read_text().splitlines()]
    asks = asks[:n_generate]
    classify = [("classify", "/v1/classify", {"model": "classifier", "input": t}) for t in texts]
    generate = [("generate", "/v1/chat/completions", {"model": "generator", "max_tokens": max_tokens,
                                                      "temperature": 0, "messages": [{"role": "user", "content": a}]})
                for a in asks]
    return texts, asks, classify, generate


def measure_server(url: str, requests: list) -> tuple[float, int]:
    started = time.perf_counter()
    results = asyncio.run(drive(url, requests, CLIENTS))
    wall = time.perf_counter() - started
    bad = [r for r in results if r["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. status {bad[0]['status']}")
    return wall, sum(r["tokens"] for r in results)


class Pipelines:
    """The naive baseline: transformers pipelines over the same trained runs, one request at a time."""

    def __init__(self, classifier: str, generator: str | None):
        import torch
        from transformers import pipeline

        from tunelab.inference.trained import TrainedModel

        self.torch = torch
        self.cls = TrainedModel(classifier)
        self.cls_pipe = pipeline("feature-extraction", model=self.cls.model.backbone, tokenizer=self.cls.tokenizer,
                                 return_tensors=True)
        if generator:
            self.gen = TrainedModel(generator)
            self.gen_pipe = pipeline("text-generation", model=self.gen.model.backbone, tokenizer=self.gen.tokenizer)

    def classify(self, texts: list[str]) -> float:
        from tunelab.models.task_models import pool

        started = time.perf_counter()
        model = self.cls.model
        for text in texts:
            hidden = self.cls_pipe(text, truncation=True, max_length=self.cls.cfg.data.max_length)
            with self.torch.inference_mode():
                pooled = pool(hidden, self.torch.ones(hidden.shape[:2]), model.pooling)
                model.head(pooled).softmax(-1)
        return time.perf_counter() - started

    def generate(self, asks: list[str], max_tokens: int) -> tuple[float, int]:
        started, tokens = time.perf_counter(), 0
        eos = self.gen.tokenizer.eos_token_id
        for ask in asks:
            out = self.gen_pipe([{"role": "user", "content": ask}], max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=self.gen.tokenizer.pad_token_id)
            reply = out[0]["generated_text"][-1]["content"]
            n = len(self.gen.tokenizer(reply, add_special_tokens=False)["input_ids"])
            tokens += min(max_tokens, n + 1)  # + the EOS it stopped on, when it stopped before the limit
        return time.perf_counter() - started, tokens


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "runs": [round(v, 2) for v in values]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--generator", help="an instruction or causal-LM run (needed when generate is among --tasks)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--classify-requests", type=int, default=320)
    ap.add_argument("--generate-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--classify-data", default="data/sst2/test.jsonl",
                    help="texts to classify (the classifier's own data.max_length truncates them)")
    ap.add_argument("--tasks", nargs="+", choices=["classify", "generate"], default=["classify", "generate"])
    ap.add_argument("--results", default="serve_batching")
    ap.add_argument("--plot", default=None, help="also draw the results as a PNG here (docs/img/serve-batching.png)")
    args = ap.parse_args(argv)
    if "generate" in args.tasks and not args.generator:
        ap.error("--generator is needed to measure generation (or pass --tasks classify)")

    texts, asks, classify, generate = workloads(args.classify_requests, args.generate_requests, args.max_tokens,
                                                 args.classify_data)
    sources = [f"classifier={args.classifier}"] + ([f"generator={args.generator}"] if args.generator else [])
    before = loadavg()
    batched, url_b = start_server(sources, "--max-batch", "16", "--batch-window-ms", "10")
    single, url_1 = start_server(sources, "--max-batch", "1", "--batch-window-ms", "0")
    pipes = Pipelines(args.classifier, args.generator)
    rows = {k: {"classify_rps": [], "generate_tps": []} for k in ("batched", "batch-1", "pipeline")}
    try:
        for round_ in range(args.repeats):
            for name, url in (("batched", url_b), ("batch-1", url_1)):
                if "classify" in args.tasks:
                    wall, _ = measure_server(url, classify)
                    rows[name]["classify_rps"].append(len(classify) / wall)
                if "generate" in args.tasks:
                    wall, tokens = measure_server(url, generate)
                    rows[name]["generate_tps"].append(tokens / wall)
            if "classify" in args.tasks:
                rows["pipeline"]["classify_rps"].append(len(texts) / pipes.classify(texts))
            if "generate" in args.tasks:
                wall, tokens = pipes.generate(asks, args.max_tokens)
                rows["pipeline"]["generate_tps"].append(tokens / wall)
            print(f"round {round_ + 1}: " + json.dumps({k: {m: round(v[-1], 1) for m, v in r.items() if v}
                                                          for k, r in rows.items()}), flush=True)
    finally:
        stop_server(batched)
        stop_server(single)
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv), "cpu": cpu_name(), "cores": os.cpu_count(),
        "loadavg_before": before, "loadavg_after": loadavg(), "clients": CLIENTS,
        "classify_data": args.classify_data, "classify_requests": len(classify), "generate_requests": len(generate), "max_tokens": args.max_tokens,
        "setups": {k: {m: spread(v) for m, v in r.items() if v} for k, r in rows.items()},
    }
    ratio = lambda metric, a, b: [x / y for x, y in zip(rows[a][metric], rows[b][metric])]  # noqa: E731  paired per round
    summary["ratios"] = {}
    for task, metric in (("classify", "classify_rps"), ("generate", "generate_tps")):
        if task in args.tasks:
            summary["ratios"][f"{task}_batched_vs_batch1"] = spread(ratio(metric, "batched", "batch-1"))
            summary["ratios"][f"{task}_batched_vs_pipeline"] = spread(ratio(metric, "batched", "pipeline"))
    path = results_path(args.results, "json")
    records = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(records + [summary], indent=2) + "\n")
    fmt = lambda s: f"{s['median']} ({s['min']}-{s['max']})"  # noqa: E731
    lines = [f"\n## {summary['date']}\n", f"`{summary['command']}`\n",
             f"CPU: {summary['cpu']} ({summary['cores']} cores); /proc/loadavg before: {before}, after: "
             f"{summary['loadavg_after']}; {args.repeats} rounds, median (min-max)\n",
             f"| setup | classification requests/s ({len(classify)} requests, {CLIENTS} clients) | generation tokens/s "
             f"({len(generate)} requests x <= {args.max_tokens} tokens, {CLIENTS} clients) |", "|---|---:|---:|"]
    for name, r in summary["setups"].items():
        cells = [fmt(r[m]) if m in r else "not run" for m in ("classify_rps", "generate_tps")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "| ratio (paired per round) | median (min-max) |", "|---|---:|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in summary["ratios"].items()]
    with open(results_path(args.results, "md"), "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    if args.plot:
        plot(summary, Path(args.plot))
    print(json.dumps(summary["ratios"], indent=1))


def plot(summary: dict, path: Path) -> None:
    """Two bar charts (classification requests/s, generation tokens/s), median with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(summary["setups"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (metric, title) in zip(axes, (("classify_rps", "classification, requests/s"),
                                          ("generate_tps", f"generation, tokens/s (<= {summary['max_tokens']} new)"))):
        if any(metric not in summary["setups"][s] for s in setups):
            ax.set_title(title + ": not run", fontsize=10)
            ax.axis("off")
            continue
        stats = [summary["setups"][s][metric] for s in setups]
        med = [x["median"] for x in stats]
        err = [[m - x["min"] for m, x in zip(med, stats)], [x["max"] - m for m, x in zip(med, stats)]]
        ax.bar(setups, med, yerr=err, capsize=4, color=["#3456d1", "#98a2b3", "#f79009"])
        ax.set_title(title, fontsize=10)
        for i, m in enumerate(med):
            ax.text(i, m, f"{m:g}", ha="center", va="bottom", fontsize=9)
    fig.suptitle(f"tunelab serve, {summary['clients']} concurrent clients ({summary['cpu']}, "
                 f"{summary['cores']} cores)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

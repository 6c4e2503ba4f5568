"""Loopback load test of `tunelab serve`: many requests from concurrent clients against a classifier and a generator.

Starts `tunelab serve` as a subprocess on 127.0.0.1 (a free port), sends --requests requests from
--concurrency clients (a --generate-share of them chat completions of --max-tokens tokens, the rest
classifications), and reports status counts, latency percentiles and throughput per kind. With --limits
the server gets an API-keys file (one key per 8 clients) and --rate-limit, to show 429s with Retry-After
under load and nothing worse.

    .venv/bin/python benchmarks/serve_load.py --classifier runs/serving-sentiment \\
        --generator runs/serving-assistant --requests 5000 --concurrency 32
    .venv/bin/python benchmarks/serve_load.py ... --limits --rate-limit 600/min

Results are appended to benchmarks/results/serve_load.md and .json (one record per invocation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "n/a"


def start_server(sources: list[str], *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`tunelab serve` on a free port; returns once its models are loaded."""
    cmd = [sys.executable, "-m", "tunelab", "serve", *sources, "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    first = proc.stdout.readline()
    if "listening on" not in first:
        raise RuntimeError(f"server did not start: {first}{proc.stderr.read()}")
    url = first.split("listening on ")[1].split()[0]
    ready = proc.stdout.readline()
    if not ready.startswith("ready:"):
        raise RuntimeError(f"server did not load its models: {ready}{proc.stderr.read()}")
    return proc, url


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(120)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def drive(url: str, requests: list[tuple[str, str, dict]], concurrency: int, keys: list[str] | None = None,
                timeout: float = 600) -> list[dict]:
    """Send (kind, path, body) requests from `concurrency` clients, each sending its next one when the last is
    answered. Client i uses keys[i % len(keys)]. Returns one record per request.

    aiohttp, not httpx: client and server share this machine's cores, and httpx's client used 24% of a core
    at 140 classification requests/s where aiohttp uses 3-4%; that CPU would come out of the server's share
    and so out of the measurement."""
    import aiohttp

    queue = list(enumerate(requests))
    results: list[dict] = []

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"} if keys else {}
        while queue:
            n, (kind, path, body) = queue.pop(0)
            started = time.perf_counter()
            retry_after = None
            try:
                async with http.post(url + path, json=body, headers=headers) as res:
                    status = res.status
                    retry_after = res.headers.get("Retry-After")
                    payload = await res.json() if res.content_type == "application/json" else {}
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                status, payload = 0, {"error": {"message": type(e).__name__}}
            results.append({"n": n, "kind": kind, "status": status, "latency_s": time.perf_counter() - started,
                            "tokens": (payload.get("usage") or {}).get("completion_tokens", 0),
                            "retry_after": retry_after})

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    return results


def summarize(results: list[dict], wall_s: float) -> dict:
    out = {"requests": len(results), "wall_s": round(wall_s, 2), "requests_per_s": round(len(results) / wall_s, 2),
           "status": {}, "server_errors_5xx": 0, "kinds": {}}
    for r in results:
        out["status"][str(r["status"])] = out["status"].get(str(r["status"]), 0) + 1
    out["server_errors_5xx"] = sum(v for k, v in out["status"].items() if k.startswith("5"))
    out["connection_errors"] = out["status"].get("0", 0)
    for kind in sorted({r["kind"] for r in results}):
        rows = [r for r in results if r["kind"] == kind]
        ok = [r["latency_s"] * 1000 for r in rows if r["status"] == 200]
        out["kinds"][kind] = {
            "requests": len(rows), "ok": len(ok),
            "p50_ms": _round(percentile(ok, 50)), "p95_ms": _round(percentile(ok, 95)),
            "p99_ms": _round(percentile(ok, 99)), "ok_per_s": round(len(ok) / wall_s, 2),
            "generated_tokens": sum(r["tokens"] for r in rows),
        }
    return out


def _round(x):
    return None if x is None else round(x, 1)


def plan(n: int, generate_share: float, max_tokens: int, seed: int = 0) -> list[tuple[str, str, dict]]:
    """A fixed, seeded mix of SST-2 sentences to classify and Alpaca instructions to answer."""
    rng = random.Random(seed)
    texts = [json.loads(x)["text"] for x in (ROOT / "data/sst2/test.jsonl").read_text().splitlines()]
    asks = [json.loads(x)["instruction"] for x in (ROOT / "data/alpaca_2k/test.jsonl").read_text().splitlines()]
    out = []
    for _ in range(n):
        if rng.random() < generate_share:
            out.append(("generate", "/v1/chat/completions", {
                "model": "generator", "messages": [{"role": "user", "content": rng.choice(asks)}],
                "max_tokens": max_tokens, "temperature": 0}))
        else:
            out.append(("classify", "/v1/classify", {"model": "classifier", "input": rng.choice(texts)}))
    return out


def run(args) -> dict:
    extra, keys = [], None
    workdir = Path(tempfile.mkdtemp(prefix="tunelab-load-"))
    if args.limits:
        from tunelab.serve.auth import add_key

        keys = [add_key(workdir / "keys.json", f"client-group-{i}") for i in range(max(1, args.concurrency // 8))]
        extra = ["--api-keys", str(workdir / "keys.json"), "--rate-limit", args.rate_limit]
    extra += ["--max-batch", str(args.max_batch), "--log-dir", str(workdir / "logs")]
    before = loadavg()
    proc, url = start_server([f"classifier={args.classifier}", f"generator={args.generator}"], *extra)
    try:
        requests = plan(args.requests, args.generate_share, args.max_tokens)
        started = time.perf_counter()
        results = asyncio.run(drive(url, requests, args.concurrency, keys))
        wall = time.perf_counter() - started
        alive = proc.poll() is None
    finally:
        exit_code = stop_server(proc)
    summary = summarize(results, wall)
    summary.update({
        "server_alive_after": alive, "server_exit_code": exit_code, "limits": args.limits,
        "rate_limit": args.rate_limit if args.limits else None, "concurrency": args.concurrency,
        "generate_share": args.generate_share, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "loadavg_before": before, "loadavg_after": loadavg(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "request_log_lines": sum(1 for _ in open(workdir / "logs" / "requests.jsonl")),
    })
    return summary


def results_path(stem: str, ext: str) -> Path:
    """benchmarks/results/STEM.EXT, or STEM.EXT itself when STEM is a path (smoke runs write elsewhere)."""
    path = Path(f"{stem}.{ext}") if "/" in stem else RESULTS / f"{stem}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_results(summary: dict, name: str = "serve_load") -> None:
    path = results_path(name, "json")
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(summary)
    path.write_text(json.dumps(records, indent=2) + "\n")
    lines = [f"\n## {summary['date']} ({'limits on' if summary['limits'] else 'no limits'})\n",
             f"`{summary['command']}`\n",
             f"CPU: {summary['cpu']} ({summary['cores']} cores); /proc/loadavg before: {summary['loadavg_before']}, "
             f"after: {summary['loadavg_after']}\n",
             f"{summary['requests']:,} requests from {summary['concurrency']} clients in {summary['wall_s']} s "
             f"({summary['requests_per_s']} requests/s); status counts {summary['status']}; 5xx: "
             f"{summary['server_errors_5xx']}; server alive after: {summary['server_alive_after']}, exit code "
             f"{summary['server_exit_code']}\n",
             "| kind | requests | 200 | p50 ms | p95 ms | p99 ms | ok/s | generated tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, k in summary["kinds"].items():
        lines.append(f"| {kind} | {k['requests']:,} | {k['ok']:,} | {k['p50_ms']} | {k['p95_ms']} | {k['p99_ms']} | "
                     f"{k['ok_per_s']} | {k['generated_tokens']:,} |")
    with open(results_path(name, "md"), "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True, help="classification run directory")
    ap.add_argument("--generator", required=True, help="instruction run directory")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--generate-share", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--limits", action="store_true", help="API keys and a per-key rate limit")
    ap.add_argument("--rate-limit", default="600/min")
    ap.add_argument("--results", default="serve_load", help="file stem under benchmarks/results/, or a path stem")
    args = ap.parse_args(argv)
    summary = run(args)
    write_results(summary, args.results)
    print(json.dumps({k: summary[k] for k in ("requests", "wall_s", "status", "server_errors_5xx", "kinds")}, indent=1))


if __name__ == "__main__":
    main()

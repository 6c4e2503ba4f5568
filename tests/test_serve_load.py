"""The bounded loopback load test (benchmarks/serve_load.py) on the tiny runs: 5,000 requests from 32 clients
against a classifier and a generator, with no 5xx; and with keys and a rate limit on, 429s and no crash."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("limits", [False, True], ids=["open", "limits"])
def test_load_5000_requests_32_clients_no_5xx(serve_runs, limits):
    load = _load_module()
    args = argparse.Namespace(classifier=str(serve_runs["sentiment-lora"]), generator=str(serve_runs["chat-lora"]),
                              requests=5000, concurrency=32, generate_share=0.1, max_tokens=8, max_batch=32,
                              limits=limits, rate_limit="600/min")
    summary = load.run(args)
    assert summary["requests"] == 5000 and summary["server_errors_5xx"] == 0 and summary["connection_errors"] == 0
    assert summary["server_alive_after"] and summary["server_exit_code"] == 0
    assert summary["request_log_lines"] == 5000  # every request, refused ones included, is in the request log
    if limits:
        assert summary["status"].get("429", 0) > 0 and set(summary["status"]) <= {"200", "429"}
    else:
        assert summary["status"] == {"200": 5000}


def test_percentiles_and_summary_are_computed_from_the_records():
    load = _load_module()
    assert load.percentile([5, 1, 3, 2, 4], 50) == 3 and load.percentile([], 99) is None
    rows = [{"kind": "classify", "status": 200, "latency_s": i / 1000, "tokens": 0} for i in range(1, 101)]
    rows.append({"kind": "classify", "status": 503, "latency_s": 0.5, "tokens": 0})
    s = load.summarize(rows, wall_s=2.0)
    assert s["server_errors_5xx"] == 1 and s["kinds"]["classify"]["ok"] == 100
    assert s["kinds"]["classify"]["p50_ms"] == pytest.approx(50.0, abs=1) and s["kinds"]["classify"]["p99_ms"] >= 98


def test_the_load_client_records_status_tokens_retry_after_and_connection_errors():
    """drive() against a stand-in HTTP server on 127.0.0.1: every request gets one record, with the status, the
    completion tokens from `usage`, Retry-After on a 429, the key it sent, and status 0 when nothing answers."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    load = _load_module()
    seen_keys = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen_keys.append(self.headers.get("Authorization"))
            limited = body.get("limited", False)
            payload = json.dumps({"error": {"message": "slow down"}} if limited else
                                 {"usage": {"completion_tokens": body["n"]}}).encode()
            self.send_response(429 if limited else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if limited:
                self.send_header("Retry-After", "3")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        requests = [("generate", "/v1/x", {"n": i}) for i in range(10)] + [("classify", "/v1/x", {"limited": True})]
        records = asyncio.run(load.drive(url, requests, concurrency=3, keys=["k0", "k1"]))
    finally:
        server.shutdown()
        server.server_close()  # the port now refuses connections
    assert sorted(r["n"] for r in records) == list(range(11))
    by_n = {r["n"]: r for r in records}
    assert all(by_n[i]["status"] == 200 and by_n[i]["tokens"] == i for i in range(10))
    assert by_n[10]["status"] == 429 and by_n[10]["retry_after"] == "3"
    assert set(seen_keys) == {"Bearer k0", "Bearer k1"}
    dead = asyncio.run(load.drive(url, [("classify", "/v1/x", {"n": 0})], concurrency=1, timeout=5))
    assert dead[0]["status"] == 0

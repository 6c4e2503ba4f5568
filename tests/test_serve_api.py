"""The HTTP API against a real server on 127.0.0.1: endpoints, batching, keys, limits, metrics, request log."""

import asyncio
import json

import httpx
import pytest

from serve_helpers import LiveServer, post, read_jsonl
from tunelab.serve.auth import add_key
from tunelab.serve.state import ServeSettings

CHAT = "chat-lora"
ASK = [{"role": "user", "content": "Repeat the word apple."}]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, {"alice": add_key(path, "alice"), "root": add_key(path, "root", admin=True),
                  "slow": add_key(path, "slow", rate_limit="3/min")}


@pytest.fixture(scope="module")
def server(serve_runs, keys, tmp_path_factory):
    names = ["chat-lora", "chat-prompt", "chat-prefix", "chat-adapter", "text-lora", "sentiment-lora"]
    settings = ServeSettings(sources=[(n, serve_runs[n]) for n in names], api_keys=keys[0],
                             log_dir=tmp_path_factory.mktemp("logs"), max_body_bytes=64 * 1024, batch_window_ms=50)
    with LiveServer(settings) as srv:
        yield srv


def chat(server, key, **body):
    return post(server.url + "/v1/chat/completions", {"model": CHAT, "messages": ASK, "temperature": 0, **body}, key)


def stream_text(server, key, path, body) -> tuple[str, list[dict], list[str]]:
    """Concatenated text, parsed chunks and raw data lines of an SSE response."""
    with httpx.stream("POST", server.url + path, json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(x) for x in lines if x != "[DONE]"]
    key_ = "delta" if path.endswith("chat/completions") else None
    text = "".join((c["choices"][0]["delta"].get("content", "") if key_ else c["choices"][0]["text"])
                   for c in chunks if c["choices"])
    return text, chunks, lines


def test_models_health_and_ready(server, keys):
    alice = keys[1]["alice"]
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    data = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {alice}"}).json()["data"]
    cards = {m["id"]: m for m in data}
    assert cards["sentiment-lora"]["labels"] == ["negative", "positive"] and cards["chat-prefix"]["method"] == "prefix"
    assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_chat_usage_finish_reason_and_stream_equal_to_plain(server, keys):
    alice = keys[1]["alice"]
    res = chat(server, alice, max_tokens=6).json()
    choice = res["choices"][0]
    assert choice["finish_reason"] == "length" and res["usage"]["completion_tokens"] == 6
    assert res["usage"]["total_tokens"] == res["usage"]["prompt_tokens"] + 6 and choice["message"]["content"]
    text, chunks, lines = stream_text(server, alice, "/v1/chat/completions",
                                      {"model": CHAT, "messages": ASK, "temperature": 0, "max_tokens": 6})
    assert text == choice["message"]["content"]
    assert lines[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_text_in_both_modes(server, keys):
    alice = keys[1]["alice"]
    full = chat(server, alice, max_tokens=8).json()["choices"][0]["message"]["content"]
    stop = full.split()[2]  # a word from the middle of the greedy answer
    res = chat(server, alice, max_tokens=8, stop=[stop]).json()["choices"][0]
    assert res["finish_reason"] == "stop" and res["message"]["content"] == full[: full.index(stop)]
    text, _, _ = stream_text(server, alice, "/v1/chat/completions",
                             {"model": CHAT, "messages": ASK, "temperature": 0, "max_tokens": 8, "stop": stop})
    assert text == res["message"]["content"]


def test_seed_reproduces_sampling(server, keys):
    alice = keys[1]["alice"]
    a, b, c = (chat(server, alice, max_tokens=8, temperature=1.0, top_p=0.9, seed=s).json()["choices"][0]
               ["message"]["content"] for s in (7, 7, 8))
    assert a == b and a != c


def test_completions_and_classify(server, keys):
    alice = keys[1]["alice"]
    res = post(server.url + "/v1/completions", {"model": "text-lora", "prompt": "The film was", "max_tokens": 5,
                                                "temperature": 0}, alice).json()
    assert res["object"] == "text_completion" and res["usage"]["completion_tokens"] == 5
    text, _, _ = stream_text(server, alice, "/v1/completions",
                             {"model": "text-lora", "prompt": "The film was", "max_tokens": 5, "temperature": 0})
    assert text == res["choices"][0]["text"]
    res = post(server.url + "/v1/classify", {"model": "sentiment-lora", "input": ["great", "awful film"]}, alice)
    data = res.json()["data"]
    assert res.status_code == 200 and len(data) == 2
    assert all(abs(sum(d["scores"].values()) - 1) < 1e-5 and d["label"] in d["scores"] for d in data)


async def _concurrent(server, key, bodies):
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {}) as client:
        return await asyncio.gather(*(client.post(server.url + path, json=body) for path, body in bodies))


def test_requests_in_one_window_run_as_one_batch_with_per_sequence_stops(server, keys):
    alice = keys[1]["alice"]
    # Alone, each request's greedy answer; together (one 50 ms window), the same answers from one batch,
    # each with its own length, across three adapters on one base and a classifier.
    bodies = [("/v1/chat/completions", {"model": m, "messages": ASK, "temperature": 0, "max_tokens": n})
              for m, n in (("chat-lora", 3), ("chat-lora", 7), ("chat-prompt", 5), ("chat-adapter", 4))]
    bodies.append(("/v1/classify", {"model": "sentiment-lora", "input": "fine"}))
    alone = [httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {alice}"}, timeout=60).json()
             for path, body in bodies]
    together = [r.json() for r in asyncio.run(_concurrent(server, alice, bodies))]
    for a, t, (_, body) in zip(alone[:4], together[:4], bodies):
        assert t["usage"]["completion_tokens"] == body["max_tokens"]
        assert t["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    assert together[4]["data"][0]["scores"] == pytest.approx(alone[4]["data"][0]["scores"], abs=1e-5)
    log = read_jsonl(server.state.settings.log_dir / "requests.jsonl")
    lora_rows = [r for r in log if r["model"] == "chat-lora" and r["batch_size"] == 2]
    assert len(lora_rows) >= 2, "the two chat-lora requests did not share a batch"


def test_keys_limits_and_error_shape(server, keys):
    k = keys[1]
    body = {"model": CHAT, "messages": ASK, "max_tokens": 2}
    for key in (None, "tl-wrong"):
        res = post(server.url + "/v1/chat/completions", body, key)
        assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
    codes = [post(server.url + "/v1/chat/completions", body, k["slow"]) for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200] and codes[3].status_code == 429
    assert int(codes[3].headers["Retry-After"]) >= 1 and codes[3].json()["error"]["type"] == "rate_limit_error"
    huge = post(server.url + "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "x" * 70_000}]},
                k["alice"])
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    over = post(server.url + "/v1/chat/completions", {**body, "max_tokens": 500}, k["alice"])
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    missing = post(server.url + "/v1/chat/completions", {**body, "model": "nope"}, k["alice"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    wrong = post(server.url + "/v1/classify", {"model": CHAT, "input": "x"}, k["alice"])
    assert wrong.status_code == 400 and "/v1/chat/completions" in wrong.json()["error"]["message"]
    bad = post(server.url + "/v1/chat/completions", {**body, "temperature": 5}, k["alice"])
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    admin = post(server.url + "/admin/models", {"name": "x", "source": "/nowhere"}, k["alice"])
    assert admin.status_code == 403


def test_admin_reload_never_serves_stale_state(server, keys, serve_runs):
    root, alice = keys[1]["root"], keys[1]["alice"]

    def scores(model):
        res = post(server.url + "/v1/classify", {"model": model, "input": "a quiet film"}, alice)
        assert res.status_code == 200, res.text
        return res.json()["data"][0]["scores"]

    res = post(server.url + "/admin/models", {"name": "swap", "source": str(serve_runs["sentiment-lora"])}, root)
    assert res.status_code == 200 and res.json()["version"] == 1
    assert scores("swap") == scores("sentiment-lora")
    res = post(server.url + "/admin/models", {"name": "swap", "source": str(serve_runs["sentiment-ia3"])}, root)
    assert res.status_code == 200 and res.json()["version"] == 2
    res = post(server.url + "/admin/models", {"name": "ia3", "source": str(serve_runs["sentiment-ia3"])}, root)
    assert scores("swap") == scores("ia3") != scores("sentiment-lora")
    assert httpx.delete(server.url + "/admin/models/swap", headers={"Authorization": f"Bearer {root}"}).status_code == 200
    assert post(server.url + "/v1/classify", {"model": "swap", "input": "x"}, alice).status_code == 404
    bad = post(server.url + "/admin/models", {"name": "bad", "source": "/nowhere"}, root)
    assert bad.status_code == 400 and "not a run directory" in bad.json()["error"]["message"]


def test_metrics_label_model_and_key_and_keep_idle_adapters(server, keys):
    alice = keys[1]["alice"]
    stream_text(server, alice, "/v1/chat/completions", {"model": CHAT, "messages": ASK, "max_tokens": 3})
    text = httpx.get(server.url + "/metrics").text
    assert f'tunelab_requests_total{{endpoint="chat",key_id="alice",model="{CHAT}",status="200"}}' in text
    assert 'tunelab_requests_total{endpoint="chat",key_id="-",model="-",status="401"}' in text
    assert "tunelab_time_to_first_token_seconds_count" in text and "tunelab_batch_size_bucket" in text
    assert "tunelab_queue_depth" in text and "tunelab_errors_total" in text
    assert "tunelab_generated_tokens_total" in text and "tunelab_prompt_tokens_total" in text
    # chat-prefix has never been asked anything: it is listed all the same, with zeros
    assert 'tunelab_requests_total{endpoint="chat",key_id="alice",model="chat-prefix",status="200"} 0.0' in text
    assert 'tunelab_model_loaded{method="prefix",model="chat-prefix",task="instruction"} 1.0' in text


def test_request_log_has_the_schema_and_never_the_key(server, keys):
    alice = keys[1]["alice"]
    chat(server, alice, max_tokens=2)
    path = server.state.settings.log_dir / "requests.jsonl"
    rows = read_jsonl(path)
    row = [r for r in rows if r["endpoint"] == "chat" and r["status"] == 200][-1]
    assert {"time", "key_id", "model", "latency_ms", "prompt_tokens", "completion_tokens", "status",
            "batch_size", "request_id", "ttft_ms", "schema"} <= set(row)
    assert row["key_id"] == "alice" and "input" not in row
    text = path.read_text()
    assert all(key not in text for key in keys[1].values())
    assert any(r["status"] == 401 for r in rows) and any(r["status"] == 413 for r in rows)


def test_overload_answers_503_with_retry_after(serve_runs):
    settings = ServeSettings(sources=[("s", serve_runs["sentiment-lora"])], max_queue=1, batch_window_ms=1500)
    with LiveServer(settings) as srv:
        results = asyncio.run(_concurrent(srv, None, [("/v1/classify", {"model": "s", "input": "x"})] * 3))
    codes = sorted(r.status_code for r in results)
    assert codes[0] == 200 and codes[-1] == 503
    busy = next(r for r in results if r.status_code == 503)
    assert int(busy.headers["Retry-After"]) >= 1 and busy.json()["error"]["code"] == "overloaded"


def test_request_log_payloads_only_when_asked_and_rotates(tmp_path):
    from tunelab.serve.request_log import RequestLog

    log = RequestLog(tmp_path, max_bytes=2000, backups=2, payloads=True)
    for i in range(30):
        log.write(request_id=str(i), key_id="k", model="m", model_version=1, endpoint="chat", status=200,
                  latency_s=0.1, payload_in="hello", payload_out="world")
    log.close()
    assert (tmp_path / "requests.jsonl.1").is_file() and (tmp_path / "requests.jsonl").stat().st_size <= 2000
    assert read_jsonl(tmp_path / "requests.jsonl")[-1]["input"] == "hello"

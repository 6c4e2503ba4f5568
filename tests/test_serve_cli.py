"""`tunelab serve`, `tunelab batch` and `tunelab keys` as processes: the served answer equals `tunelab generate`
token for token, SIGTERM finishes in-flight work and exits 0, and a killed batch resumes without gaps or repeats."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_helpers import read_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
PROMPT = "Repeat the word apple."


def tunelab(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start_server(*args, cwd):
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", "0", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in first, first + proc.stderr.read()
    url = first.split("listening on ")[1].split()[0]
    ready = proc.stdout.readline()
    assert ready.startswith("ready:"), ready + proc.stderr.read()
    return proc, url


def test_served_greedy_answer_equals_tunelab_generate_and_sigterm_is_graceful(serve_runs, tmp_path):
    run = str(serve_runs["chat-lora"])
    gen = tunelab("generate", run, PROMPT, "--max-new-tokens", "24", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    expected = json.loads(gen.stdout)
    proc, url = start_server(f"m={run}", "--log-dir", "logs", cwd=tmp_path)
    try:
        res = httpx.post(url + "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0,
        }, timeout=60).json()
        assert res["choices"][0]["message"]["content"] == expected["completion"]
        assert res["usage"]["completion_tokens"] == expected["new_tokens"]
        # Negative control: the same words without the run's chat template are another input, another answer.
        raw = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 24,
                                                        "temperature": 0}, timeout=60).json()
        assert raw["choices"][0]["text"] != expected["completion"]

        # SIGTERM while a long stream is in flight: the stream still ends properly, then the process exits 0.
        lines, first_chunk = [], threading.Event()

        def stream():
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                "model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 400,
                "temperature": 0, "stream": True,
            }) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(120) == 0, proc.stderr.read()
        assert lines[-2] == "data: [DONE]" or "data: [DONE]" in lines
        finals = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=5)
        served = json.loads((tmp_path / "logs" / "served.json").read_text())
        assert served["loaded"][0]["name"] == "m" and served["loaded"][0]["source"] == str(serve_runs["chat-lora"])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_batch_resumes_with_every_id_once(serve_runs, tmp_path):
    rows = [{"id": f"r{i}", "text": f"review number {i}: " + "quite good " * (i % 7)} for i in range(600)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "tunelab", "batch", str(serve_runs["sentiment-lora"]), "in.jsonl",
           "--output", "out.jsonl", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = out.read_text().count("\n")
    assert 20 <= partial < len(rows), "the kill did not land mid-run"
    with open(out, "a") as f:
        f.write('{"id": "r9')  # what a kill in the middle of a write leaves behind
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{len(rows) - partial:,} lines" in res.stdout and "already there" in res.stdout
    done = read_jsonl(out)
    assert sorted(r["id"] for r in done) == sorted(r["id"] for r in rows)  # each id exactly once
    assert all(r["label"] in ("negative", "positive") for r in done)
    # the same labels as an uninterrupted run
    from tunelab.inference.trained import TrainedModel

    expected = TrainedModel(serve_runs["sentiment-lora"]).predict([r["text"] for r in rows])
    by_id = {r["id"]: r for r in done}
    assert all(by_id[r["id"]]["label"] == e["label"] for r, e in zip(rows, expected))


def test_batch_generates_what_generate_does_and_names_bad_lines(serve_runs, tmp_path):
    from tunelab.errors import DataError
    from tunelab.inference.trained import TrainedModel
    from tunelab.serve.batch_job import run_batch

    prompts = ["Repeat the word apple.", "Say something.", "Name a river."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    summary = run_batch(serve_runs["chat-prompt"], tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=1,
                        max_new_tokens=12)
    assert summary == {"total": 3, "skipped": 0, "written": 3, "task": "instruction"}
    expected = TrainedModel(serve_runs["chat-prompt"]).generate(prompts, 12)
    assert [r["completion"] for r in read_jsonl(tmp_path / "out.jsonl")] == [e["completion"] for e in expected]
    again = run_batch(serve_runs["chat-prompt"], tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert again["written"] == 0 and len(read_jsonl(tmp_path / "out.jsonl")) == 3

    (tmp_path / "dup.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl:2: id 1 repeats line 1"):
        run_batch(serve_runs["chat-prompt"], tmp_path / "dup.jsonl", tmp_path / "o2.jsonl")
    (tmp_path / "cls.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    with pytest.raises(DataError, match=r"cls.jsonl:1: needs a non-empty 'text' field"):
        run_batch(serve_runs["sentiment-lora"], tmp_path / "cls.jsonl", tmp_path / "o3.jsonl")
    (tmp_path / "other.jsonl").write_text('{"id": "other", "prompt": "x"}\n')
    with pytest.raises(DataError, match="out.jsonl:1: id 0 is not in the input"):  # another job's output
        run_batch(serve_runs["chat-prompt"], tmp_path / "other.jsonl", tmp_path / "out.jsonl")


def test_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path):
    res = tunelab("keys", "add", "keys.json", "alice", "--admin", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip()
    stored = (tmp_path / "keys.json").read_text()
    assert key.startswith("tl-") and key not in stored and '"admin": true' in stored
    res = tunelab("keys", "add", "keys.json", "alice", cwd=tmp_path)
    assert res.returncode == 2 and "key id 'alice' exists already" in res.stderr
    (tmp_path / "bad.json").write_text('{"keys": [{"id": "x", "sha256": "tl-plain-key"}]}')
    res = tunelab("serve", "nowhere", "--api-keys", "bad.json", cwd=tmp_path)
    assert res.returncode == 2 and "not a run directory" in res.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: classification\n")
    res = tunelab("serve", "run", "--api-keys", "bad.json", cwd=tmp_path)
    assert res.returncode == 2 and "'sha256' must be 64 hex digits" in res.stderr
    assert len([x for x in res.stderr.splitlines() if x.strip()]) == 1

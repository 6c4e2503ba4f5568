"""`tunelab serve ROUTER_DIR`: the router is served as model `auto` beside its task adapters. Each input of one
request goes to the adapter the router picks and gets exactly what that adapter alone answers; `auto` shows in
/v1/models, the metrics and the request log; what cannot work is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from conftest import REPO
from serve_helpers import LiveServer, post, read_jsonl
from test_merge import lora_run

from tunelab.adapters.router import build_router
from tunelab.errors import TunelabError
from tunelab.runtime.run_dir import RunDir
from tunelab.serve.registry import ModelRegistry, parse_source
from tunelab.serve.state import ServeSettings

# Written as each data set writes its texts (TREC capitalises and ends in " ?"; SST-2 is lower-cased and
# tokenised): a router trained on 48 inputs a task routes these, as tests/test_route.py checks.
# This checkout's source first, whatever the interpreter has installed (the command runs in another folder).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
QUESTION = "What is the tallest mountain in Africa ?"
REVIEW = "a warm , funny and moving film ."


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_encoder):
    folder = tmp_path_factory.mktemp("serve-route-runs")
    runs = {"reviews": lora_run(folder, "reviews", tiny_encoder, "sst2-test"),
            "questions": lora_run(folder, "questions", tiny_encoder, "trec")}
    router = build_router(list(runs.values()), folder / "router", per_task=48, evaluate=False).path
    return runs, router


@pytest.fixture(scope="module")
def server(routed, tmp_path_factory):
    _, router = routed
    settings = ServeSettings(sources=[parse_source(str(router))], log_dir=tmp_path_factory.mktemp("logs"),
                             batch_window_ms=20)
    with LiveServer(settings) as srv:
        yield srv


def classify(server, model: str, texts: list[str]) -> list[dict]:
    res = post(server.url + "/v1/classify", {"model": model, "input": texts})
    assert res.status_code == 200, res.text
    return res.json()["data"]


def test_auto_sends_each_input_to_its_adapter_and_answers_what_that_adapter_answers(server, routed):
    runs, _ = routed
    data = classify(server, "auto", [QUESTION, REVIEW])
    assert [r["index"] for r in data] == [0, 1]
    assert [r["adapter"] for r in data] == ["questions", "reviews"]
    for text, result in zip([QUESTION, REVIEW], data):
        labels = RunDir(runs[result["adapter"]]).labels()
        assert result["label"] in labels and set(result["scores"]) == set(labels)  # its own adapter's label set
        assert 0.5 <= result["route_score"] <= 1.0
        alone = classify(server, result["adapter"], [text])[0]
        assert "adapter" not in alone  # a plain model's answer keeps its old shape
        assert result["label"] == alone["label"]
        assert result["scores"] == pytest.approx(alone["scores"], abs=1e-5)
    # The two label sets differ, so a mix-up would show: the review's label is not a TREC label.
    assert data[1]["label"] not in RunDir(runs["questions"]).labels()


def test_auto_is_listed_counted_and_logged(server):
    classify(server, "auto", [REVIEW])
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert set(cards) == {"auto", "reviews", "questions"}
    assert cards["auto"]["method"] == "router" and cards["auto"]["adapters"] == ["reviews", "questions"]
    assert "adapters" not in cards["reviews"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'tunelab_requests_total{endpoint="classify",key_id="anonymous",model="auto",status="200"}' in metrics
    assert 'tunelab_batch_size_count{kind="route",model="auto"}' in metrics
    log = read_jsonl(server.state.settings.log_dir / "requests.jsonl")
    assert any(r["model"] == "auto" and r["endpoint"] == "classify" and r["status"] == 200 for r in log)
    schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    assert {"adapter", "route_score"} <= set(schema["ClassifyResult"]["properties"])


def test_chat_with_auto_is_a_one_line_400(server):
    res = post(server.url + "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert res.status_code == 400
    error = res.json()["error"]
    assert error["code"] == "wrong_endpoint" and error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "/v1/classify" in error["message"] and "\n" not in error["message"]


def test_an_adapter_of_a_served_router_is_not_unloaded_from_under_it(server):
    with pytest.raises(TunelabError, match="answers for router 'auto'"):
        server.state.registry.unload("questions")
    assert server.state.registry.get("questions") is not None


def test_a_router_whose_runs_are_gone_fails_at_startup_in_one_line(routed, tmp_path):
    _, router = routed
    broken = tmp_path / "moved-router"
    shutil.copytree(router, broken)
    recipe = json.loads((broken / "recipe.json").read_text())
    recipe["tasks"][1]["run_dir"] = str(tmp_path / "gone" / "questions")
    (broken / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(TunelabError, match=f"{broken}: router task 'questions'"):
        ModelRegistry().load("auto", broken)
    proc = subprocess.run([sys.executable, "-m", "tunelab", "serve", str(broken), "--port", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and "listening" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0] and "questions" in lines[0], proc.stderr

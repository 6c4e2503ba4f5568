"""The MLflow server on a test store: it finds a tunelab run through its REST API, and its runs page shows the run
in a real browser (Debian's chromium driven by Playwright)."""

import json
import os
import urllib.request

import pytest
from rich.console import Console

from conftest import make_config
from tunelab.config import validate_config
from tunelab.track.ui import running_ui
from tunelab.train.run import run_training

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_encoder):
    from conftest import DATA, write_jsonl

    root = tmp_path_factory.mktemp("server")
    rows = [json.loads(line) for line in (DATA / "sst2" / "train.jsonl").read_text().splitlines()[:80]]
    train, test = write_jsonl(root / "train.jsonl", rows[:64]), write_jsonl(root / "test.jsonl", rows[64:])
    cfg = validate_config(make_config(
        model={"name": tiny_encoder}, data={"train": str(train), "test": str(test)}, train={"max_steps": 3},
        track={"enabled": True}, output={"dir": str(root / "runs"), "name": "served-run"}))
    run, _ = run_training(cfg, console=Console(file=open(os.devnull, "w")))
    with running_ui(root / "runs") as url:
        yield url, run


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_the_rest_api_finds_the_run(server):
    url, run = server
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tunelab", timeout=30) as r:
        experiment = json.loads(r.read())["experiment"]
    found = _post(f"{url}/api/2.0/mlflow/runs/search",
                  {"experiment_ids": [experiment["experiment_id"]], "filter": "attributes.run_name = 'served-run'"})
    (logged,) = found["runs"]
    assert logged["info"]["run_id"] == run.manifest()["mlflow"]["run_id"]
    params = {p["key"]: p["value"] for p in logged["data"]["params"]}
    assert params["train.max_steps"] == "3"
    metrics = {m["key"] for m in logged["data"]["metrics"]}
    assert {"train.loss", "test.accuracy"} <= metrics
    assert logged["inputs"]["dataset_inputs"][0]["dataset"]["digest"]


@pytest.mark.slow  # a React page in a browser: about a minute on two loaded cores
def test_the_runs_page_shows_the_run_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, run = server
    experiment = run.manifest()["mlflow"]["experiment_id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(f"{url}/#/experiments/{experiment}/runs", wait_until="networkidle")
        page.get_by_text("served-run").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "runs.png"))
        browser.close()
    assert (tmp_path / "runs.png").stat().st_size > 10_000

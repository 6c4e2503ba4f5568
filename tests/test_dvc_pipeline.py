"""examples/expert/mlops: `dvc repro` on a fresh clone, offline; `dvc metrics show` reads the metrics; a second
`dvc repro` with nothing changed runs nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


@pytest.mark.slow
def test_dvc_pipeline_reproduces_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    example = clone / "examples" / "expert" / "mlops"
    params = yaml.safe_load((example / "params.yaml").read_text())
    params["train"].update(max_steps=4, max_train_samples=200)  # a small budget: the pipeline, not the accuracy
    (example / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def dvc(*args):
        return subprocess.run(["dvc", *args], cwd=example, env=env, capture_output=True, text=True, timeout=1800)

    first = dvc("repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("check", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    shown = dvc("metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    metrics = json.loads(shown.stdout)
    values = next(iter(metrics.values()))["data"]["eval/metrics.json"]["data"]
    assert 0 <= values["accuracy"] <= 1 and values["num_examples"] == 500
    registered = json.loads((example / "eval" / "registered.json").read_text())
    assert registered["name"] == "trec-questions" and registered["alias"] == "champion"

    second = dvc("repro")
    assert second.returncode == 0 and "Running stage" not in second.stdout
    assert "Data and pipelines are up to date." in second.stdout

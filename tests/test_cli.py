"""The command line as a user meets it: subprocesses, exit codes, one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import make_config, write_jsonl


def tunelab(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_models_lists_bundled(tmp_path):
    res = tunelab("models", cwd=tmp_path)
    assert res.returncode == 0
    assert "minilm-l6" in res.stdout and "smollm2-135m" in res.stdout and "Apache-2.0" in res.stdout


def test_malformed_data_fails_fast_with_one_line_and_no_run_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad" "label": "neg"}\n')
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(make_config()))
    res = tunelab("train", "cfg.yaml", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.jsonl:2: invalid JSON" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_model_and_bad_key_are_one_line(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(make_config()))
    res = tunelab("train", "cfg.yaml", "train.lrr=1", cwd=tmp_path)
    assert res.returncode == 2 and "config key 'train.lrr' is not known" in res.stderr
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    res = tunelab("train", "cfg.yaml", "model.name=gpt2", cwd=tmp_path)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown model 'gpt2'" in errors[0] and "minilm-l6, smollm2-135m" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # checked before a run directory is created


@pytest.mark.slow  # over a minute on 2 busy cores; `make test-slow` runs it
def test_train_predict_eval_roundtrip(tmp_path, tiny_encoder, sentiment_files):
    train, test = sentiment_files
    raw = make_config(
        model={"name": tiny_encoder},
        data={"train": str(train), "test": str(test), "max_train_samples": 16},
        train={"max_steps": 2},
        output={"dir": "runs", "name": "smoke"},
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    res = tunelab("train", "cfg.yaml", "method.name=lora", "data.validation_split=0.25", "train.eval_every=1",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "eval.accuracy" in res.stdout and "run directory: runs/smoke" in res.stdout
    # What a learner reads: memory in GiB, named as the whole process's resident memory; times in s or min;
    # the validation loss on the console while training.
    assert re.search(r"train\.peak_memory_bytes\W+[\d.]+ (GiB|MiB) \(process RSS\)", res.stdout), res.stdout
    assert re.search(r"train\.wall_s\W+[\d.]+ s\b", res.stdout) and "estimated peak memory" in res.stderr
    assert "step 1 validation loss " in res.stderr

    res = tunelab("predict", "runs/smoke", "a wonderful, moving film", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["label"] in ("negative", "positive") and abs(sum(row["scores"].values()) - 1) < 1e-4

    (tmp_path / "texts.txt").write_text("great\nawful\n\nfine\n")
    res = tunelab("predict", "runs/smoke", "--file", "texts.txt", "--output", "preds.jsonl", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 3

    res = tunelab("eval", "runs/smoke", "--data", str(test), cwd=tmp_path)
    assert res.returncode == 0 and "eval.accuracy" in res.stdout

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "neutral"}])
    res = tunelab("eval", "runs/smoke", "--data", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and "bad.jsonl:1: label 'neutral' is not one this model was trained on" in res.stderr

    res = tunelab("train", "--resume", "runs/smoke", "train.lr=1", cwd=tmp_path)
    assert res.returncode == 2 and "a resumed run keeps its own config.yaml" in res.stderr
    res = tunelab("train", "--resume", "runs/smoke", cwd=tmp_path)
    assert res.returncode == 2 and "this run already completed" in res.stderr

    res = tunelab("generate", "runs/smoke", "hello", cwd=tmp_path)
    assert res.returncode == 2 and "generate needs a causal_lm or instruction run" in res.stderr

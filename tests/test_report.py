"""Reports from fake run directories: files written, HTML self-contained, the numbers in the tables right."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.report import write_compare_report, write_run_report
from tunelab.report.document import _fence
from tunelab.report.units import human_bytes, human_count, human_duration

GIB = 1024**3


def make_run(
    root: Path, name: str, task: str = "classification", method: str = "lora", *, accuracy: float = 0.9,
    f1: float = 0.89, perplexity: float = 6.0, untuned_perplexity: float = 7.5, peak: int = 2 * GIB,
    trainable: int = 300_000, total: int = 23_000_000, wall_s: float = 120.0, artifact_bytes: int = 1024,
    status: str = "completed", error: str | None = None, train_extra: dict | None = None, samples: bool = True,
) -> Path:
    """A run directory shaped like one tunelab writes (see track/run_dir.py), with made-up numbers."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "task": task, "model": {"name": "minilm-l6" if task == "classification" else "smollm2-135m"},
        "method": {"name": method}, "train": {"lr": 5e-4},
    }))
    manifest = {"status": status, "started": "2026-01-01T00:00:00+00:00", "command": ["tunelab", "train", "x.yaml"],
                "seed": 42, "hardware": {"cpu": "Test CPU", "usable_cores": 2, "cuda": False}}
    if error:
        manifest["error"] = error
    (run / "manifest.json").write_text(json.dumps(manifest))
    log = [{"step": s, "loss": 1.0 / s, "lr": 5e-4, "real_tokens_per_s": 800.0, "peak_memory_bytes": peak}
           for s in (10, 20, 30)]
    validation = {"step": 20, "split": "validation"}
    validation.update({"accuracy": accuracy, "f1_macro": f1} if task == "classification" else {"loss": 1.9})
    lines = [json.dumps(r) for r in log[:2] + [validation] + log[2:]]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    model = run / "model" / "backbone"
    model.mkdir(parents=True)
    (model / "adapter_model.safetensors").write_bytes(b"\0" * artifact_bytes)
    if status != "completed":
        return run
    train = {"steps": 30, "wall_s": wall_s, "real_tokens": 96_000, "real_tokens_per_s": 800.0,
             "peak_memory_bytes": peak, "trainable_params": trainable, "total_params": total,
             "trainable_percent": 100 * trainable / total, "precision": "fp32", "lr": 5e-4, "num_processes": 1,
             **(train_extra or {})}
    metrics: dict = {"train": train, "total_wall_s": wall_s + 10}
    if task == "classification":
        (run / "labels.json").write_text(json.dumps(["ham", "spam"]))
        metrics["eval"] = {
            "accuracy": accuracy, "precision_macro": 0.91, "recall_macro": 0.88, "f1_macro": f1,
            "per_class": {"ham": {"precision": 0.95, "recall": 0.9, "f1": 0.9231, "support": 50},
                          "spam": {"precision": 0.8, "recall": 0.875, "f1": 0.8358, "support": 50}},
            "confusion_matrix": [[45, 5], [5, 45]], "num_examples": 100,
        }
    else:
        metrics["eval"] = {"loss": 1.79, "perplexity": perplexity, "num_tokens": 3859}
        metrics["eval_untuned"] = {"loss": 2.01, "perplexity": untuned_perplexity, "num_tokens": 3859}
        if samples:
            prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
            metrics["samples"] = [{"prompt": prompt, "completion": "Blue.", "stopped_at_eos": True, "new_tokens": 3,
                                   "reference": "Red."}]
            metrics["samples_stopped_at_eos"] = 1.0
            metrics["eval_untuned"]["samples"] = [{"prompt": prompt, "completion": "colour colour colour",
                                                   "stopped_at_eos": False, "new_tokens": 96}]
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def assert_self_contained(html: str) -> None:
    assert "data:image/png;base64," in html
    assert 'src="http' not in html and "<script" not in html and 'href="http' not in html


# ------------------------------------------------------------------ one run


def test_classification_run_report(tmp_path):
    run = make_run(tmp_path, "cls", artifact_bytes=2048)
    md_path, html_path = write_run_report(run)
    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    md, html = md_path.read_text(), html_path.read_text()
    for png in ("loss.png", "confusion.png"):
        assert (run / "plots" / png).stat().st_size > 1000
        assert f"](plots/{png})" in md
    assert_self_contained(html)
    assert html.count("data:image/png;base64,") == 2
    assert "| accuracy | 0.9000 |" in md and "| macro F1 | 0.8900 |" in md
    assert "| spam | 0.8000 | 0.8750 | 0.8358 | 50 |" in md
    assert "| saved artifact (model/) | 2.0 KiB |" in md
    assert "300.0K of 23.0M (1.3%)" in md
    assert "| train wall time | 2m 00s |" in md
    assert "estimated" not in md and "MFU" not in md  # absent keys: no rows


def _recorded_plan(tiny_decoder) -> dict:
    """The plan exactly as a run records it in metrics.json: the real estimate, serialised as run.py does."""
    from tunelab.config import validate_config
    from tunelab.plan import estimate

    from conftest import make_config

    raw = make_config(task="instruction", model={"name": tiny_decoder},
                      data={"train": "train.jsonl", "test": "test.jsonl", "max_length": 64},
                      method={"name": "lora", "rank": 4})
    return estimate(validate_config(raw), device="cpu", read_data=False).to_dict()


def test_lm_run_report_with_samples_plan_and_flops(tmp_path, tiny_decoder):
    extra = {"estimated_peak_memory_bytes": 3 * GIB, "flops_per_token": 8.1e8, "mfu": None}
    run = make_run(tmp_path, "lm", task="instruction", peak=2 * GIB, train_extra=extra)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["plan"] = plan = _recorded_plan(tiny_decoder)
    (run / "metrics.json").write_text(json.dumps(metrics))
    md_path, html_path = write_run_report(run)
    md, html = md_path.read_text(), html_path.read_text()
    assert (run / "plots" / "perplexity.png").is_file() and not (run / "plots" / "confusion.png").exists()
    assert_self_contained(html)
    assert "| test perplexity (tuned) | 6.00 |" in md and "| test perplexity (untuned) | 7.50 |" in md
    assert "| perplexity change | -20.0% |" in md
    assert "| peak memory (estimated) | 3.0 GiB |" in md and "| estimate / measured | 1.50x |" in md
    assert "| model FLOPs utilisation (MFU) | unknown |" in md and "810.0M FLOPs" in md
    # The memory plan shows the real split, train step beside eval pass, under the words people read.
    train, ev = plan["memory"], plan["eval_memory"]
    for label, key in (("weights", "weights"), ("optimizer state", "optimizer"), ("activations", "activations"),
                       ("logits + loss", "logits"), ("total", "total")):
        assert f"| {label} | {human_bytes(train[key])} | {human_bytes(ev[key])} |" in md, label
    assert f"| gradients | {human_bytes(train['gradients'])} | — |" in md  # an eval pass holds no gradients
    assert "peak_memory_bytes" not in md and "_bytes" not in md  # no raw key names
    # tuned beside untuned: both completions, in columns in the HTML
    assert "Blue." in md and "colour colour colour" in md and "Red." in md
    assert "tuned (3 tokens, ends with EOS)" in html and "untuned (96 tokens, no EOS" in html
    assert "repeat(3, 1fr)" in html


def test_failed_run_report_shows_status_error_and_log(tmp_path):
    run = make_run(tmp_path, "oom", status="failed", error="OutOfMemoryError: CUDA out of memory")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # torn last line of a killed run
    md_path, html_path = write_run_report(run)
    md = md_path.read_text()
    assert "status failed" in md and "OutOfMemoryError: CUDA out of memory" in md
    assert "| last logged step | 30 |" in md and "| peak memory (measured so far) | 2.0 GiB |" in md
    assert (run / "plots" / "loss.png").is_file()
    assert "OutOfMemoryError" in html_path.read_text()


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(TunelabError, match="not a run directory"):
        write_run_report(tmp_path / "nope")


def test_empty_directory_does_not_crash(tmp_path):
    (tmp_path / "bare").mkdir()
    md_path, _ = write_run_report(tmp_path / "bare")
    assert "status unknown" in md_path.read_text()


# ------------------------------------------------------------------ comparison


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_classification_comparison(tmp_path):
    runs = tmp_path / "runs"
    full = make_run(runs, "full", method="full", accuracy=0.92, f1=0.91, peak=6 * GIB, trainable=23_000_000,
                    wall_s=300, artifact_bytes=4096, train_extra={"estimated_peak_memory_bytes": 5 * GIB})
    lora = make_run(runs, "lora", accuracy=0.90, f1=0.89, peak=2 * GIB, trainable=300_000, wall_s=120)
    entries = [
        {"method": "full", "run_dir": str(full), "status": "completed", "error": None},
        {"method": "lora", "run_dir": str(lora), "status": "completed", "error": None},
        {"method": "qlora", "run_dir": None, "status": "failed", "error": "ImportError: bitsandbytes needs CUDA"},
    ]
    paths = write_compare_report(tmp_path / "cmp", entries)
    for key in ("md", "html", "csv", "json", "quality_plot", "loss_plot", "params_plot", "memory_plot", "cost_plot"):
        assert paths[key].is_file(), key
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert_self_contained(html)
    assert html.count("data:image/png;base64,") == 5
    assert "| full | completed | 0.9200 | 0.9100 | 5m 00s | 800.0 | 6.0 GiB | 5.0 GiB | 23.0M (100%) | 4.0 KiB |" in md
    assert "| lora | completed | 0.9000 | 0.8900 | 2m 00s | 800.0 | 2.0 GiB | — | 300.0K (1.3%) | 1.0 KiB |" in md
    assert "| qlora | failed |" in md and "ImportError: bitsandbytes needs CUDA" in md

    rows = read_csv(paths["csv"])
    assert list(rows) == ["full", "lora", "qlora"]
    assert float(rows["lora"]["accuracy"]) == 0.90 and int(rows["lora"]["peak_memory_bytes"]) == 2 * GIB
    assert int(rows["full"]["artifact_bytes"]) == 4096 and int(rows["lora"]["trainable_params"]) == 300_000
    assert int(rows["full"]["estimated_peak_memory_bytes"]) == 5 * GIB
    assert rows["lora"]["estimated_peak_memory_bytes"] == ""
    assert rows["qlora"]["status"] == "failed" and rows["qlora"]["accuracy"] == ""
    summary = json.loads(paths["json"].read_text())
    assert [r["method"] for r in summary["rows"]] == ["full", "lora", "qlora"]
    assert summary["quality_metric"] == "accuracy" and summary["rows"][0]["f1_macro"] == 0.91

    notes = summary["reading"]
    assert notes[0] == "Best on quality: full (accuracy 0.9200, macro F1 0.9100)."
    assert any(n.startswith("Least peak memory: lora (2.0 GiB") for n in notes)
    assert any(n.startswith("lora vs full fine-tuning: -2.0 points of accuracy") for n in notes)
    assert any("qlora (ImportError: bitsandbytes needs CUDA)" in n for n in notes)
    assert "## Reading this table" in md and notes[0] in md


def test_lm_comparison_ranks_lower_perplexity_first(tmp_path):
    runs = tmp_path / "runs"
    entries = [
        {"method": m, "run_dir": str(make_run(runs, m, task="causal_lm", method=m, perplexity=ppl, samples=False)),
         "status": "completed", "error": None}
        for m, ppl in (("prefix", 7.1), ("lora", 6.2), ("ia3", 6.9))
    ]
    paths = write_compare_report(tmp_path / "cmp", entries)
    rows = read_csv(paths["csv"])
    assert [float(rows[m]["perplexity"]) for m in ("prefix", "lora", "ia3")] == [7.1, 6.2, 6.9]
    summary = json.loads(paths["json"].read_text())
    assert summary["quality_metric"] == "perplexity"
    assert summary["reading"][0] == "Best on quality: lora (test perplexity 6.20)."
    assert "| lora | completed | 6.20 | 7.50 |" in paths["md"].read_text()


@pytest.mark.parametrize("entry", [
    {"method": "lora", "run_dir": None, "status": "failed", "error": "ValueError: bad rank"},
    {"method": "lora", "run_dir": "/nonexistent/run", "status": "completed", "error": None},
])
def test_comparison_with_nothing_completed(tmp_path, entry):
    paths = write_compare_report(tmp_path / "cmp", [entry])
    assert not any(k.endswith("_plot") for k in paths)
    summary = json.loads(paths["json"].read_text())
    assert summary["reading"][0] == "No method completed, so there is nothing to rank."
    assert summary["rows"][0]["status"] == "failed" and summary["rows"][0]["error"]


# ------------------------------------------------------------------ formatting


@pytest.mark.parametrize("fn, value, text", [
    (human_bytes, None, "—"), (human_bytes, 512, "512 B"), (human_bytes, 1536, "1.5 KiB"),
    (human_bytes, 10_516_017_152, "9.8 GiB"), (human_duration, 42.25, "42.2 s"), (human_duration, 114.63, "1m 55s"),
    (human_duration, 3 * 3600 + 120, "3h 02m"), (human_count, 332_546, "332.5K"), (human_count, 2_442_240, "2.44M"),
    (human_count, 134_516_162, "134.5M"), (human_count, 12, "12"),
])
def test_human_units(fn, value, text):
    assert fn(value) == text


def test_fence_is_longer_than_backticks_in_model_output():
    assert _fence("a ```python block") == "````text\na ```python block\n````"

"""`tunelab profile`: real training steps under torch.profiler, a top-ops table and a trace file."""

import json

from tunelab.config import validate_config
from tunelab.experiments.profile import run_profile
from tunelab.train.optim import build_optimizer

from conftest import make_config


def test_profile_records_the_loop_phases_and_writes_a_trace(tiny_encoder, sentiment_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, _ = sentiment_files
    cfg = validate_config(make_config(model={"name": tiny_encoder, "dropout": 0.0}, data={"train": str(train)},
                                      method={"name": "lora", "rank": 4}))
    run, summary = run_profile(cfg, steps=2, warmup=1, rows=5)

    assert run.path.name.startswith("profile-")
    assert run.manifest()["status"] == "completed" and run.manifest()["kind"] == "profile"
    assert set(summary["phase_ms_per_step"]) == {"forward", "backward", "optimizer"}
    assert all(ms > 0 for ms in summary["phase_ms_per_step"].values())
    ops = summary["top_ops"]
    assert len(ops) == 5 and ops[0]["self_ms"] >= ops[-1]["self_ms"] > 0
    assert any("addmm" in op["op"] or "mm" in op["op"] for op in summary["top_ops"]), "a transformer step is matmuls"
    trace = json.loads((run.path / "trace.json").read_text())
    assert trace["traceEvents"], "an empty trace"
    assert "Name" in (run.path / "ops.txt").read_text()
    assert not (run.path / "model").exists(), "profiling trains a few steps; it saves no model"


def test_8bit_adamw_keeps_uint8_moments_and_trains(tiny_encoder):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_encoder)
    opt = build_optimizer(model, 1e-3, 0.01, "adamw_8bit")
    before = model.embeddings.word_embeddings.weight.detach().clone()
    model(input_ids=torch.tensor([[101, 2023, 102]])).last_hidden_state.sum().backward()
    opt.step()
    state = opt.state[model.embeddings.word_embeddings.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert not torch.equal(before, model.embeddings.word_embeddings.weight)

"""Durable checkpoints: checksums verified on resume, a fallback past a damaged one, refusals in one line,
and a run that survives SIGKILL at random moments (saves included) with bitwise-equal final weights."""

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from tunelab.config import validate_config
from tunelab.errors import DataError, TunelabError
from tunelab.runtime.run_dir import RunDir
from tunelab.train.checkpoint import list_checkpoints, resume_checkpoint, save_checkpoint, verify_checkpoint
from tunelab.train.optim import build_scheduler
from tunelab.train.run import check_resumable, run_training

from conftest import make_config


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # frozen: checkpoints hold only trainable parameters
    return model


def _training(seed: int = 0):
    model = _model(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = build_scheduler(optimizer, "linear", 10, 0.0)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _save(root: Path, model, optimizer, scheduler, step: int, keep: int = 3) -> Path:
    return save_checkpoint(root, model, optimizer, scheduler, {"step": step, "epoch": 0, "batch_in_epoch": step}, keep)


def _saved_steps(root: Path, keep: int = 3) -> list[dict]:
    """Checkpoints of steps 1-3, and the model's trainable weights at each."""
    model, optimizer, scheduler = _training()
    weights = []
    for step in (1, 2, 3):
        _step(model, optimizer, scheduler)
        _save(root, model, optimizer, scheduler, step, keep)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return weights


def test_checkpoint_records_each_files_sha256_and_resumes_exactly(tmp_path):
    weights = _saved_steps(tmp_path)
    latest = tmp_path / "step-000003"
    checksums = json.loads((latest / "checksums.json").read_text())
    assert set(checksums) == {"trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                              "state.json"}
    assert verify_checkpoint(latest) is None
    model, optimizer, scheduler = _training(seed=1)  # other weights: resuming must overwrite every one
    warnings = []
    state, path = resume_checkpoint(tmp_path, model, optimizer, scheduler, warnings.append)
    assert path == latest and state["step"] == 3 and not warnings
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, weights[-1][name]), name
    assert scheduler.last_epoch == 3


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete state.json", "empty checksums.json"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_with_one_warning(tmp_path, damage):
    weights = _saved_steps(tmp_path)
    latest = tmp_path / "step-000003"
    target = latest / "optimizer.safetensors"
    if damage == "flip a byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete state.json":
        (latest / "state.json").unlink()
    else:
        (latest / "checksums.json").write_text("")
    assert verify_checkpoint(latest) is not None
    model, optimizer, scheduler = _training(seed=1)
    warnings = []
    state, path = resume_checkpoint(tmp_path, model, optimizer, scheduler, warnings.append)
    assert path.name == "step-000002" and state["step"] == 2
    assert len(warnings) == 1 and "step-000003" in warnings[0] and "step-000002" in warnings[0], warnings
    assert torch.equal(model[1].weight, weights[1]["1.weight"])


def test_every_checkpoint_damaged_is_one_line_not_step_zero(tmp_path):
    _saved_steps(tmp_path)
    for path in list_checkpoints(tmp_path):
        (path / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(TunelabError, match=r"no intact checkpoint to resume from .*step-000003.*step-000001") as err:
        resume_checkpoint(tmp_path, *_training(), lambda line: None)
    assert "\n" not in str(err.value)


def test_checkpoint_lacking_a_trainable_parameter_is_refused(tmp_path):
    _saved_steps(tmp_path)
    model, optimizer, scheduler = _training()
    model.append(nn.Linear(2, 2))  # a trainable parameter the checkpoint never saw
    with pytest.raises(TunelabError, match=r"lacks 2 trainable parameter\(s\), e\.g\. 2\.weight"):
        resume_checkpoint(tmp_path, model, optimizer, scheduler, lambda line: None)
    # ... and the negative control: the same model without it resumes.
    assert resume_checkpoint(tmp_path, *_training(), lambda line: None)[1].name == "step-000003"


def test_pruning_keeps_the_newest_and_drops_leftovers(tmp_path):
    model, optimizer, scheduler = _training()
    (tmp_path / ".step-000009.tmp").mkdir()  # a save killed midway, under another step's name
    (tmp_path / "step-000007").mkdir()  # later than the run now is: from before it fell back
    for step in (1, 2, 3):
        _save(tmp_path, model, optimizer, scheduler, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]


def _manifest_run(tmp_path: Path, train: Path) -> RunDir:
    return RunDir.create(tmp_path / "run", "task: classification\n", seed=0, data_files={"train": str(train)},
                         hardware={})


def test_resume_refuses_changed_data_in_one_line_unless_allowed(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n')
    run = _manifest_run(tmp_path, train)
    run.update_manifest(status="failed")
    cfg = validate_config(make_config(data={"train": str(train)}))
    check_resumable(run, cfg)  # unchanged: fine
    train.write_text('{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match=r"train: .*train\.jsonl changed since the run started .*--allow-changed-data"):
        check_resumable(run, cfg)
    check_resumable(run, cfg, allow_changed_data=True)


# ------------------------------------------------------------------ SIGKILL at random moments


def _config(tmp_path: Path, tiny_encoder: str, sentiment_files, name: str):
    train, test = sentiment_files
    return validate_config(make_config(
        model={"name": tiny_encoder, "dropout": 0.1},  # dropout: the RNG state must resume too
        data={"train": str(train), "test": str(test), "max_length": 32, "max_train_samples": 32},
        train={"max_steps": 30, "save_every": 2, "keep_checkpoints": 2, "lr": 1e-3, "batch_size": 4},
        output={"dir": str(tmp_path / "runs"), "name": name},
    ))


def _forked_training(cfg, resume_dir: str | None) -> int:
    """Train in a forked child (torch is already loaded: no interpreter start per attempt); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            with open(os.devnull, "w") as sink:
                run_training(cfg, resume_dir, Console(file=sink))
            code = 0
        finally:
            os._exit(code)
    return pid


def _last_step(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    steps = [json.loads(x)["step"] for x in lines[-1:] if x.endswith("}")]
    return steps[-1] if steps else 0


def _wait_for(condition, pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the trainer ended before it could be killed"
        assert time.monotonic() < deadline, "the trainer made no progress"
        time.sleep(0.001)


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread, in this process and the forked ones: the same summation order in every attempt, and a
    forked child never waits on OpenMP threads that exist only in its parent."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def test_sigkill_at_random_moments_resumes_to_bitwise_equal_weights(tmp_path, tiny_encoder, sentiment_files,
                                                                    one_thread):
    """10 SIGKILLs over one run: while it sets up or loads a checkpoint, mid-step, and mid-save (its temporary
    folder exists). Each resume must start from an intact checkpoint, and the final weights must equal an
    uninterrupted run's bit for bit (CPU, fp32)."""
    straight, _ = run_training(_config(tmp_path, tiny_encoder, sentiment_files, "straight"),
                               console=Console(file=open(os.devnull, "w")))
    cfg = _config(tmp_path, tiny_encoder, sentiment_files, "killed")
    run = Path(cfg.output.dir) / "killed"
    ckpts = run / "checkpoints"
    rng = random.Random(20261207)
    moments = ["save"] * 4 + ["step"] * 4 + ["setup"] * 2
    rng.shuffle(moments)
    pid = _forked_training(cfg, None)
    mid_save = 0
    for moment in moments:
        if moment == "save":  # a checkpoint is being written: its temporary folder exists
            _wait_for(lambda: ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir()), pid)
            time.sleep(rng.uniform(0, 0.005))
        elif moment == "step":  # mid-training, a few steps on from wherever it resumed
            target = min(_last_step(run), 26) + rng.randint(1, 3)
            _wait_for(lambda: _last_step(run) >= target, pid)
            time.sleep(rng.uniform(0, 0.05))
        else:  # while it loads the model, or verifies and loads a checkpoint
            _wait_for(lambda: (run / "manifest.json").is_file(), pid)
            time.sleep(rng.uniform(0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at '{moment}'"
        mid_save += any(p.name.endswith(".tmp") for p in ckpts.iterdir()) if ckpts.is_dir() else 0
        assert RunDir(run).status() == "killed"
        pid = _forked_training(cfg, str(run))
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the last resume did not finish"
    assert RunDir(run).status() == "completed"
    assert mid_save >= 2, f"only {mid_save} kills landed while a checkpoint was being written"
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # the leftovers were cleaned

    def weights(path: Path) -> dict:
        out = dict(load_file(path / "model" / "head.safetensors"))
        for f in (path / "model" / "backbone").glob("*.safetensors"):
            out.update(load_file(f))
        return out

    a, b = weights(straight.path), weights(run)
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ from the uninterrupted run, e.g. {unequal[:3]}"

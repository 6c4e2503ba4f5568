"""Exit codes that scripts and CI pipelines can trust, each checked on a real `tunelab` process: 0 success, 1 some
work failed, 2 a user mistake (usage errors included, never a traceback), 130 Ctrl-C; and the status a run
records when it is interrupted or killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunelab.runtime.run_dir import RunDir

from conftest import make_config


def tunelab(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def start(*args, cwd) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    # As at a terminal: a suite started in the background (`make test &`) runs with SIGINT ignored, and a child
    # inherits that, so Ctrl-C would never reach the command under test.
    return subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"tunelab ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def trained_a_step(run: Path):
    return lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()


@pytest.fixture
def long_run(tmp_path, tiny_encoder, sentiment_files):
    """A config for a run long enough to be stopped while it trains."""
    train, test = sentiment_files

    def write(name: str, **extra) -> Path:
        raw = make_config(
            model={"name": tiny_encoder, "dropout": 0.0},
            data={"train": str(train), "test": str(test), "max_length": 32, "max_train_samples": 32},
            train={"max_steps": 100000, "batch_size": 8},
            output={"dir": "runs", "name": name},
        )
        raw.update(extra)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.mark.parametrize("args, said", [
    (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    (["train", "--bogus", "x"], "No such option: --bogus"),
    (["compare", "--methods"], "Option '--methods' requires an argument"),
])
def test_usage_errors_exit_2_with_the_usage_line_and_no_traceback(tmp_path, args, said):
    res = tunelab(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("Usage: ") and said in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) <= 5


def test_help_exits_0(tmp_path):
    res = tunelab("train", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--allow-changed-data" in res.stdout


def test_ctrl_c_during_train_exits_130_and_the_run_reads_interrupted(tmp_path, long_run):
    proc = start("train", str(long_run("stopped")), cwd=tmp_path)
    run = tmp_path / "runs" / "stopped"
    wait_for(trained_a_step(run), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr, stderr[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["process"]["pid"] == proc.pid


OWNED_RUN = """
import sys, time
from tunelab.runtime.run_dir import RunDir
RunDir.create(sys.argv[1], "task: classification\\n", seed=0, data_files={}, hardware={})
print("created", flush=True)
time.sleep(600)
"""


def test_kill_9_leaves_a_run_that_reads_killed_in_the_manifest_reader_and_report(tmp_path):
    """Fast: the process that owns the run only creates it and waits (no model loads)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", OWNED_RUN, str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "created"
    run = RunDir(tmp_path / "run")
    assert run.status() == "running" and run.owner_alive()  # negative control: alive reads running
    proc.kill()
    proc.wait(timeout=60)
    assert json.loads(run.manifest_path.read_text())["status"] == "running"  # what the dead process left
    assert run.status() == "killed" and "killed" in run.manifest()["error"]
    res = tunelab("report", str(run.path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = (run.path / "report.md").read_text()
    assert "status killed" in report and "This run was killed" in report


@pytest.mark.slow
def test_kill_9_during_training_leaves_a_run_that_reads_killed(tmp_path, long_run):
    proc = start("train", str(long_run("oom")), cwd=tmp_path)
    run = tmp_path / "runs" / "oom"
    wait_for(trained_a_step(run), proc)
    proc.kill()
    proc.wait(timeout=60)
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"  # what the dead process left
    assert RunDir(run).status() == "killed"
    res = tunelab("report", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = (run / "report.md").read_text()
    assert "status killed" in report and "This run was killed" in report


def test_compare_with_a_failed_technique_exits_1(tmp_path, long_run):
    """Fast: the technique fails on its data before any model loads."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good", "label": "pos"}\n{"text": "bad" "label": "neg"}\n')
    path = long_run("cmp-bad", compare={"methods": ["ia3"]})
    res = tunelab("compare", str(path), f"data.train={bad}", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "ia3 failed:" in res.stderr and "bad.jsonl:2: invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_compare_with_a_killed_technique_exits_1_and_its_row_reads_killed(tmp_path, long_run):
    path = long_run("cmp", compare={"methods": ["ia3"]})
    proc = start("compare", str(path), cwd=tmp_path)
    run = tmp_path / "runs" / "cmp" / "ia3"
    wait_for(trained_a_step(run), proc)
    trial = json.loads((run / "manifest.json").read_text())["process"]["pid"]
    assert trial != proc.pid  # each technique trains in a process of its own
    os.kill(trial, signal.SIGKILL)  # what the out-of-memory killer does
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    row = json.loads((tmp_path / "runs" / "cmp" / "comparison.json").read_text())["rows"][0]
    assert row["status"] == "killed" and "status -9" in row["error"], row
    assert "killed" in stdout


@pytest.mark.slow
def test_ctrl_c_during_compare_exits_130_and_a_rerun_resumes_it(tmp_path, long_run):
    """The technique that completed is kept, the one Ctrl-C stopped resumes from its checkpoint (the fast
    variant, with the trials in this process: test_compare.py)."""
    path = long_run("resumable", compare={"methods": ["ia3", "lora"], "per_method": {
        "ia3": {"train": {"max_steps": 2}},
        "lora": {"train": {"max_steps": 40, "save_every": 1}},
    }})
    proc = start("compare", str(path), cwd=tmp_path)
    compare_dir = tmp_path / "runs" / "resumable"
    checkpoints = compare_dir / "lora" / "checkpoints"
    wait_for(lambda: checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert RunDir(compare_dir / "ia3").status() == "completed"
    assert RunDir(compare_dir / "lora").status() == "interrupted"  # passed on to the technique's own process
    finished = (compare_dir / "ia3" / "metrics.json").stat().st_mtime_ns

    res = tunelab("compare", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ia3: completed earlier under the same config and data; kept, not trained again" in res.stderr
    assert "lora: the earlier attempt interrupted; resuming it" in res.stderr
    assert "resumed from" in res.stderr and "step-0000" in res.stderr
    assert (compare_dir / "ia3" / "metrics.json").stat().st_mtime_ns == finished
    assert RunDir(compare_dir / "lora").status() == "completed"
    rows = json.loads((compare_dir / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("ia3", "completed"), ("lora", "completed")]


def test_resume_with_changed_data_exits_2_in_one_line(tmp_path, tiny_encoder, sentiment_files):
    """Fast: the run directory is made here, as a stopped run leaves it; the refusal comes before any model loads."""
    from tunelab.config import dump_config, validate_config

    train, test = sentiment_files
    cfg = validate_config(make_config(model={"name": tiny_encoder}, data={"train": str(train), "test": str(test)}))
    run = RunDir.create(tmp_path / "run", dump_config(cfg), seed=0, data_files={"train": str(train), "test": str(test)},
                        hardware={})
    run.fail(KeyboardInterrupt())
    train.write_text(train.read_text() + train.read_text().splitlines()[0] + "\n")
    res = tunelab("train", "--resume", str(run.path), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 1 and "changed since the run started" in errors[0] and "--allow-changed-data" in errors[0]
    assert run.status() == "interrupted"  # refused before the run was touched


def test_a_failed_run_leaves_ctrl_c_working_even_when_the_handler_was_set_outside_python(monkeypatch):
    """_record_failure ignores SIGINT while it writes the manifest; it must then put a handler back even when
    signal.signal reported None (a handler installed by C code), or every process started later inherits an
    ignored Ctrl-C (a child `tunelab train` then could not be interrupted)."""
    from tunelab.train import run as run_mod

    class FakeRun:
        def fail(self, err):
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # ignored while the manifest is written

    real_signal = signal.signal
    calls = []

    def signal_reporting_none_first(sig, handler):
        previous = real_signal(sig, handler)
        calls.append(handler)
        return None if len(calls) == 1 else previous  # what Python says of a handler set outside Python

    saved = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(run_mod.signal, "signal", signal_reporting_none_first)
        run_mod._record_failure(FakeRun(), RuntimeError("x"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        real_signal(signal.SIGINT, saved)

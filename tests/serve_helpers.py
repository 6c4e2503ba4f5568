"""Shared by the serving tests: tiny trained runs and a real server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from conftest import make_config, write_jsonl

WORDS = ["apple", "river", "stone", "cloud", "music", "green", "light", "paper"]


def instruction_files(folder: Path) -> tuple[Path, Path]:
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}."} for w in WORDS * 4]
    return write_jsonl(folder / "instr-train.jsonl", rows[:24]), write_jsonl(folder / "instr-test.jsonl", rows[24:])


def train_run(folder: Path, name: str, model: str, task: str, method: dict, train_file: Path, test_file: Path,
              **sections) -> Path:
    """Train a few steps on a tiny model; returns the run directory."""
    from tunelab.config import validate_config
    from tunelab.train.run import run_training

    raw = make_config(
        task=task, model={"name": model, "dropout": 0.0},
        data={"train": str(train_file), "test": str(test_file), "max_length": 32 if task == "classification" else 64,
              "max_train_samples": 24},
        method=method, train={"max_steps": 2, "batch_size": 8}, eval={"num_samples": 0, "untuned": False},
        output={"dir": str(folder), "name": name},
    )
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    run, _ = run_training(validate_config(raw))
    return run.path


class LiveServer:
    """The real app on uvicorn, bound to a free port on 127.0.0.1, in a thread of this process."""

    def __init__(self, settings):
        import uvicorn

        from tunelab.serve.app import create_app
        from tunelab.serve.server import bind
        from tunelab.serve.state import ServerState

        settings.host, settings.port = "127.0.0.1", 0
        self.state = ServerState(settings)
        self.app = create_app(self.state)
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while not self.state.ready.is_set():
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            if time.time() > deadline:
                raise TimeoutError("server did not load its models in 120 s")
            time.sleep(0.05)
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def post(url: str, body: dict, key: str | None = None, timeout: float = 60):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url, json=body, headers=headers, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

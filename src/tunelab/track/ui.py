"""The MLflow UI on the embedded store: the command `tunelab ui` runs, and a context manager that starts it
on a free loopback port and waits until it answers (for tests and for the docs' screenshots)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.track.tracking import ARTIFACTS_NAME, DB_NAME


def ui_command(store_dir: Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow server` on <store_dir>/mlflow.db, serving the artifacts beside it; one worker is plenty
    for one person browsing and keeps memory low."""
    db = store_dir / DB_NAME
    if not db.is_file():
        raise TunelabError(f"no MLflow store at {db}: train a run first (tracking is on by default), or give --dir")
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db.resolve()}",
            "--default-artifact-root", (store_dir / ARTIFACTS_NAME).resolve().as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_ui(store_dir: Path, timeout_s: float = 180.0):
    """Start the UI on 127.0.0.1 and a free port; yield its base URL once /health answers; stop it after."""
    port = free_port()
    proc = subprocess.Popen(ui_command(store_dir, port=port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server on {url} did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

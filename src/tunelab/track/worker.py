"""A training run's MLflow tracking in a process of its own, so that it costs the run almost nothing.

Most of what tracking costs is fixed: importing mlflow (several seconds of Python on a slow CPU), opening the
SQLite store (a new one runs its schema migrations) and the calls around the run. In the training process
that work would hold the interpreter's lock while torch and the model load, which is itself single-threaded
Python, so a thread could not overlap it. A second process can: `open_tracking` (tracking.py) starts this one
as soon as the data has passed its checks, and it does the slow part on another core while the training
process imports torch and loads the model. The training process never imports mlflow.

The worker runs the same Tracker as tracking in-process (tracking.py), fed one JSON line per request on its
stdin; it answers each with one JSON line on its stdout:

  open    {uri, experiment}        import mlflow, open the store, find or make the experiment
  start   {run, experiment, resume}  make (or reopen) the MLflow run; log params and data inputs
  log     {records}                metrics.jsonl lines, every FLUSH_S seconds: one batch each
  finish  {error}                  final metrics, tags, artifacts; the MLflow run's status
  report                           report.html/.md and plots/ once `tunelab train` has written them

An answer carries `warning` (the one "tracking off: ..." line, which the training process prints: the worker
stops tracking after it, as in-process tracking does) and, for start, the manifest's `mlflow` entry, which the
training process writes itself: it owns the manifest, and two writers could lose each other's fields.
The training process reads answers without waiting while it trains, and waits for them at finish. A worker
that dies or cannot be started is one warning line too; the run goes on and its directory is complete.
The worker ends when its stdin closes: after the report, or when the training process exits (atexit here,
or the pipe closing if it is killed).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tunelab.runtime.run_dir import RunDir

WAIT_S = 300.0  # longest wait for the worker's answers at the end of a run (a team server that went quiet)
_OPEN: dict[str, TrackingWorker] = {}  # run path -> its worker, open until the report is logged


def open_worker(run_dir: str | Path) -> TrackingWorker | None:
    """The worker of a run that finished training in this process and waits for its report."""
    return _OPEN.get(str(Path(run_dir).resolve()))


@atexit.register
def _close_all() -> None:
    for worker in list(_OPEN.values()):
        worker.close()


class TrackingWorker:
    """The training process's side: the same start / on_log / finish as tracking.Tracker."""

    def __init__(self, console: Console, uri: str, experiment: str | None):
        from tunelab.track.tracking import FLUSH_S

        self.console, self.flush_s = console, FLUSH_S
        self.run: RunDir | None = None
        self.run_id: str | None = None
        self.broken = False
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()
        self.unanswered = 0
        self.buffer = b""
        for worker in list(_OPEN.values()):  # one run at a time: an earlier run's worker is done
            worker.close()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "tunelab.track.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        except OSError as err:
            self.proc = None
            self._off(f"MLflow worker could not start ({type(err).__name__}: {err})")
            return
        self._send({"op": "open", "uri": uri, "experiment": experiment})

    # ------------------------------------------------------------------ the pipe

    def _off(self, why: str) -> None:
        if not self.broken:
            self.broken = True
            self.console.print(f"[yellow]tracking off: {escape(why)}; the run directory is complete[/]",
                               highlight=False, soft_wrap=True)

    def _send(self, message: dict) -> None:
        if self.broken or self.proc is None:
            return
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
            self.unanswered += 1
        except (OSError, ValueError) as err:
            self._off(f"the MLflow worker went away ({type(err).__name__})")

    def _line(self, timeout: float) -> bytes | None:
        """One answer line; None when none came within timeout, b"" when the worker's stdout closed."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def _answers(self, wait: bool) -> None:
        """Read the answers that came (wait: all of them, up to WAIT_S)."""
        deadline = time.monotonic() + WAIT_S
        while self.unanswered and self.proc is not None:
            line = self._line(max(0.0, deadline - time.monotonic()) if wait else 0.0)
            if line is None:
                if wait:
                    self._off(f"the MLflow worker did not answer in {WAIT_S:.0f} s")
                    self._stop(patience=0.0)
                return
            if not line:
                self._off(f"the MLflow worker exited (status {self.proc.poll()})")
                self._stop()
                return
            try:
                answer = json.loads(line)
            except ValueError:
                continue  # not an answer
            if not isinstance(answer, dict):
                continue
            self.unanswered -= 1
            if answer.get("warning") and not self.broken:
                self.broken = True
                self.console.print(f"[yellow]{escape(answer['warning'])}[/]", highlight=False, soft_wrap=True)
            if answer.get("run_id"):
                self.run_id = answer["run_id"]
            if answer.get("mlflow") and self.run is not None:
                self.run.update_manifest(mlflow=answer["mlflow"])

    def _stop(self, patience: float = WAIT_S) -> None:
        """End the worker: close its stdin, give it `patience` seconds to finish what it was sent, then kill it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for key, worker in list(_OPEN.items()):
            if worker is self:
                del _OPEN[key]
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    # ------------------------------------------------------------------ the run

    def start(self, run: RunDir, track_cfg, output_dir: str, resume: bool = False) -> None:
        """Make the MLflow run; its id reaches the manifest as soon as the worker answers (not waited for)."""
        self.run = run
        self._send({"op": "start", "run": str(run.path), "experiment": track_cfg.experiment, "resume": resume})
        run.listeners.append(self.on_log)
        self._answers(wait=False)

    def on_log(self, record: dict) -> None:
        """Called by RunDir.log for each metrics.jsonl line: kept, and sent as one batch every FLUSH_S."""
        if self.broken:
            return
        self.pending.append(record)
        self._answers(wait=False)
        if time.monotonic() - self.last_flush >= self.flush_s:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            records, self.pending, self.last_flush = self.pending, [], time.monotonic()
            self._send({"op": "log", "records": records})

    def finish(self, run: RunDir, failed: BaseException | None = None) -> None:
        """Send the rest and the finish, and wait until the store has them (the run id is in the manifest
        then). The worker stays open for the report (log_report), or ends when this process does."""
        self._flush()
        self._answers(wait=True)  # the start's answer first: the manifest must hold the run id before it is logged
        self._send({"op": "finish", "error": f"{type(failed).__name__}: {failed}" if failed is not None else None})
        self._answers(wait=True)
        if self.proc is not None:
            _OPEN[str(run.path.resolve())] = self

    def report_and_close(self) -> None:
        self._send({"op": "report"})
        self._answers(wait=True)
        self.close()

    def close(self) -> None:
        self._answers(wait=True)
        self._stop()


# --------------------------------------------------------------------------- the worker process


def serve(requests, answers) -> None:
    """Answer each request line from `requests` with one line on `answers` (see the module docstring)."""
    from tunelab.track.tracking import Tracker, log_run_artifacts

    said = io.StringIO()
    tracker = Tracker(Console(file=said, width=100_000, color_system=None, highlight=False))
    run: RunDir | None = None
    for line in requests:
        request = json.loads(line)
        op, answer = request["op"], {}
        if op == "open":
            tracker._safely("store", tracker.open, request["uri"], request.get("experiment"))
        elif op == "start":
            run = RunDir(request["run"])
            record: dict = {}

            def create(run=run, request=request, record=record) -> None:
                record.update(tracker.create(run, request["experiment"], request["resume"]) or {})

            tracker._safely("store", create)
            answer = {"run_id": tracker.run_id, "mlflow": record or None}
        elif op == "log":
            if tracker.run_id is not None:
                tracker.pending.extend(request["records"])
                tracker.flush()
        elif op == "finish" and run is not None:
            tracker.finish(run, request.get("error"))
        elif op == "report" and run is not None and tracker.run_id is not None:
            tracker._safely("report logging", log_run_artifacts, tracker.client, tracker.run_id, run)
        answer["warning"] = " ".join(said.getvalue().split())
        said.seek(0)
        said.truncate()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> None:
    # The training process keeps every core busy with OpenMP threads, and an OpenMP parallel region waits for
    # its slowest thread: a worker that preempts one of them stalls them all. At the lowest priority the worker
    # runs in the gaps (model loading, tokenisation, the pauses between steps) and hardly ever displaces a
    # training thread; at the end of the run the training process waits for it on idle cores.
    with contextlib.suppress(OSError):
        os.nice(19)
    # Offline-first: mlflow's usage telemetry stays off unless the user turned it on themselves.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Ctrl-C reaches the whole process group: the training process handles it and then sends the finish that
    # marks the MLflow run FAILED, which a worker killed by the same signal could not log.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing but answers may reach the pipe: anything else written to stdout goes to stderr
    sys.stdout = sys.stderr
    serve(sys.stdin, answers)


if __name__ == "__main__":
    main()

"""The one way experiments run a training: each trial in a process of its own.

`tunelab compare` (one trial per technique) and `tunelab sweep` (one per sampled configuration) both call
`run_trial`. A process per trial, because:

- peak memory is a process-lifetime high-water mark (peak RSS on CPU): trials sharing one process would
  each report the largest peak so far, not their own;
- a crash, an out-of-memory kill included, stays inside its own trial;
- nothing a trial loads (a model, a compiled graph, a quantized base) leaks into the next.

The command line's parent process never imports torch: it only parses configs, starts trials and reads their
results. On Linux such a parent forks (the child starts with the parent's small set of imported modules); a
parent that has loaded torch (a notebook, a test session) starts a fresh interpreter instead (spawn), since a
forked copy would carry its memory into the trial's peak and cannot use CUDA once the parent has. Periodic
validations travel from the child to the parent over a pipe, and the parent answers whether to go on: that is
how a sweep's pruner, which lives in the parent with the study, stops a trial.

A child dies with its parent (Linux: PR_SET_PDEATHSIG): a killed sweep leaves no trial training on behind
it, and the trial's run directory reads `killed` (runtime/processes.py). Ctrl-C is passed on: the trial
records `interrupted` and the parent re-raises it (the command exits 130).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

from rich.console import Console

from tunelab.config import RunConfig
from tunelab.errors import ConfigError, DataError, ModelError, TunelabError

USER_ERRORS = {cls.__name__: cls for cls in (TunelabError, ConfigError, DataError, ModelError)}


class TrialFailed(Exception):
    """A trial's process ended without a result: the child's error (type and message), or how it died."""


class TrialPruned(Exception):
    """Raised inside a trial when the process that started it asked it to stop early (a sweep's pruner); the
    run directory records it as the run's error."""


def run_trial(cfg: RunConfig, console: Console, on_eval: Callable[[int, dict], None] | None = None,
              resume_dir: str | None = None) -> dict:
    """Train `cfg` in a new process and return its metrics (metrics.json), with its report written.
    resume_dir: continue that run directory (of `cfg`) from its latest checkpoint instead of starting one.

    on_eval(step, metrics) runs in this process for each periodic validation of the trial; if it raises, the
    trial is stopped (its run directory records TrialPruned with the message) and the same exception is
    raised here once the trial's process has ended. A user error in the trial (bad data, a technique that
    cannot apply) is raised here as the same TunelabError class; any other failure as TrialFailed.
    """
    context = multiprocessing.get_context(_start_method())
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_trial_process, args=(cfg, child_end, on_eval is not None, os.getpid(), resume_dir),
                              name=f"tunelab-trial-{cfg.output.name}")
    process.start()
    child_end.close()
    result, failure, stopped_by = None, None, None
    try:
        while True:
            try:
                message = parent_end.recv()
            except EOFError:  # the child is gone; what it sent last (if anything) is all there is
                break
            kind = message[0]
            if kind == "eval":
                try:
                    on_eval(message[1], message[2])
                except Exception as err:  # noqa: BLE001 - handed to the child as a stop, raised below
                    stopped_by = err
                    parent_end.send(str(err))
                else:
                    parent_end.send(None)
            elif kind == "done":
                result = message[1]
            elif kind == "failed":
                failure = message[1:]
        process.join()
    except BaseException as err:
        # The trial runs in a process group of its own, so Ctrl-C at a terminal reaches it only from here,
        # once: pass it on, give the trial time to record `interrupted`, then make sure it ends.
        if isinstance(err, KeyboardInterrupt) and process.is_alive():
            os.kill(process.pid, signal.SIGINT)
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join()
        raise
    finally:
        parent_end.close()
    if stopped_by is not None:
        raise stopped_by
    if failure is not None:
        name, message = failure
        if name in USER_ERRORS:
            raise USER_ERRORS[name](message)
        raise TrialFailed(f"{name}: {message}")
    if result is None:
        code = process.exitcode
        killed = " (killed: out of memory?)" if code in (-signal.SIGKILL, 137) else ""
        raise TrialFailed(f"the trial's process exited with status {code}{killed}")
    return result


def _start_method() -> str:
    """fork where it is safe and cheap: on Linux, from a process that holds no torch state (the command line's);
    spawn otherwise (macOS's system libraries are not fork-safe; a parent with torch loaded would lend the trial
    its memory and, on a GPU, a CUDA context the child cannot use)."""
    return "fork" if sys.platform.startswith("linux") and "torch" not in sys.modules else "spawn"


def _trial_process(cfg: RunConfig, conn, report_evals: bool, parent_pid: int, resume_dir: str | None) -> None:
    """The child: train, write the run's report, send the metrics (or the failure) and exit."""
    _die_with_parent(parent_pid)
    # A process group of its own: a terminal's Ctrl-C goes to the parent alone, which passes it on exactly
    # once (a second SIGINT could cut short the trial's record of the first).
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    console = Console(stderr=True)
    # Looked up at call time, not import time: a test (or a caller) that wraps run_training sees its wrapper run.
    from tunelab.train import run as run_module

    def ask_parent(step: int, metrics: dict) -> None:
        conn.send(("eval", step, metrics))
        stop = conn.recv()
        if stop is not None:
            raise TrialPruned(stop)

    try:
        run, metrics = run_module.run_training(cfg, resume_dir, console=console,
                                               on_eval=ask_parent if report_evals else None)
        from tunelab.report import report_after_run

        report_after_run(run.path, console)
        from tunelab.track.tracking import log_report

        log_report(run.path, console)
        conn.send(("done", metrics))
    except TrialPruned:
        pass  # the parent asked for it and raises its own reason
    except BaseException as err:  # noqa: BLE001 - everything goes to the parent, which decides what it means
        if not isinstance(err, (TunelabError, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()  # a bug in tunelab: its traceback belongs in the log
        conn.send(("failed", type(err).__name__, str(err)))
    finally:
        conn.close()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies, so a killed sweep leaves no orphan trial."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)

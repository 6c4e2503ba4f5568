"""Commands that put a trained run in front of users: serve it over HTTP, run it over a file, manage API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.cli.common import app, err, out, quiet_libraries
from tunelab.errors import TunelabError

keys_app = typer.Typer(no_args_is_help=True, help="API keys for `tunelab serve` (the file stores hashes only).")
app.add_typer(keys_app, name="keys")


def _require_serving_extra() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelabError(f"tunelab serve needs {', '.join(missing)}: pip install 'tunelab[serve]'")


@app.command()
def serve(
    sources: list[str] = typer.Argument(..., help="Run directories, export folders or router folders to serve, as "
                                        "PATH or NAME=PATH (the name requests put in 'model'; default: the folder "
                                        "name, and 'auto' for a router, whose task runs are served by task name)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port; 0 picks a free one."),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="Keys file (tunelab keys add); without it "
                                            "no key is asked for and admin routes are off."),
    rate_limit: Optional[str] = typer.Option(None, "--rate-limit", help="Requests per key, e.g. 60/min "
                                             "(token bucket; a key's own rate_limit wins)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most rows run in one model call."),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", min=0.0, help="How long the first request "
                                          "waits for others to share its batch."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Requests that may wait; past it, 503 with "
                                  "Retry-After."),
    max_body_kb: int = typer.Option(1024, "--max-body-kb", min=1, help="Largest request body (413 past it)."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Write requests.jsonl and served.json here."),
    log_payloads: bool = typer.Option(False, "--log-payloads", help="Also log inputs and outputs (personal data!)."),
    log_max_mb: int = typer.Option(50, "--log-max-mb", min=1, help="Rotate requests.jsonl at this size."),
    shutdown_timeout: float = typer.Option(60.0, "--shutdown-timeout", min=0.0, help="Seconds in-flight requests "
                                           "get to finish after SIGTERM."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let base models run Python code "
                                           "from their repository; a run's own config.yaml cannot turn this on."),
):
    """Serve runs over an OpenAI-compatible HTTP API; runs on one base model share one copy of it."""
    _require_serving_extra()
    from tunelab.serve.auth import KeyStore, parse_rate
    from tunelab.serve.registry import parse_source, router_runs
    from tunelab.serve.server import serve as run_server
    from tunelab.serve.state import ServeSettings

    from tunelab.runtime.run_dir import RunDir

    parsed = [parse_source(s) for s in sources]
    names = [n for n, _ in parsed]
    for name, path in parsed:
        if RunDir(path).is_router():  # its task runs must be here, and are served under their task names
            names += list(router_runs(path)[1])
        elif not RunDir(path).is_run() and not (path / "export.json").is_file():
            raise TunelabError(f"{path}: not a run directory (no config.yaml)")
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise TunelabError(f"two sources are named '{twice}' (a router's tasks are served by task name): name one, "
                           f"e.g. {twice}-2=PATH")
    if api_keys is not None:
        KeyStore.load(api_keys)  # a bad keys file fails here, in one line, before anything loads
    settings = ServeSettings(
        sources=parsed, host=host, port=port, api_keys=api_keys,
        rate_per_s=parse_rate(rate_limit) if rate_limit else None, max_batch=max_batch,
        batch_window_ms=batch_window_ms, max_queue=max_queue, max_body_bytes=max_body_kb * 1024, log_dir=log_dir,
        log_payloads=log_payloads, log_max_bytes=log_max_mb << 20, shutdown_timeout_s=shutdown_timeout,
        trust_remote_code=trust_remote_code,
    )
    quiet_libraries()
    raise typer.Exit(run_server(settings, announce=lambda line: print(line, flush=True)))


@app.command()
def batch(
    source: str = typer.Argument(..., help="A run directory (classification, causal_lm or instruction)."),
    input: Path = typer.Argument(..., help="JSONL: 'id' plus 'text' (classifiers) or 'prompt'/'messages'."),
    output: Path = typer.Option(..., "--output", help="JSONL, one line per input id; rerun to resume."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Inputs per model call (and per write)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Generation: default the run's eval.max_new_tokens."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let the base model run Python code "
                                           "from its repository; the run's own config.yaml cannot turn this on."),
):
    """Classify or generate (greedy) for every line of a file; resumable after a kill."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tunelab.serve.batch_job import run_batch

    quiet_libraries()
    with Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err) as bar:
        task = bar.add_task("batch", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = run_batch(source, input, output, batch_size, max_new_tokens, progress, trust_remote_code)
    resumed = f", {summary['skipped']:,} already there" if summary["skipped"] else ""
    out.print(f"wrote {summary['written']:,} lines to {output} ({summary['total']:,} inputs{resumed})")


@keys_app.command("add")
def keys_add(
    file: Path = typer.Argument(..., help="Keys file (created if missing)."),
    key_id: str = typer.Argument(..., help="A name for the key: it appears in logs and metrics, the key never does."),
    admin: bool = typer.Option(False, "--admin", help="May load and unload models at runtime."),
    rate_limit: Optional[str] = typer.Option(None, "--rate-limit", help="This key's own limit, e.g. 600/min."),
):
    """Create an API key: prints it once and stores only its sha256."""
    from tunelab.serve.auth import add_key

    key = add_key(file, key_id, admin, rate_limit)
    err.print(f"added key '{key_id}' to {file}{' (admin)' if admin else ''}; it is shown once, keep it now:")
    print(key)

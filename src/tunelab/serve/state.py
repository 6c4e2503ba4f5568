"""What one server holds while it runs, and the bookkeeping every request ends with (metrics + request log)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.serve.auth import ANONYMOUS, KeyStore, TokenBuckets
from tunelab.serve.batcher import Batcher
from tunelab.serve.metrics import ServerMetrics
from tunelab.serve.registry import ModelRegistry
from tunelab.serve.request_log import RequestLog


@dataclass
class ServeSettings:
    """Everything `tunelab serve` takes on its command line (see cli/serve.py for each option's help)."""

    sources: list[tuple[str, Path]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Path | None = None
    rate_per_s: float | None = None
    max_batch: int = 16
    batch_window_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256
    log_dir: Path | None = None
    log_payloads: bool = False
    log_max_bytes: int = 50 << 20
    shutdown_timeout_s: float = 60.0
    trust_remote_code: bool = False  # only the command line sets it, never a served run's config.yaml


@dataclass
class RequestContext:
    """One request's facts, filled in as it is handled and written out once when it ends."""

    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    key_id: str = "-"
    model: str | None = None
    model_version: int | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int | None = None
    ttft_s: float | None = None
    finish_reason: str | None = None
    payload_in: object = None
    payload_out: object = None
    finished: bool = False


class ServerState:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.keys = KeyStore.load(settings.api_keys) if settings.api_keys else None
        self.buckets = TokenBuckets()
        self.metrics = ServerMetrics()
        self.registry = ModelRegistry(settings.log_dir / "served.json" if settings.log_dir else None,
                                      trust_remote_code=settings.trust_remote_code)
        self.batcher = Batcher(settings.max_batch, settings.batch_window_ms / 1000, settings.max_queue, self.metrics)
        self.request_log = RequestLog(settings.log_dir, settings.log_max_bytes, payloads=settings.log_payloads)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.admin_lock = threading.Lock()  # one admin load at a time: each may read a whole base model
        self.on_fatal = None  # set by server.py: stop the server when a startup load fails
        self.on_ready = None  # set by server.py: say so once every startup model is loaded

    @property
    def key_ids(self) -> list[str]:
        return [k.id for k in self.keys.keys] if self.keys else [ANONYMOUS]

    def load_model(self, name: str, source) -> object:
        served = self.registry.load(name, source)
        for model in [served] + [self.registry.get(t) for t in getattr(served, "adapters", [])]:
            self.metrics.model_loaded(model.name, model.task, model.method, self.key_ids)
        return served

    def unload_model(self, name: str) -> bool:
        served = self.registry.get(name)
        if served is None or not self.registry.unload(name):
            return False
        self.metrics.model_unloaded(name, served.task, served.method)
        return True

    def load_startup_models(self) -> None:
        """Runs on a thread after the server is up, so /healthz answers (and /readyz says 503) while loading."""
        try:
            for name, source in self.settings.sources:
                self.load_model(name, source)
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()
        except Exception as e:  # a source that fails to load stops the server: half a fleet is not ready
            self.load_error = str(e) or type(e).__name__
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)

    def finish(self, ctx: RequestContext, status: int, error: str | None = None) -> None:
        """Count and log a request once, whatever path it ended on."""
        if ctx.finished:
            return
        ctx.finished = True
        latency = time.perf_counter() - ctx.started
        labels = (ctx.model or "-", ctx.key_id, ctx.endpoint)
        m = self.metrics
        m.requests.labels(*labels, str(status)).inc()
        if status < 400:
            m.latency.labels(*labels).observe(latency)
            m.prompt_tokens.labels(*labels).inc(ctx.prompt_tokens)
            if ctx.endpoint in ("chat", "completions"):
                m.generated_tokens.labels(*labels).inc(ctx.completion_tokens)
                if ctx.ttft_s is not None:
                    m.ttft.labels(*labels).observe(ctx.ttft_s)
        else:
            m.errors.labels(*labels, error or str(status)).inc()
        self.request_log.write(
            request_id=ctx.request_id, key_id=ctx.key_id, model=ctx.model, model_version=ctx.model_version,
            endpoint=ctx.endpoint, status=status, latency_s=latency, prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens, batch_size=ctx.batch_size, ttft_s=ctx.ttft_s,
            finish_reason=ctx.finish_reason, stream=ctx.stream, error=error,
            payload_in=ctx.payload_in, payload_out=ctx.payload_out,
        )

"""The request log: one JSON line per answered request, in --log-dir/requests.jsonl, rotated by size.

Monitoring and A/B analysis read this file, so its fields are a documented schema (docs/10-deployment.md,
"Request log"); add fields, never rename one. Rotation is the standard library's RotatingFileHandler:
requests.jsonl is renamed requests.jsonl.1 (and .1 to .2, ...) when it would pass --log-max-bytes, and
each line is written whole by one call under the handler's lock.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import datetime, timezone
from pathlib import Path

REQUEST_LOG_SCHEMA = 1
FILE_NAME = "requests.jsonl"


class RequestLog:
    def __init__(self, log_dir: str | Path | None, max_bytes: int = 50 * 2**20, backups: int = 5,
                 payloads: bool = False):
        self.payloads = payloads
        self._logger = None
        if log_dir is None:
            return
        path = Path(log_dir)
        path.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path / FILE_NAME, maxBytes=max_bytes, backupCount=backups,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        # A private logger that nothing else writes to, and that does not pass lines up to the root logger.
        self._logger = logging.getLogger(f"tunelab.serve.requests.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(handler)
        self._handler = handler

    def write(self, *, request_id: str, key_id: str, model: str | None, model_version: int | None, endpoint: str,
              status: int, latency_s: float, prompt_tokens: int = 0, completion_tokens: int = 0,
              batch_size: int | None = None, ttft_s: float | None = None, finish_reason: str | None = None,
              stream: bool = False, error: str | None = None, payload_in=None, payload_out=None) -> None:
        if self._logger is None:
            return
        record = {
            "schema": REQUEST_LOG_SCHEMA,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id, "key_id": key_id, "model": model, "model_version": model_version,
            "endpoint": endpoint, "status": status, "latency_ms": round(latency_s * 1000, 2),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 2),
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "batch_size": batch_size,
            "finish_reason": finish_reason, "stream": stream, "error": error,
        }
        if self.payloads:
            record["input"], record["output"] = payload_in, payload_out
        self._logger.info(json.dumps(record, ensure_ascii=False))

    def close(self) -> None:
        if self._logger is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()

"""Prometheus metrics, labelled by model and key id (never the key).

Each server has its own CollectorRegistry, so two servers in one process (the tests) never mix counts.
A model's series are created with zeros when it is loaded, so an adapter that has gone idle, or never
served a request yet, still shows on /metrics; `tunelab_model_loaded` says which are loaded now.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a classification batch on a small encoder takes milliseconds, a long CPU generation a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ENDPOINTS = ("chat", "completions", "classify")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        labels = ["model", "key_id", "endpoint"]
        self.requests = Counter("tunelab_requests", "Requests answered, by HTTP status.", labels + ["status"],
                                registry=r)
        self.latency = Histogram("tunelab_request_latency_seconds", "Time from arrival to the last byte.", labels,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tunelab_time_to_first_token_seconds", "Time from arrival to the first generated "
                              "token (chat and completions).", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "Prompt tokens read.", labels, registry=r)
        self.generated_tokens = Counter("tunelab_generated_tokens", "Tokens generated (EOS included).", labels,
                                        registry=r)
        self.errors = Counter("tunelab_errors", "Requests that failed, by error type.", labels + ["type"],
                              registry=r)
        self.batch_size = Histogram("tunelab_batch_size", "Rows in each batch the model ran.", ["model", "kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("tunelab_queue_depth", "Requests waiting for the model.", registry=r)
        self.loaded = Gauge("tunelab_model_loaded", "1 while the model is loaded.", ["model", "task", "method"],
                            registry=r)

    def model_loaded(self, name: str, task: str, method: str, key_ids: list[str]) -> None:
        self.loaded.labels(name, task, method).set(1)
        endpoints = ("classify",) if task == "classification" else ("chat", "completions")
        for key_id in key_ids:
            for endpoint in endpoints:
                self.requests.labels(name, key_id, endpoint, "200")
                self.latency.labels(name, key_id, endpoint)
                self.prompt_tokens.labels(name, key_id, endpoint)
                if endpoint != "classify":
                    self.ttft.labels(name, key_id, endpoint)
                    self.generated_tokens.labels(name, key_id, endpoint)
        kind = "route" if method == "router" else "classify" if task == "classification" else "generate"
        self.batch_size.labels(name, kind)

    def model_unloaded(self, name: str, task: str, method: str) -> None:
        self.loaded.labels(name, task, method).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

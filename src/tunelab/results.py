"""Typed results that stages hand each other, and the one place they become JSON.

config.py is the typed input of a run; this is its typed output. `plan/` produces a `Plan`, the training loop
`TrainMetrics`; the run writes both into metrics.json through `to_dict()`, and the report reads the plan back
through `Plan.from_dict()`. This module imports nothing but the standard library, so the report (which reads
files and imports no stage that trains) can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# The memory terms of a plan, in the order they are shown, with the words a reader sees.
MEMORY_TERMS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("activations", "activations"),
    ("logits", "logits + loss"),
    ("allocator", "allocator slack (CPU)"),
    ("runtime", "runtime"),
)


@dataclass
class MemorySplit:
    """Bytes held at a phase's peak, by what holds them. gradients is None for an evaluation pass (none exist)."""

    weights: int
    optimizer: int
    activations: int
    logits: int
    allocator: int
    runtime: int
    gradients: int | None = None

    @property
    def total(self) -> int:
        return sum(v for v in asdict(self).values() if v is not None)

    def to_dict(self) -> dict:
        terms = {key: getattr(self, key) for key, _ in MEMORY_TERMS if getattr(self, key) is not None}
        return {**terms, "total": self.total}

    @classmethod
    def from_dict(cls, d: dict) -> MemorySplit:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class ParameterSummary:
    total: int
    trainable: int
    quantized: int  # base weights stored in 4 bits (QLoRA)
    source: str  # "meta model" (exact) or "formula"


@dataclass
class ShapeSummary:
    micro_batch: int  # rows of the largest training micro-batch
    seq_len: int  # its padded width
    eval_batch: int | None
    eval_seq_len: int | None
    mean_tokens: float  # mean real tokens per training row
    source: str


@dataclass
class FlopsPerToken:
    train: float
    eval: float


@dataclass
class Plan:
    """The preflight estimate of one run (one process): see plan/__init__.py for every term.

    peak_memory_bytes is in the units tunelab measures its runs in (process RSS on CPU; allocated tensor bytes
    on CUDA, so without the CUDA context); peak_phase says whether the train step or an eval pass sets it.
    """

    model: str
    task: str
    method: str
    device: str
    precision: str
    params: ParameterSummary
    shapes: ShapeSummary
    memory: MemorySplit
    eval_memory: MemorySplit | None
    peak_memory_bytes: int
    peak_phase: str
    flops_per_token: FlopsPerToken
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["memory"] = self.memory.to_dict()
        out["eval_memory"] = self.eval_memory.to_dict() if self.eval_memory else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(
            **{k: d[k] for k in ("model", "task", "method", "device", "precision", "peak_memory_bytes", "peak_phase")},
            params=ParameterSummary(**d["params"]),
            shapes=ShapeSummary(**d["shapes"]),
            memory=MemorySplit.from_dict(d["memory"]),
            eval_memory=MemorySplit.from_dict(d["eval_memory"]) if d.get("eval_memory") else None,
            flops_per_token=FlopsPerToken(**d["flops_per_token"]),
            notes=list(d.get("notes", [])),
        )

    def memory_rows(self) -> list[tuple[str, int | None, int | None]]:
        """(label, train-step bytes, eval-pass bytes or None) per memory term, then the totals."""
        ev = self.eval_memory
        rows = [(label, getattr(self.memory, key), getattr(ev, key) if ev else None) for key, label in MEMORY_TERMS]
        return rows + [("total", self.memory.total, ev.total if ev else None)]


@dataclass
class TrainMetrics:
    """What one training run measured (metrics.json "train")."""

    steps: int
    wall_s: float
    real_tokens: int  # non-pad tokens trained on, every process's together
    real_tokens_per_s: float | None
    peak_memory_bytes: int  # process RSS on CPU, allocated tensor bytes on CUDA
    trainable_params: int
    total_params: int
    trainable_percent: float
    precision: str
    cpu_heap: str | None  # train.cpu_heap as applied (keep, release, environment); None on GPU
    lr: float
    num_processes: int
    estimated_peak_memory_bytes: int  # the plan's, beside the measured one
    flops_per_token: float
    mfu: float | None  # per device; None where the device's peak FLOP/s is unknown

    def to_dict(self) -> dict:
        return asdict(self)

"""`load_export(path)`: an export folder back as a model with the run's evaluate, predict and generate (the
same TrainedModel class a run loads as), for Python users and for `tunelab serve EXPORT_DIR`.

merged and adapter exports load here; onnx and gguf folders are for their own runtimes (onnxruntime,
llama.cpp / Ollama), and loading them here is refused in one line that says so.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunelab.errors import TunelabError
from tunelab.export.bundle import read_record, verify_files
from tunelab.export.hf_formats import load_adapter_model, load_merged_model
from tunelab.inference.trained import TrainedModel

LOADABLE = ("merged", "adapter")


def export_config(record: dict):
    """The source run's config, as recorded in export.json."""
    from tunelab.config import validate_config

    return validate_config(record["source"]["config"])


def load_export(path: str | Path, verify: bool = True, base_backbone: nn.Module | None = None) -> TrainedModel:
    """Load a merged or adapter export. verify: check every file against its sha256 in export.json first.
    base_backbone: (adapter exports) the base to build on instead of loading it, as TrainedModel takes it."""
    from tunelab.models.loading import load_tokenizer

    path = Path(path)
    record = read_record(path)
    fmt = record["format"]
    if fmt not in LOADABLE:
        runtime = {"onnx": "onnxruntime (InferenceSession on model.onnx)", "gguf": "llama.cpp or Ollama"}.get(fmt, fmt)
        raise TunelabError(f"{path}: a {fmt} export is for {runtime}; load_export and tunelab serve take "
                           f"{' or '.join(LOADABLE)} exports")
    if verify:
        verify_files(path, record)
    cfg = export_config(record)
    labels = record.get("labels") or []
    if fmt == "merged":
        model = load_merged_model(path, cfg, labels, record.get("classifier"))
    else:
        model = load_adapter_model(path, cfg, labels, record.get("classifier"), base_backbone)
    tokenizer = load_tokenizer(path, cfg.model)
    trained = TrainedModel.assemble(cfg, labels, model, tokenizer, path)
    trained.export_record = record
    return trained

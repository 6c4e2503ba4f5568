"""`tunelab export`: a finished run to a portable format (merged, adapter, onnx, gguf), each checked against
the run's own model before it is published (parity.py), and `load_export` to load one back."""

from tunelab.export.bundle import EXPORT_JSON, is_export, read_record
from tunelab.export.loading import load_export
from tunelab.export.parity import ParityError
from tunelab.export.run import FORMATS, export_run

__all__ = ["EXPORT_JSON", "FORMATS", "ParityError", "export_run", "is_export", "load_export", "read_record"]

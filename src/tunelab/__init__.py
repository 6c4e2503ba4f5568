"""tunelab: an offline-first toolkit for fine-tuning language models."""

__version__ = "0.1.0"

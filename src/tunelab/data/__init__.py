"""Data: sources, validation, templates, tokenization, batching."""

"""Bundled-model registry, loading, and the task wrappers the techniques act on."""

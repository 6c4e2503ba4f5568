"""Run directories and (later) experiment tracking."""

"""Metrics, evaluation passes and generation."""

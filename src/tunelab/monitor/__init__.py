"""Monitoring served models: reads the logs serve writes (never imports serve)."""

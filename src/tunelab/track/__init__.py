"""Experiment tracking and the model registry (mlflow imported lazily; never imports train)."""

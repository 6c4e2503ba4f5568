"""Using a finished run: evaluate, predict, generate."""

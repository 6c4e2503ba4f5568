"""`tunelab serve` and batch inference: many adapters on one base (fastapi/uvicorn imported lazily)."""

"""`tunelab serve` and `tunelab batch`: put trained runs in front of users.

  registry.py    which models are loaded, on which shared base; served.json for lineage
  engine.py      runs one group of requests on one model: batched classification, batched generation
  batcher.py     collects requests for a window, groups them by model, feeds the engine thread
  protocol.py    the OpenAI-compatible request and response shapes
  app.py         the FastAPI app: routes, errors in OpenAI's shape
  auth.py        API keys (stored hashed), per-key token buckets
  metrics.py     Prometheus metrics with model and key_id labels
  request_log.py one JSONL line per request, rotated by size
  state.py       what a running server holds; the one place a request is counted and logged
  server.py      uvicorn with graceful shutdown
  batch_job.py   resumable offline batch inference

Nothing here imports the training loop or experiments; fastapi, uvicorn and prometheus-client are imported
only by the modules that need them, so `import tunelab` stays light.
"""

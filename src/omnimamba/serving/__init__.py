"""Serving: continuous batching of answer generation (batcher.py) behind an OpenAI-style HTTP API (app.py)."""

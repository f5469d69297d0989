"""Serving a compiled model: continuous batching behind an OpenAI-compatible HTTP API.

`python -m optimum_gemma3.serve --model FOLDER` or `optimum-cli neuron serve --model ...`
(`launch.py`); the API (`app.py`) runs on an engine thread (`engine.py`) that steps the
runtime's `ContinuousBatcher`. Kept out of the package import: only a server needs
FastAPI and uvicorn loaded.
"""

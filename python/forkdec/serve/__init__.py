"""`forkdec serve`: an OpenAI-compatible HTTP server over the engine (docs/serve.md).

Layers, each a file: protocol (request schemas), textstream (incremental text),
scheduler (the engine's thread: continuous batching, the waiting queue), driver
(the engine's side: a long-lived Session), service (requests -> engine work),
responses (OpenAI bodies), metrics (Prometheus), app (the FastAPI routes), cli.
"""

"""An OpenAI-compatible HTTP server around one engine (`python -m nanovllm.serve MODEL`, or `nanovllm serve MODEL`).

protocol.py: the request bodies and OpenAI's error object. engine_loop.py: the one thread that calls the engine.
api.py: the FastAPI routes, streams and response objects. nanovllm/serve.py: the command that runs them."""

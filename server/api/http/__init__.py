"""The OpenAI-compatible HTTP API: FastAPI served by uvicorn in the gRPC server's event loop, on the same
``ServingState`` (auth and tenants, limits, metrics, draining). JSON ⇄ engine types live in :mod:`.convert`."""

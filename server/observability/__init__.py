"""Observability: the Prometheus metrics (declared in one module), the engine listener and scrape-time collector
that feed them, request recording, adapter-label bounding and drift detection. Nothing here knows gRPC."""

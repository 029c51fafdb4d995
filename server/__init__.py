"""The loraplex server: base model, adapters, engine, API, routing and observability."""

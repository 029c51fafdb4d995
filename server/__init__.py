"""The loraplex server: base model, adapters, engine, API, routing and observability."""

if __name__ != "loraplex.server":  # e.g. `import server` from the repository root: a second copy of every module
    raise ImportError(f"import loraplex.server, not {__name__}: the folder server/ is the package loraplex.server")

__version__ = "0.1.0"

"""The loraplex Python client and CLI."""

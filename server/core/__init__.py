"""Value types every server room shares: typed errors, engine events, request settings and the model shape.

This package sits below ``model/``, ``lora/`` and ``engine/`` (engine → model → lora → core) and imports nothing
from them, so the three never import one another in a cycle.
"""

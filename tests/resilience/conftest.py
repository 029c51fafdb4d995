"""Fixtures shared by the resilience scenarios: the base model's shape (for synthetic adapters), from the API
integration tests' conftest so both suites build adapters for the same base."""

from tests.integration.api.conftest import base_shape

__all__ = ["base_shape"]

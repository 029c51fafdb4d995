"""Errors the trainer raises before any training starts; each message says what is wrong and how to fix it."""

from __future__ import annotations


class TrainerError(ValueError):
    """A problem with the run's inputs; the CLI prints the message and exits with status 2."""


class ConfigError(TrainerError):
    """The training config (file or flags) or the base model it names cannot be used."""


class DataError(TrainerError):
    """A dataset is unreadable, empty, of an unknown format, or has records without the fields it needs."""


class PushError(TrainerError):
    """The server refused the pushed adapter or could not be reached; the message carries the server's reason."""

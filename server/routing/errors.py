"""Typed routing errors. The API maps each to one gRPC status code (``server/api/errors.py``); the message says
what to fix."""

from __future__ import annotations


class RoutingError(Exception):
    """Base of every routing error; ``str(error)`` is the message for the client."""


class InvalidRoute(RoutingError):
    """A route definition (RPC or routes file) is malformed: bad name, weights, variants or shadow."""


class UnknownRoute(RoutingError):
    """No route with this name is configured."""


class UnknownRequest(RoutingError):
    """Feedback names a request id the server does not remember as a routed request."""


class InvalidFeedback(RoutingError):
    """Feedback without a label or score, or with a score that is not a finite number."""


class FeedbackExists(RoutingError):
    """Feedback for this request id was already recorded (one outcome per request)."""


class StaleFeedback(RoutingError):
    """The request's route changed (a new experiment) or was deleted since the request was served."""


class RoutesFileError(RoutingError):
    """The routes file cannot be read or written; on a write failure nothing was changed."""

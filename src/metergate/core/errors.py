"""The errors metering operations raise (refusals of admissions are Decisions, never errors)."""

from __future__ import annotations

from typing import Any

__all__ = ["Conflict", "InvalidAmount", "NotFound", "StorageUnavailable"]


class InvalidAmount(ValueError):
    """An input is not acceptable (a float amount, a negative count, an unknown plan); names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NotFound(LookupError):
    """The customer, balance, metric or reservation does not exist."""


class Conflict(Exception):
    """The operation conflicts with the state: a reused idempotency key, a refused withdrawal,
    a reservation already closed, or a balance refusing a hold (`status` says which HTTP status)."""

    def __init__(self, slug: str, message: str, *, status: int = 409, state: Any = None) -> None:
        self.slug = slug
        self.message = message
        self.status = status
        self.state = state
        super().__init__(message)


class StorageUnavailable(ConnectionError):
    """Storage did not answer within its budget; the outcome of a mutation is unknown."""

"""Exceptions for bad input and bad configuration; refusals are values (core.model.Refusal).

    DeciderError
     ├── ConfigError       a config file, environment variable or flag is wrong (names key, value)
     ├── InvalidArgument   a request field is malformed or out of range (names each field)
     ├── NotFound          a named thing does not exist (e.g. deregistering an unknown endpoint)
     ├── Unauthenticated   an admin call without the configured bearer token or client certificate
     ├── PermissionDenied  an admin call from a client certificate not on the admin list
     ├── Overloaded        a server limit (concurrent RPCs, watchers) is reached
     └── StorageUnavailable  the registry store cannot be written (disk full, read-only, ...)

The gRPC adapters map these to status codes in one place (api/errors.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class DeciderError(Exception):
    """Base of every error Decider raises on purpose."""


class ConfigError(DeciderError):
    """Invalid configuration; the message names the file (when any), the key and the value."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(DeciderError):
    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(DeciderError):
    pass


class Unauthenticated(DeciderError):
    pass


class PermissionDenied(DeciderError):
    pass


class StorageUnavailable(DeciderError):
    """A change could not be made durable; nothing was changed. The message names the file
    and the cause."""


class Overloaded(DeciderError):
    """The server is at a configured limit (concurrent RPCs, watchers) or shutting down."""

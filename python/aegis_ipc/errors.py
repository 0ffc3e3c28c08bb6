"""Exceptions of aegis_ipc: one class per error of the bus, all deriving from AegisError.

Each has ``.code``: the seed's numeric code (503, 504, 400, 404, 409, 403, 429, 508, ...);
a RemoteError's code is the one the handler answered with. Each also carries, where the
error knows them (else ``None``): ``.service``, ``.instance`` (the instance involved: the
one that answered, the owner, the last one tried), ``.trace_id`` (the call's, for the
route logs) and ``.attempts`` (``(instance, error, seconds)`` for each failed attempt).

``Timeout`` is also a builtin ``TimeoutError``, ``BadRequest`` a ``ValueError``:
``except TimeoutError`` catches a call that timed out.
"""

from __future__ import annotations


class AegisError(Exception):
    """Base class of every error the bus raises."""

    code: int = 500
    service: str | None = None
    instance: str | None = None
    trace_id: int | None = None
    attempts: list[tuple[str, str, float]]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.code = type(self).code
        self.attempts = []


class NoAvailableInstance(AegisError):
    code = 503


class OwnerUnavailable(AegisError):
    code = 503


class CircuitOpen(AegisError):
    """This connection's circuit breaker for the service is open (its recent calls timed out)."""

    code = 503


class Timeout(AegisError, TimeoutError):
    code = 504


class BadRequest(AegisError, ValueError):
    """An invalid argument (name, id, timeout, ...), or a request the instance could not decode."""

    code = 400


class ResourceNotFound(AegisError):
    code = 404


class ResourceConflict(AegisError):
    code = 409


class InstanceConflict(AegisError):
    code = 409


class NotOwner(AegisError):
    code = 403


class PermissionDenied(AegisError):
    code = 403


class LimitExceeded(AegisError):
    code = 429


class LoopDetected(AegisError):
    code = 508


class MessageTooLarge(AegisError):
    """A payload or reply over the service's maximum message size."""

    code = 413


class BrokerUnavailable(AegisError):
    code = 502


class Incompatible(AegisError):
    code = 426


class RemoteError(AegisError):
    """The instance's handler answered with an error (``.code`` is its code)."""

    code = 500


class InternalError(AegisError):
    code = 500


class ServiceError(Exception):
    """Raise from a handler to answer with a specific code: ``ServiceError(404, "no such")``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


__all__ = [
    "AegisError",
    "NoAvailableInstance",
    "OwnerUnavailable",
    "CircuitOpen",
    "Timeout",
    "BadRequest",
    "ResourceNotFound",
    "ResourceConflict",
    "InstanceConflict",
    "NotOwner",
    "PermissionDenied",
    "LimitExceeded",
    "LoopDetected",
    "MessageTooLarge",
    "BrokerUnavailable",
    "Incompatible",
    "RemoteError",
    "InternalError",
    "ServiceError",
]

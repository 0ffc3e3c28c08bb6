"""Exceptions of aegis_ipc: one class per error of the bus, all deriving from AegisError.

Each has ``.code``: the seed's numeric code (503, 504, 400, 404, 409, 403, 429, 508, ...);
a RemoteError's code is the one the handler answered with.
"""


class AegisError(Exception):
    """Base class of every error the bus raises."""

    code: int = 500


class NoAvailableInstance(AegisError):
    code = 503


class OwnerUnavailable(AegisError):
    code = 503


class CircuitOpen(AegisError):
    """This connection's circuit breaker for the service is open (its recent calls timed out)."""

    code = 503


class Timeout(AegisError):
    code = 504


class BadRequest(AegisError):
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

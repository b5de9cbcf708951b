"""The sidecar's domain errors, and the status each is answered with.

Engine errors (``eraser.errors``) and these share ``EraserError``: each carries a stable
``code`` and a one-line message that never contains row text. Handlers raise them;
``failure_of`` names the status any exception is answered with (``wire.status_of`` turns
the name into the gRPC status). No grpc here: jobs record the status by name.
"""

from __future__ import annotations

from eraser.errors import EraserError


class NotFoundError(EraserError):
    """No such adapter, job or version."""

    code = "not_found"


class AlreadyExistsError(EraserError):
    """The name is taken, or a request id was used for a different request."""

    code = "already_exists"


class FailedPreconditionError(EraserError):
    """The request is valid but the system is not in a state to carry it out."""

    code = "failed_precondition"


class JobCancelled(EraserError):
    """Raised inside a running job when a client cancelled it."""

    code = "cancelled"


class JobDeadlineExceeded(EraserError):
    """Raised inside a job that outlived the deadline its request gave."""

    code = "deadline_exceeded"


class Unauthenticated(EraserError):
    """A call without valid credentials."""

    code = "unauthenticated"


class TooManyStreams(EraserError):
    """A client holds as many open streams as it may."""

    code = "resource_exhausted"


class ShuttingDown(EraserError):
    """Raised inside a running job when the sidecar drains; the job is resumed on restart."""

    code = "unavailable"


class JobStoreUnavailable(EraserError):
    """The job database cannot be reached (PostgreSQL restarting, the network away); retry."""

    code = "unavailable"


class LeaseLost(EraserError):
    """Raised inside a running job whose lease another worker took over (its worker paused or
    lost the database past the lease): it must not publish or record anything."""

    code = "aborted"


# Every domain code, and the status it is answered with.
STATUS_NAMES = {
    "invalid_argument": "INVALID_ARGUMENT",
    "not_found": "NOT_FOUND",
    "already_exists": "ALREADY_EXISTS",
    "failed_precondition": "FAILED_PRECONDITION",
    "cancelled": "CANCELLED",
    "deadline_exceeded": "DEADLINE_EXCEEDED",
    "unavailable": "UNAVAILABLE",
    "resource_exhausted": "RESOURCE_EXHAUSTED",
    "unauthenticated": "UNAUTHENTICATED",
    "aborted": "ABORTED",
    "internal": "INTERNAL",
}


def failure_of(error: BaseException) -> tuple[str, str]:
    """The status name and one-line detail for any exception a handler or job raised.

    Unexpected exceptions become INTERNAL with only their type name: their messages come
    from libraries and could quote input text, which must not leave the process.
    """
    if isinstance(error, EraserError):
        return STATUS_NAMES.get(error.code, "INTERNAL"), str(error)
    return "INTERNAL", f"internal error ({type(error).__name__}); see the sidecar's log"

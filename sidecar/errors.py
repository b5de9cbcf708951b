"""The sidecar's domain errors, and their mapping to gRPC status codes (the one place).

Engine errors (``eraser.errors``) and these share ``EraserError``: each carries a stable
``code`` and a one-line message that never contains row text. Handlers raise them;
``status_of`` turns any exception into the status a client sees.
"""

from __future__ import annotations

import grpc

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


class ShuttingDown(EraserError):
    """Raised inside a running job when the sidecar drains; the job is resumed on restart."""

    code = "unavailable"


_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "cancelled": grpc.StatusCode.CANCELLED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and one-line detail for any exception a handler or job raised.

    Unexpected exceptions become INTERNAL with only their type name: their messages come
    from libraries and could quote input text, which must not leave the process.
    """
    if isinstance(error, EraserError):
        return _STATUS.get(error.code, grpc.StatusCode.INTERNAL), str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the sidecar's log"

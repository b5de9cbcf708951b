"""Typed domain errors of the engine.

Every error the engine raises on bad input or an impossible request is an
``EraserError`` with a stable ``code``. The CLI prints ``str(error)`` on one line and
exits non-zero; the sidecar maps ``code`` to a gRPC status in one place. Nothing is
written before validation has passed, so raising one of these leaves no partial state.
"""

from __future__ import annotations


def quote_ids(ids, most: int = 5, width: int = 64) -> str:
    """Ids for an error message: at most ``most``, each cut to ``width`` characters, then
    "and N more". A message quoting every id of a large request would outgrow gRPC's
    metadata limit and reach the client as RESOURCE_EXHAUSTED instead of its own status."""
    ids = list(ids)
    shown = ", ".join(repr(i if len(i) <= width else i[:width] + "...") for i in ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


class EraserError(Exception):
    """Base class: a request the engine refuses, with a one-line explanation."""

    code = "internal"

    def __init__(self, message: str):
        # Keep messages single-line: they become CLI error lines and gRPC details.
        super().__init__(" ".join(str(message).split()))


class InvalidRequestError(EraserError):
    """The unlearning request itself is malformed or inconsistent with the data."""

    code = "invalid_argument"


class DataError(EraserError):
    """A dataset file is missing, unreadable, or not valid JSONL rows."""

    code = "invalid_argument"


class AdapterError(EraserError):
    """An adapter directory is missing, corrupt, or of an unsupported kind."""

    code = "invalid_argument"


class BaseModelMismatchError(EraserError):
    """The adapter was trained for another base model than the one given."""

    code = "failed_precondition"


class ProblemTooLargeError(EraserError):
    """The chosen solver cannot handle this many parameters (the dense direct solve)."""

    code = "failed_precondition"


class NotConvergedError(EraserError):
    """A solve stopped above its residual tolerance and the caller did not allow that."""

    code = "failed_precondition"

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class OutputExistsError(EraserError):
    """The output path already exists; adapters are immutable, so it is never overwritten."""

    code = "already_exists"


class BaseModelError(EraserError):
    """The base model directory is missing or cannot be loaded."""

    code = "invalid_argument"


class VerificationFailedError(EraserError):
    """After the erase (and any refinement) the erased rows do not look never-seen, or
    utility fell beyond its bound; nothing was written. ``report`` holds the numbers."""

    code = "failed_precondition"

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class UtilityCheckFailedError(EraserError):
    """The update raised the retained rows' loss beyond the configured bound (the adapter
    would forget what it should keep); nothing was written. ``check`` holds the numbers."""

    code = "failed_precondition"

    def __init__(self, message: str, check=None):
        super().__init__(message)
        self.check = check

"""A small Python client of the sidecar's ``eraser.v1.Eraser`` service, for backend services.

    with EraserClient("127.0.0.1:50051", token=...) as client:
        job = client.erase("demo", remove_ids=["row-17"], request_id="ticket-4711")
        job = client.wait(job.id)          # raises JobFailed unless it succeeded

Every ``grpc.RpcError`` becomes a :class:`SidecarError` carrying the status code and the
server's one-line details. The module imports neither torch nor the engine.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import grpc

from eraser.options import REQUEST_OPTIONS
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc

TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})

# EraseOptions fields accepted in a Mapping; the ones with presence (``optional``) are
# left unset when the value is None, so the sidecar's configured default applies.
OPTION_FIELDS = (*REQUEST_OPTIONS, "deadline_seconds")


class SidecarError(Exception):
    """A call failed: ``code`` is a ``grpc.StatusCode``, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        self.details = " ".join(str(details or "").split())
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "SidecarError":
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN, details or str(error))


class JobFailed(SidecarError):
    """``wait()`` saw the job end FAILED or CANCELLED; ``job`` is the final job."""

    def __init__(self, job: pb.Job):
        self.job = job
        if job.state == pb.JOB_STATE_CANCELLED and not job.error.code:
            code, message = grpc.StatusCode.CANCELLED, job.error.message or "the job was cancelled"
        else:
            code = getattr(grpc.StatusCode, job.error.code.upper(), None) if job.error.code else None
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.CANCELLED if job.state == pb.JOB_STATE_CANCELLED else grpc.StatusCode.UNKNOWN
            message = job.error.message or ("the job was cancelled" if job.state == pb.JOB_STATE_CANCELLED else "the job failed")
        super().__init__(code, f"job {job.id}: {message}")


def _pairs(value, text_name: str) -> list[tuple[str, str]]:
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for item in items:
        try:
            rid, text = item
        except (TypeError, ValueError):
            raise ValueError(f"{text_name} entries must be (row id, {text_name}) pairs") from None
        out.append((rid, text))
    return out


def erase_options(options: Mapping | pb.EraseOptions | None) -> pb.EraseOptions | None:
    """An ``EraseOptions`` from a Mapping of its field names (None values are skipped)."""
    if options is None or isinstance(options, pb.EraseOptions):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a Mapping or an EraseOptions, not {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown erase option(s): {', '.join(map(str, unknown))} (known: {', '.join(OPTION_FIELDS)})")
    return pb.EraseOptions(**{k: v for k, v in options.items() if v is not None})


class EraserClient:
    """Blocking client; ``timeout`` is the default deadline of every unary call, in seconds."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None, timeout: float = 30.0,
                 options=()):
        from .auth import open_channel  # imported here: the client module loads without it

        self.target, self.timeout = target, timeout
        self._channel = open_channel(
            target, token=token, ca=Path(tls_ca) if tls_ca else None, cert=Path(tls_cert) if tls_cert else None,
            key=Path(tls_key) if tls_key else None, options=options,
        )
        self._stub = eraser_pb2_grpc.EraserStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise SidecarError.from_rpc_error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EraserClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- adapters ------------------------------------------------------------------------

    def register_adapter(self, name: str, base_model: str, adapter_path: str | Path, dataset_path: str | Path,
                         holdout_path: str | Path | None = None, verify: str | None = None) -> pb.Adapter:
        """``holdout_path``: rows of the same kind the adapter never saw, the reference its
        erasures are verified against; ``verify``: its default policy (off, report, enforce)."""
        return self._call("RegisterAdapter", pb.RegisterAdapterRequest(
            name=name, base_model=str(base_model), adapter_path=str(adapter_path), dataset_path=str(dataset_path),
            holdout_path=str(holdout_path) if holdout_path else "", verify=verify or ""))

    def get_adapter(self, name: str) -> pb.Adapter:
        return self._call("GetAdapter", pb.GetAdapterRequest(name=name))

    def list_adapters(self) -> list[pb.Adapter]:
        return list(self._call("ListAdapters", pb.ListAdaptersRequest()).adapters)

    def rollback(self, adapter: str, version: int) -> pb.Adapter:
        return self._call("Rollback", pb.RollbackRequest(adapter=adapter, version=int(version)))

    def purge_history(self, adapter: str, before_version: int) -> pb.PurgeHistoryResponse:
        """Delete the adapter's versions older than ``before_version`` now, with their factor caches."""
        return self._call("PurgeHistory", pb.PurgeHistoryRequest(adapter=adapter, before_version=int(before_version)))

    # -- receipts ------------------------------------------------------------------------

    def erasure_receipt(self, job_id: str) -> pb.ErasureReceipt:
        """The signed receipt of a succeeded job (``sidecar.receipts.verify_file`` checks it)."""
        return self._call("GetErasureReceipt", pb.GetErasureReceiptRequest(job_id=job_id))

    def receipt_key(self) -> pb.ReceiptKey:
        return self._call("GetReceiptKey", pb.GetReceiptKeyRequest())

    # -- jobs ----------------------------------------------------------------------------

    def erase(self, adapter: str, *, remove_ids: Iterable[str] = (),
              modify_queries: Mapping[str, str] | Iterable[tuple[str, str]] = (),
              correct_responses: Mapping[str, str] | Iterable[tuple[str, str]] = (),
              request_id: str | None = None, options: Mapping | pb.EraseOptions | None = None) -> pb.Job:
        """Queue an unlearning request; returns the job at once (see ``wait``)."""
        if isinstance(remove_ids, str):
            raise TypeError("remove_ids must be a list of row ids, not a string")
        request = pb.EraseRequest(
            adapter=adapter, request_id=request_id or "", remove_ids=list(remove_ids),
            modify_queries=[pb.ModifyQuery(id=i, prompt=t) for i, t in _pairs(modify_queries, "prompt")],
            correct_responses=[pb.CorrectResponse(id=i, response=t) for i, t in _pairs(correct_responses, "response")],
        )
        opts = erase_options(options)
        if opts is not None:
            request.options.CopyFrom(opts)
        return self._call("Erase", request)

    def get_job(self, job_id: str) -> pb.Job:
        return self._call("GetJob", pb.GetJobRequest(id=job_id))

    def list_jobs(self, adapter: str | None = None, state: int | str | None = None, limit: int = 0) -> list[pb.Job]:
        """Newest first. ``state`` is a JobState value or a name like "running"."""
        if isinstance(state, str):
            name = state.upper()
            state = pb.JobState.Value(name if name.startswith("JOB_STATE_") else "JOB_STATE_" + name)
        request = pb.ListJobsRequest(adapter=adapter or "", state=state or 0, limit=int(limit or 0))
        return list(self._call("ListJobs", request).jobs)

    def cancel_job(self, job_id: str, request_id: str | None = None) -> pb.Job:
        """``request_id``: withdraw only that request from a job that serves several."""
        return self._call("CancelJob", pb.CancelJobRequest(id=job_id, request_id=request_id or ""))

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[pb.Job]:
        """The job now and at every change, until it ends (``timeout``: the stream's deadline)."""
        call = self._stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as e:
            raise SidecarError.from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; frees it when the caller stops early

    def wait(self, job_id: str, timeout: float | None = None, on_update: Callable[[pb.Job], None] | None = None,
             *, reconnect_for: float = 60.0) -> pb.Job:
        """Follow the job until it ends; return it if it SUCCEEDED, else raise ``JobFailed``.

        A stream broken with UNAVAILABLE (the sidecar restarting, a proxy dropping it) is
        reopened, with backoff, for as long as ``reconnect_for`` seconds of unbroken
        unavailability; past ``timeout`` seconds in all, SidecarError(DEADLINE_EXCEEDED).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        backoff = 0.1
        last: pb.Job | None = None

        def timed_out() -> SidecarError:
            state = f" (last state {pb.JobState.Name(last.state)[10:].lower()})" if last is not None else ""
            return SidecarError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} did not finish within {timeout:g} s{state}")

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise timed_out()
            return left

        while True:
            try:
                with contextlib.closing(self.watch_job(job_id, timeout=remaining())) as stream:
                    for job in stream:
                        down_since, backoff, last = None, 0.1, job
                        if on_update is not None:
                            on_update(job)
                        if job.state in TERMINAL_STATES:
                            break
                if last is not None and last.state in TERMINAL_STATES:
                    break
                # The stream ended before the job did: look once more, then watch again.
                left = remaining()
                job = self._call("GetJob", pb.GetJobRequest(id=job_id), None if left is None else min(left, self.timeout))
                if job.state in TERMINAL_STATES:
                    last = job
                    if on_update is not None:
                        on_update(job)
                    break
            except SidecarError as e:
                if e.code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None and deadline - time.monotonic() < 1.0:
                    raise timed_out() from None
                if e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since > reconnect_for:
                    raise
            left = remaining()
            time.sleep(backoff if left is None else min(backoff, left))
            backoff = min(backoff * 2, 2.0)
        assert last is not None
        if last.state != pb.JOB_STATE_SUCCEEDED:
            raise JobFailed(last)
        return last

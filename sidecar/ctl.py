"""``erasectl``: drive the unlearning sidecar (``eraser.v1.Eraser``) from the command line.

Errors are one line on stderr, ``erasectl: error: CODE: details``. Exit status: 2 for bad
input (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, UNAUTHENTICATED,
PERMISSION_DENIED, OUT_OF_RANGE, or a bad local file or flag), 1 when the sidecar is
unreachable or failed (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...) and when a waited-for
job failed or was cancelled or a receipt does not verify (``verify-receipt``, which runs
offline), 130 on Ctrl-C. Progress bars go to stderr; with ``--json`` the
last line on stdout is one JSON object. The text of prompts and responses is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from eraser.errors import DataError, InvalidRequestError
from eraser.options import SOLVERS, VERIFY_POLICIES
from eraser.request_file import read_request_file

if TYPE_CHECKING:
    from .report import JobReport, Verification

USAGE_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
})
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
PROG = "erasectl"


class LocalInputError(Exception):
    """Bad local input (a missing or malformed file, a bad flag value): exit 2."""


# -- argument parsing ----------------------------------------------------------------------


def _number(kind, minimum, strict=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}: {text}")
        return value

    return parse


def _version(text: str) -> int:
    return _number(int, 1)(text[1:] if text[:1] in ("v", "V") else text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--target", default=os.environ.get("ERASER_TARGET") or "127.0.0.1:50051",
                        help="host:port of the sidecar (env ERASER_TARGET; default 127.0.0.1:50051)")
    parser.add_argument("--token-file", help="file holding the bearer token (default: env ERASER_TOKEN, the token itself)")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify the sidecar with; enables TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--timeout", type=_number(float, 0, strict=True), default=30.0,
                        help="deadline of each call in seconds (default 30; waiting for a job has none)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_adapter_commands, _add_erase, _add_job_commands):
        add(sub)
    return parser


def _add_adapter_commands(sub) -> None:
    """register and adapters."""
    r = sub.add_parser("register", help="copy a PEFT adapter and its training set into the store as version 1")
    r.add_argument("name")
    r.add_argument("--base", required=True, help="base model directory, or a name from the sidecar's base_models")
    r.add_argument("--adapter", required=True, help="PEFT adapter directory (readable by the sidecar)")
    r.add_argument("--data", required=True, help="the adapter's training rows, JSONL (readable by the sidecar)")
    r.add_argument("--holdout", metavar="FILE",
                   help="rows of the same kind the adapter was never trained on, JSONL (readable by the sidecar): "
                        "the reference its erasures are verified against")
    r.add_argument("--verify", choices=VERIFY_POLICIES,
                   help="the adapter's default verification policy (default: the sidecar's erase.verify with "
                        "--holdout, else off)")

    a = sub.add_parser("adapters", help="list the adapters, or show one")
    a.add_argument("name", nargs="?")


def _add_erase(sub) -> None:
    """erase: the request and how to follow it."""
    e = sub.add_parser("erase", help="queue an unlearning request (and with --wait follow it to the end)")
    e.add_argument("adapter")
    e.add_argument("--remove", metavar="ID", nargs="+", action="extend", default=[], help="row id(s) to remove")
    e.add_argument("--modify-query", metavar=("ID", "PROMPT"), nargs=2, action="append", default=[],
                   help="give row ID a new prompt")
    e.add_argument("--correct-response", metavar=("ID", "RESPONSE"), nargs=2, action="append", default=[],
                   help="give row ID a new response")
    e.add_argument("--request", metavar="FILE",
                   help='JSON {"remove": [...], "modify_query": [...], "correct_response": [...]}, added to the flags')
    e.add_argument("--request-id", help="idempotency key: the same id returns the same job")
    _add_erase_solver_flags(e)
    e.add_argument("--verify", choices=VERIFY_POLICIES,
                   help="verified forgetting: enforce refines until the erased rows look never-seen against the "
                        "adapter's held-out set, or fails and publishes nothing; report only scores them "
                        "(default: the adapter's policy)")
    e.add_argument("--deadline", type=_number(float, 0), metavar="SECONDS",
                   help="fail the job if it has not finished this long after it was accepted")
    e.add_argument("--wait", action="store_true", help="follow the job (progress bar on stderr) and print the final job")


def _add_erase_solver_flags(e) -> None:
    """The solver options a request may set (the sidecar caps them)."""
    e.add_argument("--solver", choices=SOLVERS,
                   help="ekfac/kfac read the adapter's factor cache (the sidecar's factor_policy decides what happens "
                        "while it is not ready: wait, or cg)")
    e.add_argument("--preset", choices=["paper"], help="sqm only: the official LLMEraser settings")
    e.add_argument("--curvature", choices=["ggn", "hessian"])
    e.add_argument("--damping", type=_number(float, 0))
    e.add_argument("--objective", choices=["influence", "newton"])
    e.add_argument("--tolerance", type=_number(float, 0, strict=True), help="relative residual to reach (cg, sqm)")
    e.add_argument("--max-iterations", type=_number(int, 1), help="iteration limit (cg, sqm)")
    e.add_argument("--allow-unconverged", action="store_true", help="publish the update even if the solve did not converge")
    e.add_argument("--curvature-rows", type=_number(int, 1), help="estimate the curvature on a sample of this many rows")


def _add_job_commands(sub) -> None:
    """Jobs, versions and receipts."""
    j = sub.add_parser("job", help="show one job")
    j.add_argument("id")

    w = sub.add_parser("watch", help="follow a job until it ends, one line per update")
    w.add_argument("id")
    w.add_argument("--bar", action="store_true", help="a progress bar on stderr instead of one line per update")

    js = sub.add_parser("jobs", help="list jobs, newest first")
    js.add_argument("--adapter")
    js.add_argument("--state", choices=JOB_STATES)
    js.add_argument("--limit", type=_number(int, 0), default=0, help="at most this many (0: the sidecar's default, 100)")

    c = sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("id")
    c.add_argument("--request-id", help="cancel only this request of a job that serves several (merged) requests")

    rb = sub.add_parser("rollback", help="publish a retained earlier version as the adapter's new current version")
    rb.add_argument("adapter")
    rb.add_argument("version", type=_version)

    pu = sub.add_parser("purge", help="delete an adapter's versions older than --before now (whatever keep_versions "
                                      "says), with their factor caches")
    pu.add_argument("adapter")
    pu.add_argument("--before", type=_version, required=True, metavar="N",
                    help="delete versions numbered below N (at most the current version)")

    rc = sub.add_parser("receipt", help="the signed erasure receipt of a succeeded job")
    rc.add_argument("id")
    rc.add_argument("--out", metavar="FILE", help="write the receipt file here (default: stdout)")

    rk = sub.add_parser("receipt-key", help="the sidecar's receipt signing key (public, PEM), to pin")
    rk.add_argument("--out", metavar="FILE", help="write the PEM here (default: stdout)")

    vr = sub.add_parser("verify-receipt", help="check a receipt file offline against a pinned public key "
                                               "(exit 0: valid, 1: it does not verify)")
    vr.add_argument("file")
    vr.add_argument("--public-key", required=True, metavar="FILE", help="the PEM from erasectl receipt-key")


# -- local input -----------------------------------------------------------------------


def load_request_file(path: str) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """The request JSON of ``eraser erase --request``; error messages never quote row text."""
    try:
        return read_request_file(path)
    except (DataError, InvalidRequestError) as e:
        raise LocalInputError(str(e)) from None


def build_request(args) -> dict[str, Any]:
    """Keyword arguments of ``EraserClient.erase`` from the flags and ``--request``."""
    remove = list(args.remove)
    modify = [tuple(p) for p in args.modify_query]
    correct = [tuple(p) for p in args.correct_response]
    if args.request:
        file_remove, file_modify, file_correct = load_request_file(args.request)
        remove += file_remove
        modify += file_modify
        correct += file_correct
    if not (remove or modify or correct):
        raise LocalInputError("empty request: give --remove, --modify-query, --correct-response or --request")
    options = {
        "solver": args.solver, "preset": args.preset, "curvature": args.curvature, "damping": args.damping,
        "objective": args.objective, "tolerance": args.tolerance, "max_iterations": args.max_iterations,
        "allow_unconverged": args.allow_unconverged or None, "curvature_rows": args.curvature_rows,
        "deadline_seconds": args.deadline, "verify": args.verify,
    }
    return {
        "remove_ids": remove, "modify_queries": modify, "correct_responses": correct,
        "request_id": args.request_id, "options": {k: v for k, v in options.items() if v is not None},
    }


def read_token(args) -> str | None:
    if args.token_file:
        p = Path(args.token_file)
        try:
            token = p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise LocalInputError(f"cannot read token file: {p}") from None
        if not token:
            raise LocalInputError(f"token file {p} is empty")
        return token
    token = os.environ.get("ERASER_TOKEN", "").strip()
    return token or None


def _local_path(text: str, only_if_path_like: bool = False) -> str:
    """An absolute path when ``text`` names something here (the sidecar has another cwd)."""
    if only_if_path_like and os.sep not in text and not text.startswith("."):
        return text
    p = Path(text).expanduser()
    return str(p.resolve()) if p.exists() else text


def make_client(args):
    from eraser.errors import EraserError

    from .client import EraserClient

    for flag in ("tls_ca", "tls_cert", "tls_key"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise LocalInputError(f"--{flag.replace('_', '-')}: no such file: {value}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise LocalInputError("--tls-cert and --tls-key go together")
    if not args.target.strip():
        raise LocalInputError("--target is empty")
    try:
        return EraserClient(args.target, token=read_token(args), tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                            tls_key=args.tls_key, timeout=args.timeout)
    except (ValueError, OSError, EraserError) as e:  # auth's ConfigError: unreadable credentials
        raise LocalInputError(" ".join(str(e).split())) from None


# -- output --------------------------------------------------------------------------------


def to_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def state_name(state: int) -> str:
    from eraser_proto.eraser.v1 import eraser_pb2 as pb

    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower() if state in pb.JobState.values() else str(state)


def _seconds(job, report: JobReport | None) -> float | None:
    if report is not None and "total" in report.seconds:
        return report.seconds["total"]
    if job.HasField("started_at") and job.HasField("finished_at"):
        return (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9
    return None


def format_job(job) -> str:
    """One line; a Job holds ids, counts and numbers only, never row text. Its report is read
    as the sidecar's typed report (``wire.report_of_message``)."""
    from .wire import report_of_message

    report = report_of_message(job.report) if job.HasField("report") else None
    state = state_name(job.state)
    parts = [f"job {job.id} {state}"]
    versions = f"v{job.from_version}" if job.from_version else ""
    if state == "succeeded" and job.to_version:
        versions += f" -> v{job.to_version}" + (" (unchanged)" if job.to_version == job.from_version else "")
    parts.append(f"adapter {job.adapter}" + (f" {versions}" if versions else ""))
    if job.request_ids:
        more = job.request_count - len(job.request_ids)  # Erase's reply names its own request alone
        parts.append("requests " + ",".join(job.request_ids) + (f" (+{more} merged)" if more > 0 else ""))
    if job.counts:
        parts.append(" ".join(f"{k} {v}" for k, v in sorted(job.counts.items()) if v) or "no rows")
    if state in ("queued", "running") and job.stage:
        parts.append(f"stage {job.stage} {job.fraction:.0%}")
    if job.already_erased_ids:
        parts.append("already erased " + ",".join(job.already_erased_ids))
    if report is not None:
        parts += _report_parts(report, succeeded=state == "succeeded")
    if job.HasField("error") and (job.error.code or job.error.message):
        parts.append(f"error {job.error.code or 'UNKNOWN'}: {job.error.message}")
    if job.attempts > 1:
        parts.append(f"attempts {job.attempts}")
    seconds = _seconds(job, report)
    if seconds is not None and state in ("succeeded", "failed", "cancelled"):
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def _report_parts(report: JobReport, succeeded: bool) -> list[str]:
    parts = []
    e = report.engine
    if e is not None and succeeded:
        if e.solver in ("ekfac", "kfac", "datainf") and not e.residual:
            parts.append("residual not measured (closed form)")
        else:
            parts.append(f"residual {e.residual or 0.0:.1e}" + ("" if e.converged else " (not converged)"))
        if report.solver_reason:  # which solver ran and why (a fallback, the factors it used)
            parts.append(f"solver {report.solver_reason}")
    if report.verification is not None:
        parts.append(format_verification(report.verification))
    u = report.utility
    if u is not None:
        parts.append(f"utility {'ok' if u.passed else 'FAILED'}: retained NLL {u.before:.2f} -> {u.after:.2f} "
                     f"({u.after - u.before:+.2f}, max +{u.max_rise:g}, {u.rows} rows)")
    if report.serving:
        parts.append(f"serving {report.serving}")
    return parts


def format_verification(v: Verification) -> str:
    """The policy, the verdict and the verification's line of numbers."""
    from eraser.reports import describe

    verdict = "passed" if v.passed else ("not passed" if v.policy == "report" else "FAILED")
    return f"verify {v.policy} {verdict}: {describe(v)}"


def format_receipt(receipt: dict) -> str:
    """One line: ids, versions, counts and times of a receipt (it holds no row text)."""
    holding = receipt["still_holding"]
    parts = [f"receipt of job {receipt['job_id']}", f"adapter {receipt['adapter']} v{receipt['from_version']} -> "
             f"v{receipt['to_version']}", "requests " + ",".join(receipt["request_ids"]),
             f"{len(receipt['edits'])} row(s) ({receipt['row_hash']['algorithm']} key {receipt['row_hash']['key_id']})",
             f"serving {receipt['serving']['status']}"]
    if holding["versions"] or holding["factor_caches"] or holding["payload_rows"]:
        parts.append("still held by " + ", ".join(
            [f"v{n}" for n in holding["versions"]] + [f"v{c['version']}/{c['method']} factors" for c in holding["factor_caches"]]
            + ([f"{holding['payload_rows']} payload row(s)"] if holding["payload_rows"] else [])))
    else:
        parts.append("no older copy retained")
    if receipt["purged_at"]:
        parts.append(f"history purged at {receipt['purged_at']}")
    parts.append(f"issued {receipt['issued_at']} (key {receipt['signing_key_id']})")
    return "  ".join(parts)


def format_purge(purge) -> str:
    caches = [f"v{c.version}/{c.method}" for c in purge.purged_factor_caches]
    return (f"purged {purge.adapter}: versions {','.join(f'v{n}' for n in purge.purged_versions) or 'none'}  factor caches "
            f"{','.join(caches) or 'none'}  payload rows {purge.purged_payloads}  retained "
            + ",".join(f"v{n}" for n in purge.retained_versions))


def format_adapter(adapter) -> str:
    line = f"adapter {adapter.name} v{adapter.version}  rows {adapter.rows}  base {adapter.base_model}  path {adapter.path}"
    if adapter.retained_versions:
        line += "  retained " + ",".join(f"v{v}" for v in adapter.retained_versions)
    if adapter.holdout_rows:
        line += f"  holdout {adapter.holdout_rows} rows  verify {adapter.verify}"
    return line


class JobBar:
    """A tqdm bar on stderr per stage of a job: the stage as description, the fraction done."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, job) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        stage = job.stage or state_name(job.state)
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=stage, file=sys.stderr, leave=False, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        self.bar.n = max(0, min(100, round(job.fraction * 100)))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None


def emit(args, message, human: str) -> None:
    print(json.dumps(to_dict(message)) if args.json else human, flush=True)


# -- commands ------------------------------------------------------------------------------


def follow(client, args, job_id: str, bar: JobBar | None) -> int:
    """Wait for the job (bar or one line per update); print it; 1 unless it succeeded."""
    from eraser_proto.eraser.v1 import eraser_pb2 as pb

    from .client import JobFailed

    last_line = [None]

    def on_update(job) -> None:
        if bar is not None:
            bar(job)
            return
        line = json.dumps(to_dict(job)) if args.json else format_job(job)
        if line != last_line[0]:
            last_line[0] = line
            print(line, flush=True)

    try:
        job = client.wait(job_id, on_update=on_update)
        failed = None
    except JobFailed as e:
        job, failed = e.job, e
    finally:
        if bar is not None:
            bar.close()
    if bar is not None or (json.dumps(to_dict(job)) if args.json else format_job(job)) != last_line[0]:
        emit(args, job, format_job(job))
    if failed is not None:
        cancelled = job.state == pb.JOB_STATE_CANCELLED
        what = "was cancelled" if cancelled else "failed"
        code = job.error.code or failed.code.name
        message = job.error.message or ("cancelled" if cancelled else "no message")
        print(f"{PROG}: error: job {job.id} {what}: {code}: {message}", file=sys.stderr)
        return 1
    return 0


def read_local(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise LocalInputError(f"cannot read {what} {path}: {e.strerror}") from None


def write_local(path: str, text: str, what: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise LocalInputError(f"cannot write {what} {path}: {e.strerror}") from None


def verify_receipt(args) -> int:
    """Offline: no sidecar is contacted. Exit 0 when the receipt verifies, 1 when it does not."""
    from .receipts import ReceiptInvalid, load_public_key, verify_file

    pem, text = read_local(args.public_key, "public key"), read_local(args.file, "receipt file")
    try:
        key = load_public_key(pem)
    except ReceiptInvalid as e:  # a bad flag, not a bad receipt: exit 2
        raise LocalInputError(f"--public-key {args.public_key}: {e}") from None
    try:
        receipt = verify_file(text, key)
    except ReceiptInvalid as e:
        print(f"{PROG}: error: receipt {args.file} does not verify: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"valid": True, "receipt": receipt}) if args.json else "valid: " + format_receipt(receipt), flush=True)
    return 0


def save_receipt(args, message) -> None:
    from .receipts import SignedReceipt

    signed = SignedReceipt(message.receipt, message.signature, message.key.public_key_pem, message.key.key_id)
    text = signed.to_file()
    if args.out:
        write_local(args.out, text, "receipt file")
        line = f"{format_receipt(json.loads(signed.body))}  written to {args.out}"
        print(json.dumps({"file": args.out, "receipt": json.loads(signed.body)}) if args.json else line, flush=True)
    elif args.json:
        print(json.dumps(json.loads(text)), flush=True)
    else:
        print(text, end="", flush=True)


def run_command(args, state: dict) -> int:
    if args.command == "verify-receipt":
        return verify_receipt(args)
    request = build_request(args) if args.command == "erase" else None  # local input first
    client = make_client(args)
    with client:
        cmd = args.command
        if cmd == "register":
            adapter = client.register_adapter(args.name, _local_path(args.base, only_if_path_like=True),
                                              _local_path(args.adapter), _local_path(args.data),
                                              _local_path(args.holdout) if args.holdout else None, args.verify)
            emit(args, adapter, format_adapter(adapter))
        elif cmd == "adapters":
            if args.name:
                adapter = client.get_adapter(args.name)
                emit(args, adapter, format_adapter(adapter))
            else:
                from eraser_proto.eraser.v1 import eraser_pb2 as pb

                adapters = client.list_adapters()
                emit(args, pb.ListAdaptersResponse(adapters=adapters),
                     "\n".join(map(format_adapter, adapters)) or "no adapters")
        elif cmd == "erase":
            job = client.erase(args.adapter, **request)
            if not args.wait:
                emit(args, job, format_job(job))
                return 0
            state["job"] = job.id
            if not args.quiet and not args.json:
                print(format_job(job), file=sys.stderr, flush=True)
            return follow(client, args, job.id, JobBar(enabled=not args.quiet))
        elif cmd == "job":
            job = client.get_job(args.id)
            emit(args, job, format_job(job))
        elif cmd == "watch":
            state["job"] = args.id
            return follow(client, args, args.id, JobBar(enabled=not args.quiet) if args.bar else None)
        elif cmd == "jobs":
            from eraser_proto.eraser.v1 import eraser_pb2 as pb

            jobs = client.list_jobs(adapter=args.adapter, state=args.state, limit=args.limit)
            emit(args, pb.ListJobsResponse(jobs=jobs), "\n".join(map(format_job, jobs)) or "no jobs")
        elif cmd == "cancel":
            job = client.cancel_job(args.id, args.request_id)
            emit(args, job, format_job(job))
        elif cmd == "rollback":
            adapter = client.rollback(args.adapter, args.version)
            emit(args, adapter, format_adapter(adapter))
        elif cmd == "purge":
            purge = client.purge_history(args.adapter, args.before)
            emit(args, purge, format_purge(purge))
        elif cmd == "receipt":
            save_receipt(args, client.erasure_receipt(args.id))
        elif cmd == "receipt-key":
            key = client.receipt_key()
            if args.out:
                write_local(args.out, key.public_key_pem, "public key")
            emit(args, key, f"receipt key {key.key_id} ({key.algorithm}) written to {args.out}" if args.out
                 else key.public_key_pem.rstrip("\n"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .client import SidecarError

    state: dict[str, str] = {}
    try:
        return run_command(args, state)
    except LocalInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SidecarError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if e.code in USAGE_CODES else 1
    except KeyboardInterrupt:
        job = state.get("job")
        tail = f"; job {job} goes on (erasectl cancel {job} stops it)" if job else ""
        print(f"{PROG}: interrupted{tail}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug here, not a bad input: keep it to one line unless asked
        if os.environ.get("ERASER_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {' '.join(str(e).split())} (set ERASER_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

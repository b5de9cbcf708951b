"""Everything between the wire and the domain: protobuf messages from the service's values
(adapters, jobs and their reports, receipts, purges), a request's options from its message,
and the one table from a domain error to the gRPC status a client sees (``status_of``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from eraser.options import REQUEST_OPTIONS
from eraser_proto.eraser.v1 import eraser_pb2 as pb

from .errors import failure_of
from .receipts import ALGORITHM as RECEIPT_ALGORITHM

if TYPE_CHECKING:  # no torch at import time: the auth and stream interceptors import this module
    from .jobs import Job
    from .receipts import SignedReceipt
    from .service import AdapterView, Purge


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and one-line detail for any exception a handler or job raised
    (``errors.failure_of`` names it)."""
    name, message = failure_of(error)
    return grpc.StatusCode[name], message


async def abort(context, error: BaseException) -> None:
    """End an asyncio call with ``error``'s status (raises, as ``context.abort`` does)."""
    await context.abort(*status_of(error))


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def adapter_message(view: AdapterView) -> pb.Adapter:
    version, record = view.version, view.record
    return pb.Adapter(
        name=version.adapter, version=version.number, base_model=record.base_model, path=str(version.adapter_path),
        rows=version.rows, dataset_path=str(version.dataset_path), retained_versions=view.retained_versions,
        adapter_sha256=version.manifest.get("adapter_sha256", ""), base_model_fingerprint=record.base_model_fingerprint,
        updated_at=_timestamp(version.manifest.get("created_at")),
        replicas=[pb.ReplicaStatus(replica=r.replica, served_path=r.served_path, served_version=r.served_version,
                                   current=r.current and r.served_version == version.number, error=r.error)
                  for r in view.replicas],
        holdout_rows=record.holdout_rows, holdout_sha256=record.holdout_sha256 or "", verify=view.verify,
    )


def verification_message(v: dict | None) -> pb.Verification | None:
    """A ``VerificationReport.to_json()`` (eraser/verify.py) as the proto's numbers."""
    if not v:
        return None
    before, after, refinement = v.get("before"), v.get("after"), v.get("refinement")
    final = after or before
    msg = pb.Verification(policy=v["policy"], passed=bool(v["passed"]), reason=v.get("reason", ""),
                          max_auc=v["bounds"]["max_auc"], min_auc=v["bounds"]["min_auc"],
                          seconds=float(v.get("seconds") or 0.0))
    if before:
        msg.auc_before, msg.erased_nll_before = before["auc"], before["erased_mean_nll"]
        msg.erased_rows, msg.holdout_rows = before["erased_rows"], before["holdout_rows"]
    if final:
        msg.auc_after, msg.erased_nll_after, msg.holdout_nll = final["auc"], final["erased_mean_nll"], final["holdout_mean_nll"]
        if final.get("retain_mean_nll") is not None:
            msg.retain_nll_after = final["retain_mean_nll"]
    if v.get("retain_reference") is not None:
        msg.retain_nll_parent = v["retain_reference"]
    if refinement:
        msg.refine_method, msg.refine_steps = refinement["method"], int(refinement["steps"])
        msg.refine_seconds, msg.refine_stopped = float(refinement["seconds"]), refinement.get("stopped", "")
    membership = v.get("membership") or {}
    verdict = membership.get("after") or membership.get("before")
    if verdict:
        msg.basis = verdict["basis"]
        msg.attacks.extend(pb.AttackScore(name=a["name"], auc=a["auc"], auc_low=a["interval"][0], auc_high=a["interval"][1],
                                          max_auc=a["high"], min_auc=a["low"], rows_flagged=a["rows_flagged"],
                                          passed=a["passed"]) for a in verdict.get("attacks", ()))
        msg.rows_ahead_of_base = verdict.get("ahead", 0)
        msg.rows_recalled = verdict.get("recalled", 0)
    elif before:
        msg.basis = "held-out"
    if v.get("learned"):
        msg.new_rows.CopyFrom(pb.NewRows(**v["learned"]))
    return msg


def utility_message(u: dict | None) -> pb.UtilityCheck | None:
    """A ``UtilityCheck.to_json()`` (eraser/unlearn.py) as the proto's numbers."""
    if not u:
        return None
    return pb.UtilityCheck(rows=u["rows"], retain_nll_parent=u["before"], retain_nll_after=u["after"],
                           max_rise=u["max_rise"], passed=bool(u["passed"]))


def report_message(report: dict | None) -> pb.EraseReport | None:
    if not report:
        return None
    if "solver" not in report:  # a job refused by verification or the utility check: only its numbers
        return pb.EraseReport(verification=verification_message(report.get("verification")),
                              utility=utility_message(report.get("utility")))
    msg = pb.EraseReport(
        solver=report["solver"], preset=report.get("preset") or "", curvature=report["curvature"],
        damping=report["damping"], objective=report["objective"], iterations=report["iterations"],
        residual=report["residual"], converged=report["converged"], tolerance=report["tolerance"],
        seconds=report["seconds"], affected_loss_before=report["affected_loss_before"] or 0.0,
        affected_loss_after=report["affected_loss_after"] or 0.0, rows_before=report["rows"],
        rows_after=report["rows_after"], counts=report["counts"], update_norm=report["update_norm"],
        adapter_sha256=report["adapter_sha256"], note=report.get("note", ""),
        curvature_rows=report.get("curvature_rows", 0), curvature_products=report.get("curvature_products", 0),
        parameters=report.get("parameters", 0), solver_reason=report.get("solver_reason", ""),
        requested_solver=report.get("requested_solver", ""),
        verification=verification_message(report.get("verification")),
        utility=utility_message(report.get("utility")),
        serving=report.get("serving", ""),
    )
    factors = report.get("factors") or {}
    if factors:
        msg.factor_source = factors.get("source", "")
        msg.factor_out_action = factors.get("out_action", "")
        msg.factor_version = int(factors.get("version", 0))
        if factors.get("age_seconds") is not None:
            msg.factor_age_seconds = float(factors["age_seconds"])
        if factors.get("changed_fraction") is not None:
            msg.factor_changed_fraction = float(factors["changed_fraction"])
    if report.get("edited_loss_before") is not None:
        msg.edited_loss_before = report["edited_loss_before"]
        msg.edited_loss_after = report["edited_loss_after"]
    return msg


def job_message(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id, adapter=job.adapter, state=int(job.state), from_version=job.from_version, to_version=job.to_version,
        stage=job.stage, fraction=job.fraction, request_ids=job.request_ids, report=report_message(job.report),
        error=pb.JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
        created_at=_timestamp(job.created_at), started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at), counts=job.counts, attempts=job.attempts,
        already_erased_ids=job.already_erased, replicas_behind=job.replicas_behind,
        swap_checks=[swap_check_message(c) for c in job.swap_checks],
    )


def swap_check_message(check: dict) -> pb.SwapCheck:
    """A recorded ``SwapCheck`` (checks recorded before served_at existed have none)."""
    return pb.SwapCheck(**{**check, "served_at": _timestamp(check.get("served_at"))})


def receipt_key_message(public_key_pem: str, key_id: str) -> pb.ReceiptKey:
    return pb.ReceiptKey(algorithm=RECEIPT_ALGORITHM, public_key_pem=public_key_pem, key_id=key_id)


def receipt_message(receipt: SignedReceipt) -> pb.ErasureReceipt:
    return pb.ErasureReceipt(receipt=receipt.body, signature=receipt.signature,
                             key=receipt_key_message(receipt.public_key_pem, receipt.key_id))


def purge_message(purge: Purge) -> pb.PurgeHistoryResponse:
    return pb.PurgeHistoryResponse(
        adapter=purge.adapter, purged_versions=purge.deleted.versions,
        purged_factor_caches=[pb.FactorCache(version=n, method=m) for n, m in purge.deleted.factor_caches],
        purged_payloads=purge.payload_rows, purged_at=_timestamp(purge.purged_at),
        retained_versions=purge.retained_versions)


def options_dict(options: pb.EraseOptions) -> dict:
    """The options a client set (proto3 optional fields: only those present)."""
    out = {}
    for name in REQUEST_OPTIONS:
        if options.HasField(name) if name in ("damping", "tolerance", "max_iterations", "curvature_rows") else getattr(options, name):
            out[name] = getattr(options, name)
    return out

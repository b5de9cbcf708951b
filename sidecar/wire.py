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
    from .job_model import Job
    from .report import JobReport, Utility, Verification
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


def verification_message(v: Verification | None) -> pb.Verification | None:
    """A job's verification as the proto's numbers."""
    if v is None:
        return None
    msg = pb.Verification(policy=v.policy, passed=v.passed, reason=v.reason, max_auc=v.bounds.max_auc,
                          min_auc=v.bounds.min_auc, seconds=v.seconds)
    if v.before is not None:
        msg.auc_before, msg.erased_nll_before = v.before.auc, v.before.erased_mean_nll
        msg.erased_rows, msg.holdout_rows = v.before.erased_rows, v.before.holdout_rows
    final = v.final
    if final is not None:
        msg.auc_after, msg.erased_nll_after, msg.holdout_nll = final.auc, final.erased_mean_nll, final.holdout_mean_nll
        if final.retain_mean_nll is not None:
            msg.retain_nll_after = final.retain_mean_nll
    if v.retain_reference is not None:
        msg.retain_nll_parent = v.retain_reference
    if v.refinement is not None:
        r = v.refinement
        msg.refine_method, msg.refine_steps, msg.refine_seconds, msg.refine_stopped = r.method, r.steps, r.seconds, r.stopped
    verdict = v.verdict
    if verdict is not None:
        msg.basis = verdict.basis
        msg.attacks.extend(pb.AttackScore(name=a.name, auc=a.auc, auc_low=a.interval[0], auc_high=a.interval[1],
                                          max_auc=a.high, min_auc=a.low, rows_flagged=a.rows_flagged, passed=a.passed)
                           for a in verdict.attacks)
        msg.rows_ahead_of_base, msg.rows_recalled = verdict.ahead, verdict.recalled
    elif v.before is not None:
        msg.basis = "held-out"
    if v.learned is not None:
        n = v.learned
        msg.new_rows.CopyFrom(pb.NewRows(rows=n.rows, mean_nll=n.mean_nll, target_nll=n.target_nll, margin=n.margin,
                                         reproduced=n.reproduced, required=n.required,
                                         retain_reproduced_share=n.retain_reproduced_share, passed=n.passed))
    return msg


def utility_message(u: Utility | None) -> pb.UtilityCheck | None:
    if u is None:
        return None
    return pb.UtilityCheck(rows=u.rows, retain_nll_parent=u.before, retain_nll_after=u.after, max_rise=u.max_rise,
                           passed=u.passed)


def report_message(report: JobReport | None) -> pb.EraseReport | None:
    if report is None:
        return None
    msg = pb.EraseReport(verification=verification_message(report.verification),
                         utility=utility_message(report.utility))
    e = report.engine
    if e is None:  # a job refused by verification or the utility check: only its numbers
        return msg
    msg.MergeFrom(pb.EraseReport(
        solver=e.solver, preset=e.preset or "", curvature=e.curvature, damping=e.damping, objective=e.objective,
        iterations=e.iterations, residual=e.residual, converged=e.converged, tolerance=e.tolerance,
        seconds=report.seconds, affected_loss_before=e.affected_loss_before or 0.0,
        affected_loss_after=e.affected_loss_after or 0.0, rows_before=e.rows, rows_after=e.rows_after,
        counts=e.counts, update_norm=e.update_norm, adapter_sha256=e.adapter_sha256, note=e.note,
        curvature_rows=e.curvature_rows, curvature_products=e.curvature_products, parameters=e.parameters,
        solver_reason=report.solver_reason, requested_solver=report.requested_solver, serving=report.serving,
    ))
    f = report.factors
    if f is not None:
        msg.factor_source, msg.factor_out_action, msg.factor_version = f.source, f.out_action, f.version
        if f.age_seconds is not None:
            msg.factor_age_seconds = f.age_seconds
        if f.changed_fraction is not None:
            msg.factor_changed_fraction = f.changed_fraction
    if e.edited_loss_before is not None:
        msg.edited_loss_before, msg.edited_loss_after = e.edited_loss_before, e.edited_loss_after
    return msg


def report_of_message(msg: pb.EraseReport) -> JobReport:
    """A report as a client reads it back (``erasectl``): the typed report with what the proto
    carries; the parts it leaves out (per-row scores, the refinement's trace) stay empty."""
    from .report import EngineReport, Factors, JobReport, Utility

    engine = None
    if msg.solver or msg.residual or msg.iterations or msg.converged or msg.rows_after:
        engine = EngineReport(
            solver=msg.solver, curvature=msg.curvature, damping=msg.damping, objective=msg.objective,
            iterations=msg.iterations, converged=msg.converged, rows=msg.rows_before, rows_after=msg.rows_after,
            counts=dict(msg.counts), update_norm=msg.update_norm, adapter_sha256=msg.adapter_sha256,
            preset=msg.preset or None, residual=msg.residual, tolerance=msg.tolerance,
            affected_loss_before=msg.affected_loss_before, affected_loss_after=msg.affected_loss_after,
            edited_loss_before=msg.edited_loss_before if msg.HasField("edited_loss_before") else None,
            edited_loss_after=msg.edited_loss_after if msg.HasField("edited_loss_after") else None,
            curvature_rows=msg.curvature_rows, curvature_products=msg.curvature_products, parameters=msg.parameters,
            note=msg.note)
    utility = None
    if msg.HasField("utility"):
        u = msg.utility
        utility = Utility(rows=u.rows, before=u.retain_nll_parent, after=u.retain_nll_after,
                          rise=u.retain_nll_after - u.retain_nll_parent, max_rise=u.max_rise, passed=u.passed)
    factors = None
    if msg.factor_source or msg.factor_out_action:
        factors = Factors(source=msg.factor_source, out_action=msg.factor_out_action, version=msg.factor_version,
                          age_seconds=msg.factor_age_seconds if msg.HasField("factor_age_seconds") else None,
                          changed_fraction=(msg.factor_changed_fraction if msg.HasField("factor_changed_fraction")
                                            else None))
    verification = (_verification_of_message(msg.verification, utility.max_rise if utility else 0.0)
                    if msg.HasField("verification") else None)
    return JobReport(engine=engine, seconds=dict(msg.seconds), verification=verification, utility=utility,
                     factors=factors, requested_solver=msg.requested_solver, solver_reason=msg.solver_reason,
                     serving=msg.serving)


def _verification_of_message(v: pb.Verification, max_rise: float) -> Verification:
    from .report import Attack, Bounds, LossScores, Membership, NewRows, Refinement, Verdict, Verification

    def scores(auc: str, nll: str) -> LossScores | None:
        if not v.HasField(auc):
            return None
        return LossScores(auc=getattr(v, auc), erased_mean_nll=getattr(v, nll) if v.HasField(nll) else 0.0,
                          holdout_mean_nll=v.holdout_nll, erased_rows=v.erased_rows, holdout_rows=v.holdout_rows,
                          retain_mean_nll=v.retain_nll_after if v.HasField("retain_nll_after") else None)

    refinement = (Refinement(method=v.refine_method, steps=v.refine_steps, seconds=v.refine_seconds,
                             stopped=v.refine_stopped) if v.refine_method else None)
    final = scores("auc_after", "erased_nll_after")  # after refinement, else the only score there is
    before = scores("auc_before", "erased_nll_before") if refinement is not None else final
    membership = None
    if v.basis:
        attacks = tuple(Attack(name=a.name, auc=a.auc, interval=(a.auc_low, a.auc_high), high=a.max_auc, low=a.min_auc,
                               rows_flagged=a.rows_flagged, passed=a.passed) for a in v.attacks)
        membership = Membership(after=Verdict(basis=v.basis, passed=v.passed, erased_rows=v.erased_rows,
                                              recalled=v.rows_recalled, holdout_rows=v.holdout_rows, attacks=attacks,
                                              ahead=v.rows_ahead_of_base))
    learned = None
    if v.HasField("new_rows"):
        n = v.new_rows
        learned = NewRows(rows=n.rows, mean_nll=n.mean_nll, target_nll=n.target_nll, margin=n.margin,
                          reproduced=n.reproduced, required=n.required,
                          retain_reproduced_share=n.retain_reproduced_share, passed=n.passed)
    return Verification(policy=v.policy, passed=v.passed, reason=v.reason,
                        bounds=Bounds(max_auc=v.max_auc, min_auc=v.min_auc, max_retain_rise=max_rise),
                        retain_reference=v.retain_nll_parent if v.HasField("retain_nll_parent") else None,
                        before=before, after=final if refinement is not None else None, refinement=refinement,
                        seconds=v.seconds, membership=membership, learned=learned)


def job_message(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id, adapter=job.adapter, state=int(job.state), from_version=job.from_version, to_version=job.to_version,
        stage=job.stage, fraction=job.fraction, request_ids=job.request_ids, report=report_message(job.report),
        error=pb.JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
        created_at=_timestamp(job.created_at), started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at), counts=job.counts, attempts=job.attempts,
        already_erased_ids=job.already_erased, replicas_behind=job.replicas_behind,
        swap_checks=[swap_check_message(c) for c in job.swap_checks],
        request_count=job.request_count or len(job.request_ids),
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

"""The methods compared, as a registry: each is a small function ``(ctx) -> Outcome``.

A method starts from the task's original adapter (the runner loads it into the model
before every call) and returns the adapter parameters it ends with. Methods run in
registry order on each task, so a method may build on an earlier one's result
(``ctx.outcomes``): the ``+refine`` variants do. A method marked ``optional`` depends on
code that may not exist yet (a solver name ``SolverConfig`` rejects, a missing module):
it raises ``Unavailable`` and is recorded as unavailable instead of failing the run.

Adding a method is a decorated function::

    @method("my-method", "what it does, with its settings")
    def _(ctx):
        ...  # change ctx.model's adapter parameters, or compute a delta
        return ctx.outcome(info={...})
"""

from __future__ import annotations

import inspect
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils import parameters_to_vector

from eraser.curvature import CurvatureConfig
from eraser.data import EncodedRows, write_rows
from eraser.errors import InvalidRequestError, VerificationFailedError
from eraser.losses import per_row_nll
from eraser.model import trainable_parameters
from eraser.solvers import SolverConfig
from eraser.train import fit
from eraser.losses import row_losses
from eraser.unlearn import EraseConfig, UtilityCheck, apply_delta, compute_update
from eraser.verify import VerifyConfig, VerifyRows, retained_sample, verify_and_refine


class Unavailable(Exception):
    """The method's dependency is missing or rejected (recorded, not raised)."""


@dataclass
class Outcome:
    theta: torch.Tensor  # the adapter's trainable parameters after the method, flat
    info: dict = field(default_factory=dict)
    # Seconds spent before this method's own call in results it builds on (refine: the
    # influence step's time), added to its reported time.
    carried_seconds: float = 0.0
    seconds: float | None = None  # this method's own wall time, filled in by the runner

    @property
    def total_seconds(self) -> float | None:
        return None if self.seconds is None else self.seconds + self.carried_seconds


@dataclass
class Context:
    model: object
    tokenizer: object
    device: object
    settings: object
    task: object
    train_config: object  # eraser.train.TrainConfig of the original training
    theta_init: torch.Tensor  # the adapter's initialisation (same seed as every training)
    theta_original: torch.Tensor
    outcomes: dict[str, Outcome]  # earlier methods on this task
    shared: dict  # caches shared by the tasks of one original adapter (e.g. EK-FAC factors)
    base_dir: object = None  # the base model's directory (what the product loads)
    workdir: object = None  # a scratch directory for the product's files (adapters, data, factor caches)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in trainable_parameters(self.model)]

    def theta(self) -> torch.Tensor:
        return parameters_to_vector(self.params).detach().clone()

    def set_theta(self, theta: torch.Tensor) -> None:
        # Copied in, never aliased: torch's vector_to_parameters makes the parameters views
        # of the vector, and the next training step would then overwrite the saved adapter.
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(theta[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if offset != theta.numel():
            raise ValueError(f"adapter vector has {theta.numel()} values, the model {offset}")

    def outcome(self, info: dict | None = None, carried_seconds: float = 0.0) -> Outcome:
        return Outcome(self.theta(), info or {}, carried_seconds)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    fn: Callable[[Context], Outcome]
    optional: bool = False
    family: str = ""  # "reference", "retrain", "baseline", "influence", "refined"


METHODS: list[Method] = []


def method(name: str, description: str, optional: bool = False, family: str = ""):
    def register(fn: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        if any(m.name == name for m in METHODS):
            raise ValueError(f"method {name!r} registered twice")
        METHODS.append(Method(name, description, fn, optional, family))
        return fn

    return register


def method_names() -> list[str]:
    return [m.name for m in METHODS]


# --------------------------------------------------------------------------- reference and retraining


@method("original", "the adapter before any erasure (the starting point)", family="reference")
def _original(ctx: Context) -> Outcome:
    return ctx.outcome()


@method("retrain-scratch", "gold standard: train again from the same initialisation without the rows "
        "(same seed, hyper-parameters and epochs as the original)", family="retrain")
def _retrain_scratch(ctx: Context) -> Outcome:
    ctx.set_theta(ctx.theta_init)
    history = fit(ctx.model, ctx.tokenizer, list(ctx.task.kept), ctx.train_config, ctx.device)
    return ctx.outcome({"epochs": ctx.train_config.epochs, "rows": len(ctx.task.kept), "final_loss": history[-1]})


@method("retrain-warm", "continue training the original adapter on the edited set (fewer epochs, see settings)",
        family="retrain")
def _retrain_warm(ctx: Context) -> Outcome:
    cfg = replace(ctx.train_config, epochs=ctx.settings.warm_epochs)
    history = fit(ctx.model, ctx.tokenizer, list(ctx.task.kept), cfg, ctx.device)
    return ctx.outcome({"epochs": cfg.epochs, "rows": len(ctx.task.kept), "final_loss": history[-1]})


# --------------------------------------------------------------------------- the product's default path


def product_config(settings):
    """``eraser.configure.product_erase_config(has_holdout=True)``: the product's own defaults
    (EK-FAC factors, relative damping 0.1, step control, verification under enforce with the
    product's own budget); ``settings.product_verify_max_steps``/``_max_seconds`` reduce the
    refinement budget (the quick size only, and labelled so in the report)."""
    from eraser.configure import product_erase_config

    config = product_erase_config(has_holdout=True)
    reduced = {k: v for k, v in (("max_steps", settings.product_verify_max_steps),
                                 ("max_seconds", settings.product_verify_max_seconds)) if v is not None}
    if reduced:
        config = replace(config, verify=replace(config.verify, **reduced))
    return config, bool(reduced)


def _product_adapter_dir(ctx: Context) -> Path:
    """The task's original adapter as files, once per original (its factor cache is keyed by them)."""
    from eraser.model import base_fingerprint, save_adapter_atomically

    key = "product_adapter_dir"
    if key not in ctx.shared:
        root = Path(ctx.workdir) / f"original-{ctx.task.original}"
        root.mkdir(parents=True, exist_ok=False)
        ctx.set_theta(ctx.theta_original)
        adapter = save_adapter_atomically(ctx.model, root / "adapter", {
            "base_model_fingerprint": base_fingerprint(ctx.base_dir), "produced_by": "bench.unlearning"})
        write_rows(root / "data.jsonl", list(ctx.task.train))
        ctx.shared[key] = adapter
        ctx.shared["product_data"] = root / "data.jsonl"
        ctx.shared["product_factors"] = root / "factors"  # fitted by the first erase, then read from disk
    return ctx.shared[key]


def _load_adapter_params(ctx: Context, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(ctx.model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"the product's adapter has tensors the model lacks: {unexpected[:3]}")


def _verdict_json(verification: dict | None) -> dict | None:
    """The product's membership verdict in short: per attack AUC and bounds, after refinement
    when it ran (else before), on the product's held-out (calibration) people."""
    if not verification:
        return None
    membership = verification.get("membership") or {}
    which = "after" if membership.get("after") else "before"
    v = membership.get(which)
    refinement = verification.get("refinement") or {}
    return {
        "passed": verification.get("passed"), "reason": verification.get("reason"),
        "judged": which if v else None,
        "attacks": {a["name"]: {"auc": a["auc"], "high": a["high"], "low": a["low"], "passed": a["passed"],
                                "rows_flagged": a["rows_flagged"]} for a in (v or {}).get("attacks", [])},
        "recalled": (v or {}).get("recalled"), "holdout_rows": (v or {}).get("holdout_rows"),
        "erased_rows": (v or {}).get("erased_rows"),
        "steps": refinement.get("steps", 0), "stopped": refinement.get("stopped"),
        "trials": sum(int(t.get("trials") or 0) for t in refinement.get("trace") or []),
        "seconds": verification.get("seconds"),
    }


@method("product", "the product's default erase, as the sidecar runs it: eraser.unlearn.erase on files "
        "(base model, the original adapter, the training JSONL, the request, the calibration people as "
        "holdout, a factor cache per original adapter) with eraser.configure.product_erase_config"
        "(has_holdout=True): EK-FAC, relative damping 0.1, step control, verification under enforce with the "
        "product's own budget; a refused erase publishes nothing, so the row then scores the original adapter "
        "(what stays served)", family="product")
def _product(ctx: Context) -> Outcome:
    from eraser.errors import UtilityCheckFailedError
    from eraser.factors import is_cache, read_manifest
    from eraser.reports import as_json
    from eraser.unlearn import erase

    task = ctx.task
    config, reduced = product_config(ctx.settings)
    adapter = _product_adapter_dir(ctx)
    factors_dir = ctx.shared["product_factors"]
    had_factors = is_cache(factors_dir)
    job = Path(ctx.workdir) / f"job-{task.name}"
    job.mkdir(parents=True, exist_ok=False)
    holdout = job / "holdout.jsonl"
    write_rows(holdout, list(task.calibration))
    started = time.perf_counter()
    report, refused, verification, utility = None, None, None, None
    try:
        # factors_out is left out: it only prepares the next version's cache (a downdate or a
        # refit written after the adapter); the adapter written is the same either way.
        report = erase(ctx.base_dir, adapter, ctx.shared["product_data"], task.request, job / "adapter",
                       job / "data.jsonl", config, str(ctx.device), factors_dir=factors_dir, holdout_path=holdout)
    except VerificationFailedError as e:
        refused = f"refused: {str(e).splitlines()[0]}"
        verification = e.report.to_json() if e.report is not None else None
    except UtilityCheckFailedError as e:
        refused = f"refused: {str(e).splitlines()[0]}"
        check = getattr(e, "check", None)
        utility = check.to_json() if check is not None else None
    wall = time.perf_counter() - started
    fit_seconds = None
    if not had_factors and is_cache(factors_dir):
        fit_seconds = read_manifest(factors_dir).get("history", {}).get("fit_seconds")
    if report is not None:
        r = report.to_json()
        verification, utility = r["verification"], r["utility"]
        _load_adapter_params(ctx, job / "adapter")
    else:
        ctx.set_theta(ctx.theta_original)  # nothing published: the original stays served
    return ctx.outcome({
        "published": report is not None,
        "product_verdict": "published" if report is not None else refused,
        "verify_budget": {"max_steps": config.verify.max_steps, "max_seconds": config.verify.max_seconds,
                          "reduced": reduced},
        "config": {"solver": config.solver.name, "damping": config.curvature.damping,
                   "relative": config.curvature.relative, "policy": config.verify.policy,
                   "max_retain_rise": config.max_retain_rise, "step_control": config.step.enabled,
                   "max_auc": config.verify.max_auc, "min_auc": config.verify.min_auc},
        "verdict": _verdict_json(verification),
        "verification": verification,
        "utility_check": utility,
        "engine_seconds": report.seconds if report is not None else None,
        "erase_wall_seconds": round(wall, 3),
        "factor_fit_seconds": fit_seconds,
        "factor_source": "fitted" if fit_seconds is not None else ("cache" if had_factors else None),
        "damping_used": report.damping if report is not None else None,
        "steps": as_json(report.steps) if report is not None else None,
        "update_norm_engine": report.update_norm if report is not None else None,
        "holdout_rows": len(task.calibration),
    })


@method("gradient-ascent", "AdamW steps on the affected rows: ascent on the old rows (and descent on the "
        "edited rows for RC/QM), full batch, fixed step count and lr (see settings)", family="baseline")
def _gradient_ascent(ctx: Context) -> Outcome:
    s = ctx.settings
    pairs = [(e.old.prompt, e.old.response) for e in ctx.task.edits]
    signs = [-1.0] * len(pairs)
    new = [(e.new.prompt, e.new.response) for e in ctx.task.edits if e.new is not None]
    pairs += new
    signs += [1.0] * len(new)
    data = EncodedRows(ctx.tokenizer, pairs, s.max_length)
    params = ctx.params
    opt = torch.optim.AdamW(params, lr=s.ga_lr, weight_decay=0.0)
    losses = []
    for _ in range(s.ga_steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for chunk, batch in data.batches(s.batch_size, device=ctx.device):
            sign = torch.tensor([signs[i] for i in chunk], device=ctx.device)
            # The mean over old rows, ascended, plus the mean over new rows, descended.
            loss = (per_row_nll(ctx.model, batch) * sign).sum() / len(ctx.task.edits)
            loss.backward()
            total += float(loss)
        opt.step()
        losses.append(total)
    return ctx.outcome({"steps": s.ga_steps, "lr": s.ga_lr, "objective_per_step": losses})


# --------------------------------------------------------------------------- LLMEraser (influence)


def _solver(name: str, preset: str | None = None, options: dict | None = None) -> SolverConfig:
    try:
        return SolverConfig(name, preset, options or {})
    except InvalidRequestError as e:
        raise Unavailable(f"SolverConfig rejects {name!r}: {e}") from None


def _influence(ctx: Context, solver: SolverConfig, curvature: CurvatureConfig, factors_key: str | None = None) -> Outcome:
    config = EraseConfig(solver=solver, curvature=curvature, allow_unconverged=True,
                         max_length=ctx.settings.max_length, gradient_batch_size=ctx.settings.batch_size)
    kwargs = {}
    accepts_factors = "factors" in inspect.signature(compute_update).parameters
    if factors_key and accepts_factors and factors_key in ctx.shared:
        kwargs["factors"] = ctx.shared[factors_key]
    update = compute_update(ctx.model, ctx.tokenizer, list(ctx.task.train), list(ctx.task.edits), config,
                            ctx.device, **kwargs)
    factors = getattr(update, "factors", None)
    if factors_key and factors is not None:
        ctx.shared[factors_key] = factors  # the next task on this adapter uses the cached factors
    # The product's utility check (eraser.unlearn.erase): the same seeded sample of retained
    # training rows and the same bound, so the table says whether the sidecar would publish.
    checked = [(r.prompt, r.response) for r in retained_sample(
        list(ctx.task.train), list(ctx.task.edits), VerifyConfig(retain_sample=config.utility_rows))]
    before = row_losses(ctx.model, ctx.tokenizer, checked, ctx.device, ctx.settings.batch_size, ctx.settings.max_length)
    apply_delta(ctx.model, update.delta)
    after = row_losses(ctx.model, ctx.tokenizer, checked, ctx.device, ctx.settings.batch_size, ctx.settings.max_length)
    utility = UtilityCheck(len(checked), sum(before) / len(before), sum(after) / len(after), config.max_retain_rise)
    res = update.solve
    return ctx.outcome({
        "utility_check": utility.to_json(),
        "solver": solver.name, "preset": solver.preset, "options": solver.options,
        "curvature": curvature.kind, "curvature_rows": update.curvature_rows, "damping": config.damping,
        "iterations": res.iterations, "residual": res.residual, "converged": res.converged,
        "tolerance": res.tolerance, "note": res.note, "curvature_products": update.curvature_products,
        "gradient_norm": update.gradient_norm, "update_norm": float(torch.linalg.vector_norm(update.delta)),
        "stage_seconds": {k: round(v, 3) for k, v in update.seconds.items()},
        "factor_source": getattr(update, "factor_source", None),
    })


@method("llmeraser-paper", "LLMEraser with the paper's solver settings (sqm preset 'paper': Adam lr 1e-5, "
        "20 steps of batch 1, damping = Adam's weight decay 1e-5) on the GGN", family="influence")
def _llmeraser_paper(ctx: Context) -> Outcome:
    s = ctx.settings
    _full_size_only(s.exact_influence)
    return _influence(ctx, _solver("sqm", "paper"),
                      CurvatureConfig("ggn", s.damping, s.curvature_rows, s.batch_size, s.seed))


@method("llmeraser-cg", "LLMEraser solved to convergence: conjugate gradient on the GGN + 0.1·I "
        "(tolerance and iteration cap in settings; the residual is reported)", family="influence")
def _llmeraser_cg(ctx: Context) -> Outcome:
    s = ctx.settings
    _full_size_only(s.exact_influence)
    solver = _solver("cg", None, {"tolerance": s.cg_tolerance, "max_iterations": s.cg_max_iterations})
    return _influence(ctx, solver, CurvatureConfig("ggn", s.damping, s.curvature_rows, s.batch_size, s.seed))


@method("llmeraser-ekfac", "the fast path: EK-FAC factors over LoRA's linear maps (fitted once per adapter, "
        "over every training row, then reused by the next task on that adapter), damping 0.1",
        optional=True, family="influence")
def _llmeraser_ekfac(ctx: Context) -> Outcome:
    s = ctx.settings
    return _influence(ctx, _solver("ekfac"), CurvatureConfig("ggn", s.damping, None, s.batch_size, s.seed),
                      factors_key="ekfac")


# --------------------------------------------------------------------------- + refine (eraser.verify)


FULL_SIZE_ONLY = "full size only (the quick run covers the erase through the product and ekfac rows)"


def _full_size_only(enabled: bool) -> None:
    if not enabled:
        raise Unavailable(FULL_SIZE_ONLY)


def refined(base: str) -> Callable[[Context], Outcome]:
    """``base`` followed by the product's verification under ``enforce``
    (``eraser.verify.verify_and_refine``): score the erased rows against a calibration set
    of held-out people (not the evaluation's never-trained set), refine with NPO anchored
    by KL on retained rows when they still look trained, and judge every bound against the
    original adapter's retained loss, as ``erase`` does. A refused update is still
    evaluated (the table shows what was refused and why)."""

    def run(ctx: Context) -> Outcome:
        _full_size_only(ctx.settings.first_order_refine)
        before = ctx.outcomes.get(base)
        if before is None or before.theta is None:
            raise Unavailable(f"{base} produced no adapter on this task")
        task, s = ctx.task, ctx.settings
        erased = [(e.old.prompt, e.old.response) for e in task.edits]
        # Anchor rows: kept rows outside the evaluation's retain probe (a seeded sample), so
        # that refinement is not scored on the very rows it was anchored to.
        probe = {r.id for r in task.probes["retain"]}
        pool = [r for r in task.kept if r.id not in probe]
        pool = random.Random(f"refine:{s.seed}").sample(pool, min(s.refine_retain_rows, len(pool)))
        retain = [(r.prompt, r.response) for r in pool]
        holdout = [(r.prompt, r.response) for r in task.calibration]
        config = VerifyConfig(policy="enforce", max_steps=s.refine_max_steps, max_seconds=s.refine_max_seconds,
                              batch_size=s.batch_size, seed=s.seed)
        # The utility reference is the adapter before the erase (here: the original).
        reference = row_losses(ctx.model, ctx.tokenizer, retain, ctx.device, s.batch_size, s.max_length)
        ctx.set_theta(before.theta)
        started = time.perf_counter()
        try:
            rows = VerifyRows.of(erased, retain, holdout, sum(reference) / len(reference))
            report = verify_and_refine(ctx.model, ctx.tokenizer, rows, config, ctx.device, max_length=s.max_length)
        except VerificationFailedError as e:
            report = e.report
        seconds = time.perf_counter() - started
        r = report.to_json()
        refinement = r["refinement"] or {}
        return ctx.outcome({
            "base": base, "steps": refinement.get("steps", 0),
            "stopped": refinement.get("stopped") or "no refinement needed",
            "passed": r["passed"], "verdict": r["reason"],
            "auc_calibration_before": r["before"]["auc"], "auc_calibration_after": (r["after"] or r["before"])["auc"],
            "retain_reference": r["retain_reference"],
            "refine_seconds": round(seconds, 3), "method": refinement.get("method"), "lr": config.lr,
            "max_steps": config.max_steps,
        }, carried_seconds=before.total_seconds or 0.0)

    return run


for _base in ("llmeraser-paper", "llmeraser-cg", "llmeraser-ekfac"):
    method(f"{_base}+refine", f"{_base}, then eraser.verify.refine (NPO + KL anchor on retained rows) until the "
           "erased rows reach a held-out calibration set's loss level, judged as the product judges it",
           family="refined")(refined(_base))

"""The LLMEraser update: Δθ = (1/n) (H + λI)⁻¹ Σ [G(z) − G(z')], and writing its result.

``compute_update`` works on a loaded model and returns the parameter change with the
solve's diagnostics; ``erase`` is the file-level operation used by the CLI and the
sidecar: validate everything, compute, then write the new adapter and the edited dataset
atomically, or write nothing.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .curvature import Curvature, CurvatureConfig, Damped, gradient
from .data import EncodedRows, Row, load_rows, text_sha256, write_rows
from .probe import VersionProbe, distinguishing_probe
from .rowhash import RowHasher
from .errors import InvalidRequestError, OutputExistsError, UtilityCheckFailedError
from .losses import mean, row_losses
from .options import FACTOR_SOLVERS
from .model import (
    adapter_fingerprint,
    check_adapter_dir,
    load_adapter,
    load_base,
    resolve_device,
    save_adapter_atomically,
    trainable_parameters,
)
from .progress import Progress, silent
from .reports import FactorUse, Step, Utility, Verification, as_json, utility_of
from .requests import Edit, UnlearningRequest
from .datainf import datainf_solve
from .factors import DEFAULT_REFIT_FRACTION, FactorPlan, row_keys
from .kfac import KFAC
from .solvers import FactoredSolver, SolveResult, SolverConfig, require_converged
from .forget import forget
from .secondorder import StepConfig
from .verify import VerifyConfig, load_holdout, retained_sample


@dataclass(frozen=True)
class EraseConfig:
    solver: SolverConfig = field(default_factory=SolverConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    # "influence": the paper's formula, which assumes θ̂ minimises the training loss.
    # "newton": a damped Newton step on the edited dataset's loss, −(H+λI)⁻¹ ∇L_D'(θ̂),
    # which also carries the gradient left by an early-stopped fine-tune.
    objective: Literal["influence", "newton"] = "influence"
    allow_unconverged: bool = False
    max_length: int = 512
    gradient_batch_size: int = 4
    # Verified forgetting (eraser/verify.py): off by default, since it needs a held-out set
    # of rows the adapter never saw; the CLI turns it on (enforce) when given one.
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # Step control (eraser/secondorder.py): every step scaled by a line search that keeps
    # the utility bound; and how the second-order refinement steps are built.
    step: StepConfig = field(default_factory=StepConfig)
    # The utility check every erase passes before anything is written: the mean NLL of a
    # seeded sample of retained rows may rise by at most this much (nats; None: no check).
    # Sound updates stay well inside it, broken ones far outside (docs/defaults.md).
    max_retain_rise: float | None = 0.3
    # Retained rows in that sample (with verification on, its own sample is used). The
    # rise is a paired difference on the same rows, so a few rows see a broken update;
    # each costs one forward pass before and one after the update.
    utility_rows: int = 8

    def __post_init__(self):
        if not isinstance(self.verify, VerifyConfig) or not isinstance(self.step, StepConfig):
            raise InvalidRequestError("verify must be a VerifyConfig and step a StepConfig")
        if self.max_retain_rise is not None and not (isinstance(self.max_retain_rise, (int, float))
                                                     and math.isfinite(self.max_retain_rise) and self.max_retain_rise >= 0):
            raise InvalidRequestError(f"max_retain_rise must be a finite number >= 0 or None, got {self.max_retain_rise!r}")
        if self.utility_rows < 1:
            raise InvalidRequestError(f"utility_rows must be >= 1, got {self.utility_rows}")
        if self.objective not in ("influence", "newton"):
            raise InvalidRequestError(f"unknown objective {self.objective!r} (choose influence or newton)")
        if self.max_length < 8 or self.gradient_batch_size < 1:
            raise InvalidRequestError("max_length must be >= 8 and gradient_batch_size >= 1")

    @property
    def damping(self) -> float:
        solver = self.solver.build()
        eff = getattr(solver, "effective_damping", None)
        return eff(self.curvature.damping) if eff else self.curvature.damping


@dataclass
class Update:
    delta: torch.Tensor
    solve: SolveResult
    curvature_rows: int
    curvature_products: int
    gradient_norm: float
    seconds: dict[str, float]
    factors: KFAC | None = None  # the factors a K-FAC/EK-FAC solve used (to downdate and keep)
    factor_source: str | None = None  # "given" (a cache) or "fitted" (in this call)
    damping: float | None = None  # the λ the solve used (relative damping resolved)


@dataclass(frozen=True)
class UtilityCheck:
    """The retained rows' mean NLL before and after an update, against the allowed rise."""

    rows: int
    before: float
    after: float
    max_rise: float

    @property
    def rise(self) -> float:
        return self.after - self.before

    @property
    def passed(self) -> bool:
        return self.rise <= self.max_rise  # NaN fails

    def to_json(self) -> dict:
        return {"rows": self.rows, "before": self.before, "after": self.after, "rise": self.rise,
                "max_rise": self.max_rise, "passed": self.passed}

    def require(self) -> None:
        if not self.passed:
            raise UtilityCheckFailedError(
                f"the update raised the retained rows' NLL by {self.rise:+.3f} nats on {self.rows} rows "
                f"({self.before:.3f} -> {self.after:.3f}; max +{self.max_rise:g}), so nothing was written; "
                "a larger damping takes a smaller step", self)


def compute_update(
    model,
    tokenizer,
    rows: Sequence[Row],
    edits: Sequence[Edit],
    config: EraseConfig = EraseConfig(),
    device: torch.device | str = "cpu",
    progress: Progress = silent,
    factors: KFAC | None = None,
) -> Update:
    """Solve for Δθ at the model's current adapter parameters (the model is not changed).

    ``factors``: fitted K-FAC/EK-FAC factors for this adapter (from the cache); without
    them a ``kfac``/``ekfac`` solve fits them here, over the curvature rows."""
    params = [p for _, p in trainable_parameters(model)]
    n = len(rows)
    seconds: dict[str, float] = {}
    cfg = config.curvature

    t = time.perf_counter()
    progress("gradient", 0, 1)
    b = _right_hand_side(model, params, tokenizer, rows, edits, config, device)
    seconds["gradient"] = time.perf_counter() - t
    progress("gradient", 1, 1)

    t = time.perf_counter()
    sample = list(range(n))
    if cfg.sample_rows is not None and cfg.sample_rows < n:
        sample = sorted(random.Random(cfg.seed).sample(sample, cfg.sample_rows))
    solver = config.solver.build()
    if _factors_suffice(solver, factors):
        seconds["curvature_setup"] = time.perf_counter() - t
        return _cached_factor_update(b, factors, solver, config, len(sample), progress, seconds)
    train = EncodedRows.from_rows(tokenizer, [rows[i] for i in sample], config.max_length)
    curvature = Curvature(model, params, train, list(range(len(sample))), cfg.kind, cfg.batch_size, device)
    op = Damped(curvature, config.damping)
    if cfg.relative and config.solver.preset != "paper" and not (isinstance(solver, FactoredSolver) and solver.name != "datainf"):
        op.damping = cfg.damping * max(_rayleigh(curvature, b), 1e-12)  # one product
    if isinstance(solver, FactoredSolver):
        seconds["curvature_setup"] = time.perf_counter() - t
        return _factored_update(model, params, [rows[i] for i in sample], train, op, b, solver, config,
                                factors, device, progress, seconds)
    total = getattr(solver, "max_iterations", None) or getattr(solver, "iterations", None) or op.n
    seconds["curvature_setup"] = time.perf_counter() - t  # encoding the curvature rows
    t = time.perf_counter()

    def on_iteration(i: int, of: int, residual: float | None) -> None:
        progress(f"solve ({solver.name})", i, of, {"residual": residual} if residual is not None else None)

    progress(f"solve ({solver.name})", 0, total)
    result = solver.solve(op, b, on_iteration)
    seconds["solve"] = time.perf_counter() - t
    require_converged(result, solver.name, config.allow_unconverged)
    return Update(result.x, result, len(sample), curvature.products, float(torch.linalg.vector_norm(b)), seconds,
                  damping=op.damping)


def _right_hand_side(model, params, tokenizer, rows: Sequence[Row], edits: Sequence[Edit], config: EraseConfig,
                     device) -> torch.Tensor:
    """b of (H + λI) Δθ = b for the configured objective."""
    if config.objective == "influence":
        # b = (1/n) Σ [G(z) − G(z')]: old rows leave (+), edited rows enter (−).
        pairs = [(e.old.prompt, e.old.response) for e in edits] + [(e.new.prompt, e.new.response) for e in edits if e.new]
        signs = [1.0] * len(edits) + [-1.0] * sum(1 for e in edits if e.new)
        affected = EncodedRows(tokenizer, pairs, config.max_length)
        return gradient(model, params, affected, list(range(len(pairs))), signs, config.gradient_batch_size,
                        device) / len(rows)
    by_id = {e.old.id: e.new for e in edits}
    kept = [r for r in (by_id.get(r.id, r) for r in rows) if r is not None]
    data_new = EncodedRows.from_rows(tokenizer, kept, config.max_length)
    return -gradient(model, params, data_new, list(range(len(kept))), None, config.gradient_batch_size, device) / len(kept)


def _factors_suffice(solver, factors: KFAC | None) -> bool:
    """Cached factors are the whole curvature of an EK-FAC/K-FAC solve that measures no
    residual: the training rows need not be encoded (a cost that grows with the dataset)."""
    return (isinstance(solver, FactoredSolver) and solver.name != "datainf" and factors is not None
            and not solver.residual_rows)


def _factor_solve(b: torch.Tensor, factors: KFAC, solver: FactoredSolver, config: EraseConfig, damping: float,
                  progress: Progress) -> tuple[torch.Tensor, float]:
    """x = (F + λI)⁻¹ b on the given factors; λ relative to F's scale along b where configured."""
    if factors.config.method != solver.name:
        raise InvalidRequestError(f"the given factors are {factors.config.method}, not {solver.name}")
    progress(f"solve ({solver.name})", 0, 1)
    if config.curvature.relative:
        damping = config.curvature.damping * max(factors.scale_along(b), 1e-12)
    x = factors.solve(b, damping)
    progress(f"solve ({solver.name})", 1, 1)
    return x, damping


def _cached_factor_update(b, factors: KFAC, solver: FactoredSolver, config: EraseConfig, curvature_rows: int,
                          progress: Progress, seconds: dict) -> Update:
    t = time.perf_counter()
    x, damping = _factor_solve(b, factors, solver, config, config.damping, progress)
    seconds["solve"] = time.perf_counter() - t
    result = SolveResult(x, 1, float("nan"), True, float("nan"), seconds["solve"],
                         "closed form on the approximated curvature; residual not measured")
    return Update(x, result, curvature_rows, 0, float(torch.linalg.vector_norm(b)), seconds, factors, "given",
                  damping)


def _factored_update(model, params, curvature_rows, train, op, b, solver: FactoredSolver, config: EraseConfig,
                     factors: KFAC | None, device, progress: Progress, seconds: dict) -> Update:
    """EK-FAC/K-FAC (factors given or fitted now) or DataInf: a closed-form solve."""
    source = None
    t = time.perf_counter()
    if solver.name == "datainf":
        x = datainf_solve(model, params, train, list(range(len(train))), b, op.damping, device, progress)
        seconds["solve"] = time.perf_counter() - t
    else:
        if factors is None:
            factors = KFAC.fit(model, params, train, list(range(len(train))), solver.kfac_config(), device,
                               row_keys(curvature_rows), progress)
            seconds["factor_fit"] = time.perf_counter() - t
            source = "fitted"
        else:
            source = "given"
        t = time.perf_counter()
        x, op.damping = _factor_solve(b, factors, solver, config, op.damping, progress)
        seconds["solve"] = time.perf_counter() - t
    residual, products, note = float("nan"), 0, "closed form on the approximated curvature; residual not measured"
    if solver.residual_rows:
        # A stochastic check against the exact damped curvature on a sample of rows.
        pick = sorted(random.Random(solver.seed).sample(range(len(train)), min(solver.residual_rows, len(train))))
        t = time.perf_counter()
        residual = float(torch.linalg.vector_norm(op.matvec_rows(x, pick) - b) / torch.linalg.vector_norm(b).clamp(min=1e-30))
        products, note = 1, f"residual against the exact damped curvature on {len(pick)} rows"
        seconds["residual_check"] = time.perf_counter() - t
    result = SolveResult(x, 1, residual, True, float("nan"), seconds["solve"], note)
    return Update(x, result, len(train), products, float(torch.linalg.vector_norm(b)), seconds, factors, source,
                  op.damping)


def check_reference_verdict(config: EraseConfig) -> None:
    """Without a held-out set the verdict takes the base model as its reference; under
    enforce only the second-order path (curvature factors) can refine toward it."""
    if config.verify.policy == "enforce" and config.solver.name not in FACTOR_SOLVERS:
        raise InvalidRequestError(
            f"verify enforce with the {config.solver.name} solver needs a held-out set of rows the adapter never saw "
            "(without one, only ekfac and kfac can refine toward the base model's level)")


def retained_factors(factors: KFAC, model, params, tokenizer, edits, max_length: int, device) -> KFAC:
    """A copy of ``factors`` with the edited rows' contributions moved (old out, new in);
    call at the parameters the factors were fitted at."""
    import copy

    kept = copy.deepcopy(factors)
    enc = lambda rows: EncodedRows.from_rows(tokenizer, rows, max_length) if rows else None  # noqa: E731
    old, new = [e.old for e in edits], [e.new for e in edits if e.new is not None]
    kept.downdate(model, params, enc(old), row_keys(old), enc(new), row_keys(new), device)
    return kept


def _rayleigh(op, v: torch.Tensor) -> float:
    norm2 = float(v.double() @ v.double())
    return float(v.double() @ op.matvec(v).double()) / norm2 if norm2 > 0 else 0.0


def apply_delta(model, delta: torch.Tensor) -> None:
    params = [p for _, p in trainable_parameters(model)]
    with torch.no_grad():
        vector_to_parameters(parameters_to_vector(params) + delta.to(params[0].device, params[0].dtype), params)


@dataclass
class EraseReport:
    solver: str
    preset: str | None
    curvature: str
    damping: float
    objective: str
    iterations: int
    residual: float
    converged: bool
    tolerance: float
    seconds: dict[str, float]
    affected_loss_before: float
    affected_loss_after: float
    edited_loss_before: float | None
    edited_loss_after: float | None
    rows: int
    rows_after: int
    counts: dict[str, int]
    curvature_rows: int
    curvature_products: int
    parameters: int
    update_norm: float
    adapter_out: str
    adapter_sha256: str
    parent_adapter_sha256: str
    note: str = ""
    factors: FactorUse | None = None  # the factor cache: used or fitted, downdated or refitted
    verification: Verification | None = None  # when verification ran: numbers and ids only
    utility: Utility | None = None  # when the check ran
    # Each step applied (eraser/secondorder.py): the influence step first, then any
    # second-order refinement steps.
    steps: tuple[Step, ...] | None = None
    # When asked for: what confirms the new version on a serving engine.
    probe: VersionProbe | None = None

    def __post_init__(self):
        # JSON has no NaN: a closed-form solve's unmeasured residual reads as null.
        for name in ("residual", "tolerance"):
            value = getattr(self, name)
            if isinstance(value, float) and math.isnan(value):
                setattr(self, name, None)

    def to_json(self) -> dict:
        return as_json(self)


@dataclass(frozen=True)
class _Checked:
    """Every input of an erase, validated before anything is loaded or computed."""

    rows: list[Row]
    edits: list[Edit]
    out_dir: Path
    plan: FactorPlan | None
    holdout: list[Row]
    verifying: bool


@dataclass
class _Loaded:
    base: object  # eraser.model.LoadedBase
    model: object
    params: list
    parent_sha: str
    cached: object | None  # the factor cache's entry (eraser.factors.CachedFactors)


@dataclass(frozen=True)
class _Before:
    """The parent adapter's losses: the affected rows', and the retained sample that
    utility and verification judge against."""

    old_pairs: list
    new_pairs: list
    old: list[float]
    new: list[float]
    retain_pairs: list
    retain_losses: list[float]


class _Clock:
    """Wall seconds per stage, for the report."""

    def __init__(self):
        self.started, self.seconds = time.perf_counter(), {}

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t


def _check_inputs(data_path, request: UnlearningRequest, adapter_dir, out_dir, config: EraseConfig, factors_dir,
                  factors_out, refit_fraction: float, holdout_path) -> _Checked:
    rows = load_rows(data_path)
    edits = request.resolve(rows)
    check_adapter_dir(adapter_dir)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise OutputExistsError(f"output already exists: {out_dir}")
    plan = FactorPlan.check(config.solver.build(), factors_dir, factors_out, refit_fraction, config.curvature.sample_rows)
    verifying = config.verify.policy != "off"
    holdout = load_holdout(holdout_path, rows, config.verify) if verifying and holdout_path is not None else []
    if verifying and holdout_path is None:
        check_reference_verdict(config)
    return _Checked(rows, edits, out_dir, plan, holdout, verifying)


def _load(base_dir, adapter_dir, inputs: _Checked, config: EraseConfig, dev, progress: Progress,
          clock: _Clock) -> _Loaded:
    with clock.stage("load"):
        progress("load", 0, 1)
        base = load_base(base_dir, dev)
        model = load_adapter(base, adapter_dir, trainable=True)
    parent_sha = adapter_fingerprint(adapter_dir)
    params = [p for _, p in trainable_parameters(model)]
    cached = None
    if inputs.plan is not None:
        with clock.stage("factors"):
            key = inputs.plan.key(base.fingerprint, parent_sha, inputs.rows, config.max_length)
            cached = inputs.plan.prepare(model, params, base.tokenizer, inputs.rows, key, dev, progress)
    return _Loaded(base, model, params, parent_sha, cached)


def _measure_before(loaded: _Loaded, inputs: _Checked, config: EraseConfig, dev) -> _Before:
    tok, edits = loaded.base.tokenizer, inputs.edits
    losses = lambda pairs: row_losses(loaded.model, tok, pairs, dev, config.step.score_batch_size,  # noqa: E731
                                      config.max_length)
    old_pairs = [(e.old.prompt, e.old.response) for e in edits]
    new_pairs = [(e.new.prompt, e.new.response) for e in edits if e.new]
    retain_pairs: list = []
    # Utility is judged against the parent adapter, on a seeded sample of retained rows
    # (verification's own sample when it runs, so that both judge the same rows).
    if config.max_retain_rise is not None or inputs.verifying:
        size = config.verify.retain_sample if inputs.verifying else config.utility_rows
        retain_pairs = [(r.prompt, r.response)
                        for r in retained_sample(inputs.rows, edits, replace(config.verify, retain_sample=size))]
    return _Before(old_pairs, new_pairs, losses(old_pairs), losses(new_pairs), retain_pairs, losses(retain_pairs))


def _kept_curvature(update: Update, moved, loaded: _Loaded, edits, config: EraseConfig, dev):
    """The curvature of the rows that stay, which preconditions refinement: the downdated
    cache (the same object as the cache's, once downdated), else the fitted factors moved."""
    if moved is not None:
        return moved.factors
    if update.factors is not None and config.verify.policy == "enforce":
        return retained_factors(update.factors, loaded.model, loaded.params, loaded.base.tokenizer, edits,
                                config.max_length, dev)
    return None


def _check_utility(before: _Before, config: EraseConfig, forgot) -> UtilityCheck | None:
    """Raises UtilityCheckFailedError before anything is written. The same retained rows the
    step control scored (``forgot.objective``), at the parameters written."""
    if config.max_retain_rise is None or not before.retain_pairs:
        return None
    utility = UtilityCheck(len(before.retain_pairs), mean(before.retain_losses), forgot.retained_mean(),
                           config.max_retain_rise)
    utility.require()
    return utility


def _adapter_meta(loaded: _Loaded, inputs: _Checked, config: EraseConfig, update: Update, forgot, edited_rows,
                  row_hasher: RowHasher) -> dict:
    meta = {
        "base_model_fingerprint": loaded.base.fingerprint,
        "parent_adapter_sha256": loaded.parent_sha,
        "produced_by": "eraser erase",
        "objective": config.objective,
        "solver": config.solver.name,
        "preset": config.solver.preset,
        "curvature": config.curvature.kind,
        "damping": update.damping if update.damping is not None else config.damping,
        "steps": [as_json(st) for st in forgot.steps],
        "residual": update.solve.residual,
        "converged": update.solve.converged,
        # Ids and keyed hashes only: the erased text must not survive in anything we write,
        # and a hash anyone could recompute would confirm a guess of it.
        "row_hash": row_hasher.describe(),
        "edits": [{"id": e.old.id, "kind": e.kind, "old_hash": row_hasher.row(e.old)} for e in inputs.edits],
        "dataset_sha256": text_sha256("\n".join(r.id + "\x00" + r.sha256() for r in edited_rows)),
    }
    if forgot.verification is not None:  # numbers and ids only
        meta["verification"] = forgot.verification.to_json()
    return meta


def _write(loaded: _Loaded, inputs: _Checked, meta: dict, edited_rows, data_out, moved, config: EraseConfig, dev,
           progress: Progress, clock: _Clock) -> tuple[Path, str]:
    """The adapter, the edited dataset and the next version's factors, or none of them."""
    t = time.perf_counter()
    written = save_adapter_atomically(loaded.model, inputs.out_dir, meta)
    adapter_sha = adapter_fingerprint(written)
    data_written = False
    try:
        if data_out is not None:
            write_rows(data_out, edited_rows)
            data_written = True
        clock.seconds["write"] = time.perf_counter() - t
        if inputs.plan is not None:
            with clock.stage("factors_out"):
                key = inputs.plan.key(loaded.base.fingerprint, adapter_sha, edited_rows, config.max_length)
                inputs.plan.write(moved, loaded.model, loaded.params, loaded.base.tokenizer, edited_rows, key, dev,
                                  progress)
    except BaseException:
        shutil.rmtree(written, ignore_errors=True)
        if data_written:
            Path(data_out).unlink(missing_ok=True)
        raise
    return written, adapter_sha


def erase(
    base_dir: str | Path,
    adapter_dir: str | Path,
    data_path: str | Path,
    request: UnlearningRequest,
    out_dir: str | Path,
    data_out: str | Path | None = None,
    config: EraseConfig = EraseConfig(),
    device: str | None = "cpu",
    progress: Progress = silent,
    factors_dir: str | Path | None = None,
    factors_out: str | Path | None = None,
    refit_fraction: float = DEFAULT_REFIT_FRACTION,
    holdout_path: str | Path | None = None,
    row_hasher: RowHasher | None = None,
    serving_probe: bool = False,
) -> EraseReport:
    """Erase per ``request``: write the patched adapter to ``out_dir`` (and the edited
    dataset to ``data_out``). All input is checked before anything is computed, and
    nothing is written unless every stage succeeded.

    With ``config.verify.policy`` report or enforce, the erased rows are judged after the
    update: against ``holdout_path`` (rows of the same kind the adapter never saw) when
    given, else against the base model with the adapter disabled (eraser/membership.py);
    enforce refines until they look never-seen, or raises ``VerificationFailedError`` and
    writes nothing.

    Erased rows are recorded by id and keyed hash (``row_hasher``; a key drawn for this
    run and not kept when none is given). With ``serving_probe`` the report carries the
    probe that tells the new version from its parent on a serving engine (eraser/probe.py).
    """
    clock = _Clock()
    row_hasher = row_hasher or RowHasher.draw()
    inputs = _check_inputs(data_path, request, adapter_dir, out_dir, config, factors_dir, factors_out, refit_fraction,
                           holdout_path)
    dev = resolve_device(device)
    loaded = _load(base_dir, adapter_dir, inputs, config, dev, progress, clock)
    before = _measure_before(loaded, inputs, config, dev)
    update = compute_update(loaded.model, loaded.base.tokenizer, inputs.rows, inputs.edits, config, dev, progress,
                            factors=loaded.cached.factors if loaded.cached else None)
    clock.seconds.update(update.seconds)
    parent_values = [p.detach().clone() for p in loaded.params] if serving_probe else None
    moved = _downdate(inputs, loaded, dev)  # while the model still holds the parent's parameters
    with clock.stage("verify" if inputs.verifying else "step_control"):
        # Raises VerificationFailedError (enforce) before anything is written.
        forgot = forget(loaded.model, loaded.params, loaded.base.tokenizer, update.delta,
                        _kept_curvature(update, moved, loaded, inputs.edits, config, dev), inputs.edits,
                        [(r.prompt, r.response) for r in inputs.holdout], before.retain_pairs, before.retain_losses,
                        config.verify, config.step, config.max_retain_rise, dev, config.max_length, progress)
    with clock.stage("evaluate"):
        utility, after_old, after_new = _evaluate_after(loaded, before, config, dev, forgot)
    edited_rows = request.apply_to(inputs.rows)
    # Before anything is written: a failure here leaves nothing behind.
    probe = _serving_probe(loaded, edited_rows, parent_values, dev, clock) if serving_probe else None
    meta = _adapter_meta(loaded, inputs, config, update, forgot, edited_rows, row_hasher)
    written, adapter_sha = _write(loaded, inputs, meta, edited_rows, data_out, moved, config, dev, progress, clock)
    clock.seconds["total"] = time.perf_counter() - clock.started
    progress("done", 1, 1)
    return _report(config, update, forgot, utility, before, after_old, after_new, inputs, edited_rows, request, written,
                   adapter_sha, loaded.parent_sha, probe, clock.seconds)


def _downdate(inputs, loaded, dev):
    """The next version's factors (the plan's downdate), or None without a plan."""
    if inputs.plan is None:
        return None
    return inputs.plan.downdate(loaded.cached, loaded.model, loaded.params, loaded.base.tokenizer,
                                [e.old for e in inputs.edits], [e.new for e in inputs.edits if e.new], dev)


def _serving_probe(loaded, edited_rows, parent_values, dev, clock) -> VersionProbe:
    with clock.stage("probe"):
        return distinguishing_probe(loaded.model, loaded.base.tokenizer, edited_rows, loaded.params, parent_values, dev)


def _evaluate_after(loaded, before: _Before, config: EraseConfig, dev, forgot):
    """The utility check (raises UtilityCheckFailedError), then the old and new rows' losses."""
    utility = _check_utility(before, config, forgot)
    losses = [row_losses(loaded.model, loaded.base.tokenizer, pairs, dev, config.step.score_batch_size,
                         config.max_length)
              for pairs in (before.old_pairs, before.new_pairs)]
    return utility, losses[0], losses[1]


def _report(config: EraseConfig, update: Update, forgot, utility, before: _Before, after_old, after_new,
            inputs: _Checked, edited_rows, request: UnlearningRequest, written: Path, adapter_sha: str,
            parent_sha: str, probe, seconds: dict) -> EraseReport:
    solver, verification = config.solver, forgot.verification
    return EraseReport(
        solver=solver.name,
        preset=solver.preset,
        curvature=config.curvature.kind,
        damping=update.damping if update.damping is not None else config.damping,
        objective=config.objective,
        iterations=update.solve.iterations,
        residual=update.solve.residual,
        converged=update.solve.converged,
        tolerance=update.solve.tolerance,
        seconds={k: round(v, 4) for k, v in seconds.items()},
        affected_loss_before=mean(before.old),
        affected_loss_after=mean(after_old),
        edited_loss_before=mean(before.new),
        edited_loss_after=mean(after_new),
        rows=len(inputs.rows),
        rows_after=len(edited_rows),
        counts=request.counts(),
        curvature_rows=update.curvature_rows,
        curvature_products=update.curvature_products,
        parameters=int(update.delta.numel()),
        update_norm=float(torch.linalg.vector_norm(update.delta)),
        adapter_out=str(written),
        adapter_sha256=adapter_sha,
        parent_adapter_sha256=parent_sha,
        note=update.solve.note,
        factors=inputs.plan.report if inputs.plan is not None else None,
        verification=verification,
        utility=utility_of(utility.to_json()) if utility else None,
        steps=tuple(forgot.steps),
        probe=probe,
    )

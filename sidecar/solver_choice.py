"""Which solver an erase job runs, with which settings: a request's options completed with
the sidecar's and the adapter's defaults (``resolve_options``), the engine config they make
(``engine_config``), and the factor cache an ekfac/kfac job reads (``SolverChooser``: the
current version's cache, else by ``erase.factor_policy`` a wait for its background fit or
a cg fallback; module docstring of ``sidecar.factors``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eraser import factors as engine_factors
from eraser import configure
from eraser import options as defaults
from eraser.errors import EraserError, InvalidRequestError
from eraser.unlearn import EraseConfig

from .config import SidecarConfig
from .factors import FACTOR_METHODS, FactorPreparer, FactorTarget, cache_problem, wanted_key
from .job_model import Job
from .report import Factors
from .store import AdapterRecord, AdapterStore, Version

log = logging.getLogger("eraser.sidecar")

OPTION_FIELDS = defaults.REQUEST_OPTIONS


VERIFY_RANK = {"off": 0, "report": 1, "enforce": 2}


def verify_policy(requested: str | None, record: AdapterRecord | None, config: SidecarConfig,
                  solver: str | None = None) -> str:
    """The verification policy of a request: its own, else the adapter's (as registered,
    else the sidecar's ``erase.verify`` when the adapter has a held-out set, else the
    product's default without one: a reported verdict against the base model on the
    ekfac/kfac path). The registered policy is a floor: a weaker requested one is refused."""
    if requested and requested not in defaults.VERIFY_POLICIES:
        raise InvalidRequestError(f"unknown verify policy {requested!r} (choose {', '.join(defaults.VERIFY_POLICIES)})")
    has_holdout = record is not None and record.holdout_sha256 is not None
    solver = solver or config.erase.solver
    default = (record.verify if record is not None and record.verify else
               config.erase.verify if has_holdout else defaults.default_verify_policy(False, solver))
    policy = requested or default
    floor = record.verify if record is not None and record.verify else "off"
    if VERIFY_RANK[policy] < VERIFY_RANK[floor] and not config.erase.verify_allow_lower:
        raise InvalidRequestError(f"verify {policy} is below the policy adapter {record.name!r} was registered with "
                                  f"({floor}); a request may raise it, not lower it (erase.verify_allow_lower)")
    if policy == "enforce" and not has_holdout and solver not in defaults.FACTOR_SOLVERS:
        name = repr(record.name) if record is not None else "the adapter"
        raise InvalidRequestError(f"verify enforce needs a held-out set or the ekfac/kfac solver, and adapter {name} was "
                                  f"registered without one (holdout_path); solver {solver}")
    return policy


def resolve_options(options: dict, config: SidecarConfig, record: AdapterRecord | None = None) -> dict:
    """A request's options completed with the sidecar's (and the adapter's) defaults,
    validated, canonical.

    The result is what the job stores and what decides whether two requests may share
    one solve. Verification settings appear only when the policy is not off (so the
    options of unverified jobs are what they were before verification existed).
    """
    d = config.erase
    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
    solver = options.get("solver") or d.solver
    if solver == "datainf" and (options.get("tolerance") is not None or options.get("max_iterations") is not None):
        raise InvalidRequestError("tolerance and max_iterations do not apply to the datainf solver (a closed form)")
    out = {
        "solver": solver,
        "preset": options.get("preset") or d.preset or None,
        "curvature": options.get("curvature") or d.curvature,
        "damping": float(options["damping"]) if options.get("damping") is not None else d.damping,
        "objective": options.get("objective") or d.objective,
        "tolerance": options.get("tolerance") if options.get("tolerance") is not None else d.tolerance,
        "max_iterations": options.get("max_iterations") if options.get("max_iterations") is not None else d.max_iterations,
        "allow_unconverged": bool(options.get("allow_unconverged", False)),
        "curvature_rows": options.get("curvature_rows") if options.get("curvature_rows") is not None else d.curvature_rows,
        "curvature_batch_size": d.curvature_batch_size,
        "max_length": d.max_length,
        "max_retain_rise": d.max_retain_rise,
    }
    # Written only where they differ from the engine's defaults, so that the options of
    # jobs stored before these settings existed read the same.
    if not d.step_control:
        out["step_control"] = False
    if d.damping_scale != "absolute":
        out["damping_scale"] = d.damping_scale
    for name in ("damping", "tolerance"):  # NaN and infinity pass every comparison below
        if out[name] is not None and not math.isfinite(out[name]):
            raise InvalidRequestError(f"{name} must be a finite number")
    if out["max_iterations"] is not None and out["max_iterations"] > d.max_iterations_limit:
        raise InvalidRequestError(f"max_iterations {out['max_iterations']} is above this sidecar's limit "
                                  f"(erase.max_iterations_limit={d.max_iterations_limit})")
    if out["tolerance"] is not None and 0 < out["tolerance"] < d.min_tolerance:
        raise InvalidRequestError(f"tolerance {out['tolerance']:g} is below this sidecar's limit "
                                  f"(erase.min_tolerance={d.min_tolerance:g})")
    policy = verify_policy(options.get("verify"), record, config, solver)
    if policy != "off":
        out["verify"] = policy
        out.update({f"verify_{k}": v for k, v in d.verify_limits().items()})
    engine_config(out)  # raises InvalidRequestError on any bad value
    if solver in FACTOR_METHODS:
        engine_config(fallback_options(out))  # what a fallback to cg would run must be valid too
    return out


def fallback_options(options: dict) -> dict:
    """The options of a job's ``cg`` fallback when its EK-FAC/K-FAC factors are missing
    (``erase.factor_policy: fallback``): the job's own, tolerance, iteration limit and
    curvature rows included (which ekfac and kfac do not use)."""
    return {**options, "solver": "cg", "preset": None}


def engine_config(options: dict) -> EraseConfig:
    """The engine config of a job's resolved options (``eraser.configure.erase_config``)."""
    if options["solver"] in defaults.CLOSED_FORM_SOLVERS:
        # Closed-form solves: no tolerance or iteration limit (the sidecar's defaults are for
        # cg); ekfac/kfac read a factor cache fitted on every row, so a curvature sample
        # applies to a cg fallback only.
        options = {**options, "tolerance": None, "max_iterations": None}
        if options["solver"] != "datainf":
            options["curvature_rows"] = None
    return configure.erase_config(options)


@dataclass
class SolverChoice:
    """The solver a job runs and, for ekfac/kfac, its factor cache and how it was obtained."""

    config: EraseConfig
    requested: str
    solver: str
    method: str | None = None  # ekfac/kfac: a cache is read (source) and written for the next version
    source: Path | None = None
    # cache | waited (for the background fit) | inline (fitted by the engine) | fallback | plain
    how: str = "plain"
    wait_seconds: float = 0.0
    discarded: str = ""  # why a cache found in the version's place was not used
    reason: str = ""
    policy: str = "policy wait"

    def bad_cache(self, error: EraserError) -> bool:
        """Whether the engine refused the cache it was given (mismatch, or damaged files)."""
        if self.method is None or self.source is None:
            return False
        return isinstance(error, engine_factors.FactorMismatchError) or (
            isinstance(error, InvalidRequestError) and str(self.source) in str(error))

    def describe(self, number: int, factors: Factors | None) -> str:
        """One line for the job's report: the solver that ran and why."""
        f = factors or Factors()
        if self.how == "cache":
            age = f.age_seconds
            why = f"{self.method}: factors of v{number} from cache" + (f" (age {age:.0f} s)" if age is not None else "")
        elif self.how == "waited":
            why = (f"{self.method}: factors of v{number} were missing; fitted in the background while the job waited "
                   f"{self.wait_seconds:.1f} s ({self.policy})")
        elif self.how == "inline":
            why = f"{self.method}: factors of v{number} were missing; fitted in the job ({self.policy})"
        else:
            why = self.reason
        if self.discarded:
            why += f"; the cache found for v{number} was discarded ({self.discarded})"
        if f.out_action in ("downdated", "refitted"):
            why += (f"; factors of v{number + 1} {f.out_action} ({f.changed_fraction or 0.0:.0%} of rows "
                    "changed since the last full fit)")
        return why


class SolverChooser:
    """Decides each job's solver and factor cache; ``on_discard(adapter)`` is told when a
    cache that did not belong to its version was discarded."""

    def __init__(self, store: AdapterStore, factors: FactorPreparer, config: SidecarConfig,
                 on_discard: Callable[[str], None]):
        self.store, self.factors, self.config, self.on_discard = store, factors, config, on_discard

    def choose(self, job: Job, current: Version, progress) -> SolverChoice:
        """Which solver a job runs, and with which factor cache (module docstring of
        ``sidecar.factors``): the cache of the current version if there is a valid one;
        else, by ``erase.factor_policy``, wait for its fit (``wait``) or run cg (``fallback``)."""
        requested = job.options["solver"]
        if requested not in FACTOR_METHODS:
            kind = "a closed form without a factor cache" if requested == "datainf" else "no factors needed"
            return SolverChoice(engine_config(job.options), requested, requested,
                                 reason=f"{requested}: as requested (or the sidecar's default); {kind}")
        method, n = requested, current.number
        target = FactorTarget(job.adapter, n, method, job.options["max_length"])
        source = self.store.factors_dir(job.adapter, n, method)
        choice = SolverChoice(engine_config(job.options), requested, method, method=method, source=source)
        problem = cache_problem(source, wanted_key(self.store, current, method, job.options["max_length"]))
        if problem is not None:
            # Our own store holds a cache that is not this version's (copied in by hand, or
            # restored from elsewhere). Using it would give a wrong update and failing would
            # block the adapter until someone deleted it: discard it and fit anew (a fit in
            # progress for this version replaces it whole when it saves).
            log.warning("job %s: the %s factor cache of %s v%d does not belong to it (%s); discarded, refitting",
                        job.id, method, job.adapter, n, problem)
            if not self.factors.pending(target):
                self.store.discard_factors(job.adapter, n, method)
            self.on_discard(job.adapter)
            choice.discarded = problem
        if engine_factors.is_cache(source) and problem is None:
            choice.how = "cache"
            return choice
        if self.config.erase.factor_policy == "fallback" and self.cg_can_verify(job):
            # This version's fit is of no use once the job publishes the next one; the next
            # version's is asked for after the publish (the service's prepare_factors).
            return SolverChoice(engine_config(fallback_options(job.options)), requested, "cg", method=None,
                                 how="fallback", discarded=choice.discarded,
                                 reason=f"cg: {method} requested but factors of v{n} not ready; policy fallback")
        if self.config.erase.factor_policy == "fallback":
            choice.policy = "fallback refused: cg cannot enforce the base-model verdict of an adapter without a held-out set"
        if not self.factors.running:  # no background thread (not started): the engine fits them
            choice.how = "inline"
            return choice
        stage = "waiting for factors"
        progress(stage, 0, 1000)
        log.info("job %s waits for the %s factors of %s v%d", job.id, method, job.adapter, n)
        choice.wait_seconds = self.factors.wait(target, lambda fraction: progress(stage, int(fraction * 1000), 1000))
        choice.how = "waited"
        return choice

    def cg_can_verify(self, job: Job) -> bool:
        """Whether a cg fallback can run a job's verification: enforce without a held-out
        set refines toward the base model's level, which needs the curvature factors."""
        return job.options.get("verify") != "enforce" or self.store.record(job.adapter).holdout_sha256 is not None

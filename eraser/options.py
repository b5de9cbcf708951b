"""The product's default erase path, named once for the CLI, the sidecar and the benchmarks.

The default is the verified second-order path: the influence step solved with EK-FAC
factors (cached per adapter version; fitted in the call where no cache is given), damping
relative to the curvature's own scale along the request, every step line-searched so the
utility bound holds, then natural-gradient refinement under ``enforce`` until the erased
rows look never-seen next to a held-out set. ``cg`` stays an option, and the fallback where factors are missing.

No torch at import time: the sidecar's configuration and its client import this module.
"""

from __future__ import annotations

SOLVERS = ("direct", "cg", "sqm", "ekfac", "kfac", "datainf")
FACTOR_SOLVERS = ("ekfac", "kfac")
DAMPING_SCALES = ("absolute", "relative")
VERIFY_POLICIES = ("off", "report", "enforce")
# A request's engine options (the proto's EraseOptions, less its deadline): what a client
# may set per request and the sidecar resolves against its defaults.
REQUEST_OPTIONS = ("solver", "preset", "curvature", "damping", "objective", "tolerance", "max_iterations",
                   "allow_unconverged", "curvature_rows", "verify")

DEFAULT_SOLVER = "ekfac"
DEFAULT_DAMPING_SCALE = "relative"
# λ = 0.1 × the curvature's Rayleigh quotient along the gradient it preconditions.
DEFAULT_DAMPING = 0.1
# Where a user picks absolute damping without a value.
DEFAULT_ABSOLUTE_DAMPING = 0.01
DEFAULT_MAX_RETAIN_RISE = 0.3
# Refit the factors in full once this share of the fitted rows has changed through
# downdates: past it the downdating error outgrows EK-FAC's own (docs/defaults.md).
DEFAULT_REFIT_FRACTION = 0.10


def default_damping(scale: str) -> float:
    return DEFAULT_DAMPING if scale == "relative" else DEFAULT_ABSOLUTE_DAMPING


def default_verify_policy(has_holdout: bool, solver: str = DEFAULT_SOLVER) -> str:
    """enforce with a held-out set; without one, enforce against the base model (adapter
    disabled) where refinement can reach it (the ekfac/kfac path), else no verification."""
    return "enforce" if has_holdout or solver in FACTOR_SOLVERS else "off"


CLOSED_FORM_SOLVERS = ("ekfac", "kfac", "datainf")
VERIFY_PREFIX = "verify_"


def erase_config(options: dict):
    """The engine config (eraser.unlearn.EraseConfig) of an erase's options: the one place
    where the CLI's flags and the sidecar's resolved options become a config, checked once.

    Keys (absent or None: the engine's default): solver, preset, tolerance, max_iterations,
    samples, residual_rows (ekfac/kfac/datainf), factor_batch_size (theirs), curvature,
    damping, damping_scale, curvature_rows, curvature_batch_size, step_control, objective,
    allow_unconverged, max_length, max_retain_rise, verify (the policy) and verify_<field>
    for the other fields of eraser.verify.VerifyConfig.
    """
    from .curvature import CurvatureConfig
    from .errors import InvalidRequestError
    from .secondorder import StepConfig
    from .solvers import SolverConfig
    from .unlearn import EraseConfig
    from .verify import VerifyConfig

    def given(key):
        return options.get(key) is not None

    solver = options.get("solver") or DEFAULT_SOLVER
    closed = solver in CLOSED_FORM_SOLVERS
    solver_options = {}
    if given("tolerance"):
        if closed:
            raise InvalidRequestError(f"tolerance does not apply to the {solver} solver (a closed-form solve)")
        if not options["tolerance"] > 0:
            raise InvalidRequestError("tolerance must be > 0")
        solver_options["tolerance"] = float(options["tolerance"])
    if given("max_iterations"):
        if solver == "direct" or closed:
            raise InvalidRequestError(f"max_iterations does not apply to the {solver} solver")
        if int(options["max_iterations"]) < 1:
            raise InvalidRequestError("max_iterations must be >= 1")
        solver_options["max_iterations" if solver == "cg" else "iterations"] = int(options["max_iterations"])
    for key, name in (("samples", "samples"), ("residual_rows", "residual_rows"), ("factor_batch_size", "batch_size")):
        if given(key):
            if not closed:
                raise InvalidRequestError(f"{key} applies to ekfac, kfac and datainf only")
            solver_options[name] = options[key]
    scale = options.get("damping_scale") or "absolute"
    curvature = {k: options[o] for k, o in (("kind", "curvature"), ("sample_rows", "curvature_rows"),
                                             ("batch_size", "curvature_batch_size")) if given(o)}
    verify = {key[len(VERIFY_PREFIX):]: value for key, value in options.items()
              if key.startswith(VERIFY_PREFIX) and value is not None}
    fields = {"objective": options.get("objective"), "allow_unconverged": options.get("allow_unconverged"),
              "max_length": options.get("max_length")}
    return EraseConfig(
        solver=SolverConfig(solver, options.get("preset") or None, solver_options),
        curvature=CurvatureConfig(damping=options["damping"] if given("damping") else default_damping(scale),
                                  relative=scale == "relative", **curvature),
        step=StepConfig(enabled=options.get("step_control", True) is not False),
        verify=VerifyConfig(policy=options.get("verify") or "off", **verify),
        # Absent (jobs stored before the utility check existed): the engine's default.
        **({"max_retain_rise": options["max_retain_rise"]} if "max_retain_rise" in options else {}),
        **{k: v for k, v in fields.items() if v is not None})


def product_erase_config(has_holdout: bool, **overrides):
    """The engine config of the product's default path (``overrides``: EraseConfig fields)."""
    from .curvature import CurvatureConfig
    from .solvers import SolverConfig
    from .unlearn import EraseConfig
    from .verify import VerifyConfig

    fields = {
        "solver": SolverConfig(DEFAULT_SOLVER),
        "curvature": CurvatureConfig(damping=DEFAULT_DAMPING, relative=DEFAULT_DAMPING_SCALE == "relative"),
        "verify": VerifyConfig(policy=default_verify_policy(has_holdout)),
        "max_retain_rise": DEFAULT_MAX_RETAIN_RISE,
    }
    fields.update(overrides)
    return EraseConfig(**fields)

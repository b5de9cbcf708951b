"""The product's default erase path, named once for the CLI, the sidecar and the benchmarks
(``eraser.configure`` makes an erase's options into the engine's config).

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
# A request's verify_<field> options set eraser.verify.VerifyConfig's other fields.
VERIFY_PREFIX = "verify_"

"""An erase's options (the CLI's flags, a job's resolved options) made into the engine's
config (eraser.unlearn.EraseConfig), and the product's default path as a config. The
names and defaults they draw on are eraser.options (no torch at import time: the sidecar's
configuration imports it); the engine's modules are imported where a config is built.
"""

from __future__ import annotations

from .options import (CLOSED_FORM_SOLVERS, DEFAULT_DAMPING, DEFAULT_DAMPING_SCALE, DEFAULT_MAX_RETAIN_RISE,
                      DEFAULT_SOLVER, VERIFY_PREFIX, default_damping, default_verify_policy)


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

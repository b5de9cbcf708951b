"""Never-seen targets and the reference attack: the base model's NLL as a ratio, against a difference.

Refinement aims each erased row at the NLL it would have had the adapter never seen it, and the
membership verdict's calibrated attack compares erased rows with held-out rows after removing
each row's own difficulty. Both read that difficulty off the base model (adapter disabled).
This measures, on rows the adapter never saw, how well each way does it:

- **targets**: predict a never-seen row's adapter NLL ``a`` from its base NLL ``b`` and a
  12-row held-out set (what the product has): ``b + median(a - b)`` over the held-out rows
  (the difference, before), ``b * median(a / b)`` (the ratio, ``eraser.secondorder.never_seen_targets``
  now) and the held-out median alone (no base model). Error against the true ``a`` of a few
  hundred never-trained rows: with the fixed held-out set, and over resampled 12-row sets;
  the mean error per fact kind; targets at or below zero (no NLL gets there).
- **reference attack** scores: ``b - a`` (before), ``log(b / a)`` (``RowScores.member_scores``
  now) and the raw loss ``-a``: how much each still depends on the row's difficulty (rank
  correlation with ``b`` over never-seen rows: 0 is none), its power (the AUC of 3 trained rows
  against 12 never-seen rows, the verdict's size) and its calibration (the AUC of 3 never-seen
  rows of one fact kind against 12 others: 0.5 is right; mean distance from 0.5 over kinds).

Regimes: the tiny Llama the tests use and a tiny Qwen2 (both built on the spot and pre-trained
on other people's facts), SmolLM2-135M-Instruct fine-tuned 3
epochs on 120 rows (as ``bench.scaling``) and 9 epochs on 36 rows (memorised, as
``bench.unlearning``).

    python -m bench.target_calibration [--quick] [--out bench/results]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (bench_parser, framed_caveats, in_workdir, loadavg, machine_info, md_row, output_stem,
                          reading_and_caveats, rendered, write_outputs)

KEYS = ("benchmark", "mode", "device", "machine", "settings", "regimes", "total_seconds", "note", "reading", "caveats")
BEFORE, PRODUCT = "difference (before)", "ratio (the product)"


@dataclass(frozen=True)
class Regime:
    name: str
    model: str  # "tiny" (Llama), "tiny-qwen2" or "smollm2"
    rows: int
    epochs: int
    lr: float


@dataclass(frozen=True)
class Settings:
    regimes: tuple[Regime, ...] = field(default_factory=lambda: (
        Regime("tiny, 10 epochs on 120 rows", "tiny", 120, 10, 1e-2),
        Regime("tiny Qwen2, 10 epochs on 120 rows", "tiny-qwen2", 120, 10, 1e-2),
        Regime("SmolLM2, 3 epochs on 120 rows", "smollm2", 120, 3, 2e-3),
        Regime("SmolLM2, 9 epochs on 36 rows (memorised)", "smollm2", 36, 9, 5e-3),
    ))
    never_rows: int = 300
    holdout_rows: int = 12
    member_rows: int = 3  # erased rows the verdict compares: one person's facts
    draws: int = 200
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(regimes=(Regime("tiny, 2 epochs on 30 rows", "tiny", 30, 2, 1e-2),), never_rows=48, draws=20)


def say(msg: str) -> None:
    print(f"[bench.target_calibration] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the ways compared


def _targets(way: str, base, held_a, held_b):
    from eraser.membership import RowScores
    from eraser.secondorder import never_seen_targets

    if way == BEFORE:
        shift = statistics.median(a - b for a, b in zip(held_a, held_b))
        return [b + shift for b in base]
    held = RowScores(list(held_a), [0.0] * len(held_a), [False] * len(held_a), list(held_b))
    return never_seen_targets(list(base) if way == PRODUCT else None, held, len(base))


TARGET_WAYS = (BEFORE, PRODUCT, "held-out median (no base model)")
SCORE_WAYS = (BEFORE, PRODUCT, "raw loss")


def _scores(way: str, a, b) -> list[float]:
    from eraser.membership import RowScores

    if way == BEFORE:
        return [y - x for x, y in zip(a, b)]
    if way == PRODUCT:
        return RowScores(list(a), [0.0] * len(a), [False] * len(a), list(b)).member_scores("reference")
    return [-x for x in a]


# --------------------------------------------------------------------------- measuring


def _rank(xs) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def _spearman(xs, ys) -> float:
    return statistics.correlation(_rank(xs), _rank(ys))


def _target_errors(never, held, kinds, s: Settings, rng) -> dict:
    out = {}
    for way in TARGET_WAYS:
        t = _targets(way, never["b"], held["a"], held["b"])
        err = [x - y for x, y in zip(t, never["a"])]
        resampled = []
        for _ in range(s.draws):
            pick = set(rng.sample(range(len(never["a"])), s.holdout_rows))
            rest = [i for i in range(len(never["a"])) if i not in pick]
            tt = _targets(way, [never["b"][i] for i in rest], [never["a"][i] for i in pick],
                          [never["b"][i] for i in pick])
            resampled.append(statistics.fmean(abs(x - never["a"][i]) for x, i in zip(tt, rest)))
        resampled.sort()
        out[way] = {"mae": statistics.fmean(abs(e) for e in err), "bias": statistics.fmean(err),
                    "mae_resampled_mean": statistics.fmean(resampled),
                    "mae_resampled_p90": resampled[int(0.9 * (len(resampled) - 1))],
                    "at_or_below_zero": sum(1 for x in t if x <= 0),
                    "bias_by_kind": {k: statistics.fmean(e for e, kk in zip(err, kinds) if kk == k)
                                     for k in sorted(set(kinds))}}
    return out


def _attack_quality(never, members, kinds, s: Settings, rng) -> dict:
    from eraser.membership import auc

    out = {}
    n = len(never["a"])
    for way in SCORE_WAYS:
        sn, sm = _scores(way, never["a"], never["b"]), _scores(way, members["a"], members["b"])
        power = [auc(rng.sample(sm, s.member_rows), rng.sample(sn, s.holdout_rows)) for _ in range(s.draws)]
        by_kind = {}
        for k in sorted(set(kinds)):
            idx = [i for i in range(n) if kinds[i] == k]
            others = [i for i in range(n) if kinds[i] != k]
            if len(idx) < s.member_rows:
                continue
            by_kind[k] = statistics.fmean(
                auc([sn[i] for i in rng.sample(idx, s.member_rows)], [sn[i] for i in rng.sample(others, s.holdout_rows)])
                for _ in range(s.draws))
        out[way] = {"rank_correlation_with_base_nll": _spearman(sn, never["b"]),
                    "member_auc": statistics.fmean(power),
                    "never_seen_auc_by_kind": by_kind,
                    "calibration_error": statistics.fmean(abs(v - 0.5) for v in by_kind.values()),
                    "row_tests": _row_tests(sn, sm, s, rng)}
    return out


def t_p_values(erased: list[float], holdout: list[float]) -> list[float]:
    """Per erased row, the one-sided prediction-interval t-test of one new draw against the
    held-out rows' mean and spread: exact for normal scores, and able to fire on 12 held-out
    rows where the verdict's rank p-values (never below 1/13) cannot."""
    from scipy.stats import t as student_t

    m = len(holdout)
    mean = statistics.fmean(holdout)
    spread = statistics.stdev(holdout) * (1 + 1 / m) ** 0.5
    return [float(student_t.sf((x - mean) / spread, m - 1)) if spread > 0 else 1.0 for x in erased]


def rank_p_values(erased: list[float], holdout: list[float]) -> list[float]:
    """The verdict's own per-row p-values (``eraser.membership.judge_attack``)."""
    from eraser.membership import judge_attack

    return judge_attack("", erased, holdout, 0.75, 0.1).row_p_values


ROW_TESTS = {"rank": rank_p_values, "t": t_p_values}


def _row_tests(never: list[float], members: list[float], s: Settings, rng) -> dict:
    """The verdict's per-row test (Bonferroni over ``member_rows`` rows at 5 %), with its rank
    p-values and with a t-test's: how often it flags a row of ``member_rows`` never-seen rows
    against ``holdout_rows`` others (its false-alarm rate: at most 5 % is what it promises), and
    how often it flags a trained row against never-seen ones (its power)."""
    k, bound = s.member_rows, 0.05 / s.member_rows
    draws = []
    for _ in range(s.draws):
        idx = rng.sample(range(len(never)), k + s.holdout_rows)
        draws.append(([never[i] for i in idx[:k]], [never[i] for i in idx[k:]], rng.sample(members, k)))
    out = {}
    for test, p_values in ROW_TESTS.items():
        alarms = sum(any(p < bound for p in p_values(e, h)) for e, h, _ in draws)
        caught = sum(sum(p < bound for p in p_values(mm, h)) for _, h, mm in draws)
        out[test] = {"false_alarm_rate": alarms / len(draws), "rows_flagged_share": caught / (k * len(draws))}
    return out


def _rows(regime: Regime, s: Settings):
    from bench.scaling import _people_rows

    people = -(-(regime.rows + s.holdout_rows + s.never_rows) // 3)
    drawn = _people_rows(people, 3, s.seed)
    train = drawn[:regime.rows]
    held = drawn[regime.rows:regime.rows + s.holdout_rows]
    never = drawn[regime.rows + s.holdout_rows:regime.rows + s.holdout_rows + s.never_rows]
    return train, held, never


def _base_dir(regime: Regime, rows, workdir: Path, quick: bool) -> Path:
    """SmolLM2, or a tiny base pre-trained as ``bench.scaling``'s (Llama, or Qwen2 for a second
    architecture) on other people's facts."""
    from bench.scaling import ModelPlan, Settings as ScalingSettings, _base

    scaling = ScalingSettings.quick() if quick else ScalingSettings()
    if regime.model in ("tiny", "smollm2"):
        return _base(ModelPlan(regime.model, ()), scaling, rows, [], workdir)[0]
    from bench.common import pretrained_tiny_base
    from bench.scaling import _people_rows

    names = {r.prompt for r in rows}
    others = [r for r in _people_rows(scaling.tiny_pretrain_people, 3, scaling.seed + 1000) if r.prompt not in names]
    return pretrained_tiny_base(workdir / "tiny-base", [r.prompt + " " + r.response for r in rows + others], others,
                                hidden_size=scaling.tiny_hidden, intermediate_size=2 * scaling.tiny_hidden,
                                vocab_size=scaling.tiny_vocab, steps=scaling.tiny_pretrain_steps, seed=scaling.seed,
                                architecture=regime.model.removeprefix("tiny-"))


def _nll(model, tok, rows, dev) -> dict:
    from eraser.losses import row_losses
    from eraser.membership import base_model_nll

    pairs = [(r.prompt, r.response) for r in rows]
    return {"a": row_losses(model, tok, pairs, dev, 32), "b": base_model_nll(model, tok, pairs, dev, 32)}


def run_regime(regime: Regime, s: Settings, dev, workdir: Path, quick: bool) -> dict:
    import random

    from eraser.data import write_rows
    from eraser.model import load_adapter, load_base
    from eraser.train import TrainConfig, train

    started = time.perf_counter()
    train_rows, held_rows, never_rows = _rows(regime, s)
    base_dir = _base_dir(regime, train_rows + held_rows + never_rows, workdir, quick)
    write_rows(workdir / "train.jsonl", train_rows)
    say(f"{regime.name}: training")
    cfg = TrainConfig(rank=8, alpha=16.0, epochs=regime.epochs, lr=regime.lr, batch_size=4, seed=s.seed)
    trained = train(base_dir, workdir / "train.jsonl", workdir / "adapter", cfg, device=str(dev))
    base = load_base(base_dir, dev)
    model = load_adapter(base, workdir / "adapter", trainable=False)
    say(f"{regime.name}: scoring {len(never_rows)} never-seen rows")
    never, held = _nll(model, base.tokenizer, never_rows, dev), _nll(model, base.tokenizer, held_rows, dev)
    members = _nll(model, base.tokenizer, train_rows, dev)
    kinds = [r.id.split("-", 1)[1] for r in never_rows]
    rng = random.Random(s.seed)
    return {"regime": asdict(regime), "train_loss_per_epoch": [round(x, 4) for x in trained["loss_per_epoch"]],
            "rows": {"trained": len(train_rows), "held_out": len(held_rows), "never_seen": len(never_rows)},
            "never_seen_median_nll": {"adapter": statistics.median(never["a"]), "base": statistics.median(never["b"])},
            "targets": _target_errors(never, held, kinds, s, rng),
            "attacks": _attack_quality(never, members, kinds, s, rng),
            "seconds": round(time.perf_counter() - started, 1)}


def run(s: Settings, device: str, quick: bool) -> dict:
    import torch

    started = time.perf_counter()
    dev = torch.device(device)
    regimes = []
    for i, regime in enumerate(s.regimes):
        regimes.append(in_workdir(f"target-calibration-{i}-", lambda wd: run_regime(regime, s, dev, wd, quick)))
    result = {"benchmark": "target_calibration", "mode": "quick" if quick else "full", "device": str(dev),
              "machine": machine_info(dev), "settings": {**asdict(s), "regimes": [asdict(r) for r in s.regimes]},
              "regimes": regimes, "total_seconds": round(time.perf_counter() - started, 1), "note": None}
    result["machine"]["loadavg_end"] = loadavg()
    return result


# --------------------------------------------------------------------------- the report


def _f(x: float, d: int = 3) -> str:
    return f"{x:.{d}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def reading(result: dict) -> list[str]:
    out = []
    for r in result["regimes"]:
        t, a = r["targets"], r["attacks"]
        out.append(f"{r['regime']['name']}: target error (mean absolute, resampled 12-row held-out sets) "
                   f"{_f(t[BEFORE]['mae_resampled_mean'])} nats by difference, {_f(t[PRODUCT]['mae_resampled_mean'])} "
                   f"by ratio; targets at or below zero {t[BEFORE]['at_or_below_zero']} against "
                   f"{t[PRODUCT]['at_or_below_zero']} of {r['rows']['never_seen']}. Reference attack: rank correlation "
                   f"with the base NLL {_f(a[BEFORE]['rank_correlation_with_base_nll'], 2)} against "
                   f"{_f(a[PRODUCT]['rank_correlation_with_base_nll'], 2)}, member AUC "
                   f"{_f(a[BEFORE]['member_auc'])} against {_f(a[PRODUCT]['member_auc'])}, calibration error "
                   f"{_f(a[BEFORE]['calibration_error'])} against {_f(a[PRODUCT]['calibration_error'])}.")
    out += _row_test_reading(result)
    return out


def _row_test_reading(result: dict) -> list[str]:
    """The per-row test on the product's score: what rank p-values do at this size, what a t-test would."""
    tests = [r["attacks"][PRODUCT].get("row_tests") for r in result["regimes"]]
    if not all(tests):
        return []
    s = result["settings"]
    alarms = [t["t"]["false_alarm_rate"] for t in tests]
    worst = max(range(len(tests)), key=lambda i: alarms[i])
    return [f"Per-row test on the product's score ({s['member_rows']} rows against {s['holdout_rows']} held-out, "
            f"Bonferroni at 5 %): the verdict's rank p-values flagged no row in any regime, trained or never-seen "
            f"(they never go below 1/{s['holdout_rows'] + 1}). A t prediction test would flag "
            + ", ".join(f"{_f(t['t']['rows_flagged_share'], 2)}" for t in tests)
            + " of trained rows, but raise a false alarm on never-seen rows in "
            + ", ".join(f"{_f(x, 2)}" for x in alarms)
            + f" of draws (regimes in the order above), up to {_f(alarms[worst], 2)} on "
            f"{result['regimes'][worst]['regime']['name']}"
            + (": above the 0.05 it promises (the scores are not normal enough at this size), so the verdict keeps "
               "its rank test, which cannot fire at this size (stated in the README)." if alarms[worst] > 0.05 else
               ": within the 0.05 it promises in every regime.")]


def caveats(result: dict) -> list[str]:
    return framed_caveats(result, [
        "Synthetic facts (devtools.synthetic): 8 fact kinds, so 'by kind' is the difficulty a real dataset's "
        "topics would vary; the never-seen rows are other people of the same generator.",
        "The truth is the adapter's NLL on rows it never saw, at the original adapter; after an erase the "
        "held-out rows move with the adapter and the product recomputes the targets from them (eraser/forget.py).",
        "One adapter per regime (seed 0); the resampled errors vary the held-out set, not the training run."],
        "tiny sizes", "regimes")


def markdown(result: dict) -> str:
    lines = ["# Never-seen targets and the reference attack: ratio against difference "
             f"({result['mode']}, {result['device']})", "",
             f"{result['machine'].get('cpu_model') or result['machine']['processor']}, torch {result['machine']['torch']}; total "
             f"{result['total_seconds']} s. Every figure is measured in this run.", ""]
    for r in result["regimes"]:
        lines += [f"## {r['regime']['name']}", "",
                  f"{r['rows']['trained']} trained rows, {r['rows']['held_out']} held-out rows, "
                  f"{r['rows']['never_seen']} never-seen rows (median NLL adapter "
                  f"{_f(r['never_seen_median_nll']['adapter'])}, base {_f(r['never_seen_median_nll']['base'])}).", "",
                  md_row(["target", "MAE (fixed held-out)", "MAE resampled mean", "p90", "bias",
                          "targets <= 0", "bias by kind"]),
                  md_row(["---"] + ["---:"] * 5 + ["---"])]
        for way, t in r["targets"].items():
            kinds = ", ".join(f"{k} {v:+.2f}" for k, v in t["bias_by_kind"].items())
            lines.append(md_row([way, _f(t["mae"]), _f(t["mae_resampled_mean"]), _f(t["mae_resampled_p90"]),
                                 f"{t['bias']:+.3f}", t["at_or_below_zero"], kinds]))
        lines += ["", md_row(["attack score", "rank corr. with base NLL", "member AUC (3 vs 12)",
                              "calibration error", "never-seen AUC by kind", "row test: false alarms rank / t",
                              "trained rows flagged rank / t"]),
                  md_row(["---"] + ["---:"] * 3 + ["---", "---:", "---:"])]
        for way, a in r["attacks"].items():
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in a["never_seen_auc_by_kind"].items())
            rt = a.get("row_tests") or {}
            cell = lambda key: " / ".join(_f(rt[t][key], 2) for t in ("rank", "t")) if rt else "—"  # noqa: E731
            lines.append(md_row([way, _f(a["rank_correlation_with_base_nll"], 2), _f(a["member_auc"]),
                                 _f(a["calibration_error"]), kinds, cell("false_alarm_rate"), cell("rows_flagged_share")]))
        lines.append("")
    return "\n".join(lines + reading_and_caveats(result)) + "\n"


def finish(result: dict, out: Path, quick: bool) -> None:
    result["reading"], result["caveats"] = reading(result), caveats(result)
    write_outputs(result, out, output_stem("target_calibration", result["device"], quick), KEYS, markdown, say)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("target_calibration", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    if args.render is not None:
        result = rendered(args)
        finish(result, args.out, result["mode"] == "quick")
        return 0
    from eraser.process import passive_openmp_waits, quiet_libraries

    passive_openmp_waits()
    quiet_libraries()
    settings = Settings.quick() if args.quick else Settings()
    result = run(settings, args.device, args.quick)
    result["note"] = args.note
    finish(result, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The factor cache: EK-FAC/K-FAC factors on disk, keyed by what they were fitted on.

A cache directory holds ``manifest.json`` (the key: method and its configuration, the
base model's fingerprint, the adapter's SHA-256, the training set's hash, the encoding
length; plus its history: full fit or downdates since) and the factors themselves
(``eraser.kfac.KFAC.save``). A directory whose key differs from the caller's is refused
with the first difference named: factors of another adapter would silently give a wrong
update. Directories are written under a temporary name and renamed, so a reader sees a
whole cache or none.

Downdating moves factors from one adapter version to the next without a refit (removed
rows out, edited rows in, at the parent's parameters); what it cannot follow is the
parameter change of the erase itself and, for EK-FAC, the rotation of the eigenbasis.
``needs_refit`` bounds that drift by the share of rows changed since the last full fit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from .data import EncodedRows, Row, text_sha256
from .errors import EraserError, InvalidRequestError
from .kfac import KFAC, KFACConfig
from .options import DEFAULT_REFIT_FRACTION
from .reports import FactorUse

FORMAT = 1
MANIFEST = "manifest.json"


class FactorMismatchError(EraserError):
    """Cached factors were fitted on something else than what the caller asks about."""

    code = "failed_precondition"


def dataset_hash(rows: Sequence[Row]) -> str:
    return text_sha256("\n".join(r.id + "\x00" + r.sha256() for r in rows))


@dataclass(frozen=True)
class FactorKey:
    """Everything the factors depend on; two caches are interchangeable iff keys are equal."""

    config: KFACConfig
    base_model_fingerprint: str
    adapter_sha256: str
    dataset_sha256: str
    max_length: int

    def to_json(self) -> dict:
        return {"format": FORMAT, **self.config.identity(), "base_model_fingerprint": self.base_model_fingerprint,
                "adapter_sha256": self.adapter_sha256, "dataset_sha256": self.dataset_sha256,
                "max_length": self.max_length}


@dataclass
class FactorHistory:
    """How the factors came to match their key: a full fit, then downdates."""

    fitted_at: float = field(default_factory=time.time)
    fitted_rows: int = 0
    changed_rows: int = 0  # removed + added since the full fit
    downdates: int = 0
    fit_seconds: float = 0.0
    ranks: int = 1  # processes that shared the full fit (eraser.distributed); the factors are the same

    @property
    def changed_fraction(self) -> float:
        return self.changed_rows / max(self.fitted_rows, 1)

    def needs_refit(self, refit_fraction: float = DEFAULT_REFIT_FRACTION) -> bool:
        return self.changed_fraction > refit_fraction


@dataclass
class CachedFactors:
    factors: KFAC
    key: FactorKey
    history: FactorHistory


def row_keys(rows: Sequence[Row]) -> list[str]:
    """Each row's sampling key is its content hash: an edited row samples afresh."""
    return [r.id + ":" + r.sha256() for r in rows]


def fit(model, params, tokenizer, rows: Sequence[Row], key: FactorKey, device, progress=None) -> CachedFactors:
    from .progress import silent

    started = time.perf_counter()
    data = EncodedRows.from_rows(tokenizer, rows, key.max_length)
    factors = KFAC.fit(model, params, data, list(range(len(rows))), key.config, device, row_keys(rows), progress or silent)
    history = FactorHistory(fitted_rows=len(rows), fit_seconds=time.perf_counter() - started)
    return CachedFactors(factors, key, history)


def downdate(cached: CachedFactors, model, params, tokenizer, removed: Sequence[Row], added: Sequence[Row],
             new_key: FactorKey, device) -> CachedFactors:
    """The factors for ``new_key`` from those of its parent, at the parent's parameters
    (``model`` must still hold them). The parent's object is consumed."""
    enc = lambda rows: EncodedRows.from_rows(tokenizer, rows, new_key.max_length) if rows else None  # noqa: E731
    cached.factors.downdate(model, params, enc(removed), row_keys(removed), enc(added), row_keys(added), device)
    h = cached.history
    history = FactorHistory(h.fitted_at, h.fitted_rows, h.changed_rows + len(removed) + len(added), h.downdates + 1,
                            h.fit_seconds, h.ranks)
    return CachedFactors(cached.factors, new_key, history)


def save(cached: CachedFactors, directory: str | os.PathLike) -> Path:
    """Write the cache atomically; an existing directory is replaced whole."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        cached.factors.save(tmp)
        h = cached.history
        manifest = {"key": cached.key.to_json(), "history": {
            "fitted_at": h.fitted_at, "fitted_rows": h.fitted_rows, "changed_rows": h.changed_rows,
            "downdates": h.downdates, "fit_seconds": h.fit_seconds, "ranks": h.ranks}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_cache(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"{directory} is not a readable factor cache ({type(e).__name__})") from None


def mismatch(found: dict, wanted: FactorKey) -> str | None:
    """The first difference between a cache's key and the wanted one, in words."""
    want = wanted.to_json()
    labels = {"format": "format", "method": "method", "samples": "samples per row", "seed": "sampling seed",
              "base_model_fingerprint": "base model", "adapter_sha256": "adapter",
              "dataset_sha256": "training set", "max_length": "max_length"}
    for k, label in labels.items():
        if found.get(k) != want[k]:
            short = lambda v: v[:12] + "…" if isinstance(v, str) and len(v) > 16 else v  # noqa: E731
            return f"{label} differs (cached {short(found.get(k))}, wanted {short(want[k])})"
    return None


def load(directory: str | os.PathLike, wanted: FactorKey, device="cpu") -> CachedFactors:
    """The cache in ``directory`` if it was fitted for ``wanted``; refuses otherwise."""
    manifest = read_manifest(directory)
    why = mismatch(manifest.get("key", {}), wanted)
    if why:
        raise FactorMismatchError(f"factors in {directory} do not match this erase: {why}; "
                                  "use another --factors directory or delete this one to refit")
    try:
        factors = KFAC.load(Path(directory), device)
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise InvalidRequestError(f"factor cache {directory} is damaged ({type(e).__name__}); delete it to refit") from None
    h = manifest.get("history", {})
    known = {f.name for f in fields(FactorHistory)}  # a newer writer may record more
    return CachedFactors(factors, wanted, FactorHistory(**{k: v for k, v in h.items() if k in known}))


def age_seconds(directory: str | os.PathLike) -> float | None:
    """Seconds since the factors' last full fit, or None without a cache."""
    if not is_cache(directory):
        return None
    return max(0.0, time.time() - float(read_manifest(directory).get("history", {}).get("fitted_at", time.time())))


def check_params(factors: KFAC, params: Sequence[torch.nn.Parameter]) -> None:
    shapes = [tuple(p.shape) for p in params]
    if [tuple(s) for s in factors.shapes] != shapes:
        raise FactorMismatchError("cached factors have another parameter layout than this adapter")


@dataclass
class FactorPlan:
    """What ``eraser.unlearn.erase`` does with a factor cache, stage by stage.

    ``source``: the cache for the input adapter (used when its key matches, fitted and
    written when the directory is absent or empty, refused otherwise). ``out``: where
    the factors for the output adapter go (downdated, or refitted past the threshold).
    """

    config: KFACConfig
    source: Path | None
    out: Path | None
    refit_fraction: float = DEFAULT_REFIT_FRACTION
    report: FactorUse | None = None  # set once the factors are read or fitted

    @classmethod
    def check(cls, solver, source, out, refit_fraction: float = DEFAULT_REFIT_FRACTION,
              sample_rows: int | None = None) -> "FactorPlan | None":
        """Validate before anything is computed; None when no cache is involved."""
        from .errors import OutputExistsError
        from .solvers import FactoredSolver

        if source is None and out is None:
            return None
        if not isinstance(solver, FactoredSolver) or solver.name == "datainf":
            raise InvalidRequestError("a factor cache (--factors) needs --solver ekfac or kfac")
        if sample_rows is not None:
            raise InvalidRequestError("cached factors cover every training row; drop --curvature-rows")
        if not 0 < refit_fraction <= 1:
            raise InvalidRequestError("refit_fraction must be in (0, 1]")
        source = Path(source) if source is not None else None
        if source is not None and source.exists() and not is_cache(source) and (not source.is_dir() or any(source.iterdir())):
            raise InvalidRequestError(f"{source} exists and is not a factor cache")
        out = Path(out) if out is not None else None
        if out is not None and out.exists():
            raise OutputExistsError(f"factor output already exists: {out}")
        return cls(solver.kfac_config(), source, out, refit_fraction)

    def key(self, base_fingerprint: str, adapter_sha: str, rows: Sequence[Row], max_length: int) -> FactorKey:
        return FactorKey(self.config, base_fingerprint, adapter_sha, dataset_hash(rows), max_length)

    def prepare(self, model, params, tokenizer, rows, key: FactorKey, device, progress=None) -> CachedFactors:
        if self.source is not None and is_cache(self.source):
            cached = load(self.source, key, device)
            check_params(cached.factors, params)
            self.report = FactorUse("cache", age_seconds=round(time.time() - cached.history.fitted_at, 1))
            return cached
        cached = fit(model, params, tokenizer, rows, key, device, progress)
        self.report = FactorUse("fitted", fit_seconds=round(cached.history.fit_seconds, 3))
        if self.source is not None:
            save(cached, self.source)
        return cached

    def downdate(self, cached: CachedFactors, model, params, tokenizer, removed: Sequence[Row],
                 added: Sequence[Row], device) -> CachedFactors | None:
        """Move the factors to the edited rows; call while ``model`` holds the parent's
        parameters (before the update is applied). None when no output is wanted."""
        if self.out is None:
            return None
        started = time.perf_counter()
        moved = downdate(cached, model, params, tokenizer, removed, added, cached.key, device)
        self.report = replace(self.report, downdate_seconds=round(time.perf_counter() - started, 3))
        return moved

    def write(self, moved: CachedFactors, model, params, tokenizer, edited_rows: Sequence[Row], new_key: FactorKey,
              device, progress=None) -> None:
        """Write the factors for the output adapter: the downdated ones, or a full refit at
        the new parameters once the rows changed since the last fit pass the threshold."""
        if self.out is None or moved is None:
            return
        if moved.history.needs_refit(self.refit_fraction):
            refit = fit(model, params, tokenizer, edited_rows, new_key, device, progress)
            self.report = replace(self.report, out_action="refitted", refit_seconds=round(refit.history.fit_seconds, 3),
                                  changed_fraction=round(moved.history.changed_fraction, 4))
            moved = refit
        else:
            moved = CachedFactors(moved.factors, new_key, moved.history)
            self.report = replace(self.report, out_action="downdated",
                                  changed_fraction=round(moved.history.changed_fraction, 4))
        save(moved, self.out)
        self.report = replace(self.report, out=str(self.out))

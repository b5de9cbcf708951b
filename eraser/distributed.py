"""The factor fit across processes: EK-FAC/K-FAC sums sharded over torch.distributed ranks.

The factors (``eraser.kfac``) are sums over training rows, in two passes: the Kronecker
sums (A, G, tokens, rows), their eigendecomposition, then for EK-FAC the eigenvalue sums in
that basis. Each rank takes whole batches of the rows (batch k of the one-process order
goes to rank k mod N, so every batch holds the same rows, padded alike, as in a
one-process fit), and ``KFAC.fit`` adds the sums over ranks after each pass; rank 0's
eigenbasis is used by all. Every rank ends with the factors of all the rows, equal to the
one-process fit up to the order of floating-point additions; each row's sampled labels are
keyed by the row itself, so sharding does not change them.

Rank 0 writes the cache with ``eraser.factors.save`` under the key a one-process fit has
(the same base model, adapter, rows and configuration), so the two are interchangeable;
the manifest's history records how many ranks fitted it.

Two ways to start the ranks:

- ``fit_factors(job, nproc=N)`` spawns N processes on this machine, joined on loopback:
  gloo on CPU, NCCL when ``job.device`` is CUDA and every rank has its own GPU. With
  ``nproc=1`` it is the one-process fit, in this process (``spawn=True`` forces one rank
  in a process group, as the benchmark measures).
- A launcher such as ``torchrun`` started every rank (RANK, WORLD_SIZE, MASTER_ADDR and
  MASTER_PORT in the environment): ``fit_launched(job)`` in each.

A failing rank fails the fit and nothing is written: a spawned rank records its error, the
parent stops the others and raises it as one line, naming the rank. Every wait of the
process group has a timeout (``FitJob.timeout``), so a rank left waiting for a dead or
stuck peer ends too.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from .errors import BaseModelError, EraserError, InvalidRequestError, OutputExistsError
from .kfac import KFAC, KFACConfig
from .progress import Progress, silent

LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 600.0  # seconds a rank waits for the others at one reduction
GRACE = 5.0  # seconds the other ranks get to end on their own once one failed
LAUNCHER_ENV = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class FitJob:
    """What every rank needs to fit the factor cache of one adapter (picklable)."""

    base: str
    adapter: str
    data: str
    out: str
    config: KFACConfig = field(default_factory=KFACConfig)
    max_length: int = 512
    device: str = "cpu"
    timeout: float = DEFAULT_TIMEOUT


class RankError(EraserError):
    """A rank refused its input (bad adapter, data, base model): the rank's own error, by code."""

    def __init__(self, message: str, code: str = "invalid_argument"):
        super().__init__(message)
        self.code = code


class RankFailedError(RuntimeError):
    """A rank failed for another reason than bad input (a bug, a lost peer, a signal)."""


# --------------------------------------------------------------------------- sharding and reducing


def shard(n_rows: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The row indices of ``rank``: whole batches, batch k to rank k mod ``world``."""
    return [i for i in range(n_rows) if (i // batch_size) % world == rank]


class GroupReducer:
    """``eraser.kfac.Reducer`` over the default process group; tensors travel on ``device``
    (CPU for gloo, this rank's GPU for NCCL) and are copied back in place."""

    def __init__(self, device: torch.device):
        self.device = device

    def sum_(self, t: torch.Tensor) -> None:
        self._run(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))

    def broadcast_(self, t: torch.Tensor) -> None:
        self._run(t, lambda x: dist.broadcast(x, src=0))

    def _run(self, t: torch.Tensor, op) -> None:
        if t.device == self.device:
            op(t)
        else:
            moved = t.to(self.device)
            op(moved)
            t.copy_(moved)


def _backend(device: torch.device) -> tuple[str, torch.device]:
    """The backend for ranks on ``device`` and where its collectives' tensors live."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl", device
    return "gloo", torch.device("cpu")


def _rank_device(device: str, local_rank: int, local_world: int) -> torch.device:
    from .model import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None and local_world > 1:
        raise InvalidRequestError(f"--device {device} names one GPU; with {local_world} ranks give --device cuda "
                                  "(each rank takes its own GPU)")
    index = dev.index if dev.index is not None else local_rank
    if index >= torch.cuda.device_count():
        raise InvalidRequestError(f"rank {local_rank} needs GPU {index}, this machine has {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def _agree(key, reduce: GroupReducer, world: int) -> None:
    """Refuse (on every rank at once) when ranks read different inputs: a shared file
    system that differs between machines would otherwise give factors of nothing."""
    digest = hashlib.sha256(json.dumps(key.to_json(), sort_keys=True).encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.float64)
    first = mine.clone()
    reduce.broadcast_(first)
    differs = torch.tensor([float(not torch.equal(mine, first))], dtype=torch.float64)
    reduce.sum_(differs)
    if differs.item() > 0:
        from .factors import FactorMismatchError

        raise FactorMismatchError(f"{int(differs.item())} of {world} ranks read another base model, adapter, training set "
                                  "or configuration than rank 0")


# --------------------------------------------------------------------------- one rank's work


def check(job: FitJob, nproc: int | None = 1):
    """Validate before any process starts or anything is loaded; return the rows."""
    from .data import load_rows
    from .model import check_adapter_dir, resolve_device

    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise InvalidRequestError(f"--nproc must be a whole number >= 1 (got {nproc})")
    if not job.timeout > 0:
        raise InvalidRequestError(f"--timeout must be > 0 seconds (got {job.timeout:g})")
    if job.max_length < 8:
        raise InvalidRequestError("max_length must be >= 8")
    if Path(job.out).exists():
        raise OutputExistsError(f"factor output already exists: {job.out}")
    if not Path(job.base).is_dir():
        raise BaseModelError(f"base model not found: {job.base}")
    check_adapter_dir(job.adapter)
    resolve_device(job.device)  # CUDA asked for where there is none: refused here, not in every rank
    return load_rows(job.data)


def _fit_rank(job: FitJob, rank: int, world: int, dev: torch.device, reduce: GroupReducer | None,
              progress: Progress) -> dict:
    """Load, fit this rank's shard (all the rows without ``reduce``), and on rank 0 write the cache."""
    from . import factors as fx
    from .data import EncodedRows, load_rows
    from .model import adapter_fingerprint, load_adapter, load_base, trainable_parameters

    started = time.perf_counter()
    rows = load_rows(job.data)
    progress("load", 0, 1)
    base = load_base(job.base, dev)
    model = load_adapter(base, job.adapter, trainable=True)
    params = [p for _, p in trainable_parameters(model)]
    key = fx.FactorKey(job.config, base.fingerprint, adapter_fingerprint(job.adapter), fx.dataset_hash(rows),
                       job.max_length)
    progress("load", 1, 1)
    if reduce is None:
        cached = fx.fit(model, params, base.tokenizer, rows, key, dev, progress)  # the one-process fit
    else:
        _agree(key, reduce, world)
        fit_started = time.perf_counter()
        mine = [rows[i] for i in shard(len(rows), job.config.batch_size, rank, world)]
        data = EncodedRows.from_rows(base.tokenizer, mine, job.max_length)
        factors = KFAC.fit(model, params, data, list(range(len(mine))), job.config, dev, fx.row_keys(mine), progress,
                           reduce=reduce)
        history = fx.FactorHistory(fitted_rows=len(rows), fit_seconds=time.perf_counter() - fit_started, ranks=world)
        cached = fx.CachedFactors(factors, key, history)
    report = {"rank": rank, "ranks": world, "rows": len(rows), "method": job.config.method,
              "blocks": len(cached.factors.blocks), "parameters": cached.factors.n,
              "fit_seconds": round(cached.history.fit_seconds, 3), "key": key.to_json()}
    if rank == 0:
        if Path(job.out).exists():
            raise OutputExistsError(f"factor output already exists: {job.out}")
        fx.save(cached, job.out)
        report["out"] = str(job.out)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


# --------------------------------------------------------------------------- starting the ranks


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of a group."""
    return all(k in os.environ for k in LAUNCHER_ENV)


def fit_factors(job: FitJob, nproc: int = 1, progress: Progress = silent, spawn: bool | None = None) -> dict:
    """Fit and write the factor cache of ``job`` with ``nproc`` processes on this machine.

    ``nproc=1`` (and ``spawn`` not True) is the one-process fit, here. Returns rank 0's
    report: out, rows, ranks, method, fit_seconds, seconds, key."""
    check(job, nproc)
    if nproc == 1 and not spawn:
        started = time.perf_counter()
        from .model import resolve_device

        report = _fit_rank(job, 0, 1, resolve_device(job.device), None, progress)
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report
    return spawn_ranks(job, nproc, progress)


def fit_launched(job: FitJob, nproc: int | None = None, progress: Progress = silent) -> dict | None:
    """This process's part when a launcher started the ranks; rank 0's report, None elsewhere."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if nproc is not None and nproc != world:
        raise InvalidRequestError(f"--nproc {nproc} differs from the launcher's WORLD_SIZE {world} (omit --nproc)")
    if not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT")):
        raise InvalidRequestError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: start the ranks "
                                  "with torchrun, or unset RANK and WORLD_SIZE and give --nproc")
    check(job, None)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = _rank_device(job.device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    backend, wire = _backend(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=job.timeout))
    report = _fit_rank(job, rank, world, dev, GroupReducer(wire), progress if rank == 0 else silent)
    _leave_group()  # only after success: a failed rank just exits, the launcher ends the rest
    return report if rank == 0 else None


class _QueueProgress:
    """Rank 0's progress, sent to the parent (which owns the bar or the job status)."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, stage: str, done: int, total: int, info: dict | None = None) -> None:
        self.queue.put((stage, done, total))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + "…" if len(text) > 500 else text


def _spawned_rank(rank: int, world: int, port: int, job: FitJob, rundir: str, queue, threads: int | None,
                  work) -> None:
    """The body of one spawned rank: join the group, do ``work``, record the outcome in ``rundir``."""
    from .process import quiet_libraries

    quiet_libraries()
    if threads is not None:
        torch.set_num_threads(threads)
    record = Path(rundir) / f"rank-{rank}.json"
    try:
        dev = _rank_device(job.device, rank, world)
        backend, wire = _backend(dev)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=job.timeout)
        store = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        progress = _QueueProgress(queue) if rank == 0 else silent
        report = work(job, rank, world, dev, GroupReducer(wire), progress)
        _write_json(record, {"ok": True, "report": report})
    except BaseException as e:  # noqa: BLE001 - every failure is recorded for the parent
        _write_json(record, {"ok": False, "at": time.time(), "type": type(e).__name__, "message": _one_line(e),
                             "eraser": isinstance(e, EraserError), "code": getattr(e, "code", None)})
        if os.environ.get("ERASER_DEBUG"):
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no teardown: a peer may be gone, and the parent ends the rest
    queue.cancel_join_thread()
    _leave_group()


def _leave_group() -> None:
    """Wait for every rank, then tear the group down: a rank that destroyed its gloo group while
    a peer was still in its last collective aborted at exit (std::terminate in a joinable thread)."""
    dist.barrier()
    dist.destroy_process_group()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _threads_per_rank(nproc: int) -> int | None:
    if "OMP_NUM_THREADS" in os.environ:
        return None  # the user's choice wins
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // nproc)


def spawn_ranks(job: FitJob, nproc: int, progress: Progress = silent, work=None) -> dict:
    """Start ``nproc`` ranks on this machine, wait for all of them or the first failure, stop
    the rest; rank 0's report. ``work(job, rank, world, device, reducer, progress) -> dict``
    is what each rank does once in the group (default: fit its shard, rank 0 writes the
    cache); a picklable module-level function."""
    work = _fit_rank if work is None else work
    if torch.device(job.device).type == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise InvalidRequestError(f"{nproc} ranks on CUDA need {nproc} GPUs, this machine has "
                                  f"{torch.cuda.device_count()} (fewer --nproc, or --device cpu)")
    ctx = multiprocessing.get_context("spawn")
    timeout = timedelta(seconds=job.timeout)
    store = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=timeout)  # a free port, held
    queue = ctx.Queue()
    rundir = Path(tempfile.mkdtemp(prefix="eraser-fit-ranks-"))
    threads = _threads_per_rank(nproc) if torch.device(job.device).type == "cpu" else None
    procs: list = []
    try:
        for rank in range(nproc):
            p = ctx.Process(target=_spawned_rank, args=(rank, nproc, store.port, job, str(rundir), queue, threads,
                                                        work), name=f"eraser-fit-rank-{rank}")
            p.start()
            procs.append(p)
        failed_at = None
        while True:
            _drain(queue, progress)
            codes = [p.exitcode for p in procs]
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE:
                break
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
        _drain(queue, progress)
    finally:
        _stop(procs)
        outcomes = {}
        for rank in range(len(procs)):
            path = rundir / f"rank-{rank}.json"
            if path.is_file():
                outcomes[rank] = json.loads(path.read_text())
        shutil.rmtree(rundir, ignore_errors=True)
        queue.close()
        del store
    codes = [p.exitcode for p in procs]
    if all(c == 0 for c in codes) and all(outcomes.get(r, {}).get("ok") for r in range(nproc)):
        return outcomes[0]["report"]
    raise _failure(outcomes, codes, nproc)


def _drain(queue, progress: Progress) -> None:
    import queue as queue_module

    while True:
        try:
            stage, done, total = queue.get_nowait()
        except (queue_module.Empty, EOFError, OSError):
            return
        progress(stage, done, total)


def _stop(procs) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    for p in procs:
        p.join(5)
        if p.exitcode is None:
            p.kill()
            p.join()


def _failure(outcomes: dict, codes: Sequence[int | None], nproc: int) -> Exception:
    """The first rank's error (the others mostly lost their peer after it), as one line."""
    errors = sorted((o["at"], rank, o) for rank, o in outcomes.items() if not o.get("ok"))
    if errors:
        _, rank, o = errors[0]
        if o["eraser"]:
            return RankError(f"rank {rank} of {nproc}: {o['message']}", o["code"] or "internal")
        return RankFailedError(f"rank {rank} of {nproc} failed: {o['type']}: {o['message']}")
    for rank, code in enumerate(codes):
        if code not in (0, None) and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return RankFailedError(f"rank {rank} of {nproc} was killed by {name} (out of memory?)")
        if code not in (0, None):
            return RankFailedError(f"rank {rank} of {nproc} exited with status {code}")
    return RankFailedError(f"the {nproc} ranks ended without a result")

"""The factor fit across processes (``eraser.distributed``): ranks that each fit a shard of
the rows and add their sums give the one-process factors, the cache they write is the one
``erase --factors`` takes, and a failing or stuck rank ends the fit with one line, never a hang.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import write_json
from eraser import distributed as dd
from eraser import factors as fx
from eraser.cli import main
from eraser.data import EncodedRows
from eraser.errors import InvalidRequestError
from eraser.kfac import KFAC, KFACConfig
from eraser.model import load_adapter, load_base, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]
# Processes must end well within this; a hang fails the test instead of blocking the suite.
BOUND = 300


def _job(tiny_base, tiny_adapter, train_file, out, **kw) -> dd.FitJob:
    return dd.FitJob(str(tiny_base), str(tiny_adapter), str(train_file), str(out), **kw)


def _probes(n: int, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(count)]


def assert_same_factors(one: KFAC, many: KFAC, rtol: float = 1e-6) -> None:
    """The sums directly; the basis-dependent parts through what they are used for, the
    solve and the product (a basis is only defined up to sign/rotation)."""
    assert [b.name for b in one.blocks] == [b.name for b in many.blocks]
    assert one.shapes == many.shapes and one.config.identity() == many.config.identity()
    for b1, b2 in zip(one.blocks, many.blocks):
        assert b1.rows == b2.rows and b1.tokens == b2.tokens
        torch.testing.assert_close(b2.A, b1.A, rtol=rtol, atol=rtol * float(b1.A.abs().max()))
        torch.testing.assert_close(b2.G, b1.G, rtol=rtol, atol=rtol * float(b1.G.abs().max()))
        e1, e2 = b1.eigen.flatten().sort().values, b2.eigen.flatten().sort().values
        torch.testing.assert_close(e2, e1, rtol=1e-5, atol=1e-5 * float(e1.abs().max()))
    scale = max(float(b.eigen.max()) for b in one.blocks)
    for v in _probes(one.n):
        for damping in (0.1 * scale, scale):
            x1, x2 = one.solve(v, damping), many.solve(v, damping)
            assert float((x1 - x2).norm() / x1.norm()) < 1e-5
        y1, y2 = one.matvec(v), many.matvec(v)
        assert float((y1 - y2).norm() / y1.norm()) < 1e-5


# --------------------------------------------------------------------------- sharding and the reduction


def test_shards_are_whole_batches_that_cover_every_row_once():
    for n, batch, world in ((20, 4, 2), (21, 4, 3), (5, 4, 3), (1, 4, 2), (20, 1, 7)):
        shards = [dd.shard(n, batch, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        for r, s in enumerate(shards):
            assert all((i // batch) % world == r for i in s)  # batch k to rank k mod N: batches stay whole
    assert dd.shard(5, 4, 2, 3) == []  # more ranks than batches: a rank may have nothing to fit


class ThreadReducer:
    """``eraser.kfac.Reducer`` between threads of this process: the reduction without torch.distributed."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world, timeout=BOUND)

    def rank(self, r: int):
        outer = self

        class One:
            def sum_(self, t):
                outer._exchange(r, t, lambda slots: sum(slots[1:], slots[0].clone()))

            def broadcast_(self, t):
                outer._exchange(r, t, lambda slots: slots[0])

        return One()

    def _exchange(self, r, t, combine):
        self.slots[r] = t.clone()
        self.barrier.wait()
        value = combine(self.slots)
        self.barrier.wait()  # everyone has read before the next exchange writes
        t.copy_(value)


@pytest.fixture(scope="module")
def loaded(tiny_base, tiny_adapter, train_rows):
    base = load_base(tiny_base)
    model = load_adapter(base, tiny_adapter, trainable=True)
    return base, model


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_reduced_shards_equal_the_whole_fit_in_threads(loaded, train_rows, method):
    """KFAC.fit's reduction on its own: 3 shards (one of them empty) added between threads."""
    base, model = loaded
    config = KFACConfig(eigen_correction=method == "ekfac", batch_size=10)  # 2 batches for 3 ranks
    params = [p for _, p in trainable_parameters(model)]
    whole = KFAC.fit(model, params, EncodedRows.from_rows(base.tokenizer, train_rows), list(range(len(train_rows))),
                     config, keys=fx.row_keys(train_rows))
    world, reducer, out, errors = 3, ThreadReducer(3), {}, []

    def rank(r):
        try:
            m = copy.deepcopy(model)  # each rank its own modules (the fit hooks them)
            p = [q for _, q in trainable_parameters(m)]
            mine = [train_rows[i] for i in dd.shard(len(train_rows), config.batch_size, r, world)]
            data = EncodedRows.from_rows(base.tokenizer, mine)
            out[r] = KFAC.fit(m, p, data, list(range(len(mine))), config, keys=fx.row_keys(mine), reduce=reducer.rank(r))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            reducer.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert not errors and len(out) == world
    assert dd.shard(len(train_rows), config.batch_size, 2, world) == []
    for r in range(world):  # every rank ends with the factors of all the rows
        assert out[r].rows == whole.rows == len(train_rows)
        assert_same_factors(whole, out[r], rtol=1e-9)
    with pytest.raises(InvalidRequestError, match="at least one row"):  # without a reduction, no rows is an error
        KFAC.fit(model, params, EncodedRows.from_rows(base.tokenizer, train_rows), [], config)


# --------------------------------------------------------------------------- ranks in processes (gloo)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_two_gloo_ranks_equal_the_one_process_fit(tiny_base, tiny_adapter, train_file, tmp_path, method):
    config = KFACConfig(eigen_correction=method == "ekfac")
    one = dd.fit_factors(_job(tiny_base, tiny_adapter, train_file, tmp_path / "one", config=config), nproc=1)
    two = dd.fit_factors(_job(tiny_base, tiny_adapter, train_file, tmp_path / "two", config=config), nproc=2)
    assert one["ranks"] == 1 and two["ranks"] == 2 and one["rows"] == two["rows"] == 20
    assert one["key"] == two["key"] and two["out"] == str(tmp_path / "two")
    m1, m2 = fx.read_manifest(tmp_path / "one"), fx.read_manifest(tmp_path / "two")
    assert m1["key"] == m2["key"] and m1["key"]["method"] == method  # interchangeable caches
    assert m1["history"]["ranks"] == 1 and m2["history"]["ranks"] == 2 and m2["history"]["fitted_rows"] == 20
    assert_same_factors(KFAC.load(tmp_path / "one"), KFAC.load(tmp_path / "two"))
    assert not list(tmp_path.glob(".*tmp"))  # rank 0's atomic write left nothing behind


def test_cli_two_ranks_writes_the_cache_erase_takes(tiny_base, tiny_adapter, train_file, tmp_path, capsys):
    cache = tmp_path / "factors"
    assert main(["--quiet", "fit-factors", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
                 "--data", str(train_file), "--out", str(cache), "--nproc", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ranks"] == 2 and summary["method"] == "ekfac" and summary["out"] == str(cache)
    assert fx.read_manifest(cache)["history"]["ranks"] == 2

    request = write_json(tmp_path / "r.json", {"remove": ["born-ann"]})
    assert main(["--quiet", "erase", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--data",
                 str(train_file), "--request", str(request), "--out", str(tmp_path / "a1"), "--solver", "ekfac",
                 "--damping", "10", "--damping-scale", "absolute", "--verify", "off", "--factors", str(cache),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["factors"]["source"] == "cache"  # accepted under erase's own key: nothing refitted

    # The same erase with a one-process cache gives the same update.
    single = tmp_path / "factors-1"
    assert main(["--quiet", "fit-factors", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
                 "--data", str(train_file), "--out", str(single), "--nproc", "1"]) == 0
    assert "fitted by 1 process in" in capsys.readouterr().out
    assert main(["--quiet", "erase", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--data",
                 str(train_file), "--request", str(request), "--out", str(tmp_path / "a2"), "--solver", "ekfac",
                 "--damping", "10", "--damping-scale", "absolute", "--verify", "off", "--factors", str(single),
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["factors"]["source"] == "cache"
    assert abs(again["affected_loss_after"] - report["affected_loss_after"]) < 1e-5


def test_torchrun_launch_fits_the_same_cache(tiny_base, tiny_adapter, train_file, tmp_path):
    """Ranks started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR from its environment)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "eraser", "--quiet",
                           "fit-factors", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
                           "--data", str(train_file), "--out", str(tmp_path / "tr"), "--method", "kfac", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["ranks"] == 2  # rank 0 reports; rank 1 prints nothing
    assert fx.read_manifest(tmp_path / "tr")["history"]["ranks"] == 2
    dd.fit_factors(_job(tiny_base, tiny_adapter, train_file, tmp_path / "one", config=KFACConfig(eigen_correction=False)))
    assert fx.read_manifest(tmp_path / "tr")["key"] == fx.read_manifest(tmp_path / "one")["key"]
    assert_same_factors(KFAC.load(tmp_path / "one"), KFAC.load(tmp_path / "tr"))


# --------------------------------------------------------------------------- failures: one line, no hang


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "eraser", "--quiet", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BOUND)


def test_a_failing_rank_is_one_line_and_nothing_is_written(tiny_base, tiny_adapter, train_file, tmp_path):
    """A real fault in the ranks: adapter weights that are damaged (the files the parent
    checks are there; loading them fails in every rank)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    proc = _cli("fit-factors", "--base", tiny_base, "--adapter", broken, "--data", train_file,
                "--out", tmp_path / "f", "--nproc", "2")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eraser fit-factors: error: rank ")
    assert "of 2: corrupt adapter weights" in err[0]
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.*"))


def _fail_in_rank_1(job, rank, world, dev, reduce, progress):
    """Rank 0 waits in a reduction while rank 1 fails."""
    if rank == 1:
        time.sleep(0.5)
        raise RuntimeError("injected failure of rank 1")
    reduce.sum_(torch.ones(3, dtype=torch.float64))
    return {"rank": rank}


def _stuck_in_rank_1(job, rank, world, dev, reduce, progress):
    """Rank 1 never reaches the reduction; rank 0 waits for it until the group's timeout."""
    if rank == 1:
        time.sleep(3600)
    reduce.sum_(torch.ones(3, dtype=torch.float64))
    return {"rank": rank}


def test_a_rank_failing_while_another_waits_in_a_reduction(tmp_path):
    job = dd.FitJob("base", "adapter", "data", str(tmp_path / "f"), timeout=120)
    with pytest.raises(dd.RankFailedError) as raised:
        dd.spawn_ranks(job, 2, work=_fail_in_rank_1)
    message = str(raised.value)
    assert message == "rank 1 of 2 failed: RuntimeError: injected failure of rank 1" and "\n" not in message


def test_a_stuck_rank_ends_at_the_group_timeout(tmp_path):
    job = dd.FitJob("base", "adapter", "data", str(tmp_path / "f"), timeout=3)
    with pytest.raises(dd.RankFailedError) as raised:
        dd.spawn_ranks(job, 2, work=_stuck_in_rank_1)
    assert str(raised.value).startswith("rank 0 of 2 failed: ") and "\n" not in str(raised.value)


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_bad_nproc_is_one_line_and_writes_nothing(tiny_base, tiny_adapter, train_file, tmp_path, capsys, nproc):
    code = main(["--quiet", "fit-factors", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--data",
                 str(train_file), "--out", str(tmp_path / "f"), "--nproc", nproc])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--nproc must be at least 1" in err[0]
    assert not (tmp_path / "f").exists()
    with pytest.raises(InvalidRequestError, match="--nproc"):
        dd.fit_factors(_job(tiny_base, tiny_adapter, train_file, tmp_path / "f"), nproc=int(nproc))


def test_bad_inputs_are_refused_before_any_rank_starts(tiny_base, tiny_adapter, train_file, tmp_path, capsys,
                                                       monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    args = ["--quiet", "fit-factors", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--data",
            str(train_file), "--nproc", "2"]
    cases = [
        (["--out", str(taken)], "already exists"),
        (["--out", str(tmp_path / "f"), "--adapter", str(tmp_path / "none")], "adapter not found"),
        (["--out", str(tmp_path / "f"), "--data", str(tmp_path / "none.jsonl")], "dataset not found"),
        (["--out", str(tmp_path / "f"), "--samples", "0"], "samples and batch_size"),
        (["--out", str(tmp_path / "f"), "--timeout", "0"], "--timeout must be > 0"),
    ]
    if not torch.cuda.is_available():  # asked for CUDA where there is none: refused before the ranks start
        cases.append((["--out", str(tmp_path / "f"), "--device", "cuda"], "CUDA is not available"))
    for extra, words in cases:
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / "f").exists()
    # Launched by torchrun: --nproc must agree with its WORLD_SIZE, and its rendezvous must be there.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(args + ["--out", str(tmp_path / "f")]) == 2
    assert "differs from the launcher's WORLD_SIZE 1" in capsys.readouterr().err
    assert main(args[:-2] + ["--out", str(tmp_path / "f")]) == 2
    assert "MASTER_ADDR/MASTER_PORT are not" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


# --------------------------------------------------------------------------- the benchmark at its quick size


def test_bench_factor_fit_quick(tmp_path):
    """``python -m bench.factor_fit --quick``: every way measured, its outputs written, the
    distributed caches equal to the one-process one (no assert on which is faster)."""
    proc = subprocess.run([sys.executable, "-m", "bench.factor_fit", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "factor_fit-quick.json").read_text())
    md = (tmp_path / "factor_fit-quick.md").read_text()
    assert result["mode"] == "quick" and not result["partial"]
    assert [(r["way"], r["nproc"]) for r in result["runs"]] == [("one process", 1), ("ranks", 1), ("ranks", 2)]
    for r in result["runs"]:
        assert r["fit_seconds"] > 0 and r["wall_seconds"] >= r["fit_seconds"]
    s = result["summary"]["tiny"]
    assert set(s["ways"]) == {"one process", "1 rank", "2 ranks"}
    for c in s["against_one_process"].values():
        assert c["counts_equal"] and c["A_max_rel_diff"] < 1e-9 and c["solve_max_rel_diff"] < 1e-6
    assert "| 2 ranks |" in md and "ideal on 2 cores: 2x" in md and "under load" in md


# --------------------------------------------------------------------------- in the sidecar

def test_the_sidecar_fits_a_large_training_set_over_ranks(tmp_path, tiny_base, tiny_adapter, train_file, caplog):
    """factor_fit_processes: a training set of at least 2 x factor_fit_min_rows rows is fitted
    in the background over 2 gloo ranks; the cache equals the one-process fit to rounding and
    erases read it as any other."""
    from eraser_proto.eraser.v1 import eraser_pb2 as pb
    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
    from sidecar.config import SidecarConfig
    from sidecar.factors import kfac_config
    from sidecar.server import start
    from sidecar_util import register, wait_job

    import grpc

    caplog.set_level("INFO", logger="eraser.sidecar")
    running = start(SidecarConfig(store=tmp_path / "store", grpc_port=0, metrics_port=0, drain_seconds=2.0,
                                  factor_fit_processes=2, factor_fit_min_rows=10))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "ranked", tiny_base, tiny_adapter, train_file)  # 20 rows: 2 ranks
            cache = tmp_path / "store" / "factors" / "ranked" / "1" / "ekfac"
            deadline = time.monotonic() + 300
            while not (cache / "manifest.json").is_file():
                assert time.monotonic() < deadline, "no factors within 300 s"
                time.sleep(0.2)
            assert "fitting the factors of ranked v1 (ekfac) in the background over 2 processes" in caplog.text
            dd.fit_factors(_job(tiny_base, tiny_adapter, train_file, tmp_path / "one", config=kfac_config("ekfac")))
            assert_same_factors(KFAC.load(tmp_path / "one"), KFAC.load(cache))
            job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="ranked", remove_ids=["born-ann"],
                                                            options=pb.EraseOptions(solver="ekfac", verify="off"))).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            assert job.report.factor_source == "cache" and job.report.factor_version == 1
    finally:
        running.stop(2.0)
    assert not list((tmp_path / "store" / "staging").iterdir()), "the ranks' staging was moved or removed"

"""A pool of compute sidecars on one PostgreSQL job database and one shared store: real
sidecar processes (python -m sidecar.cli), a real PostgreSQL (devtools/pg.py), the tiny
model. Every request is served exactly once, versions stay sequential per adapter, adapters
run in parallel on different workers; a killed worker's job is taken over after its lease;
a paused worker cannot publish once its lease is gone."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from eraser_proto.eraser.v1 import eraser_pb2 as pb
from devtools.pool import PoolWorker, running_on
from sidecar_util import register, wait_job

CG = pb.EraseOptions(solver="cg", damping=0.1, max_iterations=100, tolerance=1e-3)
LEASE = 3.0


def slow(iterations: int) -> pb.EraseOptions:
    """A solve that runs all its iterations (a tolerance it never reaches): seconds to kill in."""
    return pb.EraseOptions(solver="sqm", damping=0.1, max_iterations=iterations, tolerance=1e-12,
                           allow_unconverged=True)


@pytest.fixture
def pool(tmp_path, postgres):
    jobs = postgres.new_database(uri=True)
    started: list[PoolWorker] = []

    def spawn(n: int) -> list[PoolWorker]:
        new = [PoolWorker(tmp_path / "store", jobs, tmp_path / f"worker-{len(started) + i}.log", LEASE)
               for i in range(n)]
        started.extend(new)
        return [w.ready() for w in new]

    spawn.jobs = jobs
    yield spawn
    for w in started:
        w.stop(graceful=False)
    for w in started:
        assert b"Traceback" not in w.log.read_bytes(), w.log.read_text()[-3000:]


def _rows(stub, adapter: str) -> int:
    return stub.GetAdapter(pb.GetAdapterRequest(name=adapter)).rows


def _versions(jobs: str) -> dict[str, list[tuple[int, str]]]:
    with psycopg.connect(jobs) as c:
        out: dict[str, list] = {}
        for adapter, number, job in c.execute("SELECT adapter, number, job_id FROM versions ORDER BY adapter, number"):
            out.setdefault(adapter, []).append((number, job))
        return out


def test_three_workers_serve_thirty_requests_over_six_adapters(pool, tiny_base, tiny_adapter, train_file):
    workers = pool(3)
    adapters = [f"pool-{i}" for i in range(6)]
    for i, name in enumerate(adapters):
        register(workers[i % 3].stub, name, tiny_base, tiny_adapter, train_file)
    names = ["ann", "bob", "cid", "dee", "eve"]
    sent = {}  # request id -> job id
    for k in range(5):
        for i, name in enumerate(adapters):
            rid = f"{name}-{k}"
            stub = workers[(i + k) % 3].stub
            sent[rid] = stub.Erase(pb.EraseRequest(adapter=name, request_id=rid, remove_ids=[f"born-{names[k]}"],
                                                   options=CG)).id
    jobs = {j: wait_job(workers[0].stub, j, timeout=600) for j in set(sent.values())}
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in jobs.values()), [j.error for j in jobs.values()]
    for rid, job_id in sent.items():  # every request in exactly one job, which served it
        assert [j.id for j in jobs.values() if rid in j.request_ids] == [job_id]
        assert workers[1].stub.Erase(pb.EraseRequest(adapter=rid.rsplit("-", 1)[0], request_id=rid,
                                                     remove_ids=[f"born-{names[int(rid[-1])]}"], options=CG)).id == job_id
    versions = _versions(pool.jobs)
    for name in adapters:
        mine = sorted((j for j in jobs.values() if j.adapter == name), key=lambda j: j.to_version)
        assert [(j.from_version, j.to_version) for j in mine] == [(v, v + 1) for v in range(1, len(mine) + 1)]
        assert versions[name] == [(j.to_version, j.id) for j in mine], "each version published once, in order"
        assert _rows(workers[2].stub, name) == 20 - 5
    # Adapters in parallel: some two jobs overlapped in time, on different workers.
    ran_by = {j: next(i for i, w in enumerate(workers) if w.ran(j)) for j in jobs}
    spans = [(j.started_at.ToSeconds() + j.started_at.nanos / 1e9, j.finished_at.ToSeconds() + j.finished_at.nanos / 1e9,
              j.id) for j in jobs.values()]
    overlapping = [(a, b) for a in spans for b in spans if a[2] < b[2] and a[0] < b[1] and b[0] < a[1]
                   and ran_by[a[2]] != ran_by[b[2]]]
    assert overlapping, "no two jobs ran at once on different workers"
    assert len(set(ran_by.values())) >= 2


def _slow_job(workers, name: str, iterations: int, base, adapter, data):
    """Register ``name``, start a long solve on it; (job id, the worker solving it, the other)."""
    register(workers[0].stub, name, base, adapter, data)
    job_id = workers[0].stub.Erase(pb.EraseRequest(adapter=name, request_id=f"{name}-1", remove_ids=["born-ann"],
                                                   options=slow(iterations))).id
    holder = running_on(workers, job_id, workers[0].stub)
    return job_id, holder, next(w for w in workers if w is not holder)


def test_a_killed_workers_job_is_taken_over_after_its_lease(pool, tiny_base, tiny_adapter, train_file, tmp_path):
    job_id, victim, survivor = _slow_job(pool(2), "killed", 400, tiny_base, tiny_adapter, train_file)
    assert list((tmp_path / "store" / "staging").glob(f"job-{job_id}*")), "the victim staged its version"
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(30)
    killed_at = time.monotonic()
    for job in survivor.stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=300):
        if job.attempts == 2 and job.state == pb.JOB_STATE_RUNNING:
            takeover = time.monotonic() - killed_at
            break
    assert takeover >= LEASE - 1.0, "taken over before the lease could expire"
    assert survivor.ran(job_id)
    done = wait_job(survivor.stub, job_id, timeout=600)
    assert done.state == pb.JOB_STATE_SUCCEEDED and (done.from_version, done.to_version, done.attempts) == (1, 2, 2)
    assert _versions(pool.jobs) == {"killed": [(2, job_id)]}
    assert _rows(survivor.stub, "killed") == 19
    assert not list((tmp_path / "store" / "staging").glob(f"job-{job_id}*")), "the dead worker's staging is cleaned"


def test_a_paused_worker_cannot_publish_after_its_lease(pool, tiny_base, tiny_adapter, train_file):
    job_id, sleeper, other = _slow_job(pool(2), "paused", 150, tiny_base, tiny_adapter, train_file)
    sleeper.proc.send_signal(signal.SIGSTOP)
    try:
        done = wait_job(other.stub, job_id, timeout=600)  # taken over after the lease, run to the end
    finally:
        sleeper.proc.send_signal(signal.SIGCONT)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempts == 2 and other.ran(job_id)
    # The paused worker wakes up holding a finished job: it stops without publishing.
    deadline = time.monotonic() + 60
    while f"job {job_id} stopped" not in sleeper.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    text = sleeper.log.read_text()
    assert f"job {job_id} stopped" in text and f"job {job_id} published" not in text, text[-2000:]
    assert _versions(pool.jobs) == {"paused": [(2, job_id)]}
    adapter = other.stub.GetAdapter(pb.GetAdapterRequest(name="paused"))
    assert (adapter.version, adapter.rows) == (2, 19)
    assert sleeper.proc.poll() is None, "the paused worker lives on and serves"
    assert sleeper.stub.GetJob(pb.GetJobRequest(id=job_id)).state == pb.JOB_STATE_SUCCEEDED


def test_postgresql_restarted_during_a_job(pool, postgres, tiny_base, tiny_adapter, train_file):
    """Every session ends mid-solve; the job still completes (on its worker, or taken over
    after the lease) or fails with a reason, and no request is lost."""
    workers = pool(2)
    register(workers[0].stub, "restarted", tiny_base, tiny_adapter, train_file)
    first = workers[0].stub.Erase(pb.EraseRequest(adapter="restarted", request_id="pr1", remove_ids=["born-ann"],
                                                  options=slow(150))).id
    running_on(workers, first, workers[0].stub)
    behind = workers[1].stub.Erase(pb.EraseRequest(adapter="restarted", request_id="pr2", remove_ids=["born-bob"],
                                                   options=CG)).id
    postgres.restart()
    ended = [wait_job(workers[i % 2].stub, j, timeout=600) for i, j in enumerate((first, behind))]
    for job in ended:
        assert job.state == pb.JOB_STATE_SUCCEEDED or (job.state == pb.JOB_STATE_FAILED and job.error.message), job
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in ended), [j.error.message for j in ended]
    numbers = [n for n, _ in _versions(pool.jobs)["restarted"]]
    assert numbers == list(range(2, 2 + len(numbers))) and _rows(workers[0].stub, "restarted") == 18
    for rid, job_id in (("pr1", first), ("pr2", behind)):  # both requests kept their jobs
        assert workers[1].stub.Erase(pb.EraseRequest(adapter="restarted", request_id=rid,
                                                     remove_ids=["born-ann" if rid == "pr1" else "born-bob"],
                                                     options=slow(150) if rid == "pr1" else CG)).id == job_id

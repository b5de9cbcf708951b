"""A pool of computing sidecar processes on one PostgreSQL job database and one store, for the
tests and the worker-pool benchmark: each ``PoolWorker`` is ``python -m sidecar.cli`` with
``ERASER_JOBS`` set, a gRPC stub to it, and its log (which names the jobs it started)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PoolWorker:
    def __init__(self, store: Path, jobs: str, log: Path, lease_seconds: float, **env: str):
        import grpc

        from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc

        self.port, self.log = free_port(), log
        environ = {**os.environ, "ERASER_STORE": str(store), "ERASER_GRPC_PORT": str(self.port),
                   "ERASER_METRICS_PORT": "0", "ERASER_JOBS": jobs, "ERASER_LEASE_SECONDS": str(lease_seconds), **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli"], env=environ, stderr=log.open("ab"),
                                     stdout=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.EraserStub(self.channel)

    def ready(self, timeout: float = 180) -> "PoolWorker":
        """Wait until it serves; RuntimeError (with its log's tail) if it exits or takes too long."""
        import grpc

        future = grpc.channel_ready_future(self.channel)
        deadline = time.monotonic() + timeout
        while not future.done():
            if self.proc.poll() is not None:
                raise RuntimeError(f"a worker exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"a worker did not start within {timeout:g} s")
            time.sleep(0.2)
        return self

    def ran(self, job_id: str) -> bool:
        return f"job {job_id} started" in self.log.read_text(errors="replace")

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (drain) then, or at once without ``graceful``, SIGKILL."""
        self.channel.close()
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)  # a paused worker cannot drain
        if graceful:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait(30)


def running_on(workers: list[PoolWorker], job_id: str, stub, timeout: float = 300) -> PoolWorker:
    """Wait until the job solves (its fraction past 0); the worker whose log says it started it."""
    from eraser_proto.eraser.v1 import eraser_pb2 as pb

    for job in stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=timeout):
        if job.stage.startswith("solve") and job.fraction > 0:
            break
    return next(w for w in workers if w.ran(job_id))

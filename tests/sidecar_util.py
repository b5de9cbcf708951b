"""Calls the sidecar tests make on a running server: register an adapter, follow a job."""

from __future__ import annotations

from eraser_proto.eraser.v1 import eraser_pb2 as pb


def register(stub, name, base, adapter, data) -> pb.Adapter:
    return stub.RegisterAdapter(pb.RegisterAdapterRequest(name=name, base_model=str(base), adapter_path=str(adapter),
                                                          dataset_path=str(data)))


def wait_job(stub, job_id, timeout=120) -> pb.Job:
    """The job as its WatchJob stream last showed it (its terminal state)."""
    last = None
    for job in stub.WatchJob(pb.GetJobRequest(id=job_id), timeout=timeout):
        last = job
    return last

"""``eraser-sidecar``: serve the erase API next to vLLM.

Every flag is also an ``ERASER_<NAME>`` environment variable and a key of the YAML file
given by ``--config``; flags win over the environment, which wins over the file.
SIGTERM or SIGINT drains: new RPCs are refused, a running job gets ``drain_seconds`` to
finish and otherwise resumes on the next start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from eraser.process import passive_openmp_waits, quiet_libraries
from eraser.errors import EraserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eraser-sidecar", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file of settings (env ERASER_CONFIG)")
    p.add_argument("--store", help="store directory: adapter versions and the job database (env ERASER_STORE)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 9464)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--listen-host", help="gRPC address to bind (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--metrics-host", help="metrics address to bind (default 127.0.0.1)")
    p.add_argument("--keep-versions", type=int, help="versions kept per adapter for rollback (default 2); older ones "
                   "still hold erased data, so this is a privacy setting")
    p.add_argument("--role", choices=["compute", "reconcile"],
                   help="compute (default): run erase jobs; reconcile: only keep the replicas at the current versions")
    p.add_argument("--jobs", help="job database: empty for SQLite in the store (default), or a postgresql:// URI "
                   "shared by a pool of compute sidecars (env ERASER_JOBS)")
    p.add_argument("--lease-seconds", type=float, help="a pool worker's lease on its job (default 30 s)")
    p.add_argument("--vllm-url", dest="vllm_urls", action="append", metavar="URL",
                   help="a vLLM replica's base URL, e.g. http://127.0.0.1:8000 (repeat for several; env ERASER_VLLM_URLS, "
                        "comma-separated)")
    p.add_argument("--import-root", dest="import_roots", action="append", metavar="DIR",
                   help="RegisterAdapter reads adapters and datasets only under this directory (repeat for several; env "
                        "ERASER_IMPORT_ROOTS, ':'-separated); none: any path outside the store")
    p.add_argument("--max-watches", type=int, help="open WatchJob (and reflection) streams in all (default 1000)")
    p.add_argument("--max-watches-per-client", type=int,
                   help="open WatchJob streams per client address (default 100); beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--max-health-watches", type=int,
                   help="open health Watch streams in all (default 100; they need no token)")
    p.add_argument("--token-file", help="require this bearer token (env ERASER_TOKEN holds the token itself)")
    p.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="... and this private key (PEM)")
    p.add_argument("--tls-client-ca", help="mutual TLS: require client certificates signed by this CA")
    p.add_argument("--receipt-key", help="sign erasure receipts with this Ed25519 private key (PKCS#8 PEM; "
                                          "default: the store's own key, created once)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_openmp_waits()  # before torch loads: vLLM shares these cores
    quiet_libraries()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .config import load_config
    from .server import start

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "log_level")}
    try:
        config = load_config(overrides, args.config)
        running = start(config)
    except EraserError as e:
        print(f"eraser-sidecar: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"eraser-sidecar: error: {e}", file=sys.stderr)
        return 1
    print(f"eraser-sidecar: ready on {running.target} (metrics on port {running.metrics_port})", file=sys.stderr, flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait keeps signal delivery prompt
        pass
    logging.getLogger("eraser.sidecar").info("signal received: draining (up to %.0f s)", config.drain_seconds)
    running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

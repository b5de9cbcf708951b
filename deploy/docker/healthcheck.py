#!/usr/bin/env python3
"""eraser-healthcheck: ask the sidecar's grpc.health.v1 service; exit 0 when SERVING.

The container image's HEALTHCHECK, and the Kubernetes exec probe where the gRPC port
serves TLS (the kubelet's built-in gRPC probe speaks plaintext only).

    eraser-healthcheck [--service NAME] [--address HOST:PORT] [--tls-ca FILE] [--tls-name NAME]

Defaults come from the sidecar's own environment: ERASER_GRPC_PORT (50051), and TLS is
used when ERASER_TLS_CERT is set (trusting --tls-ca, else that certificate itself).
Health is exempt from the bearer token, so no token is needed.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eraser-healthcheck")
    p.add_argument("--service", default="", help='"" (process), eraser.v1.Eraser, or eraser.serving')
    p.add_argument("--address", default=f"127.0.0.1:{os.environ.get('ERASER_GRPC_PORT') or 50051}")
    p.add_argument("--tls-ca", default=os.environ.get("ERASER_HEALTH_TLS_CA") or os.environ.get("ERASER_TLS_CERT"))
    p.add_argument("--tls-name", default=os.environ.get("ERASER_HEALTH_TLS_NAME"),
                   help="name the server certificate is for (default: the address's host)")
    p.add_argument("--plaintext", action="store_true", help="ignore the TLS settings")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca and not args.plaintext:
        with open(args.tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = [("grpc.ssl_target_name_override", args.tls_name)] if args.tls_name else []
        channel = grpc.secure_channel(args.address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.address)
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"eraser-healthcheck: {args.address} {args.service!r}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"eraser-healthcheck: {args.address} {args.service!r}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

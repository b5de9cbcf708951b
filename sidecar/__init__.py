"""The gRPC sidecar around the eraser engine (see the sidecar issue)."""

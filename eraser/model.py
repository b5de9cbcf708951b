"""Loading base models and PEFT adapters, fingerprints, and atomic adapter writes.

Influence needs second derivatives through attention, and PyTorch's fused CPU attention
kernels have no double backward: models are loaded with eager attention.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, BaseModelError, BaseModelMismatchError, OutputExistsError

ERASER_META = "eraser.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Config keys that describe how a checkpoint was saved, not what the model is.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {device} requested but CUDA is not available")
    return dev


_fingerprint_cache: dict[tuple, str] = {}
# transformers and PEFT build models under a process-wide "meta device" context; two
# threads loading at once (a job and the sidecar's swap probe) left one model with meta
# tensors ("Cannot copy out of meta tensor"). Loads take this lock; computing does not.
MODEL_LOADING = threading.RLock()


def base_fingerprint(base_dir: str | os.PathLike) -> str:
    """SHA-256 identifying a base model: its architecture config and its weight bytes.

    Two checkpoints of one architecture share a config, so the weights are hashed too;
    the result is cached per (path, size, mtime) because hashing 0.5 GB takes a second.
    """
    base = Path(base_dir)
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"base model not found (no config.json): {base}")
    weight_files = sorted(p for p in base.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    key = (str(base.resolve()),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files)
    if key in _fingerprint_cache:
        return _fingerprint_cache[key]
    cfg = json.loads(cfg_path.read_text())
    canonical = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode())
    for p in weight_files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    _fingerprint_cache[key] = h.hexdigest()
    return _fingerprint_cache[key]


def adapter_fingerprint(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 of an adapter's config and weights: the identity of one adapter version."""
    d = Path(adapter_dir)
    h = hashlib.sha256()
    for name in ("adapter_config.json",) + ADAPTER_WEIGHTS:
        p = d / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class LoadedBase:
    model: nn.Module
    tokenizer: object
    fingerprint: str
    path: Path


def load_base(base_dir: str | os.PathLike, device: torch.device | str = "cpu", dtype=torch.float32) -> LoadedBase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base_dir)
    fp = base_fingerprint(base)
    try:
        with MODEL_LOADING:
            tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=dtype)
    except Exception as e:  # transformers raises many types; the user needs one line
        raise BaseModelError(f"cannot load base model from {base}: {type(e).__name__}: {e}") from e
    model.to(device)
    model.eval()  # no dropout anywhere: influence assumes a deterministic loss
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBase(model, tokenizer, fp, base)


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    p = Path(adapter_dir) / ERASER_META
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"corrupt {ERASER_META} in adapter {adapter_dir}") from None


def check_adapter_dir(adapter_dir: str | os.PathLike) -> dict:
    """Validate an adapter directory's files before anything is loaded; return its config."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"adapter not found: {d}")
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"not a PEFT adapter (no adapter_config.json): {d}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"corrupt adapter_config.json in {d}") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise AdapterError(f"adapter_config.json in {d} has no peft_type")
    if not any((d / w).is_file() for w in ADAPTER_WEIGHTS):
        raise AdapterError(f"adapter {d} has no weights file ({' or '.join(ADAPTER_WEIGHTS)})")
    return cfg


def _adapter_file_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    st = adapter_dir / "adapter_model.safetensors"
    try:
        if st.is_file():
            from safetensors import safe_open

            with safe_open(str(st), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        sd = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in sd.items()}
    except Exception as e:
        raise AdapterError(f"corrupt adapter weights in {adapter_dir}: {type(e).__name__}") from None


def load_adapter(base: LoadedBase, adapter_dir: str | os.PathLike, trainable: bool = True) -> nn.Module:
    """Attach a PEFT adapter to the base model; refuse adapters made for another base."""
    from peft import PeftModel, get_peft_model_state_dict

    d = Path(adapter_dir)
    check_adapter_dir(d)
    meta = read_adapter_meta(d)
    recorded = meta.get("base_model_fingerprint")
    if recorded and recorded != base.fingerprint:
        raise BaseModelMismatchError(
            f"adapter {d} was trained on base model {recorded[:12]}, not on {base.path} ({base.fingerprint[:12]})"
        )
    file_shapes = _adapter_file_shapes(d)
    try:
        with MODEL_LOADING:
            model = PeftModel.from_pretrained(base.model, d, is_trainable=trainable)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise BaseModelMismatchError(f"adapter {d} does not fit base model {base.path}: tensor shapes differ") from None
        raise AdapterError(f"cannot load adapter {d}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise BaseModelMismatchError(f"adapter {d} targets modules the base model {base.path} does not have") from None
        raise AdapterError(f"cannot load adapter {d}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise AdapterError(f"cannot load adapter {d}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    # PEFT only warns when saved tensors do not match the model; a mismatch means the
    # adapter belongs to another architecture, and silently ignoring it would be wrong.
    model_keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if set(model_keys) != set(file_shapes) or any(model_keys[k] != file_shapes[k] for k in file_shapes if k in model_keys):
        base.model = _strip_peft(model)
        raise BaseModelMismatchError(f"adapter {d} does not match base model {base.path}: its tensors differ from the model's")
    model.eval()
    return model


def _strip_peft(model: nn.Module) -> nn.Module:
    try:
        return model.unload()
    except Exception:
        return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise AdapterError("the adapter exposes no trainable parameters")
    return params


def save_adapter_atomically(model: nn.Module, out_dir: str | os.PathLike, meta: dict) -> Path:
    """Write a PEFT adapter (safetensors) and its eraser.json into a new directory.

    The directory is assembled under a temporary name beside the target and renamed at
    the end, so a reader sees either nothing or a complete adapter. An existing target is
    never replaced: adapter versions are immutable.
    """
    out = Path(out_dir)
    if out.exists():
        raise OutputExistsError(f"output already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / ERASER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, out)  # atomic on one filesystem; fails if out appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

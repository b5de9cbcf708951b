"""Erasure receipts: a signed record of one erase that can be checked without the sidecar.

A receipt is canonical JSON (``canonical``: sorted keys, no insignificant whitespace, ASCII
escapes) signed with the sidecar's Ed25519 key (``ReceiptSigner``; ``secrets/receipt-signing.key``
in the store, created with it, owner-only, never overwritten). It holds ids, keyed row hashes,
version numbers, scores and times, never row text. ``verify_file`` checks a receipt file (what
``erasectl receipt --out`` writes) against a pinned public key.

No torch, engine or store imports here: ``erasectl verify-receipt`` needs this module only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from eraser.keyfile import create_once

if TYPE_CHECKING:
    from .job_model import Job

FORMAT = "eraser.erasure-receipt/v1"
ALGORITHM = "ed25519"


class ReceiptInvalid(ValueError):
    """A receipt file that does not verify: bad signature, other key, changed or malformed content."""


def canonical(obj) -> bytes:
    """The bytes a receipt's signature covers. NaN and infinity are refused: JSON has none."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def timestamp(seconds: float | None) -> str | None:
    """RFC 3339 in UTC, microseconds: readable in a compliance file, exact enough to order events."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def finite(value):
    """``value`` with non-finite floats as null (scores can be infinite; canonical JSON cannot)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class SignedReceipt:
    body: bytes  # canonical JSON of the receipt
    signature: bytes
    public_key_pem: str
    key_id: str

    def to_file(self) -> str:
        """The receipt file: the receipt (as JSON, readable), its signature and the key's id."""
        return json.dumps({"receipt": json.loads(self.body), "algorithm": ALGORITHM, "key_id": self.key_id,
                           "signature": base64.b64encode(self.signature).decode()}, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class ReceiptSigner:
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    @property
    def public_key_pem(self) -> str:
        return public_pem(self.public_key)

    def sign(self, receipt: dict) -> SignedReceipt:
        body = canonical(receipt)
        return SignedReceipt(body, self.private_key.sign(body), self.public_key_pem, self.key_id)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "ReceiptSigner":
        """The key in ``path`` (PKCS#8 PEM), created owner-only when absent and never
        overwritten: receipts issued earlier must keep verifying with the pinned key."""
        path = Path(path)
        if not path.exists():
            create_once(path, Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cls.load(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReceiptSigner":
        """The key in ``path`` (PKCS#8 PEM, unencrypted); ValueError if it is not an Ed25519 one."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the receipt signing key {path} is not a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"the receipt signing key {path} is not an Ed25519 private key")
        return cls(key)


# ---- the receipt's content -----------------------------------------------------------------


def serving_record(job: "Job", replicas_configured: bool) -> dict:
    """When each replica was confirmed serving the job's version. "unconfirmed" when a replica
    fell behind, or replicas exist but the job recorded no check (finished by recovery)."""
    replicas = [{"replica": c["replica"], "served_path": c["served_path"], "served_at": timestamp(c.get("served_at")),
                 "max_logprob_error": c["max_logprob_error"]} for c in job.swap_checks]
    if job.replicas_behind or (replicas_configured and not replicas) or any(r["served_at"] is None for r in replicas):
        status = "unconfirmed"
    else:
        status = "confirmed" if replicas else "no serving replicas configured"
    return {"status": status, "replicas": replicas, "behind": list(job.replicas_behind)}


def build_receipt(job: "Job", *, row_hash: dict, current_version: int, holding_versions: list[int],
                  holding_factors: list[dict], payload_rows: int, deleted: list[dict], replicas_configured: bool,
                  signing_key_id: str, issued_at: float) -> dict:
    """The receipt of a SUCCEEDED job, from its record and what the store holds now.

    ``deleted``: versions published before the job's (which held the erased rows unless an
    earlier erase had taken them out) that are gone, with when and how (purge, retention).
    """
    from .report import JobReport, as_json

    report = job.report or JobReport()
    return finite({
        "format": FORMAT,
        "issued_at": timestamp(issued_at),
        "signing_key_id": signing_key_id,
        "job_id": job.id,
        "adapter": job.adapter,
        "request_ids": list(job.request_ids),
        "created_at": timestamp(job.created_at),
        "finished_at": timestamp(job.finished_at),
        "from_version": job.from_version,
        "to_version": job.to_version,
        "current_version": current_version,
        "adapter_sha256": report.engine.adapter_sha256 if report.engine else None,
        "edits": [{k: e[k] for k in ("id", "kind", "old_hash", "new_hash") if k in e} for e in job.edits],
        "already_erased_ids": list(job.already_erased),
        "row_hash": row_hash,
        "verification": as_json(report.verification),
        "utility": as_json(report.utility),
        "serving": serving_record(job, replicas_configured),
        "still_holding": {"versions": holding_versions, "factor_caches": holding_factors, "payload_rows": payload_rows},
        "deleted": deleted,
        "purged_at": next((d["deleted_at"] for d in reversed(deleted) if d["how"] == "purge"), None),
        # finish() deletes the job's payloads in the transaction that ends it.
        "payloads_deleted_at": timestamp(job.finished_at) if payload_rows == 0 else None,
    })


# ---- offline verification ------------------------------------------------------------------


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise ReceiptInvalid("the public key is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptInvalid("the public key is not an Ed25519 key")
    return key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # A repeated key would show a reader one value while the parser checks another.
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ReceiptInvalid("the receipt file repeats a key")
    return dict(pairs)


def verify_file(text: str | bytes, public_key: Ed25519PublicKey) -> dict:
    """The receipt in a receipt file, once its signature verified with ``public_key`` and its
    content names that key; else ``ReceiptInvalid`` with a one-line reason."""
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ReceiptInvalid("not a receipt file (not JSON)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("receipt"), dict) or not isinstance(doc.get("signature"), str):
        raise ReceiptInvalid("not a receipt file (needs receipt and signature)")
    if doc.get("algorithm") != ALGORITHM:
        raise ReceiptInvalid(f"unsupported signature algorithm {str(doc.get('algorithm'))[:40]!r}")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        body = canonical(doc["receipt"])
    except (binascii.Error, ValueError):
        raise ReceiptInvalid("the signature or the receipt is malformed") from None
    try:
        public_key.verify(signature, body)
    except InvalidSignature:
        raise ReceiptInvalid(f"the signature does not verify with key {key_id_of(public_key)}: the receipt was "
                             "changed, or signed with another key") from None
    receipt = doc["receipt"]
    if receipt.get("format") != FORMAT:
        raise ReceiptInvalid(f"unknown receipt format {str(receipt.get('format'))[:40]!r}")
    if receipt.get("signing_key_id") != key_id_of(public_key):
        raise ReceiptInvalid("the receipt names another signing key than the one it verified with")
    return receipt

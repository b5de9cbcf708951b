"""A job and the requests it serves, as both job stores keep them (``sidecar.jobs`` for
SQLite, ``sidecar.pg_jobs`` for PostgreSQL): the types and the rules for merging edits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum

from eraser.rowhash import RowHasher

from .report import JobReport


class State(IntEnum):  # same numbers as eraser.v1.JobState
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELLED)


# A request whose job failed or was cancelled may be submitted again under its id (a retry).
RETRYABLE = (4, 5)  # State.FAILED, State.CANCELLED


@dataclass(frozen=True)
class RequestPayload:
    """One Erase request as the job runner needs it (holds replacement text)."""

    remove: tuple[str, ...] = ()
    modify_query: tuple[tuple[str, str], ...] = ()
    correct_response: tuple[tuple[str, str], ...] = ()

    @property
    def edited_ids(self) -> set[str]:
        return {i for i, _ in self.modify_query} | {i for i, _ in self.correct_response}

    @property
    def ids(self) -> set[str]:
        return set(self.remove) | self.edited_ids

    def to_json(self) -> dict:
        return {"remove": list(self.remove), "modify_query": [list(p) for p in self.modify_query],
                "correct_response": [list(p) for p in self.correct_response]}

    @classmethod
    def from_json(cls, obj: dict) -> "RequestPayload":
        return cls(tuple(obj["remove"]), tuple(map(tuple, obj["modify_query"])), tuple(map(tuple, obj["correct_response"])))

    def fingerprint(self, adapter: str, options: dict, hasher: RowHasher) -> str:
        """Identity of a request for idempotency: ids and keyed hashes of the new text."""
        canonical = {
            "adapter": adapter,
            "remove": sorted(self.remove),
            "modify_query": sorted((i, hasher.text(t)) for i, t in self.modify_query),
            "correct_response": sorted((i, hasher.text(t)) for i, t in self.correct_response),
            "options": options,
        }
        return hasher.text(json.dumps(canonical, sort_keys=True))

    def public_edits(self, hasher: RowHasher) -> list[dict]:
        """What a job record may keep: ids, kinds and keyed hashes of the new text."""
        out = [{"id": i, "kind": "remove"} for i in self.remove]
        out += [{"id": i, "kind": "modify_query", "new_hash": hasher.text(t)} for i, t in self.modify_query]
        out += [{"id": i, "kind": "correct_response", "new_hash": hasher.text(t)} for i, t in self.correct_response]
        return out


@dataclass
class Job:
    id: str
    adapter: str
    state: State
    options: dict
    created_at: float
    request_ids: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    edits: list[dict] = field(default_factory=list)
    from_version: int = 0
    to_version: int = 0
    stage: str = ""
    fraction: float = 0.0
    report: JobReport | None = None
    error_code: str = ""
    error_message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    attempts: int = 0
    already_erased: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    replicas_behind: list[str] = field(default_factory=list)
    swap_checks: list[dict] = field(default_factory=list)
    worker: str = ""  # the worker that holds it (a pool on PostgreSQL); empty on SQLite
    # How many requests the job serves: ``request_ids`` (and ``edits``) cover them all, except in
    # the reply to a request that joined a queued job: its own id and edits alone.
    request_count: int = 0

    @property
    def size(self) -> int:
        return len({e["id"] for e in self.edits})

    @property
    def task(self) -> str:
        kinds = {k for k, v in self.counts.items() if v}
        return kinds.pop() if len(kinds) == 1 else "mixed"


def _merge_edits(edits: list[dict], more: list[dict]) -> list[dict]:
    """A job's edits with another request's: a row removed by both is listed once."""
    removed = {e["id"] for e in edits}
    return edits + [e for e in more if not (e["kind"] == "remove" and e["id"] in removed)]


def _counts(edits: list[dict]) -> dict[str, int]:
    counts = {"remove": 0, "modify_query": 0, "correct_response": 0}
    for e in edits:
        counts[e["kind"]] += 1
    return counts

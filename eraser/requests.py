"""Unlearning requests: instance removal, query modification, response correction.

Every affected row z leaves the training set and its edited version z' (none for a
removal) enters it; mixed requests sum their terms (brief, section 2).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .data import Row
from .errors import InvalidRequestError, quote_ids
from .request_file import parse_request, read_request_file

MAX_REQUEST_ROWS = 10_000


@dataclass(frozen=True)
class Edit:
    """One affected row: ``old`` leaves the training set, ``new`` (if any) enters it."""

    old: Row
    new: Row | None

    @property
    def kind(self) -> str:
        if self.new is None:
            return "remove"
        if self.new.prompt != self.old.prompt and self.new.response != self.old.response:
            return "modify_query+correct_response"
        return "modify_query" if self.new.prompt != self.old.prompt else "correct_response"


@dataclass(frozen=True)
class UnlearningRequest:
    remove: tuple[str, ...] = ()
    modify_query: tuple[tuple[str, str], ...] = ()  # (row id, new prompt)
    correct_response: tuple[tuple[str, str], ...] = ()  # (row id, new response)

    def __post_init__(self):
        if not (self.remove or self.modify_query or self.correct_response):
            raise InvalidRequestError("empty request: nothing to remove, modify or correct")
        for name, ids in (
            ("remove", self.remove),
            ("modify_query", [i for i, _ in self.modify_query]),
            ("correct_response", [i for i, _ in self.correct_response]),
        ):
            for rid in ids:
                if not isinstance(rid, str) or not rid:
                    raise InvalidRequestError(f"{name}: row ids must be non-empty strings")
            dups = sorted(k for k, c in Counter(ids).items() if c > 1)
            if dups:
                raise InvalidRequestError(f"{name}: duplicate row id(s) {quote_ids(dups)}")
        edited = {i for i, _ in self.modify_query} | {i for i, _ in self.correct_response}
        both = sorted(set(self.remove) & edited)
        if both:
            raise InvalidRequestError(f"row id(s) both removed and edited: {quote_ids(both)}")
        for name, pairs in (("modify_query", self.modify_query), ("correct_response", self.correct_response)):
            for rid, text in pairs:
                if not isinstance(text, str) or not text.strip():
                    raise InvalidRequestError(f"{name}: row {quote_ids([rid])} needs a non-empty replacement text")
        if self.size > MAX_REQUEST_ROWS:
            raise InvalidRequestError(f"request touches {self.size} rows; the limit is {MAX_REQUEST_ROWS}")

    @property
    def size(self) -> int:
        return len(self.affected_ids)

    @property
    def affected_ids(self) -> list[str]:
        seen: dict[str, None] = {}
        for rid in list(self.remove) + [i for i, _ in self.modify_query] + [i for i, _ in self.correct_response]:
            seen.setdefault(rid, None)
        return list(seen)

    @classmethod
    def from_json(cls, obj: object) -> "UnlearningRequest":
        remove, modify, correct = parse_request(obj)
        return cls(tuple(remove), tuple(modify), tuple(correct))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnlearningRequest":
        remove, modify, correct = read_request_file(path)
        return cls(tuple(remove), tuple(modify), tuple(correct))

    def to_json(self) -> dict:
        return {
            "remove": list(self.remove),
            "modify_query": [{"id": i, "prompt": t} for i, t in self.modify_query],
            "correct_response": [{"id": i, "response": t} for i, t in self.correct_response],
        }

    def resolve(self, rows: Sequence[Row]) -> list[Edit]:
        """Match the request to the dataset; refuse unknown ids and no-op edits."""
        by_id = {r.id: r for r in rows}
        unknown = [i for i in self.affected_ids if i not in by_id]
        if unknown:
            raise InvalidRequestError(f"unknown row id(s): {quote_ids(unknown)}")
        new_prompt = dict(self.modify_query)
        new_response = dict(self.correct_response)
        edits = []
        for rid in self.affected_ids:
            old = by_id[rid]
            if rid in self.remove:
                edits.append(Edit(old, None))
                continue
            new = Row(rid, new_prompt.get(rid, old.prompt), new_response.get(rid, old.response))
            if new == old:
                raise InvalidRequestError(f"edit of row {quote_ids([rid])} changes nothing")
            edits.append(Edit(old, new))
        return edits

    def apply_to(self, rows: Sequence[Row]) -> list[Row]:
        """The edited dataset: removed rows gone, edited rows carry their new text."""
        replaced = {e.old.id: e.new for e in self.resolve(rows)}
        return [replaced.get(r.id, r) for r in rows if replaced.get(r.id, r) is not None]

    def counts(self) -> dict[str, int]:
        return {
            "remove": len(self.remove),
            "modify_query": len(self.modify_query),
            "correct_response": len(self.correct_response),
        }

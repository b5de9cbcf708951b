"""The request JSON of ``eraser erase --request`` and ``erasectl erase --request``: read and
shape-checked in one place for the engine's CLI and the client. Messages name fields and
files, never row text. No torch at import time: the client imports this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError, InvalidRequestError

FIELDS = ("remove", "modify_query", "correct_response")
Parsed = tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]


def parse_request(obj: object) -> Parsed:
    """(remove, modify_query, correct_response) from the request's JSON value."""
    if not isinstance(obj, dict):
        raise InvalidRequestError("the request must hold a JSON object")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InvalidRequestError(f"unknown field(s): {', '.join(unknown)}")
    remove = obj.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(i, str) for i in remove):
        raise InvalidRequestError("remove must be a list of row ids")

    def pairs(key: str, text_key: str) -> list[tuple[str, str]]:
        items = obj.get(key, [])
        if not isinstance(items, list):
            raise InvalidRequestError(f"{key} must be a list")
        for item in items:
            if (not isinstance(item, dict) or set(item) != {"id", text_key} or not isinstance(item["id"], str)
                    or not isinstance(item[text_key], str)):
                raise InvalidRequestError(f'{key} entries must be {{"id": "...", "{text_key}": "..."}}')
        return [(item["id"], item[text_key]) for item in items]

    return remove, pairs("modify_query", "prompt"), pairs("correct_response", "response")


def read_request_file(path: str | os.PathLike) -> Parsed:
    """The parsed request in ``path``: DataError where it cannot be read, InvalidRequestError
    where it is not a request (both name the file)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"request file not found: {p}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidRequestError(f"request file {p.name} is not valid JSON{where}") from None
    except OSError as e:
        raise DataError(f"cannot read request file {p}: {e.strerror}") from None
    try:
        return parse_request(obj)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"request file {p.name}: {e}") from None

"""JSON Lines and text files as users write them: one object a line, errors named by line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from elfctl.errors import UserError


def jsonl_objects(file: Path) -> Iterator[tuple[str, dict]]:
    """("<file>, line N", object) per non-blank line; malformed lines name file and line."""
    for number, line in enumerate(read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}, line {number}"
        yield where, jsonl_object(line, where)


def jsonl_object(line: str, where: str) -> dict:
    """One JSONL line as an object; a malformed one is an error naming `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}).") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object.")
    return record


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file} is not UTF-8 text (byte {e.start}).") from None

"""Read local JSON Lines / JSON files row by row, so one bad row costs one row, not the whole file.

The Arrow-based loader fails on a whole file for a single invalid UTF-8 byte, a truncated line, or a
column whose type changes from one row to the next (a string here, a list there). Real data does all of
this. Here every line is decoded and parsed on its own; a line that cannot be read becomes a problem
with its line number (counted in the preparation report), and every other row is kept as a plain dict,
whatever types its values have (the adapters check those).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_TYPES = ("json", "jsonl")


def is_local_json(ds_cfg: dict[str, Any]) -> bool:
    path = Path(str(ds_cfg.get("path", "")))
    suffix = path.suffix.lower().lstrip(".")
    return path.is_file() and (suffix in JSON_TYPES or (ds_cfg.get("ds_type") in JSON_TYPES and suffix not in
                                                         ("parquet", "csv", "arrow", "txt")))


def read_json_rows(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """(rows as (line number, dict), problems as (line number, reason)); line numbers start at 1.

    A file that as a whole parses as one JSON array is read as such (rows numbered from 1); anything
    else is read as JSON Lines (a JSONL file whose first line happens to be an array stays JSONL).
    """
    data = Path(path).read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            items = None
        if isinstance(items, list):
            return _classify(enumerate(items, start=1))
    rows, problems = [], []
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            problems.append((number, "invalid UTF-8"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            problems.append((number, "invalid JSON"))
            continue
        good, bad = _classify([(number, value)])
        rows += good
        problems += bad
    return rows, problems


def _classify(items) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    rows, problems = [], []
    for number, value in items:
        if isinstance(value, dict):
            rows.append((number, value))
        else:
            problems.append((number, "not a JSON object"))
    return rows, problems

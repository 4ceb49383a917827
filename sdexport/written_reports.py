"""A JSON report and the files made from it, with the proof that none was changed since.

``bench`` (results.json, .md, .png), ``bench compare`` (comparison.json, .md, .xml) and ``loadtest``
(loadtest.json, .md) write into a folder that their next run replaces. A user annotates a table
before committing it, or adds a note to the JSON: the next run must not replace that without a
word. Each report records, under ``written``, the sha256 of the files beside it and of its own
content (sorted keys, compact: key order and indentation may change, values may not), and
``changed_file`` names the first that is no longer as written. Reports from before a record are
judged by their names alone, as they were.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WRITTEN = "written"
"""The record's key in the report."""


def _content_sha256(report: dict[str, Any]) -> str:
    body = {key: value for key, value in report.items() if key != WRITTEN}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_record(report: dict[str, Any], json_name: str, files: Iterable[Path]) -> dict[str, Any]:
    """``report`` (as JSON reads it back: tuples as lists, keys as strings) with the record of
    ``files`` (those that exist) and of itself, under its own file name ``json_name``."""
    from sdexport.manifest import sha256_file

    report = json.loads(json.dumps(report))
    hashes = {path.name: sha256_file(path) for path in files if path.is_file()}
    return {**report, WRITTEN: {**hashes, json_name: _content_sha256(report)}}


def changed_file(directory: Path, json_name: str, report: dict[str, Any], names: Iterable[str]) -> str | None:
    """The first of ``json_name`` (the report, read as ``report``) and ``names`` (files beside it in
    ``directory``) that is not as the report records it; None where all are, or nothing is recorded.
    A file the record lacks that is not there is none (a chart that was not drawn)."""
    from sdexport.manifest import sha256_file

    record = report.get(WRITTEN)
    if not isinstance(record, dict):
        return None
    if json_name in record and record[json_name] != _content_sha256(report):
        return json_name
    for name in names:
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or record.get(name) != sha256_file(path):
            return name
    return None

"""What the benchmark scripts share: knowing their own result files before replacing them."""

from __future__ import annotations

import json
from pathlib import Path


def written_by(folder: Path, files: tuple[str, str], kind: str, title: str) -> bool:
    """Whether the JSON and Markdown result files in ``folder`` (either may be absent) were written by
    the script whose reports carry ``kind`` and whose Markdown starts with ``title``."""
    json_file, md_file = (folder / name for name in files)
    try:
        if json_file.exists() and json.loads(json_file.read_text(encoding="utf-8")).get("kind") != kind:
            return False
        return not md_file.exists() or md_file.read_text(encoding="utf-8").startswith(title + "\n")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False

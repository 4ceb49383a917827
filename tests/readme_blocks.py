"""The README's code blocks, each with what checks it, so that docs pasted by a reader keep working.

Every ```bash and ```python block of the README has a comment on the line above its fence:

- ``<!-- docs-check: run -->``: a reader can paste it on a CPU machine after the blocks above it
  (in order, in one folder: later blocks read ``out/tiny.png`` and ``engines/tiny``). The slow test
  ``test_readme.py::test_the_readme_runs_when_pasted`` runs them so.
- ``<!-- docs-check: serve -->``: it talks to ``sdexport serve`` on ``localhost:8000``;
  ``test_serving.py`` runs it against its own server, at that server's address.
- ``<!-- docs-check: skip: WHY -->``: nothing runs it here (a GPU, the network, placeholder paths);
  WHY says what, and which test covers the same ground if one does.

Whatever the check, every ``sdexport`` command in a bash block must parse with the CLI's own
options (``test_readme.py``), so a renamed option cannot linger in the README.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
CHECKS = ("run", "serve", "skip")
_MARKER = re.compile(r"<!-- docs-check: (?P<check>[a-z]+)(?:: (?P<why>.+?))? -->")


@dataclass(frozen=True)
class Block:
    line: int
    """The opening fence's line number (1-based), for messages."""
    language: str
    """The fence's label: ``bash``, ``python`` (the checked ones), another, or ``""`` (none)."""
    text: str
    check: str
    """``run``, ``serve``, ``skip``; empty where the marker is missing (a test says so)."""
    why: str = ""


def blocks(path: Path = README, languages: tuple[str, ...] = ("bash", "python")) -> list[Block]:
    """The fenced blocks of ``path`` in ``languages`` (``""``: unlabelled), in order, with their markers."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        if fence.group(1) in languages:
            marker = _MARKER.fullmatch(lines[i - 1]) if i else None
            found.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                               marker.group("check") if marker else "", (marker and marker.group("why")) or ""))
        i = end + 1
    return found


def sdexport_commands(text: str) -> list[list[str]]:
    """The arguments after ``sdexport`` of each ``python3 -m sdexport ...`` (or ``sdexport ...``)
    command in a shell text; continuation lines joined, comments dropped, ``&&``/``;``/``|`` split."""
    commands: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        if "sdexport" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word in ("&&", "||", ";", "|", "&"):
                start = _after_sdexport(words)
                if start is not None:
                    commands.append(words[start:])
                words = []
            else:
                words.append(word)
    return commands


def _after_sdexport(words: list[str]) -> int | None:
    """Where a command's own arguments start, if ``words`` run sdexport (``python3 -m sdexport``)."""
    for i, word in enumerate(words):
        if word == "sdexport" and (i == 0 or words[i - 1] == "-m"):
            return i + 1
    return None



def reader_environment(folder: Path) -> dict[str, str]:
    """The environment a reader's shell would have, with ``python3`` on PATH being this interpreter
    (the one sdexport is installed in; the system's python3 may not be)."""
    folder.mkdir(parents=True, exist_ok=True)
    python3 = folder / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def paste(block: Block, cwd: Path, env: dict[str, str], text: str | None = None,
          timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run a block as a reader pasting it would: bash stopping at the first failing command, or
    python3 reading the block on stdin. ``text``: the block's text with a change (another address)."""
    text = block.text if text is None else text
    if block.language == "bash":
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    return subprocess.run(["python3", "-"], input=text, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)

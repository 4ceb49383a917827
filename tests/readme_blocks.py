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
from collections.abc import Iterator
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


def _fences(lines: list[str]) -> Iterator[tuple[int, int, str]]:
    """Each fenced block's opening and closing line indexes and its label, as CommonMark reads
    fences: three or more backticks or tildes, indented up to three spaces (deeper, in a list item,
    too), closed by the same character at least as long; the label is the first word after the
    fence, lowercased."""
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*(?P<fence>`{3,}|~{3,})\s*(?P<label>[^`\s]*)", lines[i])
        if fence is None:
            i += 1
            continue
        close = re.compile(rf"\s*{re.escape(fence.group('fence')[0])}{{{len(fence.group('fence'))},}}\s*")
        end = next((j for j in range(i + 1, len(lines)) if close.fullmatch(lines[j])), len(lines))
        yield i, end, fence.group("label").lower()
        i = end + 1


def blocks(path: Path = README, languages: tuple[str, ...] | None = ("bash", "python")) -> list[Block]:
    """The fenced blocks of ``path`` labelled one of ``languages`` (None: every block; ``""``:
    unlabelled), in order, with their markers."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    for start, end, label in _fences(lines):
        if languages is None or label in languages:
            marker = _MARKER.fullmatch(lines[start - 1].strip()) if start else None
            found.append(Block(start + 1, label, "\n".join(lines[start + 1:end]) + "\n",
                               marker.group("check") if marker else "", (marker and marker.group("why")) or ""))
    return found


def prose(path: Path = README) -> str:
    """``path`` without its fenced blocks (for the commands quoted inline)."""
    lines = path.read_text().splitlines()
    for start, end, _ in reversed(list(_fences(lines))):
        del lines[start:end + 1]
    return "\n".join(lines)


_PREFIXES = ("time", "env", "nohup", "exec", "command", "sudo")
"""Words that run the command after them: ``time python3 -m sdexport ...`` is an sdexport command."""
_REDIRECTION = re.compile(r"(?<!\S)\d*(?:>>|>&|<&|&>|>|<)\s*(?:\"[^\"]*\"|'[^']*'|[^\s;&|()]+)")
_COMMENT = re.compile(r"(?:^|\s)#(?:\s.*)?$")


def shell_lines(text: str) -> list[str]:
    """A shell text's command lines: continuation lines joined, comments and blank lines dropped."""
    lines = (_COMMENT.sub("", line) for line in text.replace("\\\n", " ").splitlines())
    return [line for line in lines if line.strip()]


def sdexport_commands(text: str) -> list[list[str]]:
    """The arguments after ``sdexport`` of each ``python3 -m sdexport ...`` (or ``sdexport ...``)
    command in a shell text, as the shell would pass them: continuation lines joined, comments and
    redirections dropped, commands split at ``&&``, ``;``, ``|`` and parentheses, ``NAME=value``
    and ``time``-like words before a command skipped, and commands inside a quoted word
    (``bash -c "..."``, ``"$(...)"``) found too."""
    commands: list[list[str]] = []
    for line in shell_lines(text):
        if "sdexport" not in line:
            continue
        line = _REDIRECTION.sub(" ", line.replace("$(", " ( "))
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, ""
        words: list[str] = []
        for word in [*lexer, ";"]:
            if set(word) <= set("();<>|&"):
                commands.extend(_command_in(words))
                words = []
                continue
            if " " in word and "sdexport" in word:  # a command inside a quoted word
                commands.extend(sdexport_commands(word))
            words.append(word)
    return commands


def _command_in(words: list[str]) -> list[list[str]]:
    """``words``' own arguments after ``sdexport``, if they run it (``python3 -m sdexport``, or the
    ``sdexport`` script, after any ``NAME=value`` and ``time``-like words)."""
    while words and (re.match(r"[A-Za-z_]\w*=", words[0]) or words[0] in _PREFIXES):
        words = words[1:]
    if words[:1] == ["sdexport"]:
        return [words[1:]]
    if len(words) >= 3 and re.fullmatch(r"(.*/)?python[\d.]*", words[0]) and words[1:3] == ["-m", "sdexport"]:
        return [words[3:]]
    return []


def reader_environment(folder: Path) -> dict[str, str]:
    """The environment a reader's shell would have in this checkout: ``python3`` on PATH is this
    interpreter (the one sdexport's dependencies are installed in; the system's python3 may not
    be), importing sdexport from this checkout first (the blocks run in other folders, where an
    installed copy could answer instead). matplotlib's and other tools' caches go into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    python3 = folder / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    path = os.pathsep.join(p for p in (str(README.parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path,
            "MPLCONFIGDIR": str(folder / "matplotlib"), "XDG_CACHE_HOME": str(folder / "cache")}


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

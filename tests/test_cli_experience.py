"""A new user's first minutes: version, verbosity, quiet libraries, words that match what happened.

Startup times are a benchmark (benchmarks/startup.py), not asserted here; what is pinned is what
loads: a command that needs no torch must not import it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from sdexport import __version__


def _sdexport(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdexport", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_version_is_printed_on_stdout(capsys):
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"sdexport {__version__}"


def test_conflicting_and_unknown_verbosity_is_one_line(capsys):
    assert run_cli("-q", "-v", "inspect", "x") == 2
    assert run_cli("inspect", "x", "--verbosity", "loud") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: -q and -v: give one of -q, -v, --verbosity",
                     "error: --verbosity 'loud': choose quiet, normal, verbose"]


def test_onnxruntime_warnings_only_with_verbose(tmp_path):
    """ONNX Runtime's optimiser warns (raw ANSI, on the C++ side) while onnx-graphsurgeon folds the
    tiny text encoder's constants: hidden by default, shown with -v, and -q leaves stderr empty."""
    args = ["export", "tiny", "--components", "text_encoder", "--verify", "none"]
    normal = _sdexport(*args, "-o", str(tmp_path / "a"))
    verbose = _sdexport(*args, "-o", str(tmp_path / "b"), "-v")
    quiet = _sdexport("-q", *args, "-o", str(tmp_path / "c"))
    assert normal.returncode == verbose.returncode == quiet.returncode == 0, normal.stderr + verbose.stderr
    assert "onnxruntime" not in normal.stderr and "\x1b[" not in normal.stderr
    assert "W:onnxruntime" in verbose.stderr
    assert quiet.stderr == ""
    assert "text_encoder" in quiet.stdout  # results still on stdout

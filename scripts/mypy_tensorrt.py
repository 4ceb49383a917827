#!/usr/bin/env python3
"""Type-check the TensorRT modules against tensorrt-stubs, on a machine without TensorRT.

    python3 scripts/mypy_tensorrt.py            (exit status is mypy's; 3: stubs not installed)

tensorrt-stubs installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/*.pyi`` without a
``py.typed`` marker, so mypy skips them in site-packages, and a few generated signatures are not
valid Python (a parameter named ``in``, a required parameter after defaulted ones), which stops mypy
outright. This copies them to ``.mypy_cache/tensorrt-stubs/`` with those lines repaired, then runs
mypy with ``mypy-tensorrt.ini`` (which puts that folder on mypy's path and lists the files).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / ".mypy_cache" / "tensorrt-stubs"
CONFIG = ROOT / "mypy-tensorrt.ini"
PACKAGES = ("tensorrt", "tensorrt_bindings")

_FIXES = (
    (re.compile(r"([(,]\s*)in(\s*:)"), r"\1in_\2"),  # `in` is a keyword
    (re.compile(r"(channel_axis: int)\)"), r"\1 = ...)"),  # required after defaulted parameters
)


def find_stubs() -> dict[str, Path] | None:
    """Folder of each stub package, or None when tensorrt-stubs is not installed."""
    found = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            if (Path(location) / "__init__.pyi").is_file():
                found[package] = Path(location)
                break
        else:
            return None
    return found


def prepare_stubs(target: Path = STUBS) -> Path:
    """Write the repaired copy of the stubs under ``target``; raises FileNotFoundError without them."""
    found = find_stubs()
    if found is None:
        raise FileNotFoundError('tensorrt-stubs is not installed (pip install --no-deps "tensorrt-stubs>=10")')
    for package, folder in found.items():
        out = target / package
        out.mkdir(parents=True, exist_ok=True)
        for stub in sorted(folder.glob("*.pyi")):
            text = stub.read_text(encoding="utf-8")
            for pattern, replacement in _FIXES:
                text = pattern.sub(replacement, text)
            try:
                ast.parse(text, filename=str(stub))
            except SyntaxError as exc:
                raise SyntaxError(f"{stub}:{exc.lineno}: still not valid Python after repair: {exc.msg}") from None
            if not (out / stub.name).is_file() or (out / stub.name).read_text(encoding="utf-8") != text:
                (out / stub.name).write_text(text, encoding="utf-8")
    return target


def run(extra: list[str] | None = None) -> tuple[int, str]:
    """Prepare the stubs and run mypy in-process; returns (exit status, report)."""
    from mypy import api

    prepare_stubs()
    stdout, stderr, status = api.run(["--config-file", str(CONFIG), *(extra or [])])
    return status, stdout + stderr


def main() -> int:
    try:
        status, report = run(sys.argv[1:])
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 3
    print(report, end="")
    return status


if __name__ == "__main__":
    exit_status = main()
    # Leave without tearing down the interpreter, as mypy's own command does: freeing the parsed
    # modules one by one took longer (4 s) than the cold check itself.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_status)

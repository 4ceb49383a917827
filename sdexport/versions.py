"""Installed package versions, read from package metadata (nothing is imported to learn them), but
sdexport's own: the running code's ``__version__``."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path


def installed_version(package: str) -> str | None:
    """``package``'s installed version, or None when it is not installed. sdexport's own is the
    running code's (``sdexport.__version__``): run from a checkout on PYTHONPATH (the GPU lease, a
    worktree) it has no metadata, or another checkout's install's."""
    if package == "sdexport":
        from sdexport import __version__

        return __version__
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def installed_versions(packages: Iterable[str]) -> dict[str, str | None]:
    return {package: installed_version(package) for package in packages}


def importing_distribution(module: str, candidates: Iterable[str]) -> tuple[str, str] | None:
    """Which of ``candidates`` (distributions that install the same top-level ``module``) provides the
    ``module`` that ``import`` finds, and its version; None when it cannot be told. Where two are
    installed, as the GPU image's onnxruntime beside an onnxruntime-gpu put ahead on the path, the
    metadata of both is visible and only the files tell which one runs: the one whose RECORD lists
    the module's file, and where both list it (one installed over the other in one folder), the one
    whose recorded sha256 is the file's. The module is found, not imported."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        return None
    found = Path(spec.origin).resolve()
    listing = {}  # candidate: (version, its recorded hash of the module's file)
    for name in candidates:
        try:
            installed = distribution(name)
        except PackageNotFoundError:
            continue
        entry = next((f for f in installed.files or [] if Path(str(f.locate())).resolve() == found), None)
        if entry is not None:
            listing[name] = (installed.version, entry.hash.value if entry.hash else None)
    if len(listing) > 1:  # the file is the last install's: its hash says which
        digest = base64.urlsafe_b64encode(hashlib.sha256(found.read_bytes()).digest()).rstrip(b"=").decode()
        listing = {name: facts for name, facts in listing.items() if facts[1] == digest}
    if len(listing) != 1:
        return None
    name, (version, _) = next(iter(listing.items()))
    return name, version

"""Installed package versions, read from package metadata (nothing is imported to learn them)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path


def installed_version(package: str) -> str | None:
    """``package``'s installed version, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def installed_versions(packages: Iterable[str]) -> dict[str, str | None]:
    return {package: installed_version(package) for package in packages}


def importing_distribution(module: str, candidates: Iterable[str]) -> tuple[str, str] | None:
    """Which of ``candidates`` (distributions that install the same top-level ``module``) provides the
    ``module`` that ``import`` finds, and its version; None when none does or it is not installed.
    Where two are installed, as the GPU image's onnxruntime beside an onnxruntime-gpu put ahead on
    the path, the metadata of both is visible and only the import path tells which one runs. The
    module is found, not imported. None too where no candidate's files hold it (an editable install)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    found = Path(spec.origin).resolve()
    top = found.parents[1] if spec.submodule_search_locations is not None else found.parent  # a package's folder
    for name in candidates:
        try:
            installed = distribution(name)
        except PackageNotFoundError:
            continue
        if Path(str(installed.locate_file(found.relative_to(top)))).resolve() == found:
            return name, installed.version
    return None

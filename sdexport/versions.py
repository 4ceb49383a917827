"""Installed package versions, read from package metadata (nothing is imported to learn them)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def installed_version(package: str) -> str | None:
    """``package``'s installed version, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def installed_versions(packages: Iterable[str]) -> dict[str, str | None]:
    return {package: installed_version(package) for package in packages}

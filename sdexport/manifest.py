"""The engine directory's manifest: what was exported, from what, with which tools, and proof.

The manifest is written last and atomically, so a directory that has one is complete. Every artifact
is listed with its sha256; ``load_manifest`` refuses a directory whose files no longer match, before
any engine is loaded. The runtime needs nothing else from the export: component shapes come back from
``sdexport.specs`` by family and name, never from a second copy of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdexport.atomic import write_atomic
from sdexport.errors import EngineDirError
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims, component

MANIFEST_NAME = "manifest.json"
FORMAT = "sdexport-engine-dir"
FORMAT_VERSION = 1


@dataclass
class ComponentEntry:
    onnx: str
    """Path of model.onnx relative to the engine directory."""
    dtype: str
    parity: dict[str, Any]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """TensorRT plans by cache key: {"path", "key": {...}, "build_seconds"}."""


@dataclass
class Manifest:
    family: str
    model: dict[str, Any]
    """label, source, random_weights"""
    prediction_type: str
    vae_scaling_factor: float
    dims: dict[str, int]
    profile: dict[str, list[int]]
    dtype: str
    tools: dict[str, Any]
    components: dict[str, ComponentEntry]
    files: dict[str, str]
    """Every artifact (relative path) → sha256."""
    created: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def shape_profile(self) -> ShapeProfile:
        return ShapeProfile.from_dict(self.profile)

    @property
    def model_dims(self) -> ModelDims:
        return ModelDims(**self.dims)

    @property
    def random_weights(self) -> bool:
        return bool(self.model.get("random_weights"))

    def spec(self, name: str) -> ComponentSpec:
        return component(self.family, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["components"] = {k: ComponentEntry(**v) for k, v in data["components"].items()}
        return cls(**data)


def sha256_file(path: Path, chunk: int = 16 * 1024**2) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def save_manifest(directory: Path, manifest: Manifest) -> None:
    write_json_atomic(directory / MANIFEST_NAME, manifest.to_dict())


def load_manifest(directory: Path, *, verify_files: bool = True, components: list[str] | None = None) -> Manifest:
    """Read and check an engine directory; ``components`` limits the hash check to what will be used."""
    if not directory.is_dir():
        raise EngineDirError(f"{directory}: no such engine directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise EngineDirError(
            f"{directory}: no {MANIFEST_NAME}; not an sdexport engine directory, or its export did not "
            "finish (run `sdexport export` again)"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise EngineDirError(f"{path}: not an sdexport manifest (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise EngineDirError(
                f"{path}: manifest format {data.get('format_version')} is not supported by this "
                f"sdexport (expects {FORMAT_VERSION}); re-export"
            )
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise EngineDirError(f"{path}: damaged manifest ({exc})") from None
    if verify_files:
        verify_files_of(directory, manifest, components)
    return manifest


def verify_files_of(
    directory: Path, manifest: Manifest, components: list[str] | None = None, *, plans: bool = True
) -> None:
    """Check the directory's files against their hashes, limited to ``components`` if given.

    The runtime passes ``plans=False``: a directory may hold TensorRT plans for several GPUs, and
    the TensorRT loader checks only the one it picks.
    """
    skipped = tuple(f"{c}/" for c in manifest.components if components is not None and c not in components)
    check_files(directory, {
        rel: digest for rel, digest in manifest.files.items()
        if (plans or not rel.endswith(".plan")) and not (skipped and rel.startswith(skipped))
    })


def check_files(directory: Path, files: dict[str, str]) -> None:
    """Every listed file exists and has its recorded sha256, else one error naming the file."""
    for rel, expected in files.items():
        file = directory / rel
        if not file.is_file():
            raise EngineDirError(f"{directory}: {rel} is listed in the manifest but missing")
        if sha256_file(file) != expected:
            raise EngineDirError(
                f"{directory}: {rel} does not match its sha256 in the manifest (damaged or replaced); "
                "re-export or rebuild it"
            )

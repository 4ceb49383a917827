"""Engines kept between benchmark runs: ``sdexport bench SCENARIO --engine-cache DIR``.

A CI runner benchmarks every merge request, and exporting a model (then building its TensorRT
plans) can take longer than the benchmark itself. So the exported engine directory is kept in DIR,
in a folder named by a key of everything the export depends on: a run whose key matches uses that
folder as it is; a run whose key differs exports a new folder beside it. TensorRT plans and ONNX
Runtime's fused graphs are built inside the folder and have keys of their own (GPU, TensorRT
version, flags: ``sdexport.build.cache_key``), so a runner rebuilds only what changed.

The export key covers the model (a preset's name, or the sha256 of every file read from a
checkpoint or diffusers folder, ControlNets alike), the profile, the precision, the components, the
sdexport code that writes graphs (``export/``, ``models/``, specs, shapes, manifest) and the versions of
the libraries that trace them. It leaves out what does not change a graph: the runtime, serving and
bench code, so a change there reuses the engines.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sdexport.bench.scenario import Scenario
from sdexport.shapes import ShapeProfile

KEY_VERSION = 1
"""Bumped when what goes into the key changes meaning."""

TRACING_LIBRARIES = ("torch", "onnx", "onnxscript", "diffusers", "transformers")
GRAPH_CODE = ("export", "models", "specs.py", "shapes.py", "graph_io.py", "manifest.py", "manifest_schema.py")
"""The parts of the sdexport package whose code decides what an export writes."""


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _tree_digest(root: Path, pattern: str = "*") -> str:
    """One sha256 over a file or every file under a folder, by relative path and content."""
    from sdexport.manifest import sha256_file

    if root.is_file():
        return sha256_file(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def graph_code_digest() -> str:
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for part in GRAPH_CODE:
        digest.update(f"{part}\0{_tree_digest(package / part, '*.py')}\n".encode())
    return digest.hexdigest()


def _source_digest(name: str, sources: tuple[Path, ...]) -> dict[str, str]:
    """A preset by its name (its weights come from its seed and sdexport's code, both in the key);
    anything read from disk by content."""
    return {str(path): _tree_digest(path) for path in sources} or {"preset": name}


def export_key(scenario: Scenario, sources: tuple[Path, ...], profile: ShapeProfile, dtype: str,
               components: list[str]) -> str:
    """A short hex digest of everything the scenario's export depends on (see the module's docstring)."""
    from sdexport import __version__

    record = {
        "key_version": KEY_VERSION,
        "model": _source_digest(scenario.model, sources),
        "controlnets": [_source_digest(c, (Path(c),) if Path(c).exists() else ()) for c in scenario.controlnets],
        "profile": profile.to_dict(),
        "dtype": dtype,
        "components": sorted(components),
        "sdexport": __version__,
        "graph_code": graph_code_digest(),
        "libraries": {name: _version(name) for name in TRACING_LIBRARIES},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(cache: Path, scenario: Scenario, key: str) -> Path:
    return cache / f"{scenario.name}-{key}"


def usable(entry: Path) -> bool:
    """Whether a cache folder holds a complete export (an interrupted one never appears: exports are
    built in a staging folder and renamed into place)."""
    from sdexport.errors import EngineDirError
    from sdexport.manifest import load_manifest

    if not (entry / "manifest.json").is_file():
        return False
    try:
        load_manifest(entry, verify_files=False)
    except EngineDirError:
        return False
    return True


def mark_used(entry: Path) -> None:
    """The folder's time stamp says when a run last used it: ``find DIR -maxdepth 1 -mtime +30`` lists
    the entries no run has needed for a month."""
    os.utime(entry)

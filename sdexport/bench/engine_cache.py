"""Engines kept between benchmark runs: ``sdexport bench SCENARIO --engine-cache DIR``.

A CI runner benchmarks every merge request, and exporting a model (then building its TensorRT
plans) can take longer than the benchmark itself. So the exported engine directory is kept in DIR,
in a folder named by a key of everything the export depends on: a run whose key matches uses that
folder as it is; a run whose key differs exports a new folder beside it. TensorRT plans and ONNX
Runtime's fused graphs are built inside the folder and have keys of their own (GPU, TensorRT
version, flags: ``sdexport.build.cache_key``), so a runner rebuilds only what changed.

The key covers the model (a preset's name, or the sha256 of every file read from a checkpoint or
diffusers folder, ControlNets alike), the profile, the precision, the components, the sdexport code
that writes graphs and builds engines (``export/``, ``models/``, ``build/``, specs, shapes, manifest)
and the versions of the libraries that trace, convert and clean up graphs. It leaves out what does
not change an engine: the runtime, serving and bench code, so a change there reuses the engines.

Runs that use one entry take turns (``in_use``): the TensorRT and ONNX Runtime builds write into it,
and two benchmarks on one GPU at once would time each other anyway. An entry that fails its check
(a file that no longer matches its sha256, an unreadable manifest) is set aside, never deleted, and
exported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdexport.bench.scenario import Scenario
from sdexport.hash_records import identity
from sdexport.shapes import ShapeProfile
from sdexport.versions import installed_version

KEY_VERSION = 2
"""Bumped when what goes into the key changes meaning (2: a model read from disk by its content
alone, no longer by its path too)."""

GRAPH_LIBRARIES = ("torch", "onnx", "onnxscript", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu",
                   "onnx-graphsurgeon")
"""What traces, converts (onnxruntime's fp16 converter) and cleans up (graphsurgeon) the graphs."""
ENGINE_CODE = ("export", "models", "build", "specs.py", "shapes.py", "graph_io.py", "manifest.py", "manifest_schema.py")
"""The parts of the sdexport package whose code decides what the folder holds: the export, and the
TensorRT plans and fused graphs built inside it (their own keys do not cover sdexport's code).
Their Python files, and the data files beside them (``models/data``: the presets' CLIP merges,
which the tokenizers the export writes are made of; an edit there kept the key, an audit)."""


def _tree_digest(root: Path, pattern: str = "*", *, recorded: bool = True) -> str:
    """One sha256 over a file or every file under a folder, by relative path and content. ``recorded``:
    each file's hash is trusted from its record while unchanged (``hash_records``: a re-run does not
    read a checkpoint's gigabytes again); sdexport's own small source files are simply hashed."""
    from sdexport.hash_records import file_sha256
    from sdexport.manifest import sha256_file

    hashed = file_sha256 if recorded else sha256_file
    if root.is_file():
        return hashed(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(root).as_posix()}\0{hashed(path)}\n".encode())
    return digest.hexdigest()


def engine_code_digest() -> str:
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for part in ENGINE_CODE:
        pattern = "*" if part == "models" else "*.py"  # (its data/ too: the presets' tokenizers)
        digest.update(f"{part}\0{_tree_digest(package / part, pattern, recorded=False)}\n".encode())
    return digest.hexdigest()


def _tree_stamp(root: Path) -> str:
    """One sha256 over a file's or every file's under a folder relative path and identity (size,
    modification and change times, inode, device: ``hash_records.identity``): what changes when a
    file is rewritten or replaced, read without reading the files. (The change time too: a file
    overwritten in place with its modification time set back, ``cp -p`` or rsync in place keeping times,
    keeps the others; a chmod moves it as well, and costs an export.)"""
    digest = hashlib.sha256()
    for path in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
        stat = path.stat()
        name = path.name if path == root else path.relative_to(root).as_posix()
        digest.update(f"{name}\0{identity(stat)}\n".encode())
    return digest.hexdigest()


def _source_digest(name: str, sources: tuple[Path, ...], by_content: bool = True) -> dict[str, Any]:
    """A preset by its name (its weights come from its seed and sdexport's code, both in the key);
    anything read from disk by content alone, wherever it lies (a copy on another runner, a path
    spelt otherwise: the same key), or (``by_content=False``) by its files' paths and stamps."""
    if not sources:
        return {"preset": name}
    if by_content:
        return {"content": [_tree_digest(path) for path in sources]}  # in order: the model, then its --vae
    return {str(path): _tree_stamp(path) for path in sources}


def _config_preset(scenario: Scenario) -> bool:
    """Whether the scenario's ``config`` names a preset (as ``export --config`` reads it)."""
    from sdexport.models.outline import single_file_config

    return scenario.config is not None and single_file_config(Path(scenario.model), scenario.config)[0] is not None


def export_key(scenario: Scenario, sources: tuple[Path, ...], profile: ShapeProfile, dtype: str,
               components: list[str], *, by_content: bool = True) -> str:
    """A short hex digest of everything the scenario's export depends on (see the module's docstring).

    ``by_content=False`` identifies the model's files by path, size, modification time and inode
    instead of their sha256: for an output folder's own engines, which a re-run on the same machine
    reuses, where hashing gigabytes of weights on every run would cost more than it guards (the
    shared cache keeps the content hash: other runners, other copies)."""
    from sdexport import __version__

    def source(name: str, paths: tuple[Path, ...]) -> dict[str, str]:
        return _source_digest(name, paths, by_content)

    adapters = [source(a, (Path(a),) if Path(a).exists() else ()) for a in scenario.adapters]
    record = {
        "key_version": KEY_VERSION,
        "model": source(scenario.model, sources),
        # a single file's preset config by name (only there, so that every other scenario keeps its
        # key); a config directory is hashed among the sources, by content wherever it lies
        **({"config": scenario.config} if _config_preset(scenario) else {}),
        "controlnets": [source(c, (Path(c),) if Path(c).exists() else ()) for c in scenario.controlnets],
        # only with adapters (one as before), so that every other scenario keeps its key
        **({"adapter": adapters[0]} if len(adapters) == 1 else {"adapters": adapters} if adapters else {}),
        "profile": profile.to_dict(),
        "dtype": dtype,
        "components": sorted(components),
        "sdexport": __version__,
        "engine_code": engine_code_digest(),
        "libraries": {name: installed_version(name) for name in GRAPH_LIBRARIES},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(cache: Path, scenario: Scenario, key: str) -> Path:
    return cache / f"{scenario.name}-{key}"


def check_cache_folder(cache: Path) -> None:
    """Refuse, before anything loads, a cache folder that cannot be used."""
    from sdexport.errors import SdexportError
    from sdexport.output_dir import refuse_inside_engine_dir, require_creatable

    if cache.exists() and not cache.is_dir():
        raise SdexportError(f"--engine-cache {cache} is a file; give a folder to keep engines in")
    require_creatable(cache, f"--engine-cache {cache}")
    # (the entries go in it: an engine directory itself is refused too, before its in-use mark is written)
    refuse_inside_engine_dir(cache, f"--engine-cache {cache}", itself=True)


def damage(entry: Path) -> str | None:
    """Why a cache entry cannot be used as it is (None: a complete export whose files all match their
    sha256). An interrupted export never appears here: exports are renamed into place when done.

    TensorRT plans and fused ONNX Runtime graphs are left to their builders, which check and rebuild
    them one by one (a build stopped halfway leaves a listed file missing, by design); a damaged
    plan must not cost the whole entry."""
    from sdexport.build.cache_key import PLAN_SUFFIX
    from sdexport.build.onnxruntime_build import TARGET
    from sdexport.errors import EngineDirError
    from sdexport.manifest import check_files, load_manifest

    try:
        manifest = load_manifest(entry, verify_files=False)
        check_files(entry, {rel: sha for rel, sha in manifest.files.items()
                            if not rel.endswith(PLAN_SUFFIX) and f"/{TARGET}/" not in f"/{rel}"})
    except EngineDirError as exc:
        return str(exc)
    return None


def set_aside(entry: Path) -> Path:
    """Move a damaged entry out of the way (kept for a look, never deleted) so it can be exported anew."""
    aside = entry.parent / f".{entry.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(entry, aside)
    return aside


@contextlib.contextmanager
def in_use(entry: Path) -> Iterator[None]:
    """Hold an entry for one benchmark run; a second run waits (and says so) instead of failing.

    The mark ``.NAME.in-use`` exists only while a run holds it, its time the run's (it was left for
    good, untouched by later runs, and the README's month-old clean-up listed the mark of an entry
    in use: one removed while held lets a second run in beside the first). A run that opened it just
    before its holder removed it opens it again (its inode no longer the path's), so two runs never
    both hold an entry. Opened for reading: ``flock`` needs no more, so another user of a shared
    cache (the mark is 0644) waits its turn too."""
    import fcntl

    from sdexport.console import console
    from sdexport.output_dir import still_named

    entry.parent.mkdir(parents=True, exist_ok=True)
    path = entry.parent / f".{entry.name}.in-use"
    said = False
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                console.print(f"waiting for another benchmark run that uses {entry} …", markup=False, soft_wrap=True)
                said = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        if still_named(path, fd):
            break
        os.close(fd)
    with contextlib.suppress(OSError):  # (a mark an earlier sdexport left keeps its old time otherwise)
        os.utime(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def mark_used(entry: Path) -> None:
    """The folder's time stamp says when a run last used it: ``find DIR -mindepth 1 -maxdepth 1 -mtime +30``
    lists the entries no run has needed for a month (an entry's in-use mark lasts as long as its run).
    A stamp that cannot be set (another user's entry in a shared cache, a read-only one) blocks no
    run: it stopped the bench before anything was measured (an audit)."""
    with contextlib.suppress(OSError):
        os.utime(entry)

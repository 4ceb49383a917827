"""``build --timing-cache FILE``: TensorRT's tactic timing cache, read before a build and replaced
whole once it succeeds, where the file is provably sdexport's to replace.

A cache is sdexport's when it lies in sdexport's own timing folder (the default, one per GPU and
TensorRT version), when it does not exist yet (or is empty), or when it holds exactly what sdexport
last wrote there (its sha256, recorded in the user cache's ``timing/written.json``). Any other file
(a cache trtexec wrote, or a file named by mistake, which TensorRT would read as no cache at all and
a build would then have overwritten) is read but never replaced; the build says so once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sdexport.atomic import atomic_path
from sdexport.errors import SdexportError
from sdexport.manifest import sha256_file
from sdexport.user_cache import user_cache

WRITTEN = "written.json"
"""Beside sdexport's own timing caches: {absolute path: sha256} of each cache file sdexport wrote."""
LOCK = ".written.lock"
"""Held while ``WRITTEN`` is read and rewritten."""


def check_timing_cache(timing_cache: Path, engine_dir: Path) -> None:
    """Refused, before anything builds, where it is a folder, or lies in the engine directory (whose
    files its manifest lists: a plan or graph there would be overwritten, and any other file makes
    it no longer provably sdexport's)."""
    if timing_cache.is_dir():
        raise SdexportError(f"--timing-cache {timing_cache}: a folder; name the cache file (it is read, then "
                            "replaced with the updated cache where sdexport wrote it)")
    if timing_cache.resolve().is_relative_to(engine_dir.resolve()):
        raise SdexportError(f"--timing-cache {timing_cache}: inside the engine directory {engine_dir}, whose files "
                            "its manifest lists; keep the cache outside it (the default is one per GPU and "
                            "TensorRT version in sdexport's user cache)")
    from sdexport.output_dir import refuse_inside_engine_dir

    refuse_inside_engine_dir(timing_cache, f"--timing-cache {timing_cache}")  # (another engine directory)


def timing_folder() -> Path | None:
    """sdexport's own timing caches (``default_timing_cache``) and the record of those it wrote elsewhere."""
    root = user_cache()
    return None if root is None else root / "timing"


def is_ours(timing_cache: Path) -> bool:
    """Whether the cache file (links followed) may be replaced: see the module's docstring. Anything
    but a regular file (a FIFO, ``/dev/null``) is not."""
    path = timing_cache.resolve()
    if not path.exists():
        return True
    if not path.is_file() or path.name in (WRITTEN, LOCK):
        return False
    folder = timing_folder()
    if path.stat().st_size == 0 or (folder is not None and path.parent == folder.resolve()):
        return True
    recorded = _written().get(str(path))  # (looked up first: a large file named by mistake is not hashed)
    return recorded is not None and recorded == sha256_file(path)


def cannot_replace(timing_cache: Path) -> str | None:
    """Why the updated cache could not be written where ``timing_cache`` is (None: it can), asked
    before the build: its folder read-only (a shared or mounted user cache), or not creatable."""
    from sdexport.atomic import existing_ancestor
    from sdexport.output_dir import unwritable

    folder = existing_ancestor(timing_cache.resolve().parent)
    return unwritable(folder) if folder.is_dir() else f"{folder} is a file"


def _written() -> dict[str, str]:
    folder = timing_folder()
    try:
        record = json.loads((folder / WRITTEN).read_text(encoding="utf-8")) if folder is not None else {}
    except (OSError, ValueError):  # none yet, or unreadable: nothing is proven ours by it
        return {}
    return {k: v for k, v in record.items() if isinstance(v, str)} if isinstance(record, dict) else {}


def _remember(path: Path, digest: str) -> None:
    """Record what sdexport wrote at ``path`` (outside its own folder), so a later build may replace
    it; under a lock, so that builds finishing at once each keep their entry."""
    folder = timing_folder()
    if folder is None or path.parent == folder.resolve():
        return
    with contextlib.suppress(OSError):  # (a read-only cache folder: the next build reads it, and leaves it)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK, "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = {**_written(), str(path): digest}
            with atomic_path(folder / WRITTEN) as staged:
                staged.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


class _ChangedMeanwhile(Exception):
    """The cache file changed while the build ran, and not by sdexport: it is left as it is."""


@contextlib.contextmanager
def timing_cache_files(timing_cache: Path | None, replace: bool) -> Iterator[tuple[IO[bytes] | None, IO[bytes] | None]]:
    """(what polygraphy loads the timing cache from, what it saves the updated one to): open files,
    so that the cache is replaced whole once the build succeeds (``atomic_path``), never truncated
    by a build stopped while polygraphy writes it in place, and no ``FILE.lock`` is made beside it
    (polygraphy locks paths, not open files; of two builds at once, the last to finish keeps its
    cache). A link is followed: the file it names is replaced, the link kept. Not ``replace``
    (``is_ours``): read only; nor where the file changed during the build, other than by sdexport.
    (None, None) without a cache."""
    if timing_cache is None:
        yield None, None
        return
    timing_cache = timing_cache.resolve()
    if not replace:
        if not timing_cache.is_file():  # (a FIFO would block the open; /dev/null holds nothing)
            yield None, None
            return
        with open(timing_cache, "rb") as read_only:
            yield read_only, None
        return
    try:
        with contextlib.ExitStack() as files, atomic_path(timing_cache) as staged:
            cache_in = files.enter_context(open(timing_cache, "rb")) if timing_cache.is_file() else None
            opened = _identity(os.fstat(cache_in.fileno())) if cache_in is not None else None
            cache_out = files.enter_context(open(staged, "wb+"))
            yield cache_in, cache_out
            if not cache_out.tell() and cache_in is not None:  # TensorRT gave no cache to save: keep the old one
                cache_in.seek(0)
                cache_out.write(cache_in.read())
            files.close()
            digest = sha256_file(staged)
            now = _identity(os.stat(timing_cache)) if timing_cache.exists() else None
            if now != opened and not is_ours(timing_cache):
                raise _ChangedMeanwhile
    except _ChangedMeanwhile:
        from rich.markup import escape

        from sdexport.console import console

        console.print(f"[yellow]note:[/] --timing-cache {escape(str(timing_cache))} changed while the build ran (not by sdexport): "
                      "left as it is, without this build's entries")
        return
    _remember(timing_cache, digest)


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

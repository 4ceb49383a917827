"""Claiming an output directory: checks, one writer at a time, a staging folder, an atomic swap.

``sdexport export`` (engine directories) and ``sdexport bench`` (result folders) write whole
directories that take minutes to make. What they promise:

- **Bad targets are refused before any work**: a file, a path inside a file, a folder without write
  permission or on a read-only filesystem, a symbolic link, the current directory or one containing
  it, and the model being read or any folder containing it.
- **Nothing of the user's is replaced without proof it is ours.** An existing non-empty target is
  replaced only when asked (``--force`` for export) *and* its content is what sdexport writes: an
  engine directory whose files are all listed in its manifest (plus plans and temporary files
  sdexport itself makes), or a previous benchmark output. Anything else is refused and left alone.
- **One writer per target.** A lock file beside the target (``.NAME.sdexport-lock``) is held for the whole
  job; a second job on the same target is refused at once, naming the process that holds it.
- **Nothing half-made.** Work happens in a hidden sibling ``.NAME.partial-PID``; only a finished
  directory is moved into place. An existing directory is swapped with the new one in a single
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so at no moment is neither at the target path; where the
  filesystem cannot exchange, the old one is first moved to ``.NAME.old-PID`` and the next run
  restores it if the new one never arrived.
- **Killed runs are cleaned up** by the next run on the same target (it holds the lock, so
  leftovers cannot belong to a live process): staging folders carry a marker file until the end and
  are removed; a displaced old directory is restored or removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from sdexport import stopping
from sdexport.atomic import TEMP_NAME, existing_ancestor, name_limit
from sdexport.console import console
from sdexport.errors import SdexportError
from sdexport.user_cache import check_cache_outside

MARKER = ".sdexport-partial"
"""Present in a staging (or discarded) directory until sdexport is done with it."""


@dataclass(frozen=True)
class OutputKind:
    """What kind of directory a command writes, and how to tell one of ours from the user's files."""

    what: str
    """"engine directory", "benchmark output": used in messages."""
    not_ours: Callable[[Path], str | None]
    """Why ``path`` (an existing non-empty directory) is not one sdexport wrote; None when it is."""
    flag: str = "-o"
    example: str = "out/NAME"
    """A new path to suggest, as this kind is usually named."""
    holds_engines: bool = False
    """ONNX graphs are written or read in it (``require_text_path``)."""


@dataclass
class Target:
    """A checked output path: ``path`` with its parent resolved, so every spelling locks the same name."""

    path: Path
    kind: OutputKind
    created_parents: list[Path] = field(default_factory=list)
    in_place: bool = False
    """Changed where it is (``updating``: a build), not written anew to a path the user chose."""

    @property
    def parent(self) -> Path:
        return self.path.parent

    @property
    def or_another(self) -> str:
        """The end of a refusal that lets the user pick another path: none for a build's in place."""
        return "" if self.in_place else f" or choose another {self.kind.flag}"

    @property
    def name(self) -> str:
        return self.path.name


def refuse_if_held(target: Target) -> None:
    """Refuse at once, before any heavy work, a target another sdexport process holds (``_locked``)."""
    holder = writer_of(target.path)
    if holder is not None:
        raise _held_by(target.path, holder, target.or_another)


def writer_of(path: Path) -> str | None:
    """The pid that the lock beside ``path`` names where another sdexport process holds it now, else
    None (no lock file, or none of ours: the job itself says what is wrong when it takes it): a probe
    that takes the lock only to let it go, and creates no lock file. Also what a reader of a target
    not there yet is told (an export's first minutes)."""
    try:
        fd = os.open(_lock_beside(path), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def _lock_now(fd: int, tries: int = 20) -> None:
    """An exclusive lock on ``fd`` now, else BlockingIOError. A lock held while the file names no
    running holder is held for an instant only (``refuse_if_held``'s probe, a job between creating
    and claiming it, or a probe of a killed job's leftover file): it is tried again for up to a
    second, so that a probe never turns a job away."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1 or _running(os.pread(fd, 64, 0)):  # a job holds it
                raise
            time.sleep(0.05)


def _running(text: bytes) -> bool:
    """Whether a lock file's ``sdexport pid N`` names a process that is alive."""
    found = re.match(rb"sdexport pid (\d+)", text)
    if found is None:
        return False
    try:
        os.kill(int(found.group(1)), 0)
    except PermissionError:  # another user's process: alive
        return True
    except (ProcessLookupError, OverflowError, ValueError):  # none of that number, or no process number at all
        return False
    return True


def _lock_path(target: Target) -> Path:
    """The lock file of ``target``, beside it (``_locked`` takes it; ``refuse_if_held`` probes it)."""
    return _lock_beside(target.path)


def _lock_beside(path: Path) -> Path:
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _holder(fd: int) -> str:
    """The pid a held lock file (open as ``fd``) names, "unknown" where it names none yet."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip().removeprefix("sdexport pid ") or "unknown"


def _held_by(path: Path, holder: str, or_another: str) -> SdexportError:
    """The refusal of ``path``, whose lock file the process ``holder`` (a pid) holds; ``or_another``:
    the refusal's end (``Target.or_another``)."""
    return SdexportError(f"another sdexport process (pid {holder}) is writing {path}; wait for it to "
                         f"finish{or_another}")


def check_target(
    target: Path, kind: OutputKind, *, replace: bool, protected: tuple[Path, ...] = (), force_flag: str = "--force"
) -> Target:
    """Refuse an output path that cannot or must not be written, before any work starts.

    ``replace``: an existing non-empty target may be replaced (still only one of ours).
    ``protected``: paths being read (the model, its config); the target may be neither of them nor
    contain them.
    """
    flag = kind.flag
    if not str(target).strip():
        raise SdexportError(f"{flag}: empty path; give the {kind.what} to create")
    if target.is_symlink():
        raise SdexportError(
            f"{flag} {target} is a symbolic link (to {os.readlink(target)}); sdexport does not write through "
            f"links: pass the real directory or a new path"
        )
    require_creatable(target.parent, f"{flag} {target}")
    if kind.holds_engines:
        require_text_path(target, f"{flag} {target}")
    size, longest = len(os.fsencode(target.name)), name_limit(target.parent) - len(f"..partial-{'9' * 7}")
    if size > longest:  # (its hidden siblings, the staging folder and the lock, add to the name)
        raise SdexportError(f"{flag} {target}: the name {target.name!r} is too long ({size} bytes; at most {longest} "
                            "here); choose a shorter one")
    # The parent resolved (links in it are the user's business), the last part as given.
    path = target.resolve() if target.name in ("", "..") else target.parent.resolve() / target.name
    cwd = Path.cwd().resolve()
    if path == cwd or cwd.is_relative_to(path):
        raise SdexportError(
            f"{flag} {target} is the current directory or contains it; give a new directory such as "
            f"{flag} {kind.example}"
        )
    refuse_inside_engine_dir(path, f"{flag} {target}")
    for source in protected:
        source = source.resolve()
        if source == path or source.is_relative_to(path):
            raise SdexportError(
                f"{flag} {target} would replace {source}, which this command reads; choose another {flag}"
            )
    if path.exists():
        if not path.is_dir():
            raise SdexportError(f"{flag} {target} is a file; {flag} takes the {kind.what} to create")
        if os.path.ismount(path):
            raise SdexportError(
                f"{flag} {target} is a mount point, which cannot be replaced by renaming; write into it "
                f"instead, e.g. {flag} {target / 'NAME'}"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise SdexportError(f"{flag} {target}: no permission to replace it")
        if any(path.iterdir()):
            reason = kind.not_ours(path)
            if not replace and reason is None:
                raise SdexportError(
                    f"{target} exists and is not empty; choose another {flag} or pass {force_flag} to "
                    f"replace it"
                )
            if reason is not None:  # (with or without --force: it was offered, then refused too)
                raise SdexportError(
                    f"{target} is not an sdexport {kind.what} ({reason}); sdexport replaces only "
                    f"directories it wrote. Move it away or choose another {flag}"
                )
    # (after the refusal of a folder that is not ours: -o ~ is told that, not to move the cache out of it)
    check_cache_outside(path, kind.what)
    return Target(path, kind)


@contextlib.contextmanager
def claim(
    target: Path, kind: OutputKind, *, replace: bool, protected: tuple[Path, ...] = (), force_flag: str = "--force"
) -> Iterator[Path]:
    """Hold ``target`` for one job and yield an empty staging directory to build it in.

    When the block returns, the staging directory becomes ``target`` (replacing the old one, which
    was checked to be ours); when it raises (or the process is interrupted), the staging directory
    is removed and ``target`` is as it was.
    """
    checked = check_target(target, kind, replace=replace, protected=protected, force_flag=force_flag)
    checked.created_parents = _make_parents(checked.parent)
    depth = _CLAIMS_OPEN.set(_CLAIMS_OPEN.get() + 1)
    try:
        with _locked(checked):
            _clean_leftovers(checked)
            # Checked again under the lock: another job may have finished writing it meanwhile.
            check_target(target, kind, replace=replace, protected=protected, force_flag=force_flag)
            existed = checked.path.exists()
            staging = _make_staging(checked)
            try:
                if existed:  # before anything is written in it: a setgid folder's group passes to its files
                    _keep_access(checked.path, staging)
                yield staging
                stopping.check()  # a stop whose KeyboardInterrupt was dropped: nothing goes in place
                _move_into_place(staging, checked, existed=existed)
            except OSError as exc:
                named = _naming_a_full_disk(exc, staging, checked.path)  # (before the discard frees space)
                _discard(staging)
                if named is not exc:
                    raise named from exc
                raise
            except BaseException:
                _discard(staging)
                raise
    except BaseException:
        for parent in checked.created_parents:  # deepest first; only folders this job created
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        _CLAIMS_OPEN.reset(depth)


FULL_BELOW = 16 * 1024**2
"""Free bytes under which a file system counts as the full one a write without a file name hit."""


def _naming_a_full_disk(exc: OSError, staging: Path, target: Path) -> OSError:
    """``exc`` naming ``target`` where it is a full disk that named no file (``file.write``, the
    exporter's and onnx's saves into the staging folder) and the staging folder's file system is
    the full one; ``exc`` itself otherwise (a full disk elsewhere, the temporary folder's, is not
    the target's)."""
    if exc.filename is not None or exc.errno != errno.ENOSPC:
        return exc
    try:
        space = os.statvfs(staging)
    except OSError:
        return exc
    if space.f_bavail * space.f_frsize >= FULL_BELOW:
        return exc
    return OSError(exc.errno, exc.strerror, str(target))


_CLAIMS_OPEN: contextvars.ContextVar[int] = contextvars.ContextVar("sdexport_claims_open", default=0)
"""How many ``claim`` blocks are open around this point: a bench's export is one inside the bench's."""


@contextlib.contextmanager
def updating(directory: Path, kind: OutputKind) -> Iterator[None]:
    """Hold ``directory``'s lock while changing it in place (``sdexport build`` adding plans), so that
    an export replacing the same directory cannot run at the same time."""
    real = directory.resolve()  # a link to it and the directory itself take the same lock
    why = unwritable(real.parent) if real.parent.is_dir() else None
    if why is not None:  # (it said "Permission denied" on the lock's hidden name, never given)
        raise SdexportError(f"{directory}: cannot write its lock file beside it, in {real.parent} ({why}); changing an "
                            "engine directory in place takes one there")
    with _locked(Target(real.parent / real.name, kind, in_place=True)):
        yield


def require_writable(directory: Path) -> None:
    """Refuse an engine directory a job is about to change (its manifest, its files) where nothing can
    be written, before the work: a build into a read-only one fused a graph, then failed naming its
    manifest's temporary file. Asked where something will be written, not before: a build whose every
    graph is cached writes nothing, and runs on a read-only mount (a bench's engine cache entry)."""
    why = unwritable(directory)
    if why is not None:
        raise SdexportError(f"{directory}: cannot write in it ({why}); this adds files to it and updates its manifest")


def refuse_inside_engine_dir(path: Path, label: str, *, itself: bool = False) -> None:
    """Refuse a path a command would write (a directory, an image, a log) inside an sdexport engine
    directory: its manifest lists every file in it, so one more makes it no longer provably
    sdexport's (``export --force`` and the builds refuse it then), and a listed one would change.
    ``itself``: ``path`` is a folder the command writes files into, so an engine directory there
    is refused too (an output that replaces one whole, ``check_target``'s, is not)."""
    inside = engine_dir_above(path, itself=itself)
    if inside is not None:
        raise SdexportError(f"{label}: inside the engine directory {inside}, whose manifest lists every file in it; "
                            "give a path outside it")


def engine_dir_above(path: Path, *, itself: bool = False) -> Path | None:
    """The sdexport engine directory that ``path`` lies in (the nearest folder above it whose
    manifest is sdexport's format: another project's ``manifest.json`` is not one), or None.
    ``itself``: ``path`` counts too, as the nearest."""
    import json

    from sdexport.manifest_schema import FORMAT

    resolved = path.resolve()
    for folder in (resolved, *resolved.parents) if itself else resolved.parents:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            data = json.loads(manifest.read_bytes()[:1_000_000] or b"null")
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return folder
    return None


def require_text_path(path: Path, label: str) -> None:
    """Refuse a path that holds bytes UTF-8 does not read (Python keeps them as surrogates): torch's
    ONNX exporter, ONNX Runtime and TensorRT take paths through bindings that accept UTF-8 text
    alone, and failed on one (a wall of a traceback, after the model had loaded and traced)."""
    try:
        str(path.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise SdexportError(f"{label}: its path holds bytes that are not UTF-8 text, which the ONNX tools cannot "
                            "open (torch's exporter, ONNX Runtime, TensorRT); rename it, or use another path") from None


def require_creatable(parent: Path, label: str, *, nothing: str = "nothing can be created") -> None:
    """Refuse (``label: ...``) when nothing can be created at ``parent``: its nearest existing
    ancestor is a file, or cannot be written (``unwritable``). Parents that do not exist yet are fine."""
    ancestor = existing_ancestor(parent)
    if ancestor.is_symlink() and not ancestor.exists():  # (a loop, or a link to what is not there)
        raise SdexportError(f"{label}: {ancestor} is a link that leads nowhere (a loop, or to a path that does "
                            f"not exist), so {nothing} inside it")
    if not ancestor.is_dir():
        raise SdexportError(f"{label}: {ancestor} is a file, so {nothing} inside it")
    problem = unwritable(ancestor)
    if problem:
        raise SdexportError(f"{label}: cannot write in {ancestor} ({problem})")


def unwritable(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (None when one can).

    Tried, not guessed: ``os.access`` says yes to root everywhere, also on /proc and /sys, and
    knows nothing of quotas. An anonymous temporary file (O_TMPFILE where the filesystem has it)
    leaves no name behind.
    """
    if not os.access(directory, os.W_OK | os.X_OK):
        return "no permission, or a read-only filesystem"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    probe = parent
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


LOCK_SUFFIX = ".sdexport-lock"
_LOCK_TEXT = re.compile(rb"^(sdexport pid \d+\n)?$")
"""What a lock file of ours holds: nothing yet, or the holder's pid."""


@contextlib.contextmanager
def _locked(target: Target) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.sdexport-lock`` beside the target, held for the whole job.

    A file of that name that is not ours (a link, or other content) is refused, never truncated
    or removed. The lock file is removed on release; a process that opened it just before that
    re-opens it (its inode no longer matches the path), so two processes never both hold it.
    """
    path = _lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SdexportError(f"{path} is a symbolic link, not sdexport's lock file; remove it") from None
            raise
        if not _LOCK_TEXT.match(os.pread(fd, 64, 0)):
            os.close(fd)
            raise SdexportError(f"{path} exists and is not sdexport's lock file; move it away{target.or_another}")
        try:
            _lock_now(fd)
        except BlockingIOError:
            held = _held_by(target.path, _holder(fd), target.or_another)
            os.close(fd)
            raise held from None
        if still_named(path, fd):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"sdexport pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def not_a_lock_left_behind(path: Path) -> str | None:
    """Why ``path`` is not a lock file of ours that a killed job left (``.NAME.sdexport-lock``: a
    regular file holding what ``_locked`` writes, which no process holds); None when it is one.

    A build changes an engine directory in place, its lock beside it: one inside a benchmark
    output's ``engines/`` (a build of the engines the last run exported) that a CI timeout killed
    left its lock file there, and every later benchmark on that output was refused as not
    sdexport's. Such a file is sdexport's own: the next job on NAME takes it over, and a job that
    replaces the folder holding it discards it with the rest. One a live job holds is refused here:
    sdexport's folder, to be waited for, not moved away."""
    try:  # (not blocking on a named pipe of that name)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return "not a directory"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _LOCK_TEXT.match(os.pread(fd, 64, 0)):
            return "not a directory"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (a probe: a job taking it waits it out, _lock_now)
        except BlockingIOError:
            name = path.name.removeprefix(".").removesuffix(LOCK_SUFFIX)  # (the output may go elsewhere)
            raise _held_by(path.parent / name, _holder(fd), " or choose another -o") from None
        return None
    finally:
        os.close(fd)


def still_named(path: Path, fd: int) -> bool:
    """Whether the file open as ``fd`` is still the one ``path`` names: a lock file removed on release
    leaves a process that opened it just before holding a lock on a file no one else will open, beside
    a new one at the same name (such a process opens it again)."""
    try:
        current = os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return False
    return current == os.fstat(fd).st_ino


def _free_name(target: Target, kind: str) -> Path:
    """``.NAME.KIND-PID``, or ``.NAME.KIND-PIDn`` where a leftover of that name could not be deleted
    (``_discard_or_say``): in a container every run is PID 1, and the stuck leftover ended every
    later job on the target in "Permission denied" (a review's repro). Still a leftover's name."""
    base = f".{target.name}.{kind}-{os.getpid()}"
    path, n = target.parent / base, 0
    while path.exists() or path.is_symlink():
        n += 1
        path = target.parent / f"{base}{n}"
    return path


def _leftovers(target: Target, kind: str) -> list[Path]:
    """Hidden siblings named exactly as sdexport names them: ``.NAME.partial-PID``, ``.NAME.old-PID``."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{kind}-\d+$")
    return sorted(p for p in target.parent.iterdir() if pattern.match(p.name))


def _clean_leftovers(target: Target) -> None:
    """Remove what killed jobs on this target left (we hold the lock: no live job owns them).

    Only folders that still carry sdexport's marker (or are empty) are removed; an old directory
    set aside by an interrupted swap is put back when the target is missing.
    """
    for old in _leftovers(target, "old"):
        if (old / MARKER).exists() and not target.path.exists() and not target.path.is_symlink():
            os.rename(old, target.path)
            (target.path / MARKER).unlink()
            console.print(f"[yellow]note:[/] restored {escape(str(target.path))} from an interrupted run "
                          f"({escape(old.name)})")
        elif _is_leftover(old):
            _discard_or_say(old, "left by an earlier run")
    for partial in _leftovers(target, "partial"):
        if _is_leftover(partial):
            _discard_or_say(partial, "left by an earlier run")


def _is_leftover(path: Path) -> bool:
    """Still marked by sdexport, or empty."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / MARKER).exists() or not any(path.iterdir())


def _make_staging(target: Target) -> Path:
    staging = _free_name(target, "partial")  # (after _clean_leftovers: what is left could not be deleted)
    staging.mkdir()
    (staging / MARKER).touch()
    return staging


def _keep_access(old: Path, new: Path) -> None:
    """``new`` (the staging folder, still empty) takes ``old``'s permissions (setgid included) and
    group, so that a folder the user made private, or shared with a group, stays so once it is
    replaced: what is written in it then gets that group as in the old one (the file modes are the
    umask's, as for anything the user writes there); the group where the user may set it."""
    import stat

    was = old.stat()
    os.chmod(new, stat.S_IMODE(was.st_mode))
    if new.stat().st_gid != was.st_gid:
        with contextlib.suppress(OSError):
            os.chown(new, -1, was.st_gid)


def _move_into_place(staging: Path, target: Target, *, existed: bool) -> None:
    """Swap the finished staging folder in, so that a kill at any moment leaves either marked
    leftovers (removed by the next run) or a finished directory at the target.

    ``existed``: whether the target existed (and was checked) when the job started. Whatever
    appeared there since is checked again now, never swapped out unseen.
    """
    if not existed or not target.path.exists():
        appeared = SdexportError(
            f"{target.path} appeared while sdexport was writing it; nothing was replaced (run again "
            f"with another {target.kind.flag}, or remove it)"
        )
        try:
            moved = _renameat2(staging, target.path, _RENAME_NOREPLACE)
        except FileExistsError:
            raise appeared from None
        if not moved:
            if target.path.exists() or target.path.is_symlink():
                raise appeared
            os.rename(staging, target.path)
        (target.path / MARKER).unlink()
        _in_place(target)
        return
    reason = target.kind.not_ours(target.path) if any(target.path.iterdir()) else None
    if reason is not None:  # changed since the check at the start
        raise SdexportError(f"{target.path} changed while sdexport was writing it ({reason}); nothing was replaced")
    (target.path / MARKER).touch()  # the old directory is ours (checked): marked before it moves
    try:
        exchanged = _renameat2(staging, target.path, _RENAME_EXCHANGE)
    finally:  # whichever directory is at the target now is complete: it carries no marker
        (target.path / MARKER).unlink(missing_ok=True)
    if exchanged:
        _in_place(target)
        _discard_or_say(staging, "the previous directory, set aside")  # (staging now holds it)
        return
    (target.path / MARKER).touch()
    old = _free_name(target, "old")
    with stopping.deferred():  # (a stop raised as the first rename returned left no directory at the path, an audit)
        os.rename(target.path, old)
        try:
            os.rename(staging, target.path)
        except BaseException:
            os.rename(old, target.path)  # put the old directory back rather than leave the path empty
            (target.path / MARKER).unlink()
            raise
        (target.path / MARKER).unlink()
        _in_place(target)  # (a stop held meanwhile is raised after it: "already in place")
    _discard_or_say(old, "the previous directory, set aside")


def _in_place(target: Target) -> None:
    """Say, should the job be stopped from now on (while the old directory is deleted, or a record
    written after), that its output is whole and in place: exit 130 alone would read as lost work.
    Only the command's own output: a claim inside another's (a bench's export, in its staging
    folder or its engine cache) is part of the outer one, which a stop may still discard."""
    if _CLAIMS_OPEN.get() == 1:
        stopping.keep("output", f"already in place: {target.path}")


def _discard_or_say(path: Path, what: str) -> None:
    """``_discard``, where a failure is a note, not the job's end: the new output is in place, and a
    folder that cannot be deleted (a subfolder without write permission: a teammate's, in a shared
    folder) made this job exit 1 and every later one on the target fail before it began."""
    try:
        _discard(path)
    except OSError as exc:
        console.print(f"[yellow]note:[/] could not delete {escape(str(path))} ({what}: {exc.strerror or exc}); "
                      "it stays, marked as sdexport's: delete it yourself")


def _discard(path: Path) -> None:
    """Delete a directory of ours so that a kill half-way leaves it marked (for the next cleanup)."""
    if path.is_symlink() or not path.exists():
        return
    with contextlib.suppress(OSError):
        (path / MARKER).touch()
    for child in path.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the C library or the filesystem does not offer it."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(destination))


STAGED_FOLDERS = ("onnxruntime-cuda",)
"""Folders ``sdexport build`` stages beside their final place (``build.onnxruntime_build.TARGET``)."""


def remove_interrupted_writes(directory: Path, listed: set[str]) -> None:
    """Remove what writes killed mid-way left in ``directory``, the leftovers ``unlisted_files`` counts
    as sdexport's: ``atomic_path``'s temporary files of listed files (a TensorRT plan's: gigabytes)
    and builds' staging folders (``STAGED_FOLDERS``). For a build, which holds the directory's lock
    (``updating``): no live sdexport process writes there meanwhile."""
    for folder in sorted({Path(rel).parent for rel in listed}):
        here = directory / folder
        if here.is_symlink() or not here.is_dir():
            continue
        for entry in sorted(here.iterdir()):
            temp = TEMP_NAME.match(entry.name)
            if temp is None or entry.is_symlink():
                continue
            try:  # (one that cannot be removed, an NFS silly-rename say, fails no build: the next one tries)
                if entry.is_file() and (folder / temp.group("name")).as_posix() in listed:
                    entry.unlink()
                elif entry.is_dir() and temp.group("name") in STAGED_FOLDERS and len(folder.parts) == 1:
                    _discard(entry)
            except OSError:
                continue


def unlisted_files(directory: Path, listed: set[str]) -> list[str]:
    """What under ``directory`` is not in ``listed``: files, links, and folders holding no listed file.

    A temporary file of ``sdexport.atomic`` (``.NAME.PID-RANDOM.tmp``) counts as listed when ``NAME`` is:
    a process killed mid-write leaves one beside the file it was replacing. So does a build's
    staging folder of the same form whose ``NAME`` is a folder builds write (``STAGED_FOLDERS``).
    """
    needed_dirs = {parent.as_posix() for rel in listed for parent in Path(rel).parents} | {"."}
    found = []
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        if base.as_posix() not in needed_dirs:
            temp = TEMP_NAME.match(base.name)
            if temp and temp.group("name") in STAGED_FOLDERS and len(base.parts) == 2:  # <component>/
                dirs[:] = []
                continue
            found.append(base.as_posix() + "/")
            dirs[:] = []  # everything below is unlisted too; naming the folder is enough
            continue
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        for name in [*files, *links]:
            rel = (base / name).as_posix()
            temp = TEMP_NAME.match(name)
            if rel in listed or (temp and (base / temp.group("name")).as_posix() in listed):
                continue
            found.append(rel)
    return sorted(found)

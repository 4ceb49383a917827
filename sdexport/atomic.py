"""Write files so that readers see the old file or the complete new one, never half of one."""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sdexport import stopping

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A write's errors for want of space (a disk, a quota, ``ulimit -f``), which name no file."""

TEMP_SUFFIX = ".tmp"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+(?:-[0-9a-f]{8})?\.tmp$")
"""``atomic_path``'s temporary names, ``.NAME.PID-RANDOM.tmp`` (``.NAME.PID.tmp`` before, and a build's
staging folders): what a process killed mid-write leaves."""


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (what a write there would be decided by)."""
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def name_limit(folder: Path) -> int:
    """The longest file name, in bytes, the file system of ``folder`` takes (255 on most)."""
    try:
        limit = os.pathconf(existing_ancestor(folder), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    return limit if limit > 0 else 255  # -1: no limit set (some FUSE and network file systems)


def longest_name(folder: Path) -> int:
    """The longest file name ``atomic_path`` can write to in ``folder``: the file system's limit
    less what its temporary name adds (``.`` + ``.PID-RANDOM.tmp``, PIDs up to 7 digits), so a name
    that is too long is refused before the work, not after it."""
    return name_limit(folder) - len(f"..{'9' * 7}-{'f' * 8}{TEMP_SUFFIX}")


@contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """``path`` open for reading where it is a regular file (or a link to one); OSError for anything
    else. What an output's name already holds is read to judge whether sdexport wrote it: a FIFO
    there would block an ordinary open until some writer came (the command hung before any work), a
    device would be read without end, a terminal's open has effects of its own. Its type is asked
    first, and what is opened (without blocking, never as a controlling terminal) is asked again."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # (replaced between the two)
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        yield handle


def read_regular(path: Path) -> bytes:
    """The content of ``path`` where it is a regular file (``open_regular``)."""
    with open_regular(path) as handle:
        return handle.read()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to ``path`` only when the block succeeds.

    The name ends in ``.tmp``, so writers that pick a format from the suffix must be told the format.
    It holds the process id and a random part: containers sharing a cache volume each run sdexport
    as the same PID (often 1), and two writers of one temporary name would put a torn file in place.
    It is created with the process's normal permissions (unlike ``mkstemp``'s owner-only mode), so
    the finished file is readable like any other the user writes. A write that fails for want of
    space (or past ``ulimit -f``) raises an OSError naming no file: it is raised again naming ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        yield tmp
        stopping.check()  # a stop whose KeyboardInterrupt was dropped: the new file does not go in place
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None and exc.errno in FULL:  # (another error in the block is not this file's)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)

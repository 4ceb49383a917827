"""Hash each engine file once, then trust a record of its identity until the file changes.

An SD 1.5 directory holds gigabytes; hashing all of it on every ``run`` or ``inspect`` costs seconds
to minutes for files that have not changed. After a file's sha256 is checked, its identity is
recorded: size, modification time, change time, inode and device (``os.stat``). A later check trusts
the recorded hash while all five are the same, and hashes again when any differs. The change time
cannot be set back by a user (``touch -d`` and ``os.utime`` move it forward), so a write to the file,
a replacement or a restored modification time is noticed.

Two rules keep the shortcut safe, as git's index does:

- a file is recorded only if it did not change while it was hashed (the same identity before and after);
- a file is not recorded while its times are within ``RACY_SECONDS`` of now. A write in the same clock
  tick as the hash could leave the times unchanged, so such a file is hashed again next time.

Records live in the user's cache (``sdexport.user_cache``: ``~/.cache/sdexport/hashes`` by default), one file per engine directory,
never inside the directory: it stays exactly what the manifest lists, read-only mounts work, and a
copy to another machine (other inodes) is hashed again there. ``sdexport inspect --verify`` re-hashes
everything. ``SDEXPORT_HASH_RECORDS=0`` turns the records off (every check hashes), e.g. on a
filesystem whose change times are not kept. Records are best effort: a read-only, missing or damaged
cache only means hashing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORDS_FORMAT = 1
RACY_SECONDS = 2.0
ENVIRONMENT = "SDEXPORT_HASH_RECORDS"


def enabled() -> bool:
    from sdexport.console import env_switch

    return env_switch(ENVIRONMENT, default=True)


def records_folder() -> Path | None:
    from sdexport.user_cache import user_cache

    root = user_cache()
    return root / "hashes" if root is not None else None


def identity(stat: os.stat_result) -> list[int]:
    """What must stay the same for a recorded hash to hold."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


@dataclass
class HashRecords:
    """The records of one engine directory: ``{rel: {"sha256", "identity"}}`` and passed checks."""

    directory: str
    path: Path | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def of(cls, directory: Path) -> HashRecords:
        """The directory's records; empty (and never saved) when records are off."""
        real = os.path.realpath(directory)
        folder = records_folder() if enabled() else None
        if folder is None:
            return cls(real, None)
        path = folder / f"{hashlib.sha256(os.fsencode(real)).hexdigest()[:32]}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return cls(real, path)
        if not (isinstance(data, dict) and data.get("format") == RECORDS_FORMAT and data.get("directory") == real
                and isinstance(data.get("files"), dict) and isinstance(data.get("checks"), dict)):
            return cls(real, path)  # another format, or a hash collision of two paths: start afresh
        return cls(real, path, data["files"], data["checks"])

    def recorded(self, rel: str, stat: os.stat_result) -> str | None:
        """``rel``'s recorded sha256 while the file has not changed since it was hashed, else None."""
        entry = self.files.get(rel)
        if isinstance(entry, dict) and entry.get("identity") == identity(stat) and isinstance(entry.get("sha256"), str):
            return str(entry["sha256"])
        return None

    def remember(self, rel: str, sha256: str, before: os.stat_result, after: os.stat_result) -> None:
        """Record ``rel``'s hash, unless it changed while hashed or is too fresh to trust its times."""
        recent = time.time() - RACY_SECONDS
        if identity(before) != identity(after) or max(after.st_mtime, after.st_ctime) > recent:
            self.forget(rel)
            return
        entry = {"sha256": sha256, "identity": identity(after)}
        if self.files.get(rel) != entry:
            self.files[rel] = entry
            self.changed = True

    def sha256(self, rel: str, path: Path, expected: str | None = None, *, rehash: bool = False) -> tuple[str, bool]:
        """``path``'s sha256 (recorded as ``rel``) and whether it was trusted from the record: the
        recorded hash while the file is unchanged (``expected``, where given, must be that hash;
        ``rehash``: never trusted), else hashed now and remembered, unless it differs from ``expected``."""
        from sdexport.manifest import sha256_file

        before = path.stat()
        known = None if rehash else self.recorded(rel, before)
        if known is not None and (expected is None or known == expected):
            return known, True
        digest = sha256_file(path)
        if expected is None or digest == expected:
            self.remember(rel, digest, before, path.stat())
        else:
            self.forget(rel)
        return digest, False

    def forget(self, rel: str) -> None:
        if self.files.pop(rel, None) is not None:
            self.changed = True

    def passed(self, check: str, key: str) -> bool:
        """Whether ``check`` passed before on inputs summed up by ``key``."""
        return self.checks.get(check) == key

    def note_passed(self, check: str, key: str) -> None:
        if self.checks.get(check) != key:
            self.checks[check] = key
            self.changed = True

    def note_failed(self, check: str) -> None:
        if self.checks.pop(check, None) is not None:
            self.changed = True

    def save(self) -> None:
        """Write the records if they changed (atomically; a cache that cannot be written is skipped)."""
        if self.path is None and self.changed and enabled():  # no home to keep them in (user_cache)
            _say_unwritable(None, None)
        if self.path is None or not self.changed:
            return
        from sdexport.atomic import write_atomic

        data = {"format": RECORDS_FORMAT, "directory": self.directory, "files": self.files, "checks": self.checks}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(data) + "\n")
        except OSError as exc:
            _say_unwritable(self.path.parent, exc)
            return
        self.changed = False


_said: set[Path | None] = set()


def file_sha256(path: Path, expected: str | None = None) -> str:
    """Any one file's sha256 (a checkpoint's, outside an engine directory): its recorded hash while it
    has not changed since (``expected``, where given, must be that hash), else hashed now and
    recorded (unless it differs from ``expected``), in the records of its folder."""
    records = HashRecords.of(path.parent)
    try:
        return records.sha256(path.name, path, expected)[0]
    finally:
        records.save()


def _say_unwritable(folder: Path | None, exc: OSError | None) -> None:
    """Say once per folder that records cannot be kept: silently, every run would hash gigabytes again.
    None: there is no cache folder at all (no HOME and no passwd entry: a container's arbitrary uid,
    where every start hashed every file unsaid, an audit)."""
    if folder in _said:
        return
    _said.add(folder)
    from rich.markup import escape

    from sdexport.console import console
    from sdexport.errors import one_line

    where = (f"in {escape(str(folder))} ({escape(one_line(exc, 120))})" if folder is not None and exc is not None
             else "without a home folder (HOME unset, and no passwd entry)")
    console.print(f"[yellow]note:[/] cannot keep hash records {where}, so every check "
                  f"hashes the engine files again; set SDEXPORT_CACHE_DIR to a writable folder, or "
                  f"{ENVIRONMENT}=0 to hash every time without this note", markup=True, highlight=False)

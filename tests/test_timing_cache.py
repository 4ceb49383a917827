"""build --timing-cache: which files sdexport may replace (those it wrote), and its record of them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from sdexport.build import timing_cache
from sdexport.build.timing_cache import is_ours, timing_cache_files


def test_only_a_new_empty_or_recorded_regular_file_is_ours(tmp_path: Path):
    assert is_ours(tmp_path / "new.cache")
    (tmp_path / "empty.cache").touch()
    assert is_ours(tmp_path / "empty.cache")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert not is_ours(fifo) and not is_ours(Path("/dev/null"))  # (never renamed over)
    with timing_cache_files(fifo, replace=False) as files:  # (nor opened: that would wait for a writer)
        assert files == (None, None)
    other = tmp_path / "notes.txt"
    other.write_text("my notes")
    assert not is_ours(other)
    with timing_cache_files(tmp_path / "new.cache", replace=True) as (_, out):
        assert out is not None
        out.write(b"entries")
    assert is_ours(tmp_path / "new.cache")  # recorded as written
    (tmp_path / "new.cache").write_bytes(b"changed")
    assert not is_ours(tmp_path / "new.cache")
    folder = timing_cache.timing_folder()
    assert folder is not None and not is_ours(folder / timing_cache.WRITTEN)  # (the record itself)
    folder.joinpath(timing_cache.LOCK).touch()  # (its lock, in the folder whose caches are all ours)
    assert not is_ours(folder / timing_cache.LOCK)


def test_builds_finishing_at_once_each_keep_their_record(tmp_path: Path, monkeypatch):
    read = timing_cache._written

    def slow() -> dict[str, str]:  # every reader reads before any writes, but for the lock
        record = read()
        time.sleep(0.2)
        return record

    monkeypatch.setattr(timing_cache, "_written", slow)
    paths = [tmp_path / f"{i}.cache" for i in range(3)]
    threads = [threading.Thread(target=timing_cache._remember, args=(p, "ab" * 32)) for p in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {str(p) for p in paths} <= set(read())


def test_a_cache_changed_meanwhile_by_another_tool_is_left_as_it_is(tmp_path: Path, capsys):
    cache = tmp_path / "shared.cache"
    with timing_cache_files(cache, replace=True) as (_, out):
        assert out is not None
        out.write(b"first")
    with timing_cache_files(cache, replace=True) as (_, out):
        assert out is not None
        out.write(b"second")
        cache.write_bytes(b"another tool's")  # while the build runs
    assert cache.read_bytes() == b"another tool's"
    assert "changed while the build ran (not by sdexport): left as it is" in " ".join(capsys.readouterr().err.split())
    assert [p.name for p in tmp_path.iterdir()] == ["shared.cache"]


def test_a_failed_build_leaves_the_cache_and_no_temporary(tmp_path: Path):
    cache = tmp_path / "x.cache"
    cache.write_bytes(b"")
    with pytest.raises(RuntimeError), timing_cache_files(cache, replace=True) as (_, out):
        assert out is not None
        out.write(b"half")
        raise RuntimeError("failed")
    assert cache.read_bytes() == b"" and [p.name for p in tmp_path.iterdir()] == ["x.cache"]


def test_a_build_that_saves_no_entries_leaves_the_cache_as_it_was(tmp_path: Path):
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"old entries")
    with timing_cache_files(cache, replace=True):
        pass
    assert cache.read_bytes() == b"old entries"


def test_a_cache_another_sdexport_build_replaced_meanwhile_is_replaced_again(tmp_path: Path):
    """Two builds finishing one after the other: the later one's entries are kept (the earlier
    build's file is sdexport's, recorded), not set aside as a user's."""
    cache = tmp_path / "shared.cache"
    with timing_cache_files(cache, replace=True) as (_, out):
        out.write(b"first")
    with timing_cache_files(cache, replace=True) as (_, out):
        out.write(b"second")
        with timing_cache_files(cache, replace=True) as (_, other):
            other.write(b"another sdexport build")
    assert cache.read_bytes() == b"second"


def test_a_damaged_record_of_written_caches_claims_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SDEXPORT_CACHE_DIR", str(tmp_path / "cache"))  # (not the session's record)
    folder = timing_cache.timing_folder()
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / timing_cache.WRITTEN).write_text("[]")
    user = tmp_path / "x.cache"
    user.write_bytes(b"x")
    assert not is_ours(user)

"""Engine files are hashed once and then trusted while unchanged; any change is hashed again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from sdexport import hash_records, manifest
from sdexport.errors import EngineDirError
from sdexport.manifest import load_manifest, verify_files_of


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The files sha256_file reads; records trusted at once (no wait for the racy window)."""
    seen: list[str] = []
    real = manifest.sha256_file

    def counting(path: Path, *args, **kwargs) -> str:
        if path.name != "manifest.json":  # inspect's key of its load check reads it every time
            seen.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    monkeypatch.setattr(hash_records, "RACY_SECONDS", 0.0)
    return seen


def test_unchanged_files_are_hashed_once(engine_copy: Path, counted: list[str]):
    listing = sorted(p.relative_to(engine_copy) for p in engine_copy.rglob("*"))
    first = verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))
    assert first.hashed == len(counted) > 10 and first.trusted == 0
    counted.clear()
    again = verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))
    assert (again.hashed, again.trusted, counted) == (0, first.hashed, [])
    rehashed = verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False), rehash=True)
    assert rehashed.hashed == first.hashed
    assert sorted(p.relative_to(engine_copy) for p in engine_copy.rglob("*")) == listing  # nothing written there


def test_a_change_that_keeps_size_and_mtime_is_still_noticed(engine_copy: Path, counted: list[str]):
    """The change time moves on every write and cannot be set back, unlike the modification time."""
    verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))
    graph = engine_copy / "unet" / "model.onnx"
    before = graph.stat()
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert graph.stat().st_size == before.st_size and graph.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(EngineDirError, match="unet/model.onnx does not match its sha256"):
        verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))


def test_fresh_files_and_disabled_records_are_hashed_every_time(engine_copy: Path, counted: list[str], monkeypatch):
    monkeypatch.setattr(hash_records, "RACY_SECONDS", 3600.0)  # every file is "just written"
    verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))
    n = len(counted)
    verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))
    assert len(counted) == 2 * n
    monkeypatch.setattr(hash_records, "RACY_SECONDS", 0.0)
    monkeypatch.setenv(hash_records.ENVIRONMENT, "0")
    for _ in range(2):
        verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))
    assert len(counted) == 4 * n


def test_inspect_trusts_records_and_verify_hashes_all(engine_copy: Path, counted: list[str], capsys):
    """(inspect also hashes the few small tokenizer and scheduler files for its load-check key every
    time; the graphs are what must not be read again.)"""
    def graphs() -> int:
        return sum(name.endswith(".onnx") for name in counted)

    assert run_cli("inspect", engine_copy) == 0
    assert "unchanged since" not in capsys.readouterr().err
    files = len(load_manifest(engine_copy, verify_files=False).files)
    read = graphs()
    assert read >= 4
    assert run_cli("inspect", engine_copy) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert graphs() == read and f"({files} unchanged since an earlier hash; --verify hashes all)" in err
    assert "tokenizers and scheduler loaded before with these files and libraries" in err
    assert run_cli("inspect", engine_copy, "--verify") == 0
    assert graphs() == 2 * read and "tokenizers and scheduler load" in capsys.readouterr().err
    (engine_copy / "vae_decoder" / "model.onnx").write_bytes(b"garbage")
    assert run_cli("inspect", engine_copy) == 2
    assert "vae_decoder/model.onnx does not match its sha256" in capsys.readouterr().err


def test_a_check_that_fails_is_forgotten_and_unlisted_tokenizer_files_count(engine_copy: Path, capsys, monkeypatch):
    """inspect trusts an earlier load of the tokenizers only for the same files, listed or not
    (transformers reads special_tokens_map.json whether the manifest lists it or not)."""
    monkeypatch.setattr(hash_records, "RACY_SECONDS", 0.0)
    assert run_cli("inspect", engine_copy) == 0
    (engine_copy / "tokenizer" / "special_tokens_map.json").write_text('{"bos_token": 5}')
    assert run_cli("inspect", engine_copy) == 2
    assert "special_tokens_map.json not in the manifest" in capsys.readouterr().err
    (engine_copy / "tokenizer" / "special_tokens_map.json").unlink()
    assert run_cli("inspect", engine_copy) == 0
    assert "tokenizers and scheduler load" in " ".join(capsys.readouterr().err.split())
    records = hash_records.HashRecords.of(engine_copy)
    assert "runnable" in records.checks
    records.note_failed("runnable")
    assert "runnable" not in records.checks


def test_records_are_skipped_without_a_cache_and_odd_paths_work(tmp_path: Path, engine_copy: Path, monkeypatch,
                                                                 capsys):
    from sdexport import user_cache

    monkeypatch.delenv(user_cache.ENVIRONMENT)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    monkeypatch.setattr(hash_records, "_said", set())
    monkeypatch.setattr(hash_records, "RACY_SECONDS", -10)  # (the copy's files are seconds old: kept all the same)
    assert user_cache.user_cache() is None and hash_records.HashRecords.of(engine_copy).path is None
    for _ in range(2):
        verify_files_of(engine_copy, load_manifest(engine_copy, verify_files=False))  # hashes, records nothing
    # said once (a container's uid without a home hashed every file at every start, unsaid: an audit)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("note: cannot keep hash records without a home folder (HOME unset") == 1, err
    assert "set SDEXPORT_CACHE_DIR to a writable folder" in err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(user_cache.ENVIRONMENT, "cache")  # relative: made absolute, so a later chdir keeps it
    assert user_cache.user_cache() == tmp_path / "cache"
    odd = tmp_path / os.fsdecode(b"odd-\xff")
    engine_copy.rename(odd)
    verify_files_of(odd, load_manifest(odd, verify_files=False))


def test_a_cache_that_cannot_be_written_is_said_once(tmp_path: Path, engine_copy: Path, monkeypatch, capsys):
    """Silently, every run would hash the engine files again; the note says so once, and the run goes on."""
    from sdexport import user_cache

    (tmp_path / "d[").mkdir()
    blocker = tmp_path / "d[" / "b][red]"  # '.../d[/b][red]': rich markup in the path, printed as it is
    blocker.write_text("not a folder")
    monkeypatch.setenv(user_cache.ENVIRONMENT, str(blocker))
    monkeypatch.setattr(hash_records, "_said", set())
    assert run_cli("inspect", engine_copy) == 0
    assert run_cli("inspect", engine_copy) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count(f"note: cannot keep hash records in {blocker / 'hashes'}") == 1
    assert "so every check hashes the engine files again; set SDEXPORT_CACHE_DIR to a writable folder" in err


@pytest.mark.parametrize("variable, inside", [("SDEXPORT_CACHE_DIR", ""), ("SDEXPORT_CACHE_DIR", "unet"),
                                             ("XDG_CACHE_HOME", "unet")])
def test_a_cache_inside_an_engine_directory_is_refused(engine_copy: Path, monkeypatch, capsys, variable, inside):
    """The records would be files its manifest does not list, written into it by a run (and
    ``export --force`` then refuses it): refused in one line, nothing written, whichever variable
    put the cache there."""
    before = sorted(engine_copy.rglob("*"))
    monkeypatch.delenv("SDEXPORT_CACHE_DIR", raising=False)
    monkeypatch.setenv(variable, str(engine_copy / inside))
    assert run_cli("inspect", engine_copy) == 2
    out, err = capsys.readouterr()
    assert out == ""  # (before the summary, which it printed whole first)
    assert f"error: {variable}={engine_copy / inside}" in " ".join(err.split()) and len(err.strip().splitlines()) == 1
    assert f"inside the engine directory {engine_copy}" in " ".join(err.split())
    assert sorted(engine_copy.rglob("*")) == before


@pytest.mark.parametrize("where", ["another", "target"])
def test_an_export_refuses_a_cache_it_would_refuse_afterwards_before_it_reads_any_weight(
        engine_copy: Path, tmp_path: Path, monkeypatch, capsys, where):
    """The check ran after the export (its hash records): the directory was in place and the command
    exited 2, so a script took a good export for a failed one. A cache inside another engine
    directory, or inside the one this export writes, is refused before the work."""
    target = tmp_path / "new"
    cache = engine_copy if where == "another" else target / "cache"
    monkeypatch.setenv("SDEXPORT_CACHE_DIR", str(cache))
    assert run_cli("export", "tiny", "-o", target, "--verify", "none") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: SDEXPORT_CACHE_DIR={cache}: inside" in err and "Loading" not in err, err
    assert not target.exists()


def test_a_file_changed_while_it_was_hashed_is_not_recorded(tmp_path: Path, monkeypatch):
    """The digest may be of neither version: a record of it would vouch for the file as it is now."""
    monkeypatch.setattr(hash_records, "RACY_SECONDS", 0.0)
    file = tmp_path / "x"
    file.write_bytes(b"a")
    real = manifest.sha256_file

    def while_written(path, *args, **kwargs):
        digest = real(path, *args, **kwargs)
        path.write_bytes(b"bb")
        return digest

    monkeypatch.setattr(manifest, "sha256_file", while_written)
    records = hash_records.HashRecords("d", None)
    records.sha256("x", file)
    assert "x" not in records.files


def test_a_file_copied_with_its_old_mtime_is_as_fresh_as_its_ctime(tmp_path: Path, monkeypatch):
    """``cp -p`` keeps an old mtime; the fresh ctime still says the file was just written."""
    import time

    monkeypatch.setattr(hash_records, "RACY_SECONDS", 60.0)
    file = tmp_path / "x"
    file.write_bytes(b"a")
    os.utime(file, (time.time() - 7200,) * 2)
    records = hash_records.HashRecords("d", None)
    records.sha256("x", file)
    assert "x" not in records.files


def test_the_cache_is_a_folder_of_its_own_in_xdg_cache_home(tmp_path: Path, monkeypatch):
    """Where the hash records (and timing caches) live without SDEXPORT_CACHE_DIR: not loose in the cache home."""
    from sdexport import user_cache

    monkeypatch.delenv(user_cache.ENVIRONMENT, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache.user_cache() == tmp_path / "sdexport"

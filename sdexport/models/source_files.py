"""The weight files an export read, fingerprinted, so that the Torch backend reloads those weights.

An engine directory holds graphs, not PyTorch weights: ``--backend torch`` (and the bench's Torch
contenders) reload the model from the paths the manifest records. A checkpoint overwritten since
the export (trained further, another download under the same name) would then run other weights
than the graphs hold, and a benchmark would blame the engines for the difference. The export records
the sha256 of every weight file it read (``model.source.files``, by absolute path); the reload works
out again which files it reads, refuses any other set, and checks each hash, trusting a file's
earlier hash while it is unchanged (``sdexport.hash_records``), so an unchanged multi-GB checkpoint
is hashed once, at its first export. Presets have no files: their seed is their
weights. Manifests written before this record carry none, and are reloaded unchecked as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sdexport.errors import EngineDirError, ModelLoadError
from sdexport.hash_records import file_sha256, identity
from sdexport.models.outline import PIPELINE_PARTS, is_vae_file, library_of, weight_files
from sdexport.models.part_sources import adapter_records


def source_weight_files(source: Mapping[str, Any], modules: Iterable[str]) -> list[Path]:
    """The weight files of ``source`` (a manifest's ``model.source``) that the parts ``modules``
    were exported from: a single file whole, a diffusers directory's parts' files, a replaced VAE's,
    and every ControlNet's and T2I-Adapter's read from a directory."""
    modules = set(modules)
    files: list[Path] = []
    if source.get("kind") == "single_file":
        files.append(Path(source["path"]))
    elif source.get("kind") == "diffusers":
        root = Path(source["path"])
        for part in PIPELINE_PARTS:
            if part in modules and not (part == "vae" and source.get("vae")):
                files += weight_files(root / part, library_of(part))
    if source.get("vae") and "vae" in modules:
        vae = Path(source["vae"])
        files += [vae] if is_vae_file(vae) else weight_files(vae, "diffusers")
    for record in [*(source.get("controlnets") or []), *adapter_records(source)]:
        if record.get("kind") == "diffusers":
            files += weight_files(Path(record["path"]), "diffusers")
    return files


def part_made_from(recorded: Mapping[str, Any], preset: str | None, path: Path | None,
                   files: Mapping[str, str]) -> bool | None:
    """``made_from`` for a ControlNet or T2I-Adapter record of a manifest's ``model.source``
    (``part_sources.part_record``): a preset by name (its default seed), a directory by path, or by
    its weight files' sha256 among the manifest's ``files`` where the paths differ. None where the
    manifest cannot tell."""
    kind = recorded.get("kind")
    if preset is not None or kind == "preset":
        return kind == "preset" and recorded.get("name") == preset and recorded.get("seed", 0) == 0
    if path is None or not isinstance(recorded.get("path"), str):
        return None
    return _same_files(Path(recorded["path"]), path, files, lambda here: weight_files(here, "diffusers"))


def _same_files(root: Path, path: Path, files: Mapping[str, str], weights: Callable[[Path], list[Path]]) -> bool | None:
    """Whether ``path`` is what a manifest recorded at ``root``: the same place, or, elsewhere, weight
    files (``weights(path)``) whose sha256 are those ``files`` records under ``root``; None where it
    records none there."""
    here = path.resolve()
    if root.resolve() == here:
        return True
    theirs = [sha for name, sha in files.items() if Path(name).is_relative_to(root)]
    if not theirs:
        return None
    return sorted(fingerprint(weights(here)).values()) == sorted(theirs)


def fingerprint(files: Iterable[Path]) -> dict[str, str]:
    """``{absolute path: sha256}`` of ``files``, by the paths the loader reads (a symbolic link is
    hashed through, and a link pointed elsewhere later is another file's hash), each hash recorded
    for the reload to trust."""
    return {str(path.absolute()): file_sha256(path.absolute()) for path in files}


def stamps(files: Iterable[Path]) -> dict[Path, list[int]]:
    """Each file's identity (size, times, inode, device) now, for ``check_stamps`` once it was read."""
    return {path: identity(path.stat()) for path in files}


def check_stamps(taken: Mapping[Path, list[int]]) -> None:
    """Refuse a file that is no longer the one stamped. A diffusers folder's weights are hashed before
    the export reads them, one part at a time: a file replaced in between gave a manifest recording
    the old file's hash beside graphs of the new one's weights (an audit's race; a single file is
    stamped on its own, ``single_file.check_unchanged``)."""
    for path, stamp in taken.items():
        try:
            now = identity(path.stat())
        except OSError:
            now = None
        if now != stamp:
            raise ModelLoadError(f"{path}: the file changed while the export read it (its size, times or inode), so the "
                                 "graphs and the recorded hash may be of two files; run again once it is in its final state")


def check_unchanged(source: Mapping[str, Any], modules: Iterable[str]) -> None:
    """The reload of ``modules`` from ``source`` reads the very files the manifest records
    (``source["files"]``), each with its sha256, else one error naming the first that differs. A
    manifest without the record is trusted as before. The files are worked out again, not only the
    recorded ones checked: a checkpoint that gained a file its loader prefers (a .safetensors beside
    the .bin that was read) would otherwise be loaded unchecked."""
    if not preset_unchanged(source):  # (its parts' files are checked below)
        raise EngineDirError(
            f"the preset {preset_name(source)}'s configs changed since this export (another sdexport): the Torch "
            "backend would build another model than the graphs hold; export it again, or choose another backend")
    recorded: Mapping[str, str] = source.get("files") or {}
    if not recorded:
        return
    for name in recorded:
        if not Path(name).is_file():
            raise EngineDirError(f"the Torch backend needs {name}, which the manifest records and which is gone")
    now = {str(path.absolute()) for path in source_weight_files(source, modules)}
    new, dropped = sorted(now - set(recorded)), sorted(set(recorded) - now)
    if new:
        raise EngineDirError(
            f"the Torch backend would now read {new[0]}, not the weight files the manifest records: the checkpoint "
            "changed since; export again from it, or choose another backend"
        )
    if dropped:
        raise EngineDirError(f"the manifest records {dropped[0]} among the weight files the export read, but its "
                             "model.source no longer names the part it belongs to: the manifest was edited")
    for name, expected in recorded.items():
        path = Path(name)
        if file_sha256(path, expected) != expected:
            raise EngineDirError(
                f"{path} changed since the manifest recorded it (its sha256 differs): the Torch backend would run "
                "other weights than the graphs hold; export again from it, or choose another backend"
            )


def relocated(recorded: Mapping[str, Any], here: Mapping[str, Any], modules: Iterable[str]) -> dict[str, Any]:
    """The ``model.source`` to reload ``modules`` from: the manifest's ``recorded`` one (its ``--vae``,
    ``config`` and seed kept) with the checkpoint, ControlNets and adapters read where ``here`` has
    them (what loading the same checkpoint on this machine records: a bench scenario's copy of the
    one an engine cache's export was made from on another runner), once those files prove, by
    sha256, to be the files ``recorded`` names; ``recorded`` itself where it records no files (a
    preset alone; a manifest older than the record), as before. Other content is refused in one line."""
    theirs: Mapping[str, str] = recorded.get("files") or {}
    if not theirs:
        return dict(recorded)
    moved = _moved_part(recorded, here)
    for key in ("controlnets", "adapters"):  # each part where this machine has it, in the export's order
        ours, mine = recorded.get(key), here.get(key)
        if isinstance(ours, list) and isinstance(mine, list) and len(ours) == len(mine):
            moved[key] = [_moved_part(o, m) for o, m in zip(ours, mine)]
    if isinstance(recorded.get("adapter"), dict) and isinstance(here.get("adapter"), dict):
        moved["adapter"] = _moved_part(recorded["adapter"], here["adapter"])
    files = fingerprint(source_weight_files(moved, modules))
    if sorted(files.values()) != sorted(theirs.values()):
        where = here.get("path") or here.get("name")
        raise EngineDirError(f"{where} is not the checkpoint the engines were exported from (its weight files' "
                             "sha256 differ from the manifest's model.source.files): the Torch backend would run "
                             "other weights than the graphs hold")
    return {**moved, "files": files}


def _moved_part(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> dict[str, Any]:
    """A source's record (the checkpoint's, a ControlNet's or an adapter's), read where ``here`` has it
    (a preset's stays as it was)."""
    return {**recorded, **({"path": here["path"]} if "path" in here else {})}


def preset_name(source: Mapping[str, Any]) -> str | None:
    """The preset a model's record builds from: a preset's own, or a single file's ``--config`` given
    as a preset name (which its record holds with the digest, ``config_sha256``); else None."""
    kind = source.get("kind")
    if kind == "preset":
        return str(source.get("name"))
    return str(source["config"]) if kind == "single_file" and "config_sha256" in source else None


def preset_unchanged(source: Mapping[str, Any]) -> bool:
    """A preset's record (``config_sha256``: a preset's, or a single file's read with one) matches
    the preset as this sdexport builds it; a record from before the digest is trusted, as a
    checkpoint's without file hashes is (and any other source: nothing to compare)."""
    from sdexport.models.presets import config_digest, get_preset

    name, recorded = preset_name(source), source.get("config_sha256")
    if name is None or recorded is None:
        return True
    preset = get_preset(name)
    return preset is not None and config_digest(preset) == recorded


def made_from(recorded: Mapping[str, Any], preset: str | None, path: Path | None, modules: Iterable[str]) -> bool | None:
    """Whether a manifest's ``model.source`` (``recorded``) is the checkpoint a benchmark names: a
    preset by name (and its default seed), a checkpoint here by path, or by its weight files' sha256
    where the paths differ (a copy elsewhere). None where the manifest cannot tell: an ONNX export
    adopted without its checkpoint, or a checkpoint whose files it does not record."""
    kind = recorded.get("kind")
    if kind == "onnx":
        return None
    if preset is not None or kind == "preset":
        return (kind == "preset" and recorded.get("name") == preset and recorded.get("seed", 0) == 0
                and preset_unchanged(recorded))
    if path is None or not isinstance(recorded.get("path"), str):
        return None
    if (kind == "single_file") != path.resolve().is_file():
        return False
    parts = set(modules) - ({"vae"} if recorded.get("vae") else set())  # a replaced VAE is not the checkpoint's
    return _same_files(Path(recorded["path"]), path, recorded.get("files") or {},
                       lambda here: source_weight_files({"kind": kind, "path": str(here)}, parts))

"""The weight files an export read, fingerprinted, so that the Torch backend reloads those weights.

An engine directory holds graphs, not PyTorch weights: ``--backend torch`` (and the bench's eager
contenders) reload the model from the paths the manifest records. A checkpoint overwritten since
the export (trained further, another download under the same name) would then run other weights
than the graphs hold, and a benchmark would blame the engines for the difference. The export records
the sha256 of every weight file it read (``model.source.files``, by absolute path); the reload checks
them first, trusting a file's earlier hash while it is unchanged (``sdexport.hash_records``), so an
unchanged multi-GB checkpoint is hashed once, at export. Presets have no files: their seed is their
weights. Manifests written before this record carry none, and are reloaded unchecked as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sdexport.errors import EngineDirError
from sdexport.models.outline import library_of, weight_files

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""The parts of a diffusers model directory that sdexport reads, each in its own folder."""


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
        files += weight_files(Path(source["vae"]), "diffusers")
    adapters = source.get("adapters") or ([source["adapter"]] if isinstance(source.get("adapter"), dict) else [])
    for record in [*(source.get("controlnets") or []), *adapters]:
        if record.get("kind") == "diffusers":
            files += weight_files(Path(record["path"]), "diffusers")
    return files


def fingerprint(files: Iterable[Path]) -> dict[str, str]:
    """``{absolute path: sha256}`` of ``files``, each hash recorded for the reload to trust."""
    return {str(path.resolve()): _sha256(path.resolve()) for path in files}


def check_unchanged(fingerprints: Mapping[str, str]) -> None:
    """Every file the export read still has its sha256, else one error naming the first that does not."""
    for name, expected in fingerprints.items():
        path = Path(name)
        if not path.is_file():
            raise EngineDirError(f"the Torch backend needs {path}, which the manifest records and which is gone")
        if _sha256(path, expected) != expected:
            raise EngineDirError(
                f"{path} changed since the manifest recorded it (its sha256 differs): the Torch backend would run "
                "other weights than the graphs hold; export again from it, or choose another backend"
            )


def _sha256(path: Path, expected: str | None = None) -> str:
    """``path``'s sha256: ``expected`` where an earlier hash of the unchanged file said so, else hashed
    now (and remembered when it matches or nothing was expected)."""
    from sdexport.hash_records import HashRecords
    from sdexport.manifest import sha256_file

    records = HashRecords.of(path.parent)
    before = path.stat()
    if expected is not None and records.trusted(path.name, expected, before):
        return expected
    digest = sha256_file(path)
    if expected is None or digest == expected:
        records.remember(path.name, digest, before, path.stat())
    else:
        records.forget(path.name)
    records.save()
    return digest

"""Where a part exported beside the base model comes from (a ControlNet, a T2I-Adapter), and how the
manifest records it.

Both kinds are named the same way on the command line: a preset, or a diffusers checkpoint directory
(or a pipeline directory holding one in its subfolder). One algorithm resolves both, so they are
found, refused and recorded alike; each kind only says what it is called (``PartKind``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sdexport.errors import ModelLoadError
from sdexport.setting_names import option_given

Preset = TypeVar("Preset")


@dataclass(frozen=True)
class PartKind:
    flag: str
    """The export option that names it: ``--controlnet``."""
    title: str
    """What users call it: ``ControlNet``."""
    folder: str
    """Its folder in a diffusers pipeline directory: ``controlnet``."""
    class_name: str
    """Its diffusers class: ``ControlNetModel``."""
    several: str
    """What a pipeline holding more than one calls them: ``MultiControlNetModel``."""
    in_pipeline: Callable[[Path], tuple[Path, ...]]
    """Its folders in a pipeline directory, in diffusers' order (``controlnet/``, ``controlnet_1/``, ...)."""
    from_single_file: bool = False
    """Whether its diffusers class reads an original-layout file (``ControlNetModel`` does;
    ``T2IAdapter`` has no ``from_single_file``): what a file given for it is told."""


def _the_one_part_of(pipeline: Path, part: PartKind) -> Path:
    from sdexport.setting_names import option

    found = part.in_pipeline(pipeline)
    if len(found) > 1:
        flag = option(part.flag)
        each = (" ".join(f"{flag} {p}" for p in found) if flag.startswith("--") else  # a scenario's list
                f"{flag} = [{', '.join(repr(str(p)) for p in found)}]")
        raise ModelLoadError(f"{pipeline}: a {part.several} ({', '.join(p.name + '/' for p in found)}); pass its "
                             f"folders one each, in order ({each}), or the pipeline directory as the model")
    return found[0] if found else pipeline / part.folder


def resolve_part(argument: str, kind: str | None, part: PartKind, presets: Mapping[str, Preset],
                 elsewhere: Mapping[str, tuple[str, str]] | None = None) -> tuple[Preset | None, Path | None]:
    """``argument`` as a preset (the preset, None) or a checkpoint directory (None, its path); refused
    in one line otherwise.

    A preset name means the preset unless a checkpoint of that name is in the way (an engine
    directory named after the preset is not one). ``kind`` ("preset" or "diffusers", as a manifest
    records it) decides without looking. A pipeline directory gives its one part; one holding
    several (``part.several``) is refused with the flags that name each: taking the first would
    drop the others without a word. ``elsewhere``: the preset names of the other kinds of part, each
    with the flag and title that take it (``--controlnet tiny-adapter`` says to pass it as ``--adapter``)."""
    elsewhere = elsewhere or {}
    path = Path(argument)
    preset = presets.get(argument)
    if kind == "preset" or (kind is None and preset is not None and not _checkpoint_dir(path, part.folder)):
        if preset is None:
            raise ModelLoadError(f"{part.title} preset {argument!r} is not one of {', '.join(presets)}")
        return preset, None
    what = option_given(part.flag, argument)
    if argument.strip() and path.is_file():  # (an original-layout file: how most ControlNets are shared)
        convert = (f" (convert a single file with diffusers' {part.class_name}.from_single_file(FILE)"
                   ".save_pretrained(DIR))" if part.from_single_file else ", its config.json beside its weights")
        raise ModelLoadError(f"{what}: a file; it takes a diffusers {part.class_name} directory{convert}")
    if not argument.strip() or not path.is_dir():
        if argument in elsewhere:
            from sdexport.setting_names import option

            flag, title = elsewhere[argument]
            raise ModelLoadError(f"{what}: a {title} preset, not a {part.title} one: pass it as {option(flag)}")
        raise ModelLoadError(f"{what}: no such directory, and not a {part.title} preset ({', '.join(presets)})")
    if (path / "manifest.json").is_file() or (path / part.folder / "model.onnx").is_file():
        raise ModelLoadError(f"{what}: an ONNX engine directory, not a {part.title} checkpoint (pass the diffusers "
                             f"{part.class_name} directory it was exported from)")
    if not (path / "config.json").is_file() and (path / part.folder / "config.json").is_file():
        path = _the_one_part_of(path, part)  # a pipeline's directory
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{what}: not a diffusers {part.class_name} directory (no config.json)")
    from sdexport.models.outline import weight_files

    try:
        weight_files(path, "diffusers")
    except ModelLoadError as exc:
        raise ModelLoadError(f"{what}: {exc}") from None
    return None, path


def _checkpoint_dir(path: Path, folder: str) -> bool:
    """A diffusers checkpoint directory of the part (or a pipeline's, with it in ``folder``), not an
    ONNX export."""
    return path.is_dir() and not (path / "manifest.json").is_file() and (
        (path / "config.json").is_file() or (path / folder / "config.json").is_file())


def adapter_records(source: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A manifest's ``model.source`` T2I-Adapter records, in order: one is recorded as ``adapter``,
    several as ``adapters`` (``loader.add_adapters``)."""
    one = source.get("adapter")
    return list(source.get("adapters") or ([one] if isinstance(one, dict) else []))


def part_record(preset_name: str | None, path: Path | None, seed: int) -> dict[str, Any]:
    """How the Torch backend finds a part again (``model.source`` in the manifest): a preset by name
    and seed, a directory by its absolute path."""
    if preset_name is not None:
        return {"kind": "preset", "name": preset_name, "seed": seed}
    assert path is not None
    return {"kind": "diffusers", "path": str(path.resolve())}

"""Saving generated images with the parameters that made them.

PNG keeps them as text chunks, JPEG and WebP in EXIF: the A1111-style "parameters" text (which many
image tools read) as PNG ``parameters`` / EXIF UserComment, and sdexport's full record as JSON
(PNG ``sdexport`` / EXIF ImageDescription, with Software "sdexport VERSION"). The format follows
the file name's suffix; other suffixes are refused before anything runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.atomic import atomic_path
from sdexport.errors import SdexportError
from sdexport.runtime.request import TEXTS
from sdexport.specs import SDXL_REFINER

if TYPE_CHECKING:  # the output checks run before torch is imported
    from sdexport.runtime.request import GenerationRequest
    from sdexport.runtime.txt2img import GenerationResult


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Suffix → Pillow format; a name without a suffix is written as PNG."""
JPEG_QUALITY = 95
JPEG_EXIF_LIMIT = 65_000
"""A JPEG's EXIF segment holds 64 KB (less its header)."""
_SOFTWARE, _DESCRIPTION, _EXIF_IFD, _USER_COMMENT = 0x0131, 0x010E, 0x8769, 0x9286
_WHITESPACE = re.compile(r"[ \t\n\r]+")
"""What every tokenizer here reads as one space (Python's ``\\s`` also takes control characters that
transformers' slow CLIP tokenizer drops instead)."""


def image_format(path: Path, label: str | None = None) -> str:
    """The format ``path``'s suffix asks for (PNG without one); any other suffix is refused.
    ``label``: how errors name the path (``-o PATH`` in the CLI's words, the default)."""
    suffix = path.suffix.lower()
    if not suffix:
        return "PNG"
    if suffix not in IMAGE_FORMATS:
        raise SdexportError(f"{label or f'-o {path}'}: sdexport writes .png, .jpg/.jpeg or .webp images, "
                            f"not {path.suffix}")
    return IMAGE_FORMATS[suffix]


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for a batch."""
    if count == 1:
        return [output]
    return [numbered_path(output, i) for i in range(count)]


def numbered_path(output: Path, i: int) -> Path:
    """A batch's ``i``-th image: ``out-{i}.png``."""
    return output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}")


def refuse_a_folder_name(given: str | os.PathLike[str], label: str) -> None:
    """Refuse an image path given with a trailing separator, a folder's name: ``Path`` drops the
    separator, and a file named like the folder (or ``NAME-0.png``... beside it) was written."""
    from sdexport.errors import pasteable

    text = os.fspath(given)
    if text.endswith(("/", os.sep)):
        raise SdexportError(f"{label}: a folder (it ends in a separator); give a file name such as "
                            f"{pasteable(text + 'image.png')}")


def check_image_output(output: Path, count: int, label: str | None = None) -> None:
    """Refuse an image path that cannot be written, or a file that sdexport did not write, up front.

    An existing file is replaced only when it is an image that sdexport made (it carries our
    metadata): generating must never overwrite a user's own picture; nor is one written inside an
    engine directory, whose manifest lists every file in it. ``label``: how errors name the path
    (``-o PATH``, the CLI's words, by default; the Python API names the path alone).
    """
    if not str(output).strip() or output.name in ("", ".", ".."):
        raise SdexportError(f"{'-o ' if label is None else ''}{str(output)!r}: give an image file name "
                            "such as out/image.png")
    label = label or f"-o {output}"
    try:
        is_dir = output.is_dir()
    except OSError as exc:  # (a name too long: the Python API's save was a traceback, an audit)
        import errno

        shorter = "; choose a shorter name" if exc.errno == errno.ENAMETOOLONG else ""
        raise SdexportError(f"{label}: {exc.strerror}{shorter}") from None
    if is_dir:
        raise SdexportError(f"{label} is a directory; give a file name such as {output / 'image.png'}")
    image_format(output, label)
    from sdexport.output_dir import refuse_inside_engine_dir, require_creatable

    refuse_inside_engine_dir(output, label)  # (GenerationResult.save wrote there: an audit's finding)
    require_creatable(output.parent, label, nothing="no image can be written")  # every image's folder
    from sdexport.atomic import longest_name

    longest = longest_name(output.parent)
    for path in output_paths(output, count):
        size = len(os.fsencode(path.name))
        if size > longest:
            raise SdexportError(f"{label}: the file name {path.name!r} is too long ({size} bytes; at most {longest} "
                                "here); choose a shorter one")
        if path.is_symlink() or path.is_dir():
            raise SdexportError(f"{label}: {path} is a directory or a link; choose another name")
        if path.exists() and not _written_by_sdexport(path):
            raise SdexportError(
                f"{label}: {path} exists and was not written by sdexport; choose another name or move it"
            )


def _written_by_sdexport(path: Path) -> bool:
    from PIL import Image

    from sdexport.atomic import open_regular

    try:
        with open_regular(path) as handle, Image.open(handle) as image:  # (its header, not the whole file)
            if image.format == "PNG":
                return "sdexport" in getattr(image, "text", {})
            if not str(image.getexif().get(_SOFTWARE, "")).startswith("sdexport "):
                return False
            return {"seed", "steps", "scheduler"} <= set(_record(image))
    except Exception:  # not an image at all
        return False


def _used(result: GenerationResult, name: str, i: int) -> str | None:
    """The text of field ``name`` for image ``i`` as the text encoder read it (None: not used)."""
    request = result.request
    texts = getattr(request, name)
    if not texts or (name.startswith("negative") and not request.cfg):
        return None
    cut = result.truncated.get(name)
    return cut[i] if cut and cut[i] is not None else texts[i]


def _control_params(request: GenerationRequest, family: str, i: int) -> list[dict[str, Any]]:
    """Each control image's scale and window for image ``i``, and its mode for a union ControlNet."""
    settings = request.control_settings(len(request.control_image or []), family, i)
    modes: list[int | None] = list(request.control_mode or []) or [None] * len(settings)
    return [{"scale": scale, "start": start, "end": end, **({"mode": mode} if mode is not None else {})}
            for (scale, start, end), mode in zip(settings, modes)]


def _adapters(request: GenerationRequest) -> int:
    """How many T2I-Adapters ``request`` feeds: the images each of its entries holds."""
    first = (request.adapter_image or [None])[0]
    return len(first) if isinstance(first, tuple | list) else 1


def _sdxl_params(result: GenerationResult, i: int) -> dict[str, Any]:
    """The SDXL-only fields, where they were given (the refiner's aesthetic scores always)."""
    request = result.request
    params: dict[str, Any] = {}
    for name in ("prompt_2", "negative_prompt_2"):
        used = _used(result, name, i)
        if used is not None:
            params[name] = used
    for name in ("original_size", "target_size"):
        if getattr(request, name) is not None:
            params[name] = list(getattr(request, name))
    if tuple(request.crops_coords_top_left) != (0, 0):  # (the API's [0, 0] is no crop either)
        params["crops_coords_top_left"] = list(request.crops_coords_top_left)
    if result.family == SDXL_REFINER:  # what the time ids held, given or diffusers' default
        score, negative = request.aesthetic_scores()
        params["aesthetic_score"] = score
        if request.cfg:  # (only CFG's unconditional half reads it)
            params["negative_aesthetic_score"] = negative
    return params


def save_images(result: GenerationResult, output: Path, info: dict[str, Any] | None = None, *,
                first: int = 0, count: int | None = None, label: str | None = None,
                per_image: dict[str, list[Any]] | None = None,
                on_written: Callable[[Path], None] | None = None) -> list[Path]:
    """Write ``result``'s images to ``output`` (``NAME-0.EXT``, ... for several) in the format of its
    suffix, each with the parameters that made it; ``info`` adds to (and overrides) ``result.info``,
    and ``per_image`` adds each image's own value of a key (a list over all ``count`` images, such
    as the control image files given one per image). ``first`` and ``count``: the images are
    numbers ``first``... of ``count`` written in several calls. ``on_written(path)``: after each
    image is in place (a later one may fail: the caller can say which are written).

    Refuses to replace a file sdexport did not write; each file appears whole or not at all.
    """
    count = len(result.images) if count is None else count
    check_image_output(output, count, label)
    paths = output_paths(output, count)[first:first + len(result.images)]
    for i, path in enumerate(paths):
        with atomic_path(path) as tmp:
            own = {name: values[first + i] for name, values in (per_image or {}).items()}
            _save(result, i, {**result.info, **(info or {}), **own}, tmp, image_format(path))
        if on_written is not None:
            on_written(path)
    return paths


def png_bytes(result: GenerationResult, i: int, info: dict[str, Any] | None = None) -> bytes:
    """Image ``i`` as the PNG file ``save_images`` writes (what the Triton model returns), with
    ``result.info``: what ran for this image (the VAE parts' fallbacks, an encoder only where one
    ran), not the pipeline's record; ``info`` adds to it (an ensemble's base model's half)."""
    import io

    buffer = io.BytesIO()
    _save(result, i, {**result.info, **(info or {})}, buffer, "PNG")
    return buffer.getvalue()


def _save(result: GenerationResult, i: int, info: dict[str, Any], target: Any, fmt: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    from sdexport import __version__

    text, record = image_parameters(result, i, info)
    if fmt == "PNG":
        meta = PngInfo()
        meta.add_text("parameters", text)
        meta.add_text("sdexport", json.dumps(record))
        result.images[i].save(target, format="PNG", pnginfo=meta)
        return
    exif = _exif(text, record, __version__)
    if fmt == "JPEG" and len(exif.tobytes()) > JPEG_EXIF_LIMIT:
        exif = _shorter_jpeg_exif(result, i, record, __version__)
    result.images[i].save(target, format=fmt, exif=exif, quality=JPEG_QUALITY)


def _shorter_jpeg_exif(result: GenerationResult, i: int, record: dict[str, Any], version: str) -> Any:
    """A JPEG keeps EXIF in one 64 KB segment: record what the text encoders read, not every byte given.

    First the over-long texts the encoder did not read are left out; then runs of spaces, tabs and
    newlines in the texts become one space, which CLIP's tokenizers read as the same tokens (they
    collapse whitespace themselves), so the record still remakes the image. A record too long even
    then is refused -- after the run, but only paths thousands of characters long get there.
    """
    for shorter in (_texts_read(record, collapse=False), _texts_read(record, collapse=True)):
        exif = _exif(_a1111_text(result, i, shorter), shorter, version)
        if len(exif.tobytes()) <= JPEG_EXIF_LIMIT:
            return exif
    raise SdexportError("the image's parameters are too long for a JPEG's EXIF (64 KB); write .png or .webp")


def _texts_read(record: dict[str, Any], collapse: bool) -> dict[str, Any]:
    """``record`` (and an ensemble's base model's record in it) without the texts as given beyond
    what the text encoder read and, with ``collapse``, with the texts' whitespace runs as one space."""
    shorter = {**record}
    if "truncated_from" in shorter:
        shorter["truncated_from"] = "left out: longer than a JPEG's EXIF holds"
    if collapse:
        changed = {name: _WHITESPACE.sub(" ", shorter[name]).strip() for name in TEXTS
                   if isinstance(shorter.get(name), str)}
        if any(shorter[name] != text for name, text in changed.items()):
            shorter.update(changed, whitespace="runs collapsed to one space, as the text encoders read them: "
                                               "the texts as given are longer than a JPEG's EXIF holds")
    if isinstance(shorter.get("base"), dict):
        shorter["base"] = _texts_read(shorter["base"], collapse)
    return shorter


def _exif(text: str, record: dict[str, Any], version: str) -> Any:
    from PIL import Image

    exif = Image.Exif()
    exif[_SOFTWARE] = f"sdexport {version}"
    exif[_DESCRIPTION] = json.dumps(record)  # ASCII (json escapes the rest), as EXIF wants
    ifd = exif.get_ifd(_EXIF_IFD)
    ifd[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")  # as A1111 writes it
    exif[_EXIF_IFD] = ifd  # Pillow 10.0 (the floor) hands out a new IFD it never writes; 13 stores it
    return exif


def read_parameters(path: Path) -> dict[str, Any]:
    """The sdexport record saved with an image (any format ``save_images`` writes); {} if none."""
    from PIL import Image

    with Image.open(path) as image:
        return _record(image)


def _record(image: Any) -> dict[str, Any]:
    """An open image's sdexport record (PNG chunk ``sdexport``, EXIF ImageDescription); {} if none."""
    text = getattr(image, "text", {}).get("sdexport") if image.format == "PNG" else image.getexif().get(_DESCRIPTION)
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


GIVEN_EMPTY = ("negative_prompt", "prompt_2", "negative_prompt_2")
"""Texts recorded even when given empty: on SDXL an empty negative prompt is encoded, where none at
all is zeros (``force_zeros_for_empty_prompt``), and an empty ``prompt_2`` is not ``prompt``."""


def image_parameters(result: GenerationResult, i: int, info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The parameters that made image ``i``: the A1111-style text many image tools read, and the full
    record. The scheduler is the one that ran (``default`` resolved); empty fields are left out."""
    request = result.request
    cut = {name: getattr(request, name)[i] for name, kept in result.truncated.items() if kept[i] is not None}
    params = {
        "prompt": _used(result, "prompt", i) or "",
        "negative_prompt": _used(result, "negative_prompt", i),
        "seed": request.seeds[i],
        "steps": request.steps,
        "scheduler": result.scheduler or request.scheduler,
        "guidance": request.guidance_scales(result.family)[i],
        **({"guidance_rescale": request.guidance_rescale} if request.guidance_rescale and request.cfg else {}),
        "height": request.height,
        "width": request.width,
        **({"emphasis": request.emphasis} if request.emphasis != "none" else {}),
        **_sdxl_params(result, i),
        **({"task": request.task, "strength": request.effective_strength(result.family)}
           if request.task != "txt2img" and request.denoising_start is None else {}),
        **({"task": request.task, "denoising_start": request.denoising_start}  # from a base model's latents
           if request.denoising_start is not None else {}),
        **({"denoising_end": request.denoising_end} if request.denoising_end is not None else {}),
        **({"truncated_from": cut} if cut else {}),
        **({"control": _control_params(request, result.family, i)} if request.control_image else {}),
        **({"guess_mode": True} if result.guess_mode else {}),
        **({"adapter": {"scale": request.adapter_scale_of(i, _adapters(request)), "factor": request.adapter_factor_of(i)}}
           if request.adapter_image else {}),
        **info,
    }
    params = {k: v for k, v in params.items() if v not in ("", None, [], {}) or (v == "" and k in GIVEN_EMPTY)}
    return _a1111_text(result, i, params), params


def _a1111_text(result: GenerationResult, i: int, params: dict[str, Any]) -> str:
    """The A1111-style "parameters" text of image ``i``, from its record ``params``. An ensemble's
    image (the refiner's, its base model's half under ``base``) is said as A1111 says a run with a
    refiner: the base model's strength and clip skip, then the refiner and its switch point."""
    request = result.request
    base = params.get("base") if isinstance(params.get("base"), dict) else None
    first = base if base is not None else params  # (the settings A1111 reads as the run's are the base model's)
    return "\n".join([
        params.get("prompt", ""),
        *([f"Negative prompt: {params['negative_prompt']}"] if params.get("negative_prompt") else []),
        f"Steps: {request.steps}, Sampler: {result.sampler or params['scheduler']}, CFG scale: {params['guidance']}, "
        f"Seed: {request.seeds[i]}, Size: {request.width}x{request.height}"
        + (f", Denoising strength: {first['strength']}" if "strength" in first else "")
        + (f", Clip skip: {first['clip_skip'] + 1}" if "clip_skip" in first else "")  # (A1111 counts from 1)
        + _a1111_emphasis(request.emphasis, params)
        + (f", Refiner: {_a1111_value(Path(str(params.get('engine_dir', 'refiner'))).name)}, "
           f"Refiner switch at: {params['denoising_start']}" if base is not None and "denoising_start" in params else ""),
    ])


def _a1111_value(text: str) -> str:
    """A value of the A1111 text as A1111 writes one (``quote``): in JSON quotes where it holds a
    comma, a colon or a line break, which its parser would read as the field's end."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _a1111_emphasis(emphasis: str, params: dict[str, Any]) -> str:
    """A1111's "Emphasis" parameter: written, as A1111 writes it, where a text has a bracket and the
    mode is not A1111's default (``original``), which a reader of the text would otherwise apply."""
    from sdexport.runtime.emphasis import A1111_NAMES, has_brackets

    if emphasis == "original" or not has_brackets([params.get("prompt"), params.get("negative_prompt")]):
        return ""
    return f", Emphasis: {A1111_NAMES[emphasis]}"

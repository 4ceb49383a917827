"""Saving generated images with the parameters that made them, as PNG text chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.atomic import atomic_path
from sdexport.errors import SdexportError

if TYPE_CHECKING:  # the output checks run before torch is imported
    from sdexport.runtime.txt2img import GenerationResult


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for a batch."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(count)]


def check_image_output(output: Path, count: int) -> None:
    """Refuse an image path that cannot be written, or a file that sdexport did not write, up front.

    An existing file is replaced only when it is a PNG that sdexport made (it carries our
    ``sdexport`` metadata): generating must never overwrite a user's own picture.
    """
    if not str(output).strip() or output.name in ("", ".", ".."):
        raise SdexportError(f"-o {str(output)!r}: give an image file name such as out/image.png")
    if output.is_dir():
        raise SdexportError(f"-o {output} is a directory; give a file name such as {output / 'image.png'}")
    from sdexport.output_dir import require_creatable

    require_creatable(output.parent, f"-o {output}", nothing="no image can be written")  # every image's folder
    for path in output_paths(output, count):
        if path.is_symlink() or path.is_dir():
            raise SdexportError(f"-o {output}: {path} is a directory or a link; choose another name")
        if path.exists() and not _written_by_sdexport(path):
            raise SdexportError(
                f"-o {output}: {path} exists and was not written by sdexport; choose another name or move it"
            )


def _written_by_sdexport(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and "sdexport" in getattr(image, "text", {})
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


def _sdxl_params(result: GenerationResult, i: int) -> dict[str, Any]:
    """The SDXL-only fields, where they were given."""
    request = result.request
    params: dict[str, Any] = {}
    for name in ("prompt_2", "negative_prompt_2"):
        used = _used(result, name, i)
        if used is not None:
            params[name] = used
    for name in ("original_size", "target_size"):
        if getattr(request, name) is not None:
            params[name] = list(getattr(request, name))
    if request.crops_coords_top_left != (0, 0):
        params["crops_coords_top_left"] = list(request.crops_coords_top_left)
    return params


def save_images(result: GenerationResult, output: Path, info: dict[str, Any]) -> list[Path]:
    check_image_output(output, len(result.images))
    paths = output_paths(output, len(result.images))
    for i, path in enumerate(paths):
        with atomic_path(path) as tmp:
            result.images[i].save(tmp, format="PNG", pnginfo=png_metadata(result, i, info))
    return paths


def png_bytes(result: GenerationResult, i: int, info: dict[str, Any]) -> bytes:
    """Image ``i`` as the PNG file ``save_images`` writes (what the Triton model returns)."""
    import io

    buffer = io.BytesIO()
    result.images[i].save(buffer, format="PNG", pnginfo=png_metadata(result, i, info))
    return buffer.getvalue()


def png_metadata(result: GenerationResult, i: int, info: dict[str, Any]) -> Any:
    """The parameters that made image ``i``, as PNG text chunks: the A1111-style line many image
    tools read, and the full record as JSON under ``sdexport``."""
    from PIL.PngImagePlugin import PngInfo

    request = result.request
    prompt = _used(result, "prompt", i) or ""
    negative = _used(result, "negative_prompt", i) or ""
    cut = {name: getattr(request, name)[i] for name, kept in result.truncated.items() if kept[i] is not None}
    params = {
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": request.seeds[i],
        "steps": request.steps,
        "scheduler": request.scheduler,
        "guidance": request.guidance,
        "height": request.height,
        "width": request.width,
        **_sdxl_params(result, i),
        **({"task": request.task, "strength": request.effective_strength(info.get("family", "sd"))}
           if request.task != "txt2img" else {}),
        **({"truncated_from": cut} if cut else {}),
        **({"control": [{"scale": scale, "start": start, "end": end}
                        for scale, start, end in request.control_settings(len(request.control_image))]}
           if request.control_image else {}),
        **info,
    }
    meta = PngInfo()
    meta.add_text(
        "parameters",
        f"{prompt}\nNegative prompt: {negative}\nSteps: {request.steps}, Sampler: "
        f"{request.scheduler}, CFG scale: {request.guidance}, Seed: {request.seeds[i]}, "
        f"Size: {request.width}x{request.height}"
        + (f", Denoising strength: {params['strength']}" if "strength" in params else ""),
    )
    meta.add_text("sdexport", json.dumps(params))
    return meta

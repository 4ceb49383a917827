"""Saving generated images with the parameters that made them, as PNG text chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdexport.atomic import atomic_path
from sdexport.errors import SdexportError
from sdexport.runtime.txt2img import GenerationRequest, GenerationResult


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for a batch."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(count)]


def _sdxl_params(request: GenerationRequest, i: int) -> dict[str, Any]:
    """The SDXL-only fields, where they were given."""
    params: dict[str, Any] = {}
    if request.prompt_2:
        params["prompt_2"] = request.prompt_2[i]
    if request.negative_prompt_2:
        params["negative_prompt_2"] = request.negative_prompt_2[i]
    for name in ("original_size", "target_size"):
        if getattr(request, name) is not None:
            params[name] = list(getattr(request, name))
    if request.crops_coords_top_left != (0, 0):
        params["crops_coords_top_left"] = list(request.crops_coords_top_left)
    return params


def save_images(result: GenerationResult, output: Path, info: dict[str, Any]) -> list[Path]:
    from PIL.PngImagePlugin import PngInfo

    request = result.request
    if output.is_dir():
        raise SdexportError(f"-o {output} is a directory; give a file name such as {output / 'image.png'}")
    paths = output_paths(output, len(result.images))
    for i, (image, path) in enumerate(zip(result.images, paths)):
        negative = request.negative_prompt[i] if request.negative_prompt else ""
        params = {
            "prompt": request.prompt[i],
            "negative_prompt": negative,
            "seed": request.seeds[i],
            "steps": request.steps,
            "scheduler": request.scheduler,
            "guidance": request.guidance,
            "height": request.height,
            "width": request.width,
            **_sdxl_params(request, i),
            **info,
        }
        meta = PngInfo()
        # The A1111-style line many image tools read, and the full record as JSON.
        meta.add_text(
            "parameters",
            f"{request.prompt[i]}\nNegative prompt: {negative}\nSteps: {request.steps}, Sampler: "
            f"{request.scheduler}, CFG scale: {request.guidance}, Seed: {request.seeds[i]}, "
            f"Size: {request.width}x{request.height}",
        )
        meta.add_text("sdexport", json.dumps(params))
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=meta)
    return paths

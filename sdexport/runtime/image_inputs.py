"""Images given to the loop (img2img's init image, inpainting's mask): read, sized and turned into
the tensors diffusers' image processors make, so the same inputs give the same latents.

An image is used at the request's size. One of another size is refused unless the caller asks for a
fit, and the fit is said out loud: ``resize`` stretches it (aspect ratio changes), ``crop`` scales it
to cover the size and cuts the overflow equally from both sides. Masks follow the same fit, are read
as greyscale and binarised at 50% (white = repaint), as ``VaeImageProcessor`` does for masks.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.errors import SdexportError, looks_like_a_url, one_line
from sdexport.setting_names import assigned, setting

if TYPE_CHECKING:
    import torch

FITS = ("exact", "resize", "crop")
"""How an image of another size is made the request's size: refused, stretched, or scaled and cropped."""


def read_image(path: Path, what: str, mode: str | None = "RGB", made: str = "L") -> Any:
    """The PIL image at ``path`` as the viewer shows it (EXIF orientation applied, as diffusers'
    ``load_image`` does), converted to ``mode`` (RGB for images; None, for masks, control and adapter
    images: as it is, in 8 bits, for diffusers' processors resize those before they convert them, and
    the loop does so, ``binary_mask``, ``control_pixels``; ``made``: the mode it must convert to
    then, L for a mask, RGB for the others) and fully decoded now: a truncated, huge or unconvertible
    file fails here, in one line, not mid-run."""
    _refuse_unreadable(path, what)
    return _decode(path, f"{what} {path}", mode, made)


def read_image_size(path: Path, what: str) -> tuple[int, int]:
    """The (width, height) the image file at ``path`` declares, as stored (before its EXIF
    orientation), read from its header alone: a size the engines cannot take is refused before
    the file is decoded (a 13000x13000 photo took 12 s and 2 GB to be refused, an audit)."""
    _refuse_unreadable(path, what)
    return _declared_size(path, f"{what} {path}")


def _refuse_unreadable(path: Path, what: str) -> None:
    """Refuse ``path`` where it is not a regular file, in one line that says what it is."""
    if path.is_dir():
        raise SdexportError(f"{what} {path}: a directory; give an image file")
    if not path.is_file():  # (a device such as /dev/zero, or a pipe, would be read without end)
        raise SdexportError(f"{what} {path}: " + ("not a regular file; give an image file" if path.exists()
                                                  else "a URL? sdexport reads local files: download it first"
                                                  if looks_like_a_url(str(path)) else "no such file"))


def decode_image(data: bytes, what: str, mode: str | None = "RGB", made: str = "L") -> Any:
    """``read_image`` for an image's bytes (a served request's PNG or JPEG)."""
    return _decode(_in_memory(data, what), what, mode, made)


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """The (width, height) an image's bytes declare, read from its header alone: what decoding it
    would allocate is known before it is decoded (``decode_image``)."""
    return _declared_size(_in_memory(data, what), what)


def _declared_size(source: Any, what: str) -> tuple[int, int]:
    with _opened(source, what) as image:
        width, height = image.size
        return width, height


def _in_memory(data: bytes, what: str) -> Any:
    import io

    if not data:
        raise SdexportError(f"{what}: empty (expected the bytes of a PNG or JPEG file)")
    return io.BytesIO(data)


def _decode(source: Any, what: str, mode: str | None, made: str) -> Any:
    from PIL import ImageOps

    with _opened(source, what) as image:
        image.load()
        upright = eight_bits(readable_mode(ImageOps.exif_transpose(image), what, mode or made), what,
                             file_format=image.format)  # (the transposed copy has none)
        return upright if mode is None else upright.convert(mode)


def transparency_note(image: Any, what: str) -> str | None:
    """A note where ``image`` (a mask, control or adapter image, read in its own mode) has pixels
    not fully opaque: diffusers' processors, whose order sdexport keeps, read them as the colour
    hidden under them at the image's own size but as black where they resize it (Pillow resizes
    with premultiplied alpha), so a mask whose transparent pixels hide white repainted all of the
    image at its size and a third of it resized (an audit). None where it is opaque."""
    if "A" not in image.getbands() or image.getchannel("A").getextrema()[0] == 255:
        return None
    return (f"{what} has transparent pixels: they are read as the colour under them at the image's own size, as "
            "black where it is resized (as diffusers reads them); save it without transparency to say which")


def readable_mode(image: Any, what: str, mode: str) -> Any:
    """``image``, where Pillow converts its mode to ``mode`` (masks are read greyscale, other images
    RGB); else refused in one line (a CIELab TIFF mask, Pillow's premultiplied ``La``), not with
    Pillow's ValueError once the engines have loaded."""
    from PIL import Image

    if not image.mode.startswith("I") and image.mode != "F":  # (``eight_bits`` makes those 8-bit first)
        try:
            Image.new(image.mode, (1, 1)).convert(mode)
        except ValueError:
            raise SdexportError(f"{what}: Pillow's {image.mode} mode, which it cannot convert to {mode}; save it as "
                                "RGB or greyscale") from None
    return image


SIXTEEN_BIT_FORMATS = ("PNG", "PPM")
"""Formats whose greyscale holds 16 bits at most: Pillow before 11 opens such a PNG in mode ``I``
(32-bit), which elsewhere (a TIFF, ``Image.fromarray`` of int32) may hold 8-bit values."""


def eight_bits(image: Any, what: str, file_format: str | None = None) -> Any:
    """``image`` in one of Pillow's 8-bit modes where it is greyscale of more bits (``_eight_bit``),
    32-bit integers (``_from_whole``) or floating point (``_from_float``), else as it is: files are
    read so (``_decode``), and so are the Python API's PIL images, so that a 16-bit mask repaints
    the same pixels either way (Pillow's own ``convert`` would clip it). ``file_format``: the
    format it was read from, where ``image`` (a copy) no longer says."""
    if image.mode.startswith("I;16") or (image.mode == "I" and (file_format or image.format) in SIXTEEN_BIT_FORMATS):
        return _eight_bit(image)
    if image.mode == "I":
        return _from_whole(image, what)
    if image.mode == "F":
        return _from_float(image, what)
    return image


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "PSD", "QOI", "JPEG2000")
"""The formats an input image is read in (Pillow's names; a camera's MPO opens as JPEG). Not every
format Pillow reads: an EPS file is handed to Ghostscript, a program a served request's bytes
must never reach; Pillow's ICO reader decodes a frame as it opens, at the frame's own size, not the
one its header declares, so a small icon could spend hundreds of MB before ``image_size`` refused it
(an audit's 236 KB file, 9000x9000 inside); the scientific and legacy ones are no one's input images."""


@contextlib.contextmanager
def _opened(source: Any, what: str) -> Iterator[Any]:
    """The image Pillow opens at ``source`` (its header read, its pixels not yet), what fails while
    it is read or converted said in one line that names ``what``."""
    from PIL import Image, UnidentifiedImageError

    Image.init()  # (a Pillow without a reader of one of them, AVIF before 11.2, reads the others)
    try:
        with Image.open(source, formats=[name for name in IMAGE_FORMATS if name in Image.OPEN]) as image:
            yield image
    except Image.DecompressionBombError as exc:
        raise SdexportError(f"{what}: too large to read safely ({one_line(exc)})") from None
    except UnidentifiedImageError:
        raise SdexportError(f"{what}: not a readable image (not PNG, JPEG, WebP or another format sdexport reads: "
                            f"{', '.join(IMAGE_FORMATS[3:])}; or a damaged file of one of them)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:  # (SyntaxError: a broken PNG chunk)
        raise SdexportError(f"{what}: not a readable image ({one_line(exc)})") from None


def _eight_bit(image: Any) -> Any:
    """A 16-bit greyscale image (a depth map, a mask from an editor) at 8 bits, scaled: Pillow's
    ``convert`` clips it instead, so a 30% grey mask came out white (all repainted) and a depth
    map nearly white. (Pillow reads 16-bit colour images at 8 bits already.)"""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def _from_whole(image: Any, what: str) -> Any:
    """A 32-bit integer greyscale image (a TIFF, ``Image.fromarray`` of int32) at 8 bits: 0 to 255
    kept, up to 65535 read as 16 bits (``_eight_bit``); a 0/255 mask was divided by 257, so it
    repainted nothing. Negative or larger values are refused, not guessed."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise SdexportError(f"{what}: a 32-bit integer image with values from {low} to {high}; sdexport reads 0 to "
                            "255 (or to 65535) as black to white: save it as an 8- or 16-bit PNG")
    return Image.fromarray(values.astype(np.uint8), "L") if high <= 255 else _eight_bit(image)


def _from_float(image: Any, what: str) -> Any:
    """A floating-point greyscale image (a mask or depth map from a segmentation or depth tool, in
    TIFF) at 8 bits: 0 to 1 scaled to 0 to 255, 0 to 255 kept. Pillow's ``convert`` clips instead,
    so a 0/1 mask came out black (nothing repainted); any other range is refused, not guessed."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise SdexportError(f"{what}: a floating-point image with NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise SdexportError(f"{what}: a floating-point image with values from {low:g} to {high:g}; sdexport reads "
                            "0 to 1 (or 0 to 255) as black to white: save it as an 8- or 16-bit PNG")
    scale = 255 if high <= 1 else 1
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")


def fit_image(image: Any, height: int, width: int, fit: str, what: str,
              multiple: int | None = None) -> tuple[Any, str | None]:
    """``image`` at (height, width), and a note saying how it was changed (None: it already was).
    ``multiple``: what the model's image sides must be multiples of, so that a refusal suggests the
    image's own size only where the engines could make it."""
    from PIL import Image

    if fit not in FITS:
        raise SdexportError(f"{setting('fit')} {fit!r}: choose one of {', '.join(FITS)}")
    # 8 bits first, as files are read: Lanczos overshoots a float or 32-bit mask's 0 and 1 (-0.11 to
    # 1.22), which the request then refused as a range it does not read (an audit)
    image = eight_bits(image, what)
    size = (width, height)
    if image.size == size:
        return image, None
    given = f"{image.size[1]}x{image.size[0]}"
    if fit == "exact":
        fits = f"{assigned('fit', 'resize')} / {assigned('fit', 'crop')} to make it fit"
        if multiple and (image.size[0] % multiple or image.size[1] % multiple):  # its own size cannot be asked for
            raise SdexportError(f"{what} is {given} (HxW), the request {height}x{width}: pass {fits} (its own size is "
                                f"no multiple of {multiple}, as the model's sides must be)")
        raise SdexportError(
            f"{what} is {given} (HxW), the request {height}x{width}: pass {assigned('height', image.size[1])} "
            f"{assigned('width', image.size[0])} (within the engines' profile), or {fits}"
        )
    if fit == "resize":
        return image.resize(size, Image.Resampling.LANCZOS), f"{what} resized from {given} to {height}x{width}"
    scale = max(width / image.size[0], height / image.size[1])
    scaled = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
    # (one side already the request's and the other longer: a crop alone, said as one)
    how = f"scaled from {given} to {scaled[1]}x{scaled[0]} and" if scaled != image.size else f"({given})"
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    note = f"{what} {how} cropped to {height}x{width} (centre)"
    if scaled == image.size:
        return image.crop((left, top, left + width, top + height)), note
    # the crop's box in the image's own pixels, scaled alone (the same pixels, to rounding): the whole
    # image scaled first takes memory as its long side times the request's short one, gigabytes for
    # a thin strip of a few hundred bytes (a served request's too)
    x, y = scaled[0] / image.size[0], scaled[1] / image.size[1]
    box = (left / x, top / y, (left + width) / x, (top + height) / y)
    return image.resize(size, Image.Resampling.LANCZOS, box=box), note


def check_image(image: Any, height: int | None, width: int | None, what: str) -> None:
    """The Python API's check: a PIL image of the request's size (None: of any size)."""
    size = getattr(image, "size", None)
    if size is None or not hasattr(image, "convert"):
        raise SdexportError(f"{what}: expected a PIL image, got {type(image).__name__}")
    if min(size) < 1:
        raise SdexportError(f"{what} is empty ({size[1]}x{size[0]})")
    readable_mode(image, what, "L" if what == "mask" else "RGB")
    if height is not None and tuple(size) != (width, height):
        raise SdexportError(
            f"{what} is {size[1]}x{size[0]} (HxW), the request {height}x{width}: give images of the request's "
            "size (sdexport.runtime.image_inputs.fit_image resizes or crops one)"
        )
    # its pixels, which Pillow reads on first use (after the checks its header answers: a review), from a
    # file closed since: a bare AssertionError mid-call (an AttributeError under python -O)
    try:
        image.load()
    except (AssertionError, AttributeError, OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        said = ("its file is closed: opened in a `with Image.open(...)` block that has ended?"
                if isinstance(exc, AssertionError | AttributeError) else one_line(exc))
        raise SdexportError(f"{what}: its pixels cannot be read ({said}); load the image while its file is open "
                            "(image.load() or image.copy())") from None


def pixels(images: list[Any], batch: int) -> torch.Tensor:
    """(batch, 3, H, W) float32 in [-1, 1]: the images as diffusers' ``VaeImageProcessor`` normalises
    them; a single image serves every prompt."""
    import numpy as np
    import torch

    arrays = [np.asarray(eight_bits(i, "image").convert("RGB"), dtype=np.float32) / 255.0 for i in images]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return per_prompt(tensor * 2.0 - 1.0, batch)


def image_mode(channels: int) -> str:
    """The PIL mode an image is read in for a graph that takes ``channels``: greyscale for one."""
    return "L" if channels == 1 else "RGB"


def control_pixels(image: Any, height: int, width: int, channels: int = 3, what: str = "control image", *,
                   convert_first: bool = False) -> torch.Tensor:
    """(1, channels, H, W) float32 in [0, 1]: a ControlNet's conditioning image as diffusers' control
    image processor makes it (resized to the request's size with Lanczos, then RGB, not normalised),
    or a T2I-Adapter's as its pipelines do (the same; ``channels`` 1: greyscale, for the sketch and
    canny adapters, which diffusers leaves to the caller's image mode). The resize comes first, in
    the image's own mode, as diffusers orders them: PIL resizes a palette or 1-bit image by the
    nearest pixel and an RGBA one premultiplied, so converting first gave other pixels (latents
    0.17 rel-L2 off diffusers for a 1-bit map, measured once). ``convert_first``: a T2I-Adapter's
    image, which diffusers' adapter pipelines resize and read as it is, taking only an image already
    in the adapter's mode (a palette or RGBA one fails there): it is converted to that mode first,
    as a diffusers user converts it (resized by the nearest pixel instead, a palette map gave
    latents 3.4e-2 rel-L2 off the reference, an audit)."""
    import numpy as np
    import torch
    from PIL import Image

    image = readable_mode(eight_bits(image, what), what, image_mode(channels))
    if convert_first:
        image = image.convert(image_mode(channels))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    image = image.convert(image_mode(channels))
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def masked_control_pixels(images: list[Any], masks: list[Any]) -> torch.Tensor:
    """(n, 3, H, W) float32: the init images in [0, 1] with the masks' repaint region (at least half
    white) set to -1, one row per image or mask given (one of each broadcasts to the other). What
    inpainting ControlNets read, made as diffusers' ControlNet inpainting example makes it."""
    import torch

    width, height = images[0].size  # the request's size: check() saw to it
    unit = torch.cat([control_pixels(image, height, width) for image in images])
    repaint = binary_mask(masks, len(masks)).bool()
    return torch.where(repaint, torch.tensor(-1.0), unit)


def binary_mask(masks: list[Any], batch: int) -> torch.Tensor:
    """(batch, 1, H, W) float32 of 0 and 1: greyscale, 1 where the mask is at least half white."""
    import numpy as np
    import torch

    arrays = [np.asarray(eight_bits(m, "mask").convert("L"), dtype=np.float32) / 255.0 for m in masks]
    tensor = torch.from_numpy(np.stack(arrays))[:, None]
    return per_prompt((tensor >= 0.5).float(), batch)


def per_prompt(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor`` (a batch of one, or of ``batch``) repeated to ``batch``: one image serves every prompt."""
    if tensor.shape[0] == batch:
        return tensor
    return tensor.repeat(batch // tensor.shape[0], 1, 1, 1)


def sized_by(name: str, fit: str | None) -> str:
    """What a refusal of a size taken from the image of the input ``name`` (``init_image``, else the
    first ``control_image`` or ``adapter_image``) adds: whose size it was, and how to give one, named
    as the caller names settings (``run``'s options, a served request's inputs). ``fit`` None: the
    Python API's request, which takes init images of its size only (``check_image``)."""
    sides = f"{setting('height')} and {setting('width')}"
    if name == "init_image" and fit is None:
        return (f"the size of {setting(name)}; give images of a size the engines take "
                "(sdexport.runtime.image_inputs.fit_image resizes or crops one)")
    if name == "init_image":
        how = (f" with {assigned('fit', 'resize')} or {assigned('fit', 'crop')}" if fit == "exact"
               else f": {assigned('fit', fit)} fits the image to them")
        return f"the size of {setting(name)}; give {sides}{how}"
    return f"the size of the first {setting(name)}; give {sides}: {name.replace('_', ' ')}s are resized to them"

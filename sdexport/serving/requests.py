"""Triton request tensors → one ``Row`` per image → ``GenerationRequest`` batches.

A served request is decoded into rows with the defaults ``sdexport run`` uses, so the same
parameters give the same image. Rows that share every setting a generation call shares (steps,
size, scheduler, task, guess mode, ...) can be generated together, whichever request they
came from: ``group_rows`` makes those batches, no larger than the engines' profile allows. The
guidance scale, the control images, the ControlNet scales and windows and the adapter images,
scales and factors are not among those settings: a call takes one of each per image.

Nothing here needs torch or a model: rows are checked with ``check_request`` against the manifest's
profile, so a bad request is refused with the sentence ``run`` would say, naming the inputs it
sent (``sdexport.setting_names``), before it joins a batch.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdexport.errors import ProfileError, SdexportError
from sdexport.runtime.ensemble import field_defaults
from sdexport.runtime.request import (
    MASKED_INIT,
    GenerationRequest,
    has_no_text,
    setting_places,
    sizing_image,
)
from sdexport.serving.protocol import INPUT_NAMES

DEFAULTS: dict[str, Any] = {
    **field_defaults(GenerationRequest, ("steps", "scheduler", "adapter_scale", "adapter_factor", "emphasis")),
    "fit": "exact",
}
"""What ``sdexport run`` uses when a flag is not given (guidance: the family's, as ``run``): the
request's own defaults, and ``run``'s ``--fit`` (a test holds ``run``'s flags to these)."""


@dataclass
class Row:
    """One image's parameters, decoded and defaulted."""

    prompt: str
    seed: int
    steps: int
    guidance: float | None
    """None: the family's default (``GUIDANCE_DEFAULTS``), filled in as ``run`` does."""
    scheduler: str
    height: int
    width: int
    negative_prompt: str | None = None
    guidance_rescale: float = 0.0
    """One per call (the loop rescales a call's images alike), so rows that differ in it do not share it."""
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    """SDXL's micro-conditioning and the refiner's scores, as ``GenerationRequest`` names them: a call
    takes one of each (the U-Net's time ids), so rows that differ in them do not share it."""
    denoising_end: float | None = None
    """Served with a refiner: the base model's share of the schedule (None: the server's). A call
    takes one (both models' windows), so rows that differ in it do not share it."""
    clip_skip: int | None = None
    """None: the engine directory's. A call reads one text encoder layer, so rows that differ in it
    do not share it."""
    emphasis: str = DEFAULTS["emphasis"]
    """How brackets in the texts are read (``runtime.emphasis``); one per call, as ``clip_skip``."""
    chunks: tuple[int, int] = (1, 0)
    """The prompt chunks the row's texts are read in (``Txt2ImgPipeline.chunk_count``), by the base
    model and by a refiner (0 without one): a call pads every text to its longest's, so rows that
    differ in either do not share it (an image never depends on another request's texts; the
    larger of the two alone let a refiner pad one row's prompt to another's, an audit)."""
    image: Any = None
    mask: Any = None
    strength: float | None = None
    control_image: list[Any] | None = None
    control_mode: list[int] | None = None
    """Union ControlNets: each control image's mode."""
    control_scale: float | list[float] | None = None
    """One, or one per control image; None: the task's default (``CONTROL_SCALE_DEFAULTS``)."""
    control_start: float | list[float] = 0.0
    control_end: float | list[float] = 1.0
    guess_mode: bool = False
    control_digests: tuple[str, ...] = ()
    """A digest of each control image's bytes: a call gives one image to all its rows where they
    send the same, and a union ControlNet's rows share a call only so (``union_control_apart``)."""
    adapter_image: Any = None
    """This image's T2I-Adapter image (a tuple, one per adapter, where there are several): rows with
    different ones share a call (one per prompt)."""
    adapter_scale: float | list[float] = 1.0
    """One, or one per adapter: rows with different ones share a call."""
    adapter_factor: float = 1.0
    """Rows with different ones share a call (each image's features stop after its own share)."""
    inpaint_digest: str | None = None
    """A digest of the init image's and mask's bytes, where the row inpaints."""
    shares_init: bool = False
    """The rows of its request inpaint one init image with one mask, which ``run`` (one
    ``--init-image``, one ``--mask``) samples once, with the first image's seed, and shares, as
    diffusers' inpaint pipelines do: such rows share calls with their own request's alone, which
    pass the image once (``generation_request``); given one each, image 2 on was sampled with its
    own seed, and differed from run's (an audit)."""
    guidance_embedded: bool = False
    """Served by a latent consistency model alone (no refiner): its U-Net takes each image's guidance
    embedded and runs no unconditional half, so rows on both sides of 1 share a call (and rows with
    and without negative prompts, which it does not read: ``ServedModel`` drops them)."""
    notes: list[str] = field(default_factory=list)
    """What was changed on the way (an image resized by ``fit``), for the server log."""

    def batch_key(self) -> tuple[Any, ...]:
        """What must be equal for rows to be generated in one call. Not the guidance scale, which the
        loop takes per image: only whether it is above 1 (the call runs the unconditional half of
        the batch; not even that for a latent consistency model, ``guidance_embedded``), and None
        (the family's default, still to be filled in) apart from either. Not the control images
        either, which the loop takes per image too: only where ``MASKED_INIT`` stands (made from
        each row's own init image and mask). Nor the ControlNet scales and windows, which it takes
        per image as well: only whether the scale is the task's default (None, filled in with the
        family's). A union ControlNet taking several images takes them per call
        (``union_control_apart``). Nor the adapter scale and factor, which it takes per image too."""
        guided = None if self.guidance is None else self.guidance > 1.0 and not self.guidance_embedded
        masked = None if self.control_image is None else tuple(isinstance(c, str) for c in self.control_image)
        return (self.steps, guided, self.scheduler, self.height, self.width, self.strength,
                self.negative_prompt is None, self.prompt_2 is None, self.negative_prompt_2 is None,
                self.image is None, self.mask is None, masked, _hashable(self.control_mode),
                self.control_scale is None, self.guess_mode, _count(self.adapter_image), self.conditioning(),
                self.denoising_end, self.clip_skip, self.emphasis, self.chunks, self.guidance_rescale,
                self.shares_init)

    def conditioning(self) -> tuple[Any, ...]:
        """SDXL's size and crop conditioning and the refiner's aesthetic scores, which a call takes one
        of (the time ids): as given, None where left to the default."""
        return (self.original_size, self.crops_coords_top_left, self.target_size, self.aesthetic_score,
                self.negative_aesthetic_score)

    def control_settings(self) -> tuple[Any, ...]:
        """The ControlNet scale, start and end, as a key."""
        return _hashable(self.control_scale), _hashable(self.control_start), _hashable(self.control_end)


def _hashable(value: float | list[float] | list[int] | None) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _count(images: Any) -> int:
    """How many adapter images a row gives (0: none), so that rows share a call only with as many."""
    return 0 if images is None else len(images) if isinstance(images, tuple) else 1


@dataclass(frozen=True)
class ImageLimits:
    """The images a served model reads in one row, checked before any is decoded: a few hundred
    kilobytes of PNG can declare gigabytes of pixels, and a request may send many images."""

    init: bool
    """An init image (and mask): only with a VAE encoder."""
    controls: int
    """Control images: one per ControlNet (a union one's: as many as it takes)."""
    adapters: int
    """Adapter images: one per T2I-Adapter."""
    pixels: int
    """The most pixels one image may declare."""

    @classmethod
    def for_profile(cls, init: bool, controls: int, adapters: int, height: int, width: int) -> ImageLimits:
        """``pixels``: 16 times the largest image the engines make (``height`` x ``width``, their
        profile's maxima): a photo four times their side, resized on the server, but no more."""
        return cls(init, controls, adapters, PIXELS_PER_IMAGE * height * width)

    def check(self, images: Mapping[str, list[bytes]]) -> None:
        """Refuse images this model does not read, more of them than it reads, or one that declares
        more than ``pixels`` (read from its header); ``images``: input name → the row's images
        (a control image may be ``MASKED_INIT``'s bytes: counted, not an image)."""
        from sdexport.runtime.image_inputs import image_size
        from sdexport.runtime.request import no_adapter, no_controlnet

        takes = {"init_image": int(self.init), "mask": int(self.init), "control_image": self.controls,
                 "adapter_image": self.adapters}
        for name, found in images.items():
            if len(found) <= takes[name]:
                continue
            if name in ("init_image", "mask"):  # (one a row at most: sent where the model reads none)
                raise SdexportError(f"{name}: this engine directory has no vae_encoder, so it serves txt2img only")
            if not takes[name]:
                raise no_controlnet() if name == "control_image" else no_adapter()
            raise SdexportError(f"{name}: {len(found)} sent for one image; this model reads at most {takes[name]}")
        for name, found in images.items():
            for data in found:
                if data == MASKED_INIT.encode():
                    continue
                width, height = image_size(data, name)
                if width * height > self.pixels:
                    raise SdexportError(f"{name}: {width}x{height} pixels, more than this server reads in one image "
                                        f"({self.pixels / 1e6:.1f} megapixels, {PIXELS_PER_IMAGE} times its engines' "
                                        "largest); send it smaller")


PIXELS_PER_IMAGE = 16
"""``ImageLimits.pixels``: how many times the engines' largest image one sent image may hold."""


def decode_rows(inputs: Mapping[str, Any], default_size: tuple[int, int],
                check_size: Callable[[int, int], None] | None = None, *,
                emphasis: str = DEFAULTS["emphasis"], limits: ImageLimits | None = None) -> list[Row]:
    """The rows of one request. ``inputs``: input name → numpy array with the batch dimension first
    (absent inputs missing or None); ``default_size``: (height, width) when neither the request nor an
    image gives one; ``check_size(height, width)`` refuses a size the engines cannot serve, before an
    init image is resized to it; ``emphasis``: the server's reading of brackets for a row that sends
    none (``serve --emphasis``); ``limits``: the images a row may send, checked before any is
    decoded. Malformed values are refused with one line naming the input."""
    unknown = sorted(set(inputs) - set(INPUT_NAMES))
    if unknown:
        raise SdexportError(f"unknown inputs {', '.join(unknown)}; this model takes {', '.join(INPUT_NAMES)}")
    prompts = inputs.get("prompt")
    if prompts is None or len(prompts) == 0:
        raise SdexportError("no prompt given: send the input 'prompt' (one UTF-8 text per image)")
    rows: list[Row] = []
    for i in range(len(prompts)):
        # as `run`, whose images all take the first one's size: a row that gives none takes the first row's
        rows.append(_decode_row(inputs, i, default_size, check_size, (rows[0].height, rows[0].width) if rows else None,
                                emphasis, limits))
    if len(rows) > 1 and rows[0].inpaint_digest is not None and len({row.inpaint_digest for row in rows}) == 1:
        for row in rows:
            row.shares_init = True
    return rows


def shared_init_apart(owner: tuple[int, int], row: Row) -> Any:
    """``group_rows``'s ``apart`` for rows that share their request's init image and mask
    (``Row.shares_init``): they stay with their request; other rows are not held apart."""
    return ("request", owner[0]) if row.shares_init else None


def image_of_request(i: int, images: int) -> str:
    """What a refusal of row ``i`` ends with in a request of ``images`` rows: which image it was
    (nothing where there is one), whether decoding or the checks refused it."""
    return f" (image {i + 1} of the request)" if images > 1 else ""


def _decode_row(inputs: Mapping[str, Any], i: int, default_size: tuple[int, int],
                check_size: Callable[[int, int], None] | None, first_size: tuple[int, int] | None = None,
                emphasis: str = DEFAULTS["emphasis"], limits: ImageLimits | None = None) -> Row:
    from sdexport.runtime.image_inputs import decode_image, fit_image
    from sdexport.runtime.image_inputs import sized_by as sized_by_image

    def one(name: str) -> Any:
        value = inputs.get(name)
        if value is None:
            return None
        cell = value[i]
        if getattr(cell, "shape", ()) != () and len(cell) != 1:
            raise SdexportError(f"{name}: expected one value per image, got {len(cell)}")
        return cell[0] if getattr(cell, "shape", ()) != () else cell

    def many(name: str) -> list[Any] | None:
        value = inputs.get(name)
        return None if value is None else list(value[i])

    where = image_of_request(i, len(inputs["prompt"]))
    try:
        text = {name: _text(one(name), name) for name in ("prompt", "negative_prompt", "prompt_2",
                                                           "negative_prompt_2", "scheduler", "fit", "emphasis")}
        fit = text["fit"] or DEFAULTS["fit"]
        image = one("init_image")
        mask = one("mask")
        if mask is not None and image is None:  # (before the mask is fitted to a size it would be refused for)
            raise SdexportError("mask needs init_image: inpainting repaints part of a given image")
        control_bytes = [bytes(b) for b in many("control_image") or []]
        adapter_bytes = [bytes(b) for b in many("adapter_image") or []]
        if limits is not None:
            limits.check({"init_image": [bytes(image)] if image is not None else [],
                          "mask": [bytes(mask)] if mask is not None else [],
                          "control_image": control_bytes, "adapter_image": adapter_bytes})
        init = decode_image(bytes(image), "init_image") if image is not None else None
        masked = decode_image(bytes(mask), "mask", mode=None) if mask is not None else None  # (as run reads it)
        # (in their own modes, as run reads them: resized first, then made RGB, as diffusers' processor does)
        controls: list[Any] = [MASKED_INIT if b == MASKED_INIT.encode()
                               else decode_image(b, "control_image", mode=None, made="RGB") for b in control_bytes]
        adapter_images = [decode_image(b, "adapter_image", mode=None, made="RGB") for b in adapter_bytes]
        adapter = adapter_images[0] if len(adapter_images) == 1 else tuple(adapter_images) or None
        height, width = _number(one("height"), "height", int), _number(one("width"), "width", int)
        if (height is None) != (width is None):  # as `run`: the other side the default's, where no image sizes it
            if init is not None or masked is not None or controls or adapter_images:
                raise SdexportError("with an image input, give both height and width, or neither (the image's own "
                                    "size)")
            default_height, default_width = first_size or default_size
            height, width = (default_height if height is None else height), (default_width if width is None else width)
        sized_by = None  # the input whose image gave the size
        if height is None and first_size is not None:
            height, width = first_size
        elif height is None:  # as `run`: the init image's own size, else the first control (or adapter) image's
            sizing = sizing_image(init, controls, adapter_images)
            height, width = (sizing[0].size[1], sizing[0].size[0]) if sizing is not None else default_size
            sized_by = sizing[1] if sizing is not None else None
        assert height is not None and width is not None
        if check_size is not None:
            try:
                check_size(height, width)
            except ProfileError as exc:
                if sized_by is None:
                    raise
                raise ProfileError(f"{exc} ({sized_by_image(sized_by, fit)})") from None
        if has_no_text(text["prompt"] or "", text["prompt_2"]):
            raise SdexportError("prompt: empty; send the text to generate from (for SDXL, in prompt or prompt_2)")
        seed = _number(one("seed"), "seed", int)
        original_size, crop, target_size = (_pair(many(name), name) for name in PAIRS)
        row = Row(
            prompt=text["prompt"] or "",
            negative_prompt=text["negative_prompt"], prompt_2=text["prompt_2"],
            negative_prompt_2=text["negative_prompt_2"],
            original_size=original_size, crops_coords_top_left=crop or (0, 0), target_size=target_size,
            aesthetic_score=_number(one("aesthetic_score"), "aesthetic_score", float),
            negative_aesthetic_score=_number(one("negative_aesthetic_score"), "negative_aesthetic_score", float),
            denoising_end=_number(one("denoising_end"), "denoising_end", float),
            clip_skip=_number(one("clip_skip"), "clip_skip", int),
            emphasis=text["emphasis"] or emphasis,
            seed=i if seed is None else seed,
            steps=_or(_number(one("steps"), "steps", int), DEFAULTS["steps"]),
            guidance=_number(one("guidance"), "guidance", float),
            guidance_rescale=_or(_number(one("guidance_rescale"), "guidance_rescale", float), 0.0),
            scheduler=text["scheduler"] or DEFAULTS["scheduler"],
            height=height, width=width,
            strength=_number(one("strength"), "strength", float),
            control_image=controls or None,
            guess_mode=_flag(one("guess_mode"), "guess_mode"),
            adapter_image=adapter,
            adapter_factor=_or(_number(one("adapter_factor"), "adapter_factor", float), DEFAULTS["adapter_factor"]),
        )
        for name in ("control_scale", "control_start", "control_end", "adapter_scale"):
            values = [_number(v, name, float) for v in many(name) or []]
            if values:
                setattr(row, name, values[0] if len(values) == 1 else values)
        modes = [_number(v, "control_mode", int) for v in many("control_mode") or []]
        row.control_mode = modes or None
        row.control_digests = tuple(hashlib.sha256(b).hexdigest() for b in control_bytes)
        if mask is not None and image is not None:  # (and the fit: the same bytes resized or cropped differ)
            row.inpaint_digest = hashlib.sha256(hashlib.sha256(bytes(image)).digest() + hashlib.sha256(bytes(mask))
                                                .digest() + fit.encode()).hexdigest()
        if init is not None:
            row.image, note = fit_image(init, height, width, fit, "init_image")
            row.notes += [note] if note else []
        if masked is not None:
            row.mask, note = fit_image(masked, height, width, fit, "mask")
            row.notes += [note] if note else []
        elif fit != DEFAULTS["fit"] and init is None:
            raise SdexportError("fit needs init_image: it says how that image is made the request's size")
        return row
    except SdexportError as exc:
        raise SdexportError(f"{exc}{where}") from None


PAIRS = ("original_size", "crops_coords_top_left", "target_size")
"""SDXL's micro-conditioning inputs: two whole numbers each (height and width; the crop's top and left)."""


def _pair(values: list[Any] | None, name: str) -> tuple[int, int] | None:
    """A two-number input as the request's tuple; None where not sent. Its range is checked with the
    rest of the request (``check_request``), in ``run``'s words."""
    if values is None:
        return None
    if len(values) != 2:
        what = "top, left" if name == "crops_coords_top_left" else "height, width"
        raise SdexportError(f"{name}: expected two values ({what}), got {len(values)}")
    first, second = (_number(v, name, int) for v in values)
    return first, second


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


NAMED_INPUTS = ("scheduler", "fit", "emphasis")
"""Inputs whose value is one of a few names: the refusal of an unknown one echoes it."""
LONGEST_NAME = 100
"""Characters a ``NAMED_INPUTS`` value may have: longer, it is no name, and is refused without
being echoed (an unknown scheduler of 1 MB came back whole in the error, an audit)."""


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    else:
        try:
            text = bytes(value).decode("utf-8")
        except (UnicodeDecodeError, TypeError):
            raise SdexportError(f"{name}: not UTF-8 text") from None
    if name in NAMED_INPUTS and len(text) > LONGEST_NAME:
        raise SdexportError(f"{name}: {len(text)} characters ({text[:20]!r}...), no name it takes; send one of the "
                            f"names `sdexport run --help` lists for --{name}")
    return text


def _flag(value: Any, name: str) -> bool:
    """A BOOL input (numpy's bool, or 0/1 from a client that sends numbers); absent: false."""
    if value is None:
        return False
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and value in (0, 1):
        return bool(value)
    raise SdexportError(f"{name} {value!r}: expected true or false")


def _number(value: Any, name: str, kind: type) -> Any:
    """A Python int or float from a numpy scalar. A float32 is read as the shortest decimal that
    gives it back (7.3, not 7.300000190734863), so it means what the client typed."""
    if value is None:
        return None
    if kind is int:
        if not float(value).is_integer():
            raise SdexportError(f"{name} {value}: expected a whole number")
        return int(value)
    number = float(str(value))
    if not math.isfinite(number):
        raise SdexportError(f"{name} {number}: expected a finite number")
    return number


def union_control_apart(rows: list[tuple[tuple[int, int], Row]],
                        images: int = 1) -> Callable[[tuple[int, int], Row], Any]:
    """``group_rows``'s ``apart`` over a union ControlNet, which attends across the rows of its call.
    Rows with the same control images give it the same tokens and change nothing, so they share
    calls across requests. The rows of a request that differ in their control pixels (images of
    their own, or ``MASKED_INIT``: made from each row's init image and mask) stay with their
    request, generated together as ``run`` generates them, so another request's rows cannot change
    their images. One taking several ``images`` weighs them by their scales inside it: its rows
    share a call only with the same scales and windows too."""
    digests: defaultdict[int, set[tuple[str, ...]]] = defaultdict(set)
    for (request, _), row in rows:
        digests[request].add(row.control_digests)

    def apart(owner: tuple[int, int], row: Row) -> Any:
        own = len(digests[owner[0]]) > 1 or MASKED_INIT in (row.control_image or [])
        key = ("request", owner[0]) if own else ("images", row.control_digests)
        return (*key, row.control_settings()) if images > 1 else key

    return apart


def settings_apart(rows: list[tuple[tuple[int, int], Row]]) -> Callable[[tuple[int, int], Row], Any]:
    """``group_rows``'s ``apart`` over a directory with a pooling ControlNet, which averages its
    residuals after its scale: an image weighed by its own scale in a call of several
    (``ControlConditioning.weigh``) differs from the one-scale call by float rounding. Rows with the
    same ControlNet settings share calls across requests; a request whose rows differ stays
    together, the one call ``run`` makes of it, and apart from other requests."""
    settings: defaultdict[int, set[tuple[Any, ...]]] = defaultdict(set)
    for (request, _), row in rows:
        settings[request].add(row.control_settings())

    def apart(owner: tuple[int, int], row: Row) -> Any:
        return ("request", owner[0]) if len(settings[owner[0]]) > 1 else ("settings", row.control_settings())

    return apart


def generation_request(rows: list[Row]) -> GenerationRequest:
    """The one call that generates ``rows`` (which share ``batch_key``). A served ensemble's
    ``denoising_end`` is not in it: ``ServedModel`` cuts the call in two there."""
    first = rows[0]

    def column(name: str) -> list[Any] | None:
        values = [getattr(row, name) for row in rows]
        return None if values[0] is None else values

    def one_or_each(name: str) -> Any:
        """A per-image number (guidance, adapter factor): one for the call where the rows agree,
        else one per image."""
        values = [getattr(row, name) for row in rows]
        return values[0] if len(set(values)) == 1 else values

    return GenerationRequest(
        prompt=[row.prompt for row in rows], negative_prompt=column("negative_prompt"),
        prompt_2=column("prompt_2"), negative_prompt_2=column("negative_prompt_2"),
        original_size=first.original_size, crops_coords_top_left=first.crops_coords_top_left,
        target_size=first.target_size, aesthetic_score=first.aesthetic_score,
        negative_aesthetic_score=first.negative_aesthetic_score, clip_skip=first.clip_skip,
        emphasis=first.emphasis,
        steps=first.steps, scheduler=first.scheduler,
        guidance=one_or_each("guidance"), guidance_rescale=first.guidance_rescale,
        seeds=[row.seed for row in rows], height=first.height, width=first.width,
        # (rows sharing their request's init image and mask: one of each, sampled once, as run samples it)
        image=[first.image] if first.shares_init else column("image"),
        mask=[first.mask] if first.shares_init else column("mask"), strength=first.strength,
        control_image=_call_control_images(rows), control_mode=first.control_mode,
        control_scale=_call_setting(rows, "control_scale", len(first.control_image or [])),
        control_start=_call_setting(rows, "control_start", len(first.control_image or [])),
        control_end=_call_setting(rows, "control_end", len(first.control_image or [])), guess_mode=first.guess_mode,
        adapter_image=column("adapter_image"),
        adapter_scale=_call_setting(rows, "adapter_scale", _count(first.adapter_image)),
        adapter_factor=one_or_each("adapter_factor"),
    )


def _call_control_images(rows: list[Row]) -> list[Any] | None:
    """The control images of a call of ``rows``: at each place one image where every row sent the
    same bytes (made once), else each row's (``MASKED_INIT`` stands for each row's own already)."""
    first = rows[0].control_image
    if first is None:
        return None
    return [entry if isinstance(entry, str) or len({row.control_digests[k] for row in rows}) == 1
            else [(row.control_image or [])[k] for row in rows] for k, entry in enumerate(first)]


def _call_setting(rows: list[Row], name: str, count: int) -> Any:
    """A ControlNet or adapter setting of a call of ``rows``: the rows' own where they all give the
    same, else one place for each of ``count`` (control images, adapters), each one value where
    the rows agree on it, else each row's."""
    given = [getattr(row, name) for row in rows]
    if len({_hashable(value) for value in given}) == 1:
        return given[0]
    places = [setting_places(value, count) for value in given]
    return [column[0] if len(set(column)) == 1 else list(column) for column in zip(*places)]


def group_rows(rows: list[tuple[Any, Row]], max_batch: int,
               apart: Callable[[Any, Row], Any] | None = None) -> list[list[tuple[Any, Row]]]:
    """Rows (each with its owner, e.g. a request index) in batches of equal ``batch_key`` and at most
    ``max_batch`` rows, in order of first arrival: one generation call each. ``apart(owner, row)``:
    rows it maps to different values never share a call."""
    groups: dict[tuple[Any, ...], list[tuple[Any, Row]]] = {}
    for owner, row in rows:
        groups.setdefault((row.batch_key(), apart(owner, row) if apart else None), []).append((owner, row))
    return [members[i:i + max_batch] for members in groups.values() for i in range(0, len(members), max_batch)]

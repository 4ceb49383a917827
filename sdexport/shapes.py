"""Shape profiles: the range of batch sizes, image sizes and prompt lengths an export or engine must serve.

A profile is stated in the user's terms (images per call, pixels) and turned into concrete tensor
shapes by resolving a ComponentSpec's symbols, so that ONNX verification points, TensorRT
optimization profiles and runtime request checks all come from one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Protocol

from sdexport.errors import ProfileError
from sdexport.specs import ComponentSpec, ModelDims

Range = tuple[int, int, int]
"""(min, opt, max)"""

MAX_TENSOR_ELEMENTS = 2**31 - 1
"""TensorRT, and many ONNX Runtime CUDA kernels, index a tensor's elements with 32-bit integers."""
MAX_PROMPT_CHUNKS = 32
"""The most prompt chunks a profile may take: 2,400 tokens of text, far past what CLIP was trained
on and what A1111's users write, while a TensorRT plan reserves its activations for the max and
verification runs it (a million chunks were accepted, to fail much later)."""


class ImageGeometry(Protocol):
    """How image sides relate to latents: ``ModelDims``, or a ``ModelOutline`` read from configs."""

    @property
    def vae_scale_factor(self) -> int: ...

    @property
    def unet_downsample(self) -> int: ...

    @property
    def image_multiple(self) -> int: ...


def parse_range(text: str, what: str, label: str | None = None) -> Range:
    """``"1:1:4"`` → (1, 1, 4); a single number means a static range. ``label``: how refusals name
    the setting (``--batch``, the option, by default)."""
    label = label or f"--{what}"
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        example = {"batch": "1:1:4", "chunks": "1:1:3"}.get(what, "256:512:1024")  # (a chunk's 1024: refused)
        raise ProfileError(f"{label} {text!r}: expected integers as min:opt:max, e.g. {example}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ProfileError(f"{label} {text!r}: expected min:opt:max (three numbers) or one number")
    lo, opt, hi = values
    if lo <= 0 or not lo <= opt <= hi:
        raise ProfileError(f"{label} {text!r}: need 0 < min <= opt <= max")
    return lo, opt, hi


AXIS_OPTIONS = {"chunks": "--prompt-chunks"}
"""The export and build options of axes whose option is not ``--`` and the axis's name."""

PROMPT_CHUNKS = (1, 1, 3)
"""What exports read by default (``ShapeProfile.chunks``): a prompt of up to three chunks (225
tokens) read whole; opt one chunk, the short prompt's, which TensorRT tunes its kernels for."""


def overlap(ours: Range, theirs: Range) -> Range | None:
    """The part of ``ours`` that ``theirs`` takes too, its opt moved inside; None where they share
    no value."""
    lo, hi = max(ours[0], theirs[0]), min(ours[2], theirs[2])
    return (lo, min(max(ours[1], lo), hi), hi) if lo <= hi else None


def axis_option(axis: str) -> str:
    """The export and build option that sets a profile axis (``--batch``, ``--prompt-chunks``)."""
    return AXIS_OPTIONS.get(axis, f"--{axis}")


@dataclass(frozen=True)
class ShapeProfile:
    batch: Range = (1, 1, 4)
    height: Range = (256, 512, 1024)
    width: Range = (256, 512, 1024)
    chunks: Range = (1, 1, 1)
    """Prompt chunks: how many windows of ``S`` tokens (75 of text, as A1111 reads a long prompt)
    the U-Net attends to at once, its ``X``. (1, 1, 1), a profile's default and what directories
    written before the axis hold, reads one window, as diffusers does; exports default to
    ``PROMPT_CHUNKS``."""

    @classmethod
    def parse(cls, batch: str, height: str, width: str) -> ShapeProfile:
        return cls(parse_range(batch, "batch"), parse_range(height, "height"), parse_range(width, "width"))

    @classmethod
    def single(cls, batch: int, height: int, width: int) -> ShapeProfile:
        """The one image shape of a request (its prompts' chunks are known once they are tokenized)."""
        return cls((batch, batch, batch), (height, height, height), (width, width, width))

    @classmethod
    def from_dict(cls, data: dict[str, list[int]]) -> ShapeProfile:
        ranges = {k: tuple(int(v) for v in data[k]) for k in ("batch", "height", "width", "chunks") if k in data}
        return cls(**ranges)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, list[int]]:
        """The manifest's profile: ``chunks`` only where more than one window is read, so other
        directories stay readable by sdexport versions that predate the axis."""
        data = {k: list(v) for k, v in asdict(self).items()}
        if self.chunks == (1, 1, 1):
            del data["chunks"]
        return data

    def with_ranges(self, **texts: str | None) -> ShapeProfile:
        """This profile with some axes replaced by ``min:opt:max`` texts (``None`` keeps an axis)."""
        values = {axis: parse_range(text, axis, axis_option(axis)) for axis, text in texts.items() if text is not None}
        return replace(self, **values)

    @property
    def axes(self) -> tuple[tuple[str, Range], ...]:
        """(axis, range) of every axis, in the order refusals and records name them."""
        return (("batch", self.batch), ("height", self.height), ("width", self.width), ("chunks", self.chunks))

    @property
    def is_static(self) -> bool:
        return all(lo == hi for _, (lo, _, hi) in self.axes)

    def validate(self, dims: ImageGeometry) -> None:
        """Every image side must map to a latent the U-Net can down- and up-sample exactly."""
        m = dims.image_multiple
        for axis, values in (("height", self.height), ("width", self.width)):
            for label, value in zip(("min", "opt", "max"), values):
                if value % m:
                    lower, upper = value // m * m, (value // m + 1) * m
                    hint = f"{lower} or {upper}" if lower else f"{upper}"
                    raise ProfileError(
                        f"{axis} {label} {value} is not a multiple of {m} "
                        f"(VAE factor {dims.vae_scale_factor} x U-Net downsampling "
                        f"{dims.unet_downsample}); try {hint}"
                    )

    def check_limits(self, vae_width: int) -> None:
        """Refuse maxima no engine could ever serve, before anything is exported.

        The largest tensor of a Stable Diffusion pipeline is the VAE decoder's last activation:
        ``vae_width`` channels (128 for SD and SDXL) at full image size for every image of the batch.
        Past 2^31 elements it cannot be indexed by TensorRT or ONNX Runtime's CUDA kernels, whatever
        the GPU's memory; such a profile would only fail after a long export and build.
        """
        from sdexport.setting_names import option

        if self.chunks[2] > MAX_PROMPT_CHUNKS:
            raise ProfileError(f"{option('--prompt-chunks')} max {self.chunks[2]}: at most {MAX_PROMPT_CHUNKS} chunks "
                               f"({MAX_PROMPT_CHUNKS * 75:,} tokens of text)")
        batch, height, width = self.batch[2], self.height[2], self.width[2]
        elements = vae_width * batch * height * width
        if elements > MAX_TENSOR_ELEMENTS:
            raise ProfileError(
                f"profile maxima batch {batch} at {height}x{width} would need a VAE activation of "
                f"{elements:,} values ({elements * 4 / 1e9:,.0f} GB in fp32), beyond the 2^31 elements "
                f"TensorRT and ONNX Runtime can index; lower the max of {option('--batch')}, {option('--height')} or "
                f"{option('--width')}"
            )

    def takes_batch(self, batch: int) -> bool:
        """Whether a call of ``batch`` images lies in the profile (a refused size is an image's only
        where it does: an image gives the sides, never the batch)."""
        return self.batch[0] <= batch <= self.batch[2]

    def check_request(self, batch: int, height: int, width: int, dims: ImageGeometry, *,
                      served: Mapping[str, str] | None = None) -> None:
        """Refuse a request the engines cannot serve, saying what they can (and what widens them:
        export's option, or a bench scenario's ``[export]`` range). ``served``: the axes a server
        was told to take, each with the setting that told it (``sdexport serve --height``, or
        config.pbtxt's ``height``), which their refusals name instead."""
        from sdexport.setting_names import option, setting

        m = dims.image_multiple
        for axis, value, (lo, _, hi) in (
            ("batch", batch, self.batch),
            ("height", height, self.height),
            ("width", width, self.width),
        ):
            if not lo <= value <= hi:
                wider = option(f"--{axis}")
                # (an adopted directory is widened by adopting it again: export refuses it, and a build
                # stays inside the manifest's profile, an audit)
                how = (f"re-export, adopt again or rebuild with a wider {wider}" if wider.startswith("--")
                       else f"widen {wider}")
                if served and axis in served:
                    raise ProfileError(f"{setting(axis)} {value} is outside this server's profile: {axis} must be "
                                       f"in [{lo}, {hi}] ({served[axis]})")
                raise ProfileError(f"{setting(axis)} {value} is outside the engines' profile: {axis} must be in "
                                   f"[{lo}, {hi}] ({how})")
            if axis != "batch" and value % m:
                raise ProfileError(f"{setting(axis)} {value} must be a multiple of {m}")

    def points(self) -> Iterator[tuple[str, int, int, int, int]]:
        """Where verification runs, as (label, batch, height, width, chunks): the three corners plus
        one mixed, uneven point."""
        corners = [(self.batch[i], self.height[i], self.width[i], self.chunks[i]) for i in range(3)]
        for label, corner in zip(("min", "opt", "max"), corners):
            yield (label, *corner)
        odd = (self.batch[2], self.height[0], self.width[2], self.chunks[2])
        if odd not in corners:
            yield ("odd", *odd)

    def component_batch(self, spec: ComponentSpec) -> Range:
        """The batch range one component sees: CFG doubles the batch at opt and max."""
        lo, opt, hi = self.batch
        return (lo, 2 * opt, 2 * hi) if spec.cfg_batch else (lo, opt, hi)

    def corners(self, spec: ComponentSpec, dims: ModelDims) -> list[dict[str, int]]:
        """The symbol sizes of ``spec``'s min, opt and max calls (``ModelDims.sizes``; its batch as
        ``component_batch``)."""
        return [dims.sizes(b, h, w, n)
                for b, h, w, n in zip(self.component_batch(spec), self.height, self.width, self.chunks)]

    def tensor_ranges(
        self, spec: ComponentSpec, dims: ModelDims
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape of every input of ``spec`` (a TensorRT optimization profile)."""
        corners = self.corners(spec, dims)
        return {
            t.name: (t.shape(corners[0]), t.shape(corners[1]), t.shape(corners[2]))
            for t in spec.inputs
        }

    def check_inside(self, outer: ShapeProfile, what: str, remedy: str, *, chunks: bool = True) -> None:
        """Refuse this profile where it reaches outside ``outer``: ``what``, each axis and its allowed
        range, then ``remedy`` and the options that widen ``outer``. Without ``chunks``, in batch and
        image sides alone (``within``)."""
        problems = self.within(outer, chunks=chunks)
        if problems:
            axes = ", ".join(axis_option(p.split(" ", 1)[0]) for p in problems)
            raise ProfileError(f"{what}: " + "; ".join(problems) + f" ({remedy} {axes})")

    def within(self, outer: ShapeProfile, *, chunks: bool = True) -> list[str]:
        """Ways this profile reaches outside ``outer`` (empty when it fits); without ``chunks``, in
        batch and image sides alone."""
        problems = []
        for axis, (lo, _, hi) in self.axes:
            if axis == "chunks" and not chunks:
                continue
            olo, _, ohi = getattr(outer, axis)
            if lo < olo or hi > ohi:
                problems.append(f"{axis} [{lo}, {hi}] is not inside [{olo}, {ohi}]")
        return problems

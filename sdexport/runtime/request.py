"""What a user asks the runtime for, and the checks that need no model, no engine and no torch.

``check_request`` runs twice: in the CLI before any engine loads (so a wrong size or seed is refused
in well under a second, not after loading gigabytes), and again in the pipeline before any engine
runs (for callers of the Python API). Everything it needs is in the engine directory's manifest and
scheduler config, so it is plain Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from sdexport.errors import ProfileError, SdexportError
from sdexport.setting_names import assigned, setting
from sdexport.shapes import ImageGeometry, ShapeProfile
from sdexport.specs import FAMILY_LABELS, SDXL_REFINER, check_clip_skip, is_sdxl

MAX_SEED = 2**64 - 1
"""torch.Generator seeds are unsigned 64-bit integers."""
NOISE_SEEDS = 2**32
"""How many seeds draw different noise: PyTorch's CPU generator (a Mersenne Twister) is seeded with
the seed's low 32 bits, so seed 2^32 + 1 draws seed 1's noise, in diffusers' pipelines too."""
MAX_CONDITIONING = 65536
"""SDXL's size and crop conditioning are pixel counts; far beyond any image they are noise to the U-Net."""
CONTROL_SCALE_DEFAULTS = {
    "sd": {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.5},
    "sdxl": {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0},
}
"""``controlnet_conditioning_scale`` where none is given, per family and task, as diffusers' ControlNet
pipelines default it (``StableDiffusionXLControlNetInpaintPipeline`` keeps 1.0 where the SD one
lowers it to 0.5)."""
STRENGTH_DEFAULTS = {
    "sd": {"img2img": 0.8, "controlnet-img2img": 0.8, "inpaint": 1.0},
    "sdxl": {"img2img": 0.3, "controlnet-img2img": 0.8, "inpaint": 0.9999},
    SDXL_REFINER: {"img2img": 0.3, "inpaint": 0.9999},
}
"""``strength`` where none is given, per family and task, as diffusers' pipelines default it
(``controlnet-img2img``: img2img with ControlNets, which SDXL's pipeline defaults otherwise; with
ControlNets inpainting keeps inpainting's). SDXL's inpainting pipelines take 0.9999, not 1 (diffusers'
choice): the starting latents are the init image's noised to the first timestep, so they keep a
trace of it, where pure noise keeps none; and ``int(steps x 0.9999)`` runs one step fewer."""
GUIDANCE_DEFAULTS = {
    "sd": {"txt2img": 7.5, "img2img": 7.5, "inpaint": 7.5, "controlnet-inpaint": 7.5},
    "sdxl": {"txt2img": 5.0, "img2img": 5.0, "inpaint": 7.5, "controlnet-inpaint": 5.0},
    SDXL_REFINER: {"img2img": 5.0, "inpaint": 7.5},
}
"""``guidance_scale`` where none is given, per family and task, as diffusers' pipelines default it:
7.5 for SD, 5.0 for SDXL except ``StableDiffusionXLInpaintPipeline`` (7.5; its ControlNet variant
takes 5.0). With ControlNets, txt2img and img2img keep their task's value. The refiner's are its
pipelines' (``StableDiffusionXLImg2ImgPipeline``, ``StableDiffusionXLInpaintPipeline``)."""
AESTHETIC_SCORES = (6.0, 2.5)
"""The SDXL refiner's ``aesthetic_score`` and ``negative_aesthetic_score`` where none is given, as
diffusers' refiner pipelines default them (the LAION aesthetic rating its time ids were trained on)."""
MASKED_INIT = "masked-init"
"""A control image made from the request itself: the init image with the mask's repaint region set
to -1, which inpainting ControlNets (``control_v11p_sd15_inpaint``) read. No image file can hold -1,
so it is named instead of given (``--control-image masked-init``)."""
BACKENDS = ("onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "torch", "torch-compile", "torch-compile-max",
            "tensorrt")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise SdexportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


TEXTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")
"""The request's texts, which the text encoders read."""

PlaceSetting = float | list[float | list[float]]
"""A ControlNet setting (scale, start, end) or a T2I-Adapter's scale: one value for every place and
image, or one per place (a ControlNet, a union one's control image, an adapter), each a value for
every prompt or a list of one per prompt."""

Settings = float | Sequence[float | Sequence[float]]
"""``PlaceSetting`` as a caller may give it (tuples, or a typed ``list[float]``, which a list of
the union does not take: lists are invariant)."""


@dataclass
class GenerationRequest:
    prompt: list[str]
    negative_prompt: list[str] | None = None
    steps: int = 30
    guidance: float | list[float] | None = None
    """Classifier-free guidance scale (1 or less: no CFG), for every prompt or one per prompt. None:
    diffusers' default for the family and task (``GUIDANCE_DEFAULTS``: 7.5, SDXL 5.0 but 7.5 for
    inpainting without ControlNets), filled in by ``with_defaults`` before the loop runs. One per
    prompt lets images that differ only in guidance share a call (a served batch); they must all be
    above 1, or all at or below it, as a call runs the unconditional half for all its images or none."""
    guidance_rescale: float = 0.0
    """diffusers' ``guidance_rescale`` (Lin et al., "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", 3.4): each step's guided prediction is scaled towards the spread of the prompted one
    by this share, 0 to 1 (0: not at all). Against the over-exposure of strong guidance, which models
    trained for zero terminal SNR show (their authors suggest 0.7). With guidance only (``cfg``);
    every task runs it, where diffusers' SD img2img, inpaint and ControlNet pipelines have no such
    argument."""
    scheduler: str = "default"
    seeds: list[int] = field(default_factory=lambda: [0])
    height: int | None = None
    width: int | None = None
    """Image sides in pixels. None: as ``sdexport run`` chooses (``sized``): the size of the init
    latents, the init image, or the first control (then adapter) image, else the engines' profile's
    opt (the size the model is made for: SD 1.x 512, SD 2.1 768, SDXL 1024), as diffusers' pipelines
    take theirs from the image or the U-Net's sample size."""
    clip_skip: int | None = None
    """Text encoder layers the prompts are read past, counted back from the last (diffusers'
    ``clip_skip``; A1111's "Clip skip" is one more). None: the engine directory's (``export
    --clip-skip``, else 0). SD builds it into its text encoder graph, so an SD directory takes its
    own only; SDXL's graphs give every layer. The negative prompts are read from the same layer:
    diffusers reads theirs from the last (SDXL: the penultimate) whatever ``clip_skip``, so guidance
    compares two layers' readings (and its SD pipelines fail on transformers 5.6 and later)."""
    emphasis: str = "none"
    """How brackets in the texts are read (``runtime.emphasis``): ``none`` as text, as diffusers
    reads them; ``original`` weighs ``(word:1.2)``, ``(word)`` and ``[word]`` as A1111 does by
    default; ``no-norm`` as its "No norm". The negatives and SDXL's second texts alike."""
    # SDXL only (refused for other families), as diffusers names them; sizes are (height, width).
    prompt_2: list[str] | None = None
    """For the second text encoder; None: ``prompt``."""
    negative_prompt_2: list[str] | None = None
    """For the second text encoder; None: ``negative_prompt``."""
    original_size: tuple[int, int] | None = None
    """Micro-conditioning: the size the image "was" before cropping; None: (height, width)."""
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    """None: (height, width). Not the refiner's: its time ids carry an aesthetic score instead."""
    # The SDXL refiner only (refused for other families).
    aesthetic_score: float | None = None
    """The aesthetic rating the refiner is conditioned on (the conditional half of a CFG batch);
    None: diffusers' 6.0 (``AESTHETIC_SCORES``)."""
    negative_aesthetic_score: float | None = None
    """The rating of CFG's unconditional half, which guidance steers away from; None: diffusers' 2.5."""
    # SDXL's ensemble of experts (the base model hands its latents to the refiner), as diffusers names it.
    denoising_end: float | None = None
    """Stop this fraction of the way through the schedule (0 < x < 1) and leave the rest to a
    refiner: the result holds the latents, not decoded (diffusers' ``output_type="latent"``), to
    be the refiner's ``init_latents``. None: every step, and images."""
    denoising_start: float | None = None
    """Start this fraction of the way through the schedule, from ``init_latents`` as they are (no
    noise added): where a base model's ``denoising_end`` stopped. It takes the place of strength."""
    init_latents: Any = None
    """The latents to start from at ``denoising_start`` (a tensor, one row per prompt): a base
    model's ``GenerationResult.latents``."""
    # Image inputs (img2img and inpainting), PIL images of the request's size.
    image: list[Any] | None = None
    """img2img's or inpainting's init image: one for every prompt, or one per prompt."""
    mask: list[Any] | None = None
    """Inpainting: white repaints, black keeps; one, or one per prompt. Needs ``image``."""
    strength: float | None = None
    """How far the init image is noised, 0 < strength <= 1 (1: all the way, only its latents in
    inpainting's mask survive). None: diffusers' defaults (``STRENGTH_DEFAULTS``: img2img 0.8, SDXL
    img2img 0.3, inpainting 1, SDXL inpainting 0.9999)."""
    # ControlNet (an engine directory exported with --controlnet), as diffusers' ControlNet pipelines name it.
    control_image: list[Any] | None = None
    """One entry per ControlNet, in the directory's order: its conditioning image (an edge, depth or
    pose map: PIL) for every prompt, or a list of them, one per prompt (diffusers' convention for a
    batch of control images, which lets prompts with their own maps share a call); resized to the
    request's size as diffusers does. ``MASKED_INIT`` in its place: the init image with the mask's
    region at -1 (for an inpainting ControlNet; one per init image or mask already). A union
    ControlNet exported to take K images per call takes K entries, one per control mode."""
    control_mode: list[int] | None = None
    """Union ControlNets: the control mode of each control image (diffusers' ``control_mode``: an
    index into the modes the model was trained on, e.g. xinsir's 0 openpose, 1 depth, 3 canny)."""
    control_scale: PlaceSetting | None = None
    """``controlnet_conditioning_scale``: one for all ControlNets, or one each (one per image for a
    union ControlNet taking several: one per control image). None: diffusers' default for the task
    (``CONTROL_SCALE_DEFAULTS``: txt2img 1.0, img2img 0.8, inpainting 0.5, SDXL inpainting 1.0).

    In a ControlNet's place a list of one value per prompt (as ``control_image`` takes a list of
    images; ``control_start`` and ``control_end`` alike) gives each image its own, so images that
    differ in them share a call (a served batch). A ControlNet's residuals are linear in its scale,
    so the loop runs it at scale 1 and weighs each image's residuals by its own. Not for a union
    ControlNet taking several images, which weighs them inside (the mix is not linear)."""
    control_start: PlaceSetting = 0.0
    """``control_guidance_start``: the fraction of the steps after which a ControlNet starts acting."""
    control_end: PlaceSetting = 1.0
    """``control_guidance_end``: the fraction of the steps after which it stops."""
    guess_mode: bool = False
    """diffusers' ``guess_mode``: the ControlNets see the conditional (prompted) half of a CFG batch
    only, so the prompt steers and the control image alone shapes the rest, and each residual is
    scaled from 0.1 (the first) to 1 (the mid block's). On anyway where diffusers turns it on
    (``forced_guess_mode``: the first ControlNet pools)."""
    # T2I-Adapter (an engine directory exported with --adapter), as diffusers' adapter pipelines name it.
    adapter_image: list[Any] | None = None
    """The adapter's conditioning image (a sketch, edge, depth or pose map: PIL), one for every prompt
    or one per prompt, of any size: resized to the request's size as diffusers does, and read in the
    adapter's channels (greyscale for the sketch and canny adapters). With several adapters each
    entry is a tuple of images, one per adapter in the directory's order (``adapter_images``)."""
    adapter_scale: PlaceSetting = 1.0
    """``adapter_conditioning_scale``: the adapter's features are multiplied by it; with several
    adapters, one for all or one each (diffusers' ``MultiAdapter`` weights), and the features add up.
    In an adapter's place a list of one per prompt gives each image its own (``control_scale``'s
    layout; ``[[0.5, 1.0]]`` for one adapter), so images that differ in it share a call."""
    adapter_factor: float | list[float] = 1.0
    """``adapter_conditioning_factor``: the share of the steps, the first ``int(steps x factor)``, the
    adapter acts on (diffusers' SDXL adapter pipeline; its SD one always takes 1). One for every
    image, or a list of one per prompt (``guidance``'s layout): each image's features stop after its
    own share, so images that differ in it share a call. Several adapters share it, as in diffusers."""
    # Not a user's setting: what the model does with the guidance, filled in by ``with_defaults``.
    guidance_embedding: bool = False
    """The U-Net takes the guidance scale as an input (a latent consistency model's ``timestep_cond``:
    diffusers' ``time_cond_proj_dim``) instead of a second, unconditional batch half: ``cfg`` is off
    whatever the scale, and the negative prompts are not read, as in diffusers' pipelines."""

    if TYPE_CHECKING:  # what a caller may give, which ``__post_init__`` holds as the fields' types above
        # (one text for a list, a range of seeds, one image): a type checker read the fields' own
        # types as the constructor's and refused the README's forms. Every field, in order, with its
        # default (tests/test_python_api_types.py holds the two lists equal).
        def __init__(
            self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, steps: int = 30,
            guidance: float | Sequence[float] | None = None, guidance_rescale: float = 0.0,
            scheduler: str = "default", seeds: Sequence[int] = (0,), height: int | None = None,
            width: int | None = None, clip_skip: int | None = None, emphasis: str = "none",
            prompt_2: str | Sequence[str] | None = None, negative_prompt_2: str | Sequence[str] | None = None,
            original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
            target_size: tuple[int, int] | None = None, aesthetic_score: float | None = None,
            negative_aesthetic_score: float | None = None, denoising_end: float | None = None,
            denoising_start: float | None = None, init_latents: Any = None, image: Any = None, mask: Any = None,
            strength: float | None = None, control_image: Any = None, control_mode: Sequence[int] | None = None,
            control_scale: Settings | None = None, control_start: Settings = 0.0, control_end: Settings = 1.0,
            guess_mode: bool = False, adapter_image: Any = None, adapter_scale: Settings = 1.0,
            adapter_factor: float | Sequence[float] = 1.0, guidance_embedding: bool = False,
        ) -> None: ...

    def __post_init__(self) -> None:
        # diffusers' pipelines take one text or image where a list of them may go; so does this (a
        # text is not a list of one-letter prompts), one negative or second text for every prompt
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        elif isinstance(self.prompt, tuple):  # held as the list the checks take (a tuple over the profile's
            self.prompt = list(self.prompt)  # batch missed the request.split hint a list gets)
        if not isinstance(self.prompt, list):  # (everything below reads its length)
            raise SdexportError(f"prompt: expected a text or a list of texts, got {type(self.prompt).__name__} "
                                f"{self.prompt!r}")
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)] * max(1, len(self.prompt or [])))
            elif isinstance(getattr(self, name), tuple):  # held as the list its type says, as prompt is
                setattr(self, name, list(getattr(self, name)))
            elif not isinstance(getattr(self, name), list | tuple | None):  # (a TypeError from len() below)
                raise SdexportError(f"{name}: expected a text or a list of texts, got {type(getattr(self, name)).__name__} "
                                    f"{getattr(self, name)!r}")
        if isinstance(self.seeds, range | tuple):  # a sequence of seeds, held as the list the loop takes
            self.seeds = list(self.seeds)
        if isinstance(self.control_mode, range | tuple):  # (typed a Sequence: held as the list the checks take)
            self.control_mode = list(self.control_mode)
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list):
                setattr(self, name, list(value) if isinstance(value, tuple) else [value])
        # one image (or MASKED_INIT) for the one ControlNet or adapter, for every prompt, as diffusers
        # takes it; the ControlNets' entries held in a tuple; one image per adapter (a tuple) for every prompt
        if self.control_image is not None and not isinstance(self.control_image, list):
            self.control_image = (list(self.control_image) if isinstance(self.control_image, tuple)
                                  else [self.control_image])
        if self.adapter_image is not None and not isinstance(self.adapter_image, list):
            self.adapter_image = [self.adapter_image]
        if isinstance(self.guidance, tuple):  # one scale per prompt, held in a tuple: the loop takes a list
            self.guidance = list(self.guidance)

    @property
    def batch(self) -> int:
        return len(self.prompt)

    def detached(self) -> GenerationRequest:
        """A copy holding lists of its own, nested ones too (images and tensors are shared, as they are
        only read). A call runs, and its result records, the request as it was when the call began: a
        caller changing its request's lists in place between calls (``request.seeds[0] = seed``) had
        every earlier result record the last seed and prompt (an audit's finding)."""
        from dataclasses import fields, replace

        def copied(value: Any) -> Any:
            return [copied(v) for v in value] if isinstance(value, list) else value

        return replace(self, **{f.name: copied(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), list)})

    def sized(self, opt: tuple[int, int], vae_scale_factor: int) -> GenerationRequest:
        """This request with an unset ``height``/``width`` filled in: from ``init_latents`` (their
        sides times ``vae_scale_factor``), the init image, the first control image, then the first
        adapter image (PIL's ``size`` is (width, height)), else ``opt``, the profile's (height, width);
        itself when both are set. What the loop and the checks read: every side is a number then."""
        shape = tuple(getattr(self.init_latents, "shape", ()))
        if len(shape) == 4:
            return self._filled((int(shape[2]) * vae_scale_factor, int(shape[3]) * vae_scale_factor))
        return self.with_image_size()._filled(opt)

    def with_image_size(self) -> GenerationRequest:
        """This request with an unset side taken from its first image (init, control, then adapter
        image), as ``sized`` takes it; itself where it has none. ``split`` and an ensemble's halves
        take it first, so that every part, each with its own images, has the whole request's size."""
        picture = first_picture([self.image, self.control_image, self.adapter_image])
        return self._filled((picture.size[1], picture.size[0])) if picture is not None else self

    def _filled(self, size: tuple[int, int]) -> GenerationRequest:
        """Unset sides from ``size`` (height, width); itself when both are set."""
        if self.height is not None and self.width is not None:
            return self
        from dataclasses import replace

        return replace(self, height=size[0] if self.height is None else self.height,
                       width=size[1] if self.width is None else self.width)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), once ``sized``."""
        if self.height is None or self.width is None:
            raise SdexportError("the request's height or width is not set yet: the pipeline sets it (sized)")
        return self.height, self.width

    def adapter_images(self, adapters: int) -> list[list[Any]]:
        """Each adapter's images, one for every prompt or one per prompt (as ``adapter_image`` gives
        them: an entry per prompt, a tuple of one image per adapter where there are several)."""
        entries = self.adapter_image or []
        if adapters == 1:
            return [[e[0] if isinstance(e, tuple | list) else e for e in entries]]
        return [[entry[i] for entry in entries] for i in range(adapters)]

    def control_images(self, slot: int) -> list[Any]:
        """Entry ``slot`` of ``control_image`` as a list: its one image (or ``MASKED_INIT``) for every
        prompt, or its images, one per prompt."""
        entry = (self.control_image or [])[slot]
        return list(entry) if isinstance(entry, list | tuple) else [entry]

    def adapter_scales(self, adapters: int, image: int = 0) -> list[float]:
        """One ``adapter_scale`` per adapter, for image ``image``."""
        return [_for_image(place, image) for place in setting_places(self.adapter_scale, adapters)]

    def adapter_factor_of(self, image: int) -> float:
        """Image ``image``'s ``adapter_factor``: the one value, or its own."""
        return _for_image(self.adapter_factor, image)

    def adapter_scale_of(self, image: int, adapters: int) -> float | list[float]:
        """Image ``image``'s adapter scale as its saved file records it: one number where its
        ``adapters`` take the same, else one each. The same for the image whatever shape the call's
        ``adapter_scale`` took (a served image does not depend on the requests beside it)."""
        scales = self.adapter_scales(adapters, image)
        return scales[0] if len(set(scales)) == 1 else scales

    def split(self, size: int) -> list[GenerationRequest]:
        """The request as consecutive requests of at most ``size`` images each, in order: what a
        profile's largest batch allows per call. Per-image fields (prompts, seeds, one init image,
        mask, control image, ControlNet setting or adapter scale or factor per prompt) are cut; the rest is
        shared."""
        import operator
        from dataclasses import replace

        try:
            count: int | None = operator.index(size)  # (a numpy integer too)
        except TypeError:
            count = None
        if isinstance(size, bool) or count is None or count < 1:  # (0 failed in range(); -1 gave no part)
            raise SdexportError(f"split({size!r}): need a whole number of images per part, at least 1")
        size = count

        def cut(values: Any, start: int) -> Any:
            if values is None or isinstance(values, int | float) or len(values) != self.batch:  # one for all
                return values
            return values[start:start + size]

        per_image = ("prompt", "negative_prompt", "seeds", "prompt_2", "negative_prompt_2", "image", "mask",
                     "adapter_image", "guidance", "adapter_factor", "init_latents")
        whole = self.with_image_size()  # each part with its own images: the whole request's size
        parts = []
        for start in range(0, self.batch, size):
            fields: dict[str, Any] = {name: cut(getattr(self, name), start) for name in per_image}
            if self.control_image is not None:  # a list per ControlNet: its own length says what it holds
                fields["control_image"] = [cut(entry, start) if isinstance(entry, list | tuple) else entry
                                           for entry in self.control_image]
            for name in ("control_scale", "control_start", "control_end", "adapter_scale"):  # a list per prompt
                places = getattr(self, name)
                if isinstance(places, list | tuple):
                    fields[name] = [cut(place, start) if isinstance(place, list | tuple) else place
                                    for place in places]
            parts.append(replace(whole, **fields))
        return parts

    @property
    def task(self) -> str:
        """``txt2img``, ``img2img`` or ``inpaint``: what the loop does with the image inputs (a
        refiner's share from a base model's latents, ``denoising_start``, even before they are given:
        img2img, or inpaint with a mask, as diffusers runs it)."""
        if self.image is None and self.init_latents is None and self.denoising_start is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def effective_strength(self, family: str) -> float:
        if self.strength is not None:
            return self.strength
        if self.task == "txt2img":  # no image to start from: every step runs
            return 1.0
        # StableDiffusionXLImg2ImgPipeline's default is 0.3, its ControlNet variant's 0.8 (a family
        # without ControlNets, the refiner, has no such row: its request is refused for them later)
        task = "controlnet-img2img" if self.task == "img2img" and self.control_image else self.task
        defaults = STRENGTH_DEFAULTS[family]
        return defaults.get(task, defaults[self.task])

    def aesthetic_scores(self) -> tuple[float, float]:
        """The refiner's (``aesthetic_score``, ``negative_aesthetic_score``): as given, or diffusers'."""
        given = (self.aesthetic_score, self.negative_aesthetic_score)
        return cast(tuple[float, float], tuple(d if g is None else g for g, d in zip(given, AESTHETIC_SCORES)))

    def effective_guidance(self, family: str) -> float | list[float]:
        """``guidance``, or the family's default for the task where it is None."""
        if self.guidance is not None:
            return self.guidance
        task = "controlnet-inpaint" if self.task == "inpaint" and self.control_image else self.task
        defaults = GUIDANCE_DEFAULTS[family]
        return defaults.get(task, defaults[self.task])

    def guidance_scales(self, family: str) -> list[float]:
        """The guidance scale of each image, in order (a single value serves every image)."""
        guidance = self.effective_guidance(family)
        return list(guidance) if isinstance(guidance, list) else [guidance] * self.batch

    def with_defaults(self, family: str, guidance_embedding: bool = False, clip_skip: int = 0) -> GenerationRequest:
        """This request with the family's default guidance and the directory's ``clip_skip`` filled
        in, and whether the model's U-Net takes the guidance embedded (what runs, and what the saved
        image records); itself when nothing changes."""
        from dataclasses import replace

        if self.guidance is not None and self.guidance_embedding == guidance_embedding and self.clip_skip is not None:
            return self
        return replace(self, guidance=self.effective_guidance(family), guidance_embedding=guidance_embedding,
                       clip_skip=clip_skip if self.clip_skip is None else self.clip_skip)

    def denoising_steps(self, family: str) -> int:
        """Steps the loop runs: all for txt2img, the last ``int(steps * strength)`` for an init image
        (diffusers' ``get_timesteps``)."""
        if self.image is None:  # (a window of the schedule, denoising_start/end: the scheduler's to say)
            return self.steps
        return min(int(self.steps * self.effective_strength(family)), self.steps)

    def control_settings(self, count: int, family: str, image: int = 0) -> list[tuple[float, float, float]]:
        """(scale, start, end) of each of ``count`` ControlNets (control images of union ones) for
        image ``image`` (single values serve all; no scale: the family's default for the task)."""
        def each(value: PlaceSetting) -> list[float]:
            return [_for_image(place, image) for place in setting_places(value, count)]

        scale = CONTROL_SCALE_DEFAULTS[family][self.task] if self.control_scale is None else self.control_scale
        return list(zip(each(scale), each(self.control_start), each(self.control_end)))

    @property
    def control_settings_per_image(self) -> bool:
        """Whether some ControlNet setting holds a list of one value per prompt (which may differ)."""
        return any(isinstance(place, list | tuple)
                   for value in (self.control_scale, self.control_start, self.control_end)
                   for place in (value if isinstance(value, list | tuple) else []))

    @property
    def cfg(self) -> bool:
        """Guidance above 1 mixes in an unconditional prediction; at or below 1 it is skipped (every
        family's default is above 1), and so it is where the U-Net takes the guidance embedded
        (``guidance_embedding``). Per-image values are all on one side (``check_request``)."""
        if self.guidance_embedding:
            return False
        guidance = self.guidance
        if isinstance(guidance, list):
            return bool(guidance) and guidance[0] > 1.0
        return guidance is None or guidance > 1.0

    def texts_read(self, zeroed: bool = False) -> list[str]:
        """The texts (``TEXTS``) given that the text encoders read: the negatives only under
        classifier-free guidance, whose unconditional half reads them; ``negative_prompt_2`` only
        beside a ``negative_prompt`` where the model ``zeroed`` that half without one (SDXL's
        ``force_zeros_for_empty_prompt``, ``Txt2ImgPipeline.zeroes_negatives``), as diffusers' pipeline."""
        return [name for name in TEXTS if getattr(self, name) and (self.cfg or not name.startswith("negative"))
                and not (name == "negative_prompt_2" and zeroed and self.negative_prompt is None)]


def setting_places(value: Any, count: int) -> list[Any]:
    """A ``PlaceSetting``'s ``count`` places: one value or list given for all, or one each."""
    places = list(value) if isinstance(value, list | tuple) else [value]
    return places * count if len(places) == 1 else places


def _for_image(place: Any, image: int) -> Any:
    """The value a place of a ``PlaceSetting`` gives image ``image``: its one value, or its own."""
    if not isinstance(place, list | tuple):
        return place
    return place[0] if len(place) == 1 else place[image]


def guidance_label(guidance: float | list[float]) -> str:
    """``7.5``, or ``5, 7.5`` for one value per image."""
    return ", ".join(f"{g:g}" for g in guidance) if isinstance(guidance, list) else f"{guidance:g}"


SDXL_ONLY = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size")
REFINER_ONLY = ("aesthetic_score", "negative_aesthetic_score")
NOT_REFINER = ("prompt_2", "negative_prompt_2", "target_size")
"""SDXL conditioning the refiner has no place for: it has one text encoder (diffusers' refiner
pipeline would encode ``prompt`` and drop ``prompt_2`` unsaid), and an aesthetic score in place of
the target size."""


def forced_guess_mode(first_pools: bool, family: str, task: str) -> bool:
    """Whether diffusers runs in guess mode unasked: when the first ControlNet pools its conditions
    (``global_pool_conditions``, the shuffle ControlNets; a pooling one further down the list does
    not count), except in SDXL inpainting, whose pipeline does not read the flag."""
    return first_pools and not (is_sdxl(family) and task == "inpaint")


def pooling_note(pooled: list[str], controlnets: list[str], request: GenerationRequest, family: str) -> str | None:
    """What ``run`` says about pooling ControlNets (``pooled``, among the directory's ``controlnets``)
    when guess mode was not asked for: that guess mode is on anyway, or that it is not."""
    if not pooled or request.guess_mode:
        return None
    which = f"{' and '.join(pooled)} {'pools its' if len(pooled) == 1 else 'pool their'} conditions (global_pool_conditions)"
    if forced_guess_mode(controlnets[0] in pooled, family, request.task):
        return f"guess mode: {which}, which diffusers runs in guess mode: this run does as {setting('guess_mode')}"
    why = ("diffusers' SDXL inpainting pipeline does not read the flag" if controlnets[0] in pooled
           else "diffusers turns guess mode on only when the first ControlNet pools")
    return f"{which}, but {why}: this run is not in guess mode either ({setting('guess_mode')} turns it on)"


def has_no_text(prompt: object, prompt_2: object = None) -> bool:
    """The one rule ``run`` and ``serve`` refuse an image by: a blank prompt (an unset shell variable,
    say) with no SDXL second prompt to carry the text."""
    return isinstance(prompt, str) and not prompt.strip() and not (isinstance(prompt_2, str) and prompt_2.strip())


def check_prompt_text(prompts: list[str], prompts_2: list[str] | None = None) -> None:
    """``run`` refuses a blank prompt, as ``serve`` does, rather than spend a run generating from
    nothing (``has_no_text``). The Python API and bench scenarios accept one (unconditional
    generation, as diffusers does)."""
    for i, text in enumerate(prompts):
        if has_no_text(text, prompts_2[i] if prompts_2 and i < len(prompts_2) else None):
            which = "the prompt is" if len(prompts) == 1 else f"prompt {i + 1} of {len(prompts)} is"
            raise SdexportError(f"{which} empty; give the text to generate from")


def _not_utf8(text: str) -> str | None:
    """Where ``text`` cannot be UTF-8, else None. A byte that is not UTF-8 in a command line reaches
    Python as a surrogate (``surrogateescape``), which the tokenizer refused with a TypeError after
    the engines had loaded; serve refuses such a body as it decodes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"the byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        return f"{what} at character {exc.start + 1}"
    return None


def first_picture(values: Any) -> Any:
    """The first image (an object with a (width, height) ``size``) among nested lists and tuples of
    them, in order; None where there is none (``MASKED_INIT`` is a name, not an image). Given the
    init image(s), control images and adapter images, in that order: the image whose size a
    request without one takes (``GenerationRequest.sized``, ``sdexport run``, ``serve``)."""
    if isinstance(values, list | tuple):
        for value in values:
            found = first_picture(value)
            if found is not None:
                return found
        return None
    size = getattr(values, "size", None)
    return values if isinstance(size, tuple) and len(size) == 2 else None


def sizing_image(init: Any, controls: Any, adapters: Any) -> tuple[Any, str] | None:
    """``first_picture`` of the init image(s), control images and adapter images, with the input it
    came from (``init_image``, ``control_image`` or ``adapter_image``, as a refusal of its size
    names it: ``image_inputs.sized_by``); None where none holds an image."""
    for name, group in (("init_image", init), ("control_image", controls), ("adapter_image", adapters)):
        found = first_picture(group)
        if found is not None:
            return found, name
    return None


def check_request(
    request: GenerationRequest,
    *,
    family: str,
    dims: ImageGeometry,
    profile: ShapeProfile,
    scheduler_config: dict[str, Any] | None = None,
    controlnets: int = 0,
    adapters: int = 0,
    union_modes: int = 0,
    union_images: int = 1,
    guidance_embedding: bool = False,
    zeroed_negatives: bool = False,
) -> None:
    """Refuse what the engines cannot do, with one line that says what can be done instead.

    ``scheduler_config`` (the engine directory's) lets the step count be checked against the
    model's training timesteps; ``controlnets``: how many ControlNets the directory has (union ones
    where ``union_modes``, their ``N``, is set, each taking ``union_images``, their ``K``);
    ``adapters``: how many T2I-Adapters it has; ``guidance_embedding``: its U-Net takes the
    guidance embedded (a latent consistency model), so per-image scales need not share a side of 1;
    ``zeroed_negatives``: its unconditional half is zeros without a negative prompt, so a second
    negative prompt alone is not read (``GenerationRequest.texts_read``), nor checked.
    """
    from sdexport.runtime.schedulers import check_scheduler_name

    if not request.prompt:
        raise SdexportError(f"no prompt given: pass at least one {setting('prompt')}")
    if not all(isinstance(p, str) for p in request.prompt):
        raise SdexportError("prompts must be text")
    if request.negative_prompt is not None and len(request.negative_prompt) != request.batch:
        raise SdexportError(
            f"{len(request.negative_prompt)} negative prompts for {request.batch} prompts; give one per prompt, "
            "or one text for all"
        )
    for name in ("prompt_2", "negative_prompt_2"):
        given = getattr(request, name)
        if given is not None and len(given) != request.batch:
            raise SdexportError(f"{setting(name)}: {len(given)} given for {request.batch} prompts; give one per prompt, "
                                "or one text for all")
    for name in TEXTS[1:]:  # (the prompts' own check is above)
        if not all(isinstance(text, str) for text in getattr(request, name) or []):
            raise SdexportError(f"{setting(name)}: must be text")
    for name in TEXTS:
        for text in getattr(request, name) or []:
            where = _not_utf8(text)
            if where is not None:
                raise SdexportError(f"{setting(name)}: not UTF-8 text ({where}); give the text in UTF-8")
    if not isinstance(request.seeds, list | tuple):
        raise SdexportError(f"{setting('seed')} {request.seeds!r}: give a list of seeds, one per image")
    if len(request.seeds) != request.batch:
        raise SdexportError(f"{setting('seed')}: {len(request.seeds)} for {request.batch} images; give one per image "
                            f"(e.g. seeds=range({request.batch}))")
    for seed in request.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            kind = "" if isinstance(seed, int) else f" ({type(seed).__name__})"
            raise SdexportError(f"{setting('seed')} {seed!r}{kind}: seeds are {'Python ' if kind else ''}integers from 0 "
                                f"to 2^64-1 ({MAX_SEED})")
    _check_conditioning(request, family)
    _check_clip_skip(request.clip_skip, family, dims)
    _check_guidance(request.guidance, request.batch, sides=not guidance_embedding)  # (the emphasis check reads cfg)
    _check_emphasis(request, zeroed_negatives)
    if isinstance(request.steps, bool) or not isinstance(request.steps, int):
        raise SdexportError(f"{setting('steps')} {request.steps!r} ({type(request.steps).__name__}): need a whole "
                            "number of steps (a Python int)")
    if request.steps < 1:
        raise SdexportError(f"{setting('steps')} {request.steps}: need at least 1 step")
    trained = int((scheduler_config or {}).get("num_train_timesteps") or 0)
    if trained and request.steps > trained:
        raise SdexportError(
            f"{setting('steps')} {request.steps}: the model was trained on {trained} timesteps, so a scheduler can "
            f"take at most {trained} steps (20-50 is usual)"
        )
    _check_guidance_rescale(request.guidance_rescale)
    check_scheduler_name(request.scheduler)
    for axis in ("height", "width"):
        value = getattr(request, axis)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ProfileError(f"{axis} {value!r} ({type(value).__name__}): expected a whole number of pixels (a "
                               "Python int)")
    sized = request.sized((profile.height[1], profile.width[1]), dims.vae_scale_factor)
    try:
        profile.check_request(sized.batch, *sized.size, dims)
    except ProfileError as exc:  # a size the caller did not give (a side, not the batch): say whose it was
        given = request.height is not None or request.width is not None or request.init_latents is not None
        source = None if given or not profile.takes_batch(sized.batch) else \
            sizing_image(request.image, request.control_image, request.adapter_image)
        if source is None:
            raise
        from sdexport.runtime.image_inputs import sized_by

        raise ProfileError(f"{exc} ({sized_by(source[1], None)})") from None
    request = sized
    _check_window(request, family)
    _check_image_inputs(request, family, dims)
    _check_control(request, controlnets, family, union_images, union_modes)
    if guidance_embedding and request.control_image is not None and request.image is not None:
        raise SdexportError("ControlNets with an init image on a latent consistency model: diffusers' ControlNet "
                            "img2img and inpaint pipelines do not give such a U-Net its guidance (they guide by a "
                            "second batch half), so there is nothing to match; use the ControlNet from text (no "
                            f"{setting('init_image')}), or the init image without it")
    _check_adapter(request, int(adapters))


def check_per_image(request: GenerationRequest, *, family: str, controlnets: int = 0, adapters: int = 0,
                    union_modes: int = 0, union_images: int = 1, guidance_embedding: bool = False) -> None:
    """The fields that may differ image by image (guidance, control images, ControlNet settings,
    adapter images, scales and factors) over a whole request, before ``run`` splits it into calls
    (``split``), which ``check_request`` then sees one by one: a refusal numbers the images as the
    user counts them, and values no call takes together (guidance on both sides of 1) are refused
    even where a split would part them."""
    _check_guidance(request.guidance, request.batch, sides=not guidance_embedding)
    _check_control(request, controlnets, family, union_images, union_modes)
    _check_adapter(request, adapters)


FLOAT32_MAX = 3.4028234663852886e38


def finite32(value: float) -> bool:
    """A number the engines can take: finite in float32, which every scale and score becomes (1e300
    is finite to Python and infinite to the U-Net, whose NaN latents would be found only after the run)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _check_guidance(guidance: object, batch: int, sides: bool = True) -> None:
    """One finite scale >= 0, or one per image, all above 1 or all at or below it (``sides``): a call
    runs the unconditional half of the batch for every image or for none."""
    if guidance is None:
        return
    each = isinstance(guidance, list)
    values = guidance if isinstance(guidance, list) else [guidance]
    if each and len(values) != batch:
        raise SdexportError(f"{setting('guidance')}: {len(values)} given for {batch} images; give one, or one per image")
    for i, value in enumerate(values):
        which = f"{setting('guidance')} {value!r}" + (f" (image {i + 1} of {batch})" if each else "")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SdexportError(f"{which}: expected an int or a float, not {type(value).__name__}"
                                + ("" if each else ", or a list of one per image"))
        if not finite32(value) or value < 0:
            raise SdexportError(f"{which}: need a finite number >= 0 (1 disables guidance; 5 to 7.5 is usual), "
                                "within float32's range")
    numbers = cast(list[float], values)  # checked above
    if sides and len({value > 1 for value in numbers}) > 1:
        raise SdexportError(
            f"{setting('guidance')} {guidance_label(numbers)}: a call guides all its images or none (guidance at "
            "or below 1 skips the unconditional half of the batch); generate those above 1 and those at or below "
            "it in calls of their own"
        )


def _check_guidance_rescale(rescale: object) -> None:
    if isinstance(rescale, bool) or not isinstance(rescale, int | float):
        raise SdexportError(f"{setting('guidance_rescale')} {rescale!r}: expected a number from 0 to 1, not "
                            f"{type(rescale).__name__}")
    if not 0 <= rescale <= 1:  # (NaN too)
        raise SdexportError(f"{setting('guidance_rescale')} {rescale}: need a number from 0 (off) to 1 (0.7 is "
                            "suggested for models trained for zero terminal SNR)")


def no_adapter() -> SdexportError:
    """The refusal of adapter inputs where there is no T2I-Adapter (a served request's too, before
    its images are decoded)."""
    return SdexportError(f"{setting('adapter_image')} and its settings ({setting('adapter_scale')}, "
                         f"{setting('adapter_factor')}) need an engine directory exported with --adapter "
                         "(this one has no T2I-Adapter)")


def no_controlnet() -> SdexportError:
    """The refusal of ControlNet inputs where there is no ControlNet (``no_adapter``'s sibling)."""
    settings = ", ".join(setting(name) for name in ("control_mode", "control_scale", "control_start",
                                                    "control_end", "guess_mode"))
    return SdexportError(f"{setting('control_image')} and its settings ({settings}) need an engine directory "
                         "exported with --controlnet (this one has no ControlNet)")


def _check_adapter(request: GenerationRequest, adapters: int) -> None:
    """T2I-Adapter inputs: an image per adapter (for every prompt, or per prompt), settings diffusers
    would accept."""
    from sdexport.runtime.image_inputs import check_image

    if not adapters:
        if (request.adapter_image is not None or request.adapter_factor not in (1.0, [1.0])
                or request.adapter_scale not in (1.0, [1.0])):
            raise no_adapter()
        return
    entries = request.adapter_image
    several = (f"{adapters} T2I-Adapters: give {adapters} adapter images ({setting('adapter_image')}), one each, in the "
               "order they were exported")
    if entries is None:
        raise SdexportError(f"this engine directory has a T2I-Adapter: give {setting('adapter_image')} (the sketch, "
                            "edge, depth or pose map it reads)" if adapters == 1 else f"this engine directory has {several}")
    if not isinstance(entries, list):
        raise SdexportError(f"adapter_image: expected a list of PIL images (one, or one per prompt), got "
                            f"{type(entries).__name__}" + (" (several adapters: a list of tuples, one image per "
                                                           "adapter each, e.g. [(depth, sketch)])"
                                                           if adapters > 1 else ""))
    if len(entries) not in (1, request.batch):
        raise SdexportError(f"{len(entries)} adapter images for {request.batch} prompt{'s' if request.batch > 1 else ''}: "
                            "give one, or one per prompt"
                            if adapters == 1 else
                            f"adapter images for {len(entries)} prompts, not {request.batch}: give the {adapters} "
                            "images for every prompt, or for each prompt")
    for entry in entries:
        count = len(entry) if isinstance(entry, tuple | list) else 1
        if count != adapters:
            raise SdexportError(f"{count} adapter image(s) for {several}" if adapters > 1 else
                                f"{count} adapter images for one prompt of a directory with one T2I-Adapter")
    for images in request.adapter_images(adapters):
        for image in images:
            check_image(image, None, None, "adapter image")
    _check_setting("adapter_scale", request.adapter_scale, request.batch, adapters,
                   f"{adapters} T2I-Adapter{'s' if adapters > 1 else ''}", "adapter")
    _check_adapter_factor(request.adapter_factor, request.batch)


def _check_adapter_factor(factor: object, batch: int) -> None:
    """One share of the steps from 0 to 1, or one per image; a refusal names the image."""
    each = isinstance(factor, list | tuple)
    values = list(factor) if isinstance(factor, list | tuple) else [factor]
    if each and len(values) != batch:
        raise SdexportError(f"{setting('adapter_factor')}: {len(values)} given for {batch} image{'s' if batch > 1 else ''}; "
                            "give one, or one per image")
    for i, value in enumerate(values):
        which = f"{setting('adapter_factor')} {value!r}" + (f" (image {i + 1} of {batch})" if each else "")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SdexportError(f"{which}: expected a finite number")
        if not 0 <= value <= 1:
            which = f"{setting('adapter_factor')} {value:g}" + (f" (image {i + 1} of {batch})" if each else "")
            raise SdexportError(f"{which}: a fraction of the steps, from 0 to 1")


def _check_control(request: GenerationRequest, controlnets: int, family: str, union_images: int = 1,
                   union_modes: int = 0) -> None:
    """ControlNet inputs: one image per ControlNet (``union_images`` each for union ones), a control
    mode below ``union_modes`` for each image of a union ControlNet, settings that diffusers would
    accept."""
    from sdexport.runtime.image_inputs import check_image

    defaults = (request.control_scale, request.control_start, request.control_end,
                request.guess_mode) == (None, 0.0, 1.0, False)
    if not isinstance(request.guess_mode, bool):  # (numpy's bool_ too: "guess_mode True: expected true or false")
        kind = type(request.guess_mode)
        named = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise SdexportError(f"{setting('guess_mode')} {request.guess_mode!r}: expected true or false (a bool), "
                            f"not {named}")
    if not controlnets:
        if request.control_image is not None or request.control_mode is not None or not defaults:
            raise no_controlnet()
        return
    images = request.control_image
    s = "" if controlnets == 1 else "s"
    per_net = max(union_images, 1)
    slots = controlnets * per_net
    if images is None:
        raise SdexportError(f"this engine directory has {controlnets} ControlNet{s}: give {setting('control_image')} (one "
                            "per ControlNet, in the order they were exported)" if per_net == 1 else
                            f"this engine directory has a union ControlNet taking {per_net} images: give "
                            f"{per_net} control images ({setting('control_image')}) and a {setting('control_mode')} "
                            "for each")
    if not isinstance(images, list) or len(images) != slots:
        count = len(images) if isinstance(images, list) else type(images).__name__
        per_prompt = (f"; with one per prompt, give a list in each place (control_image=[[image_1, image_2, ...]"
                      f"{', ...' if slots > 1 else ''}])" if request.batch > 1 and count == slots * request.batch else "")
        raise SdexportError((f"{count} control images ({setting('control_image')}) for {controlnets} ControlNet{s}: "
                             "give one per ControlNet, in the "
                             "order they were exported (controlnet, controlnet_1, ...)" if per_net == 1 else
                             f"{count} control images for a union ControlNet exported to take {per_net} "
                             "(--union-images): give that many") + per_prompt)
    _check_control_modes(request.control_mode, slots, union_modes)
    for k, entry in enumerate(images):
        if isinstance(entry, str) and entry == MASKED_INIT:
            if request.mask is None:
                raise SdexportError(f"control image {MASKED_INIT} is the init image with the mask's region at -1 (for "
                                    f"inpainting ControlNets): it needs {setting('init_image')} and {setting('mask')}")
            continue
        where = f" (control image {k + 1} of {slots})" if slots > 1 else ""
        if isinstance(entry, list | tuple):
            if len(entry) not in (1, request.batch):
                prompts = f"{request.batch} prompt{'s' if request.batch > 1 else ''}"
                raise SdexportError(f"{len(entry)} control images for {prompts}{where}: give one, or one per prompt")
            if any(isinstance(image, str) and image == MASKED_INIT for image in entry):
                raise SdexportError(f"{MASKED_INIT} is made for each prompt from its init image and mask: give it in "
                                    f"place of the list{where}")
        for image in request.control_images(k):
            check_image(image, None, None, "control image")
    for name, value in (("control_scale", request.control_scale), ("control_start", request.control_start),
                        ("control_end", request.control_end)):
        if value is not None or name != "control_scale":  # None: the scale's per-task default (the window has none)
            _check_setting(name, value, request.batch, slots, f"{slots} control images" if per_net > 1 else
                           f"{controlnets} ControlNet{s}", "control image", fraction=name != "control_scale",
                           inside=per_net)
    # a window given once for every control image is refused without naming the first of them (an audit)
    window = (request.control_start, request.control_end)
    per_place = any(isinstance(value, list | tuple) for value in window)
    per_image = any(isinstance(place, list | tuple) for value in window if isinstance(value, list | tuple)
                    for place in value)
    for image in range(request.batch):
        for i, (_, start, end) in enumerate(request.control_settings(slots, family, image)):
            if start >= end:
                which = [*([f"control image {i + 1}"] if slots > 1 and per_place else []),
                         *([f"image {image + 1} of {request.batch}"] if per_image else [])]
                raise SdexportError(f"{setting('control_start')} {start:g} is not before {setting('control_end')} {end:g}"
                                    + (f" ({', '.join(which)})" if which else ""))


def _check_setting(name: str, value: Any, batch: int, count: int, noun: str, place: str, *, fraction: bool = False,
                   inside: int = 1) -> None:
    """A ControlNet or T2I-Adapter setting's places (``name``: the served input's; one for all, or
    one for each of ``count``: ``noun`` says what they are, ``place`` what one is), each a finite
    number (``fraction``: of the steps, from 0 to 1) or a list of one per prompt. ``inside``: the images a union ControlNet
    takes per call, which it weighs inside it where it takes several, so the prompts of a call take
    the same value there."""
    flag = setting(name)
    places = list(value) if isinstance(value, list | tuple) else [value]
    if len(places) not in (1, count):
        flat = batch > 1 and len(places) == count * batch and not any(isinstance(p, list | tuple) for p in places)
        per_prompt = (f"; with one per prompt, give a list in each place ([[first, second, ...]"
                      f"{', ...' if count > 1 else ''}])" if flat else "")
        raise SdexportError(f"{flag}: {len(places)} values for {noun}: give one, or one each" + per_prompt)
    for k, entry in enumerate(places):
        where = f" ({place} {k + 1} of {count})" if len(places) > 1 else ""
        values = list(entry) if isinstance(entry, list | tuple) else [entry]
        if isinstance(entry, list | tuple) and len(values) not in (1, batch):
            raise SdexportError(f"{flag}: {len(values)} values for {batch} prompt{'s' if batch > 1 else ''}{where}: "
                                "give one, or one per prompt")
        for i, v in enumerate(values):
            which = [*([f"{place} {k + 1} of {count}"] if len(places) > 1 else []),
                     *([f"image {i + 1} of {batch}"] if len(values) > 1 else [])]
            said = f" ({', '.join(which)})" if which else ""
            if isinstance(v, bool) or not isinstance(v, int | float):  # (numpy's float32 is no float)
                raise SdexportError(f"{flag} {_given(v)}{said}: expected an int or a float, not {type(v).__name__}")
            if not finite32(v):
                raise SdexportError(f"{flag} {v!r}{said}: expected a finite number (within float32's range)")
            if fraction and not 0 <= v <= 1:
                raise SdexportError(f"{flag} {v:g}{said}: a fraction of the steps, from 0 to 1")
        if inside > 1 and len(set(values)) > 1:
            raise SdexportError(f"{flag} {', '.join(f'{v:g}' for v in values)}{where}: a union ControlNet taking "
                                f"{inside} images weighs them inside it, so the prompts of a call take the same "
                                "value; generate the others in calls of their own")


def _given(value: object) -> str:
    """A value of the wrong type as a refusal shows it: a number as it reads (numpy 2's repr of its
    scalars says ``np.float32(0.5)``, the type the message names after it), anything else by repr."""
    import numbers

    return str(value) if isinstance(value, numbers.Number) else repr(value)


def _check_control_modes(modes: Any, images: int, known: int) -> None:
    """A union ControlNet's modes: one per control image, each below ``known`` (none for others)."""
    if not known:
        if modes is not None:
            raise SdexportError(f"{setting('control_mode')} is for union ControlNets (ControlNetUnionModel); these "
                                "ControlNets take no mode")
        return
    if modes is None:
        raise SdexportError(f"union ControlNets need {setting('control_mode')} for each control image: which of their {known} "
                            "modes it is (e.g. xinsir's 0 openpose, 1 depth, 2 scribble/HED, 3 canny/lineart)")
    if not isinstance(modes, list) or len(modes) != images:
        count = len(modes) if isinstance(modes, list) else type(modes).__name__
        raise SdexportError(f"{count} control modes for {images} control image{'s' if images > 1 else ''}: give one "
                            f"{setting('control_mode')} per {setting('control_image')}")
    for mode in modes:
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise SdexportError(f"{setting('control_mode')} {_given(mode)} ({type(mode).__name__}): expected a Python int, "
                                f"one of the modes 0 to {known - 1}")
        if not 0 <= mode < known:
            raise SdexportError(f"{setting('control_mode')} {mode!r}: this union ControlNet knows modes 0 to {known - 1}")


def _check_image_inputs(request: GenerationRequest, family: str, dims: ImageGeometry) -> None:
    """img2img and inpainting: what is given fits together, the model and the request's size."""
    inpainting_unet = bool(getattr(dims, "inpainting", False))
    if request.image is None:
        if request.mask is not None and request.init_latents is None:  # (with them: an inpainting ensemble's refiner)
            raise SdexportError(f"a mask without an init image: inpainting needs both ({setting('init_image')} and "
                                f"{setting('mask')})")
        if request.strength is not None:
            raise SdexportError(f"{setting('strength')} needs an init image ({setting('init_image')}): it says how far "
                                "that image is noised")
        if inpainting_unet and request.init_latents is not None:
            raise SdexportError("init_latents: this is an inpainting model, whose U-Net takes the masked init image's "
                                "latents, which a base model's latents do not give; refine them with a standard "
                                "U-Net (the SDXL refiner)")
        if inpainting_unet:
            raise SdexportError(f"this is an inpainting model (its U-Net takes a mask): give {setting('init_image')} "
                                f"and {setting('mask')}")
        if family == SDXL_REFINER and request.init_latents is None:  # (a base model's latents: _check_window)
            raise SdexportError(f"the SDXL refiner refines an image (img2img, inpainting): give {setting('init_image')}, "
                                "such as an SDXL base model's output")
        _check_images(request, ("mask", request.mask))  # an inpainting ensemble's refiner: the base model's mask
        return
    if inpainting_unet and request.mask is None:
        raise SdexportError(f"this is an inpainting model (its U-Net takes a mask): give {setting('mask')} with the "
                            "init image")
    _check_images(request, ("init image", request.image), ("mask", request.mask))
    strength = request.strength
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int | float)):
        raise SdexportError(f"{setting('strength')} {_given(strength)}: expected an int or a float, not "
                            f"{type(strength).__name__}")
    if strength is not None and (not math.isfinite(strength) or not 0 < strength <= 1):
        raise SdexportError(f"{setting('strength')} {strength!r}: need a number above 0 and at most 1")
    if request.denoising_steps(family) < 1:
        raise SdexportError(
            f"{setting('strength') if strength is not None else 'the default strength'} "
            f"{request.effective_strength(family):g} with {setting('steps')} {request.steps} runs no step "
            f"(int(steps x strength) = 0): raise the strength or the steps"
        )


def _check_images(request: GenerationRequest, *given: tuple[str, list[Any] | None]) -> None:
    """Each (name, images) given: one for every prompt or one per prompt, of the request's size."""
    from sdexport.runtime.image_inputs import check_image

    for name, images in given:
        if images is None:
            continue
        if not isinstance(images, list) or len(images) not in (1, request.batch):
            count = len(images) if isinstance(images, list) else type(images).__name__
            raise SdexportError(f"{count} {name}s for {request.batch} prompts: give one, or one per prompt")
        for image in images:
            check_image(image, request.height, request.width, name)


def _check_window(request: GenerationRequest, family: str) -> None:
    """SDXL's ensemble of experts: a window of the schedule (``denoising_end``, ``denoising_start``)
    and the latents the second expert starts from, as diffusers' SDXL pipelines take them. The
    latents' shape is the pipeline's to check (``Txt2ImgPipeline.check``)."""
    end, start = request.denoising_end, request.denoising_start
    if end is None and start is None and request.init_latents is None:
        return
    if not is_sdxl(family):
        raise SdexportError(f"denoising_end/denoising_start: SDXL's ensemble of experts (a base model handing its "
                            f"latents to the refiner), but this is an {FAMILY_LABELS[family]} model")
    for name, value in (("denoising_end", end), ("denoising_start", start)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or not 0 < value < 1):
            raise SdexportError(f"{name} {value}: need a fraction of the schedule above 0 and below 1")
    if (start is None) != (request.init_latents is None):
        raise SdexportError("denoising_start and init_latents go together: the latents a base model's denoising_end "
                            "left, and the point of the schedule they were left at")
    if start is not None and end is not None and start >= end:
        raise SdexportError(f"denoising_start {start} and denoising_end {end}: the window is empty (the start must come before the end)")
    if start is not None and request.image is not None:
        raise SdexportError("init_latents take the place of an init image: give one or the other (an inpainting "
                            "ensemble's refiner takes the base model's mask with its latents)")
    if start is not None and request.strength is not None:
        raise SdexportError(f"{setting('strength')} {request.strength} with denoising_start: where the window starts says how far "
                            "the latents are noised; leave the strength out")
    if start is not None and (request.control_image is not None or request.adapter_image is not None):
        raise SdexportError("denoising_start with ControlNets or T2I-Adapters: the refiner's share takes neither "
                            "(they stay with the base model's)")
    if end is not None and request.control_image is not None and request.image is not None:
        # diffusers' SDXL ControlNet img2img pipelines take no denoising_end; its inpaint ones do, but
        # default to another guidance than the refiner's, which one served row cannot give both
        task = "inpainting" if request.mask is not None else "img2img"
        raise SdexportError(f"ControlNets and an init image with a refiner ({setting('denoising_end')} {end}): a "
                            f"ControlNet {task} ensemble of experts is not run yet (ControlNets on the base model run "
                            "text to image)")


def _check_conditioning(request: GenerationRequest, family: str) -> None:
    for name in ("original_size", "crops_coords_top_left", "target_size"):  # (a TypeError below otherwise)
        value = getattr(request, name)
        if not isinstance(value, list | tuple) and (value is not None or name == "crops_coords_top_left"):
            raise SdexportError(f"{setting(name)} {value!r}: expected two pixel counts (height, width)")
    given = {
        "prompt_2": request.prompt_2 is not None,
        "negative_prompt_2": request.negative_prompt_2 is not None,
        "original_size": request.original_size is not None,
        "crops_coords_top_left": tuple(request.crops_coords_top_left) != (0, 0),
        "target_size": request.target_size is not None,
        "aesthetic_score": request.aesthetic_score is not None,
        "negative_aesthetic_score": request.negative_aesthetic_score is not None,
    }
    if family != SDXL_REFINER:
        named = [name for name in REFINER_ONLY if given[name]]
        if named:
            handed = " (an SDXL base model hands it to a refiner: run or serve it with --refiner)" if family == "sdxl" else ""
            raise SdexportError(f"{', '.join(map(setting, named))}: the SDXL refiner's conditioning, but this is an "
                                f"{FAMILY_LABELS[family]} model{handed}")
    else:
        named = [name for name in NOT_REFINER if given[name]]
        if named:
            raise SdexportError(f"{', '.join(map(setting, named))}: not the SDXL refiner's conditioning (it has one "
                                f"text encoder, read with {setting('prompt')} and {setting('negative_prompt')}, and an "
                                "aesthetic score in place of the target size)")
        for name in REFINER_ONLY:
            value = getattr(request, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not finite32(value)):
                raise SdexportError(f"{setting(name)} {value}: expected a finite number (LAION aesthetic ratings run 0 to 10)")
    if not is_sdxl(family):
        named = [name for name in SDXL_ONLY if given[name]]
        if named:
            raise SdexportError(f"{', '.join(map(setting, named))}: SDXL conditioning, but this is an "
                                f"{FAMILY_LABELS[family]} model")
        return
    for name in ("original_size", "crops_coords_top_left", "target_size"):
        value = getattr(request, name)
        if value is not None and (
            len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CONDITIONING
                                   for v in value)
        ):
            raise SdexportError(f"{setting(name)} {value}: expected two pixel counts from 0 to {MAX_CONDITIONING}")


def _check_clip_skip(value: object, family: str, dims: ImageGeometry) -> None:
    """A clip skip the directory's text encoders can read: an SD export's own (built into its graph),
    any below SDXL's encoders' layers. ``dims``: a manifest's ``ModelDims`` (an outline's, in a bench
    plan, has no clip skip, and bench requests give none)."""
    if value is None:
        return
    check_clip_skip(setting("clip_skip"), value)
    exported = int(getattr(dims, "clip_skip", 0))
    if not is_sdxl(family):
        if value != exported:
            again = f"with --clip-skip {value}" if value else "without --clip-skip"
            raise SdexportError(f"{setting('clip_skip')} {value}: this {FAMILY_LABELS[family]} export's text encoder has "
                                f"clip skip {exported} built in; export the model again {again} for another "
                                "(SDXL's text encoders give every layer, SD's their last)")
        return
    check_clip_skip(setting("clip_skip"), value, (getattr(dims, "L1", 0), getattr(dims, "L2", 0)))


def _check_emphasis(request: GenerationRequest, zeroed_negatives: bool) -> None:
    """A mode of ``runtime.emphasis``; texts longer than ``MAX_TEXT`` (tokenizing a served 30 MB prompt
    held the server's one instance for ten minutes); weighed, texts whose weights A1111 cannot read
    either, or that the engines cannot take (beyond float32's range, as every scale)."""
    from sdexport.runtime.emphasis import MAX_TEXT, EmphasisError, check_mode, parse

    check_mode(request.emphasis, setting("emphasis"))
    for name in request.texts_read(zeroed_negatives):  # (negatives that no call reads are left as they are)
        texts = getattr(request, name)
        for i, text in enumerate(texts):
            label = setting(name) + (f" {i + 1}" if len(texts) > 1 else "")
            if len(text) > MAX_TEXT:
                raise SdexportError(f"{label}: {len(text):,} characters; a text has at most {MAX_TEXT:,} (the "
                                    "engines read a few chunks of 75 tokens)")
            if request.emphasis == "none":
                continue
            try:
                weights = [weight for _, weight in parse(text)]
            except EmphasisError as error:
                raise SdexportError(f"{label}: {error}") from None
            if not all(finite32(weight) for weight in weights):
                raise SdexportError(f"{label}: its brackets weigh a part {max(weights, key=abs):g}, beyond "
                                    "float32's range")


def default_notes(request: GenerationRequest, family: str, zeroed_negatives: bool = False) -> list[str]:
    """Defaults that change what was asked for, said out loud: an inpainting strength below 1 (SDXL's
    0.9999, diffusers') runs fewer steps than asked for; A1111's emphasis syntax, read as text, and
    its syntax beyond emphasis (prompt editing, alternation, AND, ``<lora:...>`` tags), which no mode
    reads as A1111 does (``run``'s notes)."""
    from sdexport.runtime.emphasis import extra_network_tags, unread_syntax, uses_syntax

    notes = []
    strength = request.effective_strength(family) if request.task == "inpaint" and request.strength is None else 1
    if strength < 1:
        notes.append(f"{request.denoising_steps(family)} of {request.steps} steps: the default {setting('strength')} "
                     f"of {FAMILY_LABELS[family]} inpainting is diffusers' {strength:g}, which starts from the init "
                     f"image noised to the first timestep ({setting('strength')} 1: every step, from pure noise)")
    names = request.texts_read(zeroed_negatives)
    if request.emphasis == "none":
        read = [name for name in names if any(uses_syntax(text) for text in getattr(request, name))]
        if read:
            notes.append(f"{' and '.join(setting(name) for name in read)}: A1111's emphasis syntax (brackets, "
                         f"escapes, BREAK) read as text, as diffusers reads it; {assigned('emphasis', 'original')} "
                         "reads it as A1111 does")
    else:
        unread: dict[tuple[str, str], list[str]] = {}  # A1111's syntax beyond emphasis → the texts that use it
        for name in names:
            for feature in {f: None for text in getattr(request, name) for f in unread_syntax(text).items()}:
                unread.setdefault(feature, []).append(name)
        notes += [f"{' and '.join(setting(name) for name in users)}: A1111's {feature} is not read as A1111 reads "
                  f"it: sdexport reads {how}" for (feature, how), users in unread.items()]
    tagged = {name: tags for name in names if (tags := [t for text in getattr(request, name) for t in extra_network_tags(text)])}
    if tagged:
        first = next(iter(tagged.values()))[0]
        how = ("sdexport has no hypernetworks" if first[1:].lower().startswith("hypernet") else
               "give the file with --lora FILE:SCALE (LyCORIS' LoCon; its LoHa and LoKr are refused) and leave the tag out"
               if first[1:].lower().startswith("lyco") else "give the file with --lora FILE:SCALE and leave the tag out")
        notes.append(f"{' and '.join(map(setting, tagged))}: {first} is A1111's tag for a file it loads, read here as "
                     f"words: {how}")
    return notes


def ignored_settings(request: GenerationRequest, guidance_embedding: bool = False,
                     zeroed_negatives: bool = False) -> list[str]:
    """Settings the request gives that will have no effect, to be said out loud rather than dropped
    (``guidance_embedding``: the model's U-Net takes the guidance embedded, with no unconditional half;
    ``zeroed_negatives``: that half is zeros without a negative prompt, ``GenerationRequest.texts_read``)."""
    if not guidance_embedding and (request.cfg or request.guidance is None):  # (not cfg: a guidance was given)
        if request.cfg and "negative_prompt_2" not in request.texts_read(zeroed_negatives) and request.negative_prompt_2:
            return [(f"{setting('negative_prompt_2')} ignored: without {setting('negative_prompt')}, this SDXL model's "
                     "unconditional half is zeros (its force_zeros_for_empty_prompt, as in diffusers' pipeline); give "
                     f"{setting('negative_prompt')} too (an empty one to have {setting('negative_prompt_2')} alone read)")]
        return []
    given = [name for name, value in (("negative_prompt", request.negative_prompt),
                                      ("negative_prompt_2", request.negative_prompt_2),
                                      ("negative_aesthetic_score", request.negative_aesthetic_score),
                                      ("guidance_rescale", request.guidance_rescale or None))
             if value is not None and value != []]
    if not given:
        return []
    acting = " and ".join(what for what, on in (("the negatives", given != ["guidance_rescale"]),
                                                ("the rescale", "guidance_rescale" in given)) if on)
    if guidance_embedding:
        why = ("this latent consistency model takes the guidance as an input of its U-Net, with no "
               f"unconditional half for {acting} to act in")
    else:
        assert request.guidance is not None  # (returned above where none was given)
        why = (f"{setting('guidance')} {guidance_label(request.guidance)} disables classifier-free guidance, which is "
               f"where {acting} act{'s' if acting == 'the rescale' else ''} (use a guidance above 1)")
    return [f"{' and '.join(setting(name) for name in given)} ignored: {why}"]

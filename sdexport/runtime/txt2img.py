"""The generation loop over engines: tokenize → encode (with CFG) → scheduler loop → decode.

Text-to-image, image-to-image and inpainting are one loop: an init image only changes where the
loop starts (its latents noised to the strength's first timestep, as diffusers' img2img and inpaint
pipelines do), and a mask adds the inputs an inpainting U-Net takes, or, for a standard U-Net,
blends the kept region back after every step (``ImageConditioning``).

It is written once for every backend: engines take and return torch tensors on their device, so
the same lines run over TensorRT, ONNX Runtime and PyTorch, and backends are compared through one
code path. The loop follows ``diffusers.StableDiffusionPipeline`` and, for the ``sdxl`` family,
``StableDiffusionXLPipeline`` step for step (the same seeds give the same latents), without their
model code. The families differ only in how a prompt becomes the U-Net's conditioning (SDXL: two
text encoders, a pooled embedding and six "time ids"); the denoising loop and the decode are shared.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from sdexport.console import console
from sdexport.errors import EngineDirError, ProfileError, SdexportError, pasteable
from sdexport.runtime.emphasis import check_reading, weigh
from sdexport.runtime.engine import Engine
from sdexport.runtime.prompt_text import Chunk, chunk_tensors, kept_text, longest_chunks, text_chunks
from sdexport.runtime.request import (
    GenerationRequest as GenerationRequest,  # (re-exported: the README imports it here)
)
from sdexport.runtime.request import check_request, forced_guess_mode, guidance_label
from sdexport.runtime.schedulers import (
    HostSchedule,
    a1111_sampler,
    check_steps,
    config_as_loaded,
    make_scheduler,
    schedule_window,
    scheduler_label,
    set_schedule,
)
from sdexport.runtime.timing import NO_CLOCK, StageClock, clock_for
from sdexport.setting_names import option
from sdexport.shapes import ShapeProfile
from sdexport.specs import (
    GUIDANCE_EMBEDDING,
    SDXL_REFINER,
    VAE_ENCODER,
    VAE_ENCODER_FP32,
    ModelDims,
    adapters_among,
    controlnets_among,
    is_sdxl,
)


@dataclass
class Timings:
    """Seconds per stage from a ``StageClock`` (CUDA events on a GPU, no host synchronisation), and
    the end-to-end wall time of the call; ``clock`` says which clock the stages come from."""

    text_encoder: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    vae_decoder: float = 0.0
    total: float = 0.0
    clock: str = "host clock"
    controlnet_steps: list[float] = field(default_factory=list)
    """Per step, the ControlNets' time (all of them; steps where none is active are absent)."""
    adapter: float = 0.0
    """The T2I-Adapters' calls, once each before the loop (0 without one)."""

    @property
    def unet_total(self) -> float:
        return sum(self.unet_steps)

    @property
    def controlnet_total(self) -> float:
        return sum(self.controlnet_steps)

    @property
    def loop_overhead(self) -> float:
        """Time outside the engine spans: tokenizing, scheduler math, CFG, copies, launch gaps."""
        return (self.total - self.text_encoder - self.adapter - self.controlnet_total - self.unet_total
                - self.vae_decoder)

    @property
    def iterations_per_second(self) -> float:
        return len(self.unet_steps) / self.unet_total if self.unet_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_encoder": self.text_encoder,
            "unet_steps": self.unet_steps,
            "unet_total": self.unet_total,
            "vae_decoder": self.vae_decoder,
            **({"controlnet_steps": self.controlnet_steps, "controlnet_total": self.controlnet_total}
               if self.controlnet_steps else {}),
            **({"adapter": self.adapter} if self.adapter else {}),
            "loop_overhead": self.loop_overhead,
            "total": self.total,
            "it_per_s": self.iterations_per_second,
            "clock": self.clock,
        }


@dataclass
class ImageConditioning:
    """What an init image (and mask) contribute to one run, on the device, per image of the batch;
    or, for an inpainting ensemble's refiner, a base model's latents and the mask
    (``Txt2ImgPipeline.handed_conditioning``)."""

    latents: torch.Tensor
    """Where the loop starts: the image's latents noised to the first timestep (or pure noise; or
    the base model's latents as they are)."""
    noise: torch.Tensor
    image_latents: torch.Tensor | None = None
    """What the kept region is blended back to (standard U-Net inpainting): the init image's
    latents, or the base model's."""
    mask: torch.Tensor | None = None
    """(B, 1, h, w), 1 = repaint: the mask at latent size."""
    masked_latents: torch.Tensor | None = None
    """The masked image's latents: an inpainting U-Net's extra input."""
    encoder_fallback: bool = False
    """Whether an fp16 encoder overflowed and the fp32 one encoded (``Txt2ImgPipeline._encode``)."""


class ControlConditioning:
    """What the ControlNets get at each step of one run: their images and per-step scales (as
    tensors on the device, made once per distinct value, not once per step).

    In guess mode (``conditional_only``: guess mode with CFG) they run on the conditional half of
    the batch alone and the unconditional half gets zeros. ``gains``: per ControlNet, guess mode's
    factor for each residual (diffusers' ``torch.logspace(-1, 0, n)``, 0.1 for the first to 1 for
    the mid block's), or None (not in guess mode, or a pooling ControlNet, which diffusers leaves
    unscaled).

    ``scales[net][step]`` holds each prompt's scales, in order: one for a plain ControlNet (its
    input a 0-d tensor), K for a union one (a (K,) tensor). Where the prompts' scales are the same
    the ControlNet takes them as its input. Where they differ (per-image settings; a single scale
    each, as ``check_request`` allows) it runs at scale 1 and each image's residuals are weighed by
    its own (``weigh``): a ControlNet's residuals are linear in its scale.

    ``modes``: per union ControlNet, its inputs that say which control modes its images are
    (``control_type``, ``control_type_idx``); empty for plain ones. A ControlNet whose scales are
    all zero adds exactly zero and is not run, except a union one taking several images: diffusers
    scales those images' features inside it, and its residuals are not zero then."""

    def __init__(self, names: list[str], images: list[torch.Tensor],
                 scales: list[list[tuple[tuple[float, ...], ...]]], device: torch.device, *,
                 conditional_only: bool = False, gains: list[list[float] | None] | None = None,
                 modes: list[dict[str, torch.Tensor]] | None = None) -> None:
        self.names, self.images, self.scales = names, images, scales
        self.conditional_only = conditional_only
        self.gains = gains or [None] * len(names)
        self.modes = modes or [{} for _ in names]
        shared = {(self._input(rows), bool(extra)) for per_step, extra in zip(scales, self.modes) for rows in per_step}
        self._tensors: dict[tuple[tuple[float, ...], bool], torch.Tensor] = {
            (value, extra): torch.tensor(list(value) if extra else value[0], dtype=torch.float32, device=device)
            for value, extra in shared
        }
        # the scales of each step whose prompts' differ (``weigh``), on the device before the loop:
        # a tensor made from Python numbers inside it is a copy that waits for the device
        self._columns = {self._column(rows): torch.tensor(self._column(rows), dtype=torch.float32, device=device)
                         for per_step in scales for rows in per_step if len(set(rows)) > 1}
        self._weights: dict[tuple[tuple[float, ...], int], torch.Tensor] = {}

    @staticmethod
    def _input(rows: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
        """The scales the ControlNet takes for prompts with ``rows``: theirs where they agree, else 1."""
        return rows[0] if len(set(rows)) == 1 else (1.0,)

    @staticmethod
    def _column(rows: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
        """Each prompt's scale where the prompts' differ (a single one each): ``weigh``'s weights."""
        return tuple(value[0] for value in rows)

    def _runs(self, net: int, step: int) -> bool:
        rows = self.scales[net][step]
        return any(len(value) > 1 or any(v != 0 for v in value) for value in rows)

    def active(self, step: int) -> bool:
        return any(self._runs(i, step) for i in range(len(self.names)))

    def active_nets(self, step: int) -> list[tuple[int, str, dict[str, torch.Tensor], list[float] | None]]:
        """(index, name, control inputs, gains) of each ControlNet that runs at ``step``."""
        return [(i, name, {"controlnet_cond": image, **modes,
                           "conditioning_scale": self._tensors[self._input(per_step[step]), bool(modes)]}, gains)
                for i, (name, image, per_step, gains, modes)
                in enumerate(zip(self.names, self.images, self.scales, self.gains, self.modes))
                if self._runs(i, step)]

    def weigh(self, net: int, step: int, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """ControlNet ``net``'s ``residuals`` at ``step``, each image's times its own scale where
        the prompts' differ (it ran at scale 1), else as they are.

        The product is taken in float32, the residuals' dtype. An fp32 graph multiplies by its
        scale input so too, and so does ONNX Runtime's CPU provider in an fp16 graph (it runs the
        multiplication in float32): there an image comes out bit for bit as in a call where its
        scale serves every prompt. A GPU running an fp16 graph multiplies in fp16 (and TensorRT may
        fuse the multiplication into the convolution), and the image differs from that call's by
        the residuals' rounding; a pooling ControlNet averages after its scale (diffusers' order),
        and the image differs by float rounding (so ``serve`` batches its rows with other
        requests' only at the same settings: ``settings_apart``)."""
        rows = self.scales[net][step]
        if len(set(rows)) == 1:
            return residuals
        scales = self._column(rows)
        key = (scales, residuals[0].shape[0])
        if key not in self._weights:  # twice the prompts under CFG, once in guess mode
            self._weights[key] = self._columns[scales].repeat(key[1] // len(scales)).reshape(-1, 1, 1, 1)
        weights = self._weights[key]
        return [(r * weights).to(r.dtype) for r in residuals]


@dataclass
class AdapterFeatures:
    """What a T2I-Adapter gives the U-Net in one run: its features (times the scale, batched as the
    U-Net's input), to each prompt's rows at the first of its ``steps`` U-Net calls, and zeros after
    them (adding nothing, as diffusers' U-Net does when it is given no features)."""

    features: dict[str, torch.Tensor]
    steps: list[int]
    """Per prompt: how many U-Net calls, the first ones, take its features (its own factor's)."""
    _masks: dict[tuple[bool, ...], torch.Tensor] = field(init=False, default_factory=dict)
    """Each mix of acting and finished prompts the run goes through, on the device before the loop
    (a tensor made from Python values inside it is a copy that waits for the device): one from the
    call where each prompt's share ends, the prompts with a longer share still acting."""
    _held: tuple[tuple[bool, ...], dict[str, torch.Tensor]] | None = field(init=False, default=None)
    """The last mix, and the features that give it. Only the last: a prompt that has finished stays
    so, and a mix costs a copy of the features."""

    def __post_init__(self) -> None:
        device = next(iter(self.features.values())).device
        for first in sorted(set(self.steps)):
            acting = tuple(first < steps for steps in self.steps)
            self._masks[acting] = torch.tensor(acting, device=device)

    def at(self, step: int) -> dict[str, torch.Tensor]:
        acting = tuple(step < steps for steps in self.steps)
        if all(acting):
            return self.features
        if self._held is None or self._held[0] != acting:
            keep = self._masks[acting]  # per prompt; its rows: once, or twice under CFG (unconditional half first)
            self._held = acting, {name: torch.where(keep.repeat(value.shape[0] // len(acting)).reshape(-1, 1, 1, 1),
                                                    value, 0.0)
                                  for name, value in self.features.items()}
        return self._held[1]


@dataclass
class GenerationResult:
    images: list[Any]
    """PIL images."""
    latents: torch.Tensor
    """Final latents (before VAE scaling), float32 on the CPU, for agreement checks."""
    pixels: np.ndarray
    """Decoded images as float32 in [0, 1], NHWC."""
    timings: Timings
    request: GenerationRequest
    family: str
    """The model's family (``sd``, ``sdxl``): the request's defaults (strength, ControlNet scale) depend
    on it, and the saved images record what ran."""
    vae_fallback: bool = False
    """Whether the VAE decoder overflowed (NaN/Inf) and the fp32 one decoded instead."""
    encoder_fallback: bool = False
    """Whether the VAE encoder overflowed on the init image and the fp32 one encoded it instead."""
    truncated: dict[str, list[str | None]] = field(default_factory=dict)
    """Per text field that was too long for the text encoder: the text it read (None where a text
    fitted). ``save_images`` records these instead of the given text."""
    scheduler: str = ""
    """The scheduler that ran, as ``--scheduler`` names it (``default`` resolved: ``pndm``, ...)."""
    sampler: str = ""
    """The same in A1111's words (``PLMS``, ``DPM++ 2M Karras``), for the images' parameters text."""
    info: dict[str, Any] = field(default_factory=dict)
    """The pipeline's record of the engines (model, backend, graphs), saved with the images."""
    guess_mode: bool = False
    """Whether the ControlNets ran in guess mode (asked for, or turned on by a first ControlNet
    that pools, as diffusers does)."""
    unguided: list[tuple[int, int]] = field(default_factory=list)
    """(control image, image) pairs, from 0, whose ``control_start``/``control_end`` window held none
    of the steps that ran: that control image guided nothing there (as in diffusers; ``run`` says so)."""
    unadapted: list[int] = field(default_factory=list)
    """Images, from 0, whose ``adapter_factor`` (above 0) gave the T2I-Adapters' features to none of
    the U-Net calls that ran (its share of the steps rounds down to 0, as diffusers counts it): the
    adapters guided nothing there (``run`` says so)."""

    def save(self, path: str | Path) -> list[Path]:
        """Save the images as ``sdexport run -o`` does (PNG, JPEG or WebP by suffix, ``NAME-i.EXT`` for
        several), with the same metadata; never over a file sdexport did not write."""
        from sdexport.runtime.images import refuse_a_folder_name, save_images

        if not self.images:  # (wrote nothing and returned [], an audit)
            raise SdexportError(f"{path}: this result has no images to save (a request with denoising_end "
                                "keeps its latents for the refiner: give them to it as init_latents)")
        refuse_a_folder_name(path, str(path))  # errors name the path, not a CLI flag
        return save_images(self, Path(path), label=str(path))


def text_tokenizers(family: str, tokenizer: Any, tokenizer_2: Any) -> dict[str, Any]:
    """The tokenizer of each text a request may give: the refiner's only one reads its prompts (the
    second texts are SDXL's: ``check_request``)."""
    first = tokenizer_2 if family == SDXL_REFINER else tokenizer
    return {"prompt": first, "negative_prompt": first, "prompt_2": tokenizer_2, "negative_prompt_2": tokenizer_2}


CLOSED = "this pipeline was closed (its engines were released); load it again"
CLOSING = "this pipeline is being closed (close() waits for a running call, then releases its engines)"
"""What a call is told while ``close`` waits for a running call: "released" was not so yet."""
KEPT = ("this pipeline was closed, but its engines are kept: close() gave up waiting for a running call; call "
        "close() again once it has returned")
"""What a call is told after ``close(timeout=...)`` ran out: nothing will release the engines but
another close (the first wording said they would be, a review's finding)."""
MAX_WARNED = 256
"""The most long texts a pipeline remembers having warned of (``Txt2ImgPipeline.truncations``)."""


class Txt2ImgPipeline:
    """The one denoising loop over an engine directory's engines, whatever their backend: text to
    image, img2img, inpainting, ControlNets, T2I-Adapters, run-time LoRA and SDXL's two experts are
    all requests to it (``GenerationRequest``). Made by ``load_pipeline``; one pipeline serves many
    requests of any size and scheduler its profile takes; ``close()`` (or ``with``) releases it."""

    def __init__(
        self,
        engines: dict[str, Engine],
        *,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        dims: ModelDims,
        vae_scaling_factor: float,
        profile: ShapeProfile,
        fallback_vae: Engine | None = None,
        info: dict[str, Any] | None = None,
        family: str = "sd",
        tokenizer_2: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        pooled_controlnets: tuple[str, ...] = (),
        fallback_encoder: Engine | None = None,
        lowered: frozenset[str] = frozenset(),
        unplanned: frozenset[str] = frozenset(),
        read_chunks: tuple[int, str] | None = None,
    ) -> None:
        """``force_zeros_for_empty_prompt`` (SDXL, as in diffusers): with no negative prompt at all,
        the unconditional embeddings are zeros instead of the encoded empty prompt.
        ``pooled_controlnets``: the ControlNets that pool their residuals (``global_pool_conditions``);
        the first one doing so puts requests in guess mode, as in diffusers. ``info`` records
        ``"vae_decoder": "fp32"``, ``"vae_encoder": "fp32"`` where that engine is an fp16 export's
        fp32 graph (``runtime.loading.vae_in_place``), so an overflow there is not fp16's. ``fallback_vae``, ``fallback_encoder``: fp32 engines that rerun the
        ``vae_decoder``, ``vae_encoder`` where it overflows (``runtime.loading.vae_fallbacks``).
        ``lowered``: the VAE parts (``vae_decoder``, ``vae_encoder``) and the U-Net where its engine
        computes in fp16 though the export is fp32, as ``sdexport build`` made it
        (``runtime.loading.runs_lowered``): an overflow there is fp16's. ``unplanned``: the VAE parts whose fp32 rerun the directory
        has but the backend left out (TensorRT: no plan that serves, ``choose_plans``). ``read_chunks``:
        (count, why) to read at most ``count`` prompt chunks though the engines take more, ``why``
        said in the warning of a text cut (the benchmark reads one chunk, as its baseline does)."""
        if is_sdxl(family) and tokenizer_2 is None:
            raise SdexportError("an SDXL pipeline needs tokenizer_2")
        if family != SDXL_REFINER and tokenizer is None:
            raise SdexportError(f"a {family} pipeline needs tokenizer")
        self.engines = engines
        self.family = family
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.scheduler_config = scheduler_config
        self.dims = dims
        self.vae_scaling_factor = vae_scaling_factor
        self.profile = profile
        self.fallback_vae = fallback_vae
        self.fallback_encoder = fallback_encoder
        self.lowered = lowered
        self.unplanned = unplanned
        self.info = info or {}
        self.closed = False
        self._calls: set[int] = set()
        """The threads inside a call now, running or waiting their turn: ``close`` waits for them."""
        self._settled = threading.Condition()
        self._turn = threading.Lock()
        """Held by the one call that runs: another thread's call waits for it. The TensorRT engines
        (and ONNX Runtime's CUDA graphs) run on one set of buffers each, and a U-Net call's outputs
        are views into them until its next call: two calls at once would mix their images silently."""
        self._released = False
        """The engines were released (by the first ``close`` to get there: two closers release once)."""
        self._closing = False
        """A ``close`` waits for a running call (``_closed_words``)."""
        self._warned: set[tuple[str, str]] = set()
        """(field, text) of the long texts already warned of (``truncations``): said once, not per call."""
        self.device = engines["unet"].device
        self.controlnets = controlnets_among(engines)
        self.adapters = adapters_among(engines)
        self.adapter = bool(self.adapters)
        self.pooled_controlnets = tuple(n for n in self.controlnets if n in pooled_controlnets)
        taking = [engine.profile.chunks for engine in engines.values() if "encoder_hidden_states" in engine.spec.input_names]
        self.prompt_chunks = min(most for _, _, most in taking)
        """The most prompt chunks a text is read in: what the U-Net's (and ControlNets') engines
        take (``ShapeProfile.chunks``); what follows is cut, with a warning."""
        self.least_chunks = max(least for least, _, _ in taking)
        """The fewest the engines take (a plan built ``--static`` at two chunks: two): fewer are
        padded with empty chunks."""
        if self.least_chunks > self.prompt_chunks:
            raise EngineDirError(f"the engines that read the text take no common number of prompt chunks "
                                 f"({', '.join(f'{lo}-{hi}' for lo, _, hi in taking)}): build them with one "
                                 f"{option('--prompt-chunks')}")
        self.read_chunks = read_chunks if read_chunks is not None and read_chunks[0] < self.prompt_chunks else None
        """(count, why) where the pipeline reads fewer chunks than the engines take. A plan whose
        fewest chunks (``least_chunks``) is more still has the texts padded to those."""
        if self.read_chunks is not None:
            self.prompt_chunks = self.read_chunks[0]
        self.clock: StageClock = clock_for(self.device)
        self._steps_checked: set[tuple[str, int, bool, bool]] = set()
        # Import scheduler code now, so that first-call import time is not counted as loop overhead.
        make_scheduler("default", scheduler_config)
        import diffusers.utils.torch_utils  # noqa: F401

    # -- checks -----------------------------------------------------------------------------

    def sized(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its unset height and width filled in for these engines: the size of its
        init latents or first image, else the profile's opt (``GenerationRequest.sized``)."""
        return request.sized((self.profile.height[1], self.profile.width[1]), self.dims.vae_scale_factor)

    def scheduler_config_for(self, request: GenerationRequest) -> dict[str, Any]:
        """The scheduler config ``request`` samples with: the saved one as diffusers' pipeline for
        its task runs it (``config_as_loaded``; a tenth of a millisecond)."""
        return config_as_loaded(self.scheduler_config, request.scheduler, family=self.family,
                                conditioned=self.dims.conditioned, inpainting=request.mask is not None)

    def check(self, request: GenerationRequest) -> None:
        """Refuse what the engines cannot do before any of them runs."""
        if self.closed:
            raise SdexportError(self._closed_words())
        largest = self.profile.batch[2]
        if isinstance(request.prompt, list) and len(request.prompt) > largest:  # `sdexport run` splits by itself; an API caller is told how
            raise ProfileError(f"{len(request.prompt)} images in one call: the engines' profile takes at most "
                               f"{largest}; split the request (request.split({largest})) and call the parts "
                               "inside `with pipeline.padded_to(request):` (each text then reads as in one call, "
                               "as `sdexport run` reads it), or re-export with a wider --batch")
        check_request(request, family=self.family, dims=self.dims, profile=self.profile,
                      scheduler_config=self.scheduler_config, controlnets=len(self.controlnets),
                      adapters=len(self.adapters), union_modes=self.dims.N, union_images=self.dims.K or 1,
                      guidance_embedding=bool(self.dims.G), zeroed_negatives=self.zeroes_negatives)
        request = self.sized(request)
        if request.image is not None and "vae_encoder" not in self.engines:
            raise SdexportError("an init image needs the VAE encoder: load the pipeline with image_inputs=True "
                                "(the directory must have a vae_encoder)")
        if request.init_latents is not None:
            if not isinstance(request.init_latents, torch.Tensor):
                raise SdexportError(f"init_latents: expected a torch tensor (a result's latents), got "
                                    f"{type(request.init_latents).__name__}")
            shape = tuple(request.init_latents.shape)
            wanted = self.latent_shape(request)
            if shape[1:] != wanted[1:] or shape[0] not in (1, request.batch):
                rows = "1" if request.batch == 1 else f"1 or {request.batch}"
                raise SdexportError(f"init_latents of shape {shape}: this model's at {request.height}x{request.width} "
                                    f"are ({rows}, {', '.join(map(str, wanted[1:]))})")
            if not bool(torch.isfinite(request.init_latents).all()):  # (the loop would run, then blame the weights)
                raise SdexportError("init_latents hold NaN or infinite values (a base model's run that failed, or "
                                    "latents given so): no image can come from them")
        checked = (request.scheduler, request.steps, request.mask is not None, request.image is not None)
        if checked not in self._steps_checked:  # a dry run: once, not per call
            check_steps(request.scheduler, self.scheduler_config_for(request), request.steps,
                        from_image=request.image is not None)
            self._steps_checked.add(checked)
        for engine in self.engines.values():
            if engine.profile != self.profile:
                try:
                    engine.profile.check_request(request.batch, *request.size, self.dims)
                except ProfileError as exc:
                    raise ProfileError(f"{engine.spec.name} engine: {exc}") from None

    # -- the loop ---------------------------------------------------------------------------

    def __call__(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[int, int], object] | None = None,  # (what it returns is not read: a bar's update)
        stages: bool = True,
    ) -> GenerationResult:
        """Generate ``request``; ``on_step(done, total)`` reports U-Net calls (PNDM makes steps + 1).

        ``stages=False`` places no marks at all (``Timings.clock`` "none", stage times 0): the run
        a benchmark times end to end. The result's request has its size and the family's defaults
        filled in (``sized``, ``GenerationRequest.with_defaults``): what ran. Calls from several
        threads run one at a time (``_turn``); a call from inside another (its ``on_step``) is refused,
        as it would overwrite the buffers the outer call is using. A ``close`` from another thread
        waits for the running call to end; calls still waiting their turn are then refused."""
        if not isinstance(request, GenerationRequest):  # (diffusers' pipe("a prompt") habit: one line, not an AttributeError)
            raise SdexportError(f"expected a GenerationRequest, got {type(request).__name__} {request!r:.80}: "
                                "pipe(GenerationRequest(prompt=...))")
        if on_step is not None and not callable(on_step):
            raise SdexportError(f"on_step: expected a callable (done, total), got {type(on_step).__name__}")
        thread = threading.get_ident()
        with self._settled:
            if self.closed:
                raise SdexportError(self._closed_words())
            if thread in self._calls:
                raise SdexportError("a call of this pipeline inside another (an on_step callback?): make it after the "
                                    "call returns, or load a second pipeline")
            self._calls.add(thread)
        try:
            with self._turn:  # (closed while it waited for the call before it: check() refuses it first)
                return self._generate(request, on_step, stages)
        finally:
            with self._settled:
                self._calls.discard(thread)
                self._settled.notify_all()

    def _generate(self, request: GenerationRequest, on_step: Callable[[int, int], object] | None,
                  stages: bool) -> GenerationResult:
        """``__call__``'s work, the call counted."""
        self.check(request)  # first: a task the family does not run has no defaults to fill in
        request = self.sized(request.detached()).with_defaults(self.family, guidance_embedding=bool(self.dims.G),
                                                               clip_skip=self.dims.clip_skip)
        if "negative_prompt_2" not in request.texts_read(self.zeroes_negatives):  # (what ran: not recorded)
            request = replace(request, negative_prompt_2=None)
        guidance = guidance_factor(request.effective_guidance(self.family), self.device)
        embedded = {GUIDANCE_EMBEDDING: guidance_embedding(request.guidance_scales(self.family), self.dims.G)
                    .to(self.device)} if self.dims.G else {}  # a latent consistency model's U-Net input
        clock = self.clock if stages else NO_CLOCK
        start = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]

        scheduler = make_scheduler(request.scheduler, self.scheduler_config_for(request))
        set_schedule(scheduler, request.steps, self.device)  # (where no step waits for the device to read it)
        timesteps = schedule_window(scheduler, request, self.family)  # first: an empty one is refused before any engine runs
        # the engines' copy, made while the device has nothing queued to wait for
        engine_timesteps = timesteps.to(device=self.device, dtype=torch.float32).reshape(-1)
        # and inpainting's blend's, on the host (``HostSchedule``)
        host_schedule = HostSchedule(scheduler, timesteps) if request.mask is not None else None
        truncated = self.truncations(request)
        read_prompts = self.prompt_reader(request)  # the texts tokenized: host work, outside the encoders' span
        text_start = clock.mark()
        conditioning = read_prompts()
        text_end = clock.mark()
        init = self.image_conditioning(request, generators, scheduler, timesteps) if request.image is not None else None
        if init is not None:
            latents = init.latents
        elif request.init_latents is not None:  # a base model's, as they are (diffusers adds no noise)
            latents = request.init_latents.detach().to(device=self.device, dtype=torch.float32).expand(
                self.latent_shape(request))  # (detached: a tensor that requires grad cannot become numpy)
            if request.mask is not None:  # an inpainting ensemble's refiner: blends back outside the mask
                init = self.handed_conditioning(request, latents, generators)
        else:
            latents = self.initial_latents(request, generators, scheduler)
        extra: list[torch.Tensor] = []  # an inpainting U-Net's mask and masked-image latents, CFG-batched
        if init is not None and self.dims.inpainting:
            assert init.mask is not None and init.masked_latents is not None
            extra = [torch.cat([init.mask] * 2) if request.cfg else init.mask,
                     torch.cat([init.masked_latents] * 2) if request.cfg else init.masked_latents]
        blend = init is not None and init.mask is not None and not self.dims.inpainting
        step_kwargs = _step_kwargs(scheduler, generators)
        span = self.control_span(request, scheduler, timesteps) if self.controlnets else 0
        control = self.control_conditioning(request, span) if self.controlnets else None
        unguided = self.unguided_controls(request, span, len(timesteps)) if control is not None else []
        adapter: AdapterFeatures | None = None
        if self.adapter:
            adapter_inputs = self.adapter_pixels(request)  # (outside the span: the baseline times the adapter's forward)
            adapter_start = clock.mark()
            adapter = self.adapter_features(request, adapter_inputs, len(timesteps))
            adapter_span = (adapter_start, clock.mark())
        unadapted = [i for i, calls in enumerate(adapter.steps)  # (a factor of 0 is meant so)
                     if calls == 0 and request.adapter_factor_of(i) > 0] if adapter is not None else []

        step_marks, control_marks = [], []
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if request.cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            residuals: dict[str, torch.Tensor] = {}
            if control is not None:
                before = clock.mark()
                residuals = self.control_residuals(control, i, model_input.float(), engine_timesteps[i], conditioning)
                if control.active(i):
                    control_marks.append((before, clock.mark()))
            if extra:
                model_input = torch.cat([model_input, *extra], dim=1)
            feed = {"sample": model_input.float(), "timestep": engine_timesteps[i], **conditioning, **embedded,
                    **residuals, **(adapter.at(i) if adapter is not None else {})}
            before = clock.mark()
            noise = self.engines["unet"](feed)["out_sample"]
            step_marks.append((before, clock.mark()))
            if request.cfg:
                noise = guided(noise, guidance, request.guidance_rescale)
            else:
                # Engines may return a buffer they overwrite on the next call (TensorRT does), and
                # multistep schedulers (PNDM, DPM++, UniPC) keep past model outputs.
                noise = noise.clone()
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if blend:  # a standard U-Net inpaints by keeping the unmasked region on the image's own path
                assert init is not None and init.image_latents is not None and init.mask is not None
                assert host_schedule is not None
                kept = init.image_latents
                if i < len(timesteps) - 1:  # scheduler.add_noise(kept, init.noise, the next timestep)
                    image_level, noise_level = host_schedule.noise_levels(scheduler, i + 1)
                    kept = image_level * kept + noise_level * init.noise
                latents = torch.lerp(kept, latents, init.mask)  # (the mask is 0 or 1: exactly one of them)
            if on_step is not None:
                on_step(i + 1, len(timesteps))

        decode_start = clock.mark()
        if request.denoising_end is None:
            image, fallback = self.decode(latents, request, scheduler_label(scheduler))
            decode_end = clock.mark()  # (as the baseline's VAE span ends: the image to the host is overhead)
            pixels = host_pixels(image)  # the run is complete
        else:  # the latents are the result, for the refiner (diffusers' output_type="latent")
            pixels, fallback = np.zeros((0, *request.size, 3), np.float32), False
            latents = latents.float().cpu()
            decode_end = clock.mark()
        total = time.perf_counter() - start  # before the marks are read (each a device query)
        timings = Timings(
            text_encoder=clock.seconds(text_start, text_end),
            unet_steps=[clock.seconds(a, b) for a, b in step_marks],
            vae_decoder=clock.seconds(decode_start, decode_end),
            total=total,
            clock=clock.kind,
            controlnet_steps=[clock.seconds(a, b) for a, b in control_marks],
            adapter=clock.seconds(*adapter_span) if adapter is not None else 0.0,
        )
        return GenerationResult(
            images=to_pil(pixels),
            latents=latents.float().cpu(),
            pixels=pixels,
            timings=timings,
            request=request,
            family=self.family,
            vae_fallback=fallback,
            encoder_fallback=init is not None and init.encoder_fallback,
            truncated=truncated,
            scheduler=scheduler_label(scheduler),
            sampler=a1111_sampler(scheduler),
            info=self.run_info(request, fallback, init is not None and init.encoder_fallback),
            guess_mode=control is not None and self.guess_mode(request),
            unguided=unguided,
            unadapted=unadapted,
        )

    def run_info(self, request: GenerationRequest, vae_fallback: bool, encoder_fallback: bool) -> dict[str, Any]:
        """The pipeline's ``info`` as one run's images record it: the precision of each VAE part
        that ran in fp32 (from the start, or as the fallback of an fp16 one that overflowed), the
        encoder's only where it ran (a served pipeline loads it for every request), and the clip skip
        where one ran or the directory's default is one (a 0 that ran is then said)."""
        info = {k: v for k, v in self.info.items() if k != "vae_encoder" or request.image is not None}
        if request.image is None and info.get("graphs"):  # nor its graphs (an fp16 export's fp32 one too)
            info["graphs"] = {k: v for k, v in info["graphs"].items()
                              if k not in (VAE_ENCODER.name, VAE_ENCODER_FP32.name)}
        if vae_fallback:
            info["vae_decoder"] = "fp32"
        if encoder_fallback:
            info["vae_encoder"] = "fp32"
        if request.clip_skip or self.dims.clip_skip:  # (the request's, filled in by with_defaults)
            info["clip_skip"] = request.clip_skip
        return info

    def guess_mode(self, request: GenerationRequest) -> bool:
        """Asked for, or where diffusers turns it on by itself (``forced_guess_mode``)."""
        first_pools = bool(self.controlnets) and self.controlnets[0] in self.pooled_controlnets
        return request.guess_mode or forced_guess_mode(first_pools, self.family, request.task)

    def truncations(self, request: GenerationRequest) -> dict[str, list[str | None]]:
        """Texts longer than the engines read: warn, and say what they will read instead.

        Tokenizers cut silently at ``dims.S`` tokens (77 for CLIP), and the engines read at most
        ``prompt_chunks`` chunks of S - 2; the user should hear it, and the saved image should record
        the text that was used, not the text that was given. One text given for several images is
        warned of once, naming them; once warned of, not again by this pipeline (``sdexport run``
        asks of the whole run first, so the images are named by the run's numbers, then calls the
        engines in parts).
        """
        tokenizers = text_tokenizers(self.family, self.tokenizer, self.tokenizer_2)
        found: dict[str, list[str | None]] = {}
        for name in request.texts_read(self.zeroes_negatives):
            texts, tokenizer = getattr(request, name), tokenizers[name]
            kept = [kept_text(text, tokenizer, self.dims.S, request.emphasis, self.prompt_chunks) for text in texts]
            images: dict[str, list[int]] = {}  # each long text: the images it is given for
            for i, used in enumerate(kept):
                if used is not None:
                    images.setdefault(texts[i], []).append(i + 1)
            for text, numbers in images.items():
                if (name, text) in self._warned:
                    continue
                if len(self._warned) >= MAX_WARNED:  # (a server's texts: kept few)
                    self._warned.clear()
                self._warned.add((name, text))
                which = (f"{name.replace('_', ' ')} {numbers[0]} is" if len(numbers) == 1 else
                         f"{name.replace('_', ' ')}s {spans(numbers)} (the same text) are")
                used = kept[numbers[0] - 1]
                console.print(f"[yellow]warning:[/] {which} longer than {self.reads}; "
                              f"{'they read' if self.prompt_chunks > 1 else 'it reads'} only: {escape(repr(used))}")
            if any(k is not None for k in kept):
                found[name] = kept
        return found

    @property
    def reads(self) -> str:
        """How much text the engines read, as the warnings say it."""
        if self.profile.chunks[2] == 1:  # (a directory exported before the axis, or with one chunk)
            return f"the {self.dims.S} tokens the text encoder reads"
        what = f"the {self.dims.S} tokens" if self.prompt_chunks == 1 else \
            f"the {self.prompt_chunks} chunks of {self.dims.S - 2} tokens"
        if self.read_chunks is not None:
            return f"{what} read here ({self.read_chunks[1]})"
        wider = "build" if self.profile.chunks[2] > self.prompt_chunks else "export"  # (a plan built narrower)
        return f"{what} the engines read ({wider} {option('--prompt-chunks')} reads more)"

    def chunks(self, texts: list[str], tokenizer: Any, emphasis: str) -> list[list[Chunk]]:
        """Each text in the chunks the engines read (``prompt_text.text_chunks``)."""
        return text_chunks(texts, tokenizer, self.dims.S, emphasis, self.prompt_chunks)

    @property
    def zeroes_negatives(self) -> bool:
        """SDXL's unconditional half is zeros where no negative prompt is given
        (``force_zeros_for_empty_prompt``): a second negative prompt alone is then not read."""
        return is_sdxl(self.family) and self.force_zeros_for_empty_prompt

    def chunk_count(self, request: GenerationRequest) -> int:
        """The prompt chunks the U-Net attends to for ``request``: its longest text's (the texts
        of a call are padded to it), at least ``least_chunks``. Served rows of different counts are
        generated apart."""
        tokenizers = text_tokenizers(self.family, self.tokenizer, self.tokenizer_2)
        return max(self.least_chunks, longest_chunks(request, tokenizers, self.dims.S, self.prompt_chunks,
                                                     self.zeroes_negatives))

    @contextlib.contextmanager
    def padded_to(self, request: GenerationRequest) -> Iterator[None]:
        """Within the block, every call pads its texts to at least ``request``'s chunk count (its
        longest text's): ``run``'s request split into several calls (more images than one call takes)
        then reads each image as one call would, whatever prompts share its part; a short prompt's
        image depended on whether a long one fell in its part (an audit). The floor is the
        pipeline's: not for a pipeline other threads call meanwhile."""
        floor = self.least_chunks
        self.least_chunks = self.chunk_count(request)
        try:
            yield
        finally:
            self.least_chunks = floor

    def read_text(self, part: str, chunked: list[list[Chunk]], tokenizer: Any, emphasis: str, layer: str,
                  count: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """The text encoder ``part``'s hidden states ``layer`` for texts in their chunks (``chunks``;
        padded to ``count`` and to ``least_chunks``), chunk after chunk side by side, each weighed on
        its own as A1111 does (``emphasis``); the first chunk's outputs as they came (SDXL's pooled
        embedding is the first chunk's, as A1111's); and whether any weight applied."""
        ids, weights = chunk_tensors(chunked, tokenizer, self.dims.S, max(count, self.least_chunks))
        ids = ids.to(device=self.device, dtype=torch.int32)
        hidden, first = [], None
        last = ids.shape[1] - 1
        for i in range(ids.shape[1]):  # the encoder's batch is the texts': its profile's
            out = self.engines[part]({"input_ids": ids[:, i].contiguous()})
            if i < last:  # a TensorRT engine's outputs are its buffers, which its next call overwrites:
                # keep what is read (the first chunk's every output, the others' hidden states)
                out = {name: value.clone() for name, value in out.items() if i == 0 or name == layer}
            first = out if first is None else first
            hidden.append(out[layer] if weights is None else weigh(out[layer], weights[:, i], emphasis))
        assert first is not None
        return torch.cat(hidden, dim=1), first, weights is not None

    def check_reading(self, hidden: torch.Tensor, weighed: bool) -> None:
        """A weighed reading (``emphasis``) the U-Net can hold: fp16's range where it computes in
        fp16 (an fp16 export, or an fp32 one that a build lowered), else float32's. An unweighed one
        is the encoder's as it came: nothing to check, no wait for the device."""
        if weighed:
            check_reading(hidden, fp16=not self._runs_fp32("unet"),
                          whose="the refiner's " if self.family == SDXL_REFINER else "")

    def encode_prompt(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """The U-Net's conditioning inputs by name; under CFG each is a 2B batch, negatives first."""
        return self.prompt_reader(request)()

    def prompt_reader(self, request: GenerationRequest) -> Callable[[], dict[str, torch.Tensor]]:
        """``encode_prompt`` in two: the texts are tokenized now, the encoders run when the result is
        called (so that a timed text-encoder span holds the encoders' work, as the baseline's does,
        not the tokenizing, which is host work of the loop's overhead there)."""
        if is_sdxl(self.family):
            return self._sdxl_prompt_reader(request)
        prompts = list(request.prompt)
        if request.cfg:
            negatives = request.negative_prompt or [""] * request.batch
            prompts = list(negatives) + prompts
        chunked = self.chunks(prompts, self.tokenizer, request.emphasis)

        def read() -> dict[str, torch.Tensor]:
            hidden, _, weighed = self.read_text("text_encoder", chunked, self.tokenizer, request.emphasis,
                                                "last_hidden_state")
            self.check_reading(hidden, weighed)
            return {"encoder_hidden_states": hidden}

        return read

    def _sdxl_prompt_reader(self, request: GenerationRequest) -> Callable[[], dict[str, torch.Tensor]]:
        """As ``StableDiffusionXLPipeline.encode_prompt``: both encoders' penultimate hidden states side
        by side, the second encoder's projected pooled embedding, and the time ids. The refiner has
        the second encoder alone, which reads ``prompt`` (``prompt_2`` is refused)."""
        refiner = self.family == SDXL_REFINER
        prompts_2 = request.prompt if refiner else (request.prompt_2 or request.prompt)
        zero_negatives = request.cfg and request.negative_prompt is None and self.zeroes_negatives
        if request.cfg and not zero_negatives:
            negatives = request.negative_prompt or [""] * request.batch
            # The negatives and the prompts share one encoder call per encoder (a 2B batch).
            first = list(negatives) + list(request.prompt)
            second = list(request.negative_prompt_2 or negatives) + list(prompts_2)
        else:
            first, second = list(request.prompt), list(prompts_2)
        # hidden_states.{L} is the last layer's output: diffusers' hidden_states[-2] is layer L - 1's,
        # and its hidden_states[-(clip_skip + 2)] layer L - 1 - clip_skip's (the negatives' too, here)
        skip = self.dims.clip_skip if request.clip_skip is None else request.clip_skip
        # each encoder reads its own texts; both read as many chunks, to lie side by side
        chunked_1 = [] if refiner else self.chunks(first, self.tokenizer, request.emphasis)
        chunked_2 = self.chunks(second, self.tokenizer_2, request.emphasis)
        count = max(len(chunks) for chunks in (*chunked_1, *chunked_2))
        return lambda: self._read_sdxl(request, chunked_1, chunked_2, count, skip, zero_negatives)

    def _read_sdxl(self, request: GenerationRequest, chunked_1: list[list[Chunk]], chunked_2: list[list[Chunk]],
                   count: int, skip: int, zero_negatives: bool) -> dict[str, torch.Tensor]:
        refiner = self.family == SDXL_REFINER
        read_1, _, weighed_1 = (None, None, False) if refiner else self.read_text(
            "text_encoder", chunked_1, self.tokenizer, request.emphasis, f"hidden_states.{self.dims.L1 - 1 - skip}",
            count)
        read_2, out_2, weighed_2 = self.read_text("text_encoder_2", chunked_2, self.tokenizer_2, request.emphasis,
                                                  f"hidden_states.{self.dims.L2 - 1 - skip}", count)
        hidden = read_2 if read_1 is None else torch.cat([read_1, read_2], dim=-1)
        self.check_reading(hidden, weighed_1 or weighed_2)  # (both encoders' in one wait)
        pooled = out_2["text_embeds"]  # (unweighed, as A1111's)
        if zero_negatives:
            hidden = torch.cat([torch.zeros_like(hidden), hidden])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        rows = [self.time_ids(request)] * request.batch
        if request.cfg:  # negatives first, as the hidden states
            rows = [self.time_ids(request, negative=True)] * request.batch + rows
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": torch.cat(rows).to(self.device)}

    def time_ids(self, request: GenerationRequest, negative: bool = False) -> torch.Tensor:
        """SDXL micro-conditioning, (1, T): original size, crop top-left and target size. The base
        model's negatives are its positives, as diffusers makes them where no ``negative_*`` size is
        given. The refiner's (T = 5) end in an aesthetic score instead of the target size; for CFG's
        unconditional half (``negative``) it is ``negative_aesthetic_score``, and the crop is diffusers'
        ``negative_crops_coords_top_left`` default, (0, 0), whatever the request's crop."""
        size = request.size
        crop = request.crops_coords_top_left
        if self.family == SDXL_REFINER:
            last: list[float] = [request.aesthetic_scores()[negative]]
            if negative:
                crop = (0, 0)
        else:
            last = list(request.target_size or size)
        values = [*(request.original_size or size), *crop, *last]
        return torch.tensor([values], dtype=torch.float32)

    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        sizes = self.dims.sizes(request.batch, *request.size)
        return self.engines["unet"].spec.tensor("out_sample").shape(sizes)

    def noise(self, shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
        """Normal noise, one draw per image from its own generator, on the device. CPU generators:
        the same seed draws the same noise on every backend and device (and as diffusers does with
        CPU generators). To a GPU from pinned memory without waiting: a plain copy would wait for
        the text encoder queued before it, while the host could be queuing the loop."""
        from diffusers.utils.torch_utils import randn_tensor

        drawn = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        if self.device.type != "cuda":
            return drawn.to(self.device)
        return drawn.pin_memory().to(self.device, non_blocking=True)  # (the pinned block outlives the copy)

    def initial_latents(self, request: GenerationRequest, generators: list[torch.Generator], scheduler: Any) -> torch.Tensor:
        return self.noise(self.latent_shape(request), generators) * scheduler.init_noise_sigma

    def image_conditioning(self, request: GenerationRequest, generators: list[torch.Generator], scheduler: Any,
                           timesteps: torch.Tensor) -> ImageConditioning:
        """Encode the init image (and the masked image) and pick the starting latents, drawing from
        each image's generator in the order diffusers' img2img and inpaint pipelines do: the image's
        latent sample, the noise, then the masked image's latent sample."""
        from sdexport.runtime.image_inputs import binary_mask, per_prompt, pixels

        batch, shape = request.batch, self.latent_shape(request)  # check() made sure of the VAE encoder
        strength = request.effective_strength(self.family)
        images = request.image or []
        inpaint = request.mask is not None
        from_image = not inpaint or strength < 1.0
        image_latents = None
        fell_back = False
        if not inpaint:  # img2img: the image goes to every prompt, each sampled with its own generator
            image_latents, fell_back = self._encode(pixels(images, batch), generators)
        elif from_image or not self.dims.inpainting:
            # The inpaint pipeline samples each given image once (a single image: with the first
            # generator) and shares it: what diffusers does, so the same seeds give the same images.
            # The encoder still runs at the request's batch: the shapes its engine was built for.
            image_latents, fell_back = self._encode(pixels(images, batch), generators, samples=len(images))
        noise = self.noise(shape, generators)
        if from_image:
            assert image_latents is not None
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        else:
            latents = noise * scheduler.init_noise_sigma
        if not inpaint:
            return ImageConditioning(latents, noise, image_latents, encoder_fallback=fell_back)
        mask = binary_mask(request.mask or [], len(request.mask or []))
        masked_image = pixels(images, len(images)) * (mask < 0.5)  # one of each broadcasts to the other
        distinct = masked_image.shape[0]
        if self.dims.inpainting:
            masked_latents, masked_fell_back = self._encode(per_prompt(masked_image, batch), generators, samples=distinct)
            fell_back = fell_back or masked_fell_back
        else:  # diffusers encodes it anyway and drops it: draw what its sampling would, to keep the seeds in step
            masked_latents = None
            self.noise((distinct, *shape[1:]), generators[:distinct])
        return ImageConditioning(latents, noise, image_latents, self.latent_mask(request, mask), masked_latents, fell_back)

    def handed_conditioning(self, request: GenerationRequest, latents: torch.Tensor,
                            generators: list[torch.Generator]) -> ImageConditioning:
        """The refiner's half of an inpainting ensemble of experts, as diffusers' inpaint pipeline
        runs it when given latents for its image: it starts from the base model's latents as they
        are and blends them back (noised to each next timestep) outside the mask after every step.
        Its noise is drawn from each image's generator before the loop, as diffusers draws it even
        though it adds none at the start: an ancestral sampler's draws follow it."""
        noise = self.noise(tuple(latents.shape), generators)
        return ImageConditioning(latents, noise, image_latents=latents, mask=self.latent_mask(request))

    def latent_mask(self, request: GenerationRequest, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The request's mask (``mask``: its ``binary_mask``, where the caller has made it) at latent
        size, one per prompt, on the device (1: repaint)."""
        import torch.nn.functional as F  # noqa: N812

        from sdexport.runtime.image_inputs import binary_mask, per_prompt

        if mask is None:
            mask = binary_mask(request.mask or [], len(request.mask or []))
        return per_prompt(F.interpolate(mask, size=self.latent_shape(request)[-2:]), request.batch).to(self.device)

    def control_span(self, request: GenerationRequest, scheduler: Any, timesteps: torch.Tensor) -> int:
        """The steps the ControlNets' [start, end] shares are fractions of: those the loop runs, or,
        where ``denoising_end`` cuts the schedule, those it would run uncut (diffusers' SDXL
        ControlNet pipelines weigh ``controlnet_keep`` before they cut the timesteps)."""
        if request.denoising_end is None:
            return len(timesteps)
        return len(schedule_window(scheduler, replace(request, denoising_end=None), self.family))

    def control_conditioning(self, request: GenerationRequest, steps: int) -> ControlConditioning:
        """Each ControlNet's image on the device (batched as the U-Net's input: twice under CFG;
        images given one per prompt, and a masked init image, which has a row per init image or
        mask, are repeated as diffusers repeats a batch of control images) and its scale at every
        step: ``controlnet_conditioning_scale``, zero where the step lies outside its [start, end]
        share of ``steps`` (diffusers' ``controlnet_keep``; ``control_span``). In guess
        mode with CFG the images are batched as the conditional half alone."""
        from sdexport.runtime.image_inputs import control_pixels, masked_control_pixels, per_prompt
        from sdexport.runtime.request import MASKED_INIT

        guess = self.guess_mode(request)
        conditional_only = guess and request.cfg
        batch = 2 * request.batch if request.cfg and not conditional_only else request.batch
        per_image: list[torch.Tensor] = []
        per_step: list[list[tuple[float, ...]]] = []  # [slot][step]: each prompt's scale
        count = len(request.control_image or [])
        settings = [request.control_settings(count, self.family, image) for image in range(request.batch)]
        for slot in range(count):
            given = request.control_images(slot)
            if isinstance(given[0], str) and given[0] == MASKED_INIT:  # check() saw the init image and mask
                pixels = masked_control_pixels(request.image or [], request.mask or [])
            else:  # one image, or one per prompt
                pixels = torch.cat([control_pixels(image, *request.size) for image in given])
            per_image.append(per_prompt(pixels, batch).to(self.device))
            rows = [[scale * k for k in _keep(start, end, steps)] for scale, start, end in (own[slot] for own in settings)]
            per_step.append(list(zip(*rows)))
        take = self.dims.K or 1  # images per ControlNet: a union one's K, stacked on axis 1
        images = ([torch.stack(per_image[i:i + take], dim=1) for i in range(0, len(per_image), take)]
                  if self.dims.N else per_image)
        # [net][step][prompt]: the prompt's scale for each of the net's images
        scales = [[tuple(zip(*steps_of)) for steps_of in zip(*per_step[i:i + take])]
                  for i in range(0, len(per_step), take)]
        modes = self.control_modes(request, batch) if self.dims.N else None
        gains = None
        if guess:
            residuals = len(self.engines["unet"].spec.residual_inputs)
            logspace = torch.logspace(-1, 0, residuals).tolist()  # as diffusers' ControlNetModel computes it
            gains = [None if name in self.pooled_controlnets else logspace for name in self.controlnets]
        return ControlConditioning(self.controlnets, images, scales, self.device, conditional_only=conditional_only,
                                   gains=gains, modes=modes)

    def unguided_controls(self, request: GenerationRequest, steps: int, ran: int) -> list[tuple[int, int]]:
        """(control image, image) pairs whose [start, end] window, a share of ``steps``
        (``control_span``), holds none of the ``ran`` steps the loop runs (its first ones: the base
        model's before a refiner): as diffusers runs them, that control image guides nothing there
        (``GenerationResult.unguided``)."""
        count = len(request.control_image or [])
        return [(slot, image) for image in range(request.batch)
                for slot, (scale, start, end) in enumerate(request.control_settings(count, self.family, image))
                if scale and not any(_keep(start, end, steps)[:ran])]

    def control_modes(self, request: GenerationRequest, batch: int) -> list[dict[str, torch.Tensor]]:
        """Each union ControlNet's modes as its graph takes them: ``control_type``, the one-hot set
        of its images' modes for every row of its ``batch`` (in float32, as diffusers projects it),
        and ``control_type_idx``, each image's mode (diffusers' ``control_mode``)."""
        take, known = self.dims.K, self.dims.N
        modes = list(request.control_mode or [])
        out = []
        for i in range(0, len(modes), take):
            mine = modes[i:i + take]
            control_type = torch.zeros(known, dtype=torch.float32)
            control_type[mine] = 1.0
            out.append({"control_type": control_type.expand(batch, known).contiguous().to(self.device),
                        "control_type_idx": torch.tensor(mine, dtype=torch.int32, device=self.device)})
        return out

    def control_residuals(self, control: ControlConditioning, step: int, sample: torch.Tensor, timestep: torch.Tensor,
                          conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The U-Net's residual inputs at ``step``: the sum of the active ControlNets' outputs (as
        diffusers' ``MultiControlNetModel``), zeros where none is active (a ControlNet at scale 0
        adds exactly that, so it is not run). In guess mode each residual is scaled by its gain
        and, with CFG, the ControlNets see the conditional half (the latents, as the U-Net's second
        half, and the prompt's conditioning) and the unconditional half gets zeros."""
        unet = self.engines["unet"].spec
        inputs = {"sample": sample, **conditioning}
        if control.conditional_only:
            inputs = {name: value.chunk(2)[1] for name, value in inputs.items()}
        summed: list[torch.Tensor] | None = None
        for net, name, control_inputs, gains in control.active_nets(step):
            engine = self.engines[name]
            feed = {"timestep": timestep, **control_inputs,
                    **{k: v for k, v in inputs.items() if k in engine.spec.input_names}}
            out = engine(feed)
            residual = control.weigh(net, step, [out[n] for n in engine.spec.residual_outputs])
            if gains is not None:
                residual = [r if g == 1.0 else r * g for r, g in zip(residual, gains)]
            summed = residual if summed is None else [a + b for a, b in zip(summed, residual)]
        if summed is not None and control.conditional_only:
            summed = [torch.cat([torch.zeros_like(r), r]) for r in summed]
        if summed is None:
            sizes = self.dims.sizes(sample.shape[0], sample.shape[-2] * self.dims.vae_scale_factor,
                                    sample.shape[-1] * self.dims.vae_scale_factor)
            summed = [torch.zeros(unet.tensor(n).shape(sizes), device=self.device) for n in unet.residual_inputs]
        return dict(zip(unet.residual_inputs, summed))

    def adapter_pixels(self, request: GenerationRequest) -> list[torch.Tensor]:
        """Each T2I-Adapter's images at the request's size, in its channels (``control_pixels``), one
        row per prompt, on the device: what ``adapter_features`` runs the adapters on."""
        from sdexport.runtime.image_inputs import control_pixels, per_prompt

        return [per_prompt(torch.cat([control_pixels(image, *request.size, depth, "adapter image", convert_first=True)
                                      for image in images]),
                           request.batch).to(self.device)
                for images, depth in zip(request.adapter_images(len(self.adapters)), self.dims.adapter_image_channels)]

    def adapter_features(self, request: GenerationRequest, pixels: list[torch.Tensor], calls: int) -> AdapterFeatures:
        """Run each T2I-Adapter once, before the loop, as diffusers' adapter pipelines do: features
        times ``adapter_scale``, added up over several adapters (``MultiAdapter``), one row per
        prompt, twice under CFG (the same features for both halves), given to the first
        ``int(steps x adapter_factor)`` of the loop's ``calls`` U-Net calls (diffusers' SDXL
        pipeline; its SD one, which has no factor, gives them to every call, PNDM's extra one too),
        each prompt after its own factor where they differ. Cut by ``denoising_end``, the steps are
        the calls the loop runs, as diffusers' SDXL pipeline cuts its ``num_inference_steps``. From
        an init image (img2img, inpainting), they are the steps ``strength`` leaves
        (``denoising_steps``: PNDM's extra first call not counted, as in text to image), so a factor
        is a share of the denoising that runs; diffusers has no adapter pipeline for that.

        The adapter runs at the prompts' batch, one image repeated to each prompt: the batch the
        engines were checked for (a TensorRT plan may not take a batch of one). That is what
        diffusers computes given the image once per prompt; given one image for several prompts,
        diffusers fails under CFG and, without it, drops SDXL's mid-block feature (its shape check
        sees a batch of one).

        Scales given per prompt multiply each prompt's row by its own, as a float32 column: the
        product torch takes with one Python number (float32 arithmetic inside), so an image comes
        out bit for bit as in a call where its scale serves every prompt."""
        count = len(self.adapters)
        summed: dict[str, torch.Tensor] = {}
        per_image = list(zip(*(request.adapter_scales(count, i) for i in range(request.batch))))  # [adapter][prompt]
        for name, images, scales in zip(self.adapters, pixels, per_image):
            scale: float | torch.Tensor = scales[0]
            if len(set(scales)) > 1:
                scale = torch.tensor(scales, dtype=torch.float32, device=self.device).reshape(-1, 1, 1, 1)
            engine = self.engines[name]
            out = engine({"image": images})
            for output, feature in zip(engine.spec.adapter_outputs, self.engines["unet"].spec.adapter_inputs):
                value = out[output].float() * scale
                summed[feature] = summed[feature] + value if feature in summed else value
        features = {n: torch.cat([v, v]) if request.cfg else v for n, v in summed.items()}
        factors = [request.adapter_factor_of(i) for i in range(request.batch)]
        steps = calls if request.denoising_end is not None else request.denoising_steps(self.family)
        return AdapterFeatures(features, [calls if self.family == "sd" and factor == 1.0 else int(steps * factor)
                                          for factor in factors])

    def encode(self, image: torch.Tensor, generators: list[torch.Generator], samples: int | None = None) -> torch.Tensor:
        """Scaled latents sampled from the VAE encoder's distribution with each image's generator
        (``DiagonalGaussianDistribution.sample``: mean + std * noise, log-variance clamped).
        ``samples``: only the first that many rows are distinct images, each sampled with its own
        generator and repeated over the batch (the images themselves were repeated to it)."""
        return self._encode(image, generators, samples)[0]

    def _encode(self, image: torch.Tensor, generators: list[torch.Generator],
                samples: int | None = None) -> tuple[torch.Tensor, bool]:
        """``encode``, and whether the fp16 encoder overflowed (NaN/Inf) and the fp32 one encoded
        instead, as ``decode`` falls back."""
        feed = {"sample": image.to(self.device)}
        parameters = self.engines["vae_encoder"](feed)["latent_parameters"].float()
        fallback = False
        if not torch.isfinite(parameters).all():
            if self._runs_fp32("vae_encoder"):  # no fp16 to blame
                raise SdexportError("the fp32 VAE encoder produced NaN/Inf from the init image; refusing to start from it")
            if self.fallback_encoder is None:
                raise self._no_rerun("vae_encoder", (
                    "the VAE encoder produced NaN/Inf from the init image (fp16 overflow); refusing to start from it. "
                    + ("sdexport's --dtype fp16 SDXL exports keep an fp32 VAE encoder for this (vae_encoder_fp32: "
                       "export it too); otherwise export in fp32" if is_sdxl(self.family)
                       else "Export in fp32 or with an fp16-safe VAE (--vae)")))
            console.print("[yellow]warning:[/] VAE encoder overflowed (NaN/Inf); encoding the init image again in fp32")
            parameters = self.fallback_encoder(feed)["latent_parameters"].float()
            fallback = True
            if not torch.isfinite(parameters).all():
                raise SdexportError("the fp32 VAE encoder also produced NaN/Inf from the init image; refusing to start from it")
        count = parameters.shape[0] if samples is None else samples
        mean, log_variance = parameters[:count].chunk(2, dim=1)
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        draws = self.noise(tuple(mean.shape), generators[:count])
        from sdexport.runtime.image_inputs import per_prompt

        return per_prompt((mean + std * draws) * self.vae_scaling_factor, parameters.shape[0]), fallback

    def decode(self, latents: torch.Tensor, request: GenerationRequest | None = None,
               scheduler: str | None = None) -> tuple[torch.Tensor, bool]:
        """VAE decode to the image on the device (in [-1, 1]; ``host_pixels`` makes it the
        result's), and whether it ran again in fp32: an fp16 overflow (NaN/Inf) is reported and
        retried on an fp32 decoder. ``scheduler``: the name of the one that ran, for the report
        (the request may say "default").

        The check of the image is the run's one wait for the device before the copy to the host
        (nothing between the denoising loop and the VAE waits). Non-finite latents make a
        non-finite image, so they are looked for only then, and blamed on the loop, not the VAE."""
        feed = {"latent_sample": (latents / self.vae_scaling_factor).float()}
        image = self.engines["vae_decoder"](feed)["sample"]
        fallback = False
        if not torch.isfinite(image).all():
            where = (f"; with {scheduler or request.scheduler} for {request.steps} step{'s' if request.steps != 1 else ''} at guidance {guidance_label(request.effective_guidance(self.family))}"
                     if request is not None else "")
            if not torch.isfinite(latents).all():
                cause = ("The U-Net computes in fp32: its weights (a LoRA's?) or the settings are the cause"
                         if self._runs_fp32("unet") else
                         "An fp16 U-Net can overflow: compare with an fp32 export or --backend torch")
                raise SdexportError("the denoising loop produced NaN/Inf latents (U-Net output or guidance), before "
                                    f"the VAE ran{where}. {cause}")
            if self.fallback_vae is None and self._runs_fp32("vae_decoder"):  # no fp16 to blame
                peak = float(latents.abs().max())
                raise SdexportError(
                    f"the fp32 VAE decoder produced NaN/Inf from latents as large as {peak:.3g}{where}; refusing "
                    "to save a black image" + (". Latents that far out of range come from the settings (a guidance "
                                                "far above the usual 5 to 7.5, say)" if peak > 1e4 else "")
                )
            if self.fallback_vae is None:
                raise self._no_rerun("vae_decoder", (
                    "the VAE decoder produced NaN/Inf (fp16 overflow); refusing to save a black image. "
                    "sdexport's --dtype fp16 exports keep an fp32 VAE decoder for this (vae_decoder_fp32); "
                    "otherwise export in fp32 or with an fp16-safe VAE (--vae)"))
            console.print("[yellow]warning:[/] VAE decoder overflowed (NaN/Inf); decoding again in fp32")
            image = self.fallback_vae(feed)["sample"]
            fallback = True
            if not torch.isfinite(image).all():
                raise SdexportError("the fp32 VAE decoder also produced NaN/Inf; the latents are broken")
        return image, fallback

    def _no_rerun(self, part: str, advice: str) -> SdexportError:
        """The refusal of an fp16 overflow of VAE ``part`` with no fp32 engine to rerun it: a build
        lowered an fp32 export's, or the backend left the rerun out, or else ``advice`` (the
        directory has none)."""
        if part in self.lowered:
            return SdexportError(lowered_overflow(self.info, part))
        if part in self.unplanned:
            return SdexportError(unplanned_overflow(self.info, part))
        return SdexportError(advice)

    def _runs_fp32(self, part: str) -> bool:
        """Whether ``part``'s engine computes in fp32: an fp16 export's fp32 graph in its place (``info``;
        the VAE's), or an fp32 export's not lowered to fp16 by a build (``lowered``)."""
        return self.info.get(part) == "fp32" or (self.info.get("dtype") == "fp32" and part not in self.lowered)

    @property
    def upcast_vae(self) -> bool:
        """Whether the ``vae_decoder`` engine is an fp16 export's fp32 decoder, run from the start."""
        return self.info.get("vae_decoder") == "fp32"

    # -- lifetime ---------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Release every engine's device memory now (TensorRT contexts, ORT sessions, modules), once
        the calls in flight in other threads have ended: one released under a running call failed it
        with an AttributeError (ONNX Runtime), and would free device memory a TensorRT context was
        still running on. A call made after ``close`` is refused. ``timeout``: the seconds to wait
        for those calls (None: as long as they take; an ``on_step`` that waits on the closing thread
        would never end), after which the engines are kept and this says so."""
        with self._settled:
            if threading.get_ident() in self._calls:  # (it would wait for itself)
                raise SdexportError("close() inside a call of this pipeline (an on_step callback?): close it after "
                                    "the call returns")
            self.closed = self._closing = True
            try:
                ended = self._settled.wait_for(lambda: not self._calls, timeout)
            finally:  # (a Ctrl-C in the wait left calls told a close still waited: KEPT is the truth, an audit)
                self._closing = False
            if not ended:
                raise SdexportError(f"close(): a call of this pipeline still runs after {timeout:g} s; its engines are "
                                    "kept (close again once it has returned)")
            if self._released:
                return
            self._released = True
        engines = (*self.engines.values(), self.fallback_vae, self.fallback_encoder)
        for engine in {id(e): e for e in engines if e is not None}.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()

    def _closed_words(self) -> str:
        """Why a call to a closed pipeline is refused: its engines released, a close still waiting to
        release them, or a close that gave up waiting (the engines kept)."""
        return CLOSED if self._released else CLOSING if self._closing else KEPT

    def __enter__(self) -> Txt2ImgPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spans(numbers: list[int]) -> str:
    """Ascending whole numbers as runs, as a reader counts them: [1, 2, 3, 5] is "1-3, 5"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs)


def lowered_overflow(info: dict[str, Any], part: str) -> str:
    """Why an fp32 export's VAE ``part`` that ``sdexport build`` lowered to fp16 overflowed, and the
    build or the flag that runs it in fp32 instead, for the backend that ran (``info``)."""
    where = info.get("engine_dir", "DIR")
    what, refusal = (("decoder", "refusing to save a black image") if part == "vae_decoder"
                     else ("encoder", "refusing to start from the init image"))
    if info.get("backend") == "tensorrt":
        return (f"the VAE {what} produced NaN/Inf (fp16 overflow: its TensorRT plan was built with the fp16 flag "
                f"from this fp32 export); {refusal}. Build an fp32 plan for it (`sdexport build {pasteable(where)} --fp32 "
                f"--components {part}`: runs pick the newest plan, so build it again after a later `--force` build)")
    return (f"the VAE {what} produced NaN/Inf (fp16 overflow: `sdexport build --target onnxruntime-cuda` converted "
            f"this fp32 export's {what} graph to fp16); {refusal}. Build it fp32 (`sdexport build {pasteable(where)} --target "
            f"onnxruntime-cuda --fp32 --components {part}`, and again after each fp16 build) or run the portable "
            "graphs (--portable-graphs)")


def unplanned_overflow(info: dict[str, Any], part: str) -> str:
    """Why an fp16 VAE ``part`` that overflowed was not rerun in fp32, where the directory has the
    fp32 graph but the run loaded no engine for it (TensorRT: no plan that serves these shapes)."""
    what, refusal = (("decoder", "refusing to save a black image") if part == "vae_decoder"
                     else ("encoder", "refusing to start from the init image"))
    return (f"the VAE {what} produced NaN/Inf (fp16 overflow); {refusal}. Its fp32 rerun, {part}_fp32, has no "
            f"TensorRT plan here that serves these shapes (the load said so): `sdexport build "
            f"{info.get('engine_dir', 'DIR')} --components {part}_fp32` with the profile this run uses builds one")


def guidance_factor(guidance: float | list[float], device: torch.device) -> float | torch.Tensor:
    """What ``guided`` multiplies the prompts' pull by: the scale, or where the images take their
    own, a float32 column of them on the U-Net's device."""
    if not isinstance(guidance, list):
        return guidance
    return torch.tensor(guidance, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)


def guidance_embedding(scales: list[float], size: int) -> torch.Tensor:
    """A latent consistency model's ``timestep_cond``: each image's guidance scale ``w`` embedded
    as its U-Net was distilled to read it, the sines then the cosines of ``1000 (w - 1)`` over
    ``size // 2`` geometric frequencies from 1 down to 1/10000 (VDM's embedding, which diffusers'
    pipelines compute in float32 as ``get_guidance_scale_embedding``; an odd size ends in a zero)."""
    import torch

    half = size // 2
    shift = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -shift)
    angles = torch.tensor([scale - 1.0 for scale in scales], dtype=torch.float32) * 1000.0
    angles = angles[:, None] * frequencies[None, :]
    return torch.nn.functional.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, size % 2))


def guided(noise: torch.Tensor, guidance: float | torch.Tensor, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on a CFG batch's U-Net output (unconditional half first).

    With a column of scales the product is taken in float32 and rounded once to the output's dtype,
    which for float32 (every engine's output), fp16 and bf16 is what torch does with a Python number
    (float32 arithmetic inside). So each image comes out as at its own scale in the same call, and a
    served image does not depend on the guidance of the requests it was batched with."""
    uncond, text = noise.chunk(2)
    mixed = uncond + (guidance * (text - uncond)).to(uncond.dtype)
    if not rescale:
        return mixed
    # diffusers' rescale_noise_cfg (its pipeline modules load model code the runtime does without):
    # towards the prompted prediction's spread, per image
    axes = list(range(1, mixed.ndim))
    rescaled = mixed * (text.std(dim=axes, keepdim=True) / mixed.std(dim=axes, keepdim=True))
    return rescale * rescaled + (1 - rescale) * mixed


def _keep(start: float, end: float, steps: int) -> list[float]:
    """diffusers' ``controlnet_keep`` for one control image: 1 at each of ``steps`` inside its
    [start, end] share, 0 outside."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What diffusers' pipelines pass to ``scheduler.step`` besides the latents
    (``prepare_extra_step_kwargs``): the generators, and an ``eta`` of 0, where it takes them. TCD's
    own default eta is 0.3: leaving it out gave other images (0.27 rel-L2, measured once on the
    tiny model)."""
    import inspect

    taken = inspect.signature(scheduler.step).parameters
    return {**({"generator": generators} if "generator" in taken else {}), **({"eta": 0.0} if "eta" in taken else {})}


def host_pixels(image: torch.Tensor) -> np.ndarray:
    """A decoded image batch (NCHW in [-1, 1], on the device) as the result's pixels: float32 NHWC in
    [0, 1] on the host, as diffusers' ``output_type="np"`` gives them."""
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_pil(pixels: np.ndarray) -> list[Any]:
    from PIL import Image

    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]

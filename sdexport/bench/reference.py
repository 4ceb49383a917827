"""The baseline everyone compares against: ``diffusers.StableDiffusionPipeline`` (SDXL:
``StableDiffusionXLPipeline``; with ControlNets their ControlNet pipelines, with a T2I-Adapter their
adapter pipelines) in eager PyTorch, and for
requests with an init image the matching img2img or inpaint pipeline made from it (``from_pipe``:
the same modules, no copy).

Used by the parity tests and as the benchmark baseline. Per-component times come from wrapping the
pipeline's own modules with the runtime's stage clock (CUDA events on a GPU: no host
synchronisation), so the pipeline itself runs unmodified and as fast as it would unwatched.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdexport.errors import SdexportError
from sdexport.models import LoadedModel
from sdexport.runtime.request import MASKED_INIT
from sdexport.runtime.schedulers import config_as_loaded, make_scheduler
from sdexport.runtime.timing import NO_CLOCK, StageClock, clock_for
from sdexport.runtime.txt2img import GenerationRequest, Timings
from sdexport.specs import (
    ADAPTER,
    SDXL_REFINER,
    adapter_index,
    adapters_among,
    controlnet_index,
    controlnets_among,
    is_sdxl,
)


@dataclass
class ReferenceResult:
    latents: torch.Tensor
    pixels: np.ndarray
    timings: Timings


class DiffusersReference:
    def __init__(
        self,
        model: LoadedModel,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> None:
        import diffusers

        self.model = model
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        sdxl = is_sdxl(model.family)
        nets = [model.modules[n] for n in controlnets_among(model.modules)]
        self.controlnets = len(nets)
        self.model_dims = model.dims  # (worked out from the configs: once)
        self.union = bool(self.model_dims.N)
        """Union ControlNets: diffusers' union pipelines, which take each image's control mode."""
        cls: Any = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
        if nets:
            cls = diffusers.StableDiffusionXLControlNetPipeline if sdxl else diffusers.StableDiffusionControlNetPipeline
        if self.union:
            cls = diffusers.StableDiffusionXLControlNetUnionPipeline
        adapters = [model.modules[n] for n in adapters_among(model.modules)]
        self.adapters = len(adapters)
        self.adapter = bool(adapters)
        if self.adapter:
            cls = diffusers.StableDiffusionXLAdapterPipeline if sdxl else diffusers.StableDiffusionAdapterPipeline
        if model.family == SDXL_REFINER:  # its pipeline refines an image: img2img's is its first
            cls = diffusers.StableDiffusionXLImg2ImgPipeline
        kwargs: dict[str, Any] = {n: m for n, m in model.modules.items()
                                  if controlnet_index(n) is None and adapter_index(n) is None}
        if nets:  # a list of several becomes diffusers' MultiControlNetModel
            kwargs["controlnet"] = nets[0] if len(nets) == 1 else nets
        if adapters:  # several are one MultiAdapter (the SDXL pipeline does not wrap a list itself)
            kwargs[ADAPTER] = adapters[0] if len(adapters) == 1 else diffusers.MultiAdapter(adapters)
        if model.family == SDXL_REFINER:
            kwargs.update(text_encoder=None, tokenizer=None)
        kwargs.update(model.tokenizers)
        kwargs["scheduler"] = make_scheduler("default", model.scheduler_config)
        if model.family == "sd":
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            # No invisible watermark: it changes pixels, and the runtime does not add one (the
            # adapter pipeline has none to turn off).
            kwargs.update(model.pipeline_config, **({} if self.adapter else {"add_watermarker": False}))
        self.pipe = cls(**kwargs).to(self.device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        if compile:
            self.pipe.unet = torch.compile(self.pipe.unet)
        self.clock: StageClock = clock_for(self.device)
        self._call_clock: StageClock = self.clock
        """The clock of the call in progress: ``self.clock``, or ``NO_CLOCK`` for an unmarked run."""
        self._spans: list[tuple[str, Any, Any]] = []
        self._wrapped: list[tuple[Any, str, Any]] = []
        self._variants: dict[str, Any] = {}
        self._wrap()

    def _timed(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self._call_clock.mark()
            result = fn(*args, **kwargs)
            self._spans.append((stage, start, self._call_clock.mark()))
            return result

        return wrapper

    def _wrap(self) -> None:
        """Mark each module call through the instance, leaving diffusers' code untouched. The marks
        (CUDA events on a GPU) add no host synchronisation: the baseline runs as it would unwatched."""
        targets = [(getattr(self.pipe, n, None), "forward", "text_encoder") for n in ("text_encoder", "text_encoder_2")]
        targets += [(self.pipe.unet, "forward", "unet"), (self.pipe.vae, "decode", "vae_decoder")]
        nets = getattr(self.pipe, "controlnet", None)
        for net in getattr(nets, "nets", [nets] if nets is not None else []):
            targets.append((net, "forward", "controlnet"))
        targets.append((getattr(self.pipe, ADAPTER, None), "forward", "adapter"))
        for owner, attribute, stage in targets:
            if owner is not None:
                self._wrapped.append((owner, attribute, owner.__dict__.get(attribute)))
                setattr(owner, attribute, self._timed(getattr(owner, attribute), stage))

    def _unwrap(self) -> None:
        """Put the modules' own methods back: they belong to the loaded model, which outlives this
        reference (a later ``diffusers-compile`` baseline must not compile our timing wrappers)."""
        for owner, attribute, previous in reversed(self._wrapped):
            if previous is None:
                owner.__dict__.pop(attribute, None)
            else:
                setattr(owner, attribute, previous)
        self._wrapped.clear()

    def _timings(self, total: float) -> Timings:
        """Resolve this call's marks (its results are on the host, so every mark has completed)."""
        clock = self._call_clock
        timings = Timings(total=total, clock=clock.kind)
        controlnet = 0.0
        for stage, start, end in self._spans:
            seconds = clock.seconds(start, end)
            if stage == "controlnet":  # summed per step: the U-Net call closes a step
                controlnet += seconds
            elif stage == "unet":
                timings.unet_steps.append(seconds)
                if controlnet:
                    timings.controlnet_steps.append(controlnet)
                    controlnet = 0.0
            else:
                setattr(timings, stage, getattr(timings, stage) + seconds)
        return timings

    def pipeline_for(self, task: str) -> Any:
        """The diffusers pipeline for ``task`` (txt2img, img2img, inpaint), sharing this one's modules."""
        import diffusers

        if task == "txt2img" or (task == "img2img" and self.model.family == SDXL_REFINER):
            return self.pipe
        if task not in self._variants:
            sdxl = is_sdxl(self.model.family)
            if self.union:
                cls: Any = (diffusers.StableDiffusionXLControlNetUnionImg2ImgPipeline if task == "img2img"
                            else diffusers.StableDiffusionXLControlNetUnionInpaintPipeline)
            elif task == "img2img" and self.controlnets:
                cls = (diffusers.StableDiffusionXLControlNetImg2ImgPipeline if sdxl
                       else diffusers.StableDiffusionControlNetImg2ImgPipeline)
            elif task == "img2img":
                cls = diffusers.StableDiffusionXLImg2ImgPipeline if sdxl else diffusers.StableDiffusionImg2ImgPipeline
            elif self.controlnets:
                cls = (diffusers.StableDiffusionXLControlNetInpaintPipeline if sdxl
                       else diffusers.StableDiffusionControlNetInpaintPipeline)
            else:
                cls = diffusers.StableDiffusionXLInpaintPipeline if sdxl else diffusers.StableDiffusionInpaintPipeline
            variant = cls.from_pipe(self.pipe)
            variant.set_progress_bar_config(disable=True)
            self._variants[task] = variant
        return self._variants[task]

    def close(self) -> None:
        """Release the baseline's weights on the device before the next contender is measured (the
        benchmark then empties torch's cache once for every contender).

        The pipeline moved the loaded model's own modules to the device (``.to`` works in place), so
        dropping the pipeline is not enough while the model is still referenced: move them back."""
        if self.pipe is None:
            return
        self._unwrap()
        if self.device.type != "cpu":
            self.pipe.to("cpu")
        self.pipe = None
        self._variants.clear()

    def __call__(self, request: GenerationRequest, *, stages: bool = True) -> ReferenceResult:
        """``stages=False``: no marks at all, for runs timed only end to end (as the runtime's)."""
        self._spans = []
        self._call_clock = self.clock if stages else NO_CLOCK
        captured: dict[str, torch.Tensor] = {}

        def keep_latents(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            captured["latents"] = tensors["latents"]
            return tensors

        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        pipe = self.pipeline_for(request.task)
        pipe.scheduler = make_scheduler(request.scheduler, config_as_loaded(  # as the pipeline's __init__ left it
            self.model.scheduler_config, request.scheduler, family=self.model.family,
            conditioned=self.model_dims.conditioned,
            inpainting=request.task == "inpaint"))
        extra: dict[str, Any] = {"height": request.height, "width": request.width}
        if request.init_latents is not None:  # the ensemble's second expert: a base model's latents
            extra = {"image": request.init_latents, "denoising_start": float(request.denoising_start or 0)}
        elif request.task != "txt2img":
            extra = {"image": request.image, "strength": request.effective_strength(self.model.family)}
        if request.task == "inpaint":  # (the second expert's: the base model's mask, its latents' image)
            extra.update(mask_image=request.mask, height=request.height, width=request.width)
        if self.controlnets:
            one = self.controlnets == 1
            images = [list(i) if isinstance(i, tuple) else i for i in request.control_image or []]  # diffusers: lists
            if any(isinstance(image, str) for image in images):  # diffusers takes images and tensors only
                raise SdexportError("the diffusers reference takes control images as images or tensors, not "
                                    f"{MASKED_INIT}: pass the masked init image as a tensor")
            settings = list(zip(*request.control_settings(len(images), self.model.family)))
            if any(list(zip(*request.control_settings(len(images), self.model.family, i))) != settings
                   for i in range(request.batch)):
                raise SdexportError("the diffusers reference takes one ControlNet scale, start and end for every "
                                    "prompt (its pipelines have no per-image settings): compare images with their "
                                    "own in calls of their own")
            if self.union:  # lists throughout: one entry per image (and mode)
                one = False
                extra["control_mode"] = list(request.control_mode or [])
            elif not one and any(isinstance(image, list | tuple) for image in images):
                # images per prompt for several ControlNets: diffusers' nested list is the transpose of
                # ours, a list per prompt of one image per ControlNet
                columns = [request.control_images(k) for k in range(len(images))]
                images = [list(row) for row in zip(*(c * request.batch if len(c) == 1 else c for c in columns))]
            extra |= {
                "image" if request.task == "txt2img" and not self.union else "control_image": images[0] if one else images,
                "controlnet_conditioning_scale": settings[0][0] if one else list(settings[0]),
                "control_guidance_start": settings[1][0] if one else list(settings[1]),
                "control_guidance_end": settings[2][0] if one else list(settings[2]),
                "guess_mode": request.guess_mode,  # and diffusers' own rule for pooling ControlNets
            }
            if request.task != "txt2img":
                extra.update(height=request.height, width=request.width)
        callback: dict[str, Any] = {"callback_on_step_end": keep_latents}
        if self.adapter:  # diffusers' adapter pipelines still take the older per-step callback
            callback = {"callback": lambda step, timestep, latents: captured.update(latents=latents)}
            # read in the adapter's channels, as the runtime does (diffusers takes the image's own mode:
            # an RGB edge map fails in a greyscale adapter)
            from sdexport.runtime.image_inputs import image_mode

            count = self.adapters
            modules = self.pipe.adapter.adapters if count > 1 else [self.pipe.adapter]
            images = [[image.convert(image_mode(module.config.in_channels)) for image in given]
                      for module, given in zip(modules, request.adapter_images(count))]
            # one for every prompt: diffusers takes one per prompt (see adapter_features)
            images = [given * request.batch if len(given) == 1 else given for given in images]
            scales = request.adapter_scales(count)
            if any(request.adapter_scales(count, i) != scales for i in range(request.batch)):
                raise SdexportError("the diffusers reference takes one adapter scale for every prompt (its pipelines "
                                    "have no per-image settings): compare images with their own in calls of their own")
            extra |= {"image": images[0] if count == 1 else images,
                      "adapter_conditioning_scale": scales[0] if count == 1 else scales}
            given = request.adapter_factor
            factors = list(given) if isinstance(given, list | tuple) else [given]
            factor = factors[0]
            if len(set(factors)) > 1:
                raise SdexportError("the diffusers reference takes one adapter factor for every prompt (its pipelines "
                                    "have no per-image settings): compare images with their own in calls of their own")
            if is_sdxl(self.model.family):
                extra["adapter_conditioning_factor"] = factor
            elif factor != 1.0:
                raise SdexportError("diffusers' SD adapter pipeline has no adapter_conditioning_factor: nothing to "
                                    "compare an adapter factor with")
        if is_sdxl(self.model.family):
            extra |= {
                "original_size": request.original_size,
                "crops_coords_top_left": tuple(request.crops_coords_top_left),
            }
        if self.model.family == "sdxl":
            extra |= {
                "prompt_2": request.prompt_2,
                "negative_prompt_2": request.negative_prompt_2,
                "target_size": request.target_size,
            }
        if self.model.family == SDXL_REFINER:
            extra["aesthetic_score"], extra["negative_aesthetic_score"] = request.aesthetic_scores()
        if request.guidance_rescale:
            if "guidance_rescale" not in inspect.signature(pipe.__call__).parameters:
                raise SdexportError(f"diffusers' {type(pipe).__name__} has no guidance_rescale: nothing to compare a "
                                    "rescaled guidance with")
            extra["guidance_rescale"] = request.guidance_rescale
        latent = request.denoising_end is not None  # the ensemble's first expert: latents, not images
        if latent:
            extra["denoising_end"] = float(request.denoising_end or 0)
        start = time.perf_counter()
        with torch.inference_mode():
            images = pipe(
                request.prompt,
                **extra,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.steps,
                guidance_scale=request.effective_guidance(self.model.family),
                generator=generators,
                output_type="latent" if latent else "np",
                **callback,
            ).images
        total = time.perf_counter() - start  # output_type="np": the images reached the host
        pixels = np.zeros((0, *request.size, 3), np.float32) if latent else np.asarray(images, np.float32)
        return ReferenceResult(captured["latents"].float().cpu(), pixels, self._timings(total))

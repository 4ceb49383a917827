"""SDXL's ensemble of experts (diffusers' base + refiner), planned and checked before engines load.

The base model runs the schedule up to ``denoising_end`` and hands its latents, not decoded, to the
refiner, which runs the rest with the same prompts, seeds, steps, scheduler, size and guidance and
its own conditioning (the aesthetic scores, taken off the base model's request). An inpainting
request's mask goes to both: the base model inpaints as it would alone, and the refiner blends the
base model's latents back outside the mask, as diffusers' inpaint pipeline does when given
latents for its image. ``run --refiner``
and ``serve --refiner`` both derive the two requests here, so what each model is given is written
once; the loop itself is the one every engine directory runs, called twice.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError
from sdexport.runtime.request import GenerationRequest
from sdexport.setting_names import setting
from sdexport.shapes import overlap

DENOISING_END_DEFAULT = 0.8
"""The base model's fraction of the schedule when none is given (diffusers' example)."""

BASE_ONLY = ("prompt_2", "negative_prompt_2", "target_size", "image", "strength", "control_image", "control_mode",
             "control_scale", "control_start", "control_end", "guess_mode", "adapter_image", "adapter_scale",
             "adapter_factor")
"""What the refiner's request leaves out (at their defaults): the base model's second prompt and
target size, an init image and strength (it starts from latents; a mask goes to both), and the
ControlNets' and T2I-Adapters' inputs and settings (the refiner has neither)."""
REFINER_ONLY = ("aesthetic_score", "negative_aesthetic_score")
"""What the base model's request leaves out: the refiner's conditioning."""

LATENTS_TO_COME = "the base model's latents"
"""What stands for the refiner's ``init_latents`` in the checks made before the base model runs."""


def check_denoising_end(end: float) -> None:
    """The base model's fraction of the schedule: above 0 and below 1 (each model runs a share)."""
    if not (math.isfinite(end) and 0 < end < 1):
        raise SdexportError(f"{setting('denoising_end')} {end}: need the base model's fraction of the schedule, "
                            "above 0 and below 1")


@dataclass(frozen=True)
class Refiner:
    """An sdxl-refiner engine directory read for an ensemble (its manifest and scheduler; no engines)."""

    engine_dir: Path
    manifest: Any
    scheduler_config: dict[str, Any]

    @classmethod
    def open(cls, engine_dir: Path, base_dir: Path, base_manifest: Any, flag: str = "--refiner") -> Refiner:
        """The refiner at ``engine_dir`` for the base model at ``base_dir``; what cannot be an
        ensemble (not an SDXL base, not a refiner, latents of another shape) refused in one line
        that names the option that gave it, ``flag``."""
        from sdexport.manifest import load_manifest, read_scheduler_config
        from sdexport.specs import FAMILY_LABELS, SDXL_REFINER

        if base_manifest.family != "sdxl":
            raise SdexportError(f"{flag}: an SDXL base model hands its latents to the refiner, and {base_dir} is "
                                f"{FAMILY_LABELS[base_manifest.family]}; give an SDXL base model's engine directory first")
        try:
            manifest = load_manifest(engine_dir, verify_files=False)
        except SdexportError as exc:
            raise SdexportError(f"{flag}: {exc}") from None
        if manifest.family != SDXL_REFINER:
            raise SdexportError(f"{flag} {engine_dir}: not an SDXL refiner ({FAMILY_LABELS[manifest.family]}); "
                                "give an sdxl-refiner engine directory")
        ours, its = base_manifest.model_dims, manifest.model_dims
        if (ours.C, ours.vae_scale_factor) != (its.C, its.vae_scale_factor):
            raise SdexportError(f"{flag} {engine_dir}: its latents ({its.C} channels, 1/{its.vae_scale_factor} of "
                                f"the image's sides) are not the base model's ({ours.C}, 1/{ours.vae_scale_factor})")
        base_profile, profile = base_manifest.shape_profile, manifest.shape_profile
        if overlap(base_profile.height, profile.height) is None or overlap(base_profile.width, profile.width) is None:
            raise SdexportError(f"{flag} {engine_dir}: its profile's sizes ({_sizes(profile.height, profile.width)}) "
                                f"and the base model's ({_sizes(base_profile.height, base_profile.width)}) have none in common; "
                                "export the refiner with the base model's --height and --width ranges")
        known = {word.lower() for word in _words(manifest)}  # (the tokenizer matches words in any case)
        missing = [word for word in _words(base_manifest) if word.lower() not in known]
        if missing:  # (as diffusers' two pipelines would read them: a warning, not a refusal)
            from rich.markup import escape

            from sdexport.console import console

            console.print(f"[yellow]warning:[/] {escape(flag)} {escape(str(engine_dir))} lacks the base model's textual "
                          f"inversion word(s) {escape(', '.join(missing))}: it reads them as plain text (export it "
                          "with the same --textual-inversion files)")
        return cls(engine_dir, manifest, read_scheduler_config(engine_dir, manifest))

    def ensemble(self, request: GenerationRequest, end: float) -> Ensemble:
        """``request`` (as the base model alone would take it) run by the two models, cut at ``end``."""
        return Ensemble(self, request, end)


def _words(manifest: Any) -> list[str]:
    """The textual inversion words added to a directory's text encoders."""
    return [record["word"] for record in manifest.model.get("embeddings") or []]


def _sizes(heights: tuple[int, ...], widths: tuple[int, ...]) -> str:
    return f"{heights[0]}-{heights[-1]} x {widths[0]}-{widths[-1]}"


def halves(request: GenerationRequest, end: float) -> tuple[GenerationRequest, GenerationRequest]:
    """``request`` (as the base model alone would take it) as the base model's share, up to ``end``,
    and the refiner's, from there (its ``init_latents`` to be filled in with the base model's). The
    init image, strength, ControlNets and T2I-Adapters are the base model's alone (``BASE_ONLY``);
    a mask is both models'. Both take the base model's image's size where none is set."""
    request = request.with_image_size()
    base = replace(request, denoising_end=end, **field_defaults(GenerationRequest, REFINER_ONLY))
    refine = replace(request, denoising_start=end, **field_defaults(GenerationRequest, BASE_ONLY))
    return base, refine


def field_defaults(cls: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The defaults of dataclass ``cls``'s fields ``names`` (fresh ones from a ``default_factory``):
    what one half of an ensemble leaves out, read where the fields are declared."""
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(cls) if f.name in names}
    assert len(defaults) == len(names) and MISSING not in defaults.values(), (names, defaults)
    return defaults


def check_shares(base: GenerationRequest, base_config: dict[str, Any], refine: GenerationRequest,
                 refiner_config: dict[str, Any], end: float) -> None:
    """The base model's steps and the refiner's, each on a scheduler of its own: neither empty.
    A refusal names the settings to change as the caller does (``setting``)."""
    from sdexport.runtime.schedulers import (
        check_steps,
        least_strength,
        make_scheduler,
        schedule_window,
        strength_words,
    )
    from sdexport.specs import SDXL_REFINER

    check_steps(refine.scheduler, refiner_config, refine.steps)  # its own scheduler's dry run
    for config, request, family, which in ((base_config, base, "sdxl", "base model's"),
                                           (refiner_config, refine, SDXL_REFINER, "refiner's")):
        scheduler = make_scheduler(request.scheduler, config)
        scheduler.set_timesteps(request.steps)
        try:
            schedule_window(scheduler, replace(request, init_latents=LATENTS_TO_COME), family)
        except SdexportError:
            # an img2img base's strength, given or its default (SDXL img2img's 0.3 leaves a cut at 0.7
            # or later no step at any count: the advice named --steps alone, an audit's finding)
            by_steps, by_cut = setting("steps"), setting("denoising_end")
            said, advice = (strength_words(request, family, end, least_strength(scheduler, request, family, end))
                            if request.image is not None else ("", f"raise {by_steps}"))
            given = f"{said} of " if said else ""
            raise SdexportError(f"the {which} share of the schedule ({given}{by_steps} {request.steps}, cut at "
                                f"{by_cut} {end:g}) holds no step; {advice}, or move {by_cut}") from None


def check_refine(refine: GenerationRequest, *, dims: Any, profile: Any, scheduler_config: dict[str, Any],
                 who: str) -> None:
    """The refiner's request checked as ``run`` checks any, before the base model has run (its
    latents stand in by name); a refusal says whose it is, ``who``."""
    from sdexport.runtime.request import check_request
    from sdexport.specs import SDXL_REFINER

    try:
        check_request(replace(refine, init_latents=LATENTS_TO_COME), family=SDXL_REFINER, dims=dims, profile=profile,
                      scheduler_config=scheduler_config)
    except SdexportError as exc:
        raise SdexportError(f"{who}: {exc}") from None


def check_loaded(refining: Any, refine: GenerationRequest) -> None:
    """The refiner's request against its loaded pipeline ``refining`` (the engines' own profiles
    included) before the base model has run: its latents stood in by zeros of their shape."""
    import torch

    refine = refining.sized(refine)
    refining.check(replace(refine, init_latents=torch.zeros(refining.latent_shape(refine))))


class Ensemble:
    """One request's two halves: ``base`` stops at ``end``; ``refine`` starts there, from the base
    model's latents (``init_latents``, filled in once they exist)."""

    def __init__(self, refiner: Refiner, request: GenerationRequest, end: float) -> None:
        self.refiner = refiner
        self.end = end
        self.base, self.refine = halves(request, end)
        self.parts: list[GenerationRequest] = []
        """The refiner's calls, one per call of the base model (``check`` splits them)."""

    def check(self, most: int) -> None:
        """The refiner's calls, at most ``most`` images each as the base model's, checked as ``run``
        checks the base model's (its latents stand in by name)."""
        refiner = self.refiner
        self.parts = self.refine.split(most)
        for part in (self.parts[0], self.parts[-1]):
            check_refine(part, dims=refiner.manifest.model_dims, profile=refiner.manifest.shape_profile,
                         scheduler_config=refiner.scheduler_config, who=f"--refiner {refiner.engine_dir}")

    def check_windows(self, base_config: dict[str, Any]) -> None:
        """The base model's steps and the refiner's, each on a scheduler of its own: neither empty."""
        check_shares(self.base, base_config, self.refine, self.refiner.scheduler_config, self.end)

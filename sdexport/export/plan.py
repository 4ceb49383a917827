"""An export's settings, and every check that needs no weights: the first second of ``sdexport export``.

A wrong component name, a profile the U-Net cannot take, an opset the exporter cannot write or an
output path that must not be replaced is refused here, from the model's configs alone, before
torch is imported or a checkpoint read (that takes seconds to minutes for real models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from sdexport.errors import ModelLoadError, SdexportError
from sdexport.manifest import not_an_engine_dir
from sdexport.models.adapter import AdapterSource, adapters_for
from sdexport.models.controlnet import ControlNetSource, controlnets_for
from sdexport.models.lora import LoraFile
from sdexport.models.outline import ModelOutline, check_part_weights, outline_model
from sdexport.models.presets import MAX_PRESET_SEED
from sdexport.models.textual_inversion import Embedding, check_widths, token_name
from sdexport.output_dir import OutputKind, check_target, refuse_if_held
from sdexport.shapes import ShapeProfile
from sdexport.specs import (
    ComponentSpec,
    adapter_index,
    check_clip_skip,
    components_for,
    controlnet_index,
    is_sdxl,
    text_encoders,
)

DTYPES = ("fp32", "fp16")
VerifyMode = Literal["full", "quick", "none"]
VERIFY_MODES: tuple[VerifyMode, ...] = get_args(VerifyMode)
DEFAULT_OPSET = 17
MIN_OPSET = 14
"""Attention (``scaled_dot_product_attention``, in every U-Net and CLIP) exports from opset 14."""
MAX_OPSET = 20
"""The newest opset torch's TorchScript exporter has symbolics for
(``torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``; a test keeps the two equal)."""
LAYER_NORM_OPSET = 17
"""The first opset with LayerNormalization: below it, torch writes LayerNorm as ReduceMean, Sub, Pow,
..., which an fp16 export computes in fp16: a deviation past 256 squares past fp16's range (inf),
where the operator computes its statistics in float32 (TensorRT warns of the same)."""

ENGINE_DIR = OutputKind("engine directory", not_an_engine_dir, example="engines/NAME", holds_engines=True)


@dataclass
class ExportOptions:
    profile: ShapeProfile | None = None
    """None: the model's default profile."""
    ranges: dict[str, str | None] = field(default_factory=dict)
    """``min:opt:max`` texts per axis (batch, height, width) replacing those of ``profile``."""
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    components: list[str] | None = None
    verify: VerifyMode = "full"
    config: str | None = None
    seed: int = 0
    force: bool = False
    vae: str | None = None
    """A diffusers AutoencoderKL directory replacing the model's VAE (e.g. an fp16-safe SDXL VAE)."""
    loras: list[LoraFile] = field(default_factory=list)
    """LoRA files fused into the weights before export, in order (``--lora FILE[:SCALE]``)."""
    controlnets: list[str] = field(default_factory=list)
    """ControlNet directories or presets exported beside the model (``--controlnet``), in the order
    their control images are given at run time."""
    adapters: list[str] = field(default_factory=list)
    """T2I-Adapter directories or presets exported beside the model (``--adapter``), in the order
    their images are given at run time: several are diffusers' ``MultiAdapter``."""
    union_images: int = 1
    """The control images a union ControlNet takes per call (``--union-images``): each has its
    control mode, and all of them shape one set of residuals."""
    clip_skip: int = 0
    """Text encoder layers the prompt is read past (``--clip-skip``; ``ModelDims.clip_skip``)."""
    embeddings: list[Embedding] = field(default_factory=list)
    """Textual inversion embeddings added to the tokenizers and text encoders (``--textual-inversion``)."""


@dataclass(frozen=True)
class ExportPlan:
    outline: ModelOutline
    profile: ShapeProfile
    specs: list[ComponentSpec]
    controlnets: list[ControlNetSource] = field(default_factory=list)
    """``--controlnet`` arguments, or a ControlNet pipeline directory's own ControlNets, resolved."""
    adapters: list[AdapterSource] = field(default_factory=list)
    """``--adapter``s, or an adapter pipeline directory's own adapters, resolved."""

    @property
    def sources(self) -> tuple[Path, ...]:
        """What the export reads, which its output may never replace."""
        return (*self.outline.sources, *(c.path for c in self.controlnets if c.path is not None),
                *(a.path for a in self.adapters if a.path is not None))


def plan_export(model_ref: str, out_dir: Path, options: ExportOptions) -> ExportPlan:
    """Check everything about an export that can be checked without loading the model."""
    if options.dtype not in DTYPES:
        raise SdexportError(f"--dtype {options.dtype}: choose one of {', '.join(DTYPES)}")
    if options.verify not in VERIFY_MODES:
        raise SdexportError(f"--verify {options.verify}: choose full, quick or none")
    if not MIN_OPSET <= options.opset <= MAX_OPSET:
        raise SdexportError(
            f"--opset {options.opset}: sdexport exports opsets {MIN_OPSET} to {MAX_OPSET} (attention needs "
            f"{MIN_OPSET}; torch's exporter writes up to {MAX_OPSET}); the default is {DEFAULT_OPSET}"
        )
    if isinstance(options.seed, bool) or not 0 <= options.seed <= MAX_PRESET_SEED:
        raise SdexportError(f"--seed {options.seed}: preset weight seeds go from 0 to {MAX_PRESET_SEED}")
    for lora in options.loras:  # (the CLI checked its own; ExportOptions made in Python, here)
        lora.check("LoRA")
    outline = outline_model(model_ref, config=options.config, vae=options.vae)
    if outline.missing_part is not None and not (options.controlnets or options.adapters):
        missing, option = outline.missing_part
        raise ModelLoadError(f"{missing}; complete it, or give {option} DIR")
    # A ControlNet pipeline directory brings its own ControlNets, unless others are named.
    controlnets = controlnets_for(outline, options.controlnets or [str(p) for p in outline.controlnets],
                                  options.union_images)
    # So does an adapter pipeline directory its adapter(s), unless ControlNets or other adapters are named.
    own_adapters = [str(p) for p in outline.adapters] if not options.controlnets else []
    adapters = adapters_for(outline, options.adapters or own_adapters, len(controlnets))
    if options.seed and outline.preset is None:  # (preset ControlNets and adapters go with a preset alone)
        raise SdexportError(f"--seed {options.seed}: only a preset's random weights take a seed; {model_ref} "
                            "brings its own weights")
    profile = (options.profile or outline.default_profile).with_ranges(**options.ranges)
    profile.validate(outline)
    profile.check_limits(outline.vae_width)
    specs = select_components(outline.family, options.components, options.dtype, len(controlnets), len(adapters))
    check_export_clip_skip(options.clip_skip, outline, specs)
    check_embeddings(options.embeddings, outline, specs)
    _check_parts_exported(options, specs)
    # (a --vae takes the model's own VAE's place: its folder need hold no weights)
    check_part_weights(outline, (s.module for s in specs if not (options.vae and s.module == "vae")))
    plan = ExportPlan(outline, profile, specs, controlnets, adapters)
    refuse_if_held(check_target(out_dir, ENGINE_DIR, replace=options.force, protected=plan.sources))  # at once
    return plan


def fp32_vae_note(plan: ExportPlan, dtype: str) -> str | None:
    """A note where an fp16 SDXL export's --components leaves out the fp32 VAE graph beside a VAE
    graph it exports, and the VAE's config sets force_upcast: the runtime then runs the fp16 one,
    which overflows with SDXL's own VAE weights (NaN: refused at run time, in the decoder's case
    after every step has run). Not refused: an fp16-safe VAE that still sets the flag runs fine."""
    from sdexport.build.vae_upcast import FP32_VAE

    if dtype != "fp16" or not is_sdxl(plan.outline.family) or not plan.outline.vae_force_upcast:
        return None
    names = {s.name for s in plan.specs}
    left = [fp32 for part, fp32 in FP32_VAE.items() if part in names and fp32 not in names]
    if not left:
        return None
    return (f"--components leaves out {' and '.join(left)}, while the VAE's config sets force_upcast (diffusers' "
            f"SDXL pipelines run it in fp32: SDXL's own VAE overflows fp16), so the fp16 "
            f"{' and '.join(n.removesuffix('_fp32') for n in left)} will run, and an overflow is refused at run time; "
            f"add {','.join(left)} to --components, or export with an fp16-safe --vae (a folder whose config sets "
            "force_upcast false)")


def _check_parts_exported(options: ExportOptions, specs: list[ComponentSpec]) -> None:
    """A part given for a component --components leaves out, refused as --lora's and
    --textual-inversion's are: the manifest's label then named a VAE or ControlNet nothing of which
    was exported. (A ControlNet or adapter changes the U-Net's inputs too: with the U-Net, it is used.)"""
    modules = {s.module for s in specs}
    if options.vae and "vae" not in modules:
        raise SdexportError(f"--vae {options.vae}: it replaces the VAE, which --components leaves out")
    for flag, given, part in (("--controlnet", options.controlnets, "controlnet"), ("--adapter", options.adapters, "adapter")):
        if given and "unet" not in modules and not any(m.startswith(part) for m in modules):
            raise SdexportError(f"{flag} {given[0]}: it conditions the U-Net, which --components leaves out with "
                                f"the {part}'s own graph")


def check_export_clip_skip(clip_skip: object, outline: ModelOutline, specs: list[ComponentSpec]) -> None:
    """Fewer layers than every text encoder has, and a text encoder exported for it to change."""
    check_clip_skip("--clip-skip", clip_skip)
    if not clip_skip:
        return
    if not any(s.name in text_encoders(outline.family) for s in specs):
        raise SdexportError(f"--clip-skip {clip_skip}: it changes how the text encoder reads the prompt, which "
                            "--components leaves out")
    if not outline.text_layers:
        raise SdexportError(f"--clip-skip {clip_skip}: the text encoders' layers are unknown ({outline.text_problem})")
    check_clip_skip("--clip-skip", clip_skip, outline.text_layers)


def check_embeddings(embeddings: list[Embedding], outline: ModelOutline, specs: list[ComponentSpec]) -> None:
    """Files of the family's layout and the text encoders' widths, words given once, and a text
    encoder exported to hold them (whether the tokenizer knows a word is found as they are added)."""
    if not embeddings:
        return
    if not any(s.name in text_encoders(outline.family) for s in specs):
        raise SdexportError("--textual-inversion: it adds words to the text encoder, which --components leaves out")
    if not outline.text_widths:
        raise SdexportError(f"--textual-inversion: the text encoders' widths are unknown ({outline.text_problem})")
    seen: set[str] = set()
    for embedding in embeddings:  # (the CLI checked its own; ExportOptions made in Python, here)
        embedding.check()
        check_widths(embedding, outline.family, outline.text_widths)
        if embedding.word.lower() in seen:  # (the tokenizer matches words in any case)
            raise SdexportError(f"--textual-inversion {embedding.path}: the word {embedding.word!r} is given twice; "
                                f"name one of them (FILE:ANOTHER)")
        seen.add(embedding.word.lower())
    # A word's vectors after its first are the tokens WORD_1, WORD_2, ...; the runtime finds them by
    # name (``prompt_text.follow_ups``), so another word named as the next would be read as one more.
    # (One of the names themselves is refused as a word the tokenizer knows, ``add_tokens``.)
    nexts = {token_name(e.word, max(v.shape[0] for v in e.vectors(outline.family).values())).lower(): e
             for e in embeddings}
    for embedding in embeddings:
        other = nexts.get(embedding.word.lower())
        if other is not None:
            raise SdexportError(
                f"--textual-inversion {embedding.path}: the word {embedding.word!r} is named like a vector of "
                f"{other.word!r} ({other.path.name}): a word's vectors after its first are the tokens "
                f"{other.word}_1, {other.word}_2, ..., so prompts would read the two as one; name it otherwise "
                f"({embedding.path.name}:ANOTHER)")


def select_components(family: str, names: list[str] | None, dtype: str, controlnets: int = 0,
                      adapters: int = 0) -> list[ComponentSpec]:
    """All components by default; the fp32 fallback VAE only where the export itself is not fp32."""
    specs = [s for s in components_for(family, controlnets, adapters) if not (s.always_fp32 and dtype == "fp32")]
    if not names:
        return specs
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    # (an fp32 export's own fallback alone: other *_fp32 names, SD's vae_encoder_fp32 in an fp16
    # export, are unknown ones, which said the export was fp32, an audit)
    fp32_parts = {s.name for s in components_for(family, controlnets, adapters) if s.always_fp32}
    fallbacks = [n for n in unknown if n in fp32_parts]
    if fallbacks:  # (it was exported again beside its twin, the same fp32 graph twice)
        raise SdexportError(f"--components: {', '.join(fallbacks)} is the fp32 fallback of an fp16 export; an fp32 "
                            f"export's {', '.join(n.removesuffix('_fp32') for n in fallbacks)} is fp32 already")
    if unknown:
        raise SdexportError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    nets = [s.name for s in specs if controlnet_index(s.name) is not None]
    chosen = [n for n in nets if n in names]
    if chosen and chosen != nets:
        raise SdexportError(f"--components: {', '.join(chosen)} without {', '.join(n for n in nets if n not in chosen)}: "
                            "export every ControlNet or none (the run gives one control image to each)")
    if nets and not chosen and "unet" in names:
        raise SdexportError("--components: the U-Net of a model with ControlNets takes their residuals; export it with "
                            f"its ControlNets ({', '.join(nets)})")
    added = [s.name for s in specs if adapter_index(s.name) is not None]
    if added and any(("unet" in names) != (n in names) for n in added):
        raise SdexportError(f"--components: the U-Net of a model with a T2I-Adapter takes its features; export them "
                            f"together (unet,{','.join(added)}) or none of them")
    return [s for s in specs if s.name in names]

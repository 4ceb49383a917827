"""What a model is, read from its configs alone: enough to check a request before loading any weight.

Loading a real checkpoint takes seconds to minutes and gigabytes; a wrong component name, an image
size the U-Net cannot take or an output path that cannot be written should be refused before that.
Everything here reads small JSON files (or a safetensors header) and never imports torch. The model
loader (``sdexport.models.loader``) reads the same configs through the same helpers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdexport.errors import ModelLoadError, a_class, one_line, pasteable
from sdexport.models.presets import PRESETS, SDXL_PROFILE, Preset, get_preset
from sdexport.setting_names import option, option_given
from sdexport.shapes import PROMPT_CHUNKS, ShapeProfile
from sdexport.specs import FAMILY_CONTROLNET, SDXL_REFINER, is_sdxl, text_encoders, tokenizer_names

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    # the SDXL refiner where model_index.json sets requires_aesthetics_score (SDXL_REFINER), else the base model
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionImg2ImgPipeline": "sd",  # the txt2img parts: a pipeline saved from img2img is the same model
    "StableDiffusionInpaintPipeline": "sd",  # a 9-channel inpainting U-Net (ModelDims.U)
    # the base model, and its ControlNet(s) in controlnet/, controlnet_1/, ... (ModelOutline.controlnets)
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusionControlNetImg2ImgPipeline": "sd",
    "StableDiffusionXLControlNetImg2ImgPipeline": "sdxl",
    "StableDiffusionControlNetInpaintPipeline": "sd",  # either U-Net (4 or 9 channels), with its ControlNet(s)
    "StableDiffusionXLInpaintPipeline": "sdxl",  # either U-Net (4 channels: the base model, or 9)
    "StableDiffusionXLControlNetInpaintPipeline": "sdxl",
    "StableDiffusionXLControlNetUnionPipeline": "sdxl",  # union ControlNet(s), in the same folders
    "StableDiffusionXLControlNetUnionInpaintPipeline": "sdxl",
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": "sdxl",
    # the base model, and its T2I-Adapter(s) in adapter/, adapter_1/, adapter_2/ ... (ModelOutline.adapters)
    "StableDiffusionAdapterPipeline": "sd",
    "StableDiffusionXLAdapterPipeline": "sdxl",
    # an LCM-distilled SD 1.5 (SimianLuo/LCM_Dreamshaper_v7): its U-Net takes the guidance (ModelDims.G)
    "LatentConsistencyModelPipeline": "sd",
    "LatentConsistencyModelImg2ImgPipeline": "sd",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
"""Single-file checkpoints, by the lower-cased suffix (``My ckpt.SAFETENSORS`` is one)."""
FAMILY_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    SDXL_REFINER: "StableDiffusionXLImg2ImgPipeline"}
"""The pipeline class a family's model is saved as (refiner: the one that runs it by default)."""
REFINER_PIPELINES = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
"""The pipeline classes that honour ``requires_aesthetics_score`` and that sdexport runs (the
refiner takes no ControlNet or T2I-Adapter here)."""


@dataclass(frozen=True)
class ModelOutline:
    """A model's family and image geometry, and the files it is read from."""

    family: str
    default_profile: ShapeProfile
    sources: tuple[Path, ...]
    """Paths the export reads (never to be replaced by its output)."""
    vae_scale_factor: int
    unet_downsample: int
    vae_width: int
    """Channels of the VAE decoder's full-resolution blocks: its largest activations."""
    scheduler_config: dict[str, Any]
    inpainting: bool = False
    """The U-Net also takes a mask and the masked image's latents (as ``ModelDims.inpainting``)."""
    unet_config: dict[str, Any] | None = None
    """The U-Net's config, which ``--controlnet``s must fit."""
    preset: str | None = None
    """The preset's name, where the model is one."""
    controlnets: tuple[Path, ...] = ()
    """A ControlNet pipeline directory's ControlNets (``controlnet/``, ``controlnet_1/``, ...)."""
    adapters: tuple[Path, ...] = ()
    """A T2I-Adapter pipeline directory's adapter(s) (``adapter/``, a ``MultiAdapter``'s
    ``adapter_1/``, ``adapter_2/``, ...)."""
    missing_part: tuple[str, str] | None = None
    """A ControlNet or adapter the directory's ``model_index.json`` names but its folder lacks
    (``incomplete_part``): what is missing, and the option (``--controlnet``, ``--adapter``) whose
    own networks would take its place, as diffusers' ``from_pretrained(controlnet=...)`` does."""
    text_layers: tuple[int, ...] = ()
    """Hidden layers of each of the family's text encoders, in order: ``--clip-skip`` skips fewer."""
    text_widths: Mapping[str, int] = field(default_factory=dict)
    """Each text encoder's width, by name: a ``--textual-inversion`` file's vectors must have it."""
    text_problem: str = ""
    """Why ``text_layers`` and ``text_widths`` are empty: a text encoder config that cannot be read."""
    vae_force_upcast: bool = False
    """The VAE's config sets ``force_upcast`` (AutoencoderKL's default): diffusers' SDXL pipelines
    run it in fp32 (``build.vae_upcast``), so an fp16 SDXL export carries fp32 VAE graphs."""

    @property
    def image_multiple(self) -> int:
        return self.vae_scale_factor * self.unet_downsample


def outline_model(model: str, *, config: str | None = None, vae: str | None = None) -> ModelOutline:
    """Resolve ``model`` like ``load_model`` does, reading configs only; the same one-line errors.
    An empty name is refused: ``Path("")`` is the current folder, which would be read instead."""
    if not model.strip():
        raise ModelLoadError(f"{model!r}: an empty model; give a preset ({', '.join(PRESETS)}), a diffusers "
                             "directory or a checkpoint file")
    for flag, value in (("--config", config), ("--vae", vae)):
        if value is not None and not value.strip():
            raise ModelLoadError(f"{option_given(flag, repr(value))}: an empty path; name one")
    preset = get_preset(model)
    path = Path(model)
    if preset is None and not path.exists():  # (whatever else was given with it)
        if path.is_symlink():
            raise ModelLoadError(f"{model}: a link that leads nowhere (a loop, or to a path that does not exist)")
        raise ModelLoadError(f"{model}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
    if preset is None and not (path.is_dir() or path.is_file()):  # (a pipe's reader waits for a writer)
        raise ModelLoadError(f"{model}: not a regular file or a directory; give a diffusers directory or a "
                             f"{'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint")
    if config is not None and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        if path.is_file():  # a .pt, say: what it is not matters more than the --config it cannot take
            raise ModelLoadError(f"{model}: not a diffusers directory or a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint")
        raise ModelLoadError(
            f"{option_given('--config', config)}: only a single-file checkpoint (.safetensors/.ckpt) takes "
            f"{option('--config')}; "
            f"{model} brings its own configs"
        )
    if preset is not None and (path / "unet").is_dir() \
            and not any((path / name).exists() for name in ("model_index.json", "manifest.json", "unet/model.onnx")):
        raise ModelLoadError(  # a partial download, say: not the preset's random weights in its place
            f"{model}: a folder named like the preset, with a unet/ but no model_index.json, so neither a "
            f"diffusers directory nor the preset; complete it (model_index.json), or run from another folder "
            f"for the preset")
    if preset is not None and not looks_like_a_model(path):
        outline = _outline(preset.family, preset.unet, preset.vae, preset.scheduler, preset.profile, (), vae)
        return replace(outline, preset=preset.name, **_preset_text_sizes(preset))
    if path.is_dir():
        replaced = vae is not None and not is_vae_file(Path(vae))  # a directory's config replaces the model's
        family = family_of_dir(path, vae_replaced=vae is not None)  # (a file's: own_vae_config says what is missing)
        _check_tokenizer_files(path, family)
        outline = _outline(family, read_json(path / "unet" / "config.json"),
                           {} if replaced else own_vae_config(path, vae),  # --vae's is read
                           scheduler_config(path), None, (path,), vae)
        controlnets, adapters = pipeline_controlnets(path), pipeline_adapters(path)
        return replace(outline, controlnets=controlnets, adapters=adapters,
                       missing_part=incomplete_part(path, controlnets, adapters), **_read_text_sizes(path, family))
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{model}: not a diffusers directory or a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint")
    check_single_file(path)  # (a LoRA or VAE given as the model is named as one, not asked for a --config)
    config_preset, config_path = single_file_config(path, config)
    if config_preset is not None:
        outline = _outline(config_preset.family, config_preset.unet, config_preset.vae, config_preset.scheduler,
                           config_preset.profile, (path,), vae)
        return replace(outline, **_preset_text_sizes(config_preset))
    family = family_of_dir(config_path)
    _check_tokenizer_files(config_path, family)
    outline = _outline(family, read_json(config_path / "unet" / "config.json"),
                       read_json(config_path / "vae" / "config.json"),
                       scheduler_config(config_path), None,
                       (path, config_path), vae)
    return replace(outline, **_read_text_sizes(config_path, family))


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                  "added_tokens.json")
"""The JSON files transformers' CLIP tokenizers read (each a JSON object), where a folder has them."""


def _check_tokenizer_files(directory: Path, family: str) -> None:
    """The tokenizers' JSON files (every export loads them), read as the other configs are: a damaged
    one was found only as transformers loaded it, after torch and diffusers. Each must give its
    length (``tokenizer_length``)."""
    for name in tokenizer_names(family):
        for file in TOKENIZER_JSON:
            if (directory / name / file).is_file():
                read_json(directory / name / file)
        tokenizer_length(directory / name)


def refuse_latent_statistics(family: str, vae: dict[str, Any], whose: str) -> None:
    """An SDXL VAE whose config gives ``latents_mean``/``latents_std`` (diffusers' rule for applying
    them, as Playground v2.5's): sdexport's loop does not apply them yet, so its images would decode
    wrong (export and adopt refuse it alike; adopt passed it, an audit)."""
    if is_sdxl(family) and vae.get("latents_mean") is not None and vae.get("latents_std") is not None:
        raise ModelLoadError(f"{whose}: its config gives latents_mean/latents_std (as Playground v2.5's does), which "
                             "diffusers' SDXL pipelines apply around the VAE and sdexport does not yet: its images "
                             "would decode wrong")


def tokenizer_length(folder: Path) -> int:
    """The tokens a prompt is read in: ``tokenizer_config.json``'s ``model_max_length``. Without the
    file (or the key), transformers' tokenizer says 10^30, which the export took as the text
    encoder's sequence length and failed on with a ValueError after loading every weight."""
    config = folder / "tokenizer_config.json"
    if not folder.is_dir():  # (a folder missing was 'no tokenizer_config.json' in it, an audit)
        raise ModelLoadError(f"{folder}: no such folder (the tokenizer, which reads the prompt): copy it from where "
                             "the rest came from")
    if not config.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer_config.json, whose model_max_length gives the prompt's length in "
                             "tokens (77 for CLIP): copy it from the model this tokenizer came with")
    length = read_json(config).get("model_max_length")
    if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= 4096:
        raise ModelLoadError(f"{config}: model_max_length {length!r} is not a sequence length (77 for CLIP)")
    return length


CLIP_SIZES = {"num_hidden_layers": 12, "hidden_size": 512}
"""transformers' ``CLIPTextConfig`` defaults, where a config leaves a size out."""


def _size(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config.get(key, CLIP_SIZES[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"{where}: {key} {value!r} is not a size")
    return value


def _text_sizes(configs: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
    """The outline's ``text_layers`` and ``text_widths`` from the text encoders' configs, by name."""
    return {"text_layers": tuple(_size(c, "num_hidden_layers", f"{where}{n}") for n, c in configs.items()),
            "text_widths": {n: _size(c, "hidden_size", f"{where}{n}") for n, c in configs.items()}}


def _read_text_sizes(directory: Path, family: str) -> dict[str, Any]:
    """Unknown where a text encoder's config cannot be read (``text_problem`` says why): that
    refuses ``--clip-skip`` and ``--textual-inversion`` alone (a U-Net-only export never reads them)."""
    try:
        return _text_sizes({name: read_json(directory / name / "config.json") for name in text_encoders(family)},
                           f"{directory}/")
    except ModelLoadError as exc:
        return {"text_problem": str(exc)}


def _preset_text_sizes(preset: Preset) -> dict[str, Any]:
    return _text_sizes({name: config for name, config in (("text_encoder", preset.text_encoder),
                                                           ("text_encoder_2", preset.text_encoder_2)) if config},
                       f"preset {preset.name}: ")


def _outline(
    family: str, unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any], profile: ShapeProfile | None,
    sources: tuple[Path, ...], vae_dir: str | None,
) -> ModelOutline:
    """The outline, refusing configs whose values would only fail after loading (or be written into a
    manifest that the runtime then refuses): the same rules the engine directory's manifest obeys.
    ``profile``: a preset's; None: a checkpoint's, from its U-Net's size (``checkpoint_profile``)."""
    from sdexport.manifest_schema import SCHEDULER_CONFIG, first_error

    if vae_dir is not None and is_vae_file(Path(vae_dir)):  # read with the model's own VAE config
        vae_path = Path(vae_dir)
        check_vae_file(vae_path)
        sources = (*sources, vae_path)
    elif vae_dir is not None:
        vae_path = vae_config_dir(Path(vae_dir))
        vae = read_json(vae_path / "config.json")
        sources = (*sources, vae_path)
        architectures = vae.get("architectures")
        found = (vae.get("_class_name") or (architectures[0] if isinstance(architectures, list) and architectures
                                            else None) or vae.get("model_type"))
        if (found or "AutoencoderKL") != "AutoencoderKL":  # transformers' configs name theirs otherwise
            raise ModelLoadError(f"--vae {vae_path}: {a_class(found)}, not an AutoencoderKL")
        try:
            readable_weight_files(vae_path, "diffusers")  # a truncated copy: refused now, not when the VAE loads
        except ModelLoadError as exc:
            raise ModelLoadError(f"--vae {exc}") from None
    channels, wanted = vae.get("latent_channels", 4), unet.get("out_channels", 4)
    if channels != wanted:  # (the model's own VAE too: it failed mid-export, after the first graphs)
        whose = f"--vae {vae_path}" if vae_dir is not None else "the model's VAE"
        raise ModelLoadError(f"{whose}: {channels} latent channels, but the U-Net takes {wanted}")
    problem = first_error(SCHEDULER_CONFIG, scheduler)
    if problem:
        raise ModelLoadError(f"the model's scheduler config is not usable: {problem}")
    refuse_latent_statistics(family, vae, f"--vae {vae_path}" if vae_dir is not None else "the model's VAE")
    from sdexport.manifest_schema import VAE_SCALING_DEFAULT

    scaling = vae.get("scaling_factor", VAE_SCALING_DEFAULT)
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not math.isfinite(scaling) or scaling <= 0:
        raise ModelLoadError(f"the VAE config's scaling_factor {scaling!r} is not a positive number")
    try:
        blocks = list(vae["block_out_channels"])
        factor, downsample = halvings(blocks), halvings(unet["down_block_types"])
        return ModelOutline(
            family=family,
            default_profile=profile or checkpoint_profile(family, unet, factor, factor * downsample),
            sources=sources,
            vae_scale_factor=factor,
            unet_downsample=downsample,
            vae_width=int(blocks[0]),
            scheduler_config=dict(scheduler),
            inpainting=_inpainting(unet, vae),
            unet_config=dict(unet),
            vae_force_upcast=bool(vae.get("force_upcast", True)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"lacks a usable {one_line(exc)}" if isinstance(exc, KeyError) else f"has a value sdexport cannot read ({one_line(exc)})"
        raise ModelLoadError(f"the U-Net or VAE config {what}") from None


def _inpainting(unet: dict[str, Any], vae: dict[str, Any]) -> bool:
    """The U-Net's input channels say it (``unet_extra_channels``)."""
    latent = int(unet.get("out_channels", vae.get("latent_channels", 4)))
    return unet_extra_channels(int(unet.get("in_channels", latent)), latent) != 0


def halvings(blocks: Sequence[Any]) -> int:
    """The factor a stack of ``blocks`` shrinks an image by per side: each block but the last halves
    it. A VAE's ``block_out_channels`` give its scale factor (pixels per latent, diffusers'
    ``vae_scale_factor``), a U-Net's ``down_block_types`` its downsampling, a ControlNet's
    ``conditioning_embedding_out_channels`` its image encoder's: one rule, read once. Anything but a
    non-empty list is a TypeError (a block type given as one string counted its letters: "height min
    256 is not a multiple of 4194304")."""
    if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(f"expected a list of blocks, got {blocks!r}")
    return 2 ** (len(blocks) - 1)


def unet_extra_channels(in_channels: int, latent_channels: int, label: str = "") -> int:
    """``ModelDims.U``: 0 for a U-Net that takes the latents alone, 2C + 1 for an inpainting U-Net
    (latents, mask, masked-image latents: SD 1.x/2.x and SDXL alike); any other count is a
    conditioning sdexport does not run (refused before anything is exported). ``label`` names the
    model in the message."""
    if in_channels == latent_channels:
        return 0
    if in_channels == 2 * latent_channels + 1:
        return in_channels
    raise ModelLoadError(
        f"{label + ': ' if label else ''}the U-Net takes {in_channels} input channels for {latent_channels} latent "
        f"channels; sdexport runs U-Nets that take the latents ({latent_channels}) or inpainting ones "
        f"({2 * latent_channels + 1})"
    )


def vae_config_dir(path: Path) -> Path:
    """``--vae``: an AutoencoderKL directory, or a pipeline directory holding one in ``vae/``
    (``is_vae_file``: a VAE file instead)."""
    if not path.is_dir():
        raise ModelLoadError(f"--vae {path}: " + (f"a file, not a {'/'.join(SINGLE_FILE_SUFFIXES)} VAE file; name "
                                                  "one, or an AutoencoderKL's directory (its config.json and "
                                                  "weights)" if path.exists() else "no such file or directory"))
    if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--vae {path}: not a diffusers AutoencoderKL directory (no config.json)")
    return path


def is_vae_file(path: Path) -> bool:
    """``--vae`` names a VAE file in the original layout (``vae-ft-mse-840000-ema-pruned.safetensors``,
    ``sdxl_vae.safetensors``, or a whole checkpoint whose VAE is taken), read with the model's own
    VAE config, as diffusers' ``AutoencoderKL.from_single_file`` reads one with a config given."""
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir()


VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "vae.")
"""How a VAE's keys start in the original layout: alone (a VAE file), or in a checkpoint (diffusers'
``LDM_VAE_KEYS``); what diffusers' converter reads."""

DIFFUSERS_VAE_KEYS = ("encoder.down_blocks.", "decoder.up_blocks.")
"""How a diffusers ``AutoencoderKL``'s own weight file's keys start (the original layout's are
``encoder.down.N``): a folder's weights, read with the folder's config.json, not converted."""

DIFFUSERS_VAE = ("a diffusers VAE's weight file (its keys are diffusers', not the original layout's): give the folder "
                 "holding it and its config.json as --vae DIR")
"""What such a file given as a model or a --vae file is told: as a file it was taken for an original-layout
VAE, and refused as lacking most of the --config's weights (an audit's finding)."""


def check_vae_file(path: Path) -> None:
    """A ``--vae`` file that can be read as a VAE, refused in one line before anything loads: missing,
    unreadable, or holding no VAE weights (a LoRA, say). A ``.ckpt`` is looked at as a model's is."""
    if not path.is_file():
        raise ModelLoadError(f"--vae {path}: no such file")
    if path.suffix.lower() != ".safetensors":
        try:
            check_single_file(path)
        except ModelLoadError as exc:
            raise ModelLoadError(f"--vae {exc}") from None
        return
    try:
        keys = safetensors_keys(path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"--vae {exc}") from None
    if not any(k.startswith(VAE_KEYS) for k in keys):
        raise ModelLoadError(f"--vae {path}: no VAE weights ({', '.join(p + '*' for p in VAE_KEYS)}) in it")
    if any(k.startswith(DIFFUSERS_VAE_KEYS) for k in keys):
        raise ModelLoadError(f"--vae {path}: {DIFFUSERS_VAE}")


def own_vae_config(directory: Path, vae: str | None) -> dict[str, Any]:
    """A diffusers directory's own VAE config, which a ``--vae`` file is read with."""
    file = directory / "vae" / "config.json"
    if vae is not None and not file.is_file():
        raise ModelLoadError(f"--vae {vae}: a VAE file is read with the model's own VAE config, and {directory} has "
                             "no vae/config.json; give --vae a diffusers AutoencoderKL directory instead")
    return read_json(file)


def looks_like_a_model(path: Path) -> bool:
    """A checkpoint that takes a preset's name's place: a diffusers directory or a single file. An
    engine directory holds a model_index.json too (for optimum), but no checkpoint: ``sdexport
    export tiny -o tiny`` and later ``export tiny -o tiny --force`` or ``run tiny --backend torch``
    from that folder mean the preset (``part_sources._checkpoint_dir`` for ControlNets likewise)."""
    if path.is_file():
        return path.suffix.lower() in SINGLE_FILE_SUFFIXES
    return ((path / "model_index.json").is_file() and not (path / "manifest.json").is_file()
            and not (path / "unet" / "model.onnx").is_file())


def family_profile(family: str) -> ShapeProfile:
    """The family's export profile: SD 1.x/2.x 256:512:1024, SDXL (and its refiner) 512:1024:1536;
    prompts of up to ``PROMPT_CHUNKS`` chunks."""
    return SDXL_PROFILE if is_sdxl(family) else ShapeProfile(chunks=PROMPT_CHUNKS)


def checkpoint_profile(family: str, unet: Mapping[str, Any], vae_scale_factor: int, image_multiple: int) -> ShapeProfile:
    """The default export profile of a checkpoint (presets carry their own), for export and adopt
    alike: opt at the size its U-Net was made for (``sample_size`` latents times the VAE's factor,
    what diffusers' pipelines default to); each side bounded by the family's where it lies within
    them (SD 2.x 768: 256:768:1024, as the sd21 preset), half to twice it below them (tiny test
    models); the family's batches. Without a ``sample_size``, with one no image side can be (not a
    multiple of ``image_multiple``), or above the family's sides (whose maxima could pass what an
    engine can index, ``ShapeProfile.check_limits``), the family's sides: the default must export
    without flags (``--height``/``--width`` set others)."""
    family_sides = family_profile(family)
    given = unet.get("sample_size") or 0
    sides = list(given) if isinstance(given, list) and len(given) == 2 else [given, given]  # int, or [h, w]
    least = 1 if isinstance(given, list) else 0  # 0 (or none) says "no size" only as one number
    if not all(isinstance(side, int) and not isinstance(side, bool) and side >= least for side in sides):
        raise ModelLoadError(f"unet/config.json: sample_size {given!r} is not a size in latents (a whole number, or "
                             "[height, width]), as diffusers reads it")
    height, width = (side * vae_scale_factor for side in sides)
    if not height:
        return family_sides

    def around(side: int, family_range: tuple[int, int, int]) -> tuple[int, int, int]:
        low, _, high = family_range
        if side % image_multiple or side > high:
            return family_range
        if side >= low:
            return low, side, high
        return max(image_multiple, side // 2 // image_multiple * image_multiple), side, side * 2

    return ShapeProfile(batch=family_sides.batch, height=around(height, family_sides.height),
                        width=around(width, family_sides.width), chunks=family_sides.chunks)


def check_takes_networks(family: str, flag: str) -> None:
    """ControlNets and T2I-Adapters are made for one family's U-Net: the SDXL refiner has none
    (``FAMILY_CONTROLNET`` has no row for it), so its ``flag`` is refused before any is checked to
    fit (``check_controlnets``, ``adapter.check_together``: export, bench and ``load_model`` alike)."""
    if family not in FAMILY_CONTROLNET:
        raise ModelLoadError(f"{flag}: the {family} family takes no ControlNets or T2I-Adapters (none are made "
                             "for the SDXL refiner's U-Net); give them to the SDXL base model")


def family_of_index(family: str, index: dict[str, Any], path: Path) -> str:
    """The family of a ``model_index.json`` (``family``: its pipeline class's, which sdexport runs).
    Its ``requires_aesthetics_score`` makes an SDXL model the refiner (``SDXL_REFINER``: time ids
    with an aesthetic score, the second text encoder alone); set where the refiner cannot run, or
    with a first text encoder the refiner would not read, it is refused, not dropped. optimum's
    ``ORT`` class names count as diffusers' own."""
    if not index.get("requires_aesthetics_score"):
        return family
    pipeline = str(index.get("_class_name", "?")).removeprefix("ORT")
    if pipeline not in REFINER_PIPELINES:
        raise ModelLoadError(f"{path}: model_index.json sets requires_aesthetics_score (the SDXL refiner's time ids) "
                             f"for a {pipeline}; sdexport runs the refiner as {' or '.join(REFINER_PIPELINES)}, "
                             "without ControlNets or T2I-Adapters")
    if (index.get("text_encoder") or [None])[0] is not None:
        raise ModelLoadError(f"{path}: an SDXL refiner (requires_aesthetics_score) with a first text encoder; sdexport "
                             "runs the refiner as stabilityai's, on text_encoder_2 alone (text_encoder: [null, null])")
    return SDXL_REFINER


def family_of_dir(path: Path, *, vae_replaced: bool = False) -> str:
    """The family of diffusers directory ``path``, once it holds every part sdexport reads: its own
    ``vae/`` may be left out where ``--vae`` replaces it (``vae_replaced``), as diffusers'
    ``from_pretrained(path, vae=...)`` reads none then."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{path}: not a diffusers model directory (no model_index.json); expected "
            f"model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/{_what_it_holds(path)}"
        )
    index = read_json(index_file)
    pipeline = index.get("_class_name", "?")
    if not isinstance(pipeline, str):  # (a community pipeline's [module, class]: unhashable, a traceback)
        pipeline = "/".join(map(str, pipeline)) if isinstance(pipeline, list) else str(pipeline)
    if (path / "unet" / "model.onnx").is_file():  # (before the class: optimum names its ORTStableDiffusion...)
        run = (f"`sdexport run {pasteable(path)}` runs it" if (path / "manifest.json").is_file()
               else f"run it after `sdexport adopt {pasteable(path)}`")
        raise ModelLoadError(f"{path}: an ONNX export (unet/model.onnx), not a PyTorch checkpoint: {run}, or "
                             "export the checkpoint it came from")
    if pipeline not in SUPPORTED_PIPELINES:
        kind = "a transformer (DiT) denoiser" if "transformer" in index else "another architecture"
        raise ModelLoadError(
            f"{path}: unsupported architecture {pipeline} ({kind}); sdexport supports "
            f"{', '.join(SUPPORTED_PIPELINES)} (U-Net based Stable Diffusion 1.x, 2.x and XL)"
        )
    family = family_of_index(SUPPORTED_PIPELINES[pipeline], index, path)
    parts = ["unet", *([] if vae_replaced else ["vae"]), *text_encoders(family), *tokenizer_names(family), "scheduler"]
    missing = [d for d in parts if not (path / d).is_dir()]
    if missing:
        hint = " (`sdexport export --vae DIR` can replace the VAE)" if missing == ["vae"] else ""
        raise ModelLoadError(f"{path}: incomplete diffusers directory, missing {', '.join(missing)}/{hint}")
    return family


def _what_it_holds(path: Path) -> str:
    """What a folder without model_index.json may be instead, as a hint: one part of a diffusers
    directory (its config.json: the pipeline directory is the one above), or a folder a single-file
    checkpoint was saved in."""
    if not path.is_dir():
        return ""
    if (path / "config.json").is_file():  # a model's folder: its weights are no single-file checkpoint
        above = path.parent / "model_index.json"
        return f"; {path.name}/ is one part of the diffusers directory {path.parent}: pass that" if above.is_file() else ""
    checkpoints = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES)
    if not checkpoints:
        return ""
    return (f"; to export the single-file checkpoint in it, pass the file ({path / checkpoints[0]})"
            + (f", one of {len(checkpoints)}" if len(checkpoints) > 1 else ""))


def pipeline_controlnets(path: Path) -> tuple[Path, ...]:
    """The ControlNet folders of a diffusers ControlNet pipeline directory, in diffusers' order:
    ``controlnet/``, and where ``model_index.json`` names a MultiControlNet (or names none: a
    folder put together by hand), ``controlnet_1/``, ... as diffusers reads them; a stray
    ``controlnet_1/`` beside one ``ControlNetModel`` is not read, as diffusers does not."""
    from sdexport.specs import MAX_CONTROLNETS, controlnet_names

    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if index.get("controlnet") and not any("Multi" in str(part) for part in index["controlnet"]):
        return (path / "controlnet",) if (path / "controlnet" / "config.json").is_file() else ()
    names = controlnet_names(MAX_CONTROLNETS)
    found = []
    for name in names:
        if not (path / name / "config.json").is_file():
            break
        found.append(path / name)
    return tuple(found)


def incomplete_part(path: Path, controlnets: tuple[Path, ...], adapters: tuple[Path, ...]) -> tuple[str, str] | None:
    """A ControlNet or T2I-Adapter that ``model_index.json`` names but the directory lacks (its
    folder, or its folder's ``config.json``; for a Multi one, a numbered folder after those read),
    with the option that would stand in for it; None where nothing is missing. Such a directory
    exported silently as plain text-to-image (an audit), where diffusers refuses it ("no file named
    config.json")."""
    from sdexport.specs import adapter_names, controlnet_names

    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    for key, found, names, flag in (("controlnet", controlnets, controlnet_names, "--controlnet"),
                                    ("adapter", adapters, adapter_names, "--adapter")):
        entry = index.get(key)
        named = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
        if named is None:  # ([null, null]: an optional part the pipeline was saved without)
            continue
        after = path / names(len(found) + 1)[-1]  # the folder read next: there, it lacks its config
        if not found or ("Multi" in named and after.exists() and not (after / "config.json").is_file()):
            lacks = "which has no config.json" if after.exists() else "which is not there"
            missing = (f"{path / 'model_index.json'} names {a_class(named)} in {after.name}/, {lacks} (an "
                       "incomplete download?)")
            return missing, flag
    return None


def pipeline_adapters(path: Path) -> tuple[Path, ...]:
    """The T2I-Adapter folders of a diffusers adapter pipeline directory, in order: ``adapter/``,
    and where ``model_index.json`` names a ``MultiAdapter``, its ``adapter_1/``, ``adapter_2/``, ...
    as diffusers reads them (none without one; a stray ``adapter_1/`` beside a ``T2IAdapter`` is
    not read, as diffusers does not). More than sdexport runs at once are refused, not cut: that
    would change every image without a word. So is a third adapter where diffusers 0.42 saves it
    (``adapter_1_2/``, each folder the last one's name plus ``_{i}``) but does not read it back."""
    from sdexport.specs import MAX_ADAPTERS, adapter_names

    if not (path / "adapter" / "config.json").is_file():
        return ()
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if "MultiAdapter" not in (index.get("adapter") or []):
        return (path / "adapter",)
    if (path / "adapter_1_2" / "config.json").is_file() and not (path / "adapter_2").exists():
        raise ModelLoadError(f"{path}: adapter_1_2/ holds a MultiAdapter's third T2I-Adapter where diffusers saves it, "
                             "but diffusers and sdexport read it from adapter_2/ (and the next from adapter_3/); "
                             "rename the folders")
    found = []
    for name in adapter_names(MAX_ADAPTERS + 1):
        if not (path / name / "config.json").is_file():
            break
        found.append(path / name)
    if len(found) > MAX_ADAPTERS:
        raise ModelLoadError(f"{path}: a MultiAdapter of more than {MAX_ADAPTERS} T2I-Adapters; sdexport runs at most "
                             f"{MAX_ADAPTERS} at once")
    return tuple(found)


WEIGHT_NAMES = {
    # diffusers (0.42) looks for a sharded checkpoint's index only in safetensors (use_safetensors
    # defaults to True where safetensors is installed, as it is with sdexport), then for one file
    "diffusers": ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                  "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"),
}
"""The weight files ``from_pretrained`` reads from a model folder, by library, in the order it looks
for them (no ``variant``: sdexport never asks for one)."""


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""The parts of a diffusers model directory whose weights sdexport reads, each from its own folder."""


def library_of(part: str) -> str:
    """Which library's ``from_pretrained`` reads a diffusers pipeline's sub-folder ``part``."""
    return "transformers" if part.startswith("text_encoder") else "diffusers"


def weight_files(folder: Path, library: str) -> list[Path]:
    """The files ``from_pretrained`` would read ``folder``'s weights from (a sharded checkpoint's
    index and its shards), so that a folder without them is refused in one line before anything
    loads (diffusers would log an error of its own first), and so that they can be fingerprinted.

    A folder holding only variant files (``diffusion_pytorch_model.fp16.safetensors``) is named as
    such: ``from_pretrained`` reads them only when asked for that variant. A transformers config's
    ``transformers_weights`` names the file to read before any of the usual names (transformers 5)."""
    names = WEIGHT_NAMES[library]
    explicit = _explicit_weights(folder) if library == "transformers" else None
    for name in [explicit] if explicit is not None else names:
        path = folder / name
        if not path.is_file():
            if explicit is not None:
                raise ModelLoadError(f"{folder / 'config.json'}: transformers_weights names {explicit}, which is not there")
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path}: no weight_map naming the shards")
        shards = sorted({str(v) for v in weight_map.values()})
        unsafe = [s for s in shards if Path(s).name != s]
        if unsafe:
            raise ModelLoadError(f"{path}: shard {unsafe[0]!r} is not a file name beside it")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard {missing[0]} is missing ({len(missing)} of {len(shards)})")
        return [path, *(folder / s for s in shards)]
    whole = [n for n in names if not n.endswith(".index.json")]
    raise ModelLoadError(f"{folder}: no weight file ({' or '.join(whole)}){_unread_hint(folder, names)}")


def _unread_hint(folder: Path, names: tuple[str, ...]) -> str:
    """What a folder without the weight files ``from_pretrained`` reads holds instead, and what to do:
    a variant (one file or a sharded one's index, renamed to be read) or a sharded .bin diffusers
    does not read."""
    if not folder.is_dir():
        return ""
    stems = tuple(n.split(".")[0] for n in names)
    found = sorted(p.name for p in folder.iterdir() if p.name.startswith(stems))
    variants = [n for n in found if n.count(".") == 2 and n.endswith((".safetensors", ".bin"))
                and "-of-" not in n]  # one file (NAME.VARIANT.safetensors), not a shard
    if variants:
        return (f"; it holds {variants[0]}, a variant, which sdexport does not read: rename it to "
                f"{variants[0].split('.')[0]}.{variants[0].rsplit('.', 1)[-1]}")
    indexes = [n for n in found if ".index." in n and n.endswith(".json") and not n.endswith(".index.json")]
    if indexes:  # NAME.safetensors.index.VARIANT.json: its shards keep their names
        read = indexes[0].split(".index.")[0] + ".index.json"
        return (f"; it holds {indexes[0]}, a sharded variant, which sdexport does not read: rename that index "
                f"to {read}")
    unread = [n for n in found if n.endswith(".index.json") and n not in names]
    if unread:
        return f"; it holds {unread[0]}, a sharded checkpoint that diffusers reads only as safetensors"
    return ""


def _explicit_weights(folder: Path) -> str | None:
    """The weight file a transformers model folder's config.json names as ``transformers_weights``
    (transformers 5 reads that one: a safetensors file or index, or ``adapter_model.bin``), checked
    to be a path inside the folder; None where it names none."""
    config = folder / "config.json"
    name = read_json(config).get("transformers_weights") if config.is_file() else None
    if name is None:
        return None
    if (not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts
            or not (name.endswith((".safetensors", ".safetensors.index.json")) or name == "adapter_model.bin")):
        raise ModelLoadError(f"{config}: transformers_weights {name!r} is not a .safetensors file or index in its "
                             "folder")
    return name


def check_part_weights(outline: ModelOutline, modules: Iterable[str]) -> None:
    """A diffusers model directory holds weight files for each of ``modules`` (the parts an export
    reads: ``unet``, ``vae``, ``text_encoder``...): refused before the first part is exported, not
    after."""
    if outline.preset is not None or not outline.sources or not outline.sources[0].is_dir():
        return
    for module in sorted(set(modules) & set(PIPELINE_PARTS)):  # (a family's specs name only its own parts)
        readable_weight_files(outline.sources[0] / module, library_of(module))  # not after the parts before it


def readable_weight_files(folder: Path, library: str) -> list[Path]:
    """``weight_files``, each safetensors file's header read: a truncated copy is refused in one line
    now, not when its part loads (and a pickled ``.bin`` that is a Git LFS pointer or a web page)."""
    files = weight_files(folder, library)
    for path in files:
        if path.suffix == ".safetensors":
            safetensors_keys(path)
        elif path.suffix == ".bin":
            check_torch_file(path)
        elif seen := stand_in(_head(path)):
            raise ModelLoadError(f"{path}: {seen}")
    return files


def check_torch_file(path: Path) -> None:
    """A part's pickled weights (``.bin``) read as far as telling them whole, cheaply: the first
    bytes, and for torch.save's zip archive its central directory, at the end, which a cut download
    lacks. An empty or truncated ``.bin`` passed, and was found when its part loaded, after the
    parts before it were exported (minutes and gigabytes of U-Net; an audit), where diffusers'
    fallback also reads the damaged file whole as text. (The pickle of torch before 1.6 has no
    directory to read: it is told at its load.)"""
    import zipfile

    head = _head(path)
    if not head:
        raise ModelLoadError(f"{path}: empty or unreadable (0 bytes read): download it again")
    if _safetensors_by_content(head):
        raise ModelLoadError(f"{path}: a safetensors file by its content: name it "
                             f"{path.with_suffix('.safetensors').name}")
    if seen := _not_torch_save(head, "torch weights"):
        raise ModelLoadError(f"{path}: {seen}")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ModelLoadError(f"{path}: truncated or damaged: its zip archive cannot be read ({one_line(exc)}); "
                                 "download it again") from None


def scheduler_config(directory: Path) -> dict[str, Any]:
    """A diffusers directory's scheduler config, of the class its ``model_index.json`` names where it
    names one: diffusers builds each part with the index's class (from that config), so a pipeline
    saved with another scheduler than its config's ``_class_name`` samples with the index's."""
    config = read_json(directory / "scheduler" / "scheduler_config.json")
    index = read_json(directory / "model_index.json") if (directory / "model_index.json").is_file() else {}
    named = index_scheduler_class(index)
    if named is not None:
        config["_class_name"] = named
    return config


def index_scheduler_class(index: dict[str, Any]) -> str | None:
    """The scheduler class a ``model_index.json`` names (``"scheduler": ["diffusers", CLASS]``), if any."""
    entry = index.get("scheduler")
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) and entry[1]:
        return entry[1]
    return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def single_file_config(path: Path, config: str | None, *, recorded: bool = False) -> tuple[Preset | None, Path]:
    """``--config`` as a preset, or as a diffusers directory (checked to be one). ``recorded``: read
    from a manifest, which records a directory resolved and a preset by name, whatever the working
    directory holds now."""
    if config is None:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint needs {option('--config')}: a local diffusers directory with the "
            f"same architecture, or a preset ({', '.join(PRESETS)})"
        )
    by_name = recorded and not Path(config).is_absolute()
    preset = get_preset(config) if by_name or not looks_like_a_model(Path(config)) else None
    if preset is not None:
        return preset, Path(config)
    if not Path(config).is_dir():
        raise ModelLoadError(f"{option_given('--config', config)}: not a diffusers directory or a preset "
                             f"({', '.join(PRESETS)})")
    if (Path(config) / "unet" / "model.onnx").is_file():
        raise ModelLoadError(f"{option_given('--config', config)}: an ONNX export, not the diffusers directory of a "
                             "checkpoint; give "
                             f"one with the file's architecture, or a preset ({', '.join(PRESETS)})")
    family_of_dir(Path(config))
    return None, Path(config)



PICKLED_SAFETENSORS = "a torch checkpoint by its content: name it .ckpt"
"""What a ``.safetensors`` file that holds torch.save's archive or a pickle is told."""


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names a safetensors file's header declares, once the header is read and its tensors
    cover the file exactly (a truncated copy does not: refused in one line, no weight read)."""
    from safetensors import safe_open

    try:
        with path.open("rb"):  # (safetensors reports a file it may not read as one that is not there)
            pass
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        with safe_open(str(path), framework="numpy") as handle:  # "numpy": no torch import
            return list(handle.keys())
    except Exception as exc:
        head = _head(path)
        # (a safetensors header's length may start with 0x80 too: a pickle's protocol byte follows it)
        pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        seen = PICKLED_SAFETENSORS if pickled and head[8:9] != b"{" else stand_in(head)
        raise ModelLoadError(f"{path}: not a readable safetensors file ({seen or one_line(exc)})") from exc


CHECKPOINT_STARTS = (b"PK\x03\x04", b"\x80")
"""How a ``.ckpt`` starts: torch.save's zip archive (PyTorch 1.6 and later), or the pickle of older ones."""

LFS_POINTER = b"version https://git-lfs."
"""How a Git LFS pointer file starts: what a model repository cloned without git-lfs holds in place of
each weight file (a hundred-odd bytes naming the real file's sha256)."""


def _head(path: Path) -> bytes:
    """A file's first bytes, to say what it is where a reader refused it (nothing if it cannot be read)."""
    try:
        with path.open("rb") as handle:
            return handle.read(64)
    except OSError:
        return b""


def stand_in(head: bytes) -> str | None:
    """What a file starting with ``head`` is where it stands in for weights, if that is recognisable:
    the common ways a download or a clone leaves something else under a weight file's name. Without
    this, safetensors' "header too large" was all a clone without git-lfs was told."""
    if not head:  # (safetensors said "header too small"; a .ckpt "it starts b''")
        return "empty (0 bytes): an interrupted download or copy?"
    if head.startswith(LFS_POINTER):
        return ("a Git LFS pointer, not the weights: the repository was cloned without git-lfs; run `git lfs pull` "
                "in it, or download the file itself")
    if head.lstrip()[:1] == b"<":
        return "an HTML or XML page, not the weights: a download that saved an error or sign-in page?"
    return None


UNET_BLOCKS = tuple(f"model.diffusion_model.{b}" for b in ("input_blocks.", "middle_block.", "output_blocks."))
"""How an original-layout U-Net's weights start: what a transformer denoiser under the same prefix lacks."""


def check_holds_a_unet(path: Path, keys: Iterable[str]) -> None:
    """A file without the original layout's U-Net, refused saying what it holds where that is one of
    the other files a model's users download beside it (each taken elsewhere, or converted first)."""
    keys = list(keys)
    denoiser = [k for k in keys if k.startswith("model.diffusion_model.")]
    if denoiser and not any(k.startswith(UNET_BLOCKS) for k in denoiser):
        # (Flux's double_blocks, SD3's joint_blocks: every --config was told it lacked its weights)
        raise ModelLoadError(f"{path}: a transformer (DiT) denoiser's checkpoint (no U-Net blocks under "
                             "'model.diffusion_model.': Flux, SD3 and the like), which sdexport does not export; it "
                             "supports U-Net based Stable Diffusion 1.x, 2.x and XL")
    if denoiser:
        return
    kind = weights_kind(keys)
    if kind == "lora":
        holds = "a LoRA, not a model: give it to export or run as --lora FILE"
    elif kind == "controlnet":
        holds = ("a ControlNet in the original layout, not a model: export takes a diffusers ControlNet directory as "
                 "--controlnet (diffusers' ControlNetModel.from_single_file, then save_pretrained, converts it)")
    elif kind == "vae":
        holds = (f"{DIFFUSERS_VAE} beside the model" if any(k.startswith(DIFFUSERS_VAE_KEYS) for k in keys)
                 else "a VAE alone, not a model: give it as --vae FILE beside the model")
    elif kind == "embedding":
        holds = "a textual inversion embedding, not a model: give it to export as --textual-inversion FILE"
    else:
        holds = ("not an original-layout Stable Diffusion checkpoint (for a diffusers directory, pass the "
                 "directory)")
    raise ModelLoadError(f"{path}: no 'model.diffusion_model.*' weights; {holds}")


EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g")
"""A1111's (``emb_params``; its older files ``string_to_param.*``) and SDXL's (``clip_l``, ``clip_g``)
embedding tensors."""


def weights_kind(keys: Collection[str]) -> str | None:
    """What a weight file that is no model holds, by its tensors' names: "lora", "controlnet" (the
    original layout), "vae" or "embedding" (textual inversion: A1111's and SDXL's names, or
    diffusers' ``{word: vectors}`` for a placeholder word in angle brackets, as its training script
    names them: ``<cat-toy>``); None otherwise. What each option is given is told apart by the same
    names."""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        return "lora"
    if any(k.startswith("control_model.") for k in keys):
        return "controlnet"
    if keys and all(k.startswith(VAE_KEYS) for k in keys):
        return "vae"
    if keys and (all(k in EMBEDDING_KEYS or k.startswith("string_to_param") for k in keys)
                 or (len(keys) <= 2 and all(re.fullmatch(r"<[^<>.\s]+>", k) for k in keys))):
        return "embedding"
    return None


def _safetensors_by_content(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a safetensors file: its header's length, then its
    JSON (byte 8 of torch.save's formats is never "{")."""
    return head[8:9] == b"{"


def _not_torch_save(head: bytes, noun: str) -> str | None:
    """What a file starting with ``head`` is where it should be torch.save's (``noun``: "a torch
    checkpoint", "torch weights") and starts as neither its zip archive nor a pickle; None where it
    does start as one of them."""
    if head.startswith(CHECKPOINT_STARTS):
        return None
    return stand_in(head) or (f"not {noun}: it starts {head[:4]!r}, neither torch.save's zip archive nor a pickle; "
                              "a download that saved an error page?")


def check_single_file(path: Path) -> None:
    """Catch a truncated or foreign file before diffusers does, with a message naming it."""
    if path.suffix.lower() != ".safetensors":
        try:
            with path.open("rb") as handle:
                head = handle.read(9)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from None
        if _safetensors_by_content(head):
            raise ModelLoadError(f"{path}: a safetensors file by its content: name it .safetensors")
        if seen := _not_torch_save(_head(path), "a torch checkpoint"):
            raise ModelLoadError(f"{path}: cannot read the checkpoint ({seen})")
        return
    check_holds_a_unet(path, safetensors_keys(path))

"""A T2I-Adapter beside a base model: where it comes from, and whether it fits it.

A T2I-Adapter (diffusers' ``T2IAdapter``: TencentARC's sketch, canny, depth, pose... adapters) is a
small convolutional network that turns a conditioning image into one feature map per down block of
the U-Net; the U-Net adds each inside its block (``down_intrablock_additional_residuals``). Unlike
a ControlNet it runs once per image, not once per step. It fits a base model exactly when its
features have the channels and sizes of the U-Net's blocks, in order (``intrablock_layout``). That
is checked here from the configs alone, before any weight is read, and the export traces it.

``--adapter`` takes a diffusers ``T2IAdapter`` directory (or an adapter pipeline directory with
``adapter/``), or a preset: a T2I-Adapter with the base U-Net's block channels and random weights,
for tests (``tiny-adapter``) and for trying the real architectures (``sd15-adapter``,
``sdxl-adapter``; speed does not depend on the weights).

Several ``--adapter``s are diffusers' ``MultiAdapter``: each turns its own image into features of
one layout, and the U-Net takes their sum, each times its scale. They must all fit the U-Net, so
they share its layout; any of them may read greyscale images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.errors import ModelLoadError, a_class, one_line
from sdexport.models.outline import pipeline_adapters
from sdexport.models.part_sources import PartKind, part_record, resolve_part
from sdexport.setting_names import option, option_given

if TYPE_CHECKING:
    import torch

    from sdexport.models.outline import ModelOutline

ADAPTER_CLASS = "T2IAdapter"
ADAPTER_PART = PartKind("--adapter", "T2I-Adapter", "adapter", ADAPTER_CLASS, "MultiAdapter", pipeline_adapters)
ADAPTER_SEED_OFFSET = 5
"""A preset adapter draws its weights from ``seed * SEED_STRIDE + 5`` (the i-th of several from
``+ 5 + i``): the ControlNets' slots, which no export shares with an adapter."""


@dataclass(frozen=True)
class AdapterPreset:
    name: str
    description: str
    bases: tuple[str, ...]
    """The model presets whose U-Net it is made for."""


ADAPTER_PRESETS = {
    p.name: p
    for p in (
        AdapterPreset("tiny-adapter", "a few-MB T2I-Adapter for the tiny presets (tests, the demo)",
                      ("tiny", "tiny-v", "tiny-inpaint", "tiny-lcm", "tiny-sdxl", "tiny-sdxl-inpaint", "tiny-sdxl-lcm")),
        AdapterPreset("sd15-adapter", "the SD 1.5 T2I-Adapter architecture (TencentARC's t2iadapter_*_sd15v2)",
                      ("sd15",)),
        AdapterPreset("sdxl-adapter", "the SDXL T2I-Adapter architecture (TencentARC's t2i-adapter-*-sdxl-1.0)",
                      ("sdxl",)),
    )
}


@dataclass(frozen=True)
class AdapterSource:
    """One ``--adapter`` argument, resolved: a preset, or the directory holding its config."""

    argument: str
    preset: AdapterPreset | None
    path: Path | None

    def config(self, unet_config: dict[str, Any], vae_scale_factor: int) -> dict[str, Any]:
        """Its diffusers config (a preset's is derived from the base U-Net's)."""
        if self.preset is not None:
            return preset_config(unet_config, vae_scale_factor)
        assert self.path is not None
        from sdexport.models.outline import read_json

        return read_json(self.path / "config.json")

    def record(self, seed: int) -> dict[str, Any]:
        """How the Torch backend finds it again (``model.source.adapter`` in the manifest)."""
        return part_record(self.preset.name if self.preset is not None else None, self.path, seed)


def resolve_adapter(argument: str, kind: str | None = None) -> AdapterSource:
    """``--adapter`` as a preset name or a T2I-Adapter directory (refused in one line otherwise;
    ``resolve_part``). An adapter pipeline's directory holding a ``MultiAdapter`` is refused: one
    ``--adapter`` is one adapter, and taking the first would drop the others without a word."""
    from sdexport.models.controlnet import CONTROLNET_PART, CONTROLNET_PRESETS

    return AdapterSource(argument, *resolve_part(argument, kind, ADAPTER_PART, ADAPTER_PRESETS, dict.fromkeys(
        CONTROLNET_PRESETS, (CONTROLNET_PART.flag, CONTROLNET_PART.title))))


def preset_config(unet_config: dict[str, Any], vae_scale_factor: int) -> dict[str, Any]:
    """A preset adapter's config for a U-Net: TencentARC's layouts, with the U-Net's block channels.
    SD's U-Nets add a feature at full latent size first (``full_adapter``, pixels unshuffled by the
    VAE's factor); SDXL's first block is plain and adds its feature after its downsampler
    (``full_adapter_xl``, twice the factor), and its mid block takes a fourth, as diffusers' does."""
    blocks = [int(c) for c in unet_config["block_out_channels"]]
    if unet_config.get("addition_embed_type") == "text_time":
        channels = blocks + [blocks[-1]] if len(blocks) == 3 else blocks
        kind, factor = "full_adapter_xl", 2 * vae_scale_factor
    else:
        channels, kind, factor = blocks, "full_adapter", vae_scale_factor
    return {"_class_name": ADAPTER_CLASS, "in_channels": 3, "channels": channels, "num_res_blocks": 2,
            "downscale_factor": factor, "adapter_type": kind}


def feature_layout(config: dict[str, Any], vae_scale_factor: int) -> tuple[tuple[int, int], ...]:
    """(channels, latent downscale) of each feature a T2I-Adapter returns, from its config: what
    diffusers' ``FullAdapter``, ``FullAdapterXL`` and ``LightAdapter`` build (each unshuffles the
    pixels by ``downscale_factor``, then halves them in its ``down`` blocks)."""
    channels = [int(c) for c in config.get("channels", (320, 640, 1280, 1280))]
    kind = config.get("adapter_type", "full_adapter")
    factor = int(config.get("downscale_factor", 8))
    if kind == "full_adapter":
        pixel_scales = [factor * 2 ** i for i in range(len(channels))]
    elif kind == "full_adapter_xl":  # one down block, the third
        pixel_scales = [factor * (2 if i >= 2 else 1) for i in range(len(channels))]
    elif kind == "light_adapter":  # a last down block repeats the last channels
        channels = [*channels, channels[-1]]
        pixel_scales = [factor * 2 ** i for i in range(len(channels))]
    else:
        raise ModelLoadError(f"adapter_type {kind!r}: sdexport knows full_adapter, full_adapter_xl and light_adapter")
    layout = []
    for c, scale in zip(channels, pixel_scales):
        if scale % vae_scale_factor:
            raise ModelLoadError(f"a feature at 1/{scale} of the image is not on the latents' grid "
                                 f"(the VAE's factor {vae_scale_factor})")
        layout.append((c, scale // vae_scale_factor))
    return tuple(layout)


def intrablock_layout(unet: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """(channels, latent downscale) of each place a U-Net adds an adapter feature, in the order it
    takes them (diffusers' ``UNet2DConditionModel.forward``): inside each cross-attention down block
    before its downsampler, after each plain down block and its downsampler, then in the mid block
    (which takes a feature left over only when its shape matches)."""
    blocks = [int(c) for c in unet["block_out_channels"]]
    types = list(unet.get("down_block_types") or [])
    if len(types) != len(blocks):
        raise ModelLoadError(f"inconsistent config: {len(types)} down blocks, block_out_channels {blocks}")
    layout, scale = [], 1
    for i, (channels, kind) in enumerate(zip(blocks, types)):
        last = i == len(blocks) - 1
        if kind == "CrossAttnDownBlock2D":
            layout.append((channels, scale))
            scale *= 1 if last else 2
        elif kind == "DownBlock2D":
            scale *= 1 if last else 2
            layout.append((channels, scale))
        else:
            raise ModelLoadError(f"down block {kind}: sdexport places adapter features in CrossAttnDownBlock2D "
                                 "and DownBlock2D")
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        layout.append((blocks[-1], scale))
    return tuple(layout)


def check_fits(config: dict[str, Any], unet: dict[str, Any], family: str, vae_scale_factor: int,
               what: str) -> tuple[tuple[int, int], ...]:
    """Refuse an adapter that does not fit the base model; return its feature layout. Every feature
    must land where the U-Net adds one (diffusers would fail deep in the U-Net, or, for the mid
    block, drop it silently)."""
    kind = config.get("_class_name", ADAPTER_CLASS)
    if kind in ("ControlNetModel", "ControlNetUnionModel"):  # (as check_fits of a ControlNet says the reverse)
        raise ModelLoadError(f"{what}: a ControlNet, not a T2I-Adapter: pass it as {option('--controlnet')}")
    if kind != ADAPTER_CLASS:
        raise ModelLoadError(f"{what}: {a_class(kind)}; sdexport runs diffusers {ADAPTER_CLASS}s (SD and SDXL)")
    try:
        features = feature_layout(config, vae_scale_factor)
        places = intrablock_layout(unet)
        in_channels = int(config.get("in_channels", 3))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{what}: the config lacks a usable {one_line(exc)}") from None
    except ModelLoadError as exc:
        raise ModelLoadError(f"{what}: {exc}") from None
    problems = []
    if features != places[:len(features)]:
        problems.append(f"its features (channels, latent downscale) {list(features)} do not match where the U-Net "
                        f"adds them {list(places)}: it was made for another base model")
    if in_channels not in (1, 3):
        problems.append(f"it reads {in_channels}-channel images (sdexport passes RGB or greyscale)")
    if problems:
        raise ModelLoadError(f"{what} does not fit the {family} model: {'; '.join(problems)}")
    return features


def check_adapter(source: AdapterSource, unet: dict[str, Any], family: str, base_preset: str | None,
                  vae_scale_factor: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """An ``--adapter`` of an export, from configs alone: its feature layout and image channels."""
    what = option_given("--adapter", source.argument)
    if source.preset is not None and base_preset not in source.preset.bases:
        raise ModelLoadError(f"{what}: this preset goes with the preset(s) {', '.join(source.preset.bases)}, "
                             f"not {base_preset or 'a checkpoint'}; pass a T2I-Adapter directory for this model")
    config = source.config(unet, vae_scale_factor)
    return check_fits(config, unet, family, vae_scale_factor, what), int(config.get("in_channels", 3))


def check_alone(controlnets: int) -> None:
    """An adapter goes without ControlNets: diffusers has no pipeline that runs both."""
    if controlnets:
        raise ModelLoadError(f"{option('--adapter')} with ControlNets: diffusers has no pipeline that runs both; use one kind")


def adapters_for(outline: ModelOutline, arguments: list[str], controlnets: int) -> list[AdapterSource]:
    """``--adapter``s resolved and checked to fit the model ``outline`` describes, and each other
    (empty without)."""
    if not arguments:
        return []
    check_alone(controlnets)
    check_count(len(arguments))
    sources = [resolve_adapter(a) for a in arguments]
    check_together(sources, outline.unet_config or {}, outline.family, outline.preset, outline.vae_scale_factor)
    return sources


def check_count(count: int) -> None:
    from sdexport.specs import MAX_ADAPTERS

    if count > MAX_ADAPTERS:
        raise ModelLoadError(f"{count} {option('--adapter')}: sdexport runs at most {MAX_ADAPTERS} T2I-Adapters at once")


def check_together(sources: list[AdapterSource], unet: dict[str, Any], family: str, base_preset: str | None,
                   vae_scale_factor: int) -> None:
    """Each adapter fits the base model (``check_adapter``), and they fit each other: several
    adapters' features add up feature by feature (diffusers' ``MultiAdapter``), so they must come in
    the same number, channels and sizes (each fitting the U-Net leaves only the count open)."""
    from sdexport.models.outline import check_takes_networks

    if sources:
        check_takes_networks(family, option("--adapter"))
    layouts = [check_adapter(s, unet, family, base_preset, vae_scale_factor)[0] for s in sources]
    for source, layout in zip(sources[1:], layouts[1:]):
        if layout != layouts[0]:
            raise ModelLoadError(f"{option_given('--adapter', source.argument)}: its features {list(layout)} differ "
                                 f"from {option('--adapter')} {sources[0].argument}'s {list(layouts[0])}; diffusers' MultiAdapter adds them "
                                 "feature by feature")


def load_adapter(source: AdapterSource, unet: torch.nn.Module, vae_scale_factor: int, *, seed: int,
                 dtype: torch.dtype, index: int = 0) -> torch.nn.Module:
    """The T2IAdapter module: a directory's weights (every one of them), or a preset's, drawn from
    ``seed`` (component offset ``ADAPTER_SEED_OFFSET + index``) at PyTorch's default initialisation."""
    import torch
    from diffusers import T2IAdapter

    from sdexport.models.presets import SEED_STRIDE, drawing_from

    if source.preset is not None:
        unet_config: dict[str, Any] = dict(unet.config)  # type: ignore[arg-type]  # a diffusers FrozenDict
        config = {k: v for k, v in preset_config(unet_config, vae_scale_factor).items() if not k.startswith("_")}
        with drawing_from(seed * SEED_STRIDE + ADAPTER_SEED_OFFSET + index):
            module: Any = T2IAdapter(**config)
        if dtype != torch.float32:  # diffusers warns on every .to of a T2IAdapter
            module = module.to(dtype)
        return module.eval().requires_grad_(False)  # type: ignore[no-any-return]
    from sdexport.models.loader import load_subfolder, with_all_weights

    assert source.path is not None
    module = load_subfolder(source.path.parent, source.path.name, lambda p: with_all_weights(p, T2IAdapter, dtype))
    return module.eval().requires_grad_(False)  # type: ignore[no-any-return]

"""ControlNets beside a base model: where they come from, and whether they fit it.

A ControlNet is a copy of the U-Net's encoder that reads a conditioning image (edges, depth, pose)
and returns one residual per skip connection of the U-Net's down path plus one for its mid block;
the U-Net adds them. So a ControlNet fits a base model exactly when its residuals have the U-Net's
channels and sizes (``residual_layout``), it attends to the same text width and takes the same
latents. That is checked here from the configs alone, before any weight is read (``sdexport export
--controlnet`` refuses a misfit in well under a second), and again on the loaded modules.

``--controlnet`` takes a diffusers ``ControlNetModel`` directory (or a pipeline directory with
``controlnet/``), or a preset: a ControlNet with the base U-Net's architecture and random weights,
for tests (``tiny-controlnet``) and benchmarks (``sd15-controlnet``; speed does not depend on the
weights). diffusers zero-initialises a new ControlNet's output convolutions (training starts from
"no effect"); the presets draw those at random too, and their image encoder at a gain that keeps
the image's signal (``IMAGE_ENCODER_GAIN``), so that a ControlNet that is ignored, or fed the wrong
image, changes the result and a test notices.

A union ControlNet (diffusers' ``ControlNetUnionModel``: xinsir's controlnet-union-sdxl-1.0 and its
ProMax) is one ControlNet for many kinds of control image: each image comes with its control mode
(0 openpose, 1 depth, 2 thick lines, 3 thin lines, ...: the model card's table). diffusers runs it
with SDXL only. It takes ``K`` images per call (``--union-images``, default 1), or one each where
several union ControlNets run together (diffusers' ``MultiControlNetUnionModel``). Presets:
``tiny-union`` and ``sdxl-union`` (the ProMax architecture, 8 modes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.errors import ModelLoadError, a_class, one_line
from sdexport.models.outline import halvings, pipeline_controlnets
from sdexport.models.part_sources import PartKind, part_record, resolve_part
from sdexport.setting_names import option, option_given

if TYPE_CHECKING:
    import torch

    from sdexport.models.outline import ModelOutline

CONTROLNET_CLASS = "ControlNetModel"
UNION_CLASS = "ControlNetUnionModel"
CONTROLNET_PART = PartKind("--controlnet", "ControlNet", "controlnet", CONTROLNET_CLASS, "MultiControlNetModel",
                           pipeline_controlnets, from_single_file=True)


@dataclass(frozen=True)
class ControlNetPreset:
    name: str
    description: str
    bases: tuple[str, ...]
    """The model presets whose U-Net it is made from."""
    conditioning_channels: tuple[int, ...]
    """``conditioning_embedding_out_channels``: the small encoder from pixels to latent size, which
    halves the image between each two of them (three times for the VAEs' factor 8)."""
    union_modes: int = 0
    """A union ControlNet's ``num_control_type`` (0: a plain ControlNet)."""


CONTROLNET_PRESETS = {
    p.name: p
    for p in (
        ControlNetPreset("tiny-controlnet", "a few-MB ControlNet for the tiny presets (tests, the demo)",
                         ("tiny", "tiny-v", "tiny-inpaint", "tiny-lcm", "tiny-sdxl", "tiny-sdxl-inpaint", "tiny-sdxl-lcm"),
                         (8, 16, 16, 32)),
        ControlNetPreset("sd15-controlnet", "the SD 1.5 ControlNet architecture (lllyasviel's sd-controlnet-*)",
                         ("sd15",), (16, 32, 96, 256)),
        ControlNetPreset("tiny-union", "a few-MB union ControlNet for tiny-sdxl (tests)",
                         ("tiny-sdxl",), (8, 16, 16, 32), union_modes=8),
        ControlNetPreset("sdxl-union", "the SDXL union ControlNet architecture (xinsir's controlnet-union-sdxl-1.0 "
                         "ProMax, 8 control modes)", ("sdxl",), (16, 32, 96, 256), union_modes=8),
    )
}

_FROM_UNET = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads",
)
"""The U-Net config entries a ControlNet made from it copies (as ``ControlNetModel.from_unet``)."""


@dataclass(frozen=True)
class ControlNetSource:
    """One ``--controlnet`` argument, resolved: a preset, or the directory holding its config."""

    argument: str
    preset: ControlNetPreset | None
    path: Path | None

    def config(self, unet_config: dict[str, Any]) -> dict[str, Any]:
        """Its diffusers config (a preset's is derived from the base U-Net's)."""
        if self.preset is not None:
            return preset_config(self.preset, unet_config)
        assert self.path is not None
        from sdexport.models.outline import read_json

        return read_json(self.path / "config.json")

    def record(self, seed: int) -> dict[str, Any]:
        """How the Torch backend finds it again (``model.source.controlnets`` in the manifest)."""
        return part_record(self.preset.name if self.preset is not None else None, self.path, seed)


def resolve_controlnet(argument: str, kind: str | None = None) -> ControlNetSource:
    """``--controlnet`` as a preset name or a ControlNet directory (refused in one line otherwise;
    ``resolve_part``). A pipeline directory holding several (diffusers' ``MultiControlNetModel``)
    is refused with the flags that name each, as a ``MultiAdapter`` is."""
    from sdexport.models.adapter import ADAPTER_PART, ADAPTER_PRESETS

    preset, path = resolve_part(argument, kind, CONTROLNET_PART, CONTROLNET_PRESETS,
                                dict.fromkeys(ADAPTER_PRESETS, (ADAPTER_PART.flag, ADAPTER_PART.title)))
    return ControlNetSource(argument, preset, path)


def preset_config(preset: ControlNetPreset, unet_config: dict[str, Any]) -> dict[str, Any]:
    """A preset ControlNet's config from the base U-Net's. It reads the latents alone, also beside an
    inpainting U-Net (whose ``in_channels`` add the mask and the masked image's latents)."""
    config = {k: v for k, v in unet_config.items() if k in _FROM_UNET}
    config["in_channels"] = unet_config.get("out_channels", 4)  # diffusers' default, as check_fits reads it
    config["conditioning_embedding_out_channels"] = list(preset.conditioning_channels)
    if not preset.union_modes:
        return {"_class_name": CONTROLNET_CLASS, **config}
    width = int(config["block_out_channels"][0])  # the image features' width, which the modes' tokens share
    return {"_class_name": UNION_CLASS, **config, "num_control_type": preset.union_modes,
            "num_trans_channel": width, "num_proj_channel": width, "num_trans_head": 8, "num_trans_layer": 1}


def union_modes(config: dict[str, Any]) -> int:
    """A union ControlNet's number of control modes (``num_control_type``); 0 for any other. A loaded
    module's config has no ``_class_name``: there only union ControlNets have ``num_control_type``."""
    if config.get("_class_name", UNION_CLASS if "num_control_type" in config else None) != UNION_CLASS:
        return 0
    return int(config.get("num_control_type", 6))  # diffusers' default


def residual_layout(config: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """(channels, latent downscale) of each skip connection of a U-Net's (or ControlNet's) down path,
    in diffusers' order, then of its mid block: the input convolution's, each down block's layers',
    and each downsampler's (all blocks but the last)."""
    blocks = [int(c) for c in config["block_out_channels"]]
    count = len(config.get("down_block_types") or blocks)
    layers = config.get("layers_per_block", 2)
    per_block = [int(layers)] * count if isinstance(layers, int) else [int(n) for n in layers]
    if count != len(blocks) or len(per_block) != count:
        raise ModelLoadError(f"inconsistent config: {count} down blocks, block_out_channels {blocks}, "
                             f"layers_per_block {layers}")
    layout, scale = [(blocks[0], 1)], 1
    for i, channels in enumerate(blocks):
        layout += [(channels, scale)] * per_block[i]
        if i < count - 1:
            scale *= 2
            layout.append((channels, scale))
    layout.append((blocks[-1], scale))
    return tuple(layout)


def pools(config: dict[str, Any]) -> bool:
    """Whether a ControlNet averages its residuals over the image (``global_pool_conditions``: the
    shuffle ControlNets). diffusers' pipelines turn guess mode on when the first ControlNet pools."""
    return bool(config.get("global_pool_conditions"))


def pooled_sides(config: dict[str, Any]) -> tuple[int, ...]:
    """A pooling ControlNet's latent downscale per residual (what its 1x1 outputs are expanded back
    to); empty for one that does not pool."""
    return tuple(scale for _, scale in residual_layout(config)) if pools(config) else ()


def check_fits(config: dict[str, Any], unet: dict[str, Any], family: str, vae_scale_factor: int,
               what: str) -> tuple[tuple[int, int], ...]:
    """Refuse a ControlNet that does not fit the base model; return the residual layout it shares
    with the U-Net. Its image encoder must also bring pixels down to latent size (the VAE's factor)."""
    kind = config.get("_class_name", CONTROLNET_CLASS)
    if kind == "T2IAdapter":
        raise ModelLoadError(f"{what}: a T2I-Adapter, not a ControlNet: pass it as {option('--adapter')}")
    if kind not in (CONTROLNET_CLASS, UNION_CLASS):
        raise ModelLoadError(f"{what}: {a_class(kind)}; sdexport runs diffusers {CONTROLNET_CLASS}s (SD 1.x/2.x and SDXL) "
                             f"and {UNION_CLASS}s (SDXL)")
    if kind == UNION_CLASS and family != "sdxl":
        raise ModelLoadError(f"{what}: a union ControlNet, which diffusers runs with SDXL models only, not {family}")
    try:
        layout = residual_layout(config)
        problems = []
        if layout != residual_layout(unet):
            problems.append("its residuals do not match the U-Net's down blocks (block_out_channels, "
                            "layers_per_block): it was made for another base model")
        for key, default in (("cross_attention_dim", 1280), ("in_channels", 4)):
            theirs = unet.get("out_channels", 4) if key == "in_channels" else unet.get(key, default)
            if config.get(key, default) != theirs:
                problems.append(f"{key} {config.get(key, default)} where the base model has {theirs}")
        sdxl_net = config.get("addition_embed_type") == "text_time"
        if sdxl_net != (family == "sdxl"):
            problems.append(f"an {'SDXL' if sdxl_net else 'SD 1.x/2.x'} ControlNet for an {family} model")
        elif sdxl_net and config.get("projection_class_embeddings_input_dim") != unet.get("projection_class_embeddings_input_dim"):
            problems.append("projection_class_embeddings_input_dim differs from the U-Net's")
        embedding = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        if halvings(embedding) != vae_scale_factor:
            problems.append(f"its image encoder shrinks images {halvings(embedding)}x, the VAE "
                            f"{vae_scale_factor}x (conditioning_embedding_out_channels {list(embedding)})")
        if config.get("conditioning_channels", 3) != 3:
            problems.append(f"it reads {config.get('conditioning_channels')}-channel images (sdexport passes RGB)")
        if kind == UNION_CLASS and int(config.get("num_trans_channel", 320)) != int(layout[0][0]):
            problems.append(f"num_trans_channel {config.get('num_trans_channel', 320)} is not its first block's "
                            f"{layout[0][0]} channels")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{what}: the config lacks a usable {one_line(exc)}") from None
    if problems:
        raise ModelLoadError(f"{what} does not fit the model: {'; '.join(problems)}")
    return layout


def check_controlnets(sources: list[ControlNetSource], unet: dict[str, Any], family: str, base_preset: str | None,
                      vae_scale_factor: int, union_images: int = 1) -> tuple[tuple[int, int], ...]:
    """Every ``--controlnet`` of an export, from configs alone: the residual layout they share. An
    inpainting U-Net takes them too: its ControlNets read the latents alone (``in_channels`` is the
    U-Net's ``out_channels``), the mask and masked image go to the U-Net only, as in diffusers'
    ``StableDiffusionControlNetInpaintPipeline``.

    Union ControlNets go alone or together, never beside plain ones or an inpainting U-Net, and
    together they take one image each and know the same modes (diffusers has pipelines for nothing
    else); ``union_images`` is how many images one takes per call (``--union-images``)."""
    from sdexport.specs import MAX_CONTROLNETS, MAX_UNION_IMAGES

    if not sources:
        if union_images != 1:
            raise ModelLoadError("--union-images is for a union ControlNet (--controlnet); this export has none")
        return ()
    from sdexport.models.outline import check_takes_networks

    check_takes_networks(family, option("--controlnet"))
    if len(sources) > MAX_CONTROLNETS:
        raise ModelLoadError(f"{len(sources)} ControlNets: sdexport exports at most {MAX_CONTROLNETS}")
    layout: tuple[tuple[int, int], ...] = ()
    modes = []
    for source in sources:
        what = option_given("--controlnet", source.argument)
        if source.preset is not None and base_preset not in source.preset.bases:
            raise ModelLoadError(f"{what}: this preset goes with the preset(s) {', '.join(source.preset.bases)}, "
                                 f"not {base_preset or 'a checkpoint'}; pass a ControlNet directory for this model")
        config = source.config(unet)
        layout = check_fits(config, unet, family, vae_scale_factor, what)
        modes.append(union_modes(config))
    if any(modes) and not all(modes):
        raise ModelLoadError("union and plain ControlNets together: diffusers has no pipeline for that; export "
                             "union ControlNets alone or together")
    if any(modes) and int(unet.get("in_channels", 4)) != int(unet.get("out_channels", 4)):
        raise ModelLoadError(f"a union ControlNet beside an inpainting U-Net ({unet.get('in_channels')} input "
                             "channels): diffusers' union inpainting pipeline takes a standard U-Net only, which "
                             "blends the kept region back; export the base model")
    if len(set(modes)) > 1:
        raise ModelLoadError(f"union ControlNets with {' and '.join(map(str, sorted(set(modes))))} control modes "
                             "together: export ones that know the same modes")
    if union_images != 1 and not any(modes):
        raise ModelLoadError("--union-images is for a union ControlNet; these ControlNets take one image each")
    if not 1 <= union_images <= min(MAX_UNION_IMAGES, modes[0] or 1):
        raise ModelLoadError(f"--union-images {union_images}: a union ControlNet takes 1 to "
                             f"{min(MAX_UNION_IMAGES, modes[0])} images (one per control mode)")
    if union_images > 1 and len(sources) > 1:
        raise ModelLoadError(f"--union-images {union_images} with {len(sources)} union ControlNets: together they "
                             "take one image each (as diffusers' MultiControlNetUnionModel)")
    return layout


def controlnets_for(outline: ModelOutline, arguments: list[str], union_images: int = 1) -> list[ControlNetSource]:
    """``--controlnet`` arguments resolved and checked to fit the model ``outline`` describes."""
    sources = [resolve_controlnet(a) for a in arguments]
    check_controlnets(sources, outline.unet_config or {}, outline.family, outline.preset, outline.vae_scale_factor,
                      union_images)
    return sources


IMAGE_ENCODER_GAIN = 1.7
"""A preset ControlNet's image encoder (``controlnet_cond_embedding``: eight convolutions with SiLU
between them) draws its weights with std ``gain / sqrt(fan_in)``. At PyTorch's default the image
all but vanished on the way: two random control images moved its output by 4e-5 (std), so no test
could tell one control image from another. At 1.7 they move it by 0.36 (tiny-controlnet) and 0.34
(sd15-controlnet, 512²), the size of the features it is added to (the ControlNet's first
convolution of normal latents: 0.51 and 0.58). Measured on the presets (seed 0) with two uniform
random images, 2026-12-02, diffusers 0.42."""


def load_controlnet(source: ControlNetSource, unet: torch.nn.Module, *, seed: int, index: int,
                    dtype: torch.dtype) -> torch.nn.Module:
    """The ControlNet module: a directory's weights (every one of them), or a preset's, drawn from
    ``seed`` as the base preset's are (component offset 5 + index)."""
    import torch
    from diffusers import ControlNetModel, ControlNetUnionModel

    from sdexport.models.presets import SEED_STRIDE, drawing_from

    if source.preset is not None:
        unet_config: dict[str, Any] = dict(unet.config)  # type: ignore[arg-type]  # a diffusers FrozenDict
        config = {k: v for k, v in preset_config(source.preset, unet_config).items() if not k.startswith("_")}
        with drawing_from(seed * SEED_STRIDE + 5 + index):  # (the re-drawn layers below draw from it too)
            module = (ControlNetUnionModel if source.preset.union_modes else ControlNetModel).from_config(config)
            zeroed = [*module.controlnet_down_blocks, module.controlnet_mid_block,
                      module.controlnet_cond_embedding.conv_out]
            if source.preset.union_modes:
                zeroed.append(module.spatial_ch_projs)  # how the modes' tokens reach the image features
            for layer in zeroed:
                layer.reset_parameters()  # diffusers starts them at zero: see the module docstring
            for conv in module.controlnet_cond_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    fan_in = conv.weight[0].numel()
                    torch.nn.init.normal_(conv.weight, std=IMAGE_ENCODER_GAIN / fan_in ** 0.5)
        return module.to(dtype).eval().requires_grad_(False)  # type: ignore[no-any-return]
    from sdexport.models.loader import load_subfolder, with_all_weights

    assert source.path is not None
    from sdexport.models.outline import read_json

    kind = ControlNetUnionModel if union_modes(read_json(source.path / "config.json")) else ControlNetModel
    module = load_subfolder(source.path.parent, source.path.name, lambda p: with_all_weights(p, kind, dtype))
    return module.eval().requires_grad_(False)  # type: ignore[no-any-return]

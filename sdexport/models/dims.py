"""A model's static sizes (``ModelDims``) and pipeline options, from its parts' configs alone.

Apart from the loader because ``adopt`` and the one-line refusals need them before anything heavy
loads: nothing here imports torch, transformers or diffusers.
"""

from __future__ import annotations

from typing import Any

from sdexport.errors import ModelLoadError
from sdexport.models.outline import halvings, unet_extra_channels
from sdexport.specs import (
    FAMILY_LABELS,
    SDXL_REFINER,
    ModelDims,
    adapters_among,
    controlnet_index,
    is_sdxl,
)

SDXL_TIME_IDS = {"sdxl": 6, SDXL_REFINER: 5}
"""original size (h, w), crop top-left (y, x), target size (h, w); the refiner's aesthetic score in
the target size's place."""
PIPELINE_OPTIONS = {"sdxl": {"force_zeros_for_empty_prompt": True},
                    SDXL_REFINER: {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": True}}
"""Per family: model_index.json options the runtime honours, with diffusers' defaults (the refiner's
flag is what made it the refiner: kept so that its saved ``model_index.json`` says so too)."""

def model_dims(family: str, configs: dict[str, Any], lengths: dict[str, int], label: str,
               union_images: int = 1) -> ModelDims:
    """A model's static sizes from its parts' configs (objects with attributes: diffusers' and
    transformers' configs, or ``SimpleNamespace``s of their JSON) and its tokenizers' lengths.
    SDXL's are cross-checked, since a mismatch only shows deep in a graph. With ControlNets among
    the parts, the residuals they pass the U-Net (``ModelDims.residuals``), and where they are union
    ones, their modes and the ``union_images`` each takes (``N``, ``K``); with T2I-Adapters, the
    features they pass the U-Net and their images' channels (``adapter_features``, ``A``, and each
    one's ``adapter_channels`` where there are several); for a latent consistency model, the size of
    the guidance embedding its U-Net takes (``G``).

    SD: E is the text encoder's width, P its pooled (un-projected) width. SDXL: the U-Net attends to
    both encoders' penultimate hidden states side by side (E = E1 + E2) and takes the second
    encoder's projected pooled embedding (P = its projection_dim) plus T = 6 time ids, each
    embedded in addition_time_embed_dim features; L1 and L2 count the encoders' layers. The refiner
    (``SDXL_REFINER``) has the second encoder alone (E = E2; E1 and L1 are 0) and T = 5.
    """
    unet, vae = configs["unet"], configs["vae"]
    te = configs.get("text_encoder")  # (None: the refiner's)
    sequence = lengths["tokenizer_2" if family == SDXL_REFINER else "tokenizer"]
    residuals: tuple[tuple[int, int], ...] = ()
    union: dict[str, int] = {}
    nets = [config for name, config in configs.items() if controlnet_index(name) is not None]
    if nets:
        from sdexport.models.controlnet import residual_layout, union_modes

        residuals = residual_layout(dict(unet) if hasattr(unet, "keys") else vars(unet))
        modes = union_modes(dict(nets[0]) if hasattr(nets[0], "keys") else vars(nets[0]))
        union = {"N": modes, "K": union_images} if modes else {}
    vae_scale_factor = halvings(vae.block_out_channels)
    adapter: dict[str, Any] = {}
    adapters = [dict(c) if hasattr(c, "keys") else vars(c) for c in (configs[n] for n in adapters_among(configs))]
    if adapters:
        from sdexport.models.adapter import feature_layout

        channels = [int(c.get("in_channels", 3)) for c in adapters]
        adapter = {"adapter_features": feature_layout(adapters[0], vae_scale_factor), "A": channels[0],
                   **({"adapter_channels": tuple(channels)} if len(channels) > 1 else {})}
    common = {
        "residuals": residuals,
        **union,
        **adapter,
        "S": sequence,
        "E": int(unet.cross_attention_dim),
        "C": int(unet.out_channels),
        "U": unet_extra_channels(int(unet.in_channels), int(unet.out_channels), label),
        "vae_scale_factor": vae_scale_factor,
        "unet_downsample": halvings(unet.down_block_types),
        "G": int(getattr(unet, "time_cond_proj_dim", None) or 0),  # a latent consistency model's
    }
    if 0 < common["G"] < 4:  # sines and cosines over G // 2 frequencies, from 1 to 1/10000
        raise ModelLoadError(f"{label}: unet time_cond_proj_dim {common['G']} is too small for a guidance "
                             "embedding (at least 4)")
    if not is_sdxl(family):
        width = int(configs["text_encoder"].hidden_size)
        if width != common["E"]:  # (a graph of another width exported, and run refused the directory)
            raise ModelLoadError(f"{label}: inconsistent {FAMILY_LABELS[family]} configs: text encoder width {width} "
                                 f"!= unet cross_attention_dim {common['E']}")
        return ModelDims(P=width, **common)
    te2 = configs["text_encoder_2"]
    e1, e2, pooled = int(te.hidden_size) if te else 0, int(te2.hidden_size), int(te2.projection_dim)
    time_ids = SDXL_TIME_IDS[family]
    time_dim = int(getattr(unet, "addition_time_embed_dim", None) or 0)
    extra = int(getattr(unet, "projection_class_embeddings_input_dim", None) or 0) - pooled
    problems: list[str] = []
    if getattr(unet, "addition_embed_type", None) != "text_time":
        problems.append(f"unet addition_embed_type is {getattr(unet, 'addition_embed_type', None)!r}, not 'text_time'")
    if e1 + e2 != common["E"]:
        widths = f"text encoder widths {e1} + {e2}" if te else f"text_encoder_2 width {e2} (the refiner's only one)"
        problems.append(f"{widths} != unet cross_attention_dim {common['E']}")
    if not time_dim or extra != time_ids * time_dim:
        problems.append(
            f"unet projection_class_embeddings_input_dim {getattr(unet, 'projection_class_embeddings_input_dim', None)} "
            f"!= {time_ids} time ids x addition_time_embed_dim {time_dim} + pooled {pooled}"
            + (" (the refiner's: size, crop and an aesthetic score)" if family == SDXL_REFINER else "")
        )
    length_2 = lengths["tokenizer_2"]
    if length_2 != sequence:
        problems.append(f"tokenizer_2 length {length_2} != tokenizer length {sequence}")
    if problems:
        raise ModelLoadError(f"{label}: inconsistent {FAMILY_LABELS[family]} configs: {'; '.join(problems)}")
    return ModelDims(P=pooled, E1=e1, E2=e2, T=time_ids, L1=int(te.num_hidden_layers) if te else 0,
                     L2=int(te2.num_hidden_layers), **common)


def pipeline_config(family: str, index: dict[str, Any]) -> dict[str, Any]:
    """The family's pipeline options, from model_index.json or diffusers' defaults."""
    return {k: index.get(k, default) for k, default in PIPELINE_OPTIONS.get(family, {}).items()}

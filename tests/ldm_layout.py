"""Write a model as an original-layout (LDM / CompVis) Stable Diffusion single-file checkpoint.

Why: no real checkpoint can be downloaded here, yet the single-file loading path (``load_model(path,
config=...)`` → ``from_single_file``) must be tested. This is the inverse of diffusers' converters
(``diffusers/loaders/single_file_utils.py``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), derived from the model's config, so
any block count / ``layers_per_block`` works. Keys are SD 1.x style: ``model.diffusion_model.*``,
``first_stage_model.*`` and ``cond_stage_model.transformer.text_model.*`` (CLIP, not OpenCLIP).

SDXL (a model with ``text_encoder_2``) is written as Stability's ``sd_xl_base_1.0.safetensors`` is: the
same U-Net and VAE names plus ``label_emb.0.{0,2}`` for the text/time embedding, the CLIP ViT-L encoder
under ``conditioner.embedders.0.transformer.text_model.*`` and the second encoder in OpenCLIP's layout
under ``conditioner.embedders.1.model.*`` (fused ``attn.in_proj_*``, ``resblocks``, a transposed
``text_projection``): the inverse of diffusers' ``convert_open_clip_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sdexport.models import LoadedModel

# A table maps a diffusers module prefix to (LDM prefix, renames of the first names after the prefix).
Table = dict[str, tuple[str, dict[str, str]]]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def write_single_file_checkpoint(model: LoadedModel, path: Path) -> None:
    """Write model's unet, vae and text_encoder as ONE .safetensors file in the original SD layout."""
    from safetensors.torch import save_file

    modules = model.modules
    if set(modules) - {"unet", "vae", "text_encoder", "text_encoder_2"}:
        raise ValueError(f"only SD 1.x/2.x and SDXL layouts are written, not {sorted(modules)}")
    state = ldm_state_dict(
        modules["unet"], modules["vae"], modules.get("text_encoder"), text_encoder_2=modules.get("text_encoder_2")
    )
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))


def ldm_state_dict(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    *,
    text_encoder_2: torch.nn.Module | None = None,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """The modules' weights under LDM names (works on meta tensors too: nothing is computed).

    ``position_ids`` adds ``...embeddings.position_ids`` as real SD 1.x checkpoints carry it (int64 arange);
    transformers keeps it as a non-persistent buffer, so diffusers ignores it when loading.
    With ``text_encoder_2`` the layout is SDXL's (see the module docstring); with it alone (no
    ``text_encoder``) the SDXL refiner's, whose only embedder is the OpenCLIP one.
    """
    text_prefix = "conditioner.embedders.0.transformer." if text_encoder_2 is not None else "cond_stage_model.transformer."
    out: dict[str, torch.Tensor] = {}
    out |= _renamed(unet.state_dict(), _unet_table(unet), "model.diffusion_model.")
    for key, value in _renamed(vae.state_dict(), _vae_table(vae), "first_stage_model.").items():
        is_attention_matrix = ".attn_1." in key and key.endswith(".weight") and value.ndim == 2
        out[key] = value.reshape(*value.shape, 1, 1) if is_attention_matrix else value  # Linear → 1x1 conv
    if text_encoder is None:
        assert text_encoder_2 is not None, "a model without a text encoder"
        return out | open_clip_state_dict(text_encoder_2, "conditioner.embedders.0.model.")
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); LDM keys keep it.
        key = key if key.startswith("text_model.") else "text_model." + key
        out[text_prefix + key] = value
    if position_ids:
        config: Any = text_encoder.config
        positions = torch.arange(config.max_position_embeddings).unsqueeze(0)
        out[text_prefix + "text_model.embeddings.position_ids"] = positions
    if text_encoder_2 is not None:
        out |= open_clip_state_dict(text_encoder_2, "conditioner.embedders.1.model.")
    return out


_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_state_dict(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection under OpenCLIP's names (as SDXL's ViT-bigG/14)."""
    state = dict(text_encoder.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, name in _OPEN_CLIP_TOP.items():
        out[prefix + name] = state.pop(key)
    out[prefix + "text_projection"] = state.pop("text_projection.weight").T  # OpenCLIP: x @ proj
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for n in sorted(layers):
        ours, theirs = f"text_model.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):  # q, k, v fused into one projection
            parts = [state.pop(f"{ours}self_attn.{x}_proj.{kind}") for x in "qkv"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            for old, new in _OPEN_CLIP_LAYER.items():
                out[f"{theirs}{new}.{kind}"] = state.pop(f"{ours}{old}.{kind}")
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # CLIP's ln(100); real checkpoints carry it, unused
    state.pop("text_model.embeddings.position_ids", None)
    if state:
        raise ValueError(f"no OpenCLIP name for {len(state)} weights, e.g. {sorted(state)[:5]}")
    return out


def _unet_table(unet: Any) -> Table:  # a diffusers UNet2DConditionModel
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise TypeError(f"per-block layers_per_block {layers} has no LDM layout diffusers can read back")
    table: Table = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        # The mid block interleaves resnet, attention, resnet.
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
        # SDXL's text/time embedding (addition_embed_type "text_time"); absent in SD 1.x/2.x.
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
    }
    # input_blocks.0 is conv_in; each down block then takes layers_per_block (resnet[, attention]) slots
    # and one more for its downsampler (the last block has none but its slot numbering stays the same).
    for b in range(len(unet.down_blocks)):
        first = 1 + b * (layers + 1)
        for j in range(layers):
            table[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{first + j}.0", _UNET_RESNET)
            table[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{first + j}.1", {})
        table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{first + layers}.0.op", {})
    # Each up block has layers_per_block + 1 slots; the upsampler joins the last slot after the attention.
    for b, block in enumerate(unet.up_blocks):
        first = b * (layers + 1)
        for j in range(layers + 1):
            table[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{first + j}.0", _UNET_RESNET)
            table[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{first + j}.1", {})
        upsampler_index = 2 if hasattr(block, "attentions") else 1
        table[f"up_blocks.{b}.upsamplers.0.conv"] = (
            f"output_blocks.{first + layers}.{upsampler_index}.conv",
            {},
        )
    return table


def _vae_table(vae: Any) -> Table:  # a diffusers AutoencoderKL
    table: Table = {
        name: (name, {})
        for name in (
            "quant_conv",
            "post_quant_conv",
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
        )
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
        for r in range(2):
            table[f"{part}.mid_block.resnets.{r}"] = (f"{part}.mid.block_{r + 1}", _VAE_RESNET)
    for b, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            table[f"encoder.down_blocks.{b}.resnets.{j}"] = (f"encoder.down.{b}.block.{j}", _VAE_RESNET)
        table[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = (f"encoder.down.{b}.downsample.conv", {})
    # The LDM decoder numbers its levels by resolution (up.0 is the last, full-resolution one).
    levels = len(vae.decoder.up_blocks)
    for b, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - b
        for j in range(len(block.resnets)):
            table[f"decoder.up_blocks.{b}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        table[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return table


def _renamed(state: dict[str, torch.Tensor], table: Table, prefix: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching table prefix; fail on any key the table does not cover."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        parts = key.split(".")
        match = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in table), None)
        if match is None:
            unmapped.append(key)
            continue
        ldm, renames = table[".".join(parts[:match])]
        rest = ".".join(parts[match:])
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        new_key = f"{prefix}{ldm}.{rest}"
        if new_key in out:
            raise ValueError(f"two weights map to {new_key}")
        out[new_key] = value
    if unmapped:
        raise ValueError(f"no LDM name for {len(unmapped)} weights, e.g. {unmapped[:5]}")
    return out

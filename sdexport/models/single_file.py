"""Original-layout single-file checkpoints (``.safetensors``/``.ckpt``) → PyTorch modules, with no weight lost.

diffusers' ``from_single_file`` loads such files but does not refuse a checkpoint that lacks weights:
depending on whether accelerate is installed and on the transformers version, a missing weight is
left on the meta device or silently keeps its random initial value, and the export would then
carry random weights labelled "trained". So the weights are loaded here, component by component,
with diffusers' own key converters (the part that is hard to get right and that diffusers keeps
current), and every component's converted keys are compared with the module's own state-dict keys
before anything is loaded into it. Modules are built on the meta device and take the checkpoint's
tensors as they are, so no random initialisation is computed and no second copy of the weights made
(for the U-Net and VAE: the CLIP text encoders rebuild a buffer at construction, so they are built
for real and loaded by copy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdexport.errors import ModelLoadError, one_line

TextConverter = Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]

_HARMLESS_EXTRA = ("position_ids",)
"""Keys old checkpoints carry that current modules rebuild themselves (CLIP's position ids)."""


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint (a nested ``state_dict`` unwrapped), on the CPU."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors of every kind
        raise ModelLoadError(f"{path}: cannot read the checkpoint ({one_line(exc)})") from exc
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelLoadError(f"{path}: the checkpoint holds no tensors")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def load_components(
    path: Path, checkpoint: dict[str, torch.Tensor], config_dir: Path, family: str, dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """The family's modules (``unet``, ``vae``, ``text_encoder`` and, for SDXL, ``text_encoder_2``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def diffusers_part(cls: Any, convert: Any) -> Callable[[str], torch.nn.Module]:
        def load(name: str) -> torch.nn.Module:
            config = cls.load_config(str(config_dir / name))
            return _load_part(path, name, lambda: cls.from_config(config),
                              lambda m: convert(checkpoint, m.config), dtype)
        return load

    def text_part(cls: Any, convert: TextConverter) -> Callable[[str], torch.nn.Module]:
        def load(name: str) -> torch.nn.Module:
            config = cls.config_class.from_pretrained(str(config_dir / name))
            return _load_part(path, name, lambda: cls(config), lambda m: _flatten(m, convert(m, checkpoint)), dtype)
        return load

    loaders = {
        "unet": diffusers_part(UNet2DConditionModel, convert_ldm_unet_checkpoint),
        "vae": diffusers_part(AutoencoderKL, convert_ldm_vae_checkpoint),
    }
    if family == "sdxl":
        loaders["text_encoder"] = text_part(CLIPTextModel, _clip("conditioner.embedders.0.transformer."))
        loaders["text_encoder_2"] = text_part(
            CLIPTextModelWithProjection, _open_clip("conditioner.embedders.1.model.")
        )
    else:
        loaders["text_encoder"] = text_part(CLIPTextModel, _sd_text_encoder)
    return {name: load(name) for name, load in loaders.items()}


def _load_part(
    path: Path,
    name: str,
    build: Callable[[], torch.nn.Module],
    convert: Callable[[torch.nn.Module], dict[str, torch.Tensor]],
    dtype: torch.dtype,
) -> torch.nn.Module:
    """Build ``name`` without weights, convert the checkpoint's tensors for it, refuse gaps, load."""
    with torch.device("meta"):
        module = build()
    try:
        weights = convert(module)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    except KeyError as exc:  # a converter indexing a tensor the checkpoint does not have
        raise ModelLoadError(
            f"{path}: the checkpoint lacks {name} weight {exc.args[0]!r}; is --config the right architecture?"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot convert the {name} weights ({one_line(exc)})") from exc
    expected = module.state_dict().keys()
    missing = sorted(expected - weights.keys())
    if missing:
        raise ModelLoadError(
            f"{path}: the checkpoint lacks {len(missing)} of the {len(expected)} {name} weights of the "
            f"--config architecture, e.g. {', '.join(missing[:3])}; is --config the right model?"
        )
    extra = [k for k in weights.keys() - expected if not k.endswith(_HARMLESS_EXTRA)]
    if extra:
        raise ModelLoadError(
            f"{path}: the checkpoint has {len(extra)} {name} weights the --config architecture does not, "
            f"e.g. {', '.join(sorted(extra)[:3])}; is --config the right model?"
        )
    weights = {k: v for k, v in weights.items() if k in expected}
    module = _take(module, weights, build, path, name)
    return module.to(dtype).eval().requires_grad_(False)


def _take(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], build: Callable[[], torch.nn.Module], path: Path, name: str
) -> torch.nn.Module:
    """Load ``weights`` into the meta-device ``module``; a module with buffers the state dict does not
    carry (rebuilt at construction, e.g. position ids) is built for real instead and loaded by copy."""
    try:
        module.load_state_dict(weights, strict=True, assign=True)
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module
        module = build()
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # shape mismatches: torch lists each one
        raise ModelLoadError(f"{path}: the {name} weights do not fit the --config architecture ({one_line(exc)})") from exc
    return module


def _clip(prefix: str) -> TextConverter:
    """OpenAI CLIP text encoder (SD 1.x, SDXL's first) under ``prefix``."""
    def convert(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        if not any(k.startswith(prefix) for k in checkpoint):
            raise ModelLoadError(f"no text encoder weights ({prefix}*) in the checkpoint")
        return dict(convert_ldm_clip_checkpoint(checkpoint, prefix))
    return convert


def _open_clip(prefix: str) -> TextConverter:
    """OpenCLIP text encoder (SD 2.x, SDXL's second) under ``prefix``."""
    def convert(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        if not any(k.startswith(prefix) for k in checkpoint):
            raise ModelLoadError(f"no text encoder weights ({prefix}*) in the checkpoint")
        return dict(convert_open_clip_checkpoint(model, checkpoint, prefix=prefix))
    return convert


def _sd_text_encoder(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x ships OpenAI CLIP (``cond_stage_model.transformer``), SD 2.x OpenCLIP (``.model``)."""
    if any(k.startswith("cond_stage_model.model.") for k in checkpoint):
        return _open_clip("cond_stage_model.model.")(model, checkpoint)
    return _clip("cond_stage_model.transformer.")(model, checkpoint)


def _flatten(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 dropped the ``text_model.`` level of CLIPTextModel; match the module's keys."""
    if hasattr(model, "text_model"):
        return weights
    return {k.removeprefix("text_model."): v for k, v in weights.items()}

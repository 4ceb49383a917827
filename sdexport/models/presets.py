"""Built-in models: real SD architectures (and tiny ones) as diffusers configs, with seeded random weights.

Nothing here can be downloaded, so the presets carry their configs. The real architectures exist for
benchmarking (speed does not depend on weight values); ``tiny`` exists for tests and the demo. Every
preset has random weights, and everything that loads one records ``random_weights: true``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from sdexport.shapes import PROMPT_CHUNKS, ShapeProfile

EOS = "<|endoftext|>"
"""CLIP's end token: OpenAI's CLIP (SD 1.x, SDXL's first encoder) pads with it too."""
OPEN_CLIP_PAD = "!"
"""The padding of OpenCLIP's text encoders' tokenizers (SD 2.x's; SDXL's second), id 0."""

_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

_LCM_SCHEDULER = {  # LCMScheduler on SD's noise schedule, otherwise at its own defaults
    **{k: v for k, v in _SD_SCHEDULER.items() if k != "skip_prk_steps"},
    "_class_name": "LCMScheduler",
    "set_alpha_to_one": True,
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
}

_SD_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


SEED_STRIDE = 1000
"""Component ``i`` of a preset with seed ``s`` draws its weights from torch seed ``s * 1000 + i``."""
MAX_PRESET_SEED = (2**64 - 1 - 9) // SEED_STRIDE
"""The largest seed whose per-component torch seeds stay within torch's unsigned 64 bits."""


@contextmanager
def drawing_from(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded with ``seed`` while a preset's modules are built (their
    constructors draw their weights from it), and the caller's generator state put back after:
    ``torch.manual_seed`` there reset a library user's own seed, CUDA's too (an audit). The modules
    are built on the CPU, so the weights are what ``torch.manual_seed(seed)`` gave."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    """None for the SDXL refiner, which has only the second text encoder."""
    scheduler: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    profile: ShapeProfile = field(default_factory=lambda: ShapeProfile(chunks=PROMPT_CHUNKS))
    """The default export profile: 256:512:1024 for SD 1.x/2.x (768 opt for 2.1), 512:1024:1536 for SDXL,
    small for tiny ones; prompts of up to ``PROMPT_CHUNKS`` chunks (two for tiny ones)."""
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    """Pipeline-level options of model_index.json (SDXL: ``force_zeros_for_empty_prompt``; the
    refiner's ``requires_aesthetics_score``)."""
    tokenizer_pads: dict[str, str] | None = None
    """CLIP's real tokenizer for each of these tokenizers, padding with the token given (the
    full-size presets, also the architecture a single-file checkpoint is read with); None: the
    byte-level tokenizer whose ids fit the tiny presets' 514-word text encoders."""


_TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    # 16 groups: an even number of channels per group (2, 4, 6 where a skip joins), as every SD width
    # has, which onnxruntime's GroupNorm CUDA kernel needs (its fused graphs then keep GroupNorm)
    "norm_num_groups": 16,
}

_TINY_VAE = {
    **_SD_VAE,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "sample_size": 128,
    "norm_num_groups": 16,  # (as the tiny U-Net's)
}

BYTE_LEVEL_VOCAB = 514
"""The tiny presets' vocabulary: sdexport's byte-level tokenizer's (``models.tokenizer``: the start
and end tokens, the 256 byte symbols alone and at a word's end)."""

# The tiny presets' token ids follow sdexport's byte-level tokenizer (BOS 0, EOS = PAD 1), so that the
# pooled output is taken at the real end-of-text position.
_TINY_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": BYTE_LEVEL_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}

SDXL_PROFILE = ShapeProfile(batch=(1, 1, 4), height=(512, 1024, 1536), width=(512, 1024, 1536), chunks=PROMPT_CHUNKS)
"""SDXL's default export profile (base and refiner, presets and checkpoints): made for 1024²."""
_TINY_PROFILE = ShapeProfile(batch=(1, 1, 2), height=(64, 128, 256), width=(64, 128, 256), chunks=(1, 1, 2))

# SDXL base 1.0 as it ships (unet/, vae/, text_encoder*/ and scheduler/ configs of
# stabilityai/stable-diffusion-xl-base-1.0), with sdexport's token ids (see above).
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280 pooled text embedding
    "norm_num_groups": 32,
}

_SDXL_VAE = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# The full-size presets read CLIP's vocabulary (models.tokenizer.clip_tokenizer), with the token ids
# their checkpoints' configs ship: eos_token_id 2 makes transformers take the pooled output at the
# highest id, CLIP's end token (49407), as for every SD checkpoint diffusers loads; a textual
# inversion word's ids are higher (49408 on), so a prompt holding one pools there, as diffusers does.
_CLIP_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
_CLIP_PADS = {"tokenizer": EOS}
_OPEN_CLIP_PADS = {"tokenizer": OPEN_CLIP_PAD}  # SD 2.x's encoder is OpenCLIP's
_SDXL_PADS = {"tokenizer": EOS, "tokenizer_2": OPEN_CLIP_PAD}

_SDXL_TEXT = {  # CLIP ViT-L/14, as SD 1.x, but SDXL reads its penultimate layer
    **_TINY_TEXT,
    **_CLIP_IDS,
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

_SDXL_TEXT_2 = {  # OpenCLIP ViT-bigG/14, with its text projection
    **_TINY_TEXT,
    **_CLIP_IDS,
    "architectures": ["CLIPTextModelWithProjection"],
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

# tiny-sdxl: every SDXL size differs from the others (E1 32 + E2 48 = E 80, P 40, time ids 6 x 8), so a
# mixed-up tensor fails loudly instead of fitting by accident. E1 != E2 also matters to diffusers'
# single-file loader, which tells the two text encoders apart by their width.
_TINY_SDXL_UNET = {
    **_TINY_UNET,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 80,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 40,
}

_TINY_SDXL_TEXT_2 = {
    **_TINY_TEXT,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 48,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 40,
    "hidden_act": "gelu",
}

_SDXL_PIPELINE = {"force_zeros_for_empty_prompt": True}
_REFINER_PIPELINE = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
"""As stabilityai's refiner saves them: its empty negative prompt is encoded, not zeros."""

_SDXL_REFINER_UNET = {
    **_SDXL_UNET,
    "block_out_channels": [384, 768, 1536, 1536],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "cross_attention_dim": 1280,  # the second text encoder's alone
    "projection_class_embeddings_input_dim": 2560,  # 5 time ids x 256 + the 1280 pooled text embedding
}

# tiny-sdxl-refiner: E = E2 48, P 40, time ids 5 x 8 (the aesthetic score's place), as tiny-sdxl's.
_TINY_REFINER_UNET = {**_TINY_SDXL_UNET, "cross_attention_dim": 48, "projection_class_embeddings_input_dim": 5 * 8 + 40}

_TINY_SDXL = Preset(
    name="tiny-sdxl",
    description="a few-MB SDXL-shaped model (two text encoders, text_time conditioning) for tests",
    family="sdxl",
    unet=_TINY_SDXL_UNET,
    vae={**_TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoder=_TINY_TEXT,
    text_encoder_2=_TINY_SDXL_TEXT_2,
    scheduler=_SDXL_SCHEDULER,
    profile=_TINY_PROFILE,
    pipeline_config=_SDXL_PIPELINE,
)

_TINY_GUIDANCE_EMBEDDING = 24
"""A latent consistency model's ``time_cond_proj_dim`` in the tiny presets (256 in real ones): a size
no other tiny tensor has."""

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="a few-MB SD-shaped model for tests and the demo",
        family="sd",
        unet=_TINY_UNET,
        vae=_TINY_VAE,
        text_encoder=_TINY_TEXT,
        scheduler=_SD_SCHEDULER,
        profile=_TINY_PROFILE,
    ),
    "tiny-v": Preset(
        name="tiny-v",
        description="tiny, with v-prediction (as SD 2.x 768)",
        family="sd",
        unet=_TINY_UNET,
        vae=_TINY_VAE,
        text_encoder=_TINY_TEXT,
        scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        profile=_TINY_PROFILE,
    ),
    "tiny-inpaint": Preset(
        name="tiny-inpaint",
        description="tiny, with an inpainting U-Net (9 input channels: latents, mask, masked-image latents)",
        family="sd",
        unet={**_TINY_UNET, "in_channels": 9},
        vae=_TINY_VAE,
        text_encoder=_TINY_TEXT,
        scheduler=_SD_SCHEDULER,
        profile=_TINY_PROFILE,
    ),
    "tiny-lcm": Preset(
        name="tiny-lcm",
        description="tiny, as a latent consistency model (its U-Net takes the guidance embedded; LCM scheduler)",
        family="sd",
        unet={**_TINY_UNET, "time_cond_proj_dim": _TINY_GUIDANCE_EMBEDDING},
        vae=_TINY_VAE,
        text_encoder=_TINY_TEXT,
        scheduler=_LCM_SCHEDULER,
        profile=_TINY_PROFILE,
    ),
    "sd15": Preset(
        name="sd15",
        description="Stable Diffusion 1.5 architecture (860M U-Net, CLIP ViT-L/14 text encoder)",
        family="sd",
        unet={
            "_class_name": "UNet2DConditionModel",
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae=_SD_VAE,
        text_encoder={
            **_TINY_TEXT,
            **_CLIP_IDS,
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
        },
        scheduler=_SD_SCHEDULER,
        tokenizer_pads=_CLIP_PADS,
    ),
    "sd21": Preset(
        name="sd21",
        description="Stable Diffusion 2.1 (768-v) architecture (OpenCLIP ViT-H text encoder, v-prediction)",
        family="sd",
        unet={
            "_class_name": "UNet2DConditionModel",
            "sample_size": 96,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
            "norm_num_groups": 32,
        },
        vae={**_SD_VAE, "sample_size": 768},
        text_encoder={
            **_TINY_TEXT,
            **_CLIP_IDS,
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "projection_dim": 512,
            "hidden_act": "gelu",
        },
        scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        profile=ShapeProfile(batch=(1, 1, 4), height=(256, 768, 1024), width=(256, 768, 1024), chunks=PROMPT_CHUNKS),
        tokenizer_pads=_OPEN_CLIP_PADS,
    ),
    "sdxl": Preset(
        name="sdxl",
        description="Stable Diffusion XL base 1.0 architecture (2.6B U-Net, CLIP ViT-L + OpenCLIP ViT-bigG)",
        family="sdxl",
        unet=_SDXL_UNET,
        vae=_SDXL_VAE,
        text_encoder=_SDXL_TEXT,
        text_encoder_2=_SDXL_TEXT_2,
        scheduler=_SDXL_SCHEDULER,
        profile=SDXL_PROFILE,
        pipeline_config=_SDXL_PIPELINE,
        tokenizer_pads=_SDXL_PADS,
    ),
    "sdxl-refiner": Preset(
        name="sdxl-refiner",
        description="Stable Diffusion XL refiner 1.0 architecture (2.3B U-Net, OpenCLIP ViT-bigG; refines images)",
        family="sdxl-refiner",
        unet=_SDXL_REFINER_UNET,
        vae=_SDXL_VAE,
        text_encoder=None,
        text_encoder_2=_SDXL_TEXT_2,
        scheduler=_SDXL_SCHEDULER,
        profile=SDXL_PROFILE,
        pipeline_config=_REFINER_PIPELINE,
        tokenizer_pads={"tokenizer_2": OPEN_CLIP_PAD},
    ),
    "tiny-sdxl": _TINY_SDXL,
    "tiny-sdxl-inpaint": replace(
        _TINY_SDXL,
        name="tiny-sdxl-inpaint",
        description="tiny-sdxl, with an inpainting U-Net (9 input channels: latents, mask, masked-image latents)",
        unet={**_TINY_SDXL_UNET, "in_channels": 9},
    ),
    "tiny-sdxl-lcm": replace(
        _TINY_SDXL,
        name="tiny-sdxl-lcm",
        description="tiny-sdxl, as a latent consistency model (its U-Net takes the guidance embedded; LCM scheduler)",
        unet={**_TINY_SDXL_UNET, "time_cond_proj_dim": _TINY_GUIDANCE_EMBEDDING},
        scheduler=_LCM_SCHEDULER,
    ),
    "tiny-sdxl-refiner": replace(
        _TINY_SDXL,
        name="tiny-sdxl-refiner",
        description="a few-MB SDXL-refiner-shaped model (the second text encoder alone, aesthetic-score time ids)",
        family="sdxl-refiner",
        unet=_TINY_REFINER_UNET,
        text_encoder=None,
        pipeline_config=_REFINER_PIPELINE,
    ),
}


PRESETS["sd15-lcm"] = replace(
    PRESETS["sd15"],
    name="sd15-lcm",
    description="an SD 1.5 latent consistency model's architecture (SimianLuo/LCM_Dreamshaper_v7: the U-Net takes "
                "the guidance embedded; LCM scheduler)",
    unet={**PRESETS["sd15"].unet, "time_cond_proj_dim": 256},
    scheduler=_LCM_SCHEDULER,
)


PRESETS["sd21-base"] = replace(
    PRESETS["sd21"],
    name="sd21-base",
    description="Stable Diffusion 2.1 base (512, epsilon) architecture (OpenCLIP ViT-H text encoder): also SD 2.0 "
                "base and the SD 2.x fine-tunes that predict noise",
    unet={**PRESETS["sd21"].unet, "sample_size": 64, "upcast_attention": False},  # (diffusers' converter upcasts 768-v's alone)
    vae={**_SD_VAE, "sample_size": 512},
    scheduler=_SD_SCHEDULER,
    profile=ShapeProfile(chunks=PROMPT_CHUNKS),
)
"""SD 2.x's base models share the 768-v model's weight shapes: the file cannot tell them apart, only
the prediction type (which ``sd21`` gives as v) and the size they were trained at."""


# Inpainting models: the same U-Net taking 9 channels (latents, mask, masked-image latents), as
# runwayml's SD 1.5, stabilityai's SD 2 (from 2.0 base: 512, epsilon) and diffusers' SDXL 0.1 ones
for _base, _name, _model in (("sd15", "sd15-inpaint", "Stable Diffusion 1.5 inpainting"),
                             ("sd21-base", "sd2-inpaint", "Stable Diffusion 2 inpainting"),
                             ("sdxl", "sdxl-inpaint", "Stable Diffusion XL 1.0 inpainting 0.1")):
    PRESETS[_name] = replace(PRESETS[_base], name=_name, description=f"{_model} architecture (a {_base} U-Net taking 9 "
                             "input channels: latents, mask, masked-image latents)",
                             unet={**PRESETS[_base].unet, "in_channels": 9})


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name)


def config_digest(preset: Preset) -> str:
    """A digest of what builds ``preset``'s model (its components' and scheduler's configs): an
    export records it, so that a model rebuilt from the preset's name after sdexport changed the
    preset (the tiny ones' groups, 2026-12-06) is known to be another model than the graphs hold."""
    import hashlib
    import json

    parts = {"unet": preset.unet, "vae": preset.vae, "text_encoder": preset.text_encoder,
             "text_encoder_2": preset.text_encoder_2, "scheduler": preset.scheduler,
             "pipeline_config": preset.pipeline_config}
    if preset.tokenizer_pads is not None:  # (CLIP's tokenizer: the byte-level one left digests as they were)
        parts["tokenizer_pads"] = preset.tokenizer_pads
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

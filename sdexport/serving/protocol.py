"""The served model's tensors, declared once.

Every input is per image: a request carries N rows (Triton's batch dimension) and row i holds image
i's prompt, seed, steps, ... . Rows that ask for the same shapes and settings are generated together
(``requests.group_rows``), whichever request they came from. Every input but ``prompt`` is optional
and falls back to what ``sdexport run`` would use, so a request with the same parameters as a
``run`` command line gives the same image.

This table feeds ``config.pbtxt`` (``repository``), the model's decoding (``requests``) and the
client helpers and load test (``client``), so a tensor's name and type are written here only.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdexport.runtime.schedulers import scheduler_names

MODEL_NAME = "sdexport"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """The KServe v2 data type: BYTES, BOOL, INT32, UINT64, FP32, UINT8."""
    dims: tuple[int, ...]
    """Per row (Triton adds the batch dimension); -1 is any length."""
    doc: str
    """For readers of this table; the README's table of inputs is the users' (a test holds its names to these)."""
    optional: bool = True

    @property
    def config_type(self) -> str:
        """The type as config.pbtxt spells it."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("prompt", "BYTES", (1,), "UTF-8 text, one per image", optional=False),
    TensorSpec("negative_prompt", "BYTES", (1,), "UTF-8 text (default: none)"),
    TensorSpec("prompt_2", "BYTES", (1,), "SDXL: for the second text encoder (default: prompt)"),
    TensorSpec("negative_prompt_2", "BYTES", (1,), "SDXL: for the second text encoder"),
    TensorSpec("original_size", "INT32", (2,), "SDXL micro-conditioning: height, width the image 'was' before cropping (default: its size)"),
    TensorSpec("crops_coords_top_left", "INT32", (2,), "SDXL micro-conditioning: the crop's top, left (default 0, 0)"),
    TensorSpec("target_size", "INT32", (2,), "SDXL base model micro-conditioning: height, width (default: the image's size)"),
    TensorSpec("aesthetic_score", "FP32", (1,), "SDXL refiner: the aesthetic rating (LAION's, 0-10) refined towards (default 6.0)"),
    TensorSpec("negative_aesthetic_score", "FP32", (1,), "SDXL refiner: the rating guidance steers away from (default 2.5)"),
    TensorSpec("denoising_end", "FP32", (1,), "SDXL base + refiner served (`sdexport serve --refiner`): the base model's fraction of the schedule, above 0 and below 1 (default: the server's --denoising-end, 0.8)"),
    TensorSpec("clip_skip", "INT32", (1,), "text encoder layers the prompt is read past, as diffusers' clip_skip (A1111's Clip skip is one more); default: the export's (`export --clip-skip`), which an SD export takes alone"),
    TensorSpec("emphasis", "BYTES", (1,), "how brackets in the texts are read: none (as text, as diffusers; the default), original (A1111's (word:1.2) weights, its default), no-norm (A1111's No norm)"),
    TensorSpec("steps", "INT32", (1,), "denoising steps (default 30)"),
    TensorSpec("guidance", "FP32", (1,), "classifier-free guidance scale (default as `sdexport run`: 7.5, SDXL 5.0 but 7.5 for inpainting without ControlNets; 1 disables it; a latent consistency model takes it as an input, with no CFG at any value)"),
    TensorSpec("guidance_rescale", "FP32", (1,), "diffusers' guidance_rescale, 0 (off; the default) to 1: each step's guided prediction is scaled towards the prompted one's spread by this share, against over-exposure (0.7 for models trained for zero terminal SNR); with guidance above 1 only"),
    TensorSpec("scheduler", "BYTES", (1,), ", ".join(scheduler_names())),
    TensorSpec("seed", "UINT64", (1,), "seed of this image (default: its row number in the request)"),
    TensorSpec("height", "INT32", (1,), "pixels (default: the first row's: its init, first control or adapter image's, else the profile's opt)"),
    TensorSpec("width", "INT32", (1,), "pixels (default: as height)"),
    TensorSpec("init_image", "BYTES", (1,), "img2img / inpainting: an image file's bytes (PNG, JPEG, WebP, ...: image_inputs.IMAGE_FORMATS)"),
    TensorSpec("mask", "BYTES", (1,), "inpainting: an image file's bytes, white repaints"),
    TensorSpec("strength", "FP32", (1,), "with init_image: how far it is noised (default as `sdexport run`)"),
    TensorSpec("fit", "BYTES", (1,), "init image/mask of another size: exact (refuse), resize or crop"),
    TensorSpec("control_image", "BYTES", (-1,), "ControlNet: this image's image file, one per ControlNet in export order, or masked-init"),
    TensorSpec("control_mode", "INT32", (-1,), "union ControlNet: the control mode of each control image, in order (e.g. xinsir's 0 openpose, 1 depth, 3 canny)"),
    TensorSpec("control_scale", "FP32", (-1,), "ControlNet: one scale, or one per ControlNet (default: txt2img 1, img2img 0.8, inpainting SD 0.5, SDXL 1)"),
    TensorSpec("control_start", "FP32", (-1,), "ControlNet: fraction of the steps to start at (default 0)"),
    TensorSpec("control_end", "FP32", (-1,), "ControlNet: fraction of the steps to stop at (default 1)"),
    TensorSpec("guess_mode", "BOOL", (1,), "ControlNet: guess mode, as `sdexport run --guess-mode` (default false)"),
    TensorSpec("adapter_image", "BYTES", (-1,), "T2I-Adapter: this image's image file (a sketch, edge, depth or pose map); one per adapter, in export order"),
    TensorSpec("adapter_scale", "FP32", (-1,), "T2I-Adapter: conditioning scale, one or one per adapter (default 1)"),
    TensorSpec("adapter_factor", "FP32", (1,), "T2I-Adapter: share of the steps, the first ones, it acts on (default 1)"),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("image", "BYTES", (1,), "the PNG file `sdexport run` would write, parameters in its metadata", optional=False),
    TensorSpec("pixels", "UINT8", (-1, -1, 3), "the raw image, height x width x RGB (ask for it by name)", optional=False),
)

INPUT_NAMES = tuple(spec.name for spec in INPUTS)

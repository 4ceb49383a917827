"""Original-layout single-file checkpoints (``.safetensors``/``.ckpt``) → PyTorch modules, with no weight
lost, and one component's weights read at a time.

diffusers' ``from_single_file`` loads such files but does not refuse a checkpoint that lacks weights:
depending on whether accelerate is installed and on the transformers version, a missing weight is
left on the meta device or silently keeps its random initial value, and the export would then
carry random weights labelled "trained". So the weights are loaded here, component by component,
with diffusers' own key converters (the part that is hard to get right and that diffusers keeps
current), and every component's converted keys and shapes are compared with the module's own
before anything is loaded into it.

That comparison runs first, for every component, on the file's *layout*: tensors on the meta device
with the shapes the safetensors header declares (a ``.ckpt`` is mapped, not read), put through the
same converters. A checkpoint for another architecture is thus refused before a single weight is
read. Each component's weights are then read only when ``LoadedModel.materialize`` asks for it: the
converters see the file as a mapping that reads a tensor when one is looked up, and they look up
only their own component's keys. Each tensor is copied out of the file's mapping as it is cast,
and the file is mapped again every ``_Reader.REOPEN_BYTES``, so the pages read do not stay counted
in the process's memory either. An export therefore holds one component's weights at a time, as
for a diffusers directory, instead of every part converted to float32 at once. Modules are built on
the meta device and take the converted tensors as they are, so no random initialisation is computed
(the CLIP text encoders rebuild a buffer at construction, so they are built for real and loaded by
copy).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdexport.errors import ModelLoadError, one_line
from sdexport.specs import SDXL_REFINER

Tensors = Mapping[str, torch.Tensor]
Converter = Callable[[torch.nn.Module, Tensors], dict[str, torch.Tensor]]

_HARMLESS_EXTRA = ("position_ids",)
"""Keys old checkpoints carry that current modules rebuild themselves (CLIP's position ids)."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
"""diffusers' ``LDM_UNET_KEY`` and ``LDM_VAE_KEYS``: with none of the VAE's, diffusers' converter would
take every tensor of the file as the VAE's, so that case is refused by name first."""

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
"""Header type names → torch dtypes, for the layout's meta tensors (whose shapes are checked, and whose
types must be floating point where the module's are; a type missing here, e.g. an fp8 one, is laid
out as float32); a diffusers folder's files are held to the same table (``loader._refuse_whole_numbers``)."""


@dataclass(frozen=True)
class Part:
    """One component: how to build it (on the meta device: no weights) and how diffusers' converter
    turns the checkpoint's tensors into its state dict."""

    name: str
    build: Callable[[], torch.nn.Module]
    convert: Converter
    prefixes: tuple[str, ...] = ()
    """Where its tensors are in the file, for diffusers' converters (``unused_weights``); the text
    encoders' are matched key by key by their own converters."""


def plan_components(
    path: Path, config_dir: Path, family: str, dtype: torch.dtype, scheduler: Mapping[str, Any], *,
    leave_out: Collection[str] = (), needed: Collection[str] | None = None,
) -> tuple[dict[str, torch.nn.Module], dict[str, Callable[[], torch.nn.Module]]]:
    """Check every component against the file's layout, reading no weight; return each one's
    skeleton (meta device, ``dtype``) and a builder that reads, converts and loads its weights.
    ``scheduler``: the config folder's scheduler config (``outline.scheduler_config``), which the
    file's markers are checked against. ``leave_out``: parts that come from elsewhere (``vae``:
    ``--vae``), neither checked nor read, as diffusers' ``from_single_file(..., vae=...)`` takes a
    checkpoint without VAE weights. ``needed``: the parts that will be built (an export's
    ``--components``; None: all); one the file holds no weights of is otherwise a skeleton from
    its config whose builder refuses, as a diffusers directory missing that part's folder is
    exported without it (a file pruned of its text encoder, exported ``--components unet``)."""
    from sdexport.models.outline import check_holds_a_unet

    parts = [part for part in _parts(config_dir, family) if part.name not in leave_out]
    stamp = _identity(path)
    layout = read_layout(path)
    check_holds_a_unet(path, layout)
    _check_sdxl_kind(path, layout, family)
    _check_markers(path, layout, scheduler)
    if "unet" not in leave_out:
        _check_unet_inputs(path, layout, config_dir)
    # loaded with the layout's meta tensors (keys and shapes checked, nothing read), each module
    # checked is its part's skeleton
    skeletons: dict[str, torch.nn.Module] = {}
    builders: dict[str, Callable[[], torch.nn.Module]] = {}
    for part in parts:
        try:
            skeleton = _load_part(path, part, layout)
            builders[part.name] = _builder(path, part, stamp, dtype)
        except NoPartWeights as absent:
            if needed is None:
                raise
            if part.name in needed:  # (an export: its --components can leave the part out)
                raise NoPartWeights(f"{absent}; or leave out of --components the parts that need it") from None
            with torch.device("meta"):
                skeleton = part.build()
            builders[part.name] = _refused(absent)
        skeletons[part.name] = skeleton.to(dtype).eval().requires_grad_(False)
    return skeletons, builders


def _refused(absent: NoPartWeights) -> Callable[[], torch.nn.Module]:
    """The builder of a part the file holds no weights of: the refusal, should anything build it."""
    def build() -> torch.nn.Module:
        raise absent
    return build


CONTEXT_WIDTHS = {768: "SD 1.x (--config sd15)", 1024: "SD 2.x (--config sd21 or sd21-base)",
                  2048: "SDXL (--config sdxl)", 1280: "the SDXL refiner (--config sdxl-refiner)"}
"""The models a U-Net's text-context width (cross_attention_dim) says a file is, with their config."""

INPAINTING_WIDTHS = {768: "SD 1.x inpainting (--config sd15-inpaint)", 1024: "SD 2 inpainting (--config sd2-inpaint)",
                     2048: "SDXL inpainting (--config sdxl-inpaint)"}
"""``CONTEXT_WIDTHS`` for an inpainting U-Net (one taking the mask and masked image too): an SD 1.x
inpainting file read with sd2-inpaint was sent to sd15, which then refused it as an inpainting one."""


OTHER_INPUTS = {8: "an instruct-pix2pix model (the latents and an image's)", 5: "a depth-to-image model (the latents "
                "and a depth map)", 7: "the x4 upscaler (the latents and a low-resolution image)"}
"""Models whose U-Net takes other inputs beside the latents, by their input channel count (as diffusers'
``infer_diffusers_model_type`` tells them apart): sdexport runs none of them."""


def _check_unet_inputs(path: Path, layout: Mapping[str, Any], config_dir: Path) -> None:
    """A U-Net of another model than the --config's, named with the config to give, where torch's
    size-mismatch list would not say it: by its input channels (9: an inpainting model) and by
    the width of the text it attends to (which tells SD 1.x, SD 2.x, SDXL and its refiner apart)."""
    from sdexport.models.outline import read_json, unet_extra_channels

    config = read_json(config_dir / "unet" / "config.json")
    conv_in = layout.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != config.get("in_channels", 4):
        takes, wanted = conv_in.shape[1], config.get("in_channels", 4)
        latent = int(config.get("out_channels", 4))
        if takes not in (latent, 2 * latent + 1):  # no config of sdexport's would run it
            unet_extra_channels(takes, latent, f"{path}: {OTHER_INPUTS.get(takes, 'a model of another kind')}")
        what, fix = (("an inpainting model's", ("an inpainting config: sd15-inpaint, sd2-inpaint or sdxl-inpaint, or a "
                      "diffusers directory of the model")) if takes == 2 * latent + 1 else
                     ("a text-to-image", ("the config of the model it was trained as (sd15, sd21, sd21-base, sdxl), or a "
                      "diffusers directory of it")))
        raise ModelLoadError(f"{path}: {what} U-Net, taking {takes} input channels, but the --config's takes {wanted}: "
                             f"give {fix}")
    width = next((t.shape[1] for k, t in layout.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
                  and t.ndim == 2), None)
    wanted = config.get("cross_attention_dim")
    inpainting = conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 2 * int(config.get("out_channels", 4)) + 1
    widths = INPAINTING_WIDTHS if inpainting else CONTEXT_WIDTHS
    if width is not None and isinstance(wanted, int) and width != wanted and width in widths:
        raise ModelLoadError(f"{path}: a U-Net attending to text {width} wide, as {widths[width]}, but the "
                             f"--config's attends to {wanted}: give that config, or a diffusers directory of the model")


def _check_markers(path: Path, layout: Mapping[str, Any], scheduler: Mapping[str, Any]) -> None:
    """The top-level keys by which a file says how it is sampled (ComfyUI's convention; diffusers'
    ``infer_diffusers_model_type`` reads ``edm_mean`` alone): no converter reads them, so a file that
    predicts v (``v_pred``) read with an epsilon config, one trained for zero terminal SNR
    (``ztsnr``) read with a scheduler that neither rescales its betas so nor samples from the last
    timestep, or a Playground v2.5 one (``edm_mean``: latents normalised around the VAE) loaded as
    plain SDXL, drawing wrong images without a word."""
    if "edm_mean" in layout or "edm_std" in layout:
        raise ModelLoadError(f"{path}: a Playground v2.5-style checkpoint (edm_mean/edm_std: its latents are "
                             "normalised around the VAE, as diffusers' SDXL pipelines apply from latents_mean/"
                             "latents_std), which sdexport does not yet: its images would decode wrong")
    said = "its v_pred key" if "v_pred" in layout else declared_v(path)
    if said:
        predicts = scheduler.get("prediction_type", "epsilon")
        if predicts != "v_prediction":
            zero_snr = " with rescale_betas_zero_snr and trailing timestep_spacing (its ztsnr key)" if "ztsnr" in layout else ""
            raise ModelLoadError(f"{path}: a checkpoint that predicts v ({said}), but the --config's scheduler "
                                 f"predicts {predicts}: give a diffusers directory of the model as --config, its "
                                 f"scheduler config with prediction_type v_prediction{zero_snr}")
    if "ztsnr" in layout and not (scheduler.get("rescale_betas_zero_snr") is True
                                  and scheduler.get("timestep_spacing") in ("trailing", "linspace")):  # (both start at the last)
        # (the README promised this refusal; the key only changed the words of v_pred's)
        raise ModelLoadError(f"{path}: a checkpoint trained for zero terminal SNR (its ztsnr key), but the --config's "
                             "scheduler does not sample it so: give a diffusers directory of the model as --config, its "
                             "scheduler config with rescale_betas_zero_snr true and timestep_spacing trailing (or "
                             "linspace)")


SIDECAR_LIMIT = 1 << 20
"""The largest ``.yaml`` beside a checkpoint read for its parameterization (A1111's are a few KB)."""


def declared_v(path: Path) -> str | None:
    """Where a checkpoint says, outside its tensors, that it predicts v: its safetensors header's
    ``modelspec.prediction_type`` (Stability AI's ModelSpec, which kohya's sd-scripts write), or
    the A1111-style ``.yaml`` of the same name beside it (``model.params.parameterization: v``,
    what diffusers' ``original_config`` reads). None where neither does: read with an epsilon
    config, such a file was exported as epsilon without a word and drew wrong images (an audit)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as handle:  # (the header alone)
                declared = (handle.metadata() or {}).get("modelspec.prediction_type")
        except Exception:  # noqa: BLE001  (the layout's reading refuses a damaged header, in its words)
            declared = None
        if isinstance(declared, str) and declared.strip().lower() in ("v", "v_prediction", "v-prediction"):
            return f"its header's modelspec.prediction_type {declared!r}"
    sidecar = path.with_suffix(".yaml")
    try:
        import yaml  # (PyYAML: huggingface_hub's dependency, so diffusers')
    except ImportError:
        return None
    try:
        if not sidecar.is_file() or sidecar.stat().st_size > SIDECAR_LIMIT:
            return None
        config = yaml.safe_load(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # (not a config of one: not read)
        return None
    model = config.get("model") if isinstance(config, dict) else None  # (a YAML of another kind: not read)
    params = model.get("params") if isinstance(model, dict) else None
    value = params.get("parameterization") if isinstance(params, dict) else None
    return f"{sidecar.name} beside it: parameterization {value!r}" if value == "v" else None


def _check_sdxl_kind(path: Path, layout: Mapping[str, Any], family: str) -> None:
    """An SDXL base checkpoint and a refiner one differ in their embedders (the refiner's only one
    is OpenCLIP's, at index 0); given the other's ``--config``, the U-Net's shapes would be refused
    in a list of mismatches that does not say which config to give."""
    refiner = any(k.startswith("conditioner.embedders.0.model.") for k in layout)
    base = any(k.startswith("conditioner.embedders.1.model.") for k in layout)
    if family == "sdxl" and refiner and not base:
        raise ModelLoadError(f"{path}: an SDXL refiner checkpoint (one text encoder, OpenCLIP's), but the --config is "
                             "an SDXL base model's: give --config sdxl-refiner or a refiner's diffusers directory")
    if family == SDXL_REFINER and base:
        raise ModelLoadError(f"{path}: an SDXL base checkpoint (two text encoders), but the --config is the SDXL "
                             "refiner's: give --config sdxl or an SDXL diffusers directory")


def _identity(path: Path) -> list[int]:
    """Size, times, inode, device: a part built later must come from the file that was checked."""
    from sdexport.hash_records import identity

    try:
        return identity(path.stat())
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from None


def read_layout(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as a meta tensor of its shape: the safetensors header alone, or
    a ``.ckpt`` mapped into memory (torch's zip format; an old-style pickle is read whole once)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {k: handle.get_slice(k) for k in handle.keys()}
                layout = {k: torch.empty(s.get_shape(), dtype=SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32),
                                         device="meta") for k, s in shapes.items()}
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path}: cannot read the checkpoint ({one_line(exc)})") from exc
    else:
        layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _read_ckpt(path).items()}
    if not layout:
        raise ModelLoadError(f"{path}: the checkpoint holds no tensors")
    scales = [k for k in layout if k == "scaled_fp8" or k.endswith(".scale_weight")]
    if scales:  # (else: refused as weights the architecture lacks, without saying what they are)
        raise ModelLoadError(f"{path}: a ComfyUI scaled-fp8 checkpoint ({scales[0]}, {len(scales)} scale tensors): its "
                             "fp8 weights are stored divided by scales sdexport does not apply; use an fp16, bf16 "
                             "or fp32 checkpoint")
    return layout


@contextmanager
def open_tensors(path: Path, dtype: torch.dtype, stamp: list[int] | None = None) -> Iterator[Tensors]:
    """The checkpoint's tensors by name, each read when it is looked up, as a tensor of its own (not a
    view of the file), its floating-point values cast to ``dtype`` (a nested ``state_dict`` unwrapped).
    ``stamp``: the file's identity when it was checked; a file that no longer has it is refused."""
    reader = _Reader(path, stamp)
    try:
        yield _LookupTensors(reader.keys(), reader.read, dtype)
    finally:
        reader.close()


def _read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A ``.ckpt``'s tensors, by ``torch.load`` with ``weights_only`` (a pickle naming anything but
    tensors and plain values is refused: it can run code), torch's zip format mapped into memory
    (nothing is read until used; an old-style pickle is read whole), a nested ``state_dict`` unwrapped.

    Not through diffusers' loader, which does the same where the file is whole, but where torch
    fails reads the whole file again as text (to tell a Git LFS pointer) before it says "Unable to
    load weights": twice the file's size in memory (an audit: 1.65 GB for a 600 MB file), 8 to 15 GB
    for a truncated SD download or a PyTorch Lightning checkpoint, which could end in the kernel's
    out-of-memory kill rather than the one line (a pointer is told by its first bytes before this:
    ``outline.check_single_file``)."""
    import zipfile

    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # pickle and zip errors of every kind
        raise ModelLoadError(f"{path}: cannot read the checkpoint ({_ckpt_reason(exc)})") from exc
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # (Lightning's layout: the weights beside training counters)
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path}: the checkpoint holds no tensors")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _ckpt_reason(exc: BaseException) -> str:
    """Why torch could not read a ``.ckpt``, in words a user can act on, from torch's error or the
    errors it was raised from."""
    import pickle
    import re

    chain: list[BaseException] = []
    error: BaseException | None = exc
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in reversed(chain):  # the innermost first: torch's own words
        text = one_line(error)
        if isinstance(error, RuntimeError) and "zip archive" in text:
            return "truncated or damaged: torch cannot read its zip archive (" + text.split(". ")[0] + ")"
        if isinstance(error, pickle.UnpicklingError) and "unsupported global" in text.lower():
            found = re.search(r"GLOBAL (\S+)", text)
            return (f"it pickles Python objects besides tensors ({found[1] if found else text}), which sdexport does "
                    "not unpickle (they can run code); convert it to .safetensors with a tool you trust")
        if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" not in text:
            return f"not a torch checkpoint: torch cannot unpickle it ({text})"
    return one_line(exc)


class _LookupTensors(Mapping[str, torch.Tensor]):
    """A checkpoint as a read-on-lookup mapping: diffusers' converters list every key but fetch only
    their own component's tensors. Each is copied out of the file's mapping as it is cast, so the
    mapping holds no weight the module will hold too."""

    def __init__(self, keys: list[str], read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> None:
        self._keys, self._known, self._read, self._dtype = keys, set(keys), read, dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        tensor = self._read(key)
        return tensor.to(self._dtype, copy=True) if tensor.is_floating_point() else tensor.clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._known


class _Reader:
    """Reads tensors out of a checkpoint, mapping it again after every ``REOPEN_BYTES`` read: the pages
    a tensor was read from stay resident, and count in the process's memory, until the file's mapping
    closes. (Once per tensor would parse a safetensors header thousands of times; an old-style pickle
    ``.ckpt`` cannot be mapped and is loaded once.) Each mapping is checked to be of the file checked."""

    REOPEN_BYTES = 256 * 1024**2

    def __init__(self, path: Path, stamp: list[int] | None) -> None:
        self._path, self._stamp, self._handles = path, stamp, ExitStack()
        self._get: Callable[[str], torch.Tensor] | None = None
        self._keys: list[str] = []
        self._since_open = 0
        self._remappable = path.suffix.lower() == ".safetensors" or zipfile.is_zipfile(path)

    def _open(self) -> Callable[[str], torch.Tensor]:
        self.close()
        if self._path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            try:
                handle = self._handles.enter_context(safe_open(str(self._path), framework="pt"))
            except Exception as exc:  # safetensors raises its own error types
                raise ModelLoadError(f"{self._path}: cannot read the checkpoint ({one_line(exc)})") from exc
            self._keys, get = list(handle.keys()), handle.get_tensor
        else:
            tensors = _read_ckpt(self._path)
            self._keys, get = list(tensors), tensors.__getitem__
        if self._stamp is not None:  # after opening: what was opened is the file checked, or refused
            check_unchanged(self._path, self._stamp)
        self._get, self._since_open = get, 0
        return get

    def keys(self) -> list[str]:
        if self._get is None:
            self._open()
        return self._keys

    def read(self, key: str) -> torch.Tensor:
        get = self._get
        if get is None or (self._since_open >= self.REOPEN_BYTES and self._remappable):
            get = self._open()
        tensor = get(key)
        self._since_open += tensor.nbytes
        return tensor

    def close(self) -> None:
        self._handles.close()
        self._get = None


def _parts(config_dir: Path, family: str) -> list[Part]:
    """The family's components (``unet``, ``vae``, ``text_encoder`` and, for SDXL, ``text_encoder_2``;
    the refiner's ``text_encoder_2`` alone),
    with their configs read now (``config_dir`` may be a temporary folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def diffusers_part(name: str, cls: Any, convert: Any, prefixes: tuple[str, ...], what: str) -> Part:
        config = cls.load_config(str(config_dir / name))

        def converted(module: torch.nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
            _require_prefix(tensors, prefixes, what)
            return dict(convert(tensors, module.config))
        return Part(name, lambda: cls.from_config(config), converted, prefixes)

    def text_part(name: str, cls: Any, convert: Converter) -> Part:
        config = cls.config_class.from_pretrained(str(config_dir / name))
        return Part(name, lambda: cls(config), lambda m, tensors: _flatten(m, convert(m, tensors)))

    parts = [
        diffusers_part("unet", UNet2DConditionModel, convert_ldm_unet_checkpoint, (UNET_PREFIX,), "U-Net"),
        diffusers_part("vae", AutoencoderKL, convert_ldm_vae_checkpoint, VAE_PREFIXES, "VAE"),
    ]
    if family == "sdxl":
        parts.append(text_part("text_encoder", CLIPTextModel, _clip("conditioner.embedders.0.transformer.")))
        parts.append(text_part("text_encoder_2", CLIPTextModelWithProjection, _open_clip("conditioner.embedders.1.model.")))
    elif family == SDXL_REFINER:  # its only embedder is the OpenCLIP one (sd_xl_refiner_1.0.safetensors)
        parts.append(text_part("text_encoder_2", CLIPTextModelWithProjection, _open_clip("conditioner.embedders.0.model.")))
    else:
        parts.append(text_part("text_encoder", CLIPTextModel, _sd_text_encoder))
    return parts


def load_vae_file(path: Path, architecture: Mapping[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A VAE file in the original layout (a VAE alone, or a whole checkpoint's) as the AutoencoderKL
    of ``architecture`` (the model's own VAE config), through diffusers' converter: every weight
    checked against the module's keys and shapes before one is read, as a checkpoint's parts are."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(architecture)
    stamp = _identity(path)
    layout = read_layout(path)
    # (a whole checkpoint's VAE is under its prefix; a VAE file's tensors are all the VAE's, as diffusers reads them)
    prefixes = VAE_PREFIXES if any(k.startswith(VAE_PREFIXES) for k in layout) else ("",)
    part = Part("vae", lambda: AutoencoderKL.from_config(config),
                lambda module, tensors: dict(convert_ldm_vae_checkpoint(tensors, module.config)), prefixes)
    _load_part(path, part, layout)  # keys and shapes, no weight read
    return _builder(path, part, stamp, dtype)()


def check_unchanged(path: Path, stamp: list[int]) -> None:
    """Refuse a file whose identity is no longer ``stamp``: an export must not mix parts of two files."""
    if _identity(path) != stamp:
        raise ModelLoadError(
            f"{path}: the checkpoint changed after sdexport checked it (its size, times or inode); its parts "
            "would not all come from one file, so run again once the file is in its final state"
        )


def _builder(path: Path, part: Part, stamp: list[int], dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        with open_tensors(path, dtype, stamp) as tensors:
            module = _load_part(path, part, tensors)
        check_unchanged(path, stamp)  # and not rewritten in place while it was read
        return module.to(dtype).eval().requires_grad_(False)
    return build


def _load_part(path: Path, part: Part, tensors: Tensors) -> torch.nn.Module:
    """Build ``part`` without weights, convert the checkpoint's tensors for it, refuse gaps, load.
    With the file's layout (meta tensors) this is the check alone: keys and shapes, nothing read."""
    name = part.name
    with torch.device("meta"):
        module = part.build()
    try:
        weights = part.convert(module, tensors)
    except ModelLoadError as exc:  # the converters' own refusals lack the path; the reader's have it
        raise exc if str(exc).startswith(f"{path}: ") else type(exc)(f"{path}: {exc}") from None
    except KeyError as exc:  # a converter indexing a tensor the checkpoint does not have
        raise ModelLoadError(
            f"{path}: the checkpoint lacks {name} weight {exc.args[0]!r}; is --config the right architecture?"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot convert the {name} weights ({one_line(exc)})") from exc
    state = module.state_dict()
    expected = state.keys()
    missing = sorted(expected - weights.keys())
    if missing:
        raise ModelLoadError(
            f"{path}: the checkpoint lacks {len(missing)} of the {len(expected)} {name} weights of the "
            f"--config architecture, e.g. {', '.join(missing[:3])}; is --config the right model?"
        )
    extra = [k for k in weights.keys() - expected if not k.endswith(_HARMLESS_EXTRA)]
    if not extra and isinstance(tensors, dict):  # the layout's check (its tensors are the file's, by identity)
        extra = unused_weights(tensors, part.prefixes, weights)
    if extra:
        raise ModelLoadError(
            f"{path}: the checkpoint has {len(extra)} {name} weights the --config architecture does not, "
            f"e.g. {', '.join(sorted(extra)[:3])}; is --config the right model?"
        )
    weights = {k: v for k, v in weights.items() if k in expected}
    integral = sorted(k for k, v in weights.items() if state[k].is_floating_point() and not v.is_floating_point())
    if integral:  # (torch's refusal said the shapes did not fit, listing two equal shapes)
        first = integral[0]
        raise ModelLoadError(f"{path}: the checkpoint stores {len(integral)} {name} weights as whole numbers or "
                             f"booleans ({first} is {str(weights[first].dtype).removeprefix('torch.')}), where the "
                             "model's are floating point: not a model's trained weights")
    return _take(module, weights, part, path)


def unused_weights(layout: Mapping[str, torch.Tensor], prefixes: tuple[str, ...],
                   weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The file's tensors under ``prefixes`` that diffusers' converter left out of ``weights``.

    The converters copy every key under their prefix, then pick the ones they know: a key they do
    not (an unCLIP model's ``label_emb``, blocks of a deeper U-Net) is dropped without a word, and
    the export draws other images than the file would. Converted from the layout (meta tensors),
    ``weights`` holds the file's own tensor objects where a key was renamed, and new ones where it
    was reshaped (the VAE's attention, 1x1 convolutions made linear): each of those accounts for a
    tensor not taken as it is of as many values; what is left was dropped. Only prefixes the
    converter took from count (a file's second VAE copy under another prefix is another matter)."""
    from collections import Counter

    taken = {id(t) for t in weights.values()}
    ours = {k: t for k, t in layout.items() if k.startswith(prefixes)}
    used = tuple(p for p in prefixes if any(k.startswith(p) and id(t) in taken for k, t in ours.items()))
    mine = {id(t) for t in layout.values()}
    reshaped = Counter(t.numel() for t in weights.values() if id(t) not in mine)
    dropped = []
    for key, tensor in sorted(ours.items()):
        if not key.startswith(used) or id(tensor) in taken or _training_only(key, used):
            continue
        if reshaped[tensor.numel()]:
            reshaped[tensor.numel()] -= 1
        else:
            dropped.append(key)
    return dropped


TRAINING_ONLY = ("loss.", "model_ema.decay", "model_ema.num_updates")
"""What a VAE's training checkpoint keeps beside the model: its loss networks (discriminator, LPIPS,
log-variance) and the EMA's two counters (vae-ft-mse-840000-ema-pruned has them; A1111 drops the same
keys). No part of the autoencoder, and rightly left by the converter."""


def _training_only(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefix) and key[len(prefix):].startswith(TRAINING_ONLY) for prefix in prefixes)


def _take(module: torch.nn.Module, weights: dict[str, torch.Tensor], part: Part, path: Path) -> torch.nn.Module:
    """Load ``weights`` into the meta-device ``module``; a module with buffers the state dict does not
    carry (rebuilt at construction, e.g. position ids) is built for real instead and loaded by copy.
    Meta ``weights`` (the layout) stop after the first load: torch has compared the shapes."""
    try:
        module.load_state_dict(weights, strict=True, assign=True)
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module
        if any(w.is_meta for w in weights.values()):
            return module
        module = part.build()
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # shape mismatches: torch lists each one
        raise ModelLoadError(
            f"{path}: the {part.name} weights do not fit the --config architecture ({one_line(exc)})"
        ) from exc
    return module


WITHOUT_PART = {
    "VAE": "give --vae FILE (a VAE file, .safetensors or .ckpt) or --vae DIR (a diffusers VAE folder) to take it from there",
    "text encoder": "the file alone cannot give one: export a diffusers directory of the model",
}
"""What to do about a part a pruned checkpoint lacks."""


class NoPartWeights(ModelLoadError):
    """The checkpoint holds none of a part's weights (a file pruned of its text encoder, say): fatal
    only where the part is needed (``plan_components``)."""


def _require_prefix(tensors: Tensors, prefixes: tuple[str, ...], what: str) -> None:
    if not any(k.startswith(prefixes) for k in tensors):
        raise NoPartWeights(f"no {what} weights ({' or '.join(p + '*' for p in prefixes)}) in the checkpoint"
                            + (f"; {WITHOUT_PART[what]}" if what in WITHOUT_PART else ""))


def _clip(prefix: str) -> Converter:
    """OpenAI CLIP text encoder (SD 1.x, SDXL's first) under ``prefix``."""
    def convert(model: torch.nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
        from diffusers.loaders import single_file_utils

        _require_prefix(tensors, (prefix,), "text encoder")
        # a prefix diffusers removes anyway, given again, would have it read every tensor twice
        known = getattr(single_file_utils, "LDM_CLIP_PREFIX_TO_REMOVE", ())
        return dict(single_file_utils.convert_ldm_clip_checkpoint(tensors, None if prefix in known else prefix))
    return convert


def _open_clip(prefix: str) -> Converter:
    """OpenCLIP text encoder (SD 2.x, SDXL's second) under ``prefix``."""
    def convert(model: torch.nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        _require_prefix(tensors, (prefix,), "text encoder")
        return dict(convert_open_clip_checkpoint(model, tensors, prefix=prefix))
    return convert


def _sd_text_encoder(model: torch.nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
    """SD 1.x ships OpenAI CLIP (``cond_stage_model.transformer``), SD 2.x OpenCLIP (``.model``)."""
    if any(k.startswith("cond_stage_model.model.") for k in tensors):
        return _open_clip("cond_stage_model.model.")(model, tensors)
    return _clip("cond_stage_model.transformer.")(model, tensors)


def _flatten(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 dropped the ``text_model.`` level of CLIPTextModel; match the module's keys."""
    if hasattr(model, "text_model"):
        return weights
    return {k.removeprefix("text_model."): v for k, v in weights.items()}

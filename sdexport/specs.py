"""One declarative spec per exported component.

A ``ComponentSpec`` names a component's ONNX inputs and outputs and spells each tensor's shape with
symbols. The exporter (dynamic axes, sample inputs), the verifier (shapes to test), the TensorRT
profile builder (min/opt/max), the runtime (request checks, buffers) and the tests all resolve these
symbols instead of writing shapes themselves, so a shape is written exactly once: here.

Symbols:
    B        batch the component sees (under classifier-free guidance, up to 2x the image batch
             for components with ``cfg_batch``)
    H, W     image height and width in pixels            (dynamic)
    h, w     latent height and width, H/f and W/f        (dynamic)
    S        tokenizer sequence length (77 for CLIP)     (static, from the model)
    X        text tokens the U-Net (and a ControlNet) attends to: S per prompt chunk, as A1111 reads
             a long prompt in chunks of S - 2 tokens, each encoded on its own (dynamic: the
             profile's ``chunks``)
    E        text hidden size the U-Net attends to      (static, from the model)
    E1, E2   hidden sizes of SDXL's two text encoders    (static)
    P        pooled text embedding size                  (static)
    C        latent channels                             (static)
    U        U-Net input channels: C, or 2C + 1 for an inpainting U-Net, whose input is the
             latents, the mask and the masked image's latents side by side (static)
    T        number of SDXL time ids (6; the refiner's 5)  (static)
    L1, L2   hidden layers of SDXL's two text encoders   (static; outputs one hidden state per layer)
    A        channels of a T2I-Adapter's image: 3, or 1 for a greyscale one (static)
    K        control images a union ControlNet takes per call, one per control mode (static)
    N        control modes a union ControlNet knows (``num_control_type``: 6, or 8 for ProMax) (static)
    G        size of the guidance embedding a latent consistency model's U-Net takes
             (``time_cond_proj_dim``: 256 for LCM-distilled SD 1.5 and SDXL) (static)
    h/2, w/4 a latent side divided by 2, 4, ... : where a ControlNet's residuals (or an adapter's
             features) meet the U-Net's down blocks       (dynamic, derived from h and w)
    digits   a fixed size
    ()       no dimensions at all: a scalar (the U-Net's timestep, as diffusers and optimum pass it)

Tensor names are optimum's (``optimum.exporters.onnx``'s diffusers configs), so optimum's
``ORTDiffusionPipeline`` and ONNX Runtime's SD optimizer read an sdexport directory, and sdexport
reads (``sdexport adopt``) theirs: the U-Net's ``sample``/``timestep``/``encoder_hidden_states`` →
``out_sample``, the VAE decoder's ``latent_sample`` → ``sample``, the VAE encoder's ``sample`` →
``latent_parameters``, and CLIP's outputs under transformers' names (SDXL's encoders add
``hidden_states.{i}``, one per layer, which diffusers' SDXL pipeline indexes from the end).

ControlNets are components too (``controlnet``, then ``controlnet_1``, ``controlnet_2``, ... as
diffusers' ``MultiControlNetModel`` saves them). A ControlNet returns one residual per skip
connection of the U-Net's down path and one for its mid block, under diffusers' argument names
(``down_block_res_samples.{i}``, ``mid_block_res_sample``), and the U-Net of a model exported with
ControlNets takes them (``down_block_additional_residuals.{i}``, ``mid_block_additional_residual``).
Their channels and sizes are the U-Net's (``ModelDims.residuals``): the same spec entries expand to
them for the ControlNet's outputs and the U-Net's inputs, and to nothing for a U-Net without them.

A T2I-Adapter is one component too (``adapter``), called once per image rather than once per step:
it turns the adapter image into one feature map per down block of the U-Net (``adapter_state.{i}``,
after diffusers' pipelines), which the U-Net of a model exported with it adds inside those blocks
(``down_intrablock_additional_residuals.{i}``, diffusers' argument). Their channels and sizes are
``ModelDims.adapter_features``; the image's channels are ``A`` (1 for the sketch and canny adapters).
Several adapters (diffusers' ``MultiAdapter``) are one component each (``adapter``, then
``adapter_1``, ``adapter_2``, ... as diffusers reads them), each its own image's channels
(``ModelDims.adapter_channels``); their features, all of one layout, add up before the U-Net.

A union ControlNet (diffusers' ``ControlNetUnionModel``: xinsir's controlnet-union-sdxl, one network
for many kinds of control image) is a ControlNet whose inputs differ: ``K`` control images stacked
(``controlnet_cond``: (B, K, 3, H, W)), the control mode of each (``control_type_idx``) and the
one-hot set of them (``control_type``), and one scale per image, under diffusers' argument names.
``for_model`` swaps them in for a model whose ControlNets are union ones (``ModelDims.N``); the
residuals they return are every ControlNet's.

A latent consistency model (LCM-distilled SD 1.5 or SDXL: a U-Net config with ``time_cond_proj_dim``)
takes the guidance scale as an input of the U-Net rather than as a second, unconditional batch half:
``timestep_cond`` (optimum's name, diffusers' argument), the scale's sinusoidal embedding, one row
per image. ``for_model`` adds it after the U-Net's other inputs where ``ModelDims.G`` says so.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from sdexport.errors import SdexportError

if TYPE_CHECKING:  # torch is heavy; the runtime reads specs without needing it
    import torch

DType = Literal["int32", "float", "float32"]
"""``float`` follows the export precision; ``float32`` stays float32 in an fp16 export, and so does
the computation on it up to its first weighted layer (the sinusoidal timestep and time-id
projections, as in diffusers). Graph inputs and outputs are float32 either way."""

FusionModel = Literal["clip", "unet", "vae"]

Values = Literal["normal", "tokens", "timestep", "pixels", "time_ids", "unit", "scale", "modes", "one_hot"]
"""What realistic values of a tensor look like, for sample inputs in export and verification
(``unit``: in [0, 1], as a ControlNet's conditioning image; ``scale``: around 1, as its
conditioning scale, so that verification never multiplies the outputs by almost nothing;
``modes``: indices below ``N``, as a union ControlNet's control modes; ``one_hot``: rows of 0s
with a 1, as its ``control_type``)."""

DYNAMIC_SYMBOLS = ("B", "H", "W", "h", "w", "X")
_DIM = re.compile(r"(\d*)([A-Za-z]\w*)?(?:/(\d+))?")


def resolve_dim(dim: str, sizes: dict[str, int]) -> int:
    """``"77"`` → 77, ``"E"`` → sizes["E"], ``"2C"`` → 2 * sizes["C"], ``"h/4"`` → sizes["h"] // 4."""
    match = _DIM.fullmatch(dim)
    if not match or not dim or (match.group(3) and not match.group(2)):
        raise ValueError(f"bad dimension {dim!r}")
    factor, symbol, divisor = match.groups()
    if symbol is None:
        return int(factor)
    return (int(factor) if factor else 1) * sizes[symbol] // (int(divisor) if divisor else 1)


def is_dynamic(dim: str) -> bool:
    """Whether a dimension varies between calls: a dynamic symbol, or one divided (``h/2``)."""
    return dim.split("/", 1)[0] in DYNAMIC_SYMBOLS


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str, ...]
    dtype: DType = "float"
    values: Values = "normal"
    repeat: str | None = None
    """A symbol ``L``: this entry stands for ``L + 1`` tensors named ``name.format(i=0..L)`` (one per
    hidden state: the embeddings' and each layer's). ``DOWN_RESIDUALS``/``MID_RESIDUAL``: one tensor
    per residual of ``ModelDims.residuals`` (none without them), its dims formatted with the
    residual's channels ``c`` and latent downscale ``s``; ``ADAPTER_FEATURES`` the same over
    ``ModelDims.adapter_features``. ``ComponentSpec.for_model`` expands it."""

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic axes: axis index → the symbol that names it in the graph."""
        return {i: d for i, d in enumerate(self.dims) if is_dynamic(d)}

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, sizes) for d in self.dims)


@dataclass(frozen=True)
class ComponentSpec:
    """What one exported graph takes and returns, and how to get it out of a loaded model."""

    name: str
    module: str
    """Attribute of the loaded model that holds the PyTorch module (``unet``, ``vae``, ...)."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: Callable[[torch.nn.Module], torch.nn.Module] = field(repr=False, compare=False)
    """Builds the module whose ``forward(*inputs)`` returns ``outputs`` in order."""
    cfg_batch: bool = False
    """Called with the positive and negative halves batched together (2B) under CFG (never in a
    latent consistency model: ``for_model``)."""
    always_fp32: bool = False
    """Exported in fp32 whatever the export precision (the fp16-overflow fallback VAE decoder, SDXL's
    upcast VAE encoder)."""
    per_step: bool = False
    """Called once per denoising step (the U-Net, the ControlNets): where a CUDA graph's saved launches
    add up, and what ONNX Runtime captures (its text encoders have CPU-only operators)."""
    fusion_model: FusionModel = "unet"
    """The model type onnxruntime's transformer optimizer fuses this graph as (``sdexport build
    --target onnxruntime-cuda``): its attention, GroupNorm and convolution patterns differ by type."""
    takes_residuals: bool = False
    """A U-Net: in a model with ControlNets (``ModelDims.residuals``) it also takes their residuals,
    after its other inputs, and in one with a T2I-Adapter (``ModelDims.adapter_features``) the
    adapter's features (``for_model`` adds them); a latent consistency model's (``ModelDims.G``)
    takes its guidance embedding before either."""
    builds_in_clip_skip: bool = False
    """SD's text encoder: a model's ``ModelDims.clip_skip`` is built into its graph (``for_model``
    hands it to the wrapper). SDXL's give every layer's hidden state, and the runtime picks."""

    def for_model(self, dims: ModelDims) -> ComponentSpec:
        """This spec with its repeated tensors expanded for one model's sizes (``dims``), and a
        U-Net's guidance embedding, ControlNet residual or adapter feature inputs added where the
        model has them. A latent consistency model's components (``dims.G``) see no CFG batch: its
        U-Net takes the guidance embedded, and no unconditional half runs."""
        if dims.G and self.cfg_batch:
            self = replace(self, cfg_batch=False)
        if self.takes_residuals and dims.G and GUIDANCE_EMBEDDING not in self.input_names:
            self = replace(self, inputs=(*self.inputs, _GUIDANCE_EMBEDDING_INPUT),
                           wrapper=_taking_guidance_embedding(self.wrapper))
        if dims.clip_skip and self.builds_in_clip_skip:
            self = replace(self, wrapper=_reading_clip_skip(self.wrapper, dims.clip_skip))
        if self.takes_residuals and dims.residuals and not self.residual_inputs:
            self = replace(self, inputs=(*self.inputs, *_RESIDUAL_INPUTS))
        if self.takes_residuals and dims.adapter_features and not self.adapter_inputs:
            self = replace(self, inputs=(*self.inputs, *_ADAPTER_INPUTS),
                           wrapper=_taking_adapter_features(self.wrapper))
        index = adapter_index(self.name)
        if index is not None and dims.adapter_channels and index < len(dims.adapter_channels):
            # each adapter of several reads its own image's channels (the spec's A is the first's)
            channels = str(dims.adapter_channels[index])
            self = replace(self, inputs=tuple(replace(t, dims=tuple(channels if d == "A" else d for d in t.dims))
                                              for t in self.inputs))
        if dims.N and self.name.startswith(CONTROLNET_PREFIX) and not self.union:
            self = replace(self, inputs=(*self.inputs[:-len(_CONTROL_INPUTS)], *_UNION_CONTROL_INPUTS),
                           wrapper=_union_controlnet_wrapper)
        if not any(t.repeat for t in (*self.inputs, *self.outputs)):
            return self
        sizes = dims.sizes(1, 0, 0)

        def expand(tensors: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
            out: list[TensorSpec] = []
            for t in tensors:
                if t.repeat is None:
                    out.append(t)
                    continue
                if t.repeat in (DOWN_RESIDUALS, MID_RESIDUAL):
                    if self.name.startswith(CONTROLNET_PREFIX) and not dims.residuals:
                        raise ValueError(f"{self.name}: the model's ControlNet residuals are not known")
                    chosen = dims.residuals[:-1] if t.repeat == DOWN_RESIDUALS else dims.residuals[-1:]
                    out.extend(_residual(t, i, channels, scale) for i, (channels, scale) in enumerate(chosen))
                    continue
                if t.repeat == ADAPTER_FEATURES:
                    if not dims.adapter_features:
                        raise ValueError(f"{self.name}: the model's adapter features are not known")
                    out.extend(_residual(t, i, channels, scale)
                               for i, (channels, scale) in enumerate(dims.adapter_features))
                    continue
                count = sizes[t.repeat] + 1
                if count < 2:
                    raise ValueError(f"{self.name}.{t.name}: the model's {t.repeat} is not known")
                out.extend(replace(t, name=t.name.format(i=i), repeat=None) for i in range(count))
            return tuple(out)

        return replace(self, inputs=expand(self.inputs), outputs=expand(self.outputs))

    @property
    def resolved(self) -> bool:
        """Every tensor is concrete (``for_model`` was applied where the spec has repeated ones)."""
        return not any(t.repeat for t in (*self.inputs, *self.outputs))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        if not self.resolved:  # a name like "hidden_states.{i}" is no graph's: a missed for_model
            raise ValueError(f"{self.name}: spec not resolved for a model (ComponentSpec.for_model)")
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor named {name!r}")

    @property
    def residual_inputs(self) -> list[str]:
        """The ControlNet residuals this (U-Net) spec takes, down blocks' first (none without ControlNets)."""
        return [t.name for t in self.inputs if t.name.startswith(RESIDUAL_INPUT_PREFIXES)]

    @property
    def residual_outputs(self) -> list[str]:
        """The residuals this (ControlNet) spec returns, in the order of ``residual_inputs``."""
        return [t.name for t in self.outputs if t.name.startswith(RESIDUAL_OUTPUT_PREFIXES)]

    @property
    def union(self) -> bool:
        """A union ControlNet's spec (its control images stacked, with their modes)."""
        return any(t.name == "control_type_idx" for t in self.inputs)

    @property
    def adapter_inputs(self) -> list[str]:
        """The T2I-Adapter features this (U-Net) spec takes, first down block's first (none without)."""
        return [t.name for t in self.inputs if t.name.startswith(ADAPTER_INPUT_PREFIX)]

    @property
    def adapter_outputs(self) -> list[str]:
        """The features this (adapter) spec returns, in the order of ``adapter_inputs``."""
        return [t.name for t in self.outputs if t.name.startswith(ADAPTER_OUTPUT_PREFIX)]


def _taking_adapter_features(wrapper: Callable[..., torch.nn.Module]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A U-Net wrapper whose extra inputs are a T2I-Adapter's features, not ControlNet residuals."""
    return functools.partial(wrapper, adapter=True)


def _reading_clip_skip(wrapper: Callable[..., torch.nn.Module], clip_skip: int) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A text encoder wrapper whose output is ``clip_skip`` layers before the last (``_text_encoder_wrapper``)."""
    return functools.partial(wrapper, clip_skip=clip_skip)


def _taking_guidance_embedding(wrapper: Callable[..., torch.nn.Module]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """A U-Net wrapper whose first extra input is a latent consistency model's ``timestep_cond``."""
    return functools.partial(wrapper, guidance_embedding=True)


DOWN_RESIDUALS = "down_residuals"
MID_RESIDUAL = "mid_residual"
ADAPTER_FEATURES = "adapter_features"
CONTROLNET_PREFIX = "controlnet"
ADAPTER = "adapter"
RESIDUAL_INPUT_PREFIXES = ("down_block_additional_residuals.", "mid_block_additional_residual")
RESIDUAL_OUTPUT_PREFIXES = ("down_block_res_samples.", "mid_block_res_sample")
ADAPTER_INPUT_PREFIX = "down_intrablock_additional_residuals."
ADAPTER_OUTPUT_PREFIX = "adapter_state."
GUIDANCE_EMBEDDING = "timestep_cond"


def _residual(template: TensorSpec, index: int, channels: int, scale: int) -> TensorSpec:
    """One residual tensor: the template's dims with ``{c}`` its channels and ``{s}`` its latent
    downscale (``h/{s}`` at scale 1 is plain ``h``, the same symbol as the latents')."""
    def dim(d: str) -> str:
        d = d.format(c=channels, s=scale)
        return d.removesuffix("/1")

    return replace(template, name=template.name.format(i=index), dims=tuple(dim(d) for d in template.dims),
                   repeat=None)


@dataclass(frozen=True)
class ModelDims:
    """The static sizes of one model, read from its configs (never guessed)."""

    S: int
    E: int
    P: int
    C: int
    vae_scale_factor: int
    unet_downsample: int
    """Latent sides must be multiples of this (2 ** (number of down blocks - 1))."""
    E1: int = 0
    E2: int = 0
    T: int = 0
    L1: int = 0
    L2: int = 0
    """Hidden layers of SDXL's text encoders (0 where no spec repeats over them)."""
    U: int = 0
    """U-Net input channels where they differ from C: 2C + 1 for an inpainting U-Net (0: C)."""
    residuals: tuple[tuple[int, int], ...] = ()
    """With ControlNets: (channels, latent downscale) of each residual a ControlNet adds to the
    U-Net, its down path's skip connections in order and its mid block's last (empty without)."""
    adapter_features: tuple[tuple[int, int], ...] = ()
    """With a T2I-Adapter: (channels, latent downscale) of each feature it adds inside the U-Net's
    down blocks (and its mid block, where one is left over that fits it), in order (empty without)."""
    A: int = 0
    """With a T2I-Adapter: its image's channels (3, or 1 for a greyscale adapter); the first's of several."""
    adapter_channels: tuple[int, ...] = ()
    """With several T2I-Adapters: each one's image channels, in order (empty with one: ``A``)."""
    K: int = 0
    """With union ControlNets: the control images each takes per call (0 without)."""
    N: int = 0
    """With union ControlNets: the control modes they know (``num_control_type``; 0 without)."""
    G: int = 0
    """A latent consistency model's U-Net: the size of the guidance embedding it takes
    (``time_cond_proj_dim``; 0 for every other U-Net, which is guided by a second batch half)."""
    clip_skip: int = 0
    """The text encoder layers the prompt is read past, counted back from the last (diffusers'
    ``clip_skip``; A1111's "Clip skip" is one more): ``export --clip-skip``'s, 0 without. Not read
    from configs but chosen for the model, as checkpoints trained on an earlier layer's output need.
    SD's text encoder graph then returns that layer's hidden state through the final layer norm as
    its ``last_hidden_state`` (baked in); SDXL's export every layer's, so there it is the runtime's
    default, which a request may change."""

    def __post_init__(self) -> None:  # a manifest's JSON gives lists
        for name in ("residuals", "adapter_features"):
            object.__setattr__(self, name, tuple((int(c), int(s)) for c, s in getattr(self, name)))
        object.__setattr__(self, "adapter_channels", tuple(int(c) for c in self.adapter_channels))

    def record(self) -> dict[str, Any]:
        """The manifest's ``dims``: U only for an inpainting U-Net, residuals only with ControlNets,
        the adapter's sizes only with one (each adapter's channels only with several), K and N only
        with union ControlNets, G only for a latent consistency model, clip_skip only where set, so
        other directories stay readable by sdexport versions that predate them."""
        values: dict[str, Any] = dict(vars(self))
        for name in ("U", "A", "K", "N", "G", "clip_skip"):
            if not values[name]:
                del values[name]
        if values["adapter_channels"]:
            values["adapter_channels"] = list(values["adapter_channels"])
        else:
            del values["adapter_channels"]
        for name in ("residuals", "adapter_features"):
            if values[name]:
                values[name] = [list(r) for r in values[name]]
            else:
                del values[name]
        return values

    @property
    def adapter_image_channels(self) -> tuple[int, ...]:
        """Each T2I-Adapter's image channels, in order (empty without an adapter)."""
        return self.adapter_channels or ((self.A,) if self.adapter_features else ())

    @property
    def unet_channels(self) -> int:
        return self.U or self.C

    @property
    def conditioned(self) -> bool:
        """The U-Net takes more than the text: ControlNet residuals, T2I-Adapter features or the
        guidance (a latent consistency model's embedding), which diffusers runs with pipelines of
        their own rather than its SD ones."""
        return bool(self.residuals or self.adapter_features or self.G)

    @property
    def inpainting(self) -> bool:
        """The U-Net also takes a mask and the masked image's latents (diffusers' 9-channel U-Nets)."""
        return self.unet_channels == 2 * self.C + 1

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.vae_scale_factor * self.unet_downsample

    def sizes(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, int]:
        """All symbol values for one concrete call (``chunks``: the prompt chunks each text is read in)."""
        f = self.vae_scale_factor
        return {
            "B": batch,
            "H": height,
            "W": width,
            "h": height // f,
            "w": width // f,
            "S": self.S,
            "X": self.S * chunks,
            "E": self.E,
            "E1": self.E1,
            "E2": self.E2,
            "P": self.P,
            "C": self.C,
            "T": self.T,
            "L1": self.L1,
            "L2": self.L2,
            "U": self.unet_channels,
            "A": self.A,
            "K": self.K,
            "N": self.N,
            "G": self.G,
        }



def check_clip_skip(label: str, value: object, layers: Iterable[int] = ()) -> None:
    """A clip skip (``ModelDims.clip_skip``), one rule for exports, requests and manifests: a whole
    number of layers, fewer than every text encoder has (``layers``; none given: unchecked)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SdexportError(f"{label} {value!r}: expected a whole number of layers, 0 or more (diffusers' clip_skip: "
                            "1 reads the penultimate layer, A1111's \"Clip skip: 2\")")
    counts = [n for n in layers if n]
    if counts and value >= min(counts):
        raise SdexportError(f"{label} {value}: the text encoder{'s have' if len(counts) > 1 else ' has'} "
                            f"{' and '.join(map(str, counts))} layers; skip at most {min(counts) - 1}")

# ---------------------------------------------------------------------------------------------
# Export wrappers: small modules with positional inputs and tuple outputs, in spec order.
# ---------------------------------------------------------------------------------------------


def _text_encoder_wrapper(module: torch.nn.Module, clip_skip: int = 0) -> torch.nn.Module:
    """``clip_skip`` (``ModelDims.clip_skip``): ``last_hidden_state`` is that many layers before the
    last one's, through the final layer norm, as diffusers' SD pipelines compute ``clip_skip``. The
    skipped layers stay in the graph (``pooler_output`` reads them), so LoRA files still find them."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not clip_skip:
                out = self.model(input_ids, return_dict=True)
                return out.last_hidden_state, out.pooler_output
            out = self.model(input_ids, output_hidden_states=True, return_dict=True)
            # transformers 5.6 moved CLIPTextModel's layers up from its text_model (diffusers' SD
            # pipelines still read text_model.final_layer_norm there, and fail: diffusers#14124)
            root: Any = getattr(self.model, "text_model", self.model)
            norm = root.final_layer_norm
            return norm(out.hidden_states[-(clip_skip + 1)]), out.pooler_output

    return TextEncoder(module)


def _sdxl_text_encoder_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    """Every hidden state as its own output, after transformers' two (as optimum exports SDXL's text
    encoders): diffusers' SDXL pipeline conditions on the penultimate one (``hidden_states[-2]``).
    First comes ``last_hidden_state`` (CLIPTextModel) or the projection ``text_embeds``
    (CLIPTextModelWithProjection, whose first output the pipeline takes as the pooled embedding)."""
    import torch

    class SDXLTextEncoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(input_ids, output_hidden_states=True, return_dict=True)
            first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else (
                out.last_hidden_state, out.pooler_output)
            return (*first, *out.hidden_states)

    return SDXLTextEncoder(module)


def _residual_kwargs(residuals: tuple[torch.Tensor, ...], adapter: bool) -> dict[str, Any]:
    """A ControlNet's residuals (down blocks', then the mid block's), or a T2I-Adapter's features,
    as the U-Net's keyword arguments (diffusers pops the features from a list as it uses them)."""
    if not residuals:
        return {}
    if adapter:
        return {"down_intrablock_additional_residuals": list(residuals)}
    return {"down_block_additional_residuals": tuple(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}


def _extra_kwargs(extra: tuple[torch.Tensor, ...], adapter: bool, guidance_embedding: bool) -> dict[str, Any]:
    """A U-Net's inputs after its own, as its keyword arguments: a latent consistency model's
    guidance embedding first, then a ControlNet's residuals or a T2I-Adapter's features."""
    if guidance_embedding:
        return {"timestep_cond": extra[0], **_residual_kwargs(extra[1:], adapter)}
    return _residual_kwargs(extra, adapter)


def _unet_wrapper(module: torch.nn.Module, adapter: bool = False, guidance_embedding: bool = False) -> torch.nn.Module:
    """``adapter``: the extra inputs are a T2I-Adapter's features, not ControlNet residuals;
    ``guidance_embedding``: the first of them is a latent consistency model's ``timestep_cond``."""
    import torch

    class UNet(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
            *extra: torch.Tensor,
        ) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states,
                              **_extra_kwargs(extra, adapter, guidance_embedding), return_dict=False)[0]

    return UNet(module)


def _sdxl_unet_wrapper(module: torch.nn.Module, adapter: bool = False, guidance_embedding: bool = False) -> torch.nn.Module:
    import torch

    class SDXLUNet(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            sample: torch.Tensor,
            timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            text_embeds: torch.Tensor,
            time_ids: torch.Tensor,
            *extra: torch.Tensor,
        ) -> torch.Tensor:
            cond = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.model(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=cond,
                **_extra_kwargs(extra, adapter, guidance_embedding),
                return_dict=False,
            )[0]

    return SDXLUNet(module)


def _controlnet_wrapper(module: torch.nn.Module, union: bool = False) -> torch.nn.Module:
    """The residuals flat, down blocks' first. SD: (sample, timestep, encoder_hidden_states,
    controlnet_cond, conditioning_scale); SDXL puts text_embeds and time_ids before the image.

    ``union``: a ``ControlNetUnionModel``, whose images come stacked (B, K, 3, H, W) and are passed
    as diffusers' list of K, with their modes (``control_type_idx``, K one-element tensors: the graph
    takes them as an input, not as constants of the trace, and ``torch.compile`` traces a lookup by
    them without a graph break, which a 0-d index is) and one scale each. diffusers scales the
    residuals by the one scale where K is 1 and scales the images' features inside where K is
    more; the graph does whichever its K calls for.

    A pooling ControlNet (``global_pool_conditions``, e.g. shuffle) averages each residual over its
    pixels inside diffusers' forward, and the U-Net adds the (B, C, 1, 1) result by broadcasting.
    Here it is expanded back to the residual's side in the graph, so every ControlNet has the same
    outputs and the U-Net the same inputs (the specs' ``h/{s}``); the sum is the same."""
    import torch

    from sdexport.models.controlnet import pooled_sides

    class ControlNet(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            if union:  # in place, computing the same: the module's other users see no difference
                for layer in model.transformer_layes:  # type: ignore[union-attr]
                    if isinstance(layer.attn, torch.nn.MultiheadAttention):
                        layer.attn = _attention_over_the_batch()(layer.attn)
            self.model = model
            self.sdxl = getattr(model.config, "addition_embed_type", None) == "text_time"
            self.pooled_scales = pooled_sides(dict(model.config))  # type: ignore[arg-type]  # a FrozenDict

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cond = {"text_embeds": rest[0], "time_ids": rest[1]} if self.sdxl else None
            control: dict[str, Any]
            if union:
                images, control_type, modes, scales = rest[-4:]
                control = {"controlnet_cond": list(images.unbind(1)), "control_type": control_type,
                           "control_type_idx": list(modes.split(1)), "conditioning_scale": list(scales.unbind(0))}
            else:
                control = {"controlnet_cond": rest[-2], "conditioning_scale": rest[-1]}
            down, mid = self.model(sample, timestep, encoder_hidden_states, **control, added_cond_kwargs=cond,
                                   return_dict=False)
            residuals = (*down, mid)
            if self.pooled_scales:
                height, width = sample.shape[-2], sample.shape[-1]
                residuals = tuple(r.expand(-1, -1, height // s, width // s)
                                  for r, s in zip(residuals, self.pooled_scales))
            return residuals

    return ControlNet(module)


_union_controlnet_wrapper = functools.partial(_controlnet_wrapper, union=True)


@functools.cache
def _attention_over_the_batch() -> type[torch.nn.Module]:
    import torch

    class AttentionOverTheBatch(torch.nn.Module):
        """A union ControlNet's ``nn.MultiheadAttention``, computed by hand so that the graph keeps
        its batch dynamic: PyTorch's traces its sequence length as a constant.

        Its sequence is the batch. The union model hands the attention (B, K + 1, C), the control
        images' tokens and the latents', without ``batch_first``, so each token attends to the same
        token of every row of the batch (diffusers' code, which the published weights were trained
        with). This computes exactly that with the module's own weights. Only the images' tokens
        reach the residuals, so rows given the same control images (every ``run``) do not change
        each other; rows with their own (a masked init image per row) do, in diffusers too."""

        def __init__(self, attention: torch.nn.MultiheadAttention) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    need_weights: bool = False, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
            if attn_mask is not None or need_weights or not (query is key is value):
                raise NotImplementedError("self-attention without a mask only, as the union ControlNet calls it")
            mha = self.attention
            heads, width = mha.num_heads, mha.embed_dim
            x = query.transpose(0, 1)  # (K + 1, B, C): the batch is the sequence
            q, k, v = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.reshape(t.shape[0], -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
            weights = torch.softmax(q @ k.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1)
            out = (weights @ v).transpose(1, 2).reshape(x.shape[0], -1, width)
            return mha.out_proj(out).transpose(0, 1), None

    return AttentionOverTheBatch


def _adapter_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    """A T2I-Adapter's features as a tuple (diffusers returns a list)."""
    import torch

    class Adapter(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.model(image))

    return Adapter(module)


def _vae_decoder_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    import torch

    class VAEDecoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model: Any = model  # an AutoencoderKL: decode() is not torch.nn.Module's

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latent_sample, return_dict=False)[0]

    return VAEDecoder(module)


def _vae_encoder_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    """Returns the latent distribution's mean and log-variance so callers can sample with their seed."""
    import torch

    class VAEEncoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model: Any = model  # an AutoencoderKL: encode() is not torch.nn.Module's

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.model.encode(sample, return_dict=False)[0].parameters

    return VAEEncoder(module)


_LATENT = ("B", "C", "h", "w")
_RESIDUAL = ("B", "{c}", "h/{s}", "w/{s}")
_UNET_INPUT = ("B", "U", "h", "w")
"""The U-Net's ``sample``: the latents, and for an inpainting U-Net the mask and the masked image's
latents concatenated after them (one input, as diffusers and optimum pass it)."""

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    module="text_encoder",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int32", "tokens"),),
    outputs=(
        TensorSpec("last_hidden_state", ("B", "S", "E")),
        TensorSpec("pooler_output", ("B", "P")),
    ),
    wrapper=_text_encoder_wrapper,
    cfg_batch=True,
    fusion_model="clip",
    builds_in_clip_skip=True,
)

_RESIDUAL_INPUTS = (  # a ControlNet's residuals; none for a model exported without ControlNets
    TensorSpec("down_block_additional_residuals.{i}", _RESIDUAL, repeat=DOWN_RESIDUALS),
    TensorSpec("mid_block_additional_residual", _RESIDUAL, repeat=MID_RESIDUAL),
)
_RESIDUAL_OUTPUTS = (
    TensorSpec("down_block_res_samples.{i}", _RESIDUAL, repeat=DOWN_RESIDUALS),
    TensorSpec("mid_block_res_sample", _RESIDUAL, repeat=MID_RESIDUAL),
)
_CONTROL_INPUTS = (
    TensorSpec("controlnet_cond", ("B", "3", "H", "W"), values="unit"),
    TensorSpec("conditioning_scale", (), values="scale"),
)
_UNION_CONTROL_INPUTS = (  # a union ControlNet's, in place of _CONTROL_INPUTS (for_model)
    TensorSpec("controlnet_cond", ("B", "K", "3", "H", "W"), values="unit"),
    TensorSpec("control_type", ("B", "N"), "float32", "one_hot"),
    TensorSpec("control_type_idx", ("K",), "int32", "modes"),
    TensorSpec("conditioning_scale", ("K",), values="scale"),
)
"""``control_type`` is float32 in an fp16 export too: diffusers projects it sinusoidally in float32,
as it does the time ids."""

UNET = ComponentSpec(
    name="unet",
    module="unet",
    inputs=(
        TensorSpec("sample", _UNET_INPUT),
        TensorSpec("timestep", (), "float32", "timestep"),
        TensorSpec("encoder_hidden_states", ("B", "X", "E")),
    ),
    outputs=(TensorSpec("out_sample", _LATENT),),
    wrapper=_unet_wrapper,
    cfg_batch=True,
    per_step=True,
    takes_residuals=True,
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    module="vae",
    inputs=(TensorSpec("latent_sample", _LATENT),),
    outputs=(TensorSpec("sample", ("B", "3", "H", "W")),),
    wrapper=_vae_decoder_wrapper,
    fusion_model="vae",
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    module="vae",
    inputs=(TensorSpec("sample", ("B", "3", "H", "W"), values="pixels"),),
    outputs=(TensorSpec("latent_parameters", ("B", "2C", "h", "w")),),
    wrapper=_vae_encoder_wrapper,
    fusion_model="vae",
)

VAE_DECODER_FP32 = replace(VAE_DECODER, name="vae_decoder_fp32", always_fp32=True)
"""Exported beside an fp16 VAE decoder: the runtime decodes again with it when fp16 overflows."""

VAE_ENCODER_FP32 = replace(VAE_ENCODER, name="vae_encoder_fp32", always_fp32=True)
"""Exported beside an fp16 SDXL VAE encoder: where the VAE's config sets ``force_upcast`` the
runtime encodes init images with it, as diffusers' SDXL img2img and inpainting upcast the VAE
(``build.vae_upcast``). SD's pipelines ignore the flag, so SD exports carry none."""
VAE_ENCODERS = (VAE_ENCODER.name, VAE_ENCODER_FP32.name)
"""What only runs where a request starts from an image (img2img, inpainting)."""

SDXL_TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    module="text_encoder",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int32", "tokens"),),
    outputs=(
        TensorSpec("last_hidden_state", ("B", "S", "E1")),
        TensorSpec("pooler_output", ("B", "E1")),
        TensorSpec("hidden_states.{i}", ("B", "S", "E1"), repeat="L1"),
    ),
    wrapper=_sdxl_text_encoder_wrapper,
    cfg_batch=True,
    fusion_model="clip",
)

SDXL_TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    module="text_encoder_2",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int32", "tokens"),),
    outputs=(
        TensorSpec("text_embeds", ("B", "P")),
        TensorSpec("last_hidden_state", ("B", "S", "E2")),
        TensorSpec("hidden_states.{i}", ("B", "S", "E2"), repeat="L2"),
    ),
    wrapper=_sdxl_text_encoder_wrapper,
    cfg_batch=True,
    fusion_model="clip",
)

SDXL_UNET = ComponentSpec(
    name="unet",
    module="unet",
    inputs=(
        TensorSpec("sample", _UNET_INPUT),
        TensorSpec("timestep", (), "float32", "timestep"),
        TensorSpec("encoder_hidden_states", ("B", "X", "E")),
        TensorSpec("text_embeds", ("B", "P")),
        TensorSpec("time_ids", ("B", "T"), "float32", "time_ids"),
    ),
    outputs=(TensorSpec("out_sample", _LATENT),),
    wrapper=_sdxl_unet_wrapper,
    cfg_batch=True,
    per_step=True,
    takes_residuals=True,
)

CONTROLNET = ComponentSpec(
    name="controlnet",
    module="controlnet",
    inputs=(
        TensorSpec("sample", _LATENT),
        TensorSpec("timestep", (), "float32", "timestep"),
        TensorSpec("encoder_hidden_states", ("B", "X", "E")),
        *_CONTROL_INPUTS,
    ),
    outputs=_RESIDUAL_OUTPUTS,
    wrapper=_controlnet_wrapper,
    cfg_batch=True,
    per_step=True,
)
"""Called before the U-Net at every step it is active, with the U-Net's latents, timestep and text
conditioning; in guess mode with the conditional half of them only (the loop then adds zeros to the
unconditional half, as diffusers' ControlNet pipelines do)."""

SDXL_CONTROLNET = replace(CONTROLNET, inputs=(
    *CONTROLNET.inputs[:3],
    TensorSpec("text_embeds", ("B", "P")),
    TensorSpec("time_ids", ("B", "T"), "float32", "time_ids"),
    *_CONTROL_INPUTS,
))

_GUIDANCE_EMBEDDING_INPUT = TensorSpec(GUIDANCE_EMBEDDING, ("B", "G"))
"""A latent consistency model's guidance scale, embedded (``runtime.txt2img.guidance_embedding``):
diffusers computes it in float32 and casts it to the latents' dtype, so it follows the export's."""

_ADAPTER_INPUTS = (  # a T2I-Adapter's features; none for a model exported without one
    TensorSpec(ADAPTER_INPUT_PREFIX + "{i}", _RESIDUAL, repeat=ADAPTER_FEATURES),
)

T2I_ADAPTER = ComponentSpec(
    name=ADAPTER,
    module=ADAPTER,
    inputs=(TensorSpec("image", ("B", "A", "H", "W"), values="unit"),),
    outputs=(TensorSpec(ADAPTER_OUTPUT_PREFIX + "{i}", _RESIDUAL, repeat=ADAPTER_FEATURES),),
    wrapper=_adapter_wrapper,
    fusion_model="vae",  # convolutions and ReLUs only: no attention or text to fuse
)
"""Called once per run, on each distinct adapter image, before the loop: its features (times the
adapter scale) go to the U-Net at every step the adapter acts (diffusers' T2I-Adapter pipelines).
The same graph serves SD and SDXL (only the features' sizes differ)."""

SDXL_REFINER = "sdxl-refiner"
"""The SDXL refiner (stabilityai's stable-diffusion-xl-refiner-1.0 and its fine-tunes): an SDXL
U-Net conditioned on the second text encoder alone (E = E2, no ``text_encoder``), whose 5 time ids
carry an aesthetic score where the base model's carry the target size (``model_index.json``'s
``requires_aesthetics_score``). It refines an image (img2img, inpainting), never starts from noise."""
SDXL_FAMILIES = ("sdxl", SDXL_REFINER)
FAMILY_COMPONENTS: dict[str, tuple[ComponentSpec, ...]] = {
    "sd": (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, VAE_DECODER_FP32),
    "sdxl": (SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET, VAE_DECODER, VAE_ENCODER, VAE_DECODER_FP32,
             VAE_ENCODER_FP32),
    SDXL_REFINER: (SDXL_TEXT_ENCODER_2, SDXL_UNET, VAE_DECODER, VAE_ENCODER, VAE_DECODER_FP32, VAE_ENCODER_FP32),
}
"""Components per pipeline family, in the order the runtime calls them (encoder last: img2img)."""
LORA_COMPONENTS = (UNET.name, SDXL_TEXT_ENCODER.name, SDXL_TEXT_ENCODER_2.name)
"""The components LoRA files update: a LoRA state dict's prefixes name them, as diffusers' do."""


FAMILY_LABELS = {"sd": "SD", "sdxl": "SDXL", SDXL_REFINER: "SDXL refiner"}
"""How messages name a family."""


def text_encoders(family: str) -> list[str]:
    """The family's text encoder components, in call order (the module, tokenizer and config folder
    names follow them: ``text_encoder_2`` reads ``tokenizer_2``)."""
    return [s.name for s in components_for(family) if s.inputs[0].values == "tokens"]


def tokenizer_names(family: str) -> list[str]:
    """The tokenizers of the family's text encoders, as diffusers names them (``text_encoder_2``
    reads ``tokenizer_2``; the refiner keeps only that one)."""
    return [name.replace("text_encoder", "tokenizer") for name in text_encoders(family)]


def is_sdxl(family: str) -> bool:
    """SDXL's architecture (two-encoder base or refiner): its U-Net takes pooled text embeddings and
    time ids, its VAE may ask for fp32 (``force_upcast``)."""
    return family in SDXL_FAMILIES
FAMILY_CONTROLNET = {"sd": CONTROLNET, "sdxl": SDXL_CONTROLNET}
MAX_CONTROLNETS = 8
"""More than a few ControlNets at once is a mistake, not a use (each adds a U-Net encoder per step)."""
MAX_UNION_IMAGES = 8
"""A union ControlNet takes one image per control mode: ProMax knows 8."""
_CONTROLNET_NAME = re.compile(r"controlnet(?:_([1-9]\d*))?")
MAX_ADAPTERS = 4
"""More T2I-Adapters at once than a few is a mistake, not a use (each adds a call and one more
image to every request); preset adapters' seed slots, 5 + i, also stay below the 10 a preset has."""


def adapter_names(count: int) -> list[str]:
    """Component names of ``count`` T2I-Adapters as diffusers' ``MultiAdapter.from_pretrained``
    reads them: ``adapter``, ``adapter_1``, ``adapter_2``, ..."""
    return [ADAPTER if i == 0 else f"{ADAPTER}_{i}" for i in range(count)]


def adapter_index(name: str) -> int | None:
    """0 for ``adapter``, i for the i-th of ``adapter_names``, None for any other name."""
    names = adapter_names(MAX_ADAPTERS)
    return names.index(name) if name in names else None


def adapters_among(names: Iterable[str]) -> list[str]:
    """The T2I-Adapter names among ``names`` (components, modules, engines), in the order their
    images are given."""
    return sorted((n for n in names if adapter_index(n) is not None), key=lambda n: adapter_index(n) or 0)


def controlnet_names(count: int) -> list[str]:
    """Component names of ``count`` ControlNets, as diffusers' ``MultiControlNetModel`` saves them."""
    return [CONTROLNET_PREFIX if i == 0 else f"{CONTROLNET_PREFIX}_{i}" for i in range(count)]


def controlnet_index(name: str) -> int | None:
    """0 for ``controlnet``, i for ``controlnet_i``, None for any other name."""
    match = _CONTROLNET_NAME.fullmatch(name)
    if not match:
        return None
    index = int(match.group(1) or 0)
    return index if index < MAX_CONTROLNETS else None


def controlnets_among(names: Iterable[str]) -> list[str]:
    """The ControlNet names among ``names`` (components, modules, engines), in the order their
    control images are given: ``controlnet``, ``controlnet_1``, ..."""
    found = [n for n in names if controlnet_index(n) is not None]
    return sorted(found, key=lambda n: controlnet_index(n) or 0)


def components_for(family: str, controlnets: int = 0, adapters: int = 0) -> tuple[ComponentSpec, ...]:
    """The family's components in call order; ``controlnets`` ControlNets, or ``adapters``
    T2I-Adapters, come just before the U-Net."""
    try:
        specs = FAMILY_COMPONENTS[family]
    except KeyError:
        known = ", ".join(FAMILY_COMPONENTS)
        raise ValueError(f"unknown pipeline family {family!r} (known: {known})") from None
    if not controlnets and not adapters:
        return specs
    if family not in FAMILY_CONTROLNET:
        raise ValueError(f"the {family} family takes no ControlNets or T2I-Adapters")
    base = FAMILY_CONTROLNET[family]
    nets = tuple(replace(base, name=n, module=n) for n in controlnet_names(controlnets))
    added = tuple(replace(T2I_ADAPTER, name=n, module=n) for n in adapter_names(int(adapters)))
    at = next(i for i, s in enumerate(specs) if s.name == "unet")
    return (*specs[:at], *nets, *added, *specs[at:])


def txt2img_specs(family: str, controlnets: int = 0, adapters: int = 0) -> list[ComponentSpec]:
    """What a txt2img call runs, in call order: ``components_for`` less the VAE encoders (img2img's)
    and the fp32 fallbacks (``always_fp32``), which run only in the fp16 ones' places."""
    return [s for s in components_for(family, controlnets, adapters) if s.name not in VAE_ENCODERS and not s.always_fp32]


def component(family: str, name: str) -> ComponentSpec:
    index, adapter = controlnet_index(name), adapter_index(name)
    for spec in components_for(family, 0 if index is None else index + 1, 0 if adapter is None else adapter + 1):
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in components_for(family))
    raise KeyError(f"{family} has no component {name!r} (components: {known}, controlnet, controlnet_1, ..., "
                   f"{ADAPTER}, adapter_1, ...)")

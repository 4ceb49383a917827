"""Load a Stable Diffusion model from a diffusers directory, a single-file checkpoint or a preset.

Whatever the source, the result is a ``LoadedModel``: the PyTorch modules the ComponentSpecs name,
the tokenizer(s), the scheduler config, the static sizes (``ModelDims``) and a ``source`` record
that lets the Torch backend and the benchmarks load the same weights again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdexport.errors import ModelLoadError, one_line
from sdexport.models.dims import model_dims, pipeline_config
from sdexport.models.outline import (
    FAMILY_PIPELINES,
    SINGLE_FILE_SUFFIXES,
    check_single_file,
    family_of_dir,
    is_vae_file,
    looks_like_a_model,
    own_vae_config,
    read_json,
    scheduler_config,
    single_file_config,
    vae_config_dir,
    weight_files,
)
from sdexport.models.presets import PRESETS, SEED_STRIDE, Preset, config_digest, drawing_from, get_preset
from sdexport.models.tokenizer import save_tokenizer
from sdexport.specs import (
    ADAPTER,
    SDXL_REFINER,
    ModelDims,
    adapter_names,
    adapters_among,
    controlnet_index,
    controlnet_names,
    controlnets_among,
    text_encoders,
    tokenizer_names,
)

CONTROLNET_PIPELINES = {"sd": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}
INPAINT_PIPELINES = {"sd": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
                     SDXL_REFINER: "StableDiffusionXLInpaintPipeline"}
CONTROLNET_INPAINT_PIPELINES = {"sd": "StableDiffusionControlNetInpaintPipeline",
                                "sdxl": "StableDiffusionXLControlNetInpaintPipeline"}
"""The diffusers pipeline class a directory of an inpainting U-Net is saved as (per family, with and
without ControlNets), so that diffusers loads it as the pipeline that runs it."""
ADAPTER_PIPELINES = {"sd": "StableDiffusionAdapterPipeline", "sdxl": "StableDiffusionXLAdapterPipeline"}
UNION_PIPELINES = {False: "StableDiffusionXLControlNetUnionPipeline", True: "StableDiffusionXLControlNetUnionInpaintPipeline"}
"""Per inpainting U-Net or not: the pipeline class of an SDXL model with union ControlNets."""


@dataclass
class LoadedModel:
    family: str
    label: str
    modules: dict[str, torch.nn.Module]
    tokenizers: dict[str, Any]
    scheduler_config: dict[str, Any]
    random_weights: bool
    source: dict[str, Any]
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    """Pipeline options from model_index.json that change results (SDXL: force_zeros_for_empty_prompt)."""
    builders: dict[str, Callable[[], torch.nn.Module]] = field(default_factory=dict)
    """``load_model(lazy=True)``: how to build each module whose entry in ``modules`` is, until
    ``materialize``, a weightless skeleton on the meta device (configs, names and shapes, no weights)."""
    on_materialize: list[Callable[[str, torch.nn.Module], None]] = field(default_factory=list)
    """Called with each module ``materialize`` builds (export applies LoRA updates this way)."""
    union_images: int = 1
    """With union ControlNets: the control images each takes per call (``--union-images``)."""

    def module(self, name: str) -> torch.nn.Module:
        return self.modules[name]

    def materialize(self, name: str) -> torch.nn.Module:
        """The module with its weights, built now if it is still a skeleton.

        An export holds one component's weights at a time this way: the SDXL U-Net alone is 10 GB
        in float32, and all four parts together 14 GB before any copy an export makes."""
        module = self.modules[name]
        if is_skeleton(module):
            if name not in self.builders:
                raise RuntimeError(f"{name} was released and cannot be built again (it was not loaded lazily)")
            module = self.builders[name]().eval().requires_grad_(False)
            self.modules[name] = module
            for hook in self.on_materialize:
                hook(name, module)
        return module

    def release(self, name: str) -> None:
        """Free a module's weights: ``materialize`` builds a lazily loaded one again if asked; one
        loaded at once (a ControlNet, a --vae) is gone for good."""
        if not is_skeleton(self.modules[name]):
            self.modules[name] = self.modules[name].to("meta")

    def config(self, name: str) -> Any:
        """A module's diffusers/transformers config."""
        return self.modules[name].config

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def dims(self) -> ModelDims:
        """Sizes from the configs (``model_dims``)."""
        lengths = {n: int(t.model_max_length) for n, t in self.tokenizers.items()}
        return model_dims(self.family, {n: m.config for n, m in self.modules.items()}, lengths, self.label,
                          self.union_images)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.config("vae").scaling_factor)

    def pipeline_index(self) -> dict[str, Any]:
        """The diffusers ``model_index.json`` of this model: its pipeline class and the library and
        class of each part (the VAE under ``vae``, as optimum's ONNX exports keep it)."""
        controlnets = controlnets_among(self.modules)
        pipeline = FAMILY_PIPELINES[self.family]
        union = bool(self.dims.N)
        if union:
            pipeline = UNION_PIPELINES[self.dims.inpainting]
        elif self.dims.inpainting:
            pipeline = (CONTROLNET_INPAINT_PIPELINES if controlnets else INPAINT_PIPELINES)[self.family]
        elif controlnets:
            pipeline = CONTROLNET_PIPELINES[self.family]
        elif adapters_among(self.modules):
            pipeline = ADAPTER_PIPELINES[self.family]
        index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": _version("diffusers")}
        adapters = adapters_among(self.modules)
        for name, module in self.modules.items():
            if controlnet_index(name) is None and name not in adapters[1:]:
                index[name] = _library_of(module)
        if len(adapters) > 1:  # one MultiAdapter, read from adapter, adapter_1, adapter_2, ...
            index[ADAPTER] = ["diffusers", "MultiAdapter"]
        if controlnets:  # several are one MultiControlNetModel, saved as controlnet, controlnet_1, ...
            kind = "ControlNetUnionModel" if union else "ControlNetModel"
            index["controlnet"] = ["diffusers", kind if len(controlnets) == 1 else "Multi" + kind]
        for name, tok in self.tokenizers.items():
            index[name] = ["transformers", type(tok).__name__]
        index["scheduler"] = ["diffusers", self.scheduler_config["_class_name"]]
        if self.family == "sd":
            index.update(safety_checker=[None, None], feature_extractor=[None, None],
                         requires_safety_checker=False)
        if self.family == SDXL_REFINER:  # as stabilityai's: diffusers then loads it without them
            index.update(text_encoder=[None, None], tokenizer=[None, None])
        index.update(self.pipeline_config)
        return index

    def save_pretrained(self, directory: Path) -> None:
        """Write a diffusers-format directory (used by tests and to hand a preset to diffusers)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():
            module.save_pretrained(directory / name)  # type: ignore[operator]
            _prefix_clip_text_weights(module, directory / name)
        for name, tok in self.tokenizers.items():
            save_tokenizer(tok, directory / name)  # readable by transformers 4 (optimum) too
        scheduler_dir = directory / "scheduler"
        scheduler_dir.mkdir(exist_ok=True)
        (scheduler_dir / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2), encoding="utf-8")
        (directory / "model_index.json").write_text(json.dumps(self.pipeline_index(), indent=2), encoding="utf-8")


def _prefix_clip_text_weights(module: torch.nn.Module, folder: Path) -> None:
    """Write a ``CLIPTextModel``'s weights under ``text_model.``, as checkpoints on the Hub have them.

    transformers 5's CLIPTextModel is flat and saves its keys without that prefix; transformers 4
    (optimum's) then finds none of its weights and initializes them at random, with a warning only.
    transformers 5 reads the prefixed keys too."""
    weights = folder / "model.safetensors"
    if type(module).__name__ != "CLIPTextModel" or not weights.is_file():
        return
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    if all(k.startswith("text_model.") for k in state):
        return
    save_file({f"text_model.{k}": v for k, v in state.items()}, str(weights), metadata={"format": "pt"})


def is_skeleton(module: torch.nn.Module) -> bool:
    """True for a module built on the meta device (or released): shapes without values."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _skeleton(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """The module ``build`` makes, on the meta device: no weights are drawn or read."""
    with torch.device("meta"):
        return _as(build(), dtype).eval().requires_grad_(False)


def _as(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype`` (modules are built in float32; diffusers warns on every ``.to``)."""
    return module if dtype == torch.float32 else module.to(dtype)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _library_of(module: torch.nn.Module) -> list[str]:
    library = type(module).__module__.split(".")[0]
    return [library, type(module).__name__]


def load_model(
    model: str,
    *,
    config: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vae: str | None = None,
    controlnets: list[Any] | None = None,
    adapters: list[Any] | None = None,
    lazy: bool = False,
    union_images: int = 1,
    kind: str | None = None,
    modules: Collection[str] | None = None,
) -> LoadedModel:
    """Resolve ``model`` as a preset name, a diffusers directory or a single-file checkpoint.

    ``kind``: the source kind a manifest records (the Torch backend reloading an export): "preset"
    decides without looking for a checkpoint of that name where the command runs, and a recorded
    single file's ``config`` name is a preset likewise.

    ``lazy``: presets, diffusers directories and single-file checkpoints are loaded as skeletons,
    each part's weights built or read when ``LoadedModel.materialize`` asks for them (a ``vae`` and
    ControlNets are read at once).

    ``vae``: a diffusers AutoencoderKL directory (or a pipeline directory with ``vae/``) that replaces
    the model's VAE, e.g. an fp16-safe SDXL VAE. ``controlnets``: ControlNet presets or directories
    (``--controlnet`` texts, or resolved ``ControlNetSource``s) loaded beside it (``add_controlnets``);
    ``adapters``: T2I-Adapter presets or directories (or ``AdapterSource``s) likewise (``add_adapters``).
    ``union_images``: with union ControlNets, the control images each takes per call.
    ``modules`` (with ``lazy``): the parts the caller will materialize (an export's ``--components``);
    a single-file checkpoint may then lack the others' weights altogether (a file pruned of its text
    encoder, exported ``--components unet``), as a diffusers directory may lack their folders.

    A name as a user gives it (no ``kind``) is first checked as the CLI checks it, from its configs
    and headers alone (``outline_model``): the Python API gets the same one-line refusals (a partial
    download named like a preset, a ``config`` a directory cannot take, an empty name, a config the
    runtime could not use) before any weight is read.
    """
    if kind is None:
        from sdexport.models.outline import outline_model

        outline_model(model, config=config, vae=vae)
    architecture = _vae_architecture(model, config, kind, vae) if vae is not None and is_vae_file(Path(vae)) else None
    loaded = _load_model(model, config=config, seed=seed, dtype=dtype, lazy=lazy, kind=kind, vae_replaced=vae is not None,
                         modules=modules)
    if vae is not None:
        replace_vae(loaded, Path(vae), dtype=dtype, architecture=architecture)
    if controlnets:
        add_controlnets(loaded, controlnets, seed=seed, dtype=dtype, union_images=union_images)
    if adapters:
        add_adapters(loaded, adapters, seed=seed, dtype=dtype)
    return loaded


def add_adapters(model: LoadedModel, arguments: list[Any], *, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
    """Load ``--adapter`` presets or directories beside the model, as ``adapter``, ``adapter_1``,
    ``adapter_2``, ... (diffusers' ``MultiAdapter`` folders), each checked to fit its U-Net, and
    each other, from its config first. The manifest records one as ``source.adapter``, several as
    ``source.adapters``."""
    from sdexport.models.adapter import (
        AdapterSource,
        check_alone,
        check_count,
        check_together,
        load_adapter,
        resolve_adapter,
    )

    sources = [a if isinstance(a, AdapterSource) else resolve_adapter(a) for a in arguments]
    check_alone(len(controlnets_among(model.modules)))
    check_count(len(sources))
    base = model.source.get("name") if model.source.get("kind") == "preset" else None
    factor = model.dims.vae_scale_factor
    check_together(sources, dict(model.config("unet")), model.family, base, factor)
    for index, (name, source) in enumerate(zip(adapter_names(len(sources)), sources)):
        model.modules[name] = load_adapter(source, model.module("unet"), factor, seed=seed, dtype=dtype, index=index)
    model.label += f", T2I-Adapter {' + '.join(s.argument for s in sources)}"
    records = [s.record(seed) for s in sources]
    model.source = {**model.source, **({"adapter": records[0]} if len(records) == 1 else {"adapters": records})}


def add_controlnets(model: LoadedModel, arguments: list[Any], *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, union_images: int = 1) -> None:
    """Load ``--controlnet`` presets or directories beside the model, as ``controlnet``,
    ``controlnet_1``, ... (checked to fit its U-Net first, from their configs); union ones taking
    ``union_images`` control images per call."""
    from sdexport.models.controlnet import (
        ControlNetSource,
        check_controlnets,
        load_controlnet,
        resolve_controlnet,
    )

    sources = [a if isinstance(a, ControlNetSource) else resolve_controlnet(a) for a in arguments]
    base = model.source.get("name") if model.source.get("kind") == "preset" else None
    dims = model.dims
    check_controlnets(sources, dict(model.config("unet")), model.family, base, dims.vae_scale_factor, union_images)
    model.union_images = union_images
    records = []
    for index, (name, source) in enumerate(zip(controlnet_names(len(sources)), sources)):
        model.modules[name] = load_controlnet(source, model.module("unet"), seed=seed, index=index, dtype=dtype)
        records.append(source.record(seed))
    union = model.dims.N
    model.label += (", union ControlNet " if union else ", ControlNet ") + ", ".join(s.argument for s in sources)
    model.label += f" ({union_images} images per call)" if union and union_images > 1 else ""
    model.source = {**model.source, "controlnets": records}


def _vae_architecture(model: str, config: str | None, kind: str | None, vae: str) -> dict[str, Any]:
    """The model's own VAE config (resolved as ``_load_model`` resolves the model), which a ``--vae``
    file is read with: a VAE file carries weights, not an architecture."""
    preset = get_preset(model)
    path = Path(model)
    if preset is not None and (kind == "preset" or not looks_like_a_model(path)):
        return dict(preset.vae)
    if path.is_dir():
        return own_vae_config(path, vae)
    config_preset, config_path = single_file_config(path, config, recorded=kind is not None)
    return dict(config_preset.vae) if config_preset is not None else own_vae_config(config_path, vae)


def _load_model(model: str, *, config: str | None, seed: int, dtype: torch.dtype, lazy: bool = False,
                kind: str | None = None, vae_replaced: bool = False, modules: Collection[str] | None = None
                ) -> LoadedModel:
    preset = get_preset(model)
    path = Path(model)
    if kind == "preset" and preset is None:
        raise ModelLoadError(f"preset {model!r} is not one of {', '.join(PRESETS)}")
    if preset is not None and (kind == "preset" or not looks_like_a_model(path)):
        # e.g. `sdexport export tiny -o tiny`: the engine directory ./tiny is not the model "tiny"
        return load_preset(preset, seed=seed, dtype=dtype, lazy=lazy)
    if not path.exists():
        known = ", ".join(PRESETS)
        raise ModelLoadError(f"{model}: no such file or directory, and not a preset ({known})")
    if path.is_dir():
        return load_diffusers_dir(path, dtype=dtype, lazy=lazy, vae_replaced=vae_replaced)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return load_single_file(path, config=config, seed=seed, dtype=dtype, lazy=lazy, recorded=kind is not None,
                                vae_replaced=vae_replaced, modules=modules)
    raise ModelLoadError(
        f"{model}: not a diffusers directory or a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint"
    )


def replace_vae(model: LoadedModel, path: Path, *, dtype: torch.dtype = torch.float32,
                architecture: dict[str, Any] | None = None) -> None:
    """Swap in another AutoencoderKL (recorded in the label and in ``source["vae"]`` for reloading):
    a diffusers directory's, or a VAE file's (``is_vae_file``) read with ``architecture``, the
    model's own VAE config (``_vae_architecture``)."""
    from diffusers import AutoencoderKL

    vae: Any
    try:
        if architecture is not None:
            from sdexport.models.single_file import load_vae_file

            vae = load_vae_file(path, architecture, dtype)
        else:  # every weight from the files, as a model directory's parts (a missing one stayed on "meta")
            path = vae_config_dir(path)
            vae = load_subfolder(path.parent, path.name, lambda p: with_all_weights(p, AutoencoderKL, dtype))
    except ModelLoadError as exc:
        said = str(exc)  # (vae_config_dir's own refusals name --vae already)
        raise ModelLoadError(said if said.startswith("--vae ") else f"--vae {said}") from None
    channels, wanted = int(vae.config.latent_channels), int(model.config("unet").out_channels)
    if channels != wanted:
        raise ModelLoadError(f"--vae {path}: {channels} latent channels, but the U-Net takes {wanted}")
    model.modules["vae"] = vae.eval().requires_grad_(False)
    model.builders.pop("vae", None)  # a lazy model's own VAE must never be built in its place
    model.label += f", VAE from {path}"
    model.source = {**model.source, "vae": recorded_path(path)}


def recorded_path(path: Path) -> str:
    """``path`` as the manifest records a file to read again: its folder resolved, its own name as
    given (a link not followed). A file's suffix says how it is read (a VAE file or folder, a
    .safetensors or .ckpt), and Hugging Face's cache keeps each file as a link to a blob named by its
    hash, without one: the resolved path was refused by export's own hashing and by the Torch
    backend's reload. (``os.path.abspath`` folds ``link/..`` as text, which is not where the system
    goes through a linked folder: a review's finding.)"""
    whole = path.absolute()
    return str(whole.resolve() if whole.name in ("", ".", "..") else whole.parent.resolve() / whole.name)


def load_preset(preset: Preset, *, seed: int = 0, dtype: torch.dtype = torch.float32, lazy: bool = False) -> LoadedModel:
    """Build the preset's architecture with weights drawn from ``seed`` (the same seed, the same
    weights: each part draws from its own seed, so building them one at a time changes nothing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdexport.models.tokenizer import preset_tokenizer

    def seeded(offset: int, build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
        def built() -> torch.nn.Module:
            with drawing_from(seed * SEED_STRIDE + offset):
                return _as(build(), dtype)
        return built

    builders, tokenizers = {}, {}
    if preset.text_encoder is not None:
        text = CLIPTextConfig(**_clean(preset.text_encoder))
        builders["text_encoder"] = seeded(1, lambda: CLIPTextModel(text))
        tokenizers["tokenizer"] = preset_tokenizer(preset, "tokenizer")
    if preset.text_encoder_2 is not None:
        text_2 = CLIPTextConfig(**_clean(preset.text_encoder_2))
        builders["text_encoder_2"] = seeded(2, lambda: CLIPTextModelWithProjection(text_2))
        tokenizers["tokenizer_2"] = preset_tokenizer(preset, "tokenizer_2")
    builders["unet"] = seeded(3, lambda: UNet2DConditionModel.from_config(_clean(preset.unet)))
    builders["vae"] = seeded(4, lambda: AutoencoderKL.from_config(_clean(preset.vae)))
    return _assemble(
        builders, lazy, dtype,
        family=preset.family,
        label=f"preset {preset.name} ({preset.description}; random weights, seed {seed})",
        tokenizers=tokenizers,
        scheduler_config=dict(preset.scheduler),
        random_weights=True,
        source={"kind": "preset", "name": preset.name, "seed": seed, "config_sha256": config_digest(preset)},
        pipeline_config=dict(preset.pipeline_config),
    )


def _assemble(builders: dict[str, Callable[[], torch.nn.Module]], lazy: bool, dtype: torch.dtype,
              skeletons: dict[str, torch.nn.Module] | None = None, **fields: Any) -> LoadedModel:
    """A LoadedModel with every module built now, or (``lazy``) skeletons and their builders
    (``skeletons``: made otherwise than by running the builders on the meta device)."""
    if not lazy:
        modules = {name: build().eval().requires_grad_(False) for name, build in builders.items()}
        return LoadedModel(modules=modules, **fields)
    modules = skeletons or {name: _skeleton(build, dtype) for name, build in builders.items()}
    return LoadedModel(modules=modules, builders=dict(builders), **fields)


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def load_diffusers_dir(path: Path, *, dtype: torch.dtype = torch.float32, lazy: bool = False,
                      vae_replaced: bool = False) -> LoadedModel:
    """``vae_replaced``: ``--vae`` replaces the directory's VAE (``replace_vae``), so its own ``vae/``
    is neither needed nor read."""
    family = family_of_dir(path, vae_replaced=vae_replaced)
    options = pipeline_config(family, read_json(path / "model_index.json"))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    loaders: dict[str, Any] = {"unet": UNet2DConditionModel, **({} if vae_replaced else {"vae": AutoencoderKL}),
                               **{name: classes[name] for name in text_encoders(family)}}
    def reader(name: str, cls: Any) -> Callable[[], torch.nn.Module]:
        return lambda: load_subfolder(path, name, lambda p: with_all_weights(p, cls, dtype))  # type: ignore[no-any-return]

    builders = {name: reader(name, cls) for name, cls in loaders.items()}
    skeletons = None
    if lazy:  # built from each config alone; materialize reads the weights
        skeletons = {name: _skeleton(load_subfolder(path, name, lambda p, c=cls: _config_only(p, c)), dtype)
                     for name, cls in loaders.items()}
    tokenizers = {
        name: load_subfolder(path, name, CLIPTokenizer.from_pretrained) for name in tokenizer_names(family)
    }
    return _assemble(
        builders, lazy, dtype, skeletons,
        family=family,
        label=f"diffusers directory {path}",
        tokenizers=tokenizers,
        scheduler_config=scheduler_config(path),
        random_weights=False,
        source={"kind": "diffusers", "path": str(path.resolve())},
        pipeline_config=options,
    )


def _config_only(path: Path, cls: Any) -> Callable[[], torch.nn.Module]:
    """A builder of ``cls`` from ``path``'s config (run on the meta device: no weights)."""
    if hasattr(cls, "load_config"):  # diffusers
        config = cls.load_config(str(path))

        def build() -> torch.nn.Module:
            try:
                return cls.from_config(config)
            except Exception as exc:  # diffusers' checks of the config, or what a size of 0 or -1 breaks
                raise ModelLoadError(f"{path / 'config.json'}: {_config_fault(exc)}") from None

        return build
    config = cls.config_class.from_pretrained(str(path))  # transformers

    def build_transformers() -> torch.nn.Module:
        try:
            return cls(config)
        except Exception as exc:
            raise ModelLoadError(f"{path / 'config.json'}: {_config_fault(exc)}") from None

    return build_transformers


def _config_fault(exc: Exception) -> str:
    """What a module built from a config alone (no weight read) raised: the config's fault, whatever
    the type (``attention_head_dim`` 0 divides by zero, a negative size makes torch refuse a tensor,
    a VAE's ``layers_per_block`` 0 trips an assert)."""
    why = one_line(exc)
    if isinstance(exc, ValueError | TypeError | KeyError | IndexError):  # (diffusers' own words, as they were)
        return why
    return f"a value in it cannot build the model ({type(exc).__name__}: {why})"


def load_subfolder(root: Path, name: str, load: Any) -> Any:
    """Load one sub-folder, naming it when its files are damaged."""
    try:
        return load(root / name)
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers/transformers/safetensors raise many types
        raise ModelLoadError(f"{root / name}: cannot load ({one_line(exc)})") from exc


def with_all_weights(path: Path, cls: Any, dtype: torch.dtype) -> torch.nn.Module:
    """``cls.from_pretrained``, refusing weights the files lack instead of keeping random ones, and
    weights they hold that the config has no place for instead of dropping them.

    diffusers and transformers compare the files' keys with the module's state-dict keys
    themselves (after their own key renaming, and leaving out keys they know to be harmless, such
    as old CLIP files' ``position_ids``) but only log what does not match; their report
    (``output_loading_info``) is turned into an error here. Unused weights mean a config that
    describes less than was trained (``transformer_layers_per_block`` 1 for a depth-2 U-Net, fewer
    text encoder layers): the export would run, verify against the same cut-down module, and draw
    other images. A weight a shard's index promises and the shard lacks is in neither list: it is
    left on the meta device, and refused here too. A folder without weight files is refused first
    (``weight_files``), in one line of ours.
    """
    library = "transformers" if cls.__module__.startswith("transformers") else "diffusers"
    files = weight_files(path, library)
    # transformers raises on a wrongly shaped weight with "For details look at the above report!", a
    # report its quietened logging never shows: told to go on, it lists them in its loading info
    # (diffusers would need its slow loading path for the same, and names the weight itself)
    kwargs = {"ignore_mismatched_sizes": True} if library == "transformers" else {}
    model, info = cls.from_pretrained(path, torch_dtype=dtype, output_loading_info=True, **kwargs)
    for problem, what in (("missing_keys", "lack {n} of the weights its config.json describes"),
                          ("mismatched_keys", "have wrongly shaped {n} of the weights its config.json describes"),
                          ("unexpected_keys", ("hold {n} weights its config.json has no place for (a config for "
                                               "a smaller architecture?)"))):
        keys = sorted(_weight_named(k) for k in info.get(problem) or ())
        if keys:
            raise ModelLoadError(f"{path}: the weight files {what.format(n=len(keys))}, e.g. {', '.join(keys[:3])}")
    errors = [str(e) for e in info.get("error_msgs") or ()]
    if errors:
        raise ModelLoadError(f"{path}: cannot load its weights ({' '.join(' '.join(errors).split())[:600]})")
    unread = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if unread:
        raise ModelLoadError(f"{path}: the weight files lack {len(unread)} of the weights its config.json describes "
                             f"(a shard without the weights its index names?), e.g. {', '.join(unread[:3])}")
    _refuse_whole_numbers(path, files, model)
    return model


def _refuse_whole_numbers(path: Path, files: list[Path], model: torch.nn.Module) -> None:
    """Refuse weights a safetensors file stores as whole numbers or booleans where the module's are
    floating point: the libraries cast them and the export went on with them (a single file's are
    refused as its layout is checked). The files' headers say the types; pickled ``.bin`` files are
    not read twice for it."""
    from safetensors import safe_open

    from sdexport.models.single_file import SAFETENSORS_DTYPES

    floating = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    for file in (f for f in files if f.suffix == ".safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                kind = handle.get_slice(key).get_dtype()
                stored = SAFETENSORS_DTYPES.get(kind)  # (None: fp8 and other floating types)
                # (transformers 5's CLIP text model names its weights without the files' "text_model.")
                if key in floating or key.removeprefix("text_model.") in floating:
                    if stored is not None and not stored.is_floating_point:
                        raise ModelLoadError(f"{path}: the weight files store {key} as {kind} (whole numbers or "
                                             "booleans), where the model's weights are floating point: not a model's "
                                             "trained weights")


def _weight_named(entry: Any) -> str:
    """A loading report's entry: a weight's name, or (name, the file's shape, the config's shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, theirs, ours = entry
        return f"{name} ({list(theirs)} in the file, {list(ours)} by the config)"
    return str(entry[0] if isinstance(entry, tuple) else entry)


def load_single_file(
    path: Path, *, config: str | None, seed: int = 0, dtype: torch.dtype = torch.float32, lazy: bool = False,
    recorded: bool = False, vae_replaced: bool = False, modules: Collection[str] | None = None,
) -> LoadedModel:
    """Load an original-layout SD checkpoint; its architecture comes from ``config``, offline.

    ``config`` is a diffusers directory (only its configs and tokenizer are read) or a preset name
    (``recorded``: as a manifest records it, where a name is always a preset).
    Every weight of every component must come from the file: all components are checked against the
    file's layout first, reading no weight (``single_file.plan_components``); then each one is read
    now, or (``lazy``) when ``LoadedModel.materialize`` asks for it. ``vae_replaced``: ``--vae``
    replaces the checkpoint's VAE, which then need not be in the file (``load_diffusers_dir``'s).
    ``modules`` (with ``lazy``): the parts that will be materialized; the file may lack the others
    altogether (``plan_components``'s ``needed``).
    """
    from transformers import CLIPTokenizer

    from sdexport.models.single_file import plan_components

    preset, config_path = single_file_config(path, config, recorded=recorded)
    check_single_file(path)
    with tempfile.TemporaryDirectory(prefix="sdexport-config-") as tmp:
        config_dir = Path(tmp) if preset is not None else config_path
        if preset is not None:
            write_config_dir(preset, config_dir)
        family = family_of_dir(config_dir)
        options = pipeline_config(family, read_json(config_dir / "model_index.json"))
        scheduler = scheduler_config(config_dir)
        skeletons, builders = plan_components(path, config_dir, family, dtype, scheduler,
                                              leave_out=("vae",) if vae_replaced else (),
                                              needed=modules if lazy else None)
        if preset is not None and preset.name == "sd21" and not recorded:
            from rich.markup import escape

            from sdexport.console import console

            # SD 2.x's base models have the 768-v model's shapes: nothing in the file tells them apart
            console.print(f"[yellow]note:[/] {escape(str(path))} is read as SD 2.1 768-v, which predicts v; an SD 2.x "
                          "base model or a fine-tune that predicts noise needs --config sd21-base")
        tokenizers = {
            name: load_subfolder(config_dir, name, CLIPTokenizer.from_pretrained)
            for name in tokenizer_names(family)
        }
    return _assemble(
        builders, lazy, dtype, skeletons,
        family=family,
        label=f"single-file checkpoint {path} (config {config})",
        tokenizers=tokenizers,
        scheduler_config=scheduler,
        random_weights=False,
        # An absolute config path, so the Torch backend can reload the model from anywhere.
        source={"kind": "single_file", "path": recorded_path(path),
                **({"config": config, "config_sha256": config_digest(preset)} if preset is not None
                   else {"config": str(config_path.resolve())})},
        pipeline_config=options,
    )


def write_config_dir(preset: Preset, directory: Path) -> None:
    """A diffusers directory with configs, tokenizer and scheduler but no weights (for from_single_file)."""
    from sdexport.models.tokenizer import preset_tokenizer

    parts: dict[str, dict[str, Any]] = {"unet": preset.unet, "vae": preset.vae}
    index: dict[str, Any] = {
        "_class_name": FAMILY_PIPELINES[preset.family],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", preset.scheduler["_class_name"]],
    }
    for name, config, cls in (("text_encoder", preset.text_encoder, "CLIPTextModel"),
                              ("text_encoder_2", preset.text_encoder_2, "CLIPTextModelWithProjection")):
        if config is not None:
            parts[name] = {**config, "architectures": [cls]}
            index[name] = ["transformers", cls]
    if preset.text_encoder_2 is None:
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
    if preset.text_encoder is None:  # the refiner, as stabilityai saves it
        index.update(text_encoder=[None, None], tokenizer=[None, None])
    for name in tokenizer_names(preset.family):
        index[name] = ["transformers", "CLIPTokenizer"]
    index.update(preset.pipeline_config)
    for name, cfg in {**parts, "scheduler": preset.scheduler}.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (directory / name / filename).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    for name in tokenizer_names(preset.family):
        preset_tokenizer(preset, name).save_pretrained(directory / name)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")

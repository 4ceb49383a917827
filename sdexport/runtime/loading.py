"""Engine directory + backend name → a ready Txt2ImgPipeline.

Everything comes from the directory: the manifest (checked against its hashes first), the
tokenizer, the scheduler config and the engines. Only the Torch backend reaches outside it, for the
PyTorch weights the directory does not hold.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sdexport.build.vae_upcast import FP32_VAE, kept_fp32, upcast_parts, vae_config_file
from sdexport.errors import EngineDirError, SdexportError, one_line, pasteable
from sdexport.manifest import (
    Manifest,
    check_files,
    load_manifest,
    read_scheduler_config,
)
from sdexport.models.lora import LoraFile
from sdexport.models.textual_inversion import Embedding
from sdexport.runtime.request import check_backend, forced_guess_mode
from sdexport.runtime.schedulers import make_scheduler
from sdexport.shapes import ShapeProfile
from sdexport.specs import SDXL_REFINER, UNET, ModelDims, tokenizer_names, txt2img_specs

if TYPE_CHECKING:  # torch is imported where engines are made: the checks above it stay light
    import torch

    from sdexport.runtime.engine import Engine
    from sdexport.runtime.request import GenerationRequest
    from sdexport.runtime.txt2img import Txt2ImgPipeline


def txt2img_components(manifest: Manifest, upcast: dict[str, str] | None = None) -> list[str]:
    """What txt2img runs (the VAE encoder is for img2img, the fp32 decoder a fallback), in call order;
    with the ControlNets where the U-Net takes their residuals, and the T2I-Adapter where it takes
    its features. ``upcast`` (``upcast_parts``): the fp32 decoder in the fp16 one's place, as it is
    where the export has only the fp32 one (``vae_in_place``)."""
    controlnets = len(manifest.controlnets) or (1 if manifest.model_dims.residuals else 0)
    in_place = vae_in_place(manifest, upcast or {})
    names = [in_place.get(s.name, s.name) for s in txt2img_specs(manifest.family, controlnets, len(manifest.adapters))]
    missing = [n for n in names if n not in manifest.components]
    if missing:
        raise EngineDirError(f"the engine directory has no {', '.join(missing)} ({_made_with(manifest)}); export those "
                             "components to run txt2img")
    return names


def _made_with(manifest: Manifest) -> str:
    """How the directory came to hold the components it has: an export's --components, or the
    graphs another tool's export had when it was adopted."""
    if manifest.adopted:
        return f"it was adopted with the graphs {', '.join(manifest.components)}"
    return f"it was exported with --components {','.join(manifest.components)}"


def pipeline_components(manifest: Manifest, image_inputs: bool = False, *,
                        upcast: dict[str, str] | None = None) -> list[str]:
    """What a pipeline loads: txt2img's components, the VAE encoder where init images will be given
    (img2img, inpainting), and the fp32 VAE parts that rerun an fp16 one that overflows
    (``vae_fallbacks``). ``upcast`` (``upcast_parts``): the fp32 decoder and encoder in the fp16
    ones' places, and no fallbacks."""
    upcast = upcast or {}
    names = txt2img_components(manifest, upcast)
    if image_inputs:
        if not _has_encoder(manifest, upcast):
            mend = "add its vae_encoder graph and adopt it again (--force)" if manifest.adopted else "export it too"
            raise EngineDirError(f"the engine directory has no vae_encoder ({_made_with(manifest)}); {mend} to start "
                                 "from an image (img2img, inpainting)")
        names.append(vae_in_place(manifest, upcast).get("vae_encoder", "vae_encoder"))
    return names + list(vae_fallbacks(manifest, upcast, image_inputs).values())


def takes_init_images(engine_dir: Path, manifest: Manifest) -> bool:
    """Whether a served pipeline loads an encoder for img2img and inpainting: where
    ``pipeline_components`` can, and always for an image-only family (``image_tasks_only``), whose
    directory without one is then refused, with what to export, before a server starts."""
    return image_tasks_only(manifest) or _has_encoder(manifest, upcast_parts(engine_dir, manifest))


def image_tasks_only(manifest: Manifest) -> bool:
    """The SDXL refiner: its one task starts from an image, so its pipelines always load an encoder."""
    return manifest.family == SDXL_REFINER


def _has_encoder(manifest: Manifest, upcast: dict[str, str]) -> bool:
    """The ``vae_encoder``, or the fp32 one that runs in its place (``vae_in_place``)."""
    return "vae_encoder" in manifest.components or "vae_encoder" in vae_in_place(manifest, upcast)


def vae_in_place(manifest: Manifest, upcast: dict[str, str]) -> dict[str, str]:
    """The VAE parts (``vae_decoder``, ``vae_encoder``) whose fp32 graph (``FP32_VAE``) runs from the
    start, in their place: where the VAE upcasts (``upcast``: ``upcast_parts``), and where an fp16
    export kept the fp32 graph alone (``--components ...,vae_decoder_fp32``: the fp16 one would be
    rerun in fp32 on an overflow anyway)."""
    return {part: fp32 for part, fp32 in FP32_VAE.items()
            if fp32 in manifest.components and (part in upcast or part not in manifest.components)}


def vae_fallbacks(manifest: Manifest, upcast: dict[str, str], image_inputs: bool = False) -> dict[str, str]:
    """The fp32 VAE graphs an fp16 export carries beside the fp16 ones, by the part each reruns when
    the fp16 one overflows (NaN/Inf), where they do not run from the start (``vae_in_place``): the
    decoder's, and with ``image_inputs`` the encoder's (an SDXL export's, where the VAE is fp16-safe
    by its config)."""
    in_place = vae_in_place(manifest, upcast)
    return {part: fp32 for part, fp32 in FP32_VAE.items()
            if fp32 in manifest.components and part in manifest.components and part not in in_place
            and (image_inputs or part != "vae_encoder")}


def resolve_backend(backend: str) -> str:
    check_backend(backend)
    if backend == "onnxruntime":
        from sdexport.runtime.providers import available_providers

        return "onnxruntime-cuda" if "CUDAExecutionProvider" in available_providers() else "onnxruntime-cpu"
    return backend


_LOADS = threading.RLock()
"""Held by each ``load_pipeline``: transformers' and diffusers' lazy modules resolve a name on its
first use, and two threads resolving at once got "cannot import name 'CLIPTokenizer'" or a
scheduler class "not a diffusers scheduler" (2 of 3 threads loading a pipeline each). Calls, where
the time goes, still run side by side on their own pipelines."""


def _new_lock_in_child() -> None:
    """A child forked while another thread held ``_LOADS`` would inherit it held, and every load
    there would wait for ever (a preloading server's workers, multiprocessing's fork start)."""
    global _LOADS
    _LOADS = threading.RLock()


if hasattr(os, "register_at_fork"):  # (Unix only: Windows has no fork)
    os.register_at_fork(after_in_child=_new_lock_in_child)

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def _one_load_at_a_time(load: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    @functools.wraps(load)
    def locked(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with _LOADS:
            return load(*args, **kwargs)

    return locked


@_one_load_at_a_time
def load_pipeline(
    engine_dir: Path | str,
    backend: str = "onnxruntime",
    *,
    cuda_graph: bool = False,
    verify_files: bool = True,
    request_profile: ShapeProfile | None = None,
    graphs: str = "auto",
    provider_options: dict[str, str] | None = None,
    image_inputs: bool | None = None,
    loras: Iterable[LoraFile] | None = None,
    guess_mode: bool = False,
    model_source: dict[str, Any] | None = None,
    requests: Sequence[GenerationRequest] = (),
    read_chunks: tuple[int, str] | None = None,
    hashed: Mapping[str, str] | None = None,
) -> Txt2ImgPipeline:
    """The engine directory's pipeline (a ``Txt2ImgPipeline``: call it with a ``GenerationRequest``)
    over ``backend``: ``onnxruntime`` (CUDA where it can, else the CPU), ``onnxruntime-cpu``,
    ``onnxruntime-cuda``, ``tensorrt``, or the PyTorch modules the directory was exported from
    (``torch``, ``torch-compile``, ``torch-compile-max``). The files the backend reads are checked
    against the manifest's sha256 first (``verify_files``); a backend that cannot run here, a damaged
    directory or settings it cannot take raise ``SdexportError`` in one line before anything loads.

    ``loras``: LoRA files added to the exported weights as the engines are made (ONNX Runtime's
    portable graphs, the Torch backend), no re-export. ``image_inputs``: also load the VAE encoder, for requests with an init image (img2img,
    inpainting); None: the family's default, which for the SDXL refiner is to load it (its one task
    starts from an image; not from a base model's latents, ``run --refiner``'s, which pass False). ``request_profile``: shapes that will be asked for, so TensorRT picks a plan that serves them
    (and CUDA-graph ONNX Runtime sessions are made for them at load). ``graphs`` (onnxruntime-cuda):
    "auto" runs the ONNX Runtime CUDA graphs where the directory has them, "portable" never does.
    ``provider_options``: extra CUDA provider options for ONNX Runtime, passed through. ``guess_mode``:
    requests will ask for ControlNet guess mode, so CUDA-graph sessions capture the ControlNets at
    the prompts' batch (as for a directory whose first ControlNet pools). ``model_source``: where the
    Torch backend reloads the model from instead of the manifest's ``model.source`` (``relocated``:
    a copy of the same files, elsewhere). ``requests``: those that will be asked for, whose texts
    give ``request_profile`` its prompt chunks (read once the tokenizers load), so TensorRT prefers
    a plan that reads them whole and CUDA-graph sessions capture their text length. ``read_chunks``:
    (count, why) to read at most ``count`` prompt chunks though the engines take more, ``why`` said
    when a text is cut (``Txt2ImgPipeline``). ``hashed``: the manifest's files as the caller checked
    them (``run`` hashes before its heavy imports, then loads with ``verify_files`` off): a directory
    that is no longer that one is refused; one that lists more files (a build's new plan) is loaded,
    checking the files the load reads. One replaced while its engines load (``export --force``
    swaps in a new directory) is refused after the load: its engines could be two exports'."""
    from sdexport.runtime.prompt_text import longest_chunks
    from sdexport.runtime.txt2img import Txt2ImgPipeline, text_tokenizers

    if not isinstance(engine_dir, str | os.PathLike) or isinstance(os.fspath(engine_dir), bytes):
        raise SdexportError(f"engine_dir: expected a path (Path or text), got {type(engine_dir).__name__} {engine_dir!r:.80}")
    if graphs not in ("auto", "portable"):  # (any other was read as "portable", a typo unsaid)
        raise SdexportError(f"graphs: {graphs!r}; choose 'auto' (the fused ONNX Runtime CUDA graphs where the "
                            "directory has them) or 'portable'")
    if provider_options is not None and not isinstance(provider_options, Mapping):
        raise SdexportError(f"provider_options: expected a dict of option names to values, got "
                            f"{type(provider_options).__name__}")
    engine_dir = Path(engine_dir)
    asked, backend = backend, resolve_backend(backend)
    if cuda_graph and backend not in ("tensorrt", "onnxruntime-cuda"):  # (torch's ignored it, unsaid; `run` refuses it)
        resolved = f" ({asked} is {backend} here: no CUDA provider)" if asked != backend else ""
        raise SdexportError(f"cuda_graph=True: for the tensorrt and onnxruntime-cuda backends, not {backend}{resolved}")
    if isinstance(loras, str | Path | LoraFile):
        raise SdexportError(f"loras: expected a list of LoraFile entries, got {type(loras).__name__} {str(loras)!r} "
                            "(LoraFile.parse('file.safetensors:0.8') reads the CLI's form; one file: a list of one)")
    try:
        loras = None if loras is None else list(loras)  # (an iterator was used up by the checks below: no LoRA ran)
    except TypeError:
        raise SdexportError(f"loras: expected a list of LoraFile entries, got {type(loras).__name__} {loras!r:.80}") from None
    for lora in loras or []:  # (the CLI checked its own; in Python, a missing file is one line too)
        if not isinstance(lora, LoraFile):
            raise SdexportError(f"loras: expected LoraFile entries, got {type(lora).__name__} {lora!r} (LoraFile.parse("
                                "'file.safetensors:0.8') reads the CLI's form)")
        lora.check("LoRA")
    manifest = load_manifest(engine_dir, verify_files=False)
    if hashed is not None:
        if not _lists_as_checked(manifest.files, hashed):
            raise EngineDirError(f"{engine_dir}: the directory changed after its files were checked (an export or "
                                 "build into it meanwhile?); run again")
        if manifest.files.keys() - hashed.keys():  # a build's new plan or fused graph: hash what this run reads
            verify_files = True
    note_fused_again(manifest, loras or [])
    if model_source is not None and backend.startswith("torch"):
        from sdexport.models.source_files import relocated

        modules = {manifest.spec(name).module for name in manifest.components}
        manifest.model = {**manifest.model, "source": relocated(manifest.model["source"], model_source, modules)}
    image_inputs = image_tasks_only(manifest) if image_inputs is None else image_inputs
    upcast, fallbacks, loaded = _parts(engine_dir, manifest, image_inputs)
    in_place = {fp32: part for part, fp32 in vae_in_place(manifest, upcast).items()
                if fp32 in loaded}  # fp32 graph → the part it runs as
    names = [n for n in loaded if n not in fallbacks.values()]
    check_lowered_vae(engine_dir, manifest, loaded, backend, graphs)
    if verify_files:
        verify_for_backend(engine_dir, manifest, backend, graphs, image_inputs=image_inputs, lora=bool(loras))
    # The small files first: a bad tokenizer or scheduler config is refused before any engine loads.
    scheduler_config, tokenizers = check_runnable(engine_dir, manifest)
    if request_profile is not None and requests:
        named = text_tokenizers(manifest.family, tokenizers.get("tokenizer"), tokenizers.get("tokenizer_2"))
        limit = manifest.shape_profile.chunks[2]
        if read_chunks is not None:  # (what is read)
            limit = min(limit, read_chunks[0])
        most = max(longest_chunks(r, named, manifest.model_dims.S, limit, zeroes_negatives(manifest)) for r in requests)
        request_profile = replace(request_profile, chunks=(most, most, most))
    pooled = pooled_controlnets(engine_dir, manifest)
    if backend.startswith("onnxruntime"):  # what to install, in one line, before torch is asked for a CUDA stream
        from sdexport.runtime.providers import require_backend  # (TensorRT's loader says so itself)

        require_backend(backend)
    from sdexport.manifest import check_weight_files_once

    # the graphs whose external weights a run reads (ONNX Runtime's; a run-time LoRA's, which changes
    # the portable graphs' weights), each reading only files the manifest lists beside it
    check_weight_files_once(engine_dir, manifest, [
        *(graph_for(manifest, n, backend, graphs) for n in loaded if backend.startswith("onnxruntime")),
        *(manifest.components[n].onnx for n in loaded if loras and not backend.startswith("torch"))])
    engines = _load_engines(engine_dir, manifest, loaded, backend, cuda_graph=cuda_graph,
                            request_profile=request_profile, graphs=graphs, provider_options=provider_options,
                            loras=loras or [], guess_mode=guess_mode, pooled=pooled, optional=_optional(fallbacks))
    _check_not_replaced(engine_dir, manifest)
    return Txt2ImgPipeline(
        {in_place.get(n, n): engines[n] for n in names},  # (the fp32 decoder, encoder in place)
        tokenizer=tokenizers.get("tokenizer"),
        tokenizer_2=tokenizers.get("tokenizer_2"),
        family=manifest.family,
        force_zeros_for_empty_prompt=zeroes_negatives(manifest),
        pooled_controlnets=pooled,
        scheduler_config=scheduler_config,
        dims=manifest.model_dims,
        vae_scaling_factor=manifest.vae_scaling_factor,
        profile=manifest.shape_profile,
        fallback_vae=engines.get(fallbacks["vae_decoder"]) if "vae_decoder" in fallbacks else None,
        fallback_encoder=engines.get(fallbacks["vae_encoder"]) if "vae_encoder" in fallbacks else None,
        unplanned=frozenset(part for part, fp32 in fallbacks.items() if fp32 not in engines),
        read_chunks=read_chunks,
        lowered=frozenset(in_place.get(n, n) for n in names if in_place.get(n, n) in (*FP32_VAE, UNET.name)
                          and runs_lowered(engine_dir, manifest, n, backend, graphs, engines[n])),
        info={"backend": backend, "engine_dir": str(engine_dir.absolute()), "family": manifest.family,
              "random_weights": manifest.random_weights, **{part: "fp32" for part in in_place.values()},
              **({"loras": [{"path": str(lora.path.absolute()), "scale": lora.scale} for lora in loras]} if loras else {}),
              "model": manifest.model["label"], "dtype": manifest.dtype,
              "graphs": {n: graph_for(manifest, n, backend, graphs) for n in loaded}
              if backend.startswith("onnxruntime") else {}},
    )


def _parts(engine_dir: Path, manifest: Manifest,
           image_inputs: bool) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(``upcast_parts``, ``vae_fallbacks``, ``pipeline_components``): which parts a pipeline loads."""
    upcast = upcast_parts(engine_dir, manifest)
    return upcast, vae_fallbacks(manifest, upcast, image_inputs), pipeline_components(manifest, image_inputs,
                                                                                      upcast=upcast)


def _optional(fallbacks: dict[str, str]) -> dict[str, str]:
    """The fp32 parts that rerun an overflow, each to the part whose shapes it serves: left out,
    with a note, where no TensorRT plan serves (``choose_plans``)."""
    return {fp32: part for part, fp32 in fallbacks.items()}


def check_tensorrt_plans(engine_dir: Path, manifest: Manifest, *, image_inputs: bool,
                         request_profile: ShapeProfile | None) -> list[tuple[str, ShapeProfile]]:
    """Refuse, before anything loads, where ``load_pipeline`` over TensorRT would find no plan here
    for a part it loads (for ``request_profile``, where given): ``serve`` asks before Triton starts.
    (name, the shapes its plan takes) of each part the pipeline runs (not the fp32 reruns)."""
    from sdexport.runtime.plan_choice import entry_profile, plans_here

    _, fallbacks, loaded = _parts(engine_dir, manifest, image_inputs)
    entries = plans_here(engine_dir, manifest, loaded, _optional(fallbacks), profile=request_profile,
                         fp32=kept_fp32(engine_dir, manifest))
    return [(name, entry_profile(manifest, entry, name)) for name, entry in entries.items()
            if name not in fallbacks.values()]


def runs_lowered(engine_dir: Path, manifest: Manifest, name: str, backend: str, graphs: str, engine: Engine) -> bool:
    """Whether ``name``'s engine computes in fp16 though the export's graph is fp32: ``sdexport build``
    lowered it (ONNX Runtime's fp16 conversion of the fused graph, or a TensorRT plan built with
    TensorRT 10's fp16 flag), so that an overflow there is fp16's, not the export's."""
    entry = manifest.components[name]
    if entry.dtype != "fp32":
        return False
    if backend == "onnxruntime-cuda":
        return graph_for(manifest, name, backend, graphs) != entry.onnx and _fused_in_fp16(manifest, name)
    if backend == "tensorrt":  # the plan the loader picked (select_engine), by its path
        source = getattr(engine, "source", None)
        return any(isinstance(e.get("key"), dict) and e["key"].get("fp16") is True
                   and source == engine_dir / str(e.get("path")) for e in entry.engines.values())
    return False


def check_lowered_vae(engine_dir: Path, manifest: Manifest, loaded: list[str], backend: str, graphs: str) -> None:
    """Refuse an fp16 ONNX Runtime CUDA graph of a VAE component that runs in fp32 (``kept_fp32``),
    fused by an sdexport before that rule: the decoder would overflow where diffusers runs fp32, with
    no fp32 decoder to fall back on. (TensorRT's loader passes over such plans: ``select_engine``.)"""
    if backend != "onnxruntime-cuda" or graphs != "auto":
        return
    for name in kept_fp32(engine_dir, manifest):
        if name in loaded and _fused_in_fp16(manifest, name):
            raise EngineDirError(
                f"{engine_dir}: {name}'s ONNX Runtime CUDA graph was fused in fp16, which this VAE overflows (its "
                f"config sets force_upcast); run `sdexport build {pasteable(engine_dir)} --target onnxruntime-cuda` again (it "
                "now keeps it fp32), or run the portable graphs (--backend onnxruntime-cuda --portable-graphs)"
            )


def lowered_vae_notes(engine_dir: Path, manifest: Manifest) -> list[str]:
    """What ``sdexport inspect`` says of engines an older sdexport lowered to fp16 for a VAE component
    that runs in fp32 (``kept_fp32``): they stay listed (nothing of the user's is deleted), but no run
    uses them. Said for the platforms (TensorRT version and GPU) that have no plan of it without the
    flag: where one has, a run uses that one and a build has nothing to do."""
    notes = []
    for name in kept_fp32(engine_dir, manifest):
        keys = [e["key"] for e in manifest.components[name].engines.values() if isinstance(e.get("key"), dict)]

        def platform(key: dict[str, Any]) -> tuple[Any, ...]:
            return key.get("tensorrt_version"), key.get("gpu_name"), key.get("compute_capability")

        served = {platform(key) for key in keys if key.get("fp16") is not True}
        flagged = sum(1 for key in keys if key.get("fp16") is True and platform(key) not in served)
        if flagged:
            notes.append(f"{name}: {flagged} TensorRT plan(s) built with the fp16 flag are passed over, as the "
                         f"VAE's config sets force_upcast; `sdexport build {pasteable(engine_dir)}` builds it fp32")
        if _fused_in_fp16(manifest, name):
            notes.append(f"{name}: its ONNX Runtime CUDA graph was fused in fp16, which onnxruntime-cuda refuses "
                         f"(force_upcast); run `sdexport build {pasteable(engine_dir)} --target onnxruntime-cuda` again")
    return notes


def _fused_in_fp16(manifest: Manifest, name: str) -> bool:
    from sdexport.build.onnxruntime_build import TARGET

    fused = manifest.components[name].optimized.get(TARGET)
    return fused is not None and fused.get("dtype") == "fp16"


def pooled_controlnets(engine_dir: Path, manifest: Manifest) -> tuple[str, ...]:
    """The directory's ControlNets that pool their residuals, by the diffusers ``config.json`` the
    export wrote beside each graph (hashed in the manifest): their graphs pool, and the loop turns
    guess mode on when the first one does (``Txt2ImgPipeline.guess_mode``)."""
    import json

    from sdexport.models.controlnet import pools

    pooled = []
    for name in manifest.controlnets:
        path = engine_dir / manifest.components[name].config_file
        try:
            config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise EngineDirError(f"{path}: unreadable ControlNet config ({one_line(exc)})") from None
        if isinstance(config, dict) and pools(config):
            pooled.append(name)
    return tuple(pooled)


def _lists_as_checked(files: Mapping[str, str], checked: Mapping[str, str]) -> bool:
    """Whether a manifest's ``files`` still list every file of ``checked`` with its sha256: files listed
    since (a build's new plan) change nothing that was read; one changed or gone does."""
    return all(files.get(rel) == sha for rel, sha in checked.items())


def _check_not_replaced(engine_dir: Path, manifest: Manifest) -> None:
    """Refuse engines loaded from a directory whose manifest no longer lists a file of the one read
    before the load as it was: the engines, opened file by file, may be two exports' (an audit's run
    mixed one export's text encoder and U-Net with the next one's VAE decoder: images neither
    makes). Files listed since were not read (``_lists_as_checked``)."""
    try:
        now: dict[str, str] | None = load_manifest(engine_dir, verify_files=False).files
    except SdexportError:
        now = None
    if now is None or not _lists_as_checked(now, manifest.files):
        raise EngineDirError(f"{engine_dir}: the directory changed while its engines loaded (an export or build into "
                             "it meanwhile?); run again")


def zeroes_negatives(manifest: Manifest) -> bool:
    """An SDXL export whose ``force_zeros_for_empty_prompt`` (model_index.json's; diffusers' default,
    on, where the manifest records none) makes the unconditional half zeros without a negative
    prompt (``Txt2ImgPipeline.zeroes_negatives``; other families never read the flag)."""
    from sdexport.specs import is_sdxl

    return is_sdxl(manifest.family) and bool((manifest.model.get("pipeline_config") or {})
                                             .get("force_zeros_for_empty_prompt", True))


def graph_for(manifest: Manifest, name: str, backend: str, graphs: str = "auto") -> str:
    """The ONNX graph ``backend`` (resolved) runs for component ``name``: the ONNX Runtime CUDA graph
    that ``sdexport build --target onnxruntime-cuda`` wrote, where there is one and ``graphs`` is
    "auto", else the portable graph."""
    from sdexport.build.onnxruntime_build import TARGET

    entry = manifest.components[name]
    optimized = entry.optimized.get(TARGET)
    if backend == "onnxruntime-cuda" and graphs == "auto" and optimized is not None:
        return str(optimized["onnx"])
    return entry.onnx


def verify_for_backend(engine_dir: Path, manifest: Manifest, backend: str, graphs: str = "auto", *,
                       image_inputs: bool = False, lora: bool = False) -> None:
    """Hash what ``backend`` (resolved) reads: the ONNX graphs ONNX Runtime runs (the Torch backend
    reads none, and the TensorRT loader hashes only the plan it picks), tokenizers and scheduler always;
    with run-time ``lora`` (not the Torch backend's), each LoRA-able component's ``weights.json`` and
    the portable graph its new weights are read from."""
    from sdexport.build.cache_key import onnx_files
    from sdexport.export.weight_names import weight_map_file
    from sdexport.specs import LORA_COMPONENTS

    loaded = pipeline_components(manifest, image_inputs, upcast=upcast_parts(engine_dir, manifest))
    folders = tuple(f"{name}/" for name in manifest.components)
    files = {rel: sha for rel, sha in manifest.files.items() if not rel.startswith(folders)}
    config = vae_config_file(manifest)
    if config is not None:  # its force_upcast says which decoder runs (vae_upcast)
        files[config] = manifest.files[config]
    for entry in manifest.components.values():  # what the loop reads of them whatever runs the graphs: a
        # ControlNet's pooling (guess mode), the U-Net's blocks (run-time LoRA); an edited one changed the
        # image on the TensorRT and Torch backends without a word (an audit)
        config = entry.config_file
        if config in manifest.files:
            files[config] = manifest.files[config]
    if backend.startswith("onnxruntime"):
        for name in loaded:
            files.update(onnx_files(manifest.files, graph_for(manifest, name, backend, graphs)))
    if lora and not backend.startswith("torch"):
        for name in (n for n in LORA_COMPONENTS if n in manifest.components):
            graph = manifest.components[name].onnx
            files.update(onnx_files(manifest.files, graph))
            weights = weight_map_file(graph)
            if weights in manifest.files:
                files[weights] = manifest.files[weights]
    check_files(engine_dir, files, built=manifest.built_files(), adopted=manifest.adopted)


def check_runnable(engine_dir: Path, manifest: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything ``load_pipeline`` refuses short of loading engines (``sdexport inspect`` runs it too):
    the txt2img components, the scheduler config (built into a scheduler) and the tokenizers."""
    txt2img_components(manifest)
    scheduler_config = read_scheduler_config(engine_dir, manifest)
    # (every run checks the directory's own: another --scheduler does not get past it)
    make_scheduler("default", scheduler_config, fix=f"{engine_dir}/scheduler/scheduler_config.json cannot be used; "
                   "export the directory again from a model whose scheduler config names a scheduler it can use")
    return scheduler_config, load_tokenizers(engine_dir, manifest)


def check_runnable_once(engine_dir: Path, manifest: Manifest, *, again: bool = False) -> bool:
    """``check_runnable``, skipped when it passed before on the same inputs with the same libraries
    (``hash_records``): building the scheduler imports diffusers and torch, seconds that ``sdexport
    inspect`` should not spend on an unchanged directory. Call it after the files were checked
    against the manifest. Returns whether the check ran; ``again`` always runs it.

    The inputs are the manifest and every file in the tokenizer and scheduler folders, listed or not
    (transformers also reads files a manifest does not list, such as ``special_tokens_map.json``),
    hashed each time: they are small. A failed check forgets an earlier pass.
    """
    import hashlib
    import json

    from sdexport.hash_records import HashRecords
    from sdexport.manifest import MANIFEST_NAME, sha256_file
    from sdexport.versions import installed_versions

    versions = installed_versions(("sdexport", "diffusers", "transformers", "tokenizers", "torch"))
    inputs = {MANIFEST_NAME: sha256_file(engine_dir / MANIFEST_NAME)}
    for folder in (*tokenizer_names(manifest.family), "scheduler"):
        for path in sorted((engine_dir / folder).rglob("*")) if (engine_dir / folder).is_dir() else []:
            inputs[path.relative_to(engine_dir).as_posix()] = _content_or_identity(path)
    key = hashlib.sha256(json.dumps({"inputs": inputs, "versions": versions}, sort_keys=True).encode()).hexdigest()
    records = HashRecords.of(engine_dir)
    if not again and records.passed("runnable", key):
        return False
    try:
        check_runnable(engine_dir, manifest)
    except BaseException:
        records.note_failed("runnable")
        records.save()
        raise
    records.note_passed("runnable", key)
    records.save()
    return True


def _content_or_identity(path: Path) -> str:
    """A regular file's sha256; for a link or anything else, what it points at and that file's
    identity (never read: it could be a device or a huge file outside the directory)."""
    from sdexport.manifest import sha256_file

    if path.is_file() and not path.is_symlink():
        return sha256_file(path)
    try:
        target = path.stat()
    except OSError:
        return "dangling"
    from sdexport.hash_records import identity

    link = os.readlink(path) if path.is_symlink() else ""
    return f"{link} {identity(target)} {target.st_mode}"


def load_tokenizers(engine_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """The directory's tokenizers, refused when they would not tokenize like the export's.

    transformers can build a tokenizer from a folder that lacks its vocabulary without complaint;
    a tokenizer with almost no vocabulary, or one whose length is not the text encoder's sequence
    length, would turn every prompt into the wrong ids. ``load_manifest`` already checked that the
    files are listed; transformers also reads every other tokenizer file it knows in the folder (a
    ``special_tokens_map.json`` or ``added_tokens.json`` copied in from a hub folder changed the ids,
    or made ids past the text encoder's table), so a file the manifest does not list is refused.
    Then this checks what they load into.
    """
    from transformers import CLIPTokenizer

    from sdexport.models.presets import BYTE_LEVEL_VOCAB, get_preset

    source = manifest.model.get("source") or {}
    config = source.get("config") if source.get("kind") == "single_file" else None
    real = isinstance(config, str) and (preset := get_preset(config)) is not None and preset.tokenizer_pads is not None
    tokenizers = {}
    for name in tokenizer_names(manifest.family):
        unlisted = sorted(path.name for path in (engine_dir / name).glob("[!.]*")
                          if path.is_file() and f"{name}/{path.name}" not in manifest.files)
        if unlisted:
            raise EngineDirError(f"{engine_dir / name}: {', '.join(unlisted)} not in the manifest: transformers reads "
                                 "the tokenizer files it knows in the folder, so a file the export did not write may "
                                 "change how prompts are read; remove it (or re-export)")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(engine_dir / name))
        except Exception as exc:  # transformers raises OSError, ValueError, JSON errors, ...
            first = " ".join(str(exc).split()) or type(exc).__name__
            raise EngineDirError(f"{engine_dir / name}: cannot load the tokenizer ({first})") from None
        if len(tokenizer) <= 2:
            raise EngineDirError(f"{engine_dir / name}: the tokenizer has no vocabulary ({len(tokenizer)} ids); re-export")
        if real and tokenizer.vocab_size <= BYTE_LEVEL_VOCAB:  # (before 2026-12-06, such exports had the tiny ones')
            raise EngineDirError(
                f"{engine_dir / name}: a checkpoint exported with --config {config} by an sdexport that gave it the "
                f"tiny presets' byte-level tokenizer ({tokenizer.vocab_size} ids, not CLIP's): every prompt would reach its "
                "text encoder as other words; export it again")
        length = int(tokenizer.model_max_length)
        if length != manifest.model_dims.S:
            raise EngineDirError(
                f"{engine_dir / name}: the tokenizer makes {length} tokens, the text encoder takes "
                f"{manifest.model_dims.S}; re-export"
            )
        tokenizers[name] = tokenizer
    return tokenizers


def _load_engines(
    engine_dir: Path, manifest: Manifest, names: list[str], backend: str, *, cuda_graph: bool,
    request_profile: ShapeProfile | None, graphs: str = "auto", provider_options: dict[str, str] | None = None,
    loras: list[LoraFile] | None = None, guess_mode: bool = False, pooled: tuple[str, ...] = (),
    optional: dict[str, str] | None = None,
) -> dict[str, Engine]:
    """``pooled``: the directory's pooling ControlNets (``pooled_controlnets``, read once by the caller).
    ``optional``: components TensorRT leaves out where no plan serves (``load_tensorrt_engines``); the
    other backends run the export's graphs, which every directory has."""
    profile, dims = manifest.shape_profile, manifest.model_dims
    from sdexport.runtime.lora_runtime import (
        WEIGHT_MAP_MISSING,
        onnx_initializers,
        onnx_layers,
        refuse_shared_weights,
        unet_config,
        updates_for,
    )

    updates = []
    if loras and not backend.startswith("torch"):
        updates = updates_for(manifest, loras, onnx_layers(engine_dir, manifest), unet_config(engine_dir, manifest),
                              missing=WEIGHT_MAP_MISSING)
    if updates:
        refuse_shared_weights(engine_dir, manifest, updates)
        fused = [n for n in names if graph_for(manifest, n, backend, graphs) != manifest.components[n].onnx
                 and any(u.component == n for u in updates)]
        if fused and backend.startswith("onnxruntime"):  # before any session is made
            raise SdexportError(
                f"--lora at run time changes the portable graphs' weights; {fused[0]} would run the graph of "
                "`sdexport build --target onnxruntime-cuda`, whose weights are packed differently: add "
                "--portable-graphs, or fuse the LoRA at export"
            )
    if backend.startswith("onnxruntime"):
        from sdexport.runtime.onnxruntime_backend import OnnxRuntimeEngine

        device = backend.split("-")[1]
        stream = None
        if device == "cuda":  # one stream for the pipeline: its engines run one after another
            import torch

            stream = torch.cuda.Stream()
        engines: dict[str, Engine] = {}
        nets = manifest.controlnets
        # In guess mode (asked for, or where diffusers turns it on: Txt2ImgPipeline.guess_mode) the
        # ControlNets run on the conditional half of a CFG batch: capture them at the prompts' batch.
        # (An inpainting U-Net's every request inpaints; others' tasks are known per request only.)
        task = "inpaint" if manifest.model_dims.inpainting else "txt2img"
        halved = bool(cuda_graph and nets and (guess_mode or forced_guess_mode(nets[0] in pooled, manifest.family, task)))
        for n in names:
            rel = graph_for(manifest, n, backend, graphs)
            spec = manifest.spec(n)
            sizes = None
            graphed = cuda_graph and spec.per_step  # the U-Net: see OnnxRuntimeEngine
            if graphed and request_profile is not None and request_profile.is_static:
                batch = request_profile.batch[1] if halved and n in nets else request_profile.component_batch(spec)[1]
                sizes = dims.sizes(batch, request_profile.height[1], request_profile.width[1], request_profile.chunks[1])
            engines[n] = OnnxRuntimeEngine(
                spec, engine_dir / rel, dims=dims, profile=profile, device=device, stream=stream,
                fused=rel != manifest.components[n].onnx, cuda_graph=graphed, sizes=sizes,
                provider_options=provider_options,
                initializers=onnx_initializers(engine_dir, manifest, n, updates, rel) if updates else None,
            )
        return engines
    if backend.startswith("torch"):
        return _torch_engines(manifest, names, compile=backend.startswith("torch-compile"),
                              recipe="max" if backend == "torch-compile-max" else "default", loras=loras or [])
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    # TensorRT plans are built from the portable graphs: a refit takes the same new initializers.
    weights = {n: onnx_initializers(engine_dir, manifest, n, updates, manifest.components[n].onnx) for n in names} if updates else None
    return dict(load_tensorrt_engines(engine_dir, manifest, names, cuda_graph=cuda_graph, profile=request_profile,
                                      weights=weights, fp32=kept_fp32(engine_dir, manifest), optional=optional))


def _reload_part(record: dict[str, Any], what: str, resolve: Callable[[str, str], Any]) -> Any:
    """A ControlNet or T2I-Adapter as the manifest records the export read it (``model.source``)."""
    from sdexport.errors import ModelLoadError

    kind = "preset" if record.get("kind") == "preset" else "diffusers"
    where = record.get("name") if kind == "preset" else record.get("path")
    if not isinstance(where, str) or (kind != "preset" and not Path(where).exists()):
        raise EngineDirError(f"the Torch backend needs the {what} the export read, {where}, which is gone")
    try:
        return resolve(where, kind)
    except ModelLoadError as exc:
        raise EngineDirError(f"the Torch backend cannot reload the export's {what}: {exc}") from None


def _check_reloaded_adapters(reloaded: ModelDims, recorded: ModelDims) -> None:
    """The T2I-Adapters the Torch backend reloaded from ``model.source`` are the ones the graphs
    were exported with: as many, reading images of the same channels (a hand-edited manifest would
    otherwise fail inside a convolution)."""
    if (reloaded.adapter_image_channels != recorded.adapter_image_channels
            or reloaded.adapter_features != recorded.adapter_features):
        raise EngineDirError(f"the Torch backend reloaded T2I-Adapter(s) reading "
                             f"{list(reloaded.adapter_image_channels)}-channel images from the manifest's model.source, "
                             f"but its dims describe {list(recorded.adapter_image_channels)}: the manifest was edited "
                             "or its sources changed")


def note_fused_again(manifest: Manifest, loras: list[LoraFile]) -> None:
    """Note a run-time LoRA that the export already fused into the weights (the same file, by its
    sha256: a copy is the same LoRA, and another file written since at the recorded path is not):
    it is then applied twice, its two scales added. Maybe meant (a stronger LoRA), so not refused.
    So is one given twice at run time (silently doubled before: an audit)."""
    from rich.markup import escape

    from sdexport.console import console
    from sdexport.manifest import sha256_file

    fused = {record["sha256"]: record for record in manifest.model.get("loras") or [] if "sha256" in record}
    # each file hashed once, and only where a note could follow: several given, or any fused at export
    digests = [sha256_file(lora.path) for lora in loras] if len(loras) > 1 or fused else []
    given: dict[str, list[LoraFile]] = {}
    for lora, digest in zip(loras, digests):  # the same file given twice at run time (a copy too): its scales add
        given.setdefault(digest, []).append(lora)
    for same in (s for s in given.values() if len(s) > 1):
        console.print(f"[yellow]note:[/] LoRA {escape(str(same[0].path))} is given {len(same)} times; it applies "
                      f"{len(same)} times ({' + '.join(f'{lora.scale:g}' for lora in same)})")
    for lora, digest in zip(loras, digests):
        record = fused.get(digest)
        if record is not None:
            scale = float(record["scale"])
            copy = "" if Path(record["path"]).resolve() == lora.path.resolve() else f" as {record['path']}"
            console.print(f"[yellow]note:[/] LoRA {escape(str(lora.path))} was fused into this directory at export"
                          f"{escape(copy)} (scale {scale:g}); added again at run time it applies twice "
                          f"({scale:g} + {lora.scale:g})")


def exported_loras(manifest: Manifest) -> list[LoraFile]:
    """The LoRA files fused at export, for the Torch backend to fuse again into the weights it
    reloads; each must still be the file the export read (its sha256)."""
    return [LoraFile(_file_read_at_export(record, "LoRA file", "fused"), float(record["scale"]))
            for record in manifest.model.get("loras") or []]


def exported_embeddings(manifest: Manifest) -> list[Embedding]:
    """The textual inversion embeddings added at export, for the Torch backend to add again, in
    the same order (so that their words get the ids the exported tokenizer gave them)."""
    return [Embedding(_file_read_at_export(record, "embedding", "added"), record["word"])
            for record in manifest.model.get("embeddings") or []]


def _file_read_at_export(record: dict[str, Any], what: str, done: str) -> Path:
    """The file a manifest ``record`` names, still the one the export read (its sha256)."""
    from sdexport.manifest import sha256_file

    path = Path(record["path"])
    if not path.is_file():
        raise EngineDirError(f"the Torch backend needs the {what} {done} at export, {path}, which is gone")
    if sha256_file(path) != record["sha256"]:
        raise EngineDirError(f"{path} changed since it was {done} at export (its sha256 differs); the Torch "
                             "backend would not run what the graphs hold")
    return path


def _torch_engines(
    manifest: Manifest, names: list[str], *, compile: bool, device: torch.device | None = None,
    dtype: torch.dtype | None = None, recipe: str = "default", loras: list[LoraFile] | None = None,
) -> dict[str, Engine]:
    """Reload the PyTorch modules the directory was exported from (the reference implementation).

    ``device``/``dtype`` default to CUDA (fp16 for an fp16 export) where there is a GPU, else fp32 on
    the CPU."""
    import torch

    from sdexport.models import load_model
    from sdexport.runtime.torch_backend import TorchEngine

    source: dict[str, Any] = manifest.model["source"]
    if source["kind"] == "onnx":
        raise EngineDirError(
            "this directory was adopted from an ONNX export without its PyTorch model, which the Torch "
            f"backend runs: adopt it again with the checkpoint (sdexport adopt {pasteable(source['path']) if source.get('path') else 'DIR'} "
            "--model CHECKPOINT --force), or choose another backend"
        )
    reference = source.get("name") if source["kind"] == "preset" else source.get("path")
    if not isinstance(reference, str) or not reference:
        raise EngineDirError(f"the manifest does not record where the {source['kind']} model came from; "
                             "the Torch backend cannot reload it")
    if source["kind"] != "preset" and not Path(reference).exists():
        raise EngineDirError(f"the Torch backend needs the source checkpoint {reference}, which is gone")
    seed = source.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EngineDirError(f"the manifest's model.source.seed {seed!r} is not an integer")
    from sdexport.models.source_files import check_unchanged

    check_unchanged(source, {manifest.spec(name).module for name in manifest.components})  # the graphs' weights
    from sdexport.models.adapter import resolve_adapter
    from sdexport.models.controlnet import resolve_controlnet
    from sdexport.models.part_sources import adapter_records

    # as the export loaded them (presets: the same seed)
    fused, embeddings = exported_loras(manifest), exported_embeddings(manifest)  # (their files, before the weights load)
    controlnets = [_reload_part(record, "ControlNet", resolve_controlnet) for record in source.get("controlnets") or []]
    adapters = [_reload_part(record, "T2I-Adapter", resolve_adapter) for record in adapter_records(source)]
    model = load_model(reference, config=source.get("config"), seed=seed, vae=source.get("vae"),
                       controlnets=controlnets, adapters=adapters, union_images=manifest.model_dims.K or 1,
                       kind=source["kind"])
    from sdexport.models.lora import add_updates, fuse_into, torch_layers

    _check_reloaded_adapters(model.dims, manifest.model_dims)
    fuse_into(model.modules, fused, manifest.family)  # as the export did
    from sdexport.models import textual_inversion

    textual_inversion.apply(model, embeddings)
    if loras:
        from sdexport.runtime.lora_runtime import updates_for

        add_updates(model.modules, updates_for(manifest, loras, torch_layers(model.modules),
                                               getattr(model.modules.get("unet"), "config", None)))

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" and manifest.dtype == "fp16" else torch.float32
    wanted = {name: torch.float32 if manifest.spec(name).always_fp32 else dtype for name in names}  # the fp32 VAE parts
    shared = {name: model.module(manifest.spec(name).module) for name in names}
    # The fp16 decoder and its fp32 fallback share the VAE, and moving a module to a dtype converts
    # it in place: each dtype but a module's first gets a copy of its own (one for the decoder and
    # the encoder), all taken before any engine converts the module, so that every copy holds the
    # weights as loaded (a copy of the fp16 module would hold fp16-rounded "fp32" weights).
    first: dict[int, torch.dtype] = {}
    copies: dict[tuple[int, torch.dtype], Any] = {}
    for name in names:
        key = (id(shared[name]), wanted[name])
        if first.setdefault(key[0], wanted[name]) != wanted[name] and key not in copies:
            copies[key] = copy.deepcopy(shared[name])
    return {name: TorchEngine(manifest.spec(name), copies.get((id(shared[name]), wanted[name]), shared[name]),
                              profile=manifest.shape_profile, device=device, dtype=wanted[name], compile=compile,
                              recipe=recipe)
            for name in names}

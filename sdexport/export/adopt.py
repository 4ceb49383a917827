"""An ONNX export made by another tool (optimum) → an sdexport engine directory, in place.

optimum's ``optimum-cli export onnx`` (and ``ORTDiffusionPipeline.save_pretrained``) writes the
layout sdexport writes: ``model_index.json``, ``<component>/model.onnx`` with a ``config.json``
beside it, tokenizers and the scheduler config. What it lacks is the manifest: the family, the
model's sizes, the shape profile and the hashes the runtime and the builds rely on. ``sdexport
adopt`` writes that manifest after checking every graph against the ComponentSpecs (names, dtypes,
ranks and fixed sizes: ``manifest.check_graph``), and, where the PyTorch model is given
(``--model``), each graph's outputs against it. It adds ``manifest.json`` and nothing else: the
directory stays what optimum and ONNX Runtime's tools read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sdexport.errors import SdexportError, a_class, one_line, pasteable
from sdexport.export.pipeline_files import MODEL_INDEX
from sdexport.graph_io import GraphIO, graph_precision
from sdexport.manifest import (
    MANIFEST_NAME,
    SCHEDULER_CONFIG_FILE,
    ComponentEntry,
    Manifest,
    adopted_record,
    is_sdexport_manifest,
)
from sdexport.manifest_schema import VAE_SCALING_DEFAULT
from sdexport.models.outline import (
    SUPPORTED_PIPELINES,
    checkpoint_profile,
    family_of_index,
    index_scheduler_class,
    read_json,
    refuse_latent_statistics,
    tokenizer_length,
)
from sdexport.specs import (
    SDXL_REFINER,
    VAE_ENCODERS,
    ComponentSpec,
    ModelDims,
    check_clip_skip,
    components_for,
    tokenizer_names,
    txt2img_specs,
)

GRAPH = "model.onnx"
PARTS = {"unet": "unet", "vae": "vae_decoder", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
"""Where each part's config.json is read from in an ONNX export (the VAE has no folder of its own)."""


@dataclass(frozen=True)
class AdoptPlan:
    family: str
    pipeline: str
    """model_index.json's ``_class_name``."""
    specs: list[ComponentSpec]
    """The components found, resolved for the model."""
    dims: ModelDims
    configs: dict[str, dict[str, Any]]
    index: dict[str, Any]


def identify(directory: Path) -> str | None:
    """What ``directory`` is when it is not an sdexport engine directory, for messages that say what
    to do: "onnx" (optimum's layout), "diffusers-onnx" (diffusers' legacy ONNX pipelines, which
    lack the component configs), "diffusers" (PyTorch weights); None when it does not look like a
    pipeline at all."""
    if not (directory / MODEL_INDEX).is_file():
        return None
    unet = directory / "unet"
    if (unet / GRAPH).is_file():
        try:
            pipeline = json.loads((directory / MODEL_INDEX).read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            pipeline = None
        return "diffusers-onnx" if isinstance(pipeline, str) and pipeline.startswith("Onnx") else "onnx"
    if unet.is_dir() and not (unet / GRAPH).exists() and any(unet.glob("diffusion_pytorch_model*")):
        return "diffusers"  # (its weights seen: a folder named model.onnx, or nothing, is neither)
    return None


def adoption_hint(directory: Path) -> str:
    """The sentence ``load_manifest`` adds for a directory without a manifest ('' when none helps)."""
    kind = identify(directory)
    if kind == "onnx":
        return (f"; it is an ONNX export of a diffusers pipeline (optimum's layout) without an sdexport "
                f"manifest: check it and write one with `sdexport adopt {pasteable(directory)}`")
    if kind == "diffusers":
        return f"; it is a diffusers checkpoint (PyTorch weights): export it with `sdexport export {pasteable(directory)} -o DIR`"
    if kind == "diffusers-onnx":
        return f"; {LEGACY_ONNX}"
    return ""


LEGACY_ONNX = (
    "it is an ONNX export in diffusers' older layout (OnnxStableDiffusionPipeline: the Hub's onnx revisions, "
    "diffusers' conversion script), whose folders lack the config.json sdexport reads the model's sizes from: "
    "export the checkpoint again, with `sdexport export CHECKPOINT -o DIR` (or `optimum-cli export onnx --model "
    "CHECKPOINT DIR`, then `sdexport adopt DIR`)"
)
"""What to do with diffusers' legacy ONNX pipelines' folders (``identify``'s "diffusers-onnx")."""


def plan_adopt(directory: Path, *, replace: bool = False, clip_skip: int = 0) -> AdoptPlan:
    """Everything about an adoption that small files tell: what the directory is, its family, its
    components and the model's sizes. One clear line for anything else. ``replace`` (``--force``):
    a manifest that ``adopt`` wrote may be there (it is replaced at the end, never removed first).
    ``clip_skip`` (``--clip-skip``): the layer an SD text encoder graph was exported to read (as
    ``export --clip-skip`` builds it in), or an SDXL directory's default; checked as export's."""
    if not directory.is_dir():
        raise SdexportError(f"{directory}: no such directory")
    check_replaceable(directory, replace)
    from sdexport.user_cache import check_cache_outside

    check_cache_outside(directory)  # (its hash records went in, and every command then refused the folder)
    kind = identify(directory)
    if kind == "diffusers":
        raise SdexportError(
            f"{directory}: a diffusers checkpoint (PyTorch weights, no unet/{GRAPH}), not an ONNX export; "
            f"export it: sdexport export {pasteable(directory)} -o DIR"
        )
    if kind == "diffusers-onnx":
        raise SdexportError(f"{directory}: {LEGACY_ONNX}")
    if kind is None:
        raise SdexportError(
            f"{directory}: not an ONNX export of a diffusers pipeline (it needs {MODEL_INDEX} and "
            f"unet/{GRAPH}, as `optimum-cli export onnx --model <checkpoint> DIR` writes them)"
        )
    index = read_json(directory / MODEL_INDEX)
    pipeline = str(index.get("_class_name", "?"))
    family = family_of_pipeline(pipeline)
    if family is None:
        raise SdexportError(
            f"{directory}: {a_class(pipeline)}; sdexport runs Stable Diffusion 1.x/2.x and XL pipelines "
            f"({', '.join(SUPPORTED_PIPELINES)}; also with optimum's ORT prefix)"
        )
    family = family_of_index(family, index, directory)
    named, saved = index_scheduler_class(index), read_json(directory / SCHEDULER_CONFIG_FILE).get("_class_name")
    if named is not None and named != saved:
        # diffusers (and optimum) would build the index's class; the runtime reads the config's
        raise SdexportError(f"{directory}: {MODEL_INDEX} names the scheduler {named}, {SCHEDULER_CONFIG_FILE} "
                            f"{saved!r}; make them agree (diffusers builds the one {MODEL_INDEX} names)")
    specs = [s for s in components_for(family) if not s.always_fp32 and (directory / s.name / GRAPH).is_file()]
    # what txt2img runs; the refiner's one task starts from an image, which its encoder reads
    needed = [s.name for s in txt2img_specs(family)] + (["vae_encoder"] if family == SDXL_REFINER else [])
    missing = [n for n in needed if n not in {s.name for s in specs}]
    if missing:
        runs = "the SDXL refiner (img2img, inpainting)" if family == SDXL_REFINER else "a txt2img pipeline"
        raise SdexportError(f"{directory}: no {', '.join(f'{n}/{GRAPH}' for n in missing)}; "
                            f"{runs} needs them (export them too)")
    known = {s.name for s in components_for(family)}
    configs = {part: read_json(directory / folder / "config.json") for part, folder in PARTS.items()
               if folder in known}
    lengths = {name: tokenizer_length(directory / name) for name in tokenizer_names(family)}
    refuse_latent_statistics(family, configs["vae"], f"{directory}: vae_decoder/config.json")
    latent = configs["vae"].get("latent_channels", 4)
    if configs["unet"].get("in_channels") not in (latent, 2 * latent + 1):
        raise SdexportError(
            f"{directory}: the U-Net takes {configs['unet'].get('in_channels')} channels and the VAE makes "
            f"{latent}: a conditioned U-Net other than inpainting ({2 * latent + 1}), which sdexport does not run"
        )
    from sdexport.models.dims import model_dims

    try:
        dims = model_dims(family, {k: SimpleNamespace(**v) for k, v in configs.items()}, lengths, str(directory))
    except (AttributeError, TypeError, ValueError) as exc:
        raise SdexportError(f"{directory}: a component's config.json lacks a size sdexport needs ({exc})") from None
    if clip_skip:
        check_clip_skip("--clip-skip", clip_skip, [int(configs[name].get("num_hidden_layers", 12))
                                                   for name in ("text_encoder", "text_encoder_2") if name in configs])
        dims = dataclasses.replace(dims, clip_skip=clip_skip)  # (``replace`` here is --force)
    return AdoptPlan(family, pipeline, [s.for_model(dims) for s in specs], dims, configs, index)


def check_replaceable(directory: Path, replace: bool) -> None:
    """No manifest yet, or (``replace``) one that ``adopt`` wrote; anything else is refused."""
    path = directory / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if path.is_file() and not is_sdexport_manifest(data):  # another tool's manifest.json (a link to nothing: below)
        # (adopt said to inspect it, inspect "not an sdexport manifest", and --force refused to replace it)
        raise SdexportError(f"{path}: a {MANIFEST_NAME} that is not sdexport's (another tool's?), where adopt writes "
                            "its own; move it out of the folder to adopt it (adopt never replaces it)")
    if not replace:
        raise SdexportError(
            f"{directory}: already has a {MANIFEST_NAME}; it is an sdexport engine directory (or was adopted): "
            f"inspect it with `sdexport inspect {pasteable(directory)}` (--force adopts it again, replacing an adopted "
            "directory's manifest)"
        )
    if not isinstance(data, dict) or not adopted_record(data.get("model")) or path.is_symlink():
        raise SdexportError(f"{path}: not a manifest `sdexport adopt` wrote; refusing to replace it")


def family_of_pipeline(pipeline: str) -> str | None:
    """The family of a pipeline ``export`` takes (``SUPPORTED_PIPELINES``), also with optimum's
    ``ORT`` prefix (``ORTDiffusionPipeline.save_pretrained`` writes its own class); None for any
    other, such as the upscaler, depth-to-image, instruct-pix2pix, PAG or GLIGEN pipelines, whose
    models or guidance the runtime does not have."""
    return SUPPORTED_PIPELINES.get(pipeline.removeprefix("ORT"))


def adopt(
    directory: Path, *, ranges: dict[str, str | None] | None = None, model: str | None = None,
    config: str | None = None, force: bool = False, clip_skip: int = 0,
) -> Manifest:
    """Check ``directory``'s graphs and write its manifest (``model``: prove them against PyTorch;
    ``config``: a single-file ``model``'s architecture, as ``export --config``).

    ``ranges``: ``min:opt:max`` texts per axis (batch, height, width, chunks) for the manifest's
    profile, which the builds and the runtime's request checks use (default: the family's, and one
    prompt chunk); optimum's graphs themselves take any batch, size and text length. A graph that
    fixes an axis the profile ranges over is refused (``manifest.check_graph``)."""
    from sdexport.export.plan import ENGINE_DIR
    from sdexport.manifest import check_graph, check_layout, save_manifest
    from sdexport.output_dir import updating

    plan = plan_adopt(directory, replace=force, clip_skip=clip_skip)
    if model is not None:  # a wrong --model or --config in one line now, not after the graphs are read
        from sdexport.models.outline import outline_model

        outline_model(model, config=config)
    # as export's, but one prompt chunk: another exporter's U-Net may fix its text length at S
    profile = replace(checkpoint_profile(plan.family, plan.configs["unet"], plan.dims.vae_scale_factor,
                                         plan.dims.image_multiple), chunks=(1, 1, 1)).with_ranges(**(ranges or {}))
    profile.validate(plan.dims)
    blocks = plan.configs["vae"].get("block_out_channels") or [128]  # its widest, full-size activations: as export
    profile.check_limits(int(blocks[0]) if isinstance(blocks, list) and isinstance(blocks[0], int) else 128)
    from sdexport.export.exporter import tool_versions  # imports torch: after the one-line refusals

    with updating(directory, ENGINE_DIR):
        from sdexport.output_dir import require_writable

        require_writable(directory)  # (it writes the manifest)
        check_replaceable(directory, force)  # again, under the lock: another adopt may have finished
        built_before = _built_files(directory)  # (an adopted manifest's, under --force)
        graphs = {s.name: _read_graph(directory, s.name) for s in plan.specs}  # each parsed once here
        entries = {name: ComponentEntry(onnx=f"{name}/{GRAPH}", dtype=graph.dtype, parity=dict(_UNCHECKED))
                   for name, graph in graphs.items()}
        scaling = plan.configs["vae"].get("scaling_factor", VAE_SCALING_DEFAULT)
        if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not scaling > 0:
            raise SdexportError(f"{directory}: vae_decoder/config.json scaling_factor {scaling!r} is not a positive number")
        scheduler = read_json(directory / SCHEDULER_CONFIG_FILE)
        from sdexport.models.dims import pipeline_config

        pipeline_options = pipeline_config(plan.family, plan.index)
        manifest = Manifest(
            family=plan.family,
            # (`adopt .` gave an empty name; a link keeps its own name, not its target's)
            model={"label": f"{Path(os.path.abspath(directory)).name} (ONNX export adopted by sdexport)",
                   "source": {"kind": "onnx", "path": str(directory.resolve()), "pipeline": plan.pipeline},
                   "random_weights": False, **({"pipeline_config": pipeline_options} if pipeline_options else {})},
            prediction_type=str(scheduler.get("prediction_type", "epsilon")),
            vae_scaling_factor=float(scaling),
            dims=plan.dims.record(),
            profile=profile.to_dict(),
            dtype="fp16" if any(e.dtype == "fp16" for e in entries.values()) else "fp32",
            tools={**tool_versions(), "exporter": _exporter(directory, plan), "opset": graphs["unet"].opset},
            components=entries,
            files=adopted_files(directory, plan, graphs),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        check_layout(directory, manifest)  # the tokenizer files, paths inside the directory
        # names, dtypes, ranks and fixed sizes, before anything is written
        graph_ios = {}
        for spec in plan.specs:
            try:
                graph_ios[spec.name] = check_graph(directory, manifest, spec.name)
            except SdexportError as exc:  # (older optimum's encoder returns latent_sample: all was refused)
                if spec.name not in VAE_ENCODERS or plan.family == SDXL_REFINER:  # (the refiner's one task needs it)
                    raise
                raise type(exc)(f"{exc}; the VAE encoder serves img2img and inpainting only: to adopt the rest for "
                                f"text-to-image, move {pasteable(directory / spec.name)} out of the folder") from None
        from sdexport.runtime.loading import check_runnable

        check_runnable(directory, manifest)
        from rich.markup import escape

        from sdexport.console import console
        from sdexport.runtime.schedulers import default_scheduler_note

        if note := default_scheduler_note(scheduler, str(directory), family=plan.family,
                                          conditioned=plan.dims.conditioned, again="adopt it again (--force)"):
            console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        for note in _fixed_cfg_batches(plan.specs, graph_ios):
            console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        if model is not None:
            _prove(directory, manifest, plan, model, config, graph_ios)
        # what the new manifest forgets goes first: stopped in between, the old manifest lists a built
        # file that is missing (the next build makes it again); the other way round the new one left
        # sdexport's own files unlisted, which every build then refused as the user's
        _remove_forgotten(directory, built_before, manifest.files)
        save_manifest(directory, manifest)  # atomic: an adopted manifest is replaced, never missing
    return manifest


def _built_files(directory: Path) -> dict[str, str]:
    """What sdexport built into ``directory`` since its manifest was written, with the sha256 that
    manifest lists (none without one): each component's TensorRT plans (``engines``) and the files
    of its rewritten graphs (``optimized``: ``COMPONENT/TARGET/``). The adopted files are the
    user's export, never counted here."""
    from sdexport.manifest import built_files

    try:
        data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = data["files"]
        return {rel: str(files[rel]) for rel in built_files(files, data["components"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _remove_forgotten(directory: Path, before: dict[str, str], now: dict[str, str]) -> None:
    """``adopt --force`` forgets what was built since (``before``: TensorRT plans, fused graphs, from
    the graphs as they were): remove those files, so that building again does not find them
    unlisted and refuse them as the user's. Only a file that still matches the sha256 the old
    manifest recorded for it is ours; anything else stays where it is."""
    from sdexport.manifest import sha256_file

    root = directory.resolve()
    for rel in sorted(set(before) - set(now)):
        path = directory / rel
        if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(root):
            continue
        if sha256_file(path) != before[rel]:
            continue
        path.unlink()
        if path.parent.resolve() != root and not any(path.parent.iterdir()):  # a fused graphs' folder left empty
            path.parent.rmdir()


_UNCHECKED = {"status": "unchecked", "reason": "adopted without --model: graphs checked against the specs "
              "(names, dtypes, shapes), outputs not compared with PyTorch"}


def adopted_files(directory: Path, plan: AdoptPlan, graphs: dict[str, GraphFacts]) -> dict[str, str]:
    """What sdexport reads, hashed: each component's graph, its external weight files and config
    (and its weights.json where there is one: run-time LoRA reads it), the tokenizers, the scheduler
    config and model_index.json. Nothing else in the directory (a README, a .git folder) is listed:
    it stays the user's, and changing it breaks no run."""
    from sdexport.export.weight_names import WEIGHTS_FILE
    from sdexport.manifest import sha256_file

    rels = [MODEL_INDEX, SCHEDULER_CONFIG_FILE]
    for name in tokenizer_names(plan.family):
        rels += sorted(p.relative_to(directory).as_posix() for p in (directory / name).rglob("*") if p.is_file())
    for name, graph in graphs.items():
        rels.append(f"{name}/{GRAPH}")
        rels += [f"{name}/{file}" for file in ("config.json", WEIGHTS_FILE) if (directory / name / file).is_file()]
        rels += [f"{name}/{location}" for location in graph.weight_files]
    files = {}
    for rel in dict.fromkeys(rels):
        path = directory / rel
        if not path.is_file():
            raise SdexportError(f"{directory}: {rel} is missing (a graph's external weights, or a file the runtime reads)")
        files[rel] = sha256_file(path)
    return files


@dataclass(frozen=True)
class GraphFacts:
    """What adopt reads from one graph's proto (parsed once: optimum embeds weights under 2 GB)."""

    dtype: str
    """fp16 when most of the floating-point weights are float16 (optimum's --dtype fp16; an fp16 graph
    keeps a few float32 constants), else fp32; a graph without float weights by its I/O."""
    weight_files: tuple[str, ...]
    """Its external weight files, beside it."""
    opset: int | None


def _fixed_cfg_batches(specs: list[ComponentSpec], graph_ios: dict[str, GraphIO]) -> list[str]:
    """What a graph run twice the images under guidance (a U-Net) and fixed at a batch takes: the
    calls with guidance alone (``manifest._check_fixed_axis`` holds it to them), so a run with
    --guidance 1 or below fails at the engine, after the text encoders ran (an audit): said here."""
    notes = []
    for spec in specs:
        io = graph_ios.get(spec.name)
        if not spec.cfg_batch or io is None:
            continue
        declared = [io.inputs[t.name] for t in spec.inputs if t.dims[:1] == ("B",) and t.name in io.inputs]
        fixed = {graph.sizes[0] for graph in declared if graph.sizes and graph.sizes[0] is not None}
        if fixed:
            size = min(fixed)
            notes.append(f"{spec.name} fixes its batch at {size}: it runs {size // 2} image{'s' if size > 2 else ''} a "
                         "call with guidance above 1 only; a run with --guidance 1 or below fails at it (export it "
                         "with a dynamic batch for those)")
    return notes


def _read_graph(directory: Path, name: str) -> GraphFacts:
    """One graph's facts; refuses a weight file that is not beside the graph before anything reads it."""
    import onnx

    try:
        model = onnx.load(str(directory / name / GRAPH), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, among others: a truncated copy or download
        raise SdexportError(f"{directory}: {name}/{GRAPH} is not a readable ONNX graph ({one_line(exc, 200)}); "
                            "copy or download it again") from None
    graph = model.graph
    locations: list[str] = []
    for init in graph.initializer:
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if location is None:
            continue
        if not location or "/" in location or "\\" in location or location in (".", ".."):
            raise SdexportError(f"{directory}: {name}/{GRAPH} keeps weights in {location!r}, not a file "
                                "beside it; refusing to read it")
        locations.append(location)
    from sdexport.manifest import short_weight_files

    short = short_weight_files(graph, directory / name)
    if short:
        raise SdexportError(f"{directory}: {name}/{GRAPH}: its weight file {short[0]} is cut short; copy or "
                            "download it again")
    dtype = graph_precision(graph)
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    known = onnx.defs.onnx_opset_version()
    if opset is not None and opset > known:  # (adopt passed it, and run met ONNX Runtime's refusal)
        raise SdexportError(f"{directory}: {name}/{GRAPH} is stamped opset {opset}, newer than any this onnx "
                            f"{onnx.__version__} knows (up to {known}), so its graphs cannot be checked; export it at "
                            "a released opset (or install a newer onnx)")
    fused = sorted({node.op_type for node in graph.node if node.domain == "com.microsoft"})  # (ONNX Runtime's contrib)
    if fused:  # (adopted, it failed at run on the CPU and at every build: an audit)
        raise SdexportError(f"{directory}: {name}/{GRAPH} holds ONNX Runtime's fused operators "
                            f"({', '.join(fused[:3])}{', ...' if len(fused) > 3 else ''}: onnxruntime's "
                            "optimize_pipeline or optimum's --optimize), which TensorRT does not read and the CPU "
                            "provider runs only in part; adopt the export from before that step, then "
                            "`sdexport build DIR --target onnxruntime-cuda` makes the fused graphs beside it")
    return GraphFacts(dtype, tuple(dict.fromkeys(locations)), opset)


def _check_same_words(directory: Path, model: Any, model_ref: str) -> None:
    """The directory's tokenizers read no word the model's lack: textual inversion words (the
    export's added tokens) are embeddings the PyTorch model has no rows for, so the Torch backend,
    which reloads the model, would index past its table. The graphs passed parity all the same:
    verification feeds ids the model knows."""
    from transformers import CLIPTokenizer

    for name, theirs in model.tokenizers.items():
        added = sorted(set(CLIPTokenizer.from_pretrained(str(directory / name)).get_vocab()) - set(theirs.get_vocab()))
        if added:
            raise SdexportError(f"--model {model_ref}: {directory / name} has {len(added)} word(s) its tokenizer lacks "
                                f"(e.g. {added[0]!r}: textual inversion, which adopt does not carry); export the "
                                "checkpoint with sdexport export --textual-inversion instead, or adopt without --model")


def _exporter(directory: Path, plan: AdoptPlan) -> str:
    text = plan.configs.get("text_encoder") or plan.configs["text_encoder_2"]  # (the refiner has only the second)
    versions = {k: v for k, v in (("diffusers", plan.index.get("_diffusers_version")),
                                  ("transformers", text.get("transformers_version"))) if v}
    made = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"adopted ONNX export ({made})" if made else "adopted ONNX export"


ADOPT_CHECKS = "adopt checks the min point only"
"""Why adopt's parity check skips the other points: a check of each graph, as ``export --verify quick``."""


def _prove(directory: Path, manifest: Manifest, plan: AdoptPlan, model_ref: str, config: str | None,
           graph_ios: dict[str, GraphIO]) -> None:
    """Each graph's outputs against the PyTorch model's, at the profile's min (as ``export --verify
    quick``), fed as it takes its inputs (``graph_ios``, from ``check_graph``)."""
    from rich.markup import escape

    from sdexport.console import step
    from sdexport.errors import ParityError
    from sdexport.export.exporter import print_parity_report, vocab_size_of
    from sdexport.export.verify import require_parity, verify_component
    from sdexport.models import load_model

    with step(f"Loading {escape(model_ref)}"):  # (a folder named "[draft]" lost its name as markup)
        model = load_model(model_ref, config=config)
    if model.family != plan.family:
        raise SdexportError(f"--model {model_ref}: an {model.family} model, the export an {plan.family} one; give the "
                            "checkpoint this directory was exported from")
    _check_same_words(directory, model, model_ref)
    if dataclasses.replace(model.dims, clip_skip=plan.dims.clip_skip) != plan.dims:  # (the skip: --clip-skip's)
        ours, theirs = vars(model.dims), vars(plan.dims)
        differ = [f"{k} {ours[k]} (the export's {theirs.get(k)})" for k in ours if ours[k] != theirs.get(k)][:3]
        raise SdexportError(f"--model {model_ref}: its sizes are not the export's: {', '.join(differ)}; give the "
                            "checkpoint this directory was exported from")
    for spec in plan.specs:
        entry = manifest.components[spec.name]
        with step(f"Verifying {spec.name} against PyTorch"):
            report = verify_component(
                spec, directory / entry.onnx, model.module(spec.module), profile=manifest.shape_profile,
                dims=plan.dims, dtype=entry.dtype, vocab_size=vocab_size_of(model), mode="quick",
                graph_io=graph_ios[spec.name],
            )
        for point in report.points:  # (adopt's choice, not --verify's: inspect counted it "by request")
            if point.status == "skipped" and point.reason == "quick verification":
                point.reason = ADOPT_CHECKS
        print_parity_report(report)
        try:
            require_parity(report)
        except ParityError as exc:
            if spec.name != "text_encoder" or plan.family != "sd":
                raise
            # an SD text encoder graph reads one layer, built in: a checkpoint exported with a clip
            # skip disagrees with the last layer's reading
            layer = f"layer {plan.dims.clip_skip} before the last" if plan.dims.clip_skip else "last layer"
            raise ParityError(f"{exc} (the graph was compared reading the {layer}: one exported with another "
                              "clip skip is adopted with adopt --clip-skip N)") from None
        entry.parity = report.to_dict()
    from sdexport.models.source_files import fingerprint, source_weight_files

    read = source_weight_files(model.source, {spec.module for spec in plan.specs})  # for the Torch backend's reload
    files = {"files": fingerprint(read)} if read else {}
    manifest.model["source"] = {**model.source, **files, "adopted_from": str(directory.resolve())}
    manifest.model["random_weights"] = model.random_weights

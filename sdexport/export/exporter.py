"""Checkpoint → verified ONNX engine directory, the whole ``sdexport export`` job.

``plan_export`` checks everything it can from configs first. The output path is then claimed
(``sdexport.output_dir``: a lock, a hidden staging folder, an atomic swap at the end), so a failed,
interrupted or concurrent export never leaves something that looks like a usable engine directory
and never replaces a directory that is not an sdexport engine directory.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.markup import escape

from sdexport.build.vae_upcast import FP32_VAE
from sdexport.console import console, step
from sdexport.errors import SdexportError
from sdexport.export import graph
from sdexport.export.inputs import sample_inputs
from sdexport.export.memory import MemoryLog, give_back_freed_memory, verification_budget_mb
from sdexport.export.pipeline_files import write_pipeline_files
from sdexport.export.plan import (
    DEFAULT_OPSET,
    ENGINE_DIR,
    LAYER_NORM_OPSET,
    ExportOptions,
    VerifyMode,
    fp32_vae_note,
    plan_export,
)
from sdexport.export.trace import trace_to_onnx
from sdexport.export.verify import (
    ParityReport,
    Reference,
    compare_with_onnx,
    require_finite_weights,
    require_parity,
    torch_references,
)
from sdexport.export.weight_names import layer_reads, write_weight_map
from sdexport.export.weight_store import WeightStore
from sdexport.manifest import ComponentEntry, Manifest, hash_tree, save_manifest
from sdexport.manifest_schema import format_version_for
from sdexport.models import LoadedModel, load_model
from sdexport.models.source_files import check_stamps, fingerprint, source_weight_files, stamps
from sdexport.output_dir import claim
from sdexport.runtime.schedulers import check_model_scheduler, default_scheduler_note
from sdexport.shapes import ShapeProfile
from sdexport.specs import LORA_COMPONENTS, ComponentSpec, txt2img_specs
from sdexport.versions import importing_distribution, installed_versions

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = ["ExportOptions", "export", "export_component"]


def tool_versions() -> dict[str, str]:
    """The installed tools an export depends on (those not installed are left out); of onnxruntime and
    onnxruntime-gpu, the one that imports."""
    found = installed_versions(("sdexport", "torch", "diffusers", "transformers", "onnx", "onnx-graphsurgeon"))
    builds = ("onnxruntime", "onnxruntime-gpu")
    runtime = importing_distribution("onnxruntime", builds)
    found |= dict([runtime]) if runtime else installed_versions(builds)
    return {package: v for package, v in found.items() if v is not None}


def export(model_ref: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: ExportOptions) -> Manifest:
    """Export ``model_ref`` (a preset name, a diffusers directory, a single file) into the engine
    directory ``out_dir`` as ``sdexport export`` does; either may be a path or its text."""
    model_ref, out_dir = os.fspath(model_ref), Path(out_dir)
    plan = plan_export(model_ref, out_dir, options)
    if options.dtype == "fp16" and options.opset < LAYER_NORM_OPSET:
        console.print(f"[yellow]note:[/] --opset {options.opset} has no LayerNormalization: the fp16 graphs compute "
                      f"LayerNorm's variance in fp16, which overflows where an activation strays 256 from its "
                      f"mean; --opset {LAYER_NORM_OPSET} or later computes it in float32", soft_wrap=True)
    if note := fp32_vae_note(plan, options.dtype):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    from sdexport.runtime.onnxruntime_backend import require_provider

    require_provider("cpu")  # verification and fp16 conversion run on onnxruntime
    memory = MemoryLog()
    with claim(out_dir, ENGINE_DIR, replace=options.force, protected=plan.sources) as staging:
        with step(f"Loading {escape(model_ref)}"), memory.stage("load"):
            # lazy: each part's weights are built or read when its turn comes, and freed after it
            model = load_model(model_ref, config=options.config, seed=options.seed, vae=options.vae,
                               controlnets=plan.controlnets, adapters=plan.adapters, lazy=True,
                               union_images=options.union_images, modules={spec.module for spec in plan.specs})
        plan.profile.validate(model.dims)  # the loaded configs agree with what the plan read
        exported = {s.name for s in plan.specs}  # (an fp16 export's fp32 VAE decoder alone runs in its place)
        if all(s.name in exported or FP32_VAE.get(s.name) in exported for s in txt2img_specs(model.family)):
            # what run would refuse, before the graphs (a subset that runs nothing needs no scheduler)
            config_dir = options.config if options.config and Path(options.config).is_dir() else None
            check_model_scheduler(model.scheduler_config, config_dir or model_ref)  # where it was read
            if note := default_scheduler_note(model.scheduler_config, config_dir or model_ref, family=model.family,
                                              conditioned=model.dims.conditioned):
                console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        read = source_weight_files(model.source, {spec.module for spec in plan.specs})
        taken = stamps(read)  # (before the hashes: a file replaced meanwhile is caught at the end)
        if read:  # for the Torch backend's reload to prove it runs the same weights
            with step(f"Hashing the {len(read)} weight file(s) the export reads"):
                model.source = {**model.source, "files": fingerprint(read)}
        loras = []
        if options.loras:
            from sdexport.models.lora import add_updates, match_all

            with step(f"Matching {len(options.loras)} LoRA file(s) to the model"):
                updates = match_all(model.modules, options.loras, model.family, exported={s.name for s in plan.specs})
                loras = [lora.record() for lora in options.loras]
            # fused into each part's weights as they are built (all of them, if already built)
            fuse = lambda name, module: add_updates({name: module}, [u for u in updates if u.component == name])  # noqa: E731
            for name in model.modules:
                if name not in model.builders:
                    fuse(name, model.modules[name])
            model.on_materialize.append(fuse)
            model.label += " + LoRA " + ", ".join(f"{lora.path.name}:{lora.scale:g}" for lora in options.loras)
        embeddings = []
        if options.embeddings:
            from sdexport.models import textual_inversion

            with step(f"Adding {len(options.embeddings)} textual inversion embedding(s) to the text encoders"):
                embeddings = [e.record() for e in options.embeddings]  # (each file's bytes, read once)
                textual_inversion.apply(model, options.embeddings)
            for note in filter(None, (e.named_otherwise() for e in options.embeddings)):
                console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
            model.label += " + embeddings " + ", ".join(e.word for e in options.embeddings)
        manifest = _export_into(staging, model, model_ref, plan.specs, plan.profile, options, loras, memory, embeddings)
        check_stamps(taken)  # every part was read from the files hashed (else the staging folder goes)
    _record_runnable(out_dir, manifest)
    return manifest


def _record_runnable(out_dir: Path, manifest: Manifest) -> None:
    """Check that ``run`` can load the tokenizers and scheduler written (cheap now: diffusers and
    transformers are loaded) and record it, so a first ``sdexport inspect`` need not load them."""
    from sdexport.runtime.loading import check_runnable_once, txt2img_components

    try:
        txt2img_components(manifest)
    except SdexportError:
        return  # a --components subset: run needs more than it holds
    check_runnable_once(out_dir, manifest)


def _export_into(
    staging: Path,
    model: LoadedModel,
    model_ref: str,
    specs: list[ComponentSpec],
    profile: ShapeProfile,
    options: ExportOptions,
    loras: list[dict[str, Any]] | None = None,
    memory: MemoryLog | None = None,
    embeddings: list[dict[str, Any]] | None = None,
) -> Manifest:
    dims = replace(model.dims, clip_skip=options.clip_skip)  # (the model's configs know nothing of it)
    memory = memory or MemoryLog()
    entries: dict[str, ComponentEntry] = {}
    expanded = [s.for_model(dims) for s in specs]
    for index, spec in enumerate(expanded):
        path = staging / spec.name / "model.onnx"
        dtype = "fp32" if spec.always_fp32 else options.dtype
        last_use = all(later.module != spec.module for later in expanded[index + 1:])
        start = time.perf_counter()
        with step(f"Exporting {spec.name}"):
            references = export_component(spec, model, path, profile=profile, dtype=dtype, opset=options.opset,
                                          verify=options.verify, memory=memory, release=last_use)
        with (step(f"Verifying {spec.name} against PyTorch ({options.verify})") if options.verify != "none"
              else nullcontext()), memory.stage(f"{spec.name}/verify"):
            report = compare_with_onnx(spec, path, references, dtype=dtype, budget_mb=verification_budget_mb)
        give_back_freed_memory()  # ONNX Runtime's session and arena, before the next part loads
        print_parity_report(report)
        require_parity(report)
        entries[spec.name] = ComponentEntry(
            onnx=path.relative_to(staging).as_posix(),
            dtype=dtype,
            parity={**report.to_dict(), "seconds": round(time.perf_counter() - start, 2)},
        )
    write_pipeline_files(staging, model, specs)
    with step("Hashing artifacts and writing the manifest"):
        record = {"label": model.label, "source": _portable_source(model, model_ref),
                  "random_weights": model.random_weights,
                  **({"pipeline_config": model.pipeline_config} if model.pipeline_config else {}),
                  **({"loras": loras} if loras else {}),
                  **({"embeddings": embeddings} if embeddings else {})}
        manifest = Manifest(
            format_version=format_version_for(record),
            family=model.family,
            model=record,
            prediction_type=model.prediction_type,
            vae_scaling_factor=model.vae_scaling_factor,
            dims=dims.record(),
            profile=profile.to_dict(),
            dtype=options.dtype,
            tools={**tool_versions(), "opset": options.opset,
                   "exporter": "torch.onnx.export (TorchScript tracer)",
                   # under tools, an open object: sdexport versions before it read such manifests
                   "export_memory": memory.record()},
            components=entries,
            files=hash_tree(staging),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        save_manifest(staging, manifest)
    return manifest


def _portable_source(model: LoadedModel, model_ref: str) -> dict[str, Any]:
    return {**model.source, "argument": model_ref}


def export_component(
    spec: ComponentSpec,
    model: LoadedModel,
    path: Path,
    *,
    profile: ShapeProfile,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    verify: VerifyMode = "full",
    memory: MemoryLog | None = None,
    release: bool = True,
) -> list[Reference]:
    """Trace at a small in-profile shape (batch 2: see DESIGN.md; two prompt chunks where it has them), run PyTorch at the points to
    verify, free the module (``release``), then clean, convert, save and check the graph. Returns
    PyTorch's outputs for ``compare_with_onnx``.

    At most one copy of the component's weights is in memory at any time but the trace (torch's
    module plus the graph's folded constants): the graph passes work on a skeleton whose weights
    wait on disk or in a ``WeightStore``, and ``save`` writes them one tensor at a time.
    """
    memory = memory or MemoryLog()
    dims, vocab = model.dims, vocab_size_of(model)
    batch = max(2, profile.component_batch(spec)[0])
    # two prompt chunks where the profile has them: a text length the trace baked in as a constant
    # then fails verification at one chunk, which even --verify quick checks
    chunks = max(profile.chunks[0], min(2, profile.chunks[2]))
    example = sample_inputs(spec, dims.sizes(batch, profile.height[0], profile.width[0], chunks), vocab_size=vocab)
    workdir = path.parent / ".trace"
    try:
        with memory.stage(f"{spec.name}/load"):
            module = model.materialize(spec.module)
            require_finite_weights(spec.module, module)  # (with any LoRA fused: materialize applies it)
        with memory.stage(f"{spec.name}/trace"):
            skeleton, weights = trace_to_onnx(spec, module, example, workdir, opset=opset)
        with memory.stage(f"{spec.name}/pytorch"):
            give_back_freed_memory()  # what tracing freed, before the points' memory is judged
            references = torch_references(spec, module, profile=profile, dims=dims, vocab_size=vocab, mode=verify,
                                          need_mb=_working_memory(skeleton, weights), budget_mb=verification_budget_mb)
            if spec.name in LORA_COMPONENTS:  # where run-time LoRA finds each weight (names survive fp16)
                write_weight_map(module, weights.arrays(skeleton), path.parent, layer_reads(skeleton))
            del module
            if release:
                model.release(spec.module)
                give_back_freed_memory()
        with memory.stage(f"{spec.name}/graph passes"):
            skeleton = weights.without_placeholders(skeleton, graph.cleanup)
            if dtype == "fp16":
                skeleton = graph.to_fp16(skeleton, keep_fp32=[t.name for t in spec.inputs if t.dtype == "float32"])
            skeleton = graph.infer_shapes(skeleton)
        with memory.stage(f"{spec.name}/save"):
            external = weights.size(skeleton) >= graph.PROTOBUF_LIMIT - 64 * 1024**2
            weights.save(skeleton, path, external=external)
            del weights
            graph.check(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # what saving freed, before ONNX Runtime loads the graph: measured, 2.3 GB left resident after
    # the SDXL U-Net's save, under the 12 GB its fp16 CPU session takes
    give_back_freed_memory()
    return references


LIVE_FACTOR = 1.3
"""A verification point's working memory, in multiples of the bytes its graph holds alive at once,
plus its outputs once more (ONNX Runtime's Python API copies them out of its arena). The arena
reuses freed chunks by best fit and needs more than is alive: 1.25 times on sd15's VAE encoder at
4 x 1024x1024, the most measured (2026-12-02, onnxruntime 1.32; ``benchmarks/results/export-memory-cpu``
holds each point's figures, the estimate's included); sd15's U-Net, 0.56 times. PyTorch, judged
against the same estimate, stayed under it but on the text encoder's points (by up to 36 MB, which
the 1 GB margin covers)."""


def _working_memory(skeleton: onnx.ModelProto, weights: WeightStore) -> Callable[[dict[str, np.ndarray]], float | None]:
    """A verification point's estimated working memory (MB) beside the weights, from what the
    traced float32 graph holds alive at once at the point's shapes (``graph.peak_live_bytes``;
    None where inference cannot tell)."""
    placeholders = [t.name for t in skeleton.graph.initializer if t.name in weights]

    def need(feed: dict[str, np.ndarray]) -> float | None:
        live = graph.peak_live_bytes(skeleton, {n: v.shape for n, v in feed.items()}, placeholders)
        return None if live is None else (LIVE_FACTOR * live.peak + live.outputs) / 1024**2
    return need


def vocab_size_of(model: LoadedModel) -> int:
    """Sample token ids must be valid for every text encoder (SDXL has two)."""
    return min(int(cast(Any, m).config.vocab_size) for n, m in model.modules.items() if n.startswith("text_encoder"))


def print_parity_report(report: ParityReport) -> None:
    """One line per checked point, and one for the points skipped by request (none at all when
    verification is off: the summary table says so)."""
    skipped = [p for p in report.points if p.status == "skipped"]
    for point in report.points:
        if point.status == "skipped":
            continue
        errors = ", ".join(
            f"{name} max-abs {e.max_abs:.2e} rel-L2 {e.rel_l2:.2e}" for name, e in point.outputs.items()
        )
        mark = "[green]ok[/]" if point.status == "passed" else "[red]FAILED[/]"
        console.print(f"    {point.label:>4}: {mark} {errors}", soft_wrap=True)
    if skipped and len(skipped) < len(report.points):
        for reason in dict.fromkeys(p.reason for p in skipped):
            console.print(f"    skipped: {', '.join(p.label for p in skipped if p.reason == reason)} ({reason})",
                          soft_wrap=True)

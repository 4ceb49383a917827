"""Checkpoint → verified ONNX engine directory, the whole ``sdexport export`` job.

``plan_export`` checks everything it can from configs first. The output path is then claimed
(``sdexport.output_dir``: a lock, a hidden staging folder, an atomic swap at the end), so a failed,
interrupted or concurrent export never leaves something that looks like a usable engine directory
and never replaces a directory that is not an sdexport engine directory.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sdexport.console import console, step
from sdexport.errors import SdexportError
from sdexport.export import graph
from sdexport.export.inputs import sample_inputs
from sdexport.export.pipeline_files import write_pipeline_files
from sdexport.export.plan import DEFAULT_OPSET, ENGINE_DIR, ExportOptions, plan_export
from sdexport.export.trace import trace_to_onnx
from sdexport.export.verify import ParityReport, require_parity, verify_component
from sdexport.export.weight_names import LORA_COMPONENTS, write_weight_map
from sdexport.manifest import ComponentEntry, Manifest, hash_tree, save_manifest
from sdexport.models import LoadedModel, load_model
from sdexport.output_dir import claim
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec
from sdexport.versions import installed_versions

__all__ = ["ExportOptions", "export", "export_component"]


def tool_versions() -> dict[str, str]:
    """The installed tools an export depends on (those not installed are left out)."""
    found = installed_versions(("sdexport", "torch", "diffusers", "transformers", "onnx", "onnxruntime",
                                "onnxruntime-gpu", "onnx-graphsurgeon"))
    return {package: v for package, v in found.items() if v is not None}


def export(model_ref: str, out_dir: Path, options: ExportOptions) -> Manifest:
    plan = plan_export(model_ref, out_dir, options)
    from sdexport.runtime.onnxruntime_backend import require_provider

    require_provider("cpu")  # verification and fp16 conversion run on onnxruntime
    with claim(out_dir, ENGINE_DIR, replace=options.force, protected=plan.sources) as staging:
        with step(f"Loading {model_ref}"):
            model = load_model(model_ref, config=options.config, seed=options.seed, vae=options.vae,
                               controlnets=plan.controlnets)
        plan.profile.validate(model.dims)  # the loaded configs agree with what the plan read
        loras = []
        if options.loras:
            from sdexport.models.lora import fuse_into

            with step(f"Fusing {len(options.loras)} LoRA file(s)"):
                fuse_into(model.modules, options.loras, model.family)
                loras = [lora.record() for lora in options.loras]
            model.label += " + LoRA " + ", ".join(f"{lora.path.name}:{lora.scale:g}" for lora in options.loras)
        manifest = _export_into(staging, model, model_ref, plan.specs, plan.profile, options, loras)
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
) -> Manifest:
    dims = model.dims
    entries: dict[str, ComponentEntry] = {}
    vocab = _vocab_size(model)
    for spec in (s.for_model(dims) for s in specs):
        path = staging / spec.name / "model.onnx"
        module = model.module(spec.module)
        dtype = "fp32" if spec.always_fp32 else options.dtype
        start = time.perf_counter()
        with step(f"Exporting {spec.name}"):
            export_component(spec, module, path, profile=profile, model=model, dtype=dtype, opset=options.opset)
        with step(f"Verifying {spec.name} against PyTorch ({options.verify})") if options.verify != "none" else nullcontext():
            report = verify_component(
                spec, path, module, profile=profile, dims=dims, dtype=dtype,
                vocab_size=vocab, mode=options.verify,
            )
        _print_report(report)
        require_parity(report)
        entries[spec.name] = ComponentEntry(
            onnx=path.relative_to(staging).as_posix(),
            dtype=dtype,
            parity={**report.to_dict(), "seconds": round(time.perf_counter() - start, 2)},
        )
    write_pipeline_files(staging, model, specs)
    with step("Hashing artifacts and writing the manifest"):
        manifest = Manifest(
            family=model.family,
            model={"label": model.label, "source": _portable_source(model, model_ref),
                   "random_weights": model.random_weights,
                   **({"pipeline_config": model.pipeline_config} if model.pipeline_config else {}),
                   **({"loras": loras} if loras else {})},
            prediction_type=model.prediction_type,
            vae_scaling_factor=model.vae_scaling_factor,
            dims=dims.record(),
            profile=profile.to_dict(),
            dtype=options.dtype,
            tools={**tool_versions(), "opset": options.opset,
                   "exporter": "torch.onnx.export (TorchScript tracer)"},
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
    module: torch.nn.Module,
    path: Path,
    *,
    profile: ShapeProfile,
    model: LoadedModel,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
) -> list[Path]:
    """Trace at a small in-profile shape (batch 2: see DESIGN.md), clean, convert, save, check."""
    dims = model.dims
    batch = max(2, profile.component_batch(spec)[0])
    example = sample_inputs(
        spec, dims.sizes(batch, profile.height[0], profile.width[0]),
        vocab_size=_vocab_size(model),
    )
    onnx_model = trace_to_onnx(spec, module, example, opset=opset)
    onnx_model = graph.cleanup(onnx_model)
    extra = []
    if spec.name in LORA_COMPONENTS:  # where run-time LoRA finds each weight (names survive fp16 conversion)
        extra.append(write_weight_map(module, onnx_model, path.parent))
    if dtype == "fp16":
        onnx_model = graph.to_fp16(onnx_model, keep_fp32=[t.name for t in spec.inputs if t.dtype == "float32"])
    onnx_model = graph.infer_shapes(onnx_model)
    files = graph.save(onnx_model, path)
    graph.check(path)
    return files + extra


def _vocab_size(model: LoadedModel) -> int:
    """Sample token ids must be valid for every text encoder (SDXL has two)."""
    return min(int(m.config.vocab_size) for n, m in model.modules.items() if n.startswith("text_encoder"))


def _print_report(report: ParityReport) -> None:
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
        console.print(f"    skipped: {', '.join(p.label for p in skipped)} ({skipped[0].reason})")

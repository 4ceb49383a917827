"""Checkpoint → verified ONNX engine directory, the whole ``sdexport export`` job.

Everything is written into a hidden sibling folder and renamed into place only when every component
has been exported and verified and the manifest is written, so a failed or interrupted export never
leaves something that looks like a usable engine directory.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from sdexport.console import console, step
from sdexport.errors import SdexportError
from sdexport.export import graph
from sdexport.export.inputs import sample_inputs
from sdexport.export.trace import DEFAULT_OPSET, trace_to_onnx
from sdexport.export.verify import ParityReport, VerifyMode, require_parity, verify_component
from sdexport.manifest import ComponentEntry, Manifest, hash_tree, save_manifest
from sdexport.models import LoadedModel, load_model
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, components_for

DTYPES = ("fp32", "fp16")


@dataclass
class ExportOptions:
    profile: ShapeProfile | None = None
    """None: the model's default profile."""
    ranges: dict[str, str | None] = field(default_factory=dict)
    """``min:opt:max`` texts per axis (batch, height, width) replacing those of ``profile``."""
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    components: list[str] | None = None
    verify: VerifyMode = "full"
    config: str | None = None
    seed: int = 0
    force: bool = False
    vae: str | None = None
    """A diffusers AutoencoderKL directory replacing the model's VAE (e.g. an fp16-safe SDXL VAE)."""


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("sdexport", "torch", "diffusers", "transformers", "onnx", "onnxruntime",
                    "onnxruntime-gpu", "onnx-graphsurgeon"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def export(model_ref: str, out_dir: Path, options: ExportOptions) -> Manifest:
    if options.dtype not in DTYPES:
        raise SdexportError(f"--dtype {options.dtype}: choose one of {', '.join(DTYPES)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise SdexportError(f"{out_dir} is a file; -o takes the engine directory to create")
    if out_dir.exists() and any(out_dir.iterdir()) and not options.force:
        raise SdexportError(f"{out_dir} exists and is not empty; choose another -o or pass --force")
    from sdexport.runtime.onnxruntime_backend import require_provider

    require_provider("cpu")  # verification and fp16 conversion run on onnxruntime
    with step(f"Loading {model_ref}"):
        model = load_model(model_ref, config=options.config, seed=options.seed, vae=options.vae)
    profile = (options.profile or model.default_profile).with_ranges(**options.ranges)
    profile.validate(model.dims)
    specs = _select(model, options.components, options.dtype)
    if model.random_weights:
        console.print("[yellow]note:[/] this model has random weights (built-in preset)")

    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _export_into(staging, model, model_ref, specs, profile, options)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _select(model: LoadedModel, names: list[str] | None, dtype: str) -> list[ComponentSpec]:
    """All components by default; the fp32 fallback VAE only where the export itself is not fp32."""
    specs = list(components_for(model.family))
    if not names:
        return [s for s in specs if not (s.always_fp32 and dtype == "fp32")]
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SdexportError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [s for s in specs if s.name in names]


def _export_into(
    staging: Path,
    model: LoadedModel,
    model_ref: str,
    specs: list[ComponentSpec],
    profile: ShapeProfile,
    options: ExportOptions,
) -> Manifest:
    dims = model.dims
    entries: dict[str, ComponentEntry] = {}
    vocab = _vocab_size(model)
    for spec in specs:
        path = staging / spec.name / "model.onnx"
        module = model.module(spec.module)
        dtype = "fp32" if spec.always_fp32 else options.dtype
        start = time.perf_counter()
        with step(f"Exporting {spec.name}"):
            export_component(spec, module, path, profile=profile, model=model, dtype=dtype, opset=options.opset)
        with step(f"Verifying {spec.name} against PyTorch ({options.verify})"):
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
    for name, tokenizer in model.tokenizers.items():
        tokenizer.save_pretrained(staging / name)
    scheduler_dir = staging / "scheduler"
    scheduler_dir.mkdir()
    import json

    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    with step("Hashing artifacts and writing the manifest"):
        manifest = Manifest(
            family=model.family,
            model={"label": model.label, "source": _portable_source(model, model_ref),
                   "random_weights": model.random_weights,
                   **({"pipeline_config": model.pipeline_config} if model.pipeline_config else {})},
            prediction_type=model.prediction_type,
            vae_scaling_factor=model.vae_scaling_factor,
            dims=vars(dims).copy(),
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
    """Trace at a small in-profile shape (batch 2: see DESIGN.md), clean, convert, save."""
    dims = model.dims
    batch = max(2, profile.component_batch(spec)[0])
    example = sample_inputs(
        spec, dims.sizes(batch, profile.height[0], profile.width[0]),
        vocab_size=_vocab_size(model),
    )
    onnx_model = trace_to_onnx(spec, module, example, opset=opset)
    onnx_model = graph.cleanup(onnx_model)
    if dtype == "fp16":
        onnx_model = graph.to_fp16(onnx_model)
    onnx_model = graph.infer_shapes(onnx_model)
    return graph.save(onnx_model, path)


def _vocab_size(model: LoadedModel) -> int:
    """Sample token ids must be valid for every text encoder (SDXL has two)."""
    return min(int(m.config.vocab_size) for n, m in model.modules.items() if n.startswith("text_encoder"))


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished export into place; an old directory (with --force) goes only after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _print_report(report: ParityReport) -> None:
    for point in report.points:
        if point.status == "skipped":
            console.print(f"    {point.label:>4}: skipped ({point.reason})")
            continue
        errors = ", ".join(
            f"{name} max-abs {e.max_abs:.2e} rel-L2 {e.rel_l2:.2e}" for name, e in point.outputs.items()
        )
        mark = "[green]ok[/]" if point.status == "passed" else "[red]FAILED[/]"
        console.print(f"    {point.label:>4}: {mark} {errors}")

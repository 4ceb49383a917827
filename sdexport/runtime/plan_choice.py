"""Which TensorRT plan of an engine directory a run loads: pure rules over the manifest's records.

A directory may hold several plans per component (profiles, ``--static``, ``--fp32``, other GPUs and
TensorRT versions). The choice needs no TensorRT and no torch, so ``sdexport inspect`` shows it as
``run`` makes it, and ``serve`` makes it before Triton starts (``plans_here`` asks this machine
which GPU and TensorRT it has).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from sdexport.build import tensorrt_build
from sdexport.build.cache_key import EngineKey
from sdexport.console import console
from sdexport.errors import EngineDirError, ProfileError, one_line, pasteable
from sdexport.manifest import Manifest
from sdexport.shapes import ShapeProfile


def _describe_engines(manifest: Manifest, component: str) -> str:
    entries = manifest.components[component].engines.values() if component in manifest.components else []
    found = []
    for entry in entries:
        key = entry.get("key", {})
        found.append(
            f"{key.get('gpu_name', '?')} (sm {key.get('compute_capability', '?')}) / "
            f"TensorRT {key.get('tensorrt_version', '?')}"
        )
    return ", ".join(sorted(set(found))) if found else "no engines"


def select_engine(
    engine_dir: Path,
    manifest: Manifest,
    component: str,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    profile: ShapeProfile | None = None,
    fp32: bool = False,
    refit: bool = False,
) -> dict[str, Any]:
    """The manifest's engine entry for ``component`` that runs here (pure: no TensorRT needed).

    Picks among plans built by this TensorRT version for this GPU; with ``fp32`` (the component runs
    in fp32: ``build.vae_upcast.kept_fp32``), only those built without the fp16 flag, which a build
    before that rule set; with ``profile``, only those whose build profile covers its batch and
    sides, and of those the ones that also cover its prompt chunks where any does (a plan of fewer
    reads the prompt cut, with the runtime's warning), refittable ones first with ``refit`` (run-time
    LoRA, which no other plan runs); then the one a build chose last (``tensorrt_build._now``).
    Raises EngineDirError saying what there is.
    """
    if component not in manifest.components:
        raise EngineDirError(f"{engine_dir}: no component {component!r} (has {', '.join(manifest.components)})")
    here = f"{gpu_name} (sm {compute_capability}) / TensorRT {tensorrt_version}"
    candidates = []
    flagged = []
    missing = []
    for entry in manifest.components[component].engines.values():
        try:
            key = EngineKey.from_dict(entry["key"])
        except (KeyError, TypeError, ValueError):
            continue
        if key.platform_reasons(tensorrt_version, gpu_name, compute_capability):
            continue
        if not (engine_dir / str(entry.get("path", ""))).is_file():  # listed before written: a build stopped then
            missing.append(str(entry.get("path")))
            continue
        if fp32 and key.fp16:
            flagged.append(entry)
        else:
            candidates.append(entry)
    if not candidates and flagged:
        raise EngineDirError(
            f"{component}'s TensorRT engines for {here} in {engine_dir} were built with the fp16 flag, which "
            f"this VAE overflows (its config sets force_upcast); run `sdexport build {pasteable(engine_dir)}` again: it "
            "now builds it fp32"
        )
    if not candidates and missing:
        raise EngineDirError(
            f"{component}'s TensorRT plan for {here} in {engine_dir}, {missing[0]}, is listed in the manifest but "
            f"missing (a build stopped while writing it?); run `sdexport build {pasteable(engine_dir)}` again"
        )
    if not candidates:
        raise EngineDirError(
            f"no TensorRT engine for {here} in {engine_dir} for {component}; run `sdexport build {pasteable(engine_dir)}` "
            f"(it has: {_describe_engines(manifest, component)})"
        )
    if profile is not None:
        fitting = [e for e in candidates if not profile.within(entry_profile(manifest, e, component), chunks=False)]
        if not fitting:
            have = "; ".join(profile_text(entry_profile(manifest, e, component)) for e in candidates)
            passed_over = sum(1 for e in flagged if not profile.within(entry_profile(manifest, e, component), chunks=False))
            raise ProfileError(
                f"no {component} engine for {here} covers batch {_span(profile.batch)}, height "
                f"{_span(profile.height)}, width {_span(profile.width)} (built: {have}"
                + (f"; {passed_over} plan(s) that do were built with the fp16 flag, which this VAE overflows "
                   "(its config sets force_upcast), and are passed over" if passed_over else "")
                + f"); rebuild with `sdexport build {pasteable(engine_dir)}` and that profile"
            )
        candidates = fitting
    if refit:  # before the chunks: a plan that cuts a long text still runs; one not refittable does not
        candidates = [e for e in candidates if e["key"].get("refittable")] or candidates  # (none: refit says so)
    if profile is not None:
        candidates = [e for e in candidates if not profile.within(entry_profile(manifest, e, component))] or candidates
    return max(candidates, key=lambda e: str(e.get("chosen") or e.get("built", "")))  # (older records: built)


def choose_plans(engine_dir: Path, manifest: Manifest, names: list[str], optional: Mapping[str, str] | None = None,
                 *, tensorrt_version: str, gpu_name: str, compute_capability: str, profile: ShapeProfile | None = None,
                 fp32: Collection[str] = (), refit: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """``select_engine`` for each of ``names``, every choice before any plan is read (one missing plan
    is said first). ``optional`` maps a component that may be left out to the one whose shapes it
    must serve (the fp32 rerun of an fp16 VAE part: that part's): one without a plan that covers
    ``profile``, or where none is given that part's plan, is left out with a note."""
    optional = optional or {}
    entries: dict[str, dict[str, Any]] = {}
    for name in sorted(names, key=lambda n: n in optional):  # the parts first: their plans' shapes count
        covers = profile
        if covers is None and optional.get(name) in entries:
            covers = entry_profile(manifest, entries[optional[name]], optional[name])
        try:
            entries[name] = select_engine(engine_dir, manifest, name, tensorrt_version=tensorrt_version,
                                          gpu_name=gpu_name, compute_capability=compute_capability, profile=covers,
                                          fp32=name in fp32, refit=name in refit)
        except (EngineDirError, ProfileError) as exc:
            if name not in optional:
                raise
            console.print(f"[yellow]note:[/] loading no {name} (the fp32 rerun of an fp16 overflow): "
                          f"{escape(one_line(exc))}")
    return {name: entries[name] for name in names if name in entries}


def plans_here(engine_dir: Path, manifest: Manifest, names: list[str], optional: Mapping[str, str] | None = None,
               *, profile: ShapeProfile | None = None, fp32: Collection[str] = (),
               refit: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """``choose_plans`` for this machine's GPU and TensorRT (refused in one line where either is
    missing): what ``load_tensorrt_engines`` loads, known before any plan is read (``serve`` asks
    before Triton starts)."""
    trt = tensorrt_build.require_tensorrt()
    gpu_name, capability = tensorrt_build.gpu_identity()
    return choose_plans(engine_dir, manifest, names, optional, tensorrt_version=str(trt.__version__),
                        gpu_name=gpu_name, compute_capability=capability, profile=profile, fp32=fp32, refit=refit)


def entry_profile(manifest: Manifest, entry: dict[str, Any], component: str) -> ShapeProfile:
    """The shapes ``component``'s plan ``entry`` serves: its build profile, but as wide as the
    export's on each axis its inputs' shapes do not depend on (the text encoder's image size, the
    VAE's prompt chunks). A plan's cache key holds its inputs' shapes, not the profile they came
    from, so a build under a profile that differs only there reuses an earlier plan, and its record,
    built under another."""
    data = entry.get("profile")
    if not data:
        return manifest.shape_profile
    built = ShapeProfile.from_dict(data)
    spec, dims = manifest.spec(component), manifest.model_dims
    shapes = built.tensor_ranges(spec, dims)
    for axis, exported in manifest.shape_profile.axes:
        widened = replace(built, **{axis: exported})
        if widened.tensor_ranges(spec, dims) == shapes:
            built = widened
    return built


def _span(values: tuple[int, int, int]) -> str:
    lo, _, hi = values
    return str(lo) if lo == hi else f"{lo}-{hi}"


def profile_text(profile: ShapeProfile) -> str:
    """A plan's shapes as refusals and ``inspect`` name them (ranges as ``lo-hi``)."""
    return (f"batch {_span(profile.batch)}, height {_span(profile.height)}, width {_span(profile.width)}"
            + (f", prompt chunks {_span(profile.chunks)}" if profile.chunks != (1, 1, 1) else ""))

"""ONNX → TensorRT plans for an engine directory (``sdexport build``), through polygraphy.

Thin on purpose: shapes come from ``profiles`` (i.e. from the ComponentSpecs), reuse decisions from
``cache_key``, and the TensorRT work from polygraphy's loaders, so this module only wires them and
writes the results the way the rest of the engine directory is written: plan to a temporary name,
rename, then the manifest (atomically), after every component, so an interrupted build keeps what
it finished and never leaves a half-written plan behind a valid name.

TensorRT and polygraphy are imported inside the functions: importing this module (and ``sdexport
--help``) works on machines without them, and ``require_tensorrt`` turns their absence into one
line that says what to install.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from rich.markup import escape

from sdexport import stopping
from sdexport.atomic import atomic_path
from sdexport.build import keep_built
from sdexport.build.cache_key import FLAG_LABELS, EngineKey, onnx_files, onnx_sha256
from sdexport.build.profiles import ShapeRange, build_profile, input_ranges
from sdexport.build.tensorrt_progress import BuildPhases, tensorrt_monitor
from sdexport.build.timing_cache import (
    cannot_replace,
    check_timing_cache,
    is_ours,
    timing_cache_files,
    timing_folder,
)
from sdexport.build.vae_upcast import specs_to_build
from sdexport.console import console, step
from sdexport.errors import MissingDependencyError, SdexportError
from sdexport.graph_io import GraphIO
from sdexport.manifest import (
    Manifest,
    check_files,
    check_graph,
    load_manifest,
    remove_leftovers,
    save_manifest,
    sha256_file,
)
from sdexport.shapes import ShapeProfile

INSTALL_HINT = (
    'pip install "sdexport[tensorrt]" (tensorrt>=10.1 and polygraphy>=0.50.3), on a machine with an '
    "NVIDIA GPU and driver"
)

TENSORRT_FLOOR = (10, 1)
"""``device_memory_size_v2`` and ``set_device_memory``, which the runtime uses, arrived in 10.1."""


POLYGRAPHY_FLOOR = (0, 50, 3)
"""The ``tensorrt`` extra's pin, which applies only where it was installed, so it is checked at the
build: older polygraphy's ``CreateConfig`` reads ``layer.precision_is_set``, which TensorRT 11
removed (an AttributeError in every build), and before 0.49.1 takes no ``progress_monitor``, which
every build passes (a TypeError with TensorRT 10 too, an audit)."""


def _release(version: str, length: int = 2) -> tuple[int, ...]:
    """The first ``length`` numbers of a version string such as "10.13.3.9" (non-digits end a part;
    missing ones are 0)."""
    parts = []
    for part in version.split(".")[:length]:
        digits = re.match(r"\d*", part)
        parts.append(int(digits.group()) if digits and digits.group() else 0)
    return tuple(parts + [0] * (length - len(parts)))


def require_tensorrt() -> ModuleType:
    """Import the real TensorRT module, or raise MissingDependencyError saying what to install.

    ``import tensorrt`` alone proves nothing: with only ``tensorrt-stubs`` installed (as in the dev
    environment) it succeeds as an empty namespace package. A real TensorRT has ``Builder``.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not loadable
        raise MissingDependencyError(
            "TensorRT", "to build and run TensorRT engines", f"{INSTALL_HINT} ({exc})"
        ) from None
    if not hasattr(trt, "Builder"):
        raise MissingDependencyError(
            "TensorRT",
            "to build and run TensorRT engines",
            f"{INSTALL_HINT} (the `tensorrt` found here has no Builder: only its type stubs are installed)",
        )
    version = str(getattr(trt, "__version__", "0"))
    if _release(version) < TENSORRT_FLOOR:
        raise MissingDependencyError(
            "TensorRT", "to build and run TensorRT engines",
            f"{INSTALL_HINT} (sdexport needs TensorRT 10.1 or newer)", too_old=version,
        )
    return trt


def has_weak_typing(trt: ModuleType) -> bool:
    """TensorRT 10 builds weakly typed networks with precision flags (``BuilderFlag.FP16``); 11
    removed both: every network is strongly typed and takes its precisions from the graph."""
    return hasattr(trt.BuilderFlag, "FP16")


@dataclass(frozen=True)
class Precision:
    """How one component's engine gets its precision: the fp16 builder flag (weak typing, TensorRT
    10 only) or the graph's own types (strong typing)."""

    fp16_flag: bool
    strongly_typed: bool
    tf32: bool = False
    """fp32 layers may use TF32 tensor cores (fp32's range, a 10-bit mantissa in matrix products):
    for the parts an fp16 build keeps fp32 for range, the VAE's, as NVIDIA's diffusion demo builds
    its VAE. polygraphy otherwise clears TensorRT's TF32 flag, which is on by default."""
    note: str = ""
    """Why the request was read differently (printed once by the build)."""

    def label(self, onnx_dtype: str) -> str:
        if self.strongly_typed:
            return f"{onnx_dtype} (from the graph)"
        return "fp16" if self.fp16_flag else "fp32"


def resolve_precision(
    *, fp16: bool, strongly_typed: bool, onnx_dtype: str, always_fp32: bool, weak_typing: bool
) -> Precision:
    """The precision a component's engine is built with, from the request, its ONNX graph's dtype
    and what the installed TensorRT can do; refuses what cannot be built.

    * An fp16 graph is always built strongly typed: it already says which parts are fp16 (and keeps
      the timestep projection fp32), which is what TensorRT 11 requires and 10 honours.
    * An fp32 graph with ``fp16`` on TensorRT 10: weak typing and the fp16 flag (TensorRT picks fp16
      kernels where it likes). On TensorRT 11 there is no such flag: refused, saying to export fp16.
    * ``strongly_typed`` forces strong typing on TensorRT 10 too: an fp32 graph gives fp32 engines.
    * ``always_fp32`` (the fallback VAE decoder) stays fp32 whatever is asked; in an fp16 build it
      computes with TF32 (``Precision.tf32``), not in a build asked for fp32 (``--fp32``: exact fp32).
    """
    if onnx_dtype == "fp16":
        note = "" if fp16 else "the ONNX graph is fp16, so its engine is fp16 too (--fp32 needs an fp32 export)"
        return Precision(fp16_flag=False, strongly_typed=True, note=note)
    if always_fp32 or not fp16:
        return Precision(fp16_flag=False, strongly_typed=strongly_typed or not weak_typing, tf32=fp16)
    if not weak_typing:
        raise SdexportError(
            "this TensorRT has no fp16 builder flag (TensorRT 11 builds every network strongly typed, "
            "taking precisions from the graph), and this directory holds an fp32 export: export with "
            "--dtype fp16 for fp16 engines, or build fp32 engines with --fp32"
        )
    if strongly_typed:
        return Precision(fp16_flag=False, strongly_typed=True,
                         note="--strongly-typed takes precisions from the fp32 graph: the engine is fp32 "
                              "(export with --dtype fp16 for fp16 engines)")
    return Precision(fp16_flag=True, strongly_typed=False)


def require_polygraphy(tensorrt_version: str) -> None:
    """The builder uses polygraphy's loaders; say how to get it when it is missing, or too old for
    the TensorRT installed."""
    try:
        import polygraphy
        import polygraphy.backend.trt  # noqa: F401
    except ImportError:
        raise MissingDependencyError("polygraphy", "to build TensorRT engines", INSTALL_HINT) from None
    found = str(getattr(polygraphy, "__version__", "0"))
    if _release(found, 3) < POLYGRAPHY_FLOOR:
        why = (f"TensorRT {tensorrt_version} needs polygraphy 0.50.3 or newer" if _release(tensorrt_version)[0] >= 11
               else "sdexport's builds need polygraphy 0.50.3 or newer")
        raise MissingDependencyError("polygraphy", "to build TensorRT engines", f"{INSTALL_HINT} ({why})",
                                     too_old=found)


def tensorrt_version() -> str:
    """The installed TensorRT's full version: plans only deserialize in the version that wrote them."""
    return str(require_tensorrt().__version__)


def gpu_identity(device: int | None = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the CUDA device plans are built for/run on."""
    import torch

    if not torch.cuda.is_available():
        raise SdexportError(
            "no CUDA GPU is visible to PyTorch: TensorRT engines are built and run on an NVIDIA GPU "
            "(check the driver, CUDA_VISIBLE_DEVICES, and that torch is a CUDA build)"
        )
    index = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def default_timing_cache() -> Path:
    """Where ``sdexport build`` keeps its tactic timing cache by default: in the user's cache folder
    (``sdexport.user_cache``: ``~/.cache/sdexport`` by default), one per GPU and TensorRT version (a cache is only valid for the
    pair that measured it). Shared by every model built on this machine, it makes rebuilds and
    similar models build several times faster, and it keeps engine directories free of it."""
    name, capability = gpu_identity()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()
    folder = timing_folder()
    if folder is None:
        raise SdexportError("no home folder for the default timing cache; pass --timing-cache FILE")
    return folder / f"{slug}-sm{capability}-trt{tensorrt_version()}.cache"


@dataclass
class BuildResult:
    """What ``build_engines`` did for one component."""

    component: str
    status: Literal["built", "cached"]
    path: Path
    key: EngineKey
    seconds: float
    """Build time (0 when cached)."""
    reasons: list[str] = field(default_factory=list)
    """Why it was built rather than reused: "no engine yet", "--force", or key differences."""


REFIT_DROPS_BIASES = ("11.3.",)
"""TensorRT releases whose documentation ("Refitting an engine", 11.3.0) warns that BuilderFlag.REFIT
may drop a GEMM's bias, unexposed to refitting, so that a refittable engine draws wrong images
with or without a refit (a known issue of 11.3.0; 11.4's page no longer says so)."""


def refit_drops_biases(version: str) -> str | None:
    """Why a refittable engine of this TensorRT may compute wrongly, or None."""
    if not version.startswith(REFIT_DROPS_BIASES):
        return None
    return (f"TensorRT {version}'s refittable engines may drop a matrix product's bias and draw wrong images "
            "(its documented known issue); build them with TensorRT 11.4 or later (or 10.x), or build without "
            "--refittable and fuse LoRAs at export (`sdexport export --lora`)")


def check_refittable(version: str, what: str = "--refittable") -> None:
    """Refuse ``what`` (a refittable build; a refit) on a TensorRT whose refittable engines may
    compute wrongly."""
    if (why := refit_drops_biases(version)) is not None:
        raise SdexportError(f"{what}: {why}")


def build_engines(
    engine_dir: Path,
    *,
    components: list[str] | None = None,
    profile: ShapeProfile | None = None,
    static: bool = False,
    fp16: bool = True,
    strongly_typed: bool = False,
    timing_cache: Path | None = None,
    optimization_level: int | None = None,
    refittable: bool = False,
    force: bool = False,
) -> list[BuildResult]:
    """Build (or reuse) one TensorRT plan per component of an exported engine directory.

    ``profile`` is the requested build profile (None: the exported one) and must lie inside the
    export's; ``static`` collapses it to its opt point. A plan whose cache key (ONNX hash, shapes,
    flags, TensorRT version, GPU) matches an intact plan in the manifest is reused unless ``force``.
    Precision per component comes from ``resolve_precision`` (fp16 graphs strongly typed; the fp16
    flag only on TensorRT 10 for fp32 graphs), checked for every component before anything builds;
    the key records the flag and the typing mode actually used. ``timing_cache`` is loaded when it
    exists and updated after each build, which makes rebuilds much faster.
    """
    if timing_cache is not None:
        check_timing_cache(timing_cache, engine_dir)
    if optimization_level == 3:  # TensorRT's default (NvInfer.h): the same plan as none asked, the same key
        optimization_level = None
    trt = require_tensorrt()
    if refittable:
        check_refittable(str(trt.__version__))
    require_polygraphy(str(trt.__version__))
    load_manifest(engine_dir, verify_files=False)  # one clear line for a bad directory, before locking
    replace_cache = timing_cache is not None and is_ours(timing_cache)
    if timing_cache is not None and not replace_cache:
        console.print(f"[yellow]note:[/] --timing-cache {escape(str(timing_cache))} was not written by sdexport: read, not replaced "
                      "(sdexport replaces only files it wrote); to keep the updated cache, name a new file")
    cannot = cannot_replace(timing_cache) if timing_cache is not None and replace_cache else None
    if cannot is not None:  # (a read-only cache folder: read, as hash records are, rather than fail the build)
        console.print(f"[yellow]note:[/] --timing-cache {escape(str(timing_cache))} cannot be written ({escape(cannot)}): read where it "
                      "exists, not updated")
        replace_cache = False
    from sdexport.export.plan import ENGINE_DIR
    from sdexport.output_dir import updating

    with updating(engine_dir, ENGINE_DIR):
        return _build_locked(
            engine_dir, trt, components=components, profile=profile, static=static, fp16=fp16,
            strongly_typed=strongly_typed, timing_cache=timing_cache, replace_cache=replace_cache,
            optimization_level=optimization_level, refittable=refittable, force=force,
        )


def _build_locked(
    engine_dir: Path,
    trt: ModuleType,
    *,
    components: list[str] | None,
    profile: ShapeProfile | None,
    static: bool,
    fp16: bool,
    strongly_typed: bool,
    timing_cache: Path | None,
    replace_cache: bool,
    optimization_level: int | None,
    refittable: bool,
    force: bool,
) -> list[BuildResult]:
    manifest = load_manifest(engine_dir, verify_files=False)  # again, under the lock
    from sdexport.output_dir import require_writable

    require_writable(engine_dir)  # (its manifest is saved, plans cached or not)
    remove_leftovers(engine_dir, manifest)  # a killed build's half plans
    weak = has_weak_typing(trt)
    # (the fp16 flag lowers fp32 graphs only on TensorRT 10, and not under --strongly-typed)
    specs = specs_to_build(engine_dir, manifest, components, fp16=fp16 and weak and not strongly_typed)
    dims = manifest.model_dims
    target = build_profile(manifest.shape_profile, profile, dims, static=static)
    gpu_name, capability = gpu_identity()
    version = str(trt.__version__)
    precisions = {  # all refusals before the first build
        spec.name: resolve_precision(
            fp16=fp16, strongly_typed=strongly_typed, onnx_dtype=manifest.components[spec.name].dtype,
            always_fp32=spec.always_fp32, weak_typing=weak,
        )
        for spec in specs
    }
    for note in dict.fromkeys(p.note for p in precisions.values() if p.note):
        console.print(f"[yellow]note:[/] {note}")
    for spec in specs:  # every graph's files, before the first build (minutes each on SD) is spent
        _verify_onnx(engine_dir, manifest, manifest.components[spec.name].onnx)
    results = []
    for spec in specs:
        entry = manifest.components[spec.name]
        precision = precisions[spec.name]
        key = EngineKey.create(
            spec.name,
            onnx_sha256(manifest.files, entry.onnx),
            input_ranges(spec, target, dims),
            tensorrt_version=version,
            gpu_name=gpu_name,
            compute_capability=capability,
            fp16=precision.fp16_flag,
            strongly_typed=precision.strongly_typed,
            tf32=precision.tf32,
            refittable=refittable,
            optimization_level=optimization_level,
            static=static or target.is_static,
        )
        rel = f"{spec.name}/{key.plan_name}"
        reasons = _rebuild_reasons(engine_dir, manifest, spec.name, key, force)
        if not reasons:
            console.print(f"[green]✓[/] {spec.name}: cached engine {rel}")
            entry.engines[key.digest()]["chosen"] = _now()  # this build's plan, loaded before older choices
            save_manifest(engine_dir, manifest)
            results.append(BuildResult(spec.name, "cached", engine_dir / rel, key, 0.0))
            continue
        start = time.perf_counter()
        with step(f"Building {spec.name} ({_describe(key, precision.label(entry.dtype))})") as progress:
            graph_io = check_graph(engine_dir, manifest, spec.name, target)  # (the build's profile)
            plan = _build_plan(engine_dir / entry.onnx, key, timing_cache, replace_cache, graph_io, progress)
        seconds = time.perf_counter() - start
        # The manifest lists the plan before a byte of it is written: a build killed while it writes
        # (gigabytes) leaves a listed plan that is missing (rebuilt next time) and a temporary file of
        # a listed name (removed by the next build), never an unlisted file that --force could not
        # prove to be ours.
        with atomic_path(engine_dir / rel) as tmp:
            # a plan of this key already there (--force, or one damaged) goes first: stopped while the
            # new one is written, the old file stayed under the new hash and was called damaged, to
            # be re-exported (an audit); missing, it is rebuilt next time, as a new key's is
            (engine_dir / rel).unlink(missing_ok=True)
            entry.engines[key.digest()] = {
                "path": rel,
                "key": key.to_dict(),
                "build_seconds": round(seconds, 2),
                "built": datetime.now(UTC).isoformat(timespec="seconds"),
                "chosen": _now(),
                "profile": target.to_dict(),
            }
            manifest.files[rel] = hashlib.sha256(plan).hexdigest()
            save_manifest(engine_dir, manifest)
            tmp.write_bytes(plan)
        results.append(BuildResult(spec.name, "built", engine_dir / rel, key, seconds, reasons))
        keep_built(results)
    return results


def _now() -> str:
    """An engine record's ``chosen``: when a build last built the plan or found it cached. Of the
    plans that serve a run, the loader takes the one chosen last, so the last build's settings rule
    (its ``built``, to the second, could not order two builds in one second, nor see a reuse)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _verify_onnx(engine_dir: Path, manifest: Manifest, onnx: str) -> None:
    """The key promises "built from this graph": check the graph's files before trusting their hash."""
    check_files(engine_dir, onnx_files(manifest.files, onnx), adopted=manifest.adopted)


def _rebuild_reasons(engine_dir: Path, manifest: Manifest, component: str, key: EngineKey, force: bool) -> list[str]:
    """Empty when an intact plan for ``key`` is listed; else why a build is needed."""
    entry = manifest.components[component]
    existing = entry.engines.get(key.digest())
    if force:
        return ["--force"]
    if existing is not None:
        path = engine_dir / existing["path"]
        if not path.is_file():
            return [f"{existing['path']} is missing"]
        if manifest.files.get(existing["path"]) != sha256_file(path):
            return [f"{existing['path']} does not match its sha256 (damaged)"]
        return []
    if not entry.engines:
        return ["no engine yet"]
    # this machine's plans first: another TensorRT's plan, differing by its version alone, was named
    # as the reason where this machine's differed by a flag (an audit)
    closest = min(
        (_key_or_none(e) for e in entry.engines.values()),
        key=lambda k: (bool(k.platform_reasons(key.tensorrt_version, key.gpu_name, key.compute_capability)),
                       len(k.diff(key))) if k is not None else (True, 1 << 30),
    )
    return closest.diff(key) if closest is not None else ["no readable engine entry"]


def _key_or_none(entry: dict[str, Any]) -> EngineKey | None:
    try:
        return EngineKey.from_dict(entry["key"])
    except (KeyError, TypeError, ValueError):
        return None


def _describe(key: EngineKey, precision: str) -> str:
    first = key.inputs[0]
    lo, opt, hi = first[1]
    shapes = f"{first[0]} {list(lo)}" if lo == hi else f"{first[0]} {list(lo)}..{list(hi)} opt {list(opt)}"
    flags = [flag for flag in key.build_flags() if flag != FLAG_LABELS["fp16"]]  # (the precision says it)
    return ", ".join([shapes, precision, *flags])


def profile_shapes(ranges: dict[str, ShapeRange], graph_io: GraphIO) -> dict[str, ShapeRange]:
    """The optimization profile's entries: the spec's ranges in the graph's shapes, for the inputs the
    graph has, less scalars (a static scalar timestep has no shape to profile; a one-element one
    gets (1,))."""
    return {
        name: (graph_io.shape(name, lo), graph_io.shape(name, opt), graph_io.shape(name, hi))
        for name, (lo, opt, hi) in ranges.items()
        if name in graph_io.inputs and graph_io.inputs[name].rank > 0
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CACHE_ERROR = re.compile(r"timing cache will not be used|stdArchiveReader", re.IGNORECASE)
"""TensorRT's errors on a timing cache it cannot read ("[stdArchiveReader.cpp::...] ... Magic tag
does not match", "The timing cache will not be used!"): logged as errors, after which the build goes
on without the cache, so they are not the reason a build then fails (a ``--timing-cache`` file may
come from another TensorRT). Set aside only where a cache was loaded (``_ErrorTee.cache_loaded``)."""


class _ErrorTee(io.TextIOBase):
    """polygraphy's log, on its way to ``target``, with the first error it holds kept: polygraphy's
    exception says only that the parse or build failed ("Invalid Engine"), TensorRT's reason is a
    line of its log (``[E] ...``), and a failure recorded away from the terminal (the bench's
    report) would otherwise hold none. Where a timing cache was loaded, TensorRT's errors about it
    count only where no other follows (``_CACHE_ERROR``)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.first_error: str | None = None
        self.cache_loaded = False
        self._cache_error: str | None = None
        self._partial = ""

    def write(self, text: str) -> int:
        self.target.write(text)
        if self.first_error is None:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                plain = _ANSI.sub("", line).strip()
                if not plain.startswith("[E]"):
                    continue
                error = plain.removeprefix("[E]").strip()
                if not (self.cache_loaded and _CACHE_ERROR.search(error)):
                    self.first_error = error
                    break
                self._cache_error = self._cache_error or error
        return len(text)

    @property
    def reason(self) -> str | None:
        """TensorRT's first error, else its first about the timing cache, else None."""
        return self.first_error or self._cache_error

    def flush(self) -> None:
        self.target.flush()


def _build_plan(onnx_path: Path, key: EngineKey, timing_cache: Path | None, replace_cache: bool,
                graph_io: GraphIO, progress: Callable[[str], None] | None = None) -> memoryview:
    """Parse, configure and build with polygraphy; returns the serialized plan (not copied).

    ``graph_io``: the graph's real inputs (``manifest.check_graph``: the scalar timestep has no
    shape to profile). ``progress`` is told TensorRT's phases as the build goes; a stop asked for
    meanwhile cancels the build at its next step and is raised once TensorRT returns
    (``tensorrt_progress``), with no plan kept."""
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    trt_profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(key.ranges, graph_io).items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    # polygraphy prints TensorRT's warnings and errors to stdout, which is kept for results: to stderr
    log = _ErrorTee(sys.stderr)
    phases = BuildPhases(progress)
    monitor = tensorrt_monitor(phases)  # (alive until the build has returned)
    try:
        from sdexport.console import QUIET, VERBOSE, verbosity

        level = {QUIET: G_LOGGER.ERROR, VERBOSE: G_LOGGER.INFO}.get(verbosity(), G_LOGGER.WARNING)
        with stopping.deferred(), G_LOGGER.verbosity(level), contextlib.redirect_stdout(log), \
                timing_cache_files(timing_cache, replace_cache) as (cache_in, cache_out):
            log.cache_loaded = cache_in is not None
            network = network_from_onnx_path(str(onnx_path), strongly_typed=key.strongly_typed)
            config = CreateConfig(
                fp16=key.fp16,
                tf32=key.tf32,
                profiles=[trt_profile],
                load_timing_cache=cache_in,
                refittable=key.refittable,
                builder_optimization_level=key.optimization_level,
                progress_monitor=monitor,
            )
            plan = engine_bytes_from_network(network, config=config, save_timing_cache=cache_out)
            if phases.interrupted is not None:  # (a KeyboardInterrupt raised in a callback all the same: kept till now)
                raise phases.interrupted
    except PolygraphyException as exc:
        if phases.interrupted is not None:
            raise phases.interrupted from None
        said = f" (TensorRT: {log.reason})" if log.reason else ""
        raise SdexportError(f"TensorRT could not build {key.component} from {onnx_path}: {exc}{said}") from None
    if plan is None:  # (polygraphy raises where the build returns None; IHostMemory has no length to test)
        said = f": {log.reason}" if log.reason else " (see its log above)"
        raise SdexportError(f"TensorRT could not build {key.component} from {onnx_path}{said}")
    return memoryview(plan)

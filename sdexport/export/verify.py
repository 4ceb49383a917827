"""Prove an export: run the ONNX graph and the PyTorch module on the same inputs and compare.

Every point of the profile (min, opt, max, one uneven mix) is checked, because a graph that is right
at the traced shape can still be wrong at another. Each output's max-abs and relative-L2 error are
recorded; a relative-L2 error over the precision's tolerance fails the export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sdexport.errors import ModelLoadError, ParityError, one_line
from sdexport.export.inputs import sample_inputs
from sdexport.export.memory import TOO_LARGE, peak_of
from sdexport.export.plan import VerifyMode
from sdexport.graph_io import GraphIO
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims

TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
"""Relative-L2 bound per export precision (fp16 is compared against the fp32 PyTorch module)."""



@dataclass
class OutputError:
    max_abs: float
    rel_l2: float


@dataclass
class PointResult:
    label: str
    status: Literal["passed", "failed", "skipped"]
    shapes: dict[str, list[int]] = field(default_factory=dict)
    outputs: dict[str, OutputError] = field(default_factory=dict)
    reason: str = ""
    memory_mb: dict[str, float] = field(default_factory=dict)
    """The point's estimated working memory (``estimated``; the min point is not estimated, it
    always runs) and what running it added to the process's resident set at its peak (``pytorch``,
    ``onnxruntime``), in MB: how close the estimate came, on the machine that ran it."""


@dataclass
class ParityReport:
    component: str
    dtype: str
    tolerance: float
    points: list[PointResult]

    @property
    def status(self) -> str:
        statuses = {p.status for p in self.points}
        if "failed" in statuses:
            return "failed"
        return "passed" if "passed" in statuses else "skipped"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["status"] = self.status
        return data


def compare(actual: np.ndarray, expected: np.ndarray) -> OutputError:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    diff = a - e
    norm = float(np.linalg.norm(e))
    return OutputError(
        max_abs=float(np.abs(diff).max(initial=0.0)),
        rel_l2=float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff)),
    )


def verification_points(
    spec: ComponentSpec, profile: ShapeProfile, dims: ModelDims, mode: VerifyMode
) -> list[tuple[str, dict[str, int] | None]]:
    """(label, symbol sizes) per point; ``None`` sizes mark a point skipped by ``mode``."""
    lo, opt, hi = profile.component_batch(spec)
    batch_at = {"min": lo, "opt": opt, "max": hi, "odd": hi}
    points = []
    for label, _, height, width, chunks in profile.points():
        run = mode == "full" or (mode == "quick" and label == "min")
        points.append((label, dims.sizes(batch_at[label], height, width, chunks) if run else None))
    return points


@dataclass
class Reference:
    """PyTorch's outputs at one verification point (``feed`` None: the point is skipped)."""

    label: str
    feed: dict[str, np.ndarray] | None
    outputs: list[np.ndarray] = field(default_factory=list)
    reason: str = ""
    need_mb: float | None = None
    """Estimated working memory of the point (None: not estimated), checked again before ONNX Runtime runs it."""
    pytorch_mb: float | None = None
    """What PyTorch's run of the point added to the resident set at its peak."""


def torch_references(
    spec: ComponentSpec,
    module: torch.nn.Module,
    *,
    profile: ShapeProfile,
    dims: ModelDims,
    vocab_size: int,
    mode: VerifyMode = "full",
    need_mb: Callable[[dict[str, np.ndarray]], float | None] | None = None,
    budget_mb: Callable[[], float | None] | None = None,
) -> list[Reference]:
    """Run the PyTorch module at every point to check. Kept apart from the ONNX half so that an
    export can free the module's weights before ONNX Runtime loads the graph's: never both at once.

    ``need_mb(feed)``: a point's estimated working memory; ``budget_mb()``: what a point may use
    now. A point over budget is skipped and reported (here, or in ``compare_with_onnx`` once ONNX
    Runtime's session holds its weights), rather than left to the kernel's out-of-memory killer,
    which ends the export without a word. The min point always runs."""
    references: list[Reference] = []
    if mode == "none":
        return [Reference("all", None, reason="verification off")]
    wrapper = spec.wrapper(module).eval()
    for i, (label, sizes) in enumerate(verification_points(spec, profile, dims, mode)):
        if sizes is None:
            references.append(Reference(label, None, reason=f"{mode} verification"))
            continue
        feed = sample_inputs(spec, sizes, vocab_size=vocab_size, seed=i)
        need = need_mb(feed) if need_mb is not None and label != "min" else None
        why = _over_budget(need, budget_mb)
        if why:
            references.append(Reference(label, None, reason=why, need_mb=need))
            continue
        try:
            with torch.no_grad(), peak_of() as peak:
                want = wrapper(*(torch.from_numpy(feed[n]) for n in spec.input_names))
        except (Exception, MemoryError) as exc:  # torch raises its own types
            raise _cannot_run(spec, label, feed, exc) from exc
        want = want if isinstance(want, tuple) else (want,)
        references.append(Reference(label, feed, [w.float().numpy() for w in want], need_mb=need,
                                    pytorch_mb=peak.added_mb))
    return references


def _over_budget(need: float | None, budget_mb: Callable[[], float | None] | None) -> str | None:
    """Why a point needing ``need`` MB cannot run now, or None."""
    budget = budget_mb() if need is not None and budget_mb is not None else None
    if need is None or budget is None or need <= budget:
        return None
    return (f"{TOO_LARGE}: needs about {_gb(need)}, {_gb(max(budget, 0))} to spare (verification keeps the "
            "export within two thirds of the machine's memory, and 1 GiB free)")


def _gb(mb: float) -> str:
    """``mb`` MiB in GiB (the figures are binary: MiB from bytes / 2**20)."""
    gb = mb / 1024
    return f"{gb:.1f} GiB" if gb >= 1 or gb == 0 else f"{gb:.2g} GiB"


def require_finite_weights(name: str, module: torch.nn.Module) -> None:
    """Refuse a module holding a NaN or infinite weight, naming it. The points verification runs see
    only what their inputs reach: a NaN row of the token embedding (one word's) exported as verified,
    and ``run`` then blamed the U-Net or the guidance for the prompts that held the word (an audit's
    file). One pass over the weights, a second or two for SDXL's U-Net on a CPU."""
    for key, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(f"{name}: the model's weight {key} holds NaN or infinite values (a damaged checkpoint, "
                                 "or a training or LoRA that diverged); its images would be noise or black")


def _cannot_run(spec: ComponentSpec, label: str, feed: dict[str, np.ndarray], exc: BaseException) -> ParityError:
    # e.g. the memory an attention matrix needs at the profile's max on this machine
    shapes = {n: list(v.shape) for n, v in feed.items()}
    return ParityError(
        f"{spec.name}: could not run at the profile's {label} point {shapes} on this machine "
        f"({one_line(exc, 300)}); lower that profile axis, or pass --verify quick to check only the min"
    )


def compare_with_onnx(
    spec: ComponentSpec,
    onnx_path: Path,
    references: list[Reference],
    *,
    dtype: str,
    graph_io: GraphIO | None = None,
    budget_mb: Callable[[], float | None] | None = None,
) -> ParityReport:
    """Run the saved graph on CPU at each reference's point and compare. ``graph_io``: how to feed
    a graph whose I/O differs from the spec's in ways that change no values (``sdexport adopt`` of
    an optimum export: int64 ids, float16 I/O); None for our own. ``budget_mb``: as for
    ``torch_references``, asked again now that ONNX Runtime holds the graph's weights (an fp16
    graph's in float32 too, on CPUs)."""
    tolerance = TOLERANCE[dtype]
    points: list[PointResult] = []
    session = None
    for ref in references:
        if ref.feed is None:
            points.append(PointResult(ref.label, "skipped", reason=ref.reason))
            continue
        if session is None:
            import onnxruntime as ort

            from sdexport.console import onnxruntime_session_options

            options = onnxruntime_session_options(ort)
            try:
                session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # an opset or operator this ONNX Runtime lacks (an adopted graph's
                raise ParityError(f"{spec.name}: ONNX Runtime cannot load {onnx_path} on the CPU "  # CUDA-only
                                  f"({one_line(exc, 300)})") from None  # fusions), or memory
            run_options = shrinking_run_options(ort) if options.enable_cpu_mem_arena else None
        why = _over_budget(ref.need_mb, budget_mb)
        if why:
            points.append(PointResult(ref.label, "skipped", reason=why))
            continue
        broken = [name for name, want in zip(spec.output_names, ref.outputs) if not np.isfinite(want).all()]
        if broken:  # the graph cannot be judged against it, and no export would fix it
            raise ParityError(f"{spec.name}: PyTorch's own {broken[0]} is not finite (NaN or Inf) at the {ref.label} "
                              "point: the model's weights (or a LoRA fused into them) are the cause, not the export")
        try:
            feed = ref.feed if graph_io is None else graph_io.numpy_feed(ref.feed)
            with peak_of() as peak:
                got = session.run(spec.output_names, feed, run_options)
        except (Exception, MemoryError) as exc:  # ONNX Runtime raises its own types
            raise _cannot_run(spec, ref.label, ref.feed, exc) from exc
        outputs = {name: compare(g, w) for name, g, w in zip(spec.output_names, got, ref.outputs)}
        ok = all(np.isfinite(e.rel_l2) and e.rel_l2 <= tolerance for e in outputs.values())
        memory = {"estimated": ref.need_mb, "pytorch": ref.pytorch_mb, "onnxruntime": peak.added_mb}
        points.append(PointResult(ref.label, "passed" if ok else "failed",
                                  shapes={n: list(v.shape) for n, v in ref.feed.items()}, outputs=outputs,
                                  memory_mb={k: round(v, 1) for k, v in memory.items() if v is not None}))
    return ParityReport(spec.name, dtype, tolerance, points)


def shrinking_run_options(ort: Any) -> Any:
    """Run options that hand ONNX Runtime's CPU memory arena back after each run (only for a session
    with the arena: without one, ``run`` refuses them).

    The arena keeps what a run allocated for the session's life, so each later point was judged
    against memory the arena held: sd15's VAE decoder skipped its uneven point after the max point,
    "0.0 GiB to spare". Turning the arena off instead costs a third longer runs of the largest VAE
    points (page faults on fresh memory) and leaves mid-sized tensors in the C heap: the tiny VAE
    decoder's max point kept 0.4 GB, against 0.05 GB with the arena (2026-12-02, onnxruntime 1.32).
    The region holding a run's outputs is still in use when the arena shrinks and stays until the
    next run: the next point is judged with those bytes counted as used, on the safe side."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def verify_component(
    spec: ComponentSpec,
    onnx_path: Path,
    module: torch.nn.Module,
    *,
    profile: ShapeProfile,
    dims: ModelDims,
    dtype: str,
    vocab_size: int,
    mode: VerifyMode = "full",
    graph_io: GraphIO | None = None,
) -> ParityReport:
    """Both halves at once, for a graph and module already in memory together (``sdexport adopt``)."""
    references = torch_references(spec, module, profile=profile, dims=dims, vocab_size=vocab_size, mode=mode)
    return compare_with_onnx(spec, onnx_path, references, dtype=dtype, graph_io=graph_io)


def require_parity(report: ParityReport) -> None:
    if report.status != "failed":
        return
    bad = [
        f"{p.label}: {name} rel-L2 {e.rel_l2:.2e}"
        for p in report.points
        if p.status == "failed"
        for name, e in p.outputs.items()
        if not e.rel_l2 <= report.tolerance
    ]
    raise ParityError(
        f"{report.component}: ONNX output disagrees with PyTorch beyond the {report.dtype} "
        f"tolerance (rel-L2 {report.tolerance:g}): " + "; ".join(bad)
    )

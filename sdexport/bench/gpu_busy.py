"""How much of a call's wall time the GPU spends running kernels (and copies): the one figure that
says whether a contender is bound by the device or by the host (launch gaps, Python, synchronisation).

One extra call per case runs under PyTorch's profiler (CUPTI), which records every kernel of the
process — PyTorch's, ONNX Runtime's, TensorRT's, also those replayed from CUDA graphs — and every
copy and memset on the device, which the busy time counts too (the device is doing the run's work;
they are a sliver of an SD run's). The busy time is the union of those intervals (overlaps on
several streams count once) over the call's wall clock. Tracing adds host work per launch, so the
figure is a lower bound for the untraced runs; it comes from its own run, never from the timed ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (start, end), overlaps counted once."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None and current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None and current_start is not None:
        total += current_end - current_start
    return total


def kernel_intervals(profiler: Any, device: Any = None) -> list[tuple[float, float]]:
    """(start, end) in microseconds of every event on ``device`` (default: CUDA) the profiler
    recorded: kernels, copies, memsets. Read from the profiler's raw results: ``profiler.events()``
    makes a Python event (and its place in a tree) of each record, seconds for the 10^5 kernels of
    a 50-step run."""
    from torch.autograd import DeviceType

    device = DeviceType.CUDA if device is None else device
    return [
        (e.start_ns() / 1e3, e.end_ns() / 1e3)
        for e in profiler.profiler.kineto_results.events()
        # not the ranges of user annotations (record_function, torch.compile's regions), which on
        # the device span the gaps between their kernels; nor what the parsed events hide
        if e.device_type() == device and e.end_ns() > e.start_ns()
        and not e.is_user_annotation() and not e.is_hidden_event()
    ]


def start_before_cuda_graphs() -> None:
    """Start the profiler's CUDA tracing (CUPTI) once, before any contender captures a CUDA graph
    (ONNX Runtime's, TensorRT's, torch.compile's): tracing first started after a capture may misread
    the kernels replayed from it (pytorch/pytorch#75504; PyTorch's own workaround,
    ``torch.profiler._utils._init_for_cuda_graphs``, is this empty session). Nothing without CUDA;
    a profiler that cannot start here costs nothing either (``measure_gpu_busy`` says so later).

    Each figure is a session of its own, so CUPTI is torn down and started again between them, in a
    process that has captured graphs; before CUDA 12.6 that crashes. PyTorch keeps CUPTI up there
    (``TEARDOWN_CUPTI=0``), but only for graphs it knows of (torch.compile's), not ONNX Runtime's or
    TensorRT's: the same here, under the same condition, before the first session."""
    import os

    import torch

    if not torch.cuda.is_available():
        return
    from torch.profiler import ProfilerActivity, profile
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.version.cuda or "0.0") < "12.6":
        os.environ.setdefault("DISABLE_CUPTI_LAZY_REINIT", "1")
        os.environ.setdefault("TEARDOWN_CUPTI", "0")
    try:
        with profile(activities=[ProfilerActivity.CUDA]):
            pass
    except Exception:  # noqa: BLE001, S110 - the figure's own run reports a profiler that fails
        pass


def measure_gpu_busy(call: Callable[[], object]) -> dict[str, Any]:
    """Run ``call`` once under the profiler; ``{"fraction", "kernel_s", "wall_s", "kernels"}``, or
    ``{"error": ...}`` where profiling is not possible (no CUDA, CUPTI refused)."""
    import torch

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        intervals = kernel_intervals(profiler)
    except Exception as exc:  # noqa: BLE001 - a profiler failure must not cost the measured figures
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    if not intervals:
        return {"error": "the profiler recorded no kernels (CUPTI unavailable?)"}
    kernel_s = union_length(intervals) / 1e6
    return {"fraction": min(1.0, kernel_s / wall), "kernel_s": kernel_s, "wall_s": wall, "kernels": len(intervals)}

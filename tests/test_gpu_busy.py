"""The GPU-busy figure: interval union arithmetic, and a clean answer where no GPU is present."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from sdexport.bench.gpu_busy import measure_gpu_busy, start_before_cuda_graphs, union_length


def test_union_counts_overlaps_once() -> None:
    assert union_length([]) == 0.0
    assert union_length([(0, 10)]) == 10
    assert union_length([(5, 8), (0, 10)]) == 10  # nested
    assert union_length([(0, 4), (3, 6), (10, 12)]) == 8  # overlap, then a gap
    assert union_length([(0, 1), (1, 2)]) == 2  # touching


def test_the_raw_intervals_are_the_profilers_events() -> None:
    """kernel_intervals reads the profiler's raw records (fast); on the CPU, where this runs, they
    cover what its parsed events do."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from sdexport.bench.gpu_busy import kernel_intervals

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(50):
            torch.ones(64, 64) @ torch.ones(64, 64)
    raw = kernel_intervals(profiler, DeviceType.CPU)
    parsed = [(e.time_range.start, e.time_range.end) for e in profiler.events()
              if e.device_type == DeviceType.CPU and e.time_range.end > e.time_range.start]
    assert len(raw) >= 50 and len(raw) == len(parsed)
    # the parsed are in whole µs: each interval's two ends may move by half a µs (a relative bound
    # failed on a loaded 2-core machine, where 50 short intervals summed 6 µs of rounding in 586)
    assert union_length(raw) == pytest.approx(union_length(parsed), abs=len(raw))


@pytest.mark.parametrize(("cuda", "kept"), [("12.4", True), ("12.6", False), ("13.0", False), (None, True)])
def test_cupti_stays_up_between_sessions_where_its_restart_after_a_capture_crashes(monkeypatch, cuda, kept) -> None:
    """Before CUDA 12.6, as PyTorch does for its own graphs (torch.compile's), for any contender's."""
    from torch import profiler

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(profiler, "profile", lambda **kwargs: contextlib.nullcontext())
    names = ("TEARDOWN_CUPTI", "DISABLE_CUPTI_LAZY_REINIT")  # (a copy: what is set here stays here)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    start_before_cuda_graphs()
    assert (os.environ.get("TEARDOWN_CUPTI"), os.environ.get("DISABLE_CUPTI_LAZY_REINIT")) == (
        ("0", "1") if kept else (None, None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_without_cuda_says_why() -> None:
    assert measure_gpu_busy(lambda: None) == {"error": "no CUDA device"}
    start_before_cuda_graphs()  # (nothing to start, nothing said)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_replayed_from_a_cuda_graph_captured_after_the_start_are_seen() -> None:
    """The bench starts tracing before any contender captures a graph (pytorch/pytorch#75504); a
    replay is then measured like launched kernels."""
    start_before_cuda_graphs()
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a @ a  # (warm the library's handles outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            b = a @ a
    result = measure_gpu_busy(graph.replay)
    again = measure_gpu_busy(graph.replay)  # (a second session after a capture: the bench makes one per case)
    assert "fraction" in again, again
    assert "fraction" in result, result
    assert result["kernels"] >= 10 and 0 < result["fraction"] <= 1
    del b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_of_a_matmul_are_seen() -> None:
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    result = measure_gpu_busy(lambda: [a @ a for _ in range(20)])
    assert "fraction" in result, result
    assert result["kernels"] >= 20 and 0 < result["fraction"] <= 1


def test_the_busy_fraction_is_at_most_one(monkeypatch) -> None:
    """Kernels that run past the measured window (queued before it ended) do not make it exceed 100 %."""
    from torch import profiler

    from sdexport.bench import gpu_busy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(profiler, "profile", lambda **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(gpu_busy, "kernel_intervals", lambda profile: [(0.0, 10e6)])
    assert measure_gpu_busy(lambda: None)["fraction"] == 1.0

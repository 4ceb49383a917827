"""Measurement helpers: robust statistics and a background memory sampler.

Peak memory is sampled, because ONNX Runtime and TensorRT allocate outside PyTorch's allocator and
PyTorch's own peak counter would miss them: host RSS from /proc, and on CUDA the device-wide used
memory from NVML, both every few milliseconds while a contender runs. NVML, not cudaMemGetInfo:
the sampler is a second thread, and a CUDA call from it while the measured thread captures a CUDA
graph can break the capture (torch captures in "global" mode). Without NVML (``pip install
nvidia-ml-py``) device memory is not sampled, and the report says so. The sampler runs in a run of
its own, never in a timed one: its thread takes Python's lock every few milliseconds, which slows
most the contenders that launch kernels from Python (eager PyTorch, the baseline). NVML's figure
is the whole device's: the floor (``device_floor``), read before each contender loads (the one
before it freed), is what this process's CUDA context, other processes and whatever the contenders
before it did not give back held; the report gives the peak above it, and the left-over (the
floor less the one read before the first contender) beside it, so that a contender's figure does
not carry what another left behind. A contender that runs on the CPU of a GPU machine
(``onnxruntime-cpu``) is not sampled on the device: its figure is the host's.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import torch


@dataclass
class Stats:
    """A summary of repeated timings, with the timings themselves: ``sdexport bench compare`` puts
    an interval on a change between two reports by resampling them."""

    median: float
    min: float
    max: float
    n: int
    samples: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0, [])
        return cls(statistics.median(values), min(values), max(values), len(values), list(values))

    def to_dict(self) -> dict[str, float | list[float]]:
        """The summary and the samples; ``mean`` too, which the report's stage columns show (their
        means add up to the whole's): results.json had only the median, up to half again apart."""
        mean = sum(self.samples) / len(self.samples) if self.samples else float("nan")
        return {"median": self.median, "mean": mean, "min": self.min, "max": self.max, "n": self.n,
                "samples": self.samples}


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


NO_NVML = "NVML unavailable (pip install nvidia-ml-py)"


def nvml_memory_reader(index: int | None = None) -> Callable[[], int] | None:
    """A function returning the device memory in use (bytes) through NVML for CUDA device ``index``
    (default: the current one), or None without a usable NVML (``nvml_reader_or_reason`` says why)."""
    reader = nvml_reader_or_reason(index)
    return None if isinstance(reader, str) else reader


def nvml_reader_or_reason(index: int | None = None) -> Callable[[], int] | str:
    """``nvml_memory_reader``'s function, or why there is none: NVML missing (``NO_NVML``), or there
    but not answering for this device (no driver access in a container; a MIG slice or a
    CUDA_VISIBLE_DEVICES torch cannot map to NVML's numbering). Every CUDA query happens here, on
    the calling thread; the returned function makes NVML calls only.

    CUDA_VISIBLE_DEVICES renumbers CUDA devices but not NVML's: the NVML index comes from the
    mapping ``torch.cuda.device_memory_used`` itself uses (a private helper; without it, the CUDA
    index, right whenever CUDA_VISIBLE_DEVICES is unset)."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return NO_NVML
    index = torch.cuda.current_device() if index is None else index
    to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(to_nvml(index) if to_nvml is not None else index)
    except Exception as exc:  # pynvml.NVMLError and friends: no usable NVML
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"NVML did not answer for CUDA device {index} ({type(exc).__name__}: {exc}"
                + (f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "") + ")")
    return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def device_floor() -> int | None:
    """The device memory in use now (bytes, NVML), this process's CUDA context made: read before a
    contender loads, what its peak is measured above. None without CUDA or NVML."""
    if not torch.cuda.is_available():
        return None
    torch.empty(0, device="cuda")  # the context, which every contender pays for alike, and no block
    torch.cuda.synchronize()
    reader = nvml_memory_reader()
    return reader() if reader is not None else None


class MemorySampler:
    """Peak host RSS and device memory in use while the block runs. ``floor``: ``device_floor``'s
    reading before the contender loaded, and ``left_over``: how much of it the contenders before
    had left behind (bytes), both kept with the figures. ``device``: whether to sample the device
    (default: whether there is one); not for a contender that runs on the CPU."""

    def __init__(self, interval: float = 0.005, floor: int | None = None, left_over: int | None = None,
                 device: bool | None = None) -> None:
        self.interval = interval
        self.floor = floor
        self.left_over = left_over
        self.cuda = torch.cuda.is_available() if device is None else device
        reader = nvml_reader_or_reason() if self.cuda else None
        self.device_used = None if isinstance(reader, str) else reader
        self.device_unread = reader if isinstance(reader, str) else None
        """Why the device is not sampled, where it is a GPU's: ``nvml_reader_or_reason``'s reason."""
        self.host_peak = 0
        self.device_peak = 0
        self.host_before = 0
        self.device_before = 0
        self.device_error: str | None = None
        """Why NVML stopped answering mid-run (a transient NVMLError, a GPU lost): the device figures
        are then left out, not an under-count, and the run's own figures stand."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _device(self) -> int:
        """NVML's reading, or 0 once it failed (recorded in ``device_error``; no more calls)."""
        if self.device_used is None or self.device_error is not None:
            return 0
        try:
            return self.device_used()
        except Exception as exc:  # pynvml.NVMLError: not worth the contender's timed figures
            self.device_error = f"{type(exc).__name__}: {exc}"
            return 0

    def _sample(self) -> None:
        self.host_peak = max(self.host_peak, _rss_bytes())
        self.device_peak = max(self.device_peak, self._device())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self.host_before = _rss_bytes()
        self.device_before = self._device()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def to_dict(self) -> dict[str, float | str | None]:
        mb = 1024**2  # (the ``_mb`` keys are MiB, as the report's tables say: 1 MB is 0.95 MiB, an audit)
        sampled = self.device_used is not None and self.device_error is None
        data: dict[str, float | str | None] = {
            "host_rss_peak_mb": self.host_peak / mb,
            "host_rss_before_mb": self.host_before / mb,
            "device_used_peak_mb": self.device_peak / mb if sampled else None,
            "device_used_before_mb": self.device_before / mb if sampled else None,
            "device_floor_mb": self.floor / mb if sampled and self.floor is not None else None,
            "device_left_over_mb": self.left_over / mb if sampled and self.left_over is not None else None,
        }
        if self.device_error is not None:
            data["device_note"] = f"not sampled: NVML failed during the run ({self.device_error})"
        elif self.cuda and not sampled:
            data["device_note"] = f"not sampled: {self.device_unread or NO_NVML}"
        return data


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))

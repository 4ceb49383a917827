"""Measurement helpers: robust statistics and a background memory sampler.

Peak memory is sampled, because ONNX Runtime and TensorRT allocate outside PyTorch's allocator and
PyTorch's own peak counter would miss them: host RSS from /proc, and on CUDA the device-wide used
memory from cudaMemGetInfo, both every few milliseconds while a contender runs.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Self

import torch


@dataclass
class Stats:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(values), min(values), max(values), len(values))

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _device_used_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


class MemorySampler:
    """Peak host RSS and device memory in use while the block runs."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.cuda = torch.cuda.is_available()
        self.host_peak = 0
        self.device_peak = 0
        self.host_before = 0
        self.device_before = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.host_peak = max(self.host_peak, _rss_bytes())
        if self.cuda:
            self.device_peak = max(self.device_peak, _device_used_bytes())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self.host_before = _rss_bytes()
        self.device_before = _device_used_bytes() if self.cuda else 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def to_dict(self) -> dict[str, float | None]:
        mb = 1024**2
        return {
            "host_rss_peak_mb": self.host_peak / mb,
            "host_rss_before_mb": self.host_before / mb,
            "device_used_peak_mb": self.device_peak / mb if self.cuda else None,
            "device_used_before_mb": self.device_before / mb if self.cuda else None,
        }


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))

"""Peak memory of each export stage, as the user's machine sees it: the process's resident set.

An export's peak decides whether it fits on a machine, and it is set by one stage (loading, tracing,
the graph passes, saving, verification) of one component. A thread samples the resident set every
5 ms while a stage runs, and the kernel's high-water mark (``VmHWM``, every allocation however brief:
torch's, ONNX Runtime's, protobuf's) makes it exact for the stage that sets the process's peak.
The high-water mark is only read, never reset, so ``/usr/bin/time`` and ``wait4`` still report the
whole run's peak.

It also sets the memory verification may use (``verification_budget_mb``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MB = 1024**2
TOO_LARGE = "too large for this machine's memory"
"""Why a verification point is skipped when its estimated working memory exceeds what is free."""
STAGES = ("load", "trace", "pytorch", "graph passes", "save", "verify")
"""An export's stages per component, in order (``export.exporter.export_component``): the columns
``inspect`` shows their peaks in; ``ExportMemory.stage`` takes no other."""
_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def resident_bytes() -> int:
    """The process's resident set now (0 where it cannot be read)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
    except ImportError:
        return 0
    return int(psutil.Process().memory_info().rss)


@dataclass
class StagePeak:
    stage: str
    peak_mb: float
    """Highest resident set while the stage ran."""
    start_mb: float
    """Resident set when it began: what earlier stages left behind."""


@dataclass
class MemoryLog:
    """Stages in the order they ran; ``method`` says how peaks were taken."""

    stages: list[StagePeak] = field(default_factory=list)
    method: str = ""

    @property
    def peak_mb(self) -> float:
        return max((s.peak_mb for s in self.stages), default=0.0)

    def record(self) -> dict[str, object]:
        """For the manifest: rounded to whole MB, which is all the measurement is good for."""
        return {
            "peak_rss_mb": round(self.peak_mb),
            "machine_memory_mb": round(machine_memory_mb() or 0),
            "method": self.method,
            "stages": [{"stage": s.stage, "peak_rss_mb": round(s.peak_mb), "start_rss_mb": round(s.start_mb)}
                       for s in self.stages],
        }

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the block as stage ``name`` (``component/step``, e.g. ``unet/trace``; the model's
        own loading is ``load``), ``step`` one of ``STAGES``."""
        if name.rpartition("/")[2] not in STAGES:
            raise ValueError(f"export stage {name!r}: its step is not one of {STAGES}")
        self.method = self.method or ("sampled every 5 ms; exact (VmHWM) where a stage set the process's peak"
                                      if _status_kb("VmHWM") is not None else "sampled every 5 ms")
        peak: Peak | None = None  # stays None if measuring could not start: that error is the one to see
        try:
            with peak_of() as peak:
                yield
        finally:  # a stage that failed is recorded too: its peak may be why
            if peak is not None:
                self.stages.append(StagePeak(name, peak.peak / MB, peak.start / MB))


@dataclass
class Peak:
    """The resident set when a block began, and its highest while the block ran (bytes)."""

    start: int
    peak: int = 0

    @property
    def added_mb(self) -> float:
        """What the block added at its peak to what was there before it."""
        return max(0, self.peak - self.start) / MB


@contextmanager
def peak_of() -> Iterator[Peak]:
    """Measure the block's peak resident set: sampled every 5 ms, and exact where the block set the
    process's high-water mark (read, never reset)."""
    result = Peak(resident_bytes())
    mark = _status_kb("VmHWM")
    sampler = _Sampler()
    sampler.start()
    try:
        yield result
    finally:
        sampler.stop()
        peak = max(sampler.peak, result.start)
        after = _status_kb("VmHWM")
        if mark is not None and after is not None and after > mark:  # the process's peak was this block's
            peak = max(peak, after * 1024)
        result.peak = peak


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, resident_bytes())

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.peak = max(self.peak, resident_bytes())


WORTH_COLLECTING_BYTES = 2 * 1024**3
"""Below this resident size ``give_back_freed_memory`` does nothing: a full collection costs about
a quarter of a second once torch and onnx are loaded (15 of them were a quarter of a tiny export's
time, and the default test run exports dozens of tiny models), and there is nothing there to win."""


def give_back_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc's ``malloc_trim``).

    Freed blocks otherwise stay in the process, and the next component's peak would stack on the
    last one's leftovers (measured: 4.9 GB still resident after the SDXL text encoder 2's
    verification, before the U-Net's 10 GB of weights arrived). Elsewhere only the collection runs.
    A small process (under ``WORTH_COLLECTING_BYTES``) is left as it is."""
    import ctypes
    import gc

    if resident_bytes() < WORTH_COLLECTING_BYTES:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


VERIFY_SHARE = 2 / 3
"""Verification beyond the min point keeps the process within this share of the machine's memory:
what a verified point adds is a check, not the export, and the rest of the machine (page cache, the
user's other work) keeps a third. The SDXL fp16 export so stays within 16 GB on a 24 GB machine."""
MARGIN_MB = 1024
"""Kept free besides a verification point's estimated need: the estimate is not exact."""


def verification_budget_mb() -> float | None:
    """Memory a verification point may add now: within ``VERIFY_SHARE`` of the machine (or of the
    container's limit) and within what is free, less ``MARGIN_MB``; None where it cannot be told."""
    total, free = machine_memory_mb(), available_memory_mb()
    limit, used = _cgroup_memory()
    if limit is not None:
        total = min(total, limit) if total else limit
        if used is not None:
            free = min(free, limit - used) if free is not None else limit - used
    if total is None or free is None:
        return None
    return min(free - MARGIN_MB, VERIFY_SHARE * total - resident_bytes() / MB)


NO_LIMIT = 2**62
"""cgroup v1 writes "no limit" as the largest page-aligned number (9223372036854771712): any limit
above this is none."""


def _cgroup_memory(root: Path = Path("/sys/fs/cgroup"),
                   membership: Path = Path("/proc/self/cgroup")) -> tuple[float | None, float | None]:
    """The memory limit of this process's cgroups with the least room left under it, and the use
    under it (MB); (None, None) without a limit. Each level from the process's own cgroup up to the
    root counts (a limit holds everything below it): cgroup v2's ``memory.max``, and cgroup v1's
    ``memory.limit_in_bytes`` (older Docker and Kubernetes hosts), read where ``/proc/self/cgroup``
    places the process (a Slurm job's or ``systemd-run``'s cgroup is below the mount's root, which
    holds no limit of its own)."""
    try:
        lines = membership.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    v2, v1 = ("memory.max", "memory.current", "inactive_file"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                                  "total_inactive_file")
    levels: list[tuple[Path, tuple[str, str, str]]] = []  # (folder, its limit, use and reclaimable cache names)
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2's unified hierarchy
            levels += [(folder, v2) for folder in _up_to(root, path)]
        elif "memory" in controllers.split(","):
            levels += [(folder, v1) for folder in _up_to(root / "memory", path)]
    if not lines:
        levels = [(root, v2)]
    tightest: tuple[float, float] | None = None
    for folder, (limit_file, use_file, cache_key) in levels:
        try:
            text = (folder / limit_file).read_text(encoding="utf-8").strip()
            if text == "max" or int(text) >= NO_LIMIT:
                continue
            # the use less the page cache the kernel would drop first (the kubelet's "working set"): an
            # export that has just read a checkpoint holds gigabytes of it, which are not its own
            cached = _stat(folder / "memory.stat", cache_key)
            limit, used = int(text) / MB, max(0, int((folder / use_file).read_text(encoding="utf-8")) - cached) / MB
        except (OSError, ValueError):
            continue
        if tightest is None or limit - used < tightest[0] - tightest[1]:
            tightest = (limit, used)
    return tightest if tightest is not None else (None, None)


def _stat(path: Path, key: str) -> int:
    """One figure of a cgroup's ``memory.stat`` (0 where it has none)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _up_to(root: Path, path: str) -> list[Path]:
    """``root / path`` and each folder above it up to ``root``."""
    parts = [part for part in path.split("/") if part and part != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def machine_memory_mb() -> float | None:
    """Total physical memory, to say what machine the figures come from."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    except (ValueError, OSError):
        return None


def available_memory_mb() -> float | None:
    """Memory the kernel could give this process now without swapping (``MemAvailable``)."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) / 1024
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.virtual_memory().available) / MB

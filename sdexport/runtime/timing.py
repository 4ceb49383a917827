"""Per-stage timing that does not change what it measures.

Synchronising the device around every engine call (the obvious way to time stages on a GPU) stops
the host from queueing the next call while the GPU works, so the instrumented run is slower than a
real one, and its end-to-end time is not the figure a user gets. Instead, a run places *marks* in
the device's work and reads the time between them once the run is over:

* on CUDA, a mark is a CUDA event recorded on the current stream (no host synchronisation; the
  run's final device-to-host copy completes every event before they are read);
* on the CPU, where work is synchronous, a mark is the host clock.

End-to-end time is always the host's wall clock around the whole call. A benchmark takes it from
runs with no marks at all (``NO_CLOCK``) and the stage figures from separate marked runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch


class StageClock(Protocol):
    kind: str
    """What the stage figures are: "cuda events" or "host clock" (written into reports)."""

    def mark(self) -> Any:
        """A point in the device's work, in call order."""

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks; only once the work up to ``end`` has finished."""


class HostClock:
    kind = "host clock"

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaEventClock:
    kind = "cuda events"

    def __init__(self, device: torch.device, event: Callable[..., Any] | None = None) -> None:
        self.device = device
        self._event = event if event is not None else torch.cuda.Event

    def mark(self) -> Any:
        event = self._event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: Any, end: Any) -> float:
        end.synchronize()  # a no-op once the run's results reached the host
        return float(start.elapsed_time(end)) / 1000.0


class NoClock:
    """No marks at all: for runs timed only end to end."""

    kind = "none"

    def mark(self) -> None:
        return None

    def seconds(self, start: None, end: None) -> float:
        return 0.0


NO_CLOCK = NoClock()


def clock_for(device: torch.device) -> StageClock:
    return CudaEventClock(device) if device.type == "cuda" else HostClock()

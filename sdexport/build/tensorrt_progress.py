"""TensorRT's progress monitor for a build: the phases it reports, on the build's step line, and a
stop asked for while it builds turned into a cancelled build.

A build is one call into TensorRT that lasts minutes (an SD U-Net's; SDXL's, tens of minutes on
some GPUs), and Python runs no signal handler until it returns: a Ctrl-C, or a CI timeout's
SIGTERM, waited for the whole build, with a spinner the only sign of life. TensorRT 10.0 and later
(11 too) report each phase of a build to an ``IProgressMonitor`` (its name, its parent, how many
steps, each step as it completes), and cancel the build when ``step_complete`` returns False.
polygraphy passes one on (``CreateConfig(progress_monitor=...)``, in 0.50.3, the floor, too).

Where TensorRT calls the monitor from the thread that called the build, a stop's handler runs in
the callback. An exception raised there does not unwind through TensorRT: the binding catches it,
prints "[ERROR] Exception caught in step_complete()" to stderr and cancels (NVIDIA's pyCore.cpp;
the same strings in 11.4's tensorrt.so), and the stop itself would be lost. So
``stopping.deferred`` makes the handler record the stop instead, and the monitor, seeing it
recorded, cancels; it is raised once TensorRT returns. Where TensorRT calls the monitor from
threads of its own, the handler waits for the build to return, as before, and the stop is acted on
then. Not yet seen on a real TensorRT (no GPU here): which of the two it is, and the phases' names
and numbers, are for the first GPU run (issue 11).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sdexport import stopping

SHOWN_PHASES = 3
"""How many of the open phases the line shows: the most recently opened (the deepest)."""


class BuildPhases:
    """The phases a TensorRT build has open, said through ``say`` as one line each time one starts,
    moves on or finishes (``"Building engine 2/7 › Tactic selection 31/120"``); a stop asked for
    (``stopping.requested``) cancels the build at its next step. Thread-safe: TensorRT may call
    from several threads (the binding takes the GIL for each call). Nothing here fails a build: a
    ``say`` that raises is not called again. A KeyboardInterrupt raised inside a callback all the
    same (``deferred`` holds back every signal handler that could raise one; a display could still)
    cancels it and is kept in ``interrupted``, for the caller to raise once TensorRT has returned."""

    def __init__(self, say: Callable[[str], None] | None) -> None:
        self._say = say
        self._lock = threading.Lock()
        self._open: dict[str, tuple[int, int]] = {}
        """Each open phase's steps done and steps, in the order the phases opened."""
        self.cancelled = False
        """Whether the monitor asked TensorRT to cancel the build."""
        self.interrupted: KeyboardInterrupt | None = None

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        try:
            self._changed(phase_name, (0, num_steps))
        except BaseException as exc:
            self._fault(exc)

    def step_complete(self, phase_name: str, step: int) -> bool:
        """``step`` (counted from 0) of ``phase_name`` is done; False asks TensorRT to cancel."""
        try:
            steps = self._open.get(phase_name, (0, step + 1))[1]
            self._changed(phase_name, (min(step + 1, steps), steps))
            if stopping.requested():
                self.cancelled = True
        except BaseException as exc:
            self._fault(exc)
        return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        try:
            self._changed(phase_name, None)
        except BaseException as exc:
            self._fault(exc)

    def line(self) -> str:
        """The open phases, the deepest ``SHOWN_PHASES`` of them."""
        with self._lock:
            shown = list(self._open.items())[-SHOWN_PHASES:]
        return " › ".join(f"{name} {done}/{steps}" for name, (done, steps) in shown)

    def _changed(self, phase_name: str, progress: tuple[int, int] | None) -> None:
        with self._lock:
            if progress is None:
                self._open.pop(phase_name, None)
            else:
                self._open[phase_name] = progress
        say, line = self._say, self.line()
        if say is not None and line:
            try:
                say(line)
            except Exception:  # (a display that fails stops showing; the build goes on)
                self._say = None

    def _fault(self, exc: BaseException) -> None:
        """What a callback raised: a stop cancels the build (and is kept to raise); any other fault
        is dropped, as it must not reach the binding (which would cancel a build of minutes)."""
        if isinstance(exc, KeyboardInterrupt):
            if self.interrupted is None:
                self.interrupted = exc
            self.cancelled = True
        elif not isinstance(exc, Exception):
            raise exc  # (SystemExit and the like: the binding prints it and cancels the build)


def tensorrt_monitor(phases: BuildPhases) -> Any:
    """``phases`` as the ``tensorrt.IProgressMonitor`` a builder configuration takes: a subclass
    made here, since TensorRT is imported only when a build needs it. The caller keeps it until the
    build has returned (TensorRT's docs: it must outlive every object that uses it)."""
    import tensorrt as trt

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # (the binding requires it of a subclass)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            phases.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return phases.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            phases.phase_finish(phase_name)

    return ProgressMonitor()


__all__ = ["BuildPhases", "SHOWN_PHASES", "tensorrt_monitor"]

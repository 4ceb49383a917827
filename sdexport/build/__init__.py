"""ONNX → TensorRT: optimization profiles from the ComponentSpecs, an engine cache key, and the build.

``profiles`` and ``cache_key`` are pure Python so that they can be tested (and engines planned) on a
machine without TensorRT; ``tensorrt_build`` is the only module that touches TensorRT and polygraphy,
and it imports them inside its functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Result(Protocol):
    @property
    def component(self) -> str: ...

    @property
    def status(self) -> str: ...


def keep_built(results: Sequence[_Result]) -> None:
    """Record, for a stop, the components this build has put in place so far (``stopping.keep``):
    each is listed in the manifest, and a build run again reuses it rather than redo minutes of work."""
    from sdexport import stopping

    built = [r.component for r in results if r.status == "built"]
    if built:
        stopping.keep("built", f"already built: {', '.join(built)} (a build run again reuses them)")

"""Torch backend: the original PyTorch modules, eager or compiled — the reference the others match.

It needs the model's weights, which an engine directory does not hold: they are loaded again from
the source recorded in the manifest (the preset and its seed, or the checkpoint's path).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sdexport.errors import EngineRunError
from sdexport.runtime.engine import check_feed
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec

COMPILE_RECIPES = ("default", "max")
"""``default``: ``torch.compile`` as it comes. ``max`` (``--backend torch-compile-max``): diffusers'
documented fast recipe (https://huggingface.co/docs/diffusers/optimization/fp16 and its "accelerate
inference" guide): fused QKV projections, channels_last weights, inductor's
``conv_1x1_as_mm``/coordinate-descent tuning without epilogue fusion, and
``mode="max-autotune"``, which also captures CUDA graphs on a GPU. It compiles for minutes on the
first call with each shape: a one-time cost that benchmarks report apart from steady state."""


INDUCTOR_SETTINGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}
"""The inductor settings diffusers documents for its fastest ``torch.compile`` recipe; applied around
this engine's calls only (compilation happens inside them), not to the whole process."""


def prepare_for_max_compile(module: torch.nn.Module) -> torch.nn.Module:
    """Fuse the attention's Q/K/V (and K/V) projections into one matmul where diffusers offers it
    (U-Net and VAE), and store the weights channels_last, in place."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    if callable(fuse):
        fuse()
    return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it


def _inductor_patch(settings: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    if not settings:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor

    return inductor.patch(settings)  # type: ignore[no-any-return]


class TorchEngine:
    def __init__(
        self,
        spec: ComponentSpec,
        module: torch.nn.Module,
        *,
        profile: ShapeProfile,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        recipe: str = "default",
    ) -> None:
        """``recipe`` (with ``compile``): one of ``COMPILE_RECIPES``; "max" changes ``module`` in place."""
        if recipe not in COMPILE_RECIPES:
            raise ValueError(f"unknown compile recipe {recipe!r} (known: {', '.join(COMPILE_RECIPES)})")
        self.spec, self.profile, self.device, self.dtype = spec, profile, device, dtype
        self.graphs = compile and recipe == "max" and device.type == "cuda"
        if compile and recipe == "max":
            module = prepare_for_max_compile(module)
        wrapper = spec.wrapper(module).to(device=device, dtype=dtype).eval()
        self.settings: dict[str, Any] = {}
        if compile and recipe == "max":
            self.settings = INDUCTOR_SETTINGS
            self.module = torch.compile(wrapper, mode="max-autotune", fullgraph=True)
        else:
            self.module = torch.compile(wrapper) if compile else wrapper

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        # Only "float" inputs follow the model's precision; "float32" ones (the timestep, SDXL's time
        # ids) are projected in float32 by diffusers itself: fp16 would round t=979.6 to 979.5.
        args = [
            feed[t.name].to(self.dtype) if t.dtype == "float" else feed[t.name] for t in self.spec.inputs
        ]
        try:
            with torch.inference_mode(), _inductor_patch(self.settings):
                if self.graphs:  # a new CUDA-graph step: the last call's outputs were copied out below
                    torch.compiler.cudagraph_mark_step_begin()
                results = self.module(*args)
        except Exception as exc:  # out of device memory, a torch.compile that fails on these shapes
            raise EngineRunError(self.spec.name, "torch", exc) from exc
        results = results if isinstance(results, tuple) else (results,)
        # With CUDA graphs the outputs live in the graph's memory, which the next replay overwrites.
        return {n: r.clone() if self.graphs and r.dtype == torch.float32 else r.float()
                for n, r in zip(self.spec.output_names, results)}

    def close(self) -> None:
        """Drop the module (its weights are freed once nothing else holds them)."""
        self.module = None  # type: ignore[assignment]

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

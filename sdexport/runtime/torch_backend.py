"""Torch backend: the original PyTorch modules, eager or compiled — the reference the others match.

It needs the model's weights, which an engine directory does not hold: they are loaded again from
the source recorded in the manifest (the preset and its seed, or the checkpoint's path).
"""

from __future__ import annotations

import torch

from sdexport.runtime.engine import check_feed
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec


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
    ) -> None:
        self.spec, self.profile, self.device, self.dtype = spec, profile, device, dtype
        wrapper = spec.wrapper(module).to(device=device, dtype=dtype).eval()
        self.module = torch.compile(wrapper) if compile else wrapper

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        # Only "float" inputs follow the model's precision; "float32" ones (the timestep, SDXL's time
        # ids) are projected in float32 by diffusers itself: fp16 would round t=979.6 to 979.5.
        args = [
            feed[t.name].to(self.dtype) if t.dtype == "float" else feed[t.name] for t in self.spec.inputs
        ]
        with torch.inference_mode():
            results = self.module(*args)
        results = results if isinstance(results, tuple) else (results,)
        return {n: r.float() for n, r in zip(self.spec.output_names, results)}

    def close(self) -> None:
        """Drop the module (its weights are freed once nothing else holds them)."""
        self.module = None  # type: ignore[assignment]

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

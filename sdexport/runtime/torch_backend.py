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
        args = [
            feed[n].to(self.dtype) if feed[n].is_floating_point() else feed[n] for n in self.spec.input_names
        ]
        with torch.inference_mode():
            results = self.module(*args)
        results = results if isinstance(results, tuple) else (results,)
        return {n: r.float() for n, r in zip(self.spec.output_names, results)}

"""PyTorch module → raw ONNX graph, with the dynamic axes a ComponentSpec declares."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from sdexport.specs import ComponentSpec

DEFAULT_OPSET = 17


def trace_to_onnx(
    spec: ComponentSpec,
    module: torch.nn.Module,
    example: dict[str, np.ndarray],
    *,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Trace ``spec``'s wrapper around ``module`` and return the graph with weights loaded.

    The TorchScript exporter is used on purpose: it is many times faster than the dynamo exporter
    on a U-Net and handles dynamic batch 1 (see DESIGN.md). It freezes shape-dependent Python
    branches, which is why profiles are validated to multiples the U-Net handles without padding.
    """
    wrapper = spec.wrapper(module).eval()
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    dynamic_axes = {
        t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs) if t.dynamic_axes
    }
    with tempfile.TemporaryDirectory(prefix=f"sdexport-{spec.name}-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about frozen branches are expected
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        # Weights of a > 2 GB model arrive as many files in tmp; load them into memory.
        return onnx.load(str(path), load_external_data=True)

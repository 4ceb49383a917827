"""PyTorch module → raw ONNX graph, with the dynamic axes a ComponentSpec declares."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from sdexport.export.plan import DEFAULT_OPSET
from sdexport.export.weight_store import WeightStore
from sdexport.specs import ComponentSpec


def trace_to_onnx(
    spec: ComponentSpec,
    module: torch.nn.Module,
    example: dict[str, np.ndarray],
    workdir: Path,
    *,
    opset: int = DEFAULT_OPSET,
) -> tuple[onnx.ModelProto, WeightStore]:
    """Trace ``spec``'s wrapper around ``module``; return the graph as a skeleton and its weights.

    The TorchScript exporter is used on purpose: it is many times faster than the dynamo exporter
    on a U-Net and handles dynamic batch 1 (see DESIGN.md). It freezes shape-dependent Python
    branches, which is why profiles are validated to multiples the U-Net handles without padding.
    Over 2 GB it writes each weight to a file of its own in ``workdir``, where the weights stay until
    saved (``WeightStore``): the caller removes ``workdir`` afterwards.
    """
    wrapper = spec.wrapper(module).eval()
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    dynamic_axes = {
        t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs) if t.dynamic_axes
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "model.onnx"
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
            do_constant_folding=False,  # WeightStore.fold and graph.cleanup fold, without copies in memory
            dynamo=False,
        )
    model = onnx.load(str(path), load_external_data=False)
    path.unlink()  # the protobuf is in memory now; the weight files stay
    weights = WeightStore.detach(model, workdir)
    weights.fold(model)
    # protobuf keeps a cleared field's bytes until the message goes: a new, small copy lets them go
    return onnx.ModelProto.FromString(model.SerializeToString()), weights

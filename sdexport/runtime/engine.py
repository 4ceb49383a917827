"""The Engine interface every backend implements, read from the ComponentSpecs.

An engine is one component (text encoder, U-Net, VAE) behind a call that takes and returns named
torch tensors on the engine's device. Torch tensors are the common currency because the scheduler
loop is torch code: ONNX Runtime binds them (CPU: zero-copy numpy views; CUDA: IO binding on device
pointers), TensorRT binds their device pointers, and the Torch backend uses them as they are. No
tensor leaves the device inside the denoising loop.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from sdexport.errors import EngineRunError, ProfileError
from sdexport.shapes import ShapeProfile
from sdexport.specs import DYNAMIC_SYMBOLS, ComponentSpec, ModelDims

TORCH_DTYPES = {"int32": torch.int32, "float": torch.float32, "float32": torch.float32}
"""I/O dtypes of every exported graph: float I/O stays float32 even in fp16 exports."""


@runtime_checkable
class Engine(Protocol):
    spec: ComponentSpec
    device: torch.device
    profile: ShapeProfile
    """Shapes this engine accepts; the pipeline refuses requests outside it before running anything."""

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def sizes_from_inputs(spec: ComponentSpec, feed: dict[str, torch.Tensor], dims: ModelDims) -> dict[str, int]:
    """Recover the symbol values (B, h, w, ...) of one call from its input shapes."""
    found: dict[str, int] = {}
    for tensor in spec.inputs:
        shape = tuple(feed[tensor.name].shape)
        if len(shape) != len(tensor.dims):
            raise ProfileError(
                f"{spec.name}.{tensor.name}: expected {len(tensor.dims)} dimensions "
                f"({', '.join(tensor.dims)}), got shape {list(shape)}"
            )
        for dim, value in zip(tensor.dims, shape):
            if dim in DYNAMIC_SYMBOLS:
                found[dim] = value
    f = dims.vae_scale_factor
    height = found.get("H", found.get("h", 0) * f)
    width = found.get("W", found.get("w", 0) * f)
    return dims.sizes(found.get("B", 1), height, width, found.get("X", dims.S) // dims.S)


def output_shapes(spec: ComponentSpec, feed: dict[str, torch.Tensor], dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Output shapes of one call, so backends can allocate outputs before running."""
    sizes = sizes_from_inputs(spec, feed, dims)
    return {t.name: t.shape(sizes) for t in spec.outputs}


def check_outputs(spec: ComponentSpec, feed: dict[str, torch.Tensor], dims: ModelDims,
                  outputs: dict[str, torch.Tensor], engine: object, runtime: str) -> dict[str, torch.Tensor]:
    """``outputs``, where each has the shape the spec gives it for ``feed``; else ``EngineRunError``.

    Load checks a graph's names, dtypes and ranks, not the sizes it computes: a graph that returns
    half-size or single-image outputs (hand-edited, or adopted from another tool) made ``run`` save
    a 64x64 image recorded as 128x128, list images it never wrote, or fail in the loop with a torch
    traceback. Backends whose outputs the graph sizes (ONNX Runtime on the CPU, TensorRT) call this;
    those that allocate the outputs from the spec first are held to it by their runtime."""
    for name, want in output_shapes(spec, feed, dims).items():
        got = tuple(outputs[name].shape)
        if got != want:
            raise EngineRunError(engine, runtime, f"it returned {spec.name}.{name} of shape {list(got)} where this "
                                 f"call needs {list(want)}: the graph does not compute what a {spec.name} does")
    return outputs


def check_feed(spec: ComponentSpec, feed: dict[str, torch.Tensor]) -> None:
    missing = [n for n in spec.input_names if n not in feed]
    if missing:
        raise ProfileError(f"{spec.name}: missing input(s) {', '.join(missing)}")
    for tensor in spec.inputs:
        want = TORCH_DTYPES[tensor.dtype]
        if feed[tensor.name].dtype != want:
            raise ProfileError(f"{spec.name}.{tensor.name}: expected {want}, got {feed[tensor.name].dtype}")

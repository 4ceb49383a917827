"""TensorRT optimization profiles: which min/opt/max shape each engine input gets.

A build profile is stated in the user's terms (images per call, pixels), like the export profile.
It must lie inside the profile the ONNX graphs were exported and verified for: TensorRT would build
an engine for shapes the graph was never checked at (or cannot run at, when an axis is static in the
graph), so a wider request is refused here, naming the axis and the range that is allowed. The
per-tensor shapes come from ``ShapeProfile.tensor_ranges``, i.e. from the ComponentSpec, so a shape
is never spelled a second time (and CFG components get their doubled batch from the same place).
"""

from __future__ import annotations

from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]
"""(min, opt, max) shape of one tensor."""


def static_profile(profile: ShapeProfile) -> ShapeProfile:
    """The profile collapsed to its opt point: ``--static`` builds one fixed shape.

    A static engine lets TensorRT pick kernels for exactly one shape (usually the fastest) and lets
    the runtime replay a CUDA graph. CFG components still see batch B and 2B (see
    ``ShapeProfile.component_batch``): a guidance scale of 1 runs them without the negative half.
    """
    return ShapeProfile(*((opt, opt, opt) for _, (_, opt, _) in profile.axes))


def build_profile(
    exported: ShapeProfile,
    requested: ShapeProfile | None,
    dims: ModelDims,
    *,
    static: bool = False,
) -> ShapeProfile:
    """The profile to build engines for: ``requested`` (default: the export's), checked against it.

    Raises ProfileError when an image side is not a multiple the U-Net can serve, or when the request
    reaches outside the exported ONNX profile; the message names the axis and the allowed range.
    """
    profile = requested if requested is not None else exported
    if static:
        profile = static_profile(profile)
    profile.validate(dims)
    profile.check_inside(exported, "build profile reaches outside the exported ONNX profile",
                         "build inside it, or re-export with a wider")
    return profile


def input_ranges(spec: ComponentSpec, profile: ShapeProfile, dims: ModelDims) -> dict[str, ShapeRange]:
    """min/opt/max shape of every input of ``spec`` under ``profile``, in the spec's input order."""
    return dict(profile.tensor_ranges(spec, dims))

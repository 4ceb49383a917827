"""ONNX graph passes after tracing: cleanup, constant folding, shape inference, fp16, saving.

onnx-graphsurgeon does the cleanup and folding; onnxruntime's transformer tools do the fp16
conversion (keeping float32 I/O so callers never cast); onnx saves large models with their
weights in one external file, because a protobuf cannot exceed 2 GB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_SUFFIX = ".data"


def model_size(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, whether stored inline or not yet."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * max(
                1, int(_prod(tensor.dims))
            )
    return total


def _prod(dims: object) -> int:
    result = 1
    for d in dims:  # type: ignore[attr-defined]
        result *= int(d)
    return result


def cleanup(model: onnx.ModelProto, *, fold: bool = True) -> onnx.ModelProto:
    """Remove dead nodes, fold constant subgraphs and sort, as TensorRT's parser prefers."""
    import onnx_graphsurgeon as gs

    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    if fold:
        # Folding evaluates constant subgraphs with onnxruntime; big weights stay as they are.
        graph.fold_constants(size_threshold=64 * 1024**2).cleanup()
    cleaned = gs.export_onnx(graph)
    cleaned.opset_import.clear()
    cleaned.opset_import.extend(model.opset_import)
    cleaned.ir_version = model.ir_version
    return cleaned


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations; inputs and outputs stay float32 (cast at the graph edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return model_size(model) < PROTOBUF_LIMIT - 64 * 1024**2


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Annotate intermediate shapes; skipped over 2 GB, where TensorRT and ORT infer them anyway."""
    if not fits_in_protobuf(model):
        return model
    return onnx.shape_inference.infer_shapes(model)


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save ``model``; over 2 GB its weights go to one ``<name>.data`` file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fits_in_protobuf(model):
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    _readable_like(data, path)
    return [path, data]


def _readable_like(file: Path, reference: Path) -> None:
    """onnx writes the data file owner-only; give it the model file's mode so servers can read both."""
    os.chmod(file, reference.stat().st_mode & 0o777)

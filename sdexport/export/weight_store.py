"""A traced graph's weights kept out of its protobuf, so each pass holds one copy of none of them.

The graph passes (cleanup, fp16 conversion, shape inference, checks) read the structure of a graph,
never its weight values, yet each of them copies a whole ``ModelProto``: with the weights inside,
the SDXL U-Net (10 GB in float32) would be copied several times over. So once traced, every float
initializer of at least ``DETACH_BYTES`` becomes a placeholder (name, type and dims, no data) and its
bytes stay where the tracer put them: in the files ``torch.onnx.export`` writes beside a graph over
2 GB, or in this store (taken out of the protobuf, not copied). ``save`` streams them into the
final file one tensor at a time, converted to float16 where the fp16 pass retyped the placeholder
(with onnxruntime's own value conversion, the same as its converter applies).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

DETACH_BYTES = 1024
"""Float initializers from this size leave the protobuf; smaller ones (scalars, shape constants,
norms of tiny models) stay inside, where constant folding and shape inference may read them."""
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
ALIGNMENT = 4096
"""Offsets of large tensors in the external data file: page-aligned, so runtimes can map them."""
FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX = 65504.0
"""onnxruntime's converter clamps float32 values into float16's range with these (its defaults)."""


FOLDABLE = frozenset({"Transpose", "Unsqueeze", "Squeeze", "Reshape", "Identity"})
"""Operators on weights that ``fold`` evaluates into new weights. torch's exporter would fold them
itself (``do_constant_folding``), but it keeps the module's weights and the folded copies in memory
together; the SDXL U-Net's transposed linear weights alone are 8 GB."""


@dataclass(frozen=True)
class _Source:
    data_type: int
    dims: tuple[int, ...]
    file: Path | None = None
    offset: int = 0
    length: int = 0
    data: bytes | None = None
    derived: tuple[str, onnx.NodeProto, dict[str, np.ndarray]] | None = None
    """(placeholder, node, constant inputs): this weight is ``node`` applied to another one."""


class WeightStore:
    """The values of a graph's placeholders, by initializer name."""

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def __len__(self) -> int:
        return len(self._sources)

    @classmethod
    def detach(cls, model: onnx.ModelProto, base_dir: Path) -> WeightStore:
        """Turn ``model``'s large float initializers into placeholders, in place. ``base_dir``: the
        folder the model was loaded from (``load_external_data=False``), where its external files are."""
        store = cls()
        for tensor in model.graph.initializer:
            dims = tuple(int(d) for d in tensor.dims)
            if tensor.data_location == TensorProto.EXTERNAL:  # any type: its file goes with the tracer's folder
                info = ExternalDataInfo(tensor)
                file = (base_dir / info.location).resolve()
                if base_dir.resolve() not in file.parents:
                    raise ValueError(f"{tensor.name}: external data outside {base_dir}")
                length = info.length if info.length else file.stat().st_size - (info.offset or 0)
                store._sources[tensor.name] = _Source(tensor.data_type, dims, file, info.offset or 0, length)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
            elif tensor.data_type in FLOAT_TYPES and tensor.HasField("raw_data") and len(tensor.raw_data) >= DETACH_BYTES:
                store._sources[tensor.name] = _Source(tensor.data_type, dims, data=tensor.raw_data)
                tensor.ClearField("raw_data")
        return store

    def fold(self, model: onnx.ModelProto) -> int:
        """Replace each ``FOLDABLE`` node that reads a placeholder (and small constants) by a new
        placeholder computed on save; returns how many. Placeholders nothing reads any more leave
        the graph (their values stay available to the ones derived from them).

        One pass in graph order: the nodes are topologically sorted, so a node whose operand another
        fold makes (a Reshape of a folded Transpose) comes after it. The graph's node list is
        rebuilt once: removing nodes one at a time made this quadratic, which is seconds to minutes
        on a U-Net's thousands of nodes.

        Equal weights stay one tensor, as torch's own folding keeps them: torch stores them once and
        hands the second layer an ``Identity`` of the first, whose readers are pointed at the first
        instead; and a fold that repeats an earlier one (each layer's Transpose of that one weight)
        reads the earlier placeholder. Two equal copies would double the graph's share of those
        weights and leave both layers out of the weight map (``weight_names``: found twice, not
        guessed), where run-time LoRA should refuse the shared weight by name. (Not in a graph
        with subgraphs, whose nodes may read outer names this pass does not see.)"""
        graph = model.graph
        constants = {t.name: t for t in graph.initializer}
        # torch writes small operands (Unsqueeze's axes) as Constant nodes when it does not fold
        constants.update({n.output[0]: _named(onnx.numpy_helper.to_array(n.attribute[0].t), n.output[0])
                          for n in graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                          and n.attribute[0].name == "value"})
        kept: list[onnx.NodeProto] = []
        folded = 0
        outputs = {o.name for o in graph.output}
        may_alias = not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for n in graph.node for a in n.attribute)
        same_as: dict[str, str] = {}  # a dropped node's output -> the placeholder it equals
        made: dict[tuple[object, ...], str] = {}  # a fold's operation and operands -> its placeholder
        for node in graph.node:
            for k, name in enumerate(node.input):
                if name in same_as:
                    node.input[k] = same_as[name]
            if not (node.op_type in FOLDABLE and node.input and node.input[0] in self._sources
                    and len(node.output) == 1 and all(i in constants for i in node.input[1:] if i)):
                kept.append(node)
                continue
            base = constants[node.input[0]]
            inputs = {i: numpy_helper.to_array(constants[i]) for i in node.input[1:] if i}
            if may_alias and node.output[0] not in outputs:
                key = (base.name, node.op_type, tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute)),
                       tuple((v.dtype.str, v.shape, v.tobytes()) for v in inputs.values()))
                if node.op_type == "Identity" or key in made:
                    same_as[node.output[0]] = base.name if node.op_type == "Identity" else made[key]
                    folded += 1
                    continue
                made[key] = node.output[0]
            dims = _output_dims(node, base, [constants[i] for i in inputs], model.opset_import)
            self._sources[node.output[0]] = _Source(base.data_type, dims, derived=(base.name, _copy(node), inputs))
            placeholder = graph.initializer.add()
            placeholder.name, placeholder.data_type = node.output[0], base.data_type
            placeholder.dims.extend(dims)
            constants[placeholder.name] = placeholder
            folded += 1
        if folded:
            del graph.node[:]
            graph.node.extend(kept)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        if any(t.name in self._sources and t.name not in used for t in graph.initializer):
            remaining = [t for t in graph.initializer if t.name not in self._sources or t.name in used]
            del graph.initializer[:]
            graph.initializer.extend(remaining)
        return folded

    def without_placeholders(self, model: onnx.ModelProto,
                             transform: Callable[[onnx.ModelProto], onnx.ModelProto]) -> onnx.ModelProto:
        """``transform(model)`` with the placeholders taken out of the graph, put back into the result
        where its nodes still read them. For passes that treat initializers as constants to fold
        (onnx-graphsurgeon's): without their values, weights must look like any other tensor."""
        held = {t.name: t for t in model.graph.initializer if t.name in self._sources}
        kept = [t for t in model.graph.initializer if t.name not in self._sources]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        try:
            result = transform(model)
        finally:
            model.graph.initializer.extend(held.values())
        used = {name for node in result.graph.node for name in node.input} | {o.name for o in result.graph.output}
        result.graph.initializer.extend(t for name, t in held.items() if name in used)
        return result

    def array(self, name: str) -> np.ndarray:
        """A placeholder's values as traced (read now, one tensor in memory)."""
        source = self._sources[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(source.data_type)
        if source.derived is not None:
            from onnx.reference import ReferenceEvaluator

            base, node, constants = source.derived
            step = onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(node.output[0], 0, None)])
            evaluator = ReferenceEvaluator(onnx.helper.make_model(step))
            (value,) = evaluator.run(None, {node.input[0]: self.array(base), **constants})
            return np.ascontiguousarray(value).reshape(source.dims)
        if source.data is not None:
            flat = np.frombuffer(source.data, dtype=dtype)
        else:
            assert source.file is not None
            count = source.length // dtype.itemsize
            flat = np.fromfile(source.file, dtype=dtype, count=count, offset=source.offset)
        return flat.reshape(source.dims)

    def arrays(self, model: onnx.ModelProto) -> Iterator[tuple[str, np.ndarray]]:
        """Every float initializer of ``model`` with its values, one at a time, placeholders included."""
        for tensor in model.graph.initializer:
            if tensor.name in self._sources:
                yield tensor.name, self.array(tensor.name)
            elif tensor.data_type in FLOAT_TYPES:
                yield tensor.name, numpy_helper.to_array(tensor)

    def tensor_bytes(self, tensor: TensorProto) -> bytes:
        """The bytes placeholder ``tensor`` stands for, in its current type (a float32 weight the
        fp16 pass retyped is converted here)."""
        source = self._sources[tensor.name]
        if tuple(int(d) for d in tensor.dims) != source.dims:
            raise ValueError(f"{tensor.name}: the graph now says {list(tensor.dims)}, the weights are {list(source.dims)}")
        values = self.array(tensor.name)
        if tensor.data_type == source.data_type:
            return values.tobytes()
        if (source.data_type, tensor.data_type) == (TensorProto.FLOAT, TensorProto.FLOAT16):
            return to_float16(values).tobytes()
        raise ValueError(f"{tensor.name}: no conversion from type {source.data_type} to {tensor.data_type}")

    def size(self, model: onnx.ModelProto) -> int:
        """Bytes of ``model``'s initializers once filled in (placeholders at their current type)."""
        total = 0
        for tensor in model.graph.initializer:
            if tensor.name in self._sources or not tensor.HasField("raw_data"):
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                total += itemsize * int(np.prod(tensor.dims, dtype=np.int64))
            else:
                total += len(tensor.raw_data)
        return total

    def save(self, model: onnx.ModelProto, path: Path, *, external: bool) -> list[Path]:
        """Write ``model`` with its weights: inside the file, or (``external``) in one
        ``<name>.data`` file beside it, written tensor by tensor. Leaves ``model`` a skeleton again."""
        path.parent.mkdir(parents=True, exist_ok=True)
        placeholders = [t for t in model.graph.initializer if t.name in self._sources]
        if not external:
            # One protobuf, written in pieces: the graph without its placeholders, then one
            # ``ModelProto{graph{initializer: [tensor]}}`` per weight. Protobuf merges repeated
            # fields of concatenated messages, so the file parses as the whole model, and no
            # more than one tensor is ever held filled in.
            shell = onnx.ModelProto()
            shell.CopyFrom(model)
            kept = [t for t in shell.graph.initializer if t.name not in self._sources]
            del shell.graph.initializer[:]
            shell.graph.initializer.extend(kept)
            with open(path, "wb") as handle:
                handle.write(shell.SerializeToString())
                for tensor in placeholders:
                    piece = onnx.ModelProto()
                    filled = piece.graph.initializer.add()
                    filled.CopyFrom(tensor)
                    filled.raw_data = self.tensor_bytes(tensor)
                    handle.write(piece.SerializeToString())
                    del piece, filled
            return [path]
        data = path.with_name(path.name + ".data")
        with open(data, "wb") as handle:
            for tensor in placeholders:
                payload = self.tensor_bytes(tensor)
                if len(payload) >= ALIGNMENT:
                    handle.seek(-handle.tell() % ALIGNMENT, os.SEEK_CUR)
                offset = handle.tell()
                handle.write(payload)
                _point_at(tensor, data.name, offset, len(payload))
        try:
            onnx.save_model(model, str(path))
        finally:
            for tensor in placeholders:
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
        return [path, data]


def _point_at(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` read its data from ``location`` (onnx's ``set_external_data`` insists on
    raw data in the tensor first, which is the copy this module avoids)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def to_float16(values: np.ndarray) -> np.ndarray:
    """float32 → float16 as onnxruntime's ``convert_np_to_float16`` does it (tiny magnitudes raised to
    the smallest subnormal, finite ones beyond float16's range clamped to its largest value, sign,
    zeros, infinities and NaN kept; a test holds the two equal) in fewer passes over the values:
    about twice as fast, which is minutes on the SDXL U-Net's 2.6 billion weights."""
    magnitude = np.abs(values)
    out = np.where((magnitude > 0) & (magnitude < FP16_MIN_POSITIVE), np.copysign(np.float32(FP16_MIN_POSITIVE), values),
                   values)
    np.copyto(out, np.copysign(np.float32(FP16_MAX), values), where=(magnitude > FP16_MAX) & np.isfinite(magnitude))
    return out.astype(np.float16)


def _named(values: np.ndarray, name: str) -> TensorProto:
    return numpy_helper.from_array(values, name)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copied = onnx.NodeProto()
    copied.CopyFrom(node)
    return copied


def _output_dims(node: onnx.NodeProto, base: TensorProto, constants: list[TensorProto],
                 opsets: object) -> tuple[int, ...]:
    """The dims of ``node``'s output, from onnx's shape inference on that node alone."""
    graph = onnx.helper.make_graph(
        [node], "fold", [onnx.helper.make_tensor_value_info(base.name, base.data_type, list(base.dims))],
        [onnx.helper.make_tensor_value_info(node.output[0], base.data_type, None)], initializer=constants)
    model = onnx.helper.make_model(graph, opset_imports=list(opsets))  # type: ignore[call-overload]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    if any(d < 0 for d in dims) or not inferred.graph.output[0].type.tensor_type.HasField("shape"):
        raise ValueError(f"{node.name}: cannot tell the shape of {node.op_type}({base.name})")
    return tuple(dims)

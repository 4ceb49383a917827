"""ONNX graph passes after tracing: cleanup, constant folding, shape inference, fp16, saving, checking.

onnx-graphsurgeon does the cleanup and folding; onnxruntime's transformer tools do the fp16
conversion (keeping float32 I/O so callers never cast) and the topological sort after it; onnx
saves large models with their weights in one external file, because a protobuf cannot exceed 2 GB,
and its checker proves every saved graph valid.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import onnx

from sdexport.errors import SdexportError, one_line

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_SUFFIX = ".data"


def model_size(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, whether stored inline or not yet."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * max(1, math.prod(tensor.dims))
    return total


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove dead nodes, fold constant subgraphs and sort, as TensorRT's parser prefers."""
    import onnx_graphsurgeon as gs
    import onnxruntime

    from sdexport.console import VERBOSE, onnxruntime_logging, verbosity

    # onnx-graphsurgeon logs through a logger of its own, which ``console.quiet_libraries`` does not
    # reach: its warnings (folding skipped, a node it cannot evaluate) show with ``-v`` only.
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.INFO if verbosity() >= VERBOSE else gs.logger.G_LOGGER.ERROR
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    # Folding evaluates constant subgraphs with onnxruntime; big weights stay as they are.
    onnxruntime_logging(onnxruntime)  # its session logs at our verbosity, not ONNX Runtime's
    graph.fold_constants(size_threshold=64 * 1024**2).cleanup()
    cleaned = gs.export_onnx(graph)
    cleaned.opset_import.clear()
    cleaned.opset_import.extend(model.opset_import)
    cleaned.ir_version = model.ir_version
    return cleaned


FP32_BOUNDARY_OPS = frozenset({"MatMul", "Gemm", "Conv"})
"""Where the float32 part that follows a ``keep_fp32`` input ends: the first layer with weights."""


def fp32_cone(model: onnx.ModelProto, inputs: Iterable[str]) -> list[str]:
    """Names of the nodes computing on ``inputs`` up to (not including) the first MatMul/Gemm/Conv.

    For the timestep this is the sinusoidal projection (``time_proj``: Mul, Sin, Cos, Concat). fp16
    holds t near 1000 only to 0.5 (979.6 becomes 979.5) and ``t * freq`` no better, so sin and cos of
    it would be far off. diffusers computes the projection in float32 (``timesteps.float()``) and casts
    only the embedding to the model's dtype; an export that converted it would be less accurate than
    the eager fp16 baseline it is measured against. The cone also ends at diffusers' cast before a
    node that meets a float tensor computed from other inputs: a latent consistency model adds its
    ``timestep_cond`` projection to the cast embedding before the first layer, and that Add kept in
    float32 against an fp16 operand made every fp16 LCM export fail the checker (an audit's find).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inputs = list(inputs)
    if not inputs:
        return []
    reached, following = set(inputs), list(inputs)  # every tensor computed from the inputs, through any node
    while following:
        for node in consumers.get(following.pop(), []):
            fresh = [name for name in node.output if name not in reached]
            reached.update(fresh)
            following.extend(fresh)
    floats = _float_tensors(model)
    computed = {o for n in model.graph.node if n.op_type != "Constant" for o in n.output} & floats
    computed |= {v.name for v in model.graph.input} & floats

    def meets_others(node: onnx.NodeProto) -> bool:
        """``node`` also reads a tensor computed from other inputs (a latent consistency model's
        ``timestep_cond`` projection added to the timestep embedding): it computes in the model's dtype."""
        return any(name in computed and name not in reached for name in node.input if name)

    def hands_over(node: onnx.NodeProto) -> bool:
        """The cast to the model's dtype right before the weighted layer (diffusers'
        ``.to(dtype)``), or before a node that meets the model's other tensors: converted with the
        rest, it becomes the fp32 → fp16 boundary. (Kept in float32, the converter types the
        layer's input wrong and the graph fails the checker.)"""
        return node.op_type == "Cast" and any(
            c.op_type in FP32_BOUNDARY_OPS or meets_others(c) for out in node.output for c in consumers.get(out, [])
        )

    kept: dict[str, None] = {}
    pending = list(inputs)
    while pending:
        for node in consumers.get(pending.pop(), []):
            if node.op_type in FP32_BOUNDARY_OPS or node.name in kept or hands_over(node):
                continue
            kept[node.name] = None
            pending.extend(node.output)
    return list(kept)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of ``model``, from onnx's type inference on a weightless copy
    (initializers declared as typed inputs: a graph over 2 GB cannot be inferred whole)."""
    probe = onnx.ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.graph.node.extend(model.graph.node)
    probe.graph.input.extend(model.graph.input)
    probe.graph.output.extend(model.graph.output)
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    typed = onnx.shape_inference.infer_shapes(probe)
    return {v.name for v in [*typed.graph.value_info, *typed.graph.input]
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """fp16 weights and activations; inputs and outputs stay float32 (cast at the graph edges), and
    so does the computation on the ``keep_fp32`` inputs up to their first weighted layer (``fp32_cone``).

    The converter appends the casts it adds for inputs at the end of the node list, which leaves
    the graph unsorted: invalid ONNX (``onnx.checker`` full check), and TensorRT's parser requires
    sorted graphs. onnxruntime's own sort puts them back in order.
    """
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from sdexport.export.weight_store import FP16_MAX, FP16_MIN_POSITIVE

    blocked = fp32_cone(model, keep_fp32)
    real = float16.make_value_info_from_tensor
    # The converter types each initializer it converts from its values' shape; a placeholder
    # (export.weight_store) has its dims and no values. The converter then retypes it as float16,
    # which is all WeightStore.save needs to convert its values the same way.
    float16.make_value_info_from_tensor = _value_info_from_dims  # type: ignore[assignment]
    try:
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True, node_block_list=blocked or None,
            min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,
        )
    finally:
        float16.make_value_info_from_tensor = real
    skip_edge_round_trip(converted, list(keep_fp32))
    OnnxModel.graph_topological_sort(converted.graph, is_deterministic=True)
    return converted


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def skip_edge_round_trip(model: onnx.ModelProto, inputs: list[str]) -> None:
    """The converter casts every float input to fp16 at the graph's edge, then back to float32 for
    the nodes it keeps in float32: the timestep would be rounded to fp16 (979.6 to 979.5) on its way
    into the float32 projection. Those nodes read the float32 input itself instead."""
    graph = model.graph
    edge = {n.input[0]: n for n in graph.node if n.op_type == "Cast" and n.input and n.input[0] in inputs
            and CONVERTER_CASTS.search(n.name)}
    dropped: set[str] = set()
    for name, to_fp16 in edge.items():
        back = [n for n in graph.node if n.op_type == "Cast" and to_fp16.output[0] in n.input
                and CASTS_BACK.search(n.name)]
        for cast in back:
            for node in graph.node:
                for i, value in enumerate(node.input):
                    if value == cast.output[0]:
                        node.input[i] = name
            dropped.add(cast.name)
        if not any(to_fp16.output[0] in n.input for n in graph.node if n.name not in dropped):
            dropped.add(to_fp16.name)
    kept = [n for n in graph.node if n.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


CONVERTER_CASTS = re.compile(r"^graph_(input|output)_cast\d+$|_cast_to_\w+_node$|_(input|output)_cast\d+$")
"""Names onnxruntime's float16 converter gives the casts it inserts (at the graph's float32 edges
and around nodes it keeps in float32: ``<tensor>_cast_to_fp32_node`` since 1.20 or so,
``<node>_input_cast<i>`` before); the exporter's own casts are named after the module path."""

CASTS_BACK = re.compile(r"_cast_to_fp32_node$|_input_cast\d+$")
"""The converter's casts back to float32 in front of a node it keeps in float32."""


def to_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo ``to_fp16`` in place: float32 weights holding the fp16 values, casts to fp16 made casts to
    float32, and the converter's casts (now float32 to float32) removed.

    onnxruntime's fusions match fp32 graphs only (their BiasAdd and GroupNorm matchers read weights
    as float32, and the converter's casts sit inside the patterns), so ``sdexport build --target
    onnxruntime-cuda`` widens an fp16 export first. Widening is exact, and converting the fused graph
    to fp16 again rounds every weight back to the very value the export had.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    graph = model.graph

    def widen(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    for tensor in graph.initializer:
        widen(tensor)
    for value in (*graph.input, *graph.output):  # float16 I/O: optimum's fp16 exports (sdexport adopt)
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
    del graph.value_info[:]  # fp16 types; shape inference gives them again
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if node.op_type != "Cast" or not CONVERTER_CASTS.search(node.name):
            kept.append(node)
            continue
        source, target = node.input[0], node.output[0]
        old, new = (source, target) if target in outputs else (target, source)
        for other in graph.node:  # rename, so the graph's own output names stay as they were
            for i, name in enumerate(other.input):
                if name == old:
                    other.input[i] = new
            for i, name in enumerate(other.output):
                if name == old:
                    other.output[i] = new
    del graph.node[:]
    graph.node.extend(kept)
    return model


def check(path: Path) -> None:
    """Run onnx's full check (structure, types, sorted nodes, strict shape inference) on a saved
    graph, from its file so that external weights are checked too. An invalid graph is an export
    bug; it must never reach TensorRT, whose parser reports far less clearly."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SdexportError(
            f"{path}: the exported graph is not valid ONNX ({one_line(exc, 300)}); nothing was "
            "kept. Please report this with the model and options"
        ) from None


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return model_size(model) < PROTOBUF_LIMIT - 64 * 1024**2


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Annotate intermediate shapes. A protobuf over 2 GB cannot be passed to onnx's inference and
    is left as it is (TensorRT and ONNX Runtime infer shapes anyway); an export's skeleton graph
    (``export.weight_store``) always fits, whatever the model's size."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
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


VIEWS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
"""Operators whose output shares its first input's memory, in PyTorch (a view) and in ONNX Runtime
(the kernels declare the alias)."""


class LiveBytes(NamedTuple):
    peak: int
    """Most bytes of computed tensors alive at once."""
    outputs: int
    """Bytes of the graph's outputs (counted in ``peak`` too: ONNX Runtime's Python API then copies them)."""


def peak_live_bytes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                    weights: Iterable[str] = ()) -> LiveBytes | None:
    """Most bytes of computed tensors alive at once when ``model`` runs its nodes in the graph's
    order with inputs of ``shapes``; None when shape inference cannot tell, or sizes none.

    A tensor lives from the node that makes it to the last node that reads it (a graph output to
    the end; a tensor a subgraph reads, to the node that holds the subgraph), and a node's inputs
    and outputs are alive together: how PyTorch's eager modules and ONNX Runtime's allocation
    planner hold them. A view (``VIEWS``) adds nothing and keeps its source alive, unless it is a
    graph output (ONNX Runtime gives those a buffer of their own). The graph's
    inputs and weights are not counted: they are in memory before it runs. Tensors whose size
    inference leaves symbolic (a data-dependent shape) count as empty, and tensors made inside
    subgraphs are not looked into.

    ``weights``: initializers without values (``export.weight_store`` placeholders). They are
    declared inputs of a copy of the graph here, so inference knows their shapes and never tries
    to read their values (it reads every input of Add or Mul in case it is shape arithmetic).
    """
    inferred = _inferred_at(model, shapes, set(weights))
    if inferred is None:
        return None
    size = {v.name: _bytes(v) for v in [*inferred.graph.value_info, *inferred.graph.output]}
    nodes = inferred.graph.node
    outputs = {value.name for value in inferred.graph.output}
    memory: dict[str, str] = {}  # tensor -> the tensor whose memory it is (itself, or a view's source)
    reads = [[*node.input, *_read_by_subgraphs(node)] for node in nodes]
    last_read: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.op_type in VIEWS and node.input and node.input[0] and node.output[0] not in outputs:
            memory[node.output[0]] = memory.get(node.input[0], node.input[0])
        for name in [*reads[i], *node.output]:  # in node order: the last index written is the last reader
            last_read[memory.get(name, name)] = i
    for name in outputs:
        last_read[memory.get(name, name)] = len(nodes)
    live = peak = 0
    for i, node in enumerate(nodes):
        made = [name for name in dict.fromkeys(node.output) if name in size and name not in memory]
        live += sum(size[name] for name in made)
        peak = max(peak, live)
        touched = dict.fromkeys(memory.get(name, name) for name in [*reads[i], *node.output])
        live -= sum(size[name] for name in touched if name in size and last_read[name] <= i)
    return LiveBytes(peak, sum(size.get(name, 0) for name in outputs)) if peak else None


def _read_by_subgraphs(node: onnx.NodeProto) -> list[str]:
    """Names the subgraphs of ``node`` (If, Loop, Scan) read or give back as their outputs, their
    own tensors among them."""
    names: list[str] = []
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            names += [value.name for value in body.output]
            for inner in body.node:
                names += [*inner.input, *_read_by_subgraphs(inner)]
    return names


def _inferred_at(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], held: set[str]) -> onnx.ModelProto | None:
    """A copy of ``model`` with its inputs fixed to ``shapes`` and every tensor's shape inferred by
    onnxruntime's symbolic shape inference (initializers in ``held`` declared inputs); None when
    inference fails or is incomplete."""
    probe = onnx.ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.graph.node.extend(model.graph.node)
    probe.graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if tensor.name in held:
            probe.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            probe.graph.initializer.append(tensor)
    for value in model.graph.input:
        fixed = onnx.helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type,
                                                   list(shapes.get(value.name, ())))
        probe.graph.input.append(fixed)
    try:
        return symbolic_shapes(probe, auto_merge=False)
    except Exception:  # an operator's inference may raise anything
        return None


def _bytes(value: onnx.ValueInfoProto) -> int:
    """Bytes of a tensor whose every dim is known; 0 otherwise (symbolic, or no type)."""
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor_type.shape.dim]
    if tensor_type.elem_type == onnx.TensorProto.UNDEFINED or not all(dims):
        return 0
    return onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize * math.prod(dims)


def symbolic_shapes(model: onnx.ModelProto, *, auto_merge: bool) -> onnx.ModelProto | None:
    """``model`` with the shapes and types onnxruntime's symbolic shape inference finds; None where
    it cannot find them all.

    Not ``SymbolicShapeInference.infer_shapes``: where inference is incomplete, that first saves the
    half-inferred model as ``sym_shape_infer_temp.onnx`` (and a data file) in the current directory,
    which an export would leave in the user's folder, or write over a file of theirs of that name.
    These are infer_shapes' own steps, with its defaults, without the save (onnxruntime's
    transformers optimizer drives the same methods in its ``SymbolicShapeInferenceHelper``)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_opset

    if (get_opset(model) or 0) < 7:  # what infer_shapes refuses too
        return None
    inference = SymbolicShapeInference(2**31 - 1, auto_merge, False, 0)
    complete = False
    with _quiet_logging():
        inference._preprocess(model)
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


class _quiet_logging:
    """onnxruntime's symbolic shape inference logs warnings through the root logger."""

    def __enter__(self) -> None:
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.root.setLevel(self.level)

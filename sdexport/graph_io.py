"""A graph's real inputs and outputs held against its ComponentSpec: what may differ, and the bridge.

sdexport's own graphs take int32 token ids, a scalar float32 timestep and float32 tensors (also in
fp16 exports). Graphs from other exporters differ in ways that change no values: optimum's take
int64 token ids, its fp16 exports take and return float16, and older exports (optimum's before
1.14, ONNX Runtime's SD tool) take the timestep as a one-element vector. Those
differences are bridged (a cast or a reshape at the engine's edge, ``GraphIO``); anything else —
another name, another rank, an integer where a float belongs — is refused when the engine loads,
in one line naming the tensor, not as an ONNX Runtime error in the middle of the denoising loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdexport.errors import EngineDirError
from sdexport.specs import ComponentSpec, TensorSpec

if TYPE_CHECKING:
    import torch

ACCEPTED_DTYPES = {"int32": ("int32", "int64"), "float": ("float32", "float16"), "float32": ("float32", "float16")}
"""Per spec dtype: the graph dtypes an engine bridges (the first is sdexport's own)."""

_ONNX_TYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 11: "float64", 16: "bfloat16", 9: "bool"}
"""``onnx.TensorProto`` element types by number (the names the rest of this module uses)."""


@dataclass(frozen=True)
class GraphTensor:
    """One input or output as a graph declares it."""

    name: str
    dtype: str
    """``float32``, ``float16``, ``int32``, ``int64``, ... (numpy's names)."""
    rank: int
    sizes: tuple[int | None, ...] = ()
    """The fixed size of each axis where the graph has one (None: a named or unknown one); empty
    where the source does not say."""


@dataclass(frozen=True)
class GraphIO:
    """How an engine feeds one graph and reads it back, when its I/O is not quite the spec's."""

    inputs: dict[str, GraphTensor]
    """The graph's inputs (each of the spec's: ``check_io``), as the graph types them, by name."""
    outputs: dict[str, GraphTensor] = field(default_factory=dict)
    scalars: frozenset[str] = frozenset()
    """The spec's scalar inputs."""

    @property
    def bridged(self) -> list[str]:
        """The tensors that are cast or reshaped at the edge, as ``name (dtype[rank])``: empty for
        sdexport's own graphs."""
        return [f"{t.name} ({t.dtype}, rank {t.rank})" for t in (*self.inputs.values(), *self.outputs.values())
                if t.dtype not in ("float32", "int32") or t.name in self.reshaped]

    @property
    def reshaped(self) -> set[str]:
        """Inputs the spec declares as scalars and the graph takes as one-element vectors."""
        return {n for n, t in self.inputs.items() if t.rank == 1 and n in self.scalars}

    def torch_dtype(self, name: str) -> torch.dtype:
        """The dtype the graph takes or returns for tensor ``name``."""
        import torch

        tensor = self.inputs.get(name) or self.outputs[name]
        return getattr(torch, tensor.dtype)

    def to_graph(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A spec-shaped input as the graph takes it (same values; a no-op for our own graphs)."""
        if name in self.reshaped and tensor.dim() == 0:
            tensor = tensor.reshape(1)
        dtype = self.torch_dtype(name)
        return tensor if tensor.dtype == dtype else tensor.to(dtype)

    def numpy_feed(self, feed: dict[str, Any]) -> dict[str, Any]:
        """A spec-shaped numpy feed (``export.inputs.sample_inputs``) as the graph takes it, limited
        to the inputs the graph has."""
        import torch

        return {n: self.to_graph(n, torch.from_numpy(v)).numpy() for n, v in feed.items() if n in self.inputs}

    def from_graph(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An output as the spec returns it: float32."""
        import torch

        return tensor.float() if tensor.dtype != torch.float32 else tensor

    def shape(self, name: str, spec_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The graph's shape for a tensor whose spec shape is ``spec_shape`` (a vector timestep: (1,))."""
        return (1,) if name in self.reshaped else spec_shape


def check_io(spec: ComponentSpec, inputs: list[GraphTensor], outputs: list[GraphTensor], where: str,
             sizes: dict[str, int] | None = None) -> GraphIO:
    """The graph's I/O against ``spec`` (resolved for its model): the bridge, or EngineDirError naming
    the first tensor no engine can feed or read. ``sizes`` (the manifest's, ``ModelDims.sizes``):
    each fixed size the graph declares is also the one they give (a hand-edited manifest's dims
    would otherwise fail as an ONNX Runtime error in the loop)."""
    names, returned = [t.name for t in inputs], [t.name for t in outputs]
    if not set(names) <= set(spec.input_names) or set(returned) != set(spec.output_names):
        raise EngineDirError(
            f"{where} takes {names} and returns {returned}, but a {spec.name} graph takes {spec.input_names} "
            f"and returns {spec.output_names}; re-export"
        )
    # Every input the spec has is one the model reads (an SDXL U-Net's pooled text embedding and time
    # ids, an LCM's guidance embedding, ControlNet residuals, adapter features): a graph without one
    # was made for another model, and the loop would run it with that conditioning dropped unsaid.
    missing = [name for name in spec.input_names if name not in names]
    if missing:
        raise EngineDirError(f"{where} takes no {missing[0]}, which its model's configs call for (an SDXL "
                             "U-Net's pooled text embedding or time ids, a latent consistency model's guidance "
                             "embedding, a ControlNet's residuals or an adapter's features): it is not a graph "
                             "of that model, and would ignore that input unsaid")
    for tensor in (*inputs, *outputs):
        _check_tensor(spec, spec.tensor(tensor.name), tensor, where)
        if sizes is not None:
            _check_sizes(spec.tensor(tensor.name), tensor, sizes, where)
    scalars = frozenset(t.name for t in spec.inputs if not t.dims)
    return GraphIO({t.name: t for t in inputs}, {t.name: t for t in outputs}, scalars)


def _check_tensor(spec: ComponentSpec, declared: TensorSpec, found: GraphTensor, where: str) -> None:
    accepted = ACCEPTED_DTYPES[declared.dtype]
    if found.dtype not in accepted:
        raise EngineDirError(
            f"{where}: {found.name} is {found.dtype}, but a {spec.name} graph's {found.name} is "
            f"{' or '.join(accepted)}; this is not a {spec.name} graph sdexport can run"
        )
    rank = len(declared.dims)
    if found.rank != rank and not (rank == 0 and found.rank == 1):
        raise EngineDirError(
            f"{where}: {found.name} has {found.rank} dimensions, a {spec.name} graph's has {rank} "
            f"({', '.join(declared.dims) or 'a scalar'}); this is not a {spec.name} graph sdexport can run"
        )


def _check_sizes(declared: TensorSpec, found: GraphTensor, sizes: dict[str, int], where: str) -> None:
    from sdexport.specs import is_dynamic, resolve_dim

    for symbol, size in zip(declared.dims, found.sizes):  # _check_tensor checked the ranks
        if size is None or is_dynamic(symbol):
            continue
        if size != resolve_dim(symbol, sizes):
            raise EngineDirError(
                f"{where}: {found.name} has size {size} where the manifest's dims give {symbol} = "
                f"{resolve_dim(symbol, sizes)}; the manifest does not describe this graph"
            )


def onnx_tensors(values: Any) -> list[GraphTensor]:
    """``GraphTensor``s of ONNX ``ValueInfoProto``s (a graph's inputs or outputs)."""
    found = []
    for value in values:
        kind = value.type.tensor_type
        found.append(GraphTensor(value.name, _ONNX_TYPES.get(kind.elem_type, f"onnx type {kind.elem_type}"),
                                 len(kind.shape.dim),
                                 tuple(d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim)))
    return found


_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


def onnxruntime_tensors(args: Any) -> list[GraphTensor]:
    """``GraphTensor``s of an InferenceSession's ``get_inputs()``/``get_outputs()`` (types such as
    ``tensor(float16)``)."""
    return [GraphTensor(a.name, _ORT_TYPES.get(a.type, str(a.type).removeprefix("tensor(").removesuffix(")")),
                        len(a.shape), tuple(d if isinstance(d, int) else None for d in a.shape)) for a in args]


def graph_precision(graph: Any) -> str:
    """"fp16" or "fp32": what most of an ``onnx.GraphProto``'s float weights are (the proto says so
    without its external data loaded); a graph without float weights, by its inputs and outputs."""
    counts = {1: 0, 10: 0}  # TensorProto.FLOAT, FLOAT16: elements of each
    for init in graph.initializer:
        if init.data_type in counts:
            counts[init.data_type] += math.prod(init.dims)
    if any(counts.values()):
        return "fp16" if counts[10] > counts[1] else "fp32"
    edges = {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    return "fp16" if 10 in edges else "fp32"

"""TensorRT backend: run the plans ``sdexport build`` wrote, on CUDA torch tensors.

Each component is one ``TensorRTEngine``: a deserialized plan and one execution context, with
named I/O bound to torch device pointers and ``execute_async_v3`` on a single torch CUDA stream.
What keeps it lean in memory and launch overhead:

* one activation block (``SharedDeviceMemory``) for all components, sized by the largest: the
  pipeline runs them one after another on the same stream, so they can never overlap;
* input and output buffers allocated once at the profile's maximum shape, 256-byte aligned and
  bound once (every ``set_tensor_address`` checked); inputs are copied in, outputs returned as views
  of the call's actual shape (valid until the same engine's next call: clone what you keep);
* optional CUDA graphs, one per set of input shapes: the first call with new shapes runs normally
  and captures, later calls replay. Static engines capture at load, so no timed call ever captures.

Input shapes are checked against the plan's own optimization profile before anything runs, so an
out-of-range request fails with the allowed range instead of a TensorRT error. TensorRT is imported
inside functions: importing this module works without it (``require_tensorrt`` says what to install).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.markup import escape

from sdexport.build import tensorrt_build
from sdexport.errors import EngineDirError, EngineRunError, ProfileError, SdexportError, pasteable
from sdexport.graph_io import GraphTensor, check_io
from sdexport.manifest import Manifest, check_files
from sdexport.runtime.engine import check_feed, check_outputs
from sdexport.runtime.plan_choice import entry_profile, plans_here
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims

if TYPE_CHECKING:
    import tensorrt as trt

Shape = tuple[int, ...]


def _torch_dtype(dtype: trt.DataType, tensor: str, where: str) -> torch.dtype:
    """The torch dtype of a plan's I/O tensor, or EngineDirError naming the plan and the tensor
    (an FP8 or INT4 I/O plan is no graph sdexport made or adopts)."""
    import tensorrt as trt

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.int8: torch.int8,
        trt.uint8: torch.uint8,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise EngineDirError(f"{where}: {tensor} is TensorRT's {dtype}, which sdexport cannot feed or read; "
                             f"this is not a plan of a graph sdexport made or adopts")
    return table[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dims(dims: trt.Dims) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


class _Logs:
    """The runtime's TensorRT logger and runtime, one each per process. TensorRT reports what the
    runtime, its engines and contexts, and a refitter made with this logger do to it (since 8.2 each
    Runtime, Builder and Refitter has its own; the builds' go to polygraphy's).

    The logger records the last error, not prints it, so that each refusal says TensorRT's reason in
    its own one line (``_reason``): per thread (TensorRT logs on the calling thread), so that one
    pipeline per thread (README) never takes another's reason. The runtime lives as long as the
    process, hence longer than every engine it deserializes.
    """

    logger: Any = None
    runtime: Any = None
    said = threading.local()
    """``error``: the first line of the last error TensorRT reported on this thread."""


def _runtime() -> trt.Runtime:
    tensorrt_build.require_tensorrt()
    import tensorrt as trt

    if _Logs.runtime is None:

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)  # (as NVIDIA's samples: pybind11 wants the base's init)

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    _Logs.said.error = (msg.strip().splitlines() or [""])[0]
                elif severity == trt.ILogger.Severity.WARNING:
                    from rich.markup import escape

                    from sdexport.console import console

                    console.print(f"[yellow]TensorRT:[/] {escape(msg)}", soft_wrap=True)

        _Logs.logger = Logger()
        _Logs.runtime = trt.Runtime(_Logs.logger)
    return _Logs.runtime


def _forget() -> None:
    """Forget what TensorRT reported before the checked call that follows (an unchecked call's error,
    or one a caller handled), so that its refusal's ``_reason`` is its own."""
    _Logs.said.error = ""


def _last_error(default: str = "") -> str:
    """The first line of the last error TensorRT reported to the runtime's logger since ``_forget``,
    which it then forgets too, else ``default``."""
    said = getattr(_Logs.said, "error", "")
    _Logs.said.error = ""
    return said or default


def _reason(default: str = "") -> str:
    """`` (why)``, from ``_last_error``; nothing where TensorRT said nothing and there is no default."""
    why = _last_error(default)
    return f" ({why})" if why else ""


def deserialize_plan(path: Path, runtime: trt.Runtime | None = None) -> trt.ICudaEngine:
    """Read and deserialize one plan, refusing an unreadable, damaged or foreign-version file.

    TensorRT plans only load in the TensorRT version that built them, on the GPU architecture they
    were built for; anything else comes back as None from TensorRT, which is turned into one line.
    """
    runtime = runtime if runtime is not None else _runtime()
    import tensorrt as trt

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EngineDirError(f"{path}: cannot read the TensorRT plan ({exc.strerror})") from None
    _forget()
    engine = runtime.deserialize_cuda_engine(data) if data else None
    if engine is None:
        raise EngineDirError(
            f"{path}: TensorRT {trt.__version__} cannot load this plan{_reason('empty or unrecognized file')}; "
            "it is damaged or was "
            f"built by another TensorRT version or GPU: rebuild it with `sdexport build {pasteable(path.parent.parent)} --force`"
        )
    return engine


ALIGNMENT = 256
"""Bytes: TensorRT requires every tensor address to be 256-byte aligned (``setTensorAddress``)."""

MAX_GRAPHS = 8
"""CUDA graphs kept per engine (one per set of input shapes; the oldest goes first)."""


def aligned_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed 1-D buffer whose first element is ``ALIGNMENT``-aligned, whatever the allocator does.

    A view into someone else's tensor (``timesteps[i]``) can start anywhere; TensorRT needs 256 bytes.
    The allocation is padded by one alignment unit and the view starts at the first aligned byte.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    pad = ALIGNMENT // itemsize
    raw = torch.zeros(max(numel, 1) + pad, dtype=dtype, device=device)
    offset = (-raw.data_ptr() % ALIGNMENT) // itemsize
    return raw[offset : offset + max(numel, 1)]


class SharedDeviceMemory:
    """One activation block and one CUDA stream shared by every engine of a pipeline.

    TensorRT contexts created with user-managed memory get their scratch space here. Sharing is safe
    because all engines run on ``stream``, one after another; it saves the sum-minus-max of their
    activation sizes (gigabytes for SDXL). The block grows when a larger engine is bound; engines
    already bound are re-pointed and drop their CUDA graphs. Engines are held weakly, so the block
    never keeps an engine alive; ``close()`` (or dropping the last engine and this object) frees it.
    """

    def __init__(self, device: torch.device | None = None, stream: torch.cuda.Stream | None = None) -> None:
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
        self._buffer: torch.Tensor | None = None
        self._engines: weakref.WeakSet[TensorRTEngine] = weakref.WeakSet()

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def address(self) -> int:
        assert self._buffer is not None
        return int(self._buffer.data_ptr())

    def reserve(self, nbytes: int) -> None:
        """Make the block at least ``nbytes`` large (call once with the max over engines to avoid regrowth)."""
        if nbytes <= self.nbytes:
            return
        self.stream.synchronize()  # nothing may still be running in the old block
        self._buffer = None
        self._buffer = aligned_empty(nbytes, torch.uint8, self.device)
        for engine in list(self._engines):
            engine._memory_moved()

    def bind(self, engine: TensorRTEngine, nbytes: int) -> None:
        """Give ``engine`` (its context) the shared block, growing it to ``nbytes`` first if needed."""
        self.reserve(max(nbytes, 1))
        self._engines.add(engine)
        engine._memory_moved()

    def unbind(self, engine: TensorRTEngine) -> None:
        """``engine`` is closed; the block is freed with the last engine bound to it."""
        self._engines.discard(engine)
        if not self._engines:
            self.close()

    def close(self) -> None:
        """Free the block once the stream is idle (engines still bound must not run afterwards)."""
        if self._buffer is not None:
            self.stream.synchronize()
            self._buffer = None


class _Graph:
    """One captured CUDA graph and the execution context it was captured on (and must replay with)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, context: trt.IExecutionContext) -> None:
        self.graph: torch.cuda.CUDAGraph | None = graph
        self.context: trt.IExecutionContext | None = context

    def replay(self) -> None:
        assert self.graph is not None
        self.graph.replay()

    def release(self) -> None:
        """The graph first, then its context."""
        self.graph = None
        self.context = None


class TensorRTEngine:
    """One component's TensorRT plan behind the Engine protocol (named CUDA torch tensors in and out).

    Every input and output has a buffer of its own, allocated once at the profile's largest shape and
    256-byte aligned, bound to the context once (each binding checked). A call copies its inputs into
    those buffers on the caller's stream, so a caller's tensor may be a view at any offset and may be
    freed as soon as the call returns. Release device memory with ``close()`` or ``with``.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        engine: trt.ICudaEngine,
        *,
        profile: ShapeProfile,
        memory: SharedDeviceMemory | None = None,
        cuda_graph: bool = False,
        source: Path | None = None,
        dims: ModelDims | None = None,
    ) -> None:
        """Wrap a deserialized engine; ``memory`` shares activations and the stream with other engines.
        ``dims``: the model's, to hold each call's outputs to the sizes the spec gives them."""
        tensorrt_build.require_tensorrt()
        import tensorrt as trt

        self.spec = spec
        self.profile = profile
        self.memory = memory if memory is not None else SharedDeviceMemory()
        self.device = self.memory.device
        self.cuda_graph = cuda_graph
        self.source = source
        self.dims = dims
        self.engine = engine
        self.closed = False
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n), n, f"{source or spec.name}") for n in names}
        self.ranges: dict[str, tuple[Shape, Shape, Shape]] = {}
        for name in self.input_names:
            declared = _dims(engine.get_tensor_shape(name))
            if -1 in declared:
                lo, opt, hi = (_dims(d) for d in engine.get_tensor_profile_shape(name, 0))
                self.ranges[name] = (lo, opt, hi)
            else:  # a static input (the scalar timestep) is in no profile
                self.ranges[name] = (declared, declared, declared)
        # Names, dtypes and ranks against the spec, at load; an adopted optimum graph's int64 ids
        # and float16 I/O are bridged at the edge (graph_io).
        self.io = check_io(
            spec,
            [GraphTensor(n, _dtype_name(self.dtypes[n]), len(self.ranges[n][0])) for n in self.input_names],
            [GraphTensor(n, _dtype_name(self.dtypes[n]), len(_dims(engine.get_tensor_shape(n))))
             for n in self.output_names],
            f"{source or spec.name}",
        )

        self.context = self._create_context()
        self._graphs: OrderedDict[tuple[Shape, ...], _Graph] = OrderedDict()
        self._output_shapes: dict[tuple[Shape, ...], dict[str, Shape]] = {}
        self._bound_shapes: tuple[Shape, ...] | None = None
        self.memory.bind(self, engine.device_memory_size_v2)

        # Inputs and outputs: one buffer each at the largest shape the profile allows, bound once.
        self.inputs = {
            name: aligned_empty(_numel(self.ranges[name][2]), self.dtypes[name], self.device)
            for name in self.input_names
        }
        _forget()
        for name in self.input_names:
            if not self.context.set_input_shape(name, self.ranges[name][2]):
                raise EngineDirError(f"{source or spec.name}: TensorRT refused the profile's largest {name} shape"
                                     f"{_reason()}")
        self.outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            numel = _numel(_dims(self.context.get_tensor_shape(name)))
            self.outputs[name] = aligned_empty(numel, self.dtypes[name], self.device)
        self._bind_all(self.context)

    @classmethod
    def load(
        cls,
        spec: ComponentSpec,
        plan: Path,
        *,
        profile: ShapeProfile,
        memory: SharedDeviceMemory | None = None,
        cuda_graph: bool = False,
    ) -> TensorRTEngine:
        """Deserialize ``plan`` and wrap it (for one engine; ``load_tensorrt_engines`` for a pipeline)."""
        return cls(spec, deserialize_plan(plan), profile=profile, memory=memory, cuda_graph=cuda_graph, source=plan)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the CUDA graphs, the contexts and the engine (in that order) and free the buffers.

        Idempotent. The shared activation block is freed with the last engine bound to it."""
        if self.closed:
            return
        self.closed = True
        self.memory.stream.synchronize()  # nothing of ours may still be running
        self.memory.unbind(self)
        self._drop_graphs()
        del self.context  # TensorRT needs the contexts destroyed before their engine
        del self.engine
        self.inputs.clear()
        self.outputs.clear()

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _memory_moved(self) -> None:
        """The shared block was (re)allocated: point the context at it; captured graphs are stale."""
        if self.closed:
            return
        self.context.set_device_memory(self.memory.address, self.memory.nbytes)
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        """Free every captured graph and its context, once the stream's work is done: a replay still
        queued reads its context's state."""
        self.memory.stream.synchronize()
        while self._graphs:
            _, entry = self._graphs.popitem(last=False)
            entry.release()

    def _create_context(self) -> trt.IExecutionContext:
        import tensorrt as trt

        _forget()
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineDirError(f"{self.source or self.spec.name}: TensorRT could not create an execution context"
                                 f"{_reason()}")
        return context

    def _bind_all(self, context: trt.IExecutionContext) -> None:
        """Bind every input and output buffer to ``context``, checking each address and binding."""
        _forget()
        for name, buffer in (*self.inputs.items(), *self.outputs.items()):
            address = int(buffer.data_ptr())
            if address % ALIGNMENT:
                raise EngineDirError(f"{self.spec.name}.{name}: buffer at {address:#x} is not {ALIGNMENT}-byte aligned")
            if not context.set_tensor_address(name, address):
                raise EngineDirError(
                    f"{self.source or self.spec.name}: TensorRT refused the address of {name!r} "
                    f"{_reason('not an input or output of this plan')}"
                )

    # ------------------------------------------------------------------------------------------

    def check_shapes(self, shapes: dict[str, Shape]) -> None:
        """Raise ProfileError, naming the axis and its allowed range, for a shape the plan cannot run."""
        for name, shape in shapes.items():
            lo, _, hi = self.ranges[name]
            symbols = self.spec.tensor(name).dims
            if len(shape) != len(lo):
                raise ProfileError(
                    f"{self.spec.name}.{name}: expected {len(lo)} dimensions ({', '.join(symbols)}), "
                    f"got shape {list(shape)}"
                )
            for axis, (value, low, high) in enumerate(zip(shape, lo, hi)):
                if not low <= value <= high:
                    symbol = symbols[axis] if axis < len(symbols) else str(axis)
                    allowed = f"{low}" if low == high else f"in [{low}, {high}]"
                    wider = "--prompt-chunks" if symbol == "X" else "--batch/--height/--width"
                    raise ProfileError(
                        f"{self.spec.name}.{name}: axis {axis} ({symbol}) is {value}, but this TensorRT "
                        f"engine was built for {symbol} {allowed} (shape {list(lo)} to {list(hi)}); "
                        f"rebuild with `sdexport build` and a wider {wider}"
                    )

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. Outputs are views into this engine's buffers, valid until its next call."""
        if self.closed:
            raise EngineDirError(f"{self.spec.name}: this TensorRT engine was closed")
        check_feed(self.spec, feed)
        given = feed
        feed = {name: self.io.to_graph(name, feed[name]) for name in self.input_names}
        shapes = tuple(tuple(feed[name].shape) for name in self.input_names)
        self.check_shapes(dict(zip(self.input_names, shapes)))
        for name, shape in zip(self.input_names, shapes):  # on the caller's stream: ordered after its writes
            self.inputs[name][: _numel(shape)].view(shape).copy_(feed[name])
        self._launch(shapes)
        out_shapes = self._output_shapes[shapes]
        outputs = {
            name: self.io.from_graph(name, self.outputs[name][: _numel(out_shapes[name])].view(out_shapes[name]))
            for name in self.output_names
        }
        if self.dims is None:
            return outputs
        return check_outputs(self.spec, given, self.dims, outputs, self.source or self.spec.name, "TensorRT")

    def capture(self, shapes: dict[str, Shape]) -> None:
        """Run once at ``shapes`` on the current input buffers and capture its CUDA graph now (at
        load, for static engines), so that no later call pays for a capture."""
        key = tuple(self.io.shape(name, tuple(shapes[name])) for name in self.input_names)
        self.check_shapes(dict(zip(self.input_names, key)))
        self._launch(key)

    # ------------------------------------------------------------------------------------------

    def _launch(self, shapes: tuple[Shape, ...]) -> None:
        """Run on the shared stream, ordered after the caller's stream and before its next work."""
        stream = self.memory.stream
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            entry = self._graphs.get(shapes) if self.cuda_graph else None
            if entry is not None:
                self._graphs.move_to_end(shapes)
                entry.replay()
            elif self.cuda_graph:
                self._run_and_capture(shapes)
            else:
                self._set_shapes(self.context, shapes)
                self._execute(self.context)
        current.wait_stream(stream)

    def _set_shapes(self, context: trt.IExecutionContext, shapes: tuple[Shape, ...]) -> None:
        if context is self.context and shapes == self._bound_shapes:
            return
        _forget()
        for name, shape in zip(self.input_names, shapes):
            if not context.set_input_shape(name, shape):
                raise ProfileError(f"{self.spec.name}.{name}: TensorRT refused shape {list(shape)}{_reason()}")
        if context is self.context:
            self._bound_shapes = shapes
        if shapes not in self._output_shapes:
            self._output_shapes[shapes] = {name: _dims(context.get_tensor_shape(name)) for name in self.output_names}

    def _execute(self, context: trt.IExecutionContext) -> None:
        _forget()
        if not context.execute_async_v3(self.memory.stream.cuda_stream):
            raise EngineRunError(self.source or self.spec.name, "TensorRT", _last_error("execute_async_v3 returned false"))

    def _run_and_capture(self, shapes: tuple[Shape, ...]) -> None:
        """First call with ``shapes`` under CUDA graphs: run it (the warm-up TensorRT wants before a
        capture) and capture it for later calls, on an execution context of its own.

        A captured enqueue keeps reading state its context owns (shape-dependent parameters), so
        one context serving several graphs would replay old graphs with the newest shapes. Each
        graph's context shares the activation block and the I/O buffers, so extra contexts cost
        little; at most ``MAX_GRAPHS`` are kept, the least recently used dropped first."""
        context = self._create_context()
        context.set_device_memory(self.memory.address, self.memory.nbytes)
        self._bind_all(context)
        self._set_shapes(context, shapes)
        self._execute(context)
        captured = torch.cuda.CUDAGraph()
        try:  # thread_local (as trtexec captures): another thread's pipeline may allocate meanwhile
            with torch.cuda.graph(captured, stream=self.memory.stream, capture_error_mode="thread_local"):
                self._execute(context)
        except RuntimeError as exc:  # e.g. a plan with data-dependent shapes: run without graphs
            from sdexport.console import console

            _forget()  # (what TensorRT said of it is not a later refusal's reason)
            console.print(f"[yellow]note:[/] {self.spec.name}: CUDA graph capture failed ({escape(str(exc))}); running without")
            self.cuda_graph = False
            self._drop_graphs()
            return
        self._graphs[shapes] = _Graph(captured, context)
        if len(self._graphs) > MAX_GRAPHS:
            self.memory.stream.synchronize()  # a replay still queued reads the context it would free
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)[1].release()


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def refit(engine: trt.ICudaEngine, weights: dict[str, Any], source: Path,
          unchanged: Callable[[str], Any] = lambda name: None) -> None:
    """Replace named weights of a refittable engine in place (run-time LoRA): ``weights`` maps the
    ONNX initializer names TensorRT keeps as weight names to arrays of the weight's own dtype.
    TensorRT may ask for more than those, weights it fused with a changed one (a bias folded into
    its matrix product): ``unchanged`` gives each by name as exported (``lora_runtime.
    initializer_reader``; None where the graph has none), as NVIDIA's diffusion demo refits."""
    import tensorrt as trt

    tensorrt_build.check_refittable(str(trt.__version__), f"{source}: run-time LoRA")
    if not getattr(engine, "refittable", False):
        raise EngineDirError(
            f"{source}: not a refittable engine, so --lora cannot change its weights: build with "
            f"`sdexport build {pasteable(source.parent.parent)} --refittable` (and the shapes of this run), or "
            "fuse the LoRA at export"
        )
    if _Logs.logger is None:
        _runtime()  # makes the logger TensorRT reports to
    _forget()
    refitter = trt.Refitter(engine, _Logs.logger)
    known = set(refitter.get_all_weights())
    folded = [name for name in weights if name not in known]
    if folded:
        raise SdexportError(
            f"{source}: TensorRT merged {len(folded)} of the weights --lora changes into others (e.g. "
            f"{folded[0]}), so they cannot be refitted; fuse the LoRA at export and build again"
        )
    import numpy as np

    kept = {name: np.ascontiguousarray(value) for name, value in weights.items()}  # alive until the refit copies them
    for name, value in kept.items():
        if not refitter.set_named_weights(name, _weights(trt, value, source, name)):
            raise SdexportError(f"{source}: TensorRT refused the new {name} ({value.dtype}, {list(value.shape)})"
                                f"{_reason()}")
    lacking: list[str] = []
    # fused with a changed one: given again as exported, until TensorRT asks for none it was not refused
    while missing := [name for name in refitter.get_missing_weights() if name not in kept and name not in lacking]:
        for name in missing:
            value = unchanged(name)
            if value is None:
                lacking.append(name)
                continue
            kept[name] = value = np.ascontiguousarray(value)
            if not refitter.set_named_weights(name, _weights(trt, value, source, name)):
                raise SdexportError(f"{source}: TensorRT refused {name} as exported ({value.dtype}, "
                                    f"{list(value.shape)}){_reason()}")
    if lacking:  # names the graph does not hold
        raise SdexportError(f"{source}: TensorRT needs {len(lacking)} more weights to refit with these (e.g. "
                            f"{lacking[0]}); fuse the LoRA at export and build again")
    if not refitter.refit_cuda_engine():
        raise SdexportError(f"{source}: TensorRT could not refit the engine{_reason()}")


def _weights(trt: Any, value: Any, source: Path, name: str) -> Any:
    """``trt.Weights`` over ``value``, an fp16 or fp32 array: TensorRT's binding raises a bare
    ValueError ("Could not implicitly convert NumPy data type") for a type it does not know
    (float64, ml_dtypes' bfloat16; ``utils.cpp``), and takes others (int8, int32) as such, which the
    refitter would refuse for a float weight with its own words. The caller passes a contiguous
    array (the binding refuses others too)."""
    if str(value.dtype) not in ("float16", "float32"):
        raise SdexportError(f"{source}: the new {name} is {value.dtype}, which a refit cannot give TensorRT "
                            "(float16 or float32 only); fuse the LoRA at export and build again")
    return trt.Weights(value)


def load_tensorrt_engines(
    engine_dir: Path,
    manifest: Manifest,
    components: list[str] | None = None,
    cuda_graph: bool = False,
    *,
    profile: ShapeProfile | None = None,
    verify: bool = True,
    weights: dict[str, dict[str, Any]] | None = None,
    fp32: Collection[str] = (),
    optional: Mapping[str, str] | None = None,
) -> dict[str, TensorRTEngine]:
    """Load the plan for each component that matches this GPU and TensorRT version; ``weights``
    (per component, run-time LoRA) are refitted into refittable plans before any context exists.
    ``fp32``: components that must run in fp32 (``select_engine``). ``optional``: components left
    out, with a note, where no plan here serves (``choose_plans``: the fp32 VAE parts that rerun an
    overflow; a build with ``--components`` may have skipped them, and a run without them only loses
    the rerun).

    All engines share one activation block and stream (sized here by the largest engine before any
    context is created). ``verify`` checks each chosen plan against its sha256 in the manifest; pass
    False when ``load_manifest`` already verified the component's files. ``profile`` (the shapes the
    caller will request) narrows the choice to plans built for it.
    """
    names = components if components is not None else list(manifest.components)
    entries = plans_here(engine_dir, manifest, names, optional, profile=profile, fp32=fp32,
                         refit=[name for name, changed in (weights or {}).items() if changed])
    runtime = _runtime()
    import tensorrt as trt

    from sdexport.console import console

    version = str(trt.__version__)
    chosen: dict[str, tuple[dict[str, Any], trt.ICudaEngine]] = {}
    for name, entry in entries.items():
        path = engine_dir / entry["path"]
        if verify:
            check_files(engine_dir, {entry["path"]: manifest.files.get(entry["path"], "")})
        elif not path.is_file():
            raise EngineDirError(f"{engine_dir}: {entry['path']} is listed in the manifest but missing")
        chosen[name] = (entry, deserialize_plan(path, runtime))
        changed = (weights or {}).get(name)  # (refit refuses an 11.3 plan itself, with the same reason)
        if not changed and getattr(chosen[name][1], "refittable", False) and (
                why := tensorrt_build.refit_drops_biases(version)):
            console.print(f"[yellow]warning:[/] {escape(str(path))} is refittable: {why}")
        if changed:
            from sdexport.runtime.lora_runtime import initializer_reader

            refit(chosen[name][1], changed, path, initializer_reader(engine_dir / manifest.components[name].onnx))
    memory = SharedDeviceMemory()
    memory.reserve(max((e.device_memory_size_v2 for _, e in chosen.values()), default=0))
    engines = {}
    for name, (entry, engine) in chosen.items():
        engines[name] = TensorRTEngine(
            manifest.spec(name), engine, profile=entry_profile(manifest, entry, name), memory=memory,
            cuda_graph=cuda_graph, source=engine_dir / entry["path"], dims=manifest.model_dims,
        )
    for trt_engine in engines.values():
        static = all(lo == hi for lo, _, hi in trt_engine.ranges.values())
        if cuda_graph and static:  # the one shape it can run: capture now, not in the first request
            trt_engine.capture({n: r[0] for n, r in trt_engine.ranges.items()})
    return engines


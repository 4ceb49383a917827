"""Fakes of TensorRT 10.x and 11.x at the Python API level, and of the CUDA calls the runtime makes,
so the TensorRT code paths run on a CPU.

What differs between the two majors, as far as sdexport touches it (TensorRT's 10.x → 11.x
migration guide): 11 has no ``BuilderFlag.FP16`` (nor the other precision flags), every network is
strongly typed, ``ICudaEngine.device_memory_size`` is gone (``device_memory_size_v2`` stays). Both
have ``set_device_memory``, ``set_tensor_address`` (returns False for an unknown name) and
``execute_async_v3``; both require 256-byte aligned tensor addresses.

The fake engine is a U-Net-shaped plan computing ``out_sample = 2 * sample + timestep`` from the
memory at the addresses bound to it (CPU tensors' real addresses), so a test sees exactly what a
plan would read: stale, misplaced or freed inputs give wrong numbers. Its I/O is float32 unless a
test gives other types (an optimum fp16 export's plan takes and returns float16), and it reads
and writes each tensor in its own type, as a plan does.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

LIVE: list[str] = []
"""Names of fake TensorRT objects alive now; destruction order is appended to DESTROYED."""
DESTROYED: list[str] = []


class DataType(enum.Enum):
    """``trt.DataType`` (TensorRT's numbering); ``trt.float32`` and the like are its members."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}
"""The I/O types the fake plan computes in (a U-Net's floats)."""


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class AllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Dims:
    """``trt.Dims``: indexed and sized, not a tuple (the runtime reads it with ``len`` and ``[]``).
    ``Dims(None)`` is what TensorRT returns for a name that is no I/O tensor (``nbDims`` -1), whose
    length Python cannot take."""

    def __init__(self, values: tuple[int, ...] | None) -> None:
        self._values = None if values is None else tuple(values)

    def __len__(self) -> int:
        if self._values is None:
            raise ValueError("__len__() should return >= 0")
        return len(self._values)

    def __getitem__(self, index: int) -> int:
        return tuple(self)[index]

    def __eq__(self, other: object) -> bool:  # (tests compare with tuples)
        return tuple(self) == tuple(other) if isinstance(other, Dims | tuple) else NotImplemented

    def __iter__(self) -> Iterator[int]:
        len(self)  # (TensorRT's own raises for nbDims -1 too)
        return iter(self._values or ())


class ILogger:
    """``trt.ILogger``: subclassed with ``log(severity, msg)``, which TensorRT calls."""

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


PLAN_MAGIC = b"fake-plan:"
"""A fake plan's bytes: this, then the JSON of the engine's ranges (``plan_bytes``)."""


def plan_bytes(ranges: dict[str, tuple[tuple[int, ...], ...]]) -> bytes:
    import json

    return PLAN_MAGIC + json.dumps(ranges).encode()


class Runtime:
    """``trt.Runtime(logger)``: deserializes a fake plan; anything else comes back as None after an
    error is logged, as TensorRT reports a damaged or foreign-version plan."""

    def __init__(self, logger: ILogger) -> None:
        self.logger = logger
        self.trt: Any = None  # (set by make_tensorrt's module)

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        import json

        if not bytes(data).startswith(PLAN_MAGIC):
            self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                            "(Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)\n")
            return None
        ranges = {name: tuple(tuple(shape) for shape in shapes)
                  for name, shapes in json.loads(bytes(data)[len(PLAN_MAGIC):]).items()}
        return FakeEngine(self.trt, ranges)


class Capture:
    """The CUDA-graph capture in progress, if any (set by the fake ``torch.cuda.graph``)."""

    active: list[Callable[[], None]] | None = None
    modes: list[str] = []
    """Each capture's ``capture_error_mode``."""


class FakeEngine:
    """sample (B,4,h,w), timestep (), encoder_hidden_states (B,S,E) → out_sample (B,4,h,w)."""

    def __init__(self, trt: Any, ranges: dict[str, tuple[tuple[int, ...], ...]], *, workspace: int = 4096,
                 dtypes: dict[str, DataType] | None = None) -> None:
        self.trt = trt
        self.ranges = ranges
        self.dtypes = dtypes or {}
        """I/O types by name, where not FLOAT."""
        self.io = [("sample", TensorIOMode.INPUT), ("timestep", TensorIOMode.INPUT),
                   ("encoder_hidden_states", TensorIOMode.INPUT), ("out_sample", TensorIOMode.OUTPUT)]
        self.num_io_tensors = len(self.io)
        self.device_memory_size_v2 = workspace
        self.executions = 0
        self.contexts = 0
        self.refittable = False
        self.weights: dict[str, np.ndarray] = {}
        """Refittable weights by name (what Refitter.get_all_weights lists)."""
        self.refits = 0
        self.refit_needs: list[str] = []
        """Weights a refit must also be given (what Refitter.get_missing_weights lists)."""
        if trt.__version__.startswith("10."):
            self.device_memory_size = workspace  # removed in 11
        LIVE.append("engine")

    def __del__(self) -> None:
        DESTROYED.append("engine")

    def get_tensor_name(self, index: int) -> str:
        return self.io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return dict(self.io).get(name, TensorIOMode.NONE)

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.dtypes.get(name, DataType.FLOAT)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[Dims]:
        assert profile == 0
        return [Dims(shape) for shape in self.ranges[name]]

    def get_tensor_shape(self, name: str) -> Dims:
        """As built: -1 on every axis the ONNX graph declares dynamic (the U-Net spec's), even where
        the profile's min and max are one size (a ``--static`` plan, whose shapes are then read from
        its profile); an input missing from ``ranges`` is a static scalar: the timestep."""
        from sdexport.specs import UNET

        if name not in dict(self.io):
            return Dims(None)
        if name == "out_sample":
            name = "sample"
        if name not in self.ranges:
            return Dims(())
        dynamic = next(t.dynamic_axes for t in UNET.inputs if t.name == name)
        lo, _, hi = self.ranges[name]
        return Dims(tuple(-1 if i in dynamic or a != b else a for i, (a, b) in enumerate(zip(lo, hi))))

    def create_execution_context(self, strategy: AllocationStrategy) -> FakeContext:
        assert strategy == AllocationStrategy.USER_MANAGED
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.device_memory: tuple[int, int] | None = None
        self.bind_calls = 0

    def __del__(self) -> None:
        DESTROYED.append("context")

    def set_device_memory(self, address: int, size: int) -> None:
        assert size >= self.engine.device_memory_size_v2, "activation block smaller than the engine needs"
        self.device_memory = (address, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        if name not in self.engine.ranges:  # static
            return tuple(shape) == tuple(self.engine.get_tensor_shape(name))
        lo, _, hi = self.engine.ranges[name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        if name == "out_sample":
            return Dims(self.shapes["sample"])
        return Dims(self.shapes.get(name, tuple(self.engine.get_tensor_shape(name))))

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in dict(self.engine.io):
            return False
        assert address % 256 == 0, f"TensorRT needs 256-byte aligned addresses; {name} is at {address:#x}"
        self.bind_calls += 1
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        assert self.device_memory is not None, "no activation memory set"
        addresses = dict(self.addresses)

        def run() -> None:
            # A replayed capture still reads what its context holds *now* (as TensorRT's
            # shape-dependent parameters do): a context moved to other shapes corrupts old graphs.
            shape = self.shapes["sample"]

            def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
                return _view(addresses[name], shape, self.engine.get_tensor_dtype(name))

            tensor("out_sample", shape)[...] = 2 * tensor("sample", shape) + tensor("timestep", (1,))[0]
            self.engine.executions += 1

        if Capture.active is not None:
            Capture.active.append(run)  # recorded, runs on replay
        else:
            run()
        return True


def _view(address: int, shape: tuple[int, ...], dtype: DataType = DataType.FLOAT) -> np.ndarray:
    """The memory at ``address`` as an array of ``dtype``, as a plan reads it (whatever the caller
    meant to put there)."""
    count = int(np.prod(shape)) if shape else 1
    numpy_dtype = np.dtype(_NUMPY[dtype])
    buffer = (ctypes.c_byte * (count * numpy_dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=numpy_dtype, count=count).reshape(shape)


class FakeRefitter:
    """TensorRT's Refitter over a FakeEngine: knows the engine's weight names, records the refit."""

    def __init__(self, engine: FakeEngine, logger: Any) -> None:
        self.engine = engine
        self.pending: dict[str, np.ndarray] = {}

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def set_named_weights(self, name: str, weights: Any) -> bool:
        """As ``IRefitter::setNamedWeights``: ``trt.Weights`` carry a type and a count, no shape, and
        either differing from the weight's prototype is refused (a transposed array of the same count
        goes in)."""
        prototype = self.engine.weights.get(name)
        if prototype is None or weights.dtype != prototype.dtype or weights.array.size != prototype.size:
            return False
        self.pending[name] = weights.array.reshape(prototype.shape).copy()
        return True

    def get_missing_weights(self) -> list[str]:
        return [name for name in self.engine.refit_needs if name not in self.pending]

    def refit_cuda_engine(self) -> bool:
        """False while weights are missing ("false if ... getMissingWeights() != 0 before the call")."""
        if self.get_missing_weights():
            return False
        self.engine.weights.update(self.pending)
        self.engine.refits += 1
        return True


class IProgressMonitor:
    """The binding's abstract monitor (TensorRT 10.0 and later; 11.4 too), as pybind11 makes it: a
    subclass must call this ``__init__`` (else the binding refuses the object), and a method it
    does not define is a pure virtual call. The builder (``ProgressDriver``, for the fake
    polygraphy) checks both."""

    def __init__(self) -> None:
        self.initialised = True

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phase_start"')

    def step_complete(self, phase_name: str, step: int) -> bool:
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::step_complete"')

    def phase_finish(self, phase_name: str) -> None:
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phase_finish"')


class ProgressDriver:
    """A build's calls of its progress monitor, as TensorRT's binding makes them: phases nested in
    a parent, each step reported as done, the build cancelled (``cancelled``) at the first
    ``step_complete`` that returns False or raises (the binding catches an exception raised in a
    callback, prints it and cancels: pyCore.cpp). ``before_step(phase, step)``: what happens
    while a step runs (a test sends a signal there)."""

    PHASES = (("Building engine", None, 2), ("Tactic selection", "Building engine", 3))

    def __init__(self, trt: Any, before_step: Callable[[str, int], None] | None = None) -> None:
        self.trt, self.before_step = trt, before_step
        self.steps_done = 0
        self.cancelled = False
        self.printed: list[str] = []

    def run(self, monitor: Any) -> bool:
        """Drive ``monitor`` through a build; False where it cancelled the build."""
        assert isinstance(monitor, self.trt.IProgressMonitor) and getattr(monitor, "initialised", False), \
            "a monitor must be a tensorrt.IProgressMonitor whose __init__ ran"
        outer, inner = self.PHASES
        self._call(monitor.phase_start, *outer)
        for outer_step in range(outer[2]):
            self._call(monitor.phase_start, *inner)
            for step in range(inner[2]):
                if not self._step(monitor, inner[0], step):
                    self._call(monitor.phase_finish, inner[0])
                    self._call(monitor.phase_finish, outer[0])
                    return False
            self._call(monitor.phase_finish, inner[0])
            if not self._step(monitor, outer[0], outer_step):
                self._call(monitor.phase_finish, outer[0])
                return False
        self._call(monitor.phase_finish, outer[0])
        return True

    def _step(self, monitor: Any, phase: str, step: int) -> bool:
        if self.before_step is not None:
            self.before_step(phase, step)
        self.steps_done += 1
        going_on = self._call(monitor.step_complete, phase, step)
        self.cancelled = going_on is not True
        return not self.cancelled

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except BaseException as exc:  # (the binding's catch (...))
            self.printed.append(f"[ERROR] Exception caught in {method.__name__}(): {exc!r}")
            return False


class FakeWeights:
    def __init__(self, array: np.ndarray) -> None:
        # as the binding (utils.cpp, weights_numpy_constructor in 10.1 to 11.1): a numpy type TensorRT
        # does not know, or an array that is not C-contiguous, raises ValueError
        known = (np.float16, np.float32, np.int8, np.int32, np.int64, np.uint8, np.bool_)
        if array.dtype not in known:
            raise ValueError(f"Could not implicitly convert NumPy data type: {array.dtype} to TensorRT.")
        if not array.flags.c_contiguous:
            raise ValueError("Weights must be contiguous in memory")
        self.array = array
        self.dtype = array.dtype


def make_tensorrt(version: str) -> types.ModuleType:
    """A ``tensorrt`` module with 10.x (``"10.13.3"``) or 11.x (``"11.4.0"``) behaviour."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    major = int(version.split(".")[0])
    flags = {"REFIT": 1, "TF32": 2}
    if major < 11:
        flags |= {"FP16": 0, "BF16": 3, "INT8": 4}
    trt.BuilderFlag = types.SimpleNamespace(**flags)  # type: ignore[attr-defined]
    trt.Builder = object  # type: ignore[attr-defined]
    trt.Refitter, trt.Weights = FakeRefitter, FakeWeights  # type: ignore[attr-defined]
    trt.ILogger, trt.Dims = ILogger, Dims  # type: ignore[attr-defined]
    trt.IProgressMonitor = IProgressMonitor  # type: ignore[attr-defined]

    class BoundRuntime(Runtime):  # engines it makes have this module's version
        def __init__(self, logger: ILogger) -> None:
            super().__init__(logger)
            self.trt = trt

    trt.Runtime = BoundRuntime  # type: ignore[attr-defined]
    trt.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    trt.ExecutionContextAllocationStrategy = AllocationStrategy  # type: ignore[attr-defined]
    trt.DataType = DataType  # type: ignore[attr-defined]
    for name, member in {"float32": DataType.FLOAT, "float16": DataType.HALF, "bfloat16": DataType.BF16,
                         "int8": DataType.INT8, "int32": DataType.INT32, "int64": DataType.INT64,
                         "uint8": DataType.UINT8, "bool": DataType.BOOL, "fp8": DataType.FP8}.items():
        setattr(trt, name, member)
    return trt


class FakeStream:
    cuda_stream = 7

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeGraph:
    def __init__(self) -> None:
        self.recorded: list[Callable[[], None]] = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for run in self.recorded:
            run()


@contextlib.contextmanager
def _fake_capture(graph: FakeGraph, stream: Any = None, capture_error_mode: str = "global") -> Iterator[None]:
    Capture.modes.append(capture_error_mode)
    Capture.active = graph.recorded
    try:
        yield
    finally:
        Capture.active = None


def fake_cuda(monkeypatch: Any) -> None:
    """Make the torch.cuda calls of the TensorRT runtime work on the CPU (streams, graphs)."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)

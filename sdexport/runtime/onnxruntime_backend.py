"""ONNX Runtime backend: CPU execution provider, or CUDA with IO binding on torch device buffers.

On CUDA, a session runs on a torch CUDA stream given to it as ``user_compute_stream`` (one stream
for all engines of a pipeline), and ORT is told not to synchronise the host at the end of a run:
calls are ordered with the caller's stream by stream waits, never by host synchronisation, so the
denoising loop queues work as fast as the GPU takes it. (Torch's default stream cannot be used:
its handle is 0, which ORT reads as "no stream given".)

A graph fused by ``sdexport build --target onnxruntime-cuda`` runs with ``prefer_nhwc`` (its
GroupNorm and convolutions are NHWC). With ``cuda_graph`` (the pipeline asks it for the U-Net only:
the text encoders' ArgMax over int32 ids has no CUDA kernel, and a once-per-image call gains
little), ORT captures the whole run in a CUDA graph (``enable_cuda_graph``) and replays it: that
needs every node on the CUDA provider and fixed buffer addresses, so the session is made for one
set of shapes (every dynamic dimension frozen with a free-dimension override, which lets ORT fold
the shape arithmetic that would otherwise run on the CPU) and binds buffers it owns; calls copy
their inputs in and get views of its outputs back, valid until the engine's next call (as with
TensorRT). A call with other shapes makes the session again for them (seconds): keep the shapes of
a CUDA-graph pipeline fixed. ORT's replay waits for its stream after each launch (released
versions do so unconditionally), so with CUDA graphs the host waits once per U-Net step. ORT keeps
captured graphs per thread (the CUDA provider's per-thread context): called from another thread than
the one that loaded it (``serve``'s handler), its first call there captures again (as slow as the
load's capture; results are the same).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdexport.errors import EngineDirError, EngineRunError, SdexportError, one_line
from sdexport.graph_io import GraphIO, check_io, onnxruntime_tensors
from sdexport.runtime.engine import check_feed, check_outputs, output_shapes, sizes_from_inputs
from sdexport.runtime.providers import (
    PROVIDERS,
    available_providers,
    check_provider_options,
    require_provider,
)
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims, is_dynamic, resolve_dim

_ORT_TYPES = {torch.float32: np.float32, torch.int32: np.int32, torch.float16: np.float16, torch.int64: np.int64}


def preload_cuda_libraries(ort: Any) -> None:
    """Let onnxruntime-gpu (>= 1.21) load the CUDA and cuDNN libraries of pip's nvidia-* packages
    before its CUDA provider starts; older versions and missing libraries are left to the check
    after the session is made. Its messages go to stderr (stdout is for results).

    It looks for those packages beside onnxruntime itself; where onnxruntime lives elsewhere (a
    separate site folder, as scripts/gpu-tests.sh makes) the libraries torch loaded on import
    (this module imports torch first) serve when their CUDA major version matches, which
    ``require_cuda_session`` then confirms."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(Exception):
        preload()


def require_cuda_session(session: Any, path: Path) -> None:
    """Refuse a session whose CUDA provider did not start: ORT then falls back to the CPU with
    nothing but a log line (missing CUDA or cuDNN libraries), and every call would run there."""
    providers = list(session.get_providers())
    if not providers or providers[0] != PROVIDERS["cuda"]:
        import onnxruntime as ort

        raise SdexportError(
            f"{path}: onnxruntime {ort.__version__} could not start its CUDA execution provider and fell "
            f"back to {', '.join(providers) or 'nothing'}; the CUDA or cuDNN libraries it was built for "
            "are missing or do not match the driver (see onnxruntime's message above; "
            "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements). "
            "Refusing to run --backend onnxruntime-cuda on the CPU"
        )


def cuda_provider_options(
    device_index: int, stream_handle: int, *, fused: bool = False, cuda_graph: bool = False,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The CUDA provider's options for one session (ORT takes them as strings).

    ``fused``: the graph from ``sdexport build --target onnxruntime-cuda`` (NHWC operators, so NHWC
    for the rest too). ``extra``: options passed through as given (``run --ort-option``), e.g. ORT's
    ``sdpa_kernel`` attention-kernel mask, whose bit values differ between onnxruntime releases."""
    options = {
        "device_id": str(device_index),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
    }
    if stream_handle:  # 0: ORT's own stream (torch's default stream has handle 0, which ORT reads as none)
        options["user_compute_stream"] = str(stream_handle)
    if fused:
        options["prefer_nhwc"] = "1"
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    check_provider_options(extra or {})
    options.update(extra or {})
    return options


class OnnxRuntimeEngine:
    """One ONNX graph in an InferenceSession.

    On CUDA, inputs and outputs are bound to torch tensors' device memory, so the denoising loop
    never copies latents through the host; on CPU, torch tensors and numpy arrays share memory.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        path: Path,
        *,
        dims: ModelDims,
        profile: ShapeProfile,
        device: str = "cpu",
        stream: torch.cuda.Stream | None = None,
        fused: bool = False,
        cuda_graph: bool = False,
        sizes: dict[str, int] | None = None,
        provider_options: dict[str, str] | None = None,
        initializers: dict[str, Any] | None = None,
    ) -> None:
        """``initializers``: numpy arrays replacing the graph's tensors of those names in the session
        (run-time LoRA); the files are not changed.
        ``stream`` (CUDA): the stream to run on; share one between a pipeline's engines.
        ``fused``: ``path`` is an ONNX Runtime CUDA graph (contrib operators, NHWC).
        ``cuda_graph`` (CUDA): capture and replay; ``sizes`` (symbol values, as ``ModelDims.sizes``
        gives them) fixes the shapes now, else the first call's shapes do."""
        import onnxruntime as ort

        require_provider(device)
        if cuda_graph and device != "cuda":
            raise SdexportError("--cuda-graph needs the CUDA provider (--backend onnxruntime-cuda)")
        self.spec, self.dims, self.profile, self.path = spec, dims, profile, path
        self.fused, self.cuda_graph = fused, cuda_graph
        self.extra_options = dict(provider_options or {})
        # An OrtValue made from numpy borrows the array's memory, and the session reads it for as long
        # as it lives: both are kept here.
        self._initializer_arrays = dict(initializers or {})
        self._initializers = {name: ort.OrtValue.ortvalue_from_numpy(value)
                              for name, value in self._initializer_arrays.items()}
        self.stream: torch.cuda.Stream | None = None
        if device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
            preload_cuda_libraries(ort)
        else:
            self.device = torch.device("cpu")
        from sdexport.console import onnxruntime_run_options

        self.run_options = onnxruntime_run_options(ort)
        # The end-of-run cudaStreamSynchronize: callers wait on the stream instead (ORT >= 1.14).
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._fixed: _FixedBuffers | None = None
        if cuda_graph:
            if sizes is not None:
                self._specialize(sizes)
        else:
            self.session = self._make_session(None)

    def _make_session(self, sizes: dict[str, int] | None) -> Any:
        """A session for the graph; ``sizes`` freezes its dynamic dimensions (for CUDA graphs)."""
        import onnxruntime as ort

        from sdexport.console import onnxruntime_session_options

        options = onnxruntime_session_options(ort)  # (its CPU threads: OMP_NUM_THREADS, where set)
        if sizes:
            for symbol in dict.fromkeys(d for t in (*self.spec.inputs, *self.spec.outputs) for d in t.dims):
                if is_dynamic(symbol):  # h/2: a ControlNet residual's side
                    options.add_free_dimension_override_by_name(symbol, resolve_dim(symbol, sizes))
        for name, tensor in self._initializers.items():
            options.add_initializer(name, tensor)
        if self._initializers:
            # The CPU layout optimisations of level ALL (NCHWc) re-pack convolution weights from the
            # file's initializers, not the replacements (seen with onnxruntime 1.32): one level down.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        providers: list[Any] = [PROVIDERS["cpu"]]
        if self.stream is not None:
            cuda = cuda_provider_options(self.device.index or 0, self.stream.cuda_stream, fused=self.fused,
                                         cuda_graph=self.cuda_graph, extra=self.extra_options)
            providers = [(PROVIDERS["cuda"], cuda), PROVIDERS["cpu"]]
        try:
            # enable_fallback=0: where the CUDA provider throws while the session is made (a bad
            # --ort-option, a library that fails to load), ORT's Python layer would print a banner
            # to stdout and make a CPU session instead, hiding the cause behind a later one
            session = ort.InferenceSession(str(self.path), options, providers=providers, enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own exception types
            hint = ""
            if self.extra_options:
                hint += f"; check the --ort-option values ({', '.join(self.extra_options)})"
            if self.cuda_graph:
                hint += "; with --cuda-graph every node must run on the CUDA provider: try without it"
            raise EngineDirError(f"{self.path}: onnxruntime cannot load it ({one_line(exc)}){hint}") from exc
        if self.stream is not None:
            require_cuda_session(session, self.path)
        # Names, dtypes and ranks now, not as an ONNX Runtime error in the middle of the loop.
        self.io = check_io(self.spec, onnxruntime_tensors(session.get_inputs()),
                           onnxruntime_tensors(session.get_outputs()), str(self.path), self.dims.sizes(1, 0, 0))
        self.input_names = list(self.io.inputs)
        return session

    def _specialize(self, sizes: dict[str, int]) -> None:
        """(CUDA graph) a session and fixed buffers for these shapes, captured now: two runs on zeros
        (current onnxruntime runs normally and captures within the first call, older releases on the
        second; the second is then a replay), so no caller's call captures."""
        if self._fixed is not None and self.stream is not None:
            # The old graph may still be running on its buffers: let it finish before they go
            # (a change of shapes, rare: one host wait).
            self.stream.synchronize()
        self.session = None
        self._fixed = None
        self.session = self._make_session(sizes)
        fixed = _FixedBuffers(self.spec, self.io, sizes, self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name in self.input_names:
            tensor = fixed.inputs[name]
            binding.bind_input(name, "cuda", index, _ORT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        for name, tensor in fixed.outputs.items():
            binding.bind_output(name, "cuda", index, _ORT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        fixed.binding = binding
        self._fixed = fixed
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the zeros are written
        try:
            for _ in range(2):
                self.session.run_with_iobinding(binding, self.run_options)
        except Exception as exc:  # onnxruntime raises its own types (out of memory, capture refused)
            raise SdexportError(f"{self.path}: onnxruntime could not capture a CUDA graph for "
                                f"{self.spec.name} ({one_line(exc, 300)}); try without --cuda-graph") from exc
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        try:
            if self.stream is None:
                arrays = {n: self.io.to_graph(n, feed[n]).contiguous().numpy() for n in self.input_names}
                results = self.session.run(self.spec.output_names, arrays, self.run_options)
                return check_outputs(self.spec, feed, self.dims, {n: self.io.from_graph(n, torch.from_numpy(r))
                                     for n, r in zip(self.spec.output_names, results)}, self.path, "onnxruntime")
            if self.cuda_graph:
                return self._run_graph(feed, self.stream)
            return self._run_bound(feed, self.stream)
        except (SdexportError, EngineRunError):  # (a CUDA graph that cannot be captured for new shapes; a
            raise  # graph's outputs of the wrong size: said already)
        except Exception as exc:  # onnxruntime's own types: out of memory, a node that fails on these shapes
            raise EngineRunError(self.path, "onnxruntime", exc) from exc

    def _run_graph(self, feed: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Copy the inputs into the captured graph's buffers and replay it on ``stream``."""
        fixed = self._fixed
        if fixed is None or any(tuple(feed[n].shape) != fixed.shapes[n] for n in self.input_names):
            self._specialize(sizes_from_inputs(self.spec, feed, self.dims))
        assert self._fixed is not None
        current = torch.cuda.current_stream(self.device)
        for name in self.input_names:  # on the caller's stream, ordered before the wait
            self._fixed.inputs[name].copy_(self.io.to_graph(name, feed[name]))
        stream.wait_stream(current)
        self.session.run_with_iobinding(self._fixed.binding, self.run_options)
        current.wait_stream(stream)
        return {n: self.io.from_graph(n, t) for n, t in self._fixed.outputs.items()}

    def _run_bound(self, feed: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Bind device pointers and run on ``stream``, ordered after the caller's stream by a wait.

        ORT reads the bound pointers while its kernels run, not when they are bound, so every tensor
        it touches is recorded on its stream: torch's allocator will not hand that memory to anyone
        else until the stream has passed this run, even if the caller drops the tensors at once."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        current = torch.cuda.current_stream(self.device)
        inputs = {name: self.io.to_graph(name, feed[name].to(self.device)).contiguous() for name in self.input_names}
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, _ORT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        outputs = {
            name: torch.empty(shape, dtype=self.io.torch_dtype(name), device=self.device)
            for name, shape in output_shapes(self.spec, feed, self.dims).items()
        }
        for name, tensor in outputs.items():
            binding.bind_output(name, "cuda", index, _ORT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        stream.wait_stream(current)  # inputs written by torch on the caller's stream are ready
        self.session.run_with_iobinding(binding, self.run_options)
        for tensor in (*inputs.values(), *outputs.values()):
            tensor.record_stream(stream)
        current.wait_stream(stream)  # the caller's next work sees the outputs
        return {n: self.io.from_graph(n, t) for n, t in outputs.items()}

    def close(self) -> None:
        """Release the session (and its device memory arena) now rather than at garbage collection."""
        if self.stream is not None:
            self.stream.synchronize()
        self.session = None
        self._fixed = None

    def __enter__(self) -> OnnxRuntimeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FixedBuffers:
    """The buffers a captured CUDA graph reads and writes: allocated once for one set of shapes."""

    def __init__(self, spec: ComponentSpec, io: GraphIO, sizes: dict[str, int], device: torch.device) -> None:
        self.shapes = {t.name: t.shape(sizes) for t in spec.inputs if t.name in io.inputs}
        """The spec's input shapes these buffers serve (a scalar timestep's buffer has none)."""
        self.inputs = {n: torch.zeros(io.shape(n, shape), dtype=io.torch_dtype(n), device=device)
                       for n, shape in self.shapes.items()}
        self.outputs = {t.name: torch.empty(t.shape(sizes), dtype=io.torch_dtype(t.name), device=device)
                        for t in spec.outputs}
        self.binding: Any = None


__all__ = ["OnnxRuntimeEngine", "available_providers", "require_provider"]

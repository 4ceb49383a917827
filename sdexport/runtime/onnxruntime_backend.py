"""ONNX Runtime backend: CPU execution provider, or CUDA with IO binding on torch device buffers.

On CUDA, a session runs on a torch CUDA stream given to it as ``user_compute_stream`` (one stream
for all engines of a pipeline), and ORT is told not to synchronise the host at the end of a run:
calls are ordered with the caller's stream by stream waits, never by host synchronisation, so the
denoising loop queues work as fast as the GPU takes it. (Torch's default stream cannot be used:
its handle is 0, which ORT reads as "no stream given".)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdexport.errors import EngineDirError, SdexportError, one_line
from sdexport.runtime.engine import check_feed, output_shapes
from sdexport.runtime.providers import PROVIDERS, available_providers, require_provider
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims

_ORT_TYPES = {torch.float32: np.float32, torch.int32: np.int32, torch.float16: np.float16}


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
        threads: int = 0,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """``stream`` (CUDA): the stream to run on; share one between a pipeline's engines."""
        import onnxruntime as ort

        require_provider(device)
        self.spec, self.dims, self.profile = spec, dims, profile
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers: list[Any] = [PROVIDERS["cpu"]]
        self.stream: torch.cuda.Stream | None = None
        if device == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
            preload_cuda_libraries(ort)
            cuda_options = {"device_id": str(self.device.index), "user_compute_stream": str(self.stream.cuda_stream)}
            providers = [(PROVIDERS["cuda"], cuda_options), PROVIDERS["cpu"]]
        else:
            self.device = torch.device("cpu")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineDirError(f"{path}: onnxruntime cannot load it ({one_line(exc, 400)})") from exc
        if device == "cuda":
            require_cuda_session(self.session, path)
        self.run_options = ort.RunOptions()
        # The end-of-run cudaStreamSynchronize: callers wait on the stream instead (ORT >= 1.14).
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if not set(self.input_names) <= set(spec.input_names) or outputs != spec.output_names:
            raise EngineDirError(
                f"{path} takes {self.input_names} and returns {outputs}, but a {spec.name} graph takes "
                f"{spec.input_names} and returns {spec.output_names}; re-export"
            )

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        if self.stream is None:
            arrays = {n: feed[n].contiguous().numpy() for n in self.input_names}
            results = self.session.run(self.spec.output_names, arrays)
            return {n: torch.from_numpy(r) for n, r in zip(self.spec.output_names, results)}
        return self._run_bound(feed, self.stream)

    def _run_bound(self, feed: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Bind device pointers and run on ``stream``, ordered after the caller's stream by a wait.

        ORT reads the bound pointers while its kernels run, not when they are bound, so every tensor
        it touches is recorded on its stream: torch's allocator will not hand that memory to anyone
        else until the stream has passed this run, even if the caller drops the tensors at once."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        current = torch.cuda.current_stream(self.device)
        inputs = {name: feed[name].to(self.device).contiguous() for name in self.input_names}
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, _ORT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        outputs = {
            name: torch.empty(shape, dtype=torch.float32, device=self.device)
            for name, shape in output_shapes(self.spec, feed, self.dims).items()
        }
        for name, tensor in outputs.items():
            binding.bind_output(name, "cuda", index, np.float32, list(tensor.shape), tensor.data_ptr())
        stream.wait_stream(current)  # inputs written by torch on the caller's stream are ready
        self.session.run_with_iobinding(binding, self.run_options)
        for tensor in (*inputs.values(), *outputs.values()):
            tensor.record_stream(stream)
        current.wait_stream(stream)  # the caller's next work sees the outputs
        return outputs

    def close(self) -> None:
        """Release the session (and its device memory arena) now rather than at garbage collection."""
        if self.stream is not None:
            self.stream.synchronize()
        self.session = None  # type: ignore[assignment]

    def __enter__(self) -> OnnxRuntimeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["OnnxRuntimeEngine", "available_providers", "require_provider"]

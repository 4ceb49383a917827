"""ONNX Runtime backend: CPU execution provider, or CUDA with IO binding on torch device buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdexport.errors import EngineDirError, one_line
from sdexport.runtime.engine import check_feed, output_shapes
from sdexport.runtime.providers import PROVIDERS, available_providers, require_provider
from sdexport.shapes import ShapeProfile
from sdexport.specs import ComponentSpec, ModelDims

_ORT_TYPES = {torch.float32: np.float32, torch.int32: np.int32, torch.float16: np.float16}


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
    ) -> None:
        import onnxruntime as ort

        require_provider(device)
        self.spec, self.dims, self.profile = spec, dims, profile
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = [PROVIDERS[device]] if device == "cpu" else [PROVIDERS["cuda"], PROVIDERS["cpu"]]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineDirError(f"{path}: onnxruntime cannot load it ({one_line(exc, 400)})") from exc
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if not set(inputs) <= set(spec.input_names) or outputs != spec.output_names:
            raise EngineDirError(
                f"{path} takes {inputs} and returns {outputs}, but a {spec.name} graph takes "
                f"{spec.input_names} and returns {spec.output_names}; re-export"
            )

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        if self.device.type == "cpu":
            arrays = {n: feed[n].contiguous().numpy() for n in self.spec.input_names}
            results = self.session.run(self.spec.output_names, arrays)
            return {n: torch.from_numpy(r) for n, r in zip(self.spec.output_names, results)}
        return self._run_bound(feed)

    def _run_bound(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name in self.spec.input_names:
            tensor = feed[name].contiguous()
            binding.bind_input(
                name, "cuda", index, _ORT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr()
            )
        outputs = {
            name: torch.empty(shape, dtype=torch.float32, device=self.device)
            for name, shape in output_shapes(self.spec, feed, self.dims).items()
        }
        for name, tensor in outputs.items():
            binding.bind_output(name, "cuda", index, np.float32, list(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        self.session.run_with_iobinding(binding)
        return outputs


__all__ = ["OnnxRuntimeEngine", "available_providers", "require_provider"]

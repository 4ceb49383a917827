"""The things a benchmark compares, behind one small interface.

A contender is loaded once (a one-time cost, timed apart from steady state) and then called with a
GenerationRequest; it returns final latents, pixels and per-stage timings measured the same way for
all. The diffusers baseline and the sdexport runtime over each backend are contenders alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sdexport.errors import MissingDependencyError
from sdexport.runtime.ensemble import halves
from sdexport.runtime.txt2img import GenerationRequest, Timings

BASELINE_READS = "the benchmark reads one chunk, as diffusers' pipelines, its baseline, do"
"""Why the runtime contenders read one prompt chunk, said where a scenario's text is cut."""


@dataclass
class Output:
    latents: torch.Tensor
    pixels: np.ndarray
    timings: Timings
    vae_reruns: int = 0
    """VAE parts run again in fp32 after an fp16 overflow (NaN/Inf), inside the call's time: the
    baseline does no such thing (it returns the NaN image), so a report marks the runs."""


class Contender(Protocol):
    name: str

    def __call__(self, request: GenerationRequest, *, stages: bool = True) -> Output:
        """``stages=False``: no stage marks, for end-to-end timing."""

    def close(self) -> None:
        """Free its device memory: the next contender is measured without it."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu(name: str) -> bool:
    """Whether contender ``name`` runs on the GPU here: all do where there is one, but for
    ``onnxruntime-cpu`` (whose memory and busy share are then the host's, not the device's)."""
    return torch.cuda.is_available() and name != "onnxruntime-cpu"


def check_available(name: str) -> None:
    """Raise MissingDependencyError naming what to install, before anything is loaded."""
    if name.startswith("onnxruntime-cuda"):
        from sdexport.runtime.onnxruntime_backend import require_provider

        require_provider("cuda")
    elif name == "onnxruntime-cpu":
        from sdexport.runtime.onnxruntime_backend import require_provider

        require_provider("cpu")
    elif name == "tensorrt":
        from sdexport.build.tensorrt_build import require_tensorrt

        require_tensorrt()
    elif name.endswith("compile") and not hasattr(torch, "compile"):
        raise MissingDependencyError("torch>=2.0", f"for {name}", "pip install -U torch")


class BaselineContender:
    """diffusers' StableDiffusion(XL)Pipeline in eager PyTorch: fp16 + SDPA on a GPU, fp32 on a CPU
    whatever the precision, as the runtime's Torch backend computes there (``loading``): an fp16
    baseline on a CPU ran PyTorch's slow fp16 kernels, and the report gave every contender a 45-68x
    speedup over it (an audit)."""

    def __init__(self, name: str, model: Any, dtype: str) -> None:
        from sdexport.bench.reference import DiffusersReference

        self.name = name
        torch_dtype = torch.float16 if dtype == "fp16" and device().type == "cuda" else torch.float32
        self.reference = DiffusersReference(model, device=device(), dtype=torch_dtype,
                                            compile=name.endswith("compile"))

    def __call__(self, request: GenerationRequest, *, stages: bool = True) -> Output:
        result = self.reference(request, stages=stages)
        return Output(result.latents, result.pixels, result.timings)

    def close(self) -> None:
        self.reference.close()


class RuntimeContender:
    """The sdexport runtime over one backend, loaded from the engine directory like a server would."""

    def __init__(self, name: str, engine_dir: Path, *, cuda_graph: bool = False, image_inputs: bool = False,
                 model_source: dict[str, Any] | None = None) -> None:
        """``name``: a backend, or ``onnxruntime-cuda-fused`` (the ONNX Runtime CUDA graphs in CUDA
        graphs); plain ``onnxruntime-cuda`` runs the portable graphs here, whatever the directory holds.
        ``model_source``: the Torch backends reload the scenario's checkpoint where it lies here (proven
        the export's by sha256), not where the export read it (a cached export made on another runner)."""
        from sdexport.runtime.loading import load_pipeline

        self.name = name
        fused = name == "onnxruntime-cuda-fused"
        backend = "onnxruntime-cuda" if fused else name
        self.per_shape = cuda_graph or fused or "compile" in name
        """Specialises to the shapes of its first call (CUDA graphs, compilation): warm each case."""
        # one prompt chunk, as the baseline (diffusers' pipelines cut a text at 77 tokens): the same
        # work and comparable images, also over an --engine-dir exported to read more chunks
        self.pipeline = load_pipeline(engine_dir, backend, cuda_graph=cuda_graph or fused,
                                      graphs="auto" if fused else "portable", image_inputs=image_inputs,
                                      model_source=model_source, read_chunks=(1, BASELINE_READS))

    def __call__(self, request: GenerationRequest, *, stages: bool = True) -> Output:
        result = self.pipeline(request, stages=stages)
        return Output(result.latents, result.pixels, result.timings, result.vae_fallback + result.encoder_fallback)

    def close(self) -> None:
        self.pipeline.close()


class EnsembleContender:
    """SDXL's ensemble of experts as one contender: ``base`` (a baseline or a runtime contender) runs
    each request to ``end`` and hands its latents, undecoded, to ``refiner`` of the same kind, as
    ``run --refiner`` does. Timed end to end over both calls, the handoff included; the stages are
    the two calls' together. The base model decodes nothing: the copy of its latents to the host,
    which its call times where a decode would be, counts as loop overhead."""

    def __init__(self, base: Contender, refiner: Contender, end: float) -> None:
        self.name = base.name
        self.base, self.refiner, self.end = base, refiner, end
        self.per_shape = getattr(base, "per_shape", False) or getattr(refiner, "per_shape", False)

    def __call__(self, request: GenerationRequest, *, stages: bool = True) -> Output:
        first, then = halves(request, self.end)
        start = time.perf_counter()
        handed = self.base(first, stages=stages)
        result = self.refiner(replace(then, init_latents=handed.latents), stages=stages)
        total = time.perf_counter() - start
        a, b = handed.timings, result.timings
        timings = Timings(text_encoder=a.text_encoder + b.text_encoder, unet_steps=a.unet_steps + b.unet_steps,
                          vae_decoder=b.vae_decoder, total=total, clock=b.clock,
                          # the base model's ControlNets and adapters (the refiner has none, but summed alike)
                          controlnet_steps=a.controlnet_steps + b.controlnet_steps, adapter=a.adapter + b.adapter)
        return Output(result.latents, result.pixels, timings, handed.vae_reruns + result.vae_reruns)

    def close(self) -> None:
        try:
            self.base.close()
        finally:
            self.refiner.close()


class SlowedEngine:
    """The test hook ``SDEXPORT_TEST_SLOW_UNET``: an engine that sleeps before every call (inside the
    runtime's timed span, so end-to-end and U-Net figures both show it); otherwise the engine itself."""

    def __init__(self, engine: Any, seconds: float) -> None:
        self.engine = engine
        self.seconds = seconds

    def __call__(self, feed: dict[str, Any]) -> Any:
        time.sleep(self.seconds)
        return self.engine(feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def slow_down_unet(contender: Contender, seconds: float) -> None:
    """Slow the (base model's) U-Net of a runtime contender."""
    if isinstance(contender, EnsembleContender):
        contender = contender.base
    assert isinstance(contender, RuntimeContender), "the hook is refused for baselines by plan_bench"
    engines = contender.pipeline.engines
    engines["unet"] = SlowedEngine(engines["unet"], seconds)

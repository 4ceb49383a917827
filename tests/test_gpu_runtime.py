"""Torch CUDA and ONNX Runtime CUDA on a GPU (scripts/gpu-tests.sh): the same loop as on the CPU,
the same images, and the properties the CPU tests can only check with fakes (no host
synchronisation inside a run, CUDA-event stage times, no CPU fallback, memory given back).

Skipped with a reason without a CUDA GPU; the ONNX Runtime tests also without onnxruntime-gpu's
CUDA provider. TensorRT has its own file (tests/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from sdexport.runtime.request import GenerationRequest

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible to torch")]


def _ort_cuda_missing() -> str | None:
    from sdexport.runtime.providers import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


needs_ort_cuda = pytest.mark.skipif(_ort_cuda_missing() is not None, reason=str(_ort_cuda_missing()))

REQUEST = GenerationRequest(prompt=["a lighthouse", "a fox"], steps=4, scheduler="euler", height=64, width=64,
                            seeds=[3, 4])


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().cpu(), b.double().cpu()
    return float(torch.linalg.norm(a64 - b64) / torch.linalg.norm(b64))


@pytest.fixture(scope="module")
def cpu_result(tiny_engine_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(tiny_engine_dir, "onnxruntime-cpu") as pipeline:
        return pipeline(REQUEST)


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    from sdexport.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("gpu-fp16") / "tiny"
    export("tiny", out, ExportOptions(dtype="fp16", verify="quick"))
    return out


def _no_host_sync(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize inside a run")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime-cuda", marks=needs_ort_cuda)])
def test_gpu_backends_match_the_cpu(tiny_engine_dir: Path, cpu_result, backend, monkeypatch):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(tiny_engine_dir, backend) as pipeline:
        assert pipeline.device.type == "cuda"
        pipeline(REQUEST)  # warm-up
        _no_host_sync(monkeypatch)
        result = pipeline(REQUEST)
    # fp32 on both; cuDNN may use TF32 for convolutions on the GPU.
    assert _rel_l2(result.latents, cpu_result.latents) < 1e-2
    assert result.timings.clock == "cuda events"
    stages = result.timings.text_encoder + result.timings.unet_total + result.timings.vae_decoder
    assert 0 < stages <= result.timings.total * 1.05
    assert all(s > 0 for s in result.timings.unet_steps)


@needs_ort_cuda
def test_ort_cuda_sessions_run_on_cuda(tiny_engine_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(tiny_engine_dir, "onnxruntime-cuda") as pipeline:
        streams = {id(e.stream) for e in pipeline.engines.values()}
        assert len(streams) == 1  # one stream for the pipeline
        for engine in pipeline.engines.values():
            assert engine.session.get_providers()[0] == "CUDAExecutionProvider"


@needs_ort_cuda
def test_ort_cuda_fp16_export_matches_its_cpu_run(fp16_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(fp16_dir, "onnxruntime-cuda") as gpu, load_pipeline(fp16_dir, "onnxruntime-cpu") as cpu:
        a, b = gpu(REQUEST), cpu(REQUEST)
    assert _rel_l2(a.latents, b.latents) < 3e-2
    assert np.isfinite(a.pixels).all()


@needs_ort_cuda
def test_ort_cuda_inputs_may_be_dropped_at_once(tiny_engine_dir: Path):
    """ORT reads bound pointers when its kernels run; the engine keeps them from being reused."""
    from sdexport.export.inputs import sample_inputs
    from sdexport.manifest import load_manifest
    from sdexport.runtime.onnxruntime_backend import OnnxRuntimeEngine

    manifest = load_manifest(tiny_engine_dir)
    spec = manifest.spec("unet")
    sizes = manifest.model_dims.sizes(2, 64, 64)
    feed = {k: torch.from_numpy(v) for k, v in sample_inputs(spec, sizes, vocab_size=514, seed=5).items()}
    path = tiny_engine_dir / manifest.components["unet"].onnx
    kwargs = {"dims": manifest.model_dims, "profile": manifest.shape_profile}
    with OnnxRuntimeEngine(spec, path, device="cpu", **kwargs) as cpu:
        expected = cpu(feed)["out_sample"]
    with OnnxRuntimeEngine(spec, path, device="cuda", **kwargs) as engine:
        out = engine({k: v.cuda() for k, v in feed.items()})["out_sample"]  # the inputs die here
        garbage = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]  # reuse pressure
        assert _rel_l2(out, expected) < 1e-2
        del garbage


def test_closing_a_pipeline_gives_the_memory_back(tiny_engine_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    pipeline = load_pipeline(tiny_engine_dir, "torch")
    pipeline(REQUEST)
    assert torch.cuda.memory_allocated() > before
    pipeline.close()
    del pipeline
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)


def test_nvml_reads_device_memory():
    from sdexport.bench.measure import nvml_memory_reader

    read = nvml_memory_reader()
    if read is None:
        pytest.skip("nvidia-ml-py is not installed")
    used = read()
    buffer = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    assert read() >= used + (200 << 20)
    del buffer


def test_the_baseline_leaves_the_device_when_closed(tiny_model):
    from sdexport.bench.contenders import BaselineContender

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    baseline = BaselineContender("diffusers", tiny_model, "fp32")
    output = baseline(REQUEST)
    assert output.timings.clock == "cuda events"
    baseline.close()
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
    assert all(p.device.type == "cpu" for m in tiny_model.modules.values() for p in m.parameters())

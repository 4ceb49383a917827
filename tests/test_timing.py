"""Honest timing: stage figures from marks (CUDA events on a GPU), never from host synchronisation
inside a run; device memory sampled through NVML; the ORT CUDA path refuses a CPU fallback.

The CUDA parts are exercised with fakes (a fake CUDA event clock, a fake NVML); the GPU tests
(tests/test_gpu_runtime.py) run them for real.
"""

from __future__ import annotations

import io
import sys
import time
import types
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from sdexport.errors import SdexportError
from sdexport.runtime.request import GenerationRequest
from sdexport.runtime.timing import CudaEventClock, HostClock, clock_for


class FakeEvent:
    """A CUDA event on a fake timeline: ``record`` stamps the next tick (1 ms apart)."""

    ticks = 0
    recorded_on: list[object] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.time: int | None = None
        self.synchronized = False

    def record(self, stream: object) -> None:
        FakeEvent.ticks += 1
        FakeEvent.recorded_on.append(stream)
        self.time = FakeEvent.ticks

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.synchronized, "read before the end event completed"
        assert self.time is not None and end.time is not None
        return float(end.time - self.time)  # milliseconds


def _no_host_sync(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a timed run")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)


def test_clock_kinds():
    assert isinstance(clock_for(torch.device("cpu")), HostClock)
    assert isinstance(clock_for(torch.device("cuda", 0)), CudaEventClock)
    clock = HostClock()
    a = clock.mark()
    assert clock.seconds(a, clock.mark()) >= 0


def test_cuda_event_clock_marks_the_current_stream_and_converts_to_seconds(monkeypatch):
    stream = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    FakeEvent.recorded_on = []
    clock = CudaEventClock(torch.device("cuda", 0), event=FakeEvent)
    start = clock.mark()
    clock.mark()
    end = clock.mark()
    assert clock.seconds(start, end) == pytest.approx(0.002)
    assert FakeEvent.recorded_on == [stream] * 3


def fake_cuda_clock(monkeypatch) -> CudaEventClock:
    """The real CUDA event clock over fake events: every mark one tick (1 ms) later."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    return CudaEventClock(torch.device("cpu"), event=FakeEvent)


def test_pipeline_stages_come_from_the_clock_without_host_sync(tiny_engine_dir: Path, monkeypatch):
    from sdexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    pipeline.clock = fake_cuda_clock(monkeypatch)
    _no_host_sync(monkeypatch)
    result = pipeline(GenerationRequest(prompt=["a fox"], steps=3, scheduler="euler", height=64, width=64, seeds=[1]))
    timings = result.timings
    assert timings.clock == "cuda events"
    assert timings.unet_steps == [pytest.approx(0.001)] * 3  # one tick between each step's marks
    assert timings.text_encoder == pytest.approx(0.001) and timings.vae_decoder == pytest.approx(0.001)
    assert timings.total > 0 and timings.to_dict()["clock"] == "cuda events"
    pipeline.close()


def test_the_vae_span_ends_where_the_baselines_does(tiny_engine_dir: Path, monkeypatch):
    """The baseline marks ``vae.decode`` alone; the image's way to the host is overhead on both sides
    (before, the runtime's VAE column also held it). The run's total is read before the marks are."""
    import time

    from sdexport.runtime import txt2img
    from sdexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    copy = txt2img.host_pixels
    monkeypatch.setattr(txt2img, "host_pixels", lambda image: (time.sleep(0.3), copy(image))[1])
    timings = pipeline(GenerationRequest(prompt=["a fox"], steps=2, height=64, width=64, seeds=[1])).timings
    assert timings.vae_decoder < 0.3 < timings.total
    pipeline.close()


@pytest.mark.parametrize("scheduler", ["euler_a", "pndm", "dpmpp_2m", "unipc"])
def test_the_loop_makes_no_tensor_from_python_values(tiny_engine_dir: Path, monkeypatch, scheduler):
    """sdexport's own code makes no tensor from Python numbers inside the loop: on a GPU that is a
    copy that waits for the device (torch's blocking copy). Guidance per image, img2img and
    inpainting (the latents blended back at each step) over schedulers of each kind; the ControlNet
    and adapter tests check their per-image settings the same way. What diffusers' schedulers copy
    when called (Euler a's noise) is theirs: docs/design-notes.md."""
    from PIL import Image
    from test_controlnet import tensors_made_in_the_loop

    from sdexport.runtime.loading import load_pipeline

    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.fromarray(((rng.random((64, 64)) > 0.5) * 255).astype(np.uint8))
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu", image_inputs=True)
    for changes in ({"guidance": [2.0, 7.0]}, {"image": [picture], "strength": 0.6},
                    {"image": [picture], "mask": [mask], "strength": 0.8}):
        request = GenerationRequest(prompt=["a fox", "a cat"], steps=4, scheduler=scheduler, height=64, width=64,
                                    seeds=[1, 2], **changes)
        assert tensors_made_in_the_loop(pipeline, request, monkeypatch) == [], changes
    pipeline.close()


def test_the_baseline_is_timed_the_same_way(tiny_model, monkeypatch):
    from sdexport.bench.reference import DiffusersReference

    before = {name: (vars(m).get("forward"), vars(m).get("decode")) for name, m in tiny_model.modules.items()}
    reference = DiffusersReference(tiny_model)
    reference.clock = fake_cuda_clock(monkeypatch)
    _no_host_sync(monkeypatch)
    result = reference(GenerationRequest(prompt=["a fox"], steps=2, scheduler="euler", height=64, width=64, seeds=[1]))
    assert result.timings.clock == "cuda events"
    assert len(result.timings.unet_steps) == 2 and result.timings.vae_decoder == pytest.approx(0.001)
    reference.close()
    assert reference.pipe is None
    reference.close()  # idempotent
    after = {name: (vars(m).get("forward"), vars(m).get("decode")) for name, m in tiny_model.modules.items()}
    assert after == before  # the shared model has its methods back as they were


# -- device memory through NVML -----------------------------------------------------------------


def _fake_nvml(monkeypatch, used: list[int]) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda index: ("gpu", index)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=used.pop(0) if len(used) > 1 else used[0])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_device_memory_is_sampled_through_nvml_not_cuda(monkeypatch):
    from sdexport.bench import measure

    _fake_nvml(monkeypatch, [100 << 20, 300 << 20, 200 << 20])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda index: 3, raising=False)

    def no_cuda_call(*args, **kwargs):
        raise AssertionError("a CUDA call from the sampler thread")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda_call)
    with measure.MemorySampler(interval=0.001) as sampler:
        pass
    data = sampler.to_dict()
    assert data["device_used_before_mb"] == 100 and data["device_used_peak_mb"] == 300
    assert "device_note" not in data


def test_an_nvml_failure_mid_run_leaves_out_the_device_figures_not_the_run(monkeypatch):
    """A transient NVMLError in the sampler thread used to kill the thread silently, then raise out
    of the block at its last sample, failing the contender whose timed runs were already done."""
    from sdexport.bench import measure

    nvml = _fake_nvml(monkeypatch, [100 << 20])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    calls = []

    def flaky(handle):
        calls.append(handle)
        if len(calls) > 1:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return types.SimpleNamespace(used=100 << 20)

    nvml.nvmlDeviceGetMemoryInfo = flaky  # type: ignore[attr-defined]
    with measure.MemorySampler(interval=0.001) as sampler:
        time.sleep(0.01)
    data = sampler.to_dict()
    assert len(calls) == 2  # no more calls once it failed
    assert data["device_used_peak_mb"] is None and data["host_rss_peak_mb"] > 0
    assert data["device_note"] == "not sampled: NVML failed during the run (RuntimeError: NVML_ERROR_GPU_IS_LOST)"


def test_an_nvml_that_does_not_answer_for_the_device_is_said_so_not_asked_to_be_installed(monkeypatch):
    """nvidia-ml-py installed, but no answer for this device (a MIG slice or CUDA_VISIBLE_DEVICES torch
    cannot map, no driver access in a container): the note said "pip install nvidia-ml-py"."""
    from sdexport.bench import measure

    nvml = _fake_nvml(monkeypatch, [100 << 20])

    def refused(index):
        raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")

    nvml.nvmlDeviceGetHandleByIndex = refused  # type: ignore[attr-defined]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda index: index, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1a2b")
    with measure.MemorySampler(interval=0.001) as sampler:
        pass
    data = sampler.to_dict()
    assert data["device_used_peak_mb"] is None
    assert data["device_note"] == ("not sampled: NVML did not answer for CUDA device 0 (RuntimeError: "
                                   "NVML_ERROR_INVALID_ARGUMENT; CUDA_VISIBLE_DEVICES=MIG-1a2b)")


def test_without_nvml_device_memory_is_reported_as_not_sampled(monkeypatch):
    from sdexport.bench import measure

    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with measure.MemorySampler(interval=0.001) as sampler:
        pass
    data = sampler.to_dict()
    assert data["device_used_peak_mb"] is None and "nvidia-ml-py" in str(data["device_note"])


# -- ONNX Runtime CUDA: no silent CPU fallback ----------------------------------------------------


def test_a_session_that_fell_back_to_the_cpu_is_refused():
    from sdexport.runtime.onnxruntime_backend import require_cuda_session

    fell_back = types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(SdexportError, match="could not start its CUDA execution provider.*CPUExecutionProvider") as info:
        require_cuda_session(fell_back, Path("unet/model.onnx"))
    assert "\n" not in str(info.value)
    require_cuda_session(types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                         Path("unet/model.onnx"))


def test_cuda_library_preloading_is_quiet_and_optional():
    from sdexport.runtime.onnxruntime_backend import preload_cuda_libraries

    calls = []

    def noisy() -> None:
        calls.append(1)
        print("Failed to load libcudnn.so.9")
        raise RuntimeError("missing")

    captured = io.StringIO()
    with redirect_stdout(captured):
        preload_cuda_libraries(types.SimpleNamespace(preload_dlls=noisy))
        preload_cuda_libraries(types.SimpleNamespace())  # onnxruntime < 1.21: nothing to do
    assert calls == [1] and captured.getvalue() == ""


def test_torch_backend_keeps_float32_inputs_float32():
    """The Torch backend casts only "float" inputs to the model's precision (diffusers projects
    the timestep in float32; fp16 would turn 979.6 into 979.5)."""
    import dataclasses

    from sdexport.runtime.torch_backend import TorchEngine
    from sdexport.shapes import ShapeProfile
    from sdexport.specs import UNET

    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            seen.update(sample=sample.dtype, timestep=timestep.dtype, timestep_value=float(timestep[0]),
                        hidden=encoder_hidden_states.dtype)
            return sample

    spec = dataclasses.replace(UNET, wrapper=lambda module: Recorder())
    profile = ShapeProfile(batch=(1, 1, 1), height=(64, 64, 64), width=(64, 64, 64))
    with TorchEngine(spec, torch.nn.Identity(), profile=profile, device=torch.device("cpu"),
                     dtype=torch.float16) as engine:
        out = engine({"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.tensor([979.6]),
                      "encoder_hidden_states": torch.zeros(2, 8, 16)})["out_sample"]
    assert seen == {"sample": torch.float16, "timestep": torch.float32,
                    "timestep_value": pytest.approx(979.6), "hidden": torch.float16}
    assert out.dtype == torch.float32


def test_a_summary_takes_the_median_of_its_timings():
    """The bench tests time two repeats, whose median is their mean: a mean went unseen."""
    from sdexport.bench.measure import Stats

    stats = Stats.of([1.0, 1.0, 10.0])
    assert (stats.median, stats.min, stats.max, stats.n) == (1.0, 1.0, 10.0, 3)


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_the_loop_overhead_is_what_no_engine_span_holds():
    """The adapter's span is an engine's, like the encoders', ControlNets', U-Net's and VAE's:
    not counted as the loop's overhead."""
    from sdexport.runtime.txt2img import Timings

    timings = Timings(text_encoder=1.0, unet_steps=[2.0, 2.0], vae_decoder=1.0, total=10.0,
                      controlnet_steps=[0.5, 0.5], adapter=1.5)
    assert timings.loop_overhead == pytest.approx(1.5)
    assert timings.to_dict()["loop_overhead"] == pytest.approx(1.5)

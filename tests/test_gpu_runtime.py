"""Torch CUDA and ONNX Runtime CUDA on a GPU (scripts/gpu-tests.sh): the same loop as on the CPU,
the same images, and the properties the CPU tests can only check with fakes (no host
synchronisation inside a run, CUDA-event stage times, no CPU fallback, memory given back).

Skipped with a reason without a CUDA GPU; the ONNX Runtime tests also without onnxruntime-gpu's
CUDA provider. TensorRT has its own file (tests/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sdexport.runtime.request import GenerationRequest

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible to torch")]


def _ort_cuda_missing() -> str | None:
    """Why ORT cannot run on CUDA here; onnxruntime-gpu lists its CUDA provider even when the CUDA
    or cuDNN libraries are missing, so the probe really starts a session."""
    from sdexport.bench.environment import _cuda_provider_status

    status = _cuda_provider_status()
    return None if status == "available" else f"onnxruntime's CUDA provider: {status}"


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


def _settled_allocation() -> int:
    """Bytes torch has allocated, with what it keeps for good (cuBLAS workspaces, made on the first
    matrix product of a stream) made first and cleared, so before/after readings compare."""
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    gc.collect()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


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


def count_syncs(run) -> int:
    """How many times ``run()`` made the host wait for the device (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D")
"""The CUDA runtime's calls that make the host wait for the device (``cudaMemcpy`` without Async)."""


def count_runtime_waits(run) -> int:
    """How many of ``HOST_WAITS`` ``run()`` made, from any library in the process: torch's sync
    debug mode (``count_syncs``) sees only torch's own, not onnxruntime's or TensorRT's. Read from
    the profiler's CUDA runtime records (CUPTI traces every caller of the runtime)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        run()
    return sum(event.name() in HOST_WAITS for event in profiler.profiler.kineto_results.events())


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime-cuda", marks=needs_ort_cuda)])
def test_no_library_waits_for_the_device_inside_the_loop(tiny_engine_dir: Path, backend):
    """As ``test_no_step_of_the_loop_waits_for_the_device``, counting the runtime's waits whoever
    makes them: an onnxruntime session that synchronised its stream or copied through the host
    inside each run (a Memcpy node, its end-of-run synchronisation) would pass torch's count. In
    unmarked runs (``stages=False``), as the bench times them: reading a step's CUDA events after
    the run is a cudaEventSynchronize each."""
    from sdexport.runtime.loading import load_pipeline

    short, long = REQUEST, dataclasses.replace(REQUEST, steps=12)
    with load_pipeline(tiny_engine_dir, backend) as pipeline:
        pipeline(short, stages=False)
        pipeline(long, stages=False)  # warm-up both
        waits = (count_runtime_waits(lambda: pipeline(short, stages=False)),
                 count_runtime_waits(lambda: pipeline(long, stages=False)))
    # the images' copy to the host waits at least once: none counted would mean the profiler names
    # the calls otherwise than HOST_WAITS (a CUDA release's suffix), and the test would pass on nothing
    assert waits[0] > 0, f"no host wait recorded at all: do the profiler's names still match {HOST_WAITS}?"
    assert waits[1] == waits[0], waits


@pytest.mark.parametrize("task", ["txt2img", "inpaint"])
@pytest.mark.parametrize("scheduler", ["euler", "pndm", "ddim", "dpmpp_2m_karras", "lms", "unipc", "euler_a", "lcm"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime-cuda", marks=needs_ort_cuda)])
def test_no_step_of_the_loop_waits_for_the_device(tiny_engine_dir: Path, backend, scheduler, task):
    """Waits that do not grow with the step count: none of them is inside the denoising loop. The
    schedule lies where its steps read it (``set_schedule``): PNDM, SD 1.5's default, and DDIM
    waited three to six times a step indexing their noise table with a device timestep, UniPC four
    times copying its sigmas. A wait a step is diffusers' own and stays: UniPC's corrector solves
    on the device (``torch.linalg.solve`` checks its result on the host), Euler a and LCM draw each
    step's noise with the CPU generators and copy it over. Inpainting with a standard U-Net blends
    the image's own noised latents back every step, ``add_noise``'s factors asked on the host
    (``HostSchedule``)."""
    from pictures import box_mask, picture

    from sdexport.runtime.loading import load_pipeline

    short = dataclasses.replace(REQUEST, scheduler=scheduler)
    if task == "inpaint":  # (strength 1: the steps asked for are the steps run)
        short = dataclasses.replace(short, image=[picture(64, 64, 1)], mask=[box_mask(64, 64)], strength=1.0)
    long = dataclasses.replace(short, steps=12)
    with load_pipeline(tiny_engine_dir, backend, image_inputs=task == "inpaint") as pipeline:
        pipeline(short)
        pipeline(long)  # warm-up both
        grown = count_syncs(lambda: pipeline(long)) - count_syncs(lambda: pipeline(short))
    assert grown <= (long.steps - short.steps if scheduler in ("unipc", "euler_a", "lcm") else 0), grown


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime-cuda", marks=needs_ort_cuda)])
def test_emphasis_on_the_gpu_matches_the_cpu_without_waits_in_the_loop(tiny_fp16_engine_dir: Path, backend):
    """An fp16 export's readings weighed on the device: the CPU's reading of the same engines, one
    wait before the loop (the range check) that does not grow with the steps; a weight fp16 cannot
    hold is refused before the loop rather than giving NaN latents."""
    from sdexport.errors import SdexportError
    from sdexport.runtime.loading import load_pipeline

    request = dataclasses.replace(REQUEST, prompt=["a (lighthouse:1.4)", "[a fox]"], negative_prompt=["((fog))"] * 2,
                                  emphasis="original")
    with load_pipeline(tiny_fp16_engine_dir, "onnxruntime-cpu") as pipeline:
        expected = pipeline.encode_prompt(request)["encoder_hidden_states"]
    with load_pipeline(tiny_fp16_engine_dir, backend) as pipeline:
        got = pipeline.encode_prompt(request)["encoder_hidden_states"]
        assert got.device.type == "cuda"
        assert _rel_l2(got, expected) < 1e-2
        long = dataclasses.replace(request, steps=12)
        pipeline(request)
        pipeline(long)  # warm-up both
        assert count_syncs(lambda: pipeline(long)) == count_syncs(lambda: pipeline(request))
        with pytest.raises(SdexportError, match="emphasis weights take text encoding past 65504"):
            pipeline(dataclasses.replace(request, prompt=["(a:100000) lighthouse"] * 2, emphasis="no-norm"))


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> Path:
    from sdexport.export.exporter import ExportOptions, export

    directory = tmp_path_factory.mktemp("gpu-controlnet") / "tiny-controlnet"
    export("tiny", directory, ExportOptions(verify="quick", controlnets=["tiny-controlnet", "tiny-controlnet"]))
    return directory


@pytest.mark.parametrize("per_image", [False, True], ids=["shared-settings", "per-image-settings"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime-cuda", marks=needs_ort_cuda)])
def test_controlnets_on_the_gpu_match_the_cpu_without_waits_in_the_loop(controlnet_dir: Path, backend, per_image,
                                                                        monkeypatch):
    """Two ControlNets before the U-Net each step: the CPU's latents, and no wait that grows with the
    step count (the per-step scales and images are on the device before the loop starts), with a
    scale per image too. A wait made once inside the loop does not grow with it: that the weights
    are made before the loop is checked on the CPU (``tensors_made_in_the_loop``). The settings
    here give the same columns at 4 and 12 steps; per-image windows may not."""
    from PIL import Image

    from sdexport.runtime.loading import load_pipeline

    edges = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    scales = [[1.0, 0.4], 0.5] if per_image else [1.0, 0.5]
    request = dataclasses.replace(REQUEST, control_image=[edges, edges], control_scale=scales, control_end=0.8)
    with load_pipeline(controlnet_dir, "onnxruntime-cpu") as pipeline:
        expected = pipeline(request)
    with load_pipeline(controlnet_dir, backend) as pipeline:
        long = dataclasses.replace(request, steps=12)
        pipeline(request)
        pipeline(long)  # warm-up both
        assert count_syncs(lambda: pipeline(long)) == count_syncs(lambda: pipeline(request))
        _no_host_sync(monkeypatch)
        result = pipeline(request)
    assert _rel_l2(result.latents, expected.latents) < 1e-2
    assert len(result.timings.controlnet_steps) == len(expected.timings.controlnet_steps) > 0


@needs_ort_cuda
def test_ort_cuda_sessions_run_on_cuda(tiny_engine_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(tiny_engine_dir, "onnxruntime-cuda") as pipeline:
        streams = {id(e.stream) for e in pipeline.engines.values()}
        assert len(streams) == 1  # one stream for the pipeline
        for engine in pipeline.engines.values():
            assert engine.session.get_providers()[0] == "CUDAExecutionProvider"


@needs_ort_cuda
def test_ort_cuda_fp16_export_matches_its_cpu_run(tiny_fp16_engine_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(tiny_fp16_engine_dir, "onnxruntime-cuda") as gpu, load_pipeline(tiny_fp16_engine_dir, "onnxruntime-cpu") as cpu:
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

    before = _settled_allocation()
    pipeline = load_pipeline(tiny_engine_dir, "torch")
    pipeline(REQUEST)
    assert torch.cuda.memory_allocated() > before
    pipeline.close()
    del pipeline
    assert _settled_allocation() <= before + (1 << 20)


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

    before = _settled_allocation()
    baseline = BaselineContender("diffusers", tiny_model, "fp32")
    output = baseline(REQUEST)
    assert output.timings.clock == "cuda events"
    baseline.close()
    del baseline, output
    assert _settled_allocation() <= before + (1 << 20)
    assert all(p.device.type == "cpu" for m in tiny_model.modules.values() for p in m.parameters())


@pytest.fixture(scope="module")
def fused_dir(tiny_fp16_engine_dir: Path, tmp_path_factory) -> Path:
    """The fp16 export with ``sdexport build --target onnxruntime-cuda`` graphs, parity on CUDA."""
    import shutil

    from sdexport.build.onnxruntime_build import build_onnxruntime

    out = tmp_path_factory.mktemp("gpu-fused") / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, out)
    build_onnxruntime(out)
    return out


@needs_ort_cuda
def test_fused_graphs_pass_parity_on_cuda(fused_dir: Path):
    from sdexport.manifest import load_manifest

    for entry in load_manifest(fused_dir).components.values():
        parity = entry.optimized["onnxruntime-cuda"]["parity"]
        assert parity["provider"] == "CUDAExecutionProvider" and parity["status"] == "passed"


@needs_ort_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_fused_graphs_match_the_portable_ones(fused_dir: Path, cuda_graph: bool):
    from sdexport.runtime.loading import load_pipeline
    from sdexport.shapes import ShapeProfile

    wanted = ShapeProfile.single(REQUEST.batch, REQUEST.height, REQUEST.width)
    with load_pipeline(fused_dir, "onnxruntime-cuda", graphs="portable") as portable, \
            load_pipeline(fused_dir, "onnxruntime-cuda", cuda_graph=cuda_graph, request_profile=wanted) as fused:
        assert all("onnxruntime-cuda/" in rel for rel in fused.info["graphs"].values())
        a, b = fused(REQUEST), portable(REQUEST)
        again = fused(REQUEST)  # a replay gives the same images
    assert _rel_l2(a.latents, b.latents) < 3e-2
    assert _rel_l2(again.latents, a.latents) < 1e-4  # replays compute what the first call did


@needs_ort_cuda
def test_a_cuda_graph_pipeline_follows_a_change_of_shape(fused_dir: Path):
    """Only the U-Net is captured; a request of another size makes its session again and still
    matches the portable graphs."""
    from sdexport.runtime.loading import load_pipeline
    from sdexport.shapes import ShapeProfile

    other = dataclasses.replace(REQUEST, prompt=["a fox"], seeds=[4], height=96, width=64)
    wanted = ShapeProfile.single(REQUEST.batch, REQUEST.height, REQUEST.width)
    with load_pipeline(fused_dir, "onnxruntime-cuda", cuda_graph=True, request_profile=wanted) as fused, \
            load_pipeline(fused_dir, "onnxruntime-cuda", graphs="portable") as portable:
        assert [n for n, e in fused.engines.items() if e.cuda_graph] == ["unet"]
        fused(REQUEST)
        a, b = fused(other), portable(other)
    assert _rel_l2(a.latents, b.latents) < 3e-2


@pytest.mark.slow
def test_torch_compile_max_matches_eager(tiny_engine_dir: Path):
    from sdexport.runtime.loading import load_pipeline

    with load_pipeline(tiny_engine_dir, "torch") as eager, load_pipeline(tiny_engine_dir, "torch-compile-max") as fast:
        a, b = fast(REQUEST), eager(REQUEST)
        again = fast(REQUEST)
    assert _rel_l2(a.latents, b.latents) < 1e-2
    assert _rel_l2(again.latents, a.latents) < 1e-4  # replays compute what the first call did


@needs_ort_cuda
def test_a_cuda_graph_pipeline_follows_a_change_of_prompt_chunks(fused_dir: Path):
    """A prompt of two chunks after one of one: the captured U-Net's text length changes, its session
    is made again, and it still matches the portable graphs."""
    from sdexport.runtime.loading import load_pipeline
    from sdexport.shapes import ShapeProfile

    long = dataclasses.replace(REQUEST, prompt=[", ".join(["a lighthouse on a cliff"] * 6)] * REQUEST.batch)
    wanted = ShapeProfile.single(REQUEST.batch, REQUEST.height, REQUEST.width)
    with load_pipeline(fused_dir, "onnxruntime-cuda", cuda_graph=True, request_profile=wanted) as fused, \
            load_pipeline(fused_dir, "onnxruntime-cuda", graphs="portable") as portable:
        assert fused.chunk_count(long) == 2
        fused(REQUEST)
        a, b = fused(long), portable(long)
    assert _rel_l2(a.latents, b.latents) < 3e-2


def test_the_bench_measures_on_the_gpu_as_the_lease_will(tmp_path):
    """The harness's CUDA paths, in seconds on the tiny model, before the lease's benchmarks spend
    minutes on them: CUDA-event stages, the GPU-busy run, NVML's device memory, the fp16 baseline
    and the ratio to it (the bench's own tests run it on the CPU)."""
    import importlib.util
    import json

    from conftest import run_cli

    contenders = ["diffusers", "torch", *([] if _ort_cuda_missing() else ["onnxruntime-cuda"]), "onnxruntime-cpu"]
    scenario = tmp_path / "gpu.toml"
    scenario.write_text(f'model = "tiny"\nheight = 64\nwidth = 64\nscheduler = "euler"\nsteps = [3]\nbatch = [1]\n'
                        f"warmup = 1\nrepeats = 2\ncontenders = {json.dumps(contenders)}\n")
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    results = {r["contender"]: r for r in report["results"]}
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(contenders, "measured")
    cpu = results.pop("onnxruntime-cpu")  # on the host: its memory is the host's, and no GPU-busy run
    assert cpu["stage_clock"] == "host clock" and cpu["gpu_busy"] is None, cpu
    assert cpu["memory"]["device_used_peak_mb"] is None and "device_note" not in cpu["memory"], cpu["memory"]
    for name, r in results.items():
        assert r["stage_clock"] == "cuda events", name
        assert "fraction" in r["gpu_busy"], (name, r["gpu_busy"])
        if importlib.util.find_spec("pynvml") is not None:
            assert r["memory"]["device_used_peak_mb"] is not None, (name, r["memory"])
        if name != "diffusers":
            assert r["speedup_vs_baseline"] > 0 and "psnr_db" in r["agreement"], (name, r)

"""TensorRT on a GPU: build tiny engines, run them, compare with ONNX Runtime (scripts/gpu-tests.sh).

Skipped with a reason unless a real TensorRT (not just tensorrt-stubs), polygraphy and a CUDA GPU
are present. Everything here runs on the tiny model's exported engine directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdexport.export.inputs import sample_inputs
from sdexport.export.verify import TOLERANCE
from sdexport.shapes import ShapeProfile


def _missing() -> str | None:
    from sdexport.build.tensorrt_build import require_tensorrt
    from sdexport.errors import MissingDependencyError

    try:
        require_tensorrt()  # installed, not only its stubs, and at least 10.1
    except MissingDependencyError as exc:
        return str(exc)
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "polygraphy is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]

FP16_TOLERANCE = TOLERANCE["fp16"]
VOCAB = 514  # the tiny preset's text encoder


def _copy(src: Path, factory, name: str) -> Path:
    out = factory.mktemp(name) / "tiny"
    shutil.copytree(src, out)
    return out


@pytest.fixture(scope="module")
def built(tiny_fp16_engine_dir: Path, tmp_path_factory):
    """A copy of the tiny fp16 engine dir with dynamic engines for every component."""
    from sdexport.build.tensorrt_build import build_engines

    directory = _copy(tiny_fp16_engine_dir, tmp_path_factory, "trt-dynamic")
    results = build_engines(directory, timing_cache=directory.parent / "timing.cache")
    return directory, results


@pytest.fixture(scope="module")
def static_built(tiny_fp16_engine_dir: Path, tmp_path_factory):
    from sdexport.build.tensorrt_build import build_engines

    directory = _copy(tiny_fp16_engine_dir, tmp_path_factory, "trt-static")
    results = build_engines(directory, static=True, components=["unet", "vae_decoder"])
    return directory, results


def _feed(spec, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    return sample_inputs(spec, sizes, vocab_size=VOCAB, seed=seed)


def _onnxruntime(directory: Path, manifest, name: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(directory / manifest.components[name].onnx), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    outputs = session.run(None, {k: v for k, v in feed.items() if k in wanted})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


def _on_gpu(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).cuda() for k, v in feed.items()}


def _rel_l2(actual: torch.Tensor, expected: np.ndarray) -> float:
    a = actual.detach().float().cpu().numpy().astype(np.float64)
    e = expected.astype(np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-12))


def _check(engine, directory, manifest, name, sizes, seed=0) -> dict[str, torch.Tensor]:
    feed = _feed(engine.spec, sizes, seed)
    got = engine(_on_gpu(feed))
    expected = _onnxruntime(directory, manifest, name, feed)
    for output, value in expected.items():
        assert got[output].shape == value.shape, (name, output)
        assert got[output].dtype == torch.float32 and got[output].is_cuda
        error = _rel_l2(got[output], value)
        assert error <= FP16_TOLERANCE, f"{name}.{output} at {sizes['B']}x{sizes['H']}x{sizes['W']}: rel-L2 {error:.2e}"
    return got


def test_first_build_builds_every_component(built):
    directory, results = built
    assert [r.status for r in results] == ["built"] * len(results)
    for result in results:  # fp16 graphs are built strongly typed, without the fp16 flag, on 10 and 11
        assert result.key.strongly_typed or result.component == "vae_decoder_fp32"
        assert not result.key.fp16
    assert all(r.path.is_file() and r.path.parent.parent == directory for r in results)
    assert (directory.parent / "timing.cache").is_file()


def test_dynamic_engines_match_onnxruntime(built):
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    directory, _ = built
    manifest = load_manifest(directory)
    engines = load_tensorrt_engines(directory, manifest, cuda_graph=False, profile=manifest.shape_profile)
    assert set(engines) == set(manifest.components)
    memory = {id(e.memory) for e in engines.values()}
    assert len(memory) == 1  # one shared activation block
    shared = next(iter(engines.values())).memory
    assert shared.nbytes >= max(e.engine.device_memory_size_v2 for e in engines.values())
    dims = manifest.model_dims
    for name, engine in engines.items():
        for _, batch, height, width, chunks in manifest.shape_profile.points():  # (the U-Net's text too)
            b = 2 * batch if engine.spec.cfg_batch else batch
            _check(engine, directory, manifest, name, dims.sizes(b, height, width, chunks))


def test_out_of_profile_shape_is_refused_with_the_range(built):
    from sdexport.errors import ProfileError
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    directory, _ = built
    manifest = load_manifest(directory)
    (engine,) = load_tensorrt_engines(directory, manifest, ["vae_decoder"], profile=manifest.shape_profile).values()
    hi = manifest.shape_profile.batch[2]
    sizes = manifest.model_dims.sizes(hi + 1, 128, 128)
    with pytest.raises(ProfileError, match=rf"axis 0 \(B\) is {hi + 1}.*\[1, {hi}\]"):
        engine(_on_gpu(_feed(engine.spec, sizes)))


def test_second_build_is_cached(built):
    from sdexport.build.tensorrt_build import build_engines

    directory, first = built
    again = build_engines(directory, timing_cache=directory.parent / "timing.cache")
    assert [r.status for r in again] == ["cached"] * len(first)
    assert [r.path for r in again] == [r.path for r in first]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_static_engines_match_onnxruntime(static_built, cuda_graph):
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    directory, results = static_built
    manifest = load_manifest(directory)
    assert all(r.key.static for r in results)
    engines = load_tensorrt_engines(directory, manifest, ["unet", "vae_decoder"], cuda_graph=cuda_graph)
    dims = manifest.model_dims
    _, batch, height, width, _ = next(p for p in manifest.shape_profile.points() if p[0] == "opt")
    for name, engine in engines.items():
        if cuda_graph:  # static engines capture at load: the first call already replays
            assert len(engine._graphs) == 1
        b = 2 * batch if engine.spec.cfg_batch else batch
        sizes = dims.sizes(b, height, width)
        for seed in (0, 1, 2, 3):  # replays; new values each time reach the graph
            _check(engine, directory, manifest, name, sizes, seed=seed)
        assert len(engine._graphs) == (1 if cuda_graph else 0)


def test_cuda_graph_follows_shape_changes(built):
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    directory, _ = built
    manifest = load_manifest(directory)
    (engine,) = load_tensorrt_engines(
        directory, manifest, ["unet"], cuda_graph=True, profile=manifest.shape_profile
    ).values()
    dims = manifest.model_dims
    for batch, side in ((2, 128), (2, 128), (2, 128), (4, 64), (4, 64), (2, 128), (4, 256)):
        _check(engine, directory, manifest, "unet", dims.sizes(batch, side, side), seed=batch + side)


def test_corrupted_plan_is_refused(built, tmp_path):
    from sdexport.errors import EngineDirError
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import deserialize_plan, load_tensorrt_engines

    source, _ = built
    directory = tmp_path / "tiny"
    shutil.copytree(source, directory)
    manifest = load_manifest(directory)
    entry = next(iter(manifest.components["unet"].engines.values()))
    plan = directory / entry["path"]
    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineDirError, match="does not match its sha256"):
        load_tensorrt_engines(directory, manifest, ["unet"], profile=manifest.shape_profile)
    with pytest.raises(EngineDirError, match="cannot load this plan"):
        load_tensorrt_engines(directory, manifest, ["unet"], profile=manifest.shape_profile, verify=False)
    plan.write_bytes(b"this is not a TensorRT plan" * 100)
    with pytest.raises(EngineDirError, match="cannot load this plan"):
        deserialize_plan(plan)


def test_static_engine_refuses_other_shapes(static_built):
    from sdexport.errors import ProfileError
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    directory, _ = static_built
    manifest = load_manifest(directory)
    (engine,) = load_tensorrt_engines(directory, manifest, ["vae_decoder"]).values()
    assert engine.profile.is_static
    with pytest.raises(ProfileError, match=r"\(h\) is 8"):
        engine(_on_gpu(_feed(engine.spec, manifest.model_dims.sizes(1, 64, 128))))
    static = ShapeProfile.from_dict(manifest.components["vae_decoder"].engines[
        next(iter(manifest.components["vae_decoder"].engines))]["profile"])
    assert static == engine.profile


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_pipeline_over_tensorrt_matches_onnxruntime(built, cuda_graph, monkeypatch):
    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.txt2img import GenerationRequest

    directory, _ = built
    request = GenerationRequest(prompt=["a lighthouse"], steps=4, scheduler="euler", height=64, width=64, seeds=[7])
    with load_pipeline(directory, "onnxruntime-cpu") as reference:
        expected = reference(request)
    with load_pipeline(directory, "tensorrt", cuda_graph=cuda_graph) as pipeline:
        pipeline(request)  # warm-up: with cuda_graph, captures every engine's graph for these shapes

        def refuse(*args, **kwargs):
            raise AssertionError("torch.cuda.synchronize inside a run")

        monkeypatch.setattr(torch.cuda, "synchronize", refuse)
        got = pipeline(request)
        monkeypatch.undo()
        if cuda_graph:
            assert all(e._graphs for e in pipeline.engines.values())
    assert got.timings.clock == "cuda events"
    error = float(torch.linalg.norm(got.latents - expected.latents) / torch.linalg.norm(expected.latents))
    assert error <= FP16_TOLERANCE


def test_a_real_build_reports_its_phases_and_a_stop_during_it_ends_it_with_no_plan(tiny_fp16_engine_dir, tmp_path,
                                                                                     monkeypatch):
    """What the fakes assume of TensorRT's progress monitor (``build.tensorrt_progress``), on the real
    one: it reports phases, and a Ctrl-C during the build ends it as a stop with no plan written.
    Where TensorRT calls the monitor on the thread that called the build, the stop cancels the build
    at its next step (the handler runs inside the callback); from threads of its own, the build runs
    to its end first. Which one it is goes into the test's output (``-rA``: its captured stdout)."""
    import os
    import signal
    import threading

    from sdexport.build import tensorrt_progress
    from sdexport.build.tensorrt_build import build_engines
    from sdexport.manifest import load_manifest

    calls: list[tuple[str, bool]] = []
    step_complete = tensorrt_progress.BuildPhases.step_complete

    def spy(self, phase_name, step):
        on_main = threading.current_thread() is threading.main_thread()
        calls.append((phase_name, on_main))
        if len(calls) == 1 and stop:
            os.kill(os.getpid(), signal.SIGINT)
        return step_complete(self, phase_name, step)

    monkeypatch.setattr(tensorrt_progress.BuildPhases, "step_complete", spy)
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, directory)
    stop = False
    (built,) = build_engines(directory, components=["unet"], timing_cache=tmp_path / "timing.cache")
    steps = len(calls)
    print(f"TensorRT called step_complete {steps} times, {sum(m for _, m in calls)} on the main thread; "
          f"phases: {sorted({p for p, _ in calls})}")
    assert built.status == "built" and steps > 0

    calls.clear()
    stop = True
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            build_engines(directory, components=["unet"], force=True, timing_cache=tmp_path / "other.cache")
    finally:
        signal.signal(signal.SIGINT, inherited)
    on_main = calls[0][1] if calls else False
    print(f"stopped at the first step: {len(calls)} of {steps} step reports before the build ended "
          f"({'the calling thread' if on_main else 'threads of its own'})")
    if on_main:
        assert len(calls) < steps
    assert set(load_manifest(directory).components["unet"].engines) == {built.key.digest()}

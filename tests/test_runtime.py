"""Runtime: the loop reproduces diffusers over ONNX Runtime and Torch, and refuses bad requests early."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cpu_only, run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import EngineDirError, ProfileError, SdexportError
from sdexport.models import load_model
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.schedulers import SCHEDULERS
from sdexport.runtime.txt2img import GenerationRequest
from sdexport.shapes import ShapeProfile
from sdexport.specs import UNET

LATENT_REL_L2 = 1e-4
PIXEL_MAX_ABS = 1e-4  # pixels in [0, 1]; both backends run fp32, so only float rounding differs


class SpyEngine:
    """Wraps an engine: records each call's batch, or replaces its outputs, keeping spec and profile."""

    def __init__(self, engine, replace=None):
        self.engine, self.replace, self.batches = engine, replace, []
        self.spec, self.profile, self.device = engine.spec, engine.profile, engine.device

    def __call__(self, feed):
        self.batches.append(next(iter(feed.values())).shape[0])
        return self.replace(feed) if self.replace else self.engine(feed)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(tiny_model):
    return DiffusersReference(tiny_model)


@pytest.fixture(scope="module")
def pipelines(tiny_engine_dir):
    with cpu_only():  # the Torch backend on the CPU, as the reference, on any host
        return {b: load_pipeline(tiny_engine_dir, b) for b in ("onnxruntime-cpu", "torch")}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_matches_diffusers_for_every_scheduler(scheduler, reference, pipelines):
    request = GenerationRequest(
        prompt=["a cat", "a dog"], negative_prompt=["blurry", ""], steps=4, scheduler=scheduler,
        seeds=[1, 2], height=64, width=96,
    )
    want = reference(request)
    for backend, pipeline in pipelines.items():
        got = pipeline(request)
        rel = relative_l2(got.latents, want.latents)
        pix = float(np.abs(got.pixels - want.pixels).max())
        print(f"{scheduler} {backend}: latents rel-L2 {rel:.2e}, pixels max-abs {pix:.2e}")
        assert rel < LATENT_REL_L2, (backend, rel)
        assert pix < PIXEL_MAX_ABS, (backend, pix)
        assert got.pixels.shape == (2, 64, 96, 3)


@pytest.fixture(scope="module")
def tiny_v_engine_dir(tmp_path_factory):
    from sdexport.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("engines") / "tiny-v"
    export("tiny-v", out, ExportOptions(components=["text_encoder", "unet", "vae_decoder"], verify="quick"))
    return out


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_matches_diffusers_with_v_prediction(scheduler, tiny_v_engine_dir):
    request = GenerationRequest(prompt=["a cat"], steps=4, scheduler=scheduler, seeds=[7], height=64, width=64)
    want = DiffusersReference(load_model("tiny-v"))(request)
    got = load_pipeline(tiny_v_engine_dir, "onnxruntime-cpu")(request)
    assert json.loads((tiny_v_engine_dir / "scheduler" / "scheduler_config.json").read_text())[
        "prediction_type"] == "v_prediction"
    assert relative_l2(got.latents, want.latents) < LATENT_REL_L2


def test_inspect_names_the_prediction_once(tiny_v_engine_dir, capsys):
    assert run_cli("inspect", tiny_v_engine_dir) == 0
    assert "family sd, v-prediction, fp32" in capsys.readouterr().out


def test_guidance_one_skips_the_unconditional_half(pipelines, reference, monkeypatch):
    request = GenerationRequest(prompt=["a cat"], guidance=1.0, steps=3, scheduler="ddim", seeds=[3], height=64, width=64)
    pipeline = pipelines["onnxruntime-cpu"]
    spy = SpyEngine(pipeline.engines["unet"])
    monkeypatch.setitem(pipeline.engines, "unet", spy)
    got = pipeline(request)
    assert spy.batches == [1, 1, 1]
    assert relative_l2(got.latents, reference(request).latents) < LATENT_REL_L2


def test_guidance_rescale_matches_diffusers(pipelines, reference):
    """diffusers' guidance_rescale, on both backends; and it changes the image (the check is not idle)."""
    request = GenerationRequest(prompt=["a cat", "a dog"], negative_prompt=["blurry", ""], steps=4, scheduler="euler",
                                seeds=[1, 2], height=64, width=64, guidance=9.0, guidance_rescale=0.7)
    want = reference(request)
    plain = reference(GenerationRequest(**{**vars(request), "guidance_rescale": 0.0}))
    assert relative_l2(plain.latents, want.latents) > 100 * LATENT_REL_L2
    for backend, pipeline in pipelines.items():
        assert relative_l2(pipeline(request).latents, want.latents) < LATENT_REL_L2, backend


CONTINUOUS = {  # noise levels, not training indices, reach the U-Net: fractions, and EDM's end negative
    "euler-continuous": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                         "beta_end": 0.012, "timestep_type": "continuous", "use_karras_sigmas": True},
    "edm-euler": {"_class_name": "EDMEulerScheduler", "sigma_data": 0.5, "prediction_type": "epsilon"},
}


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_fractional_timesteps_reach_the_unet_as_diffusers_passes_them(name, tiny_model, pipelines, monkeypatch):
    """Schedulers of continuous timesteps (CosXL, Playground v2.5, EDM) through the whole loop: the
    U-Net is fed each timestep whole, not rounded to an index, on both backends, as diffusers feeds it."""
    from dataclasses import replace

    config = CONTINUOUS[name]
    request = GenerationRequest(prompt=["a cat"], steps=4, seeds=[5], height=64, width=64)
    want = DiffusersReference(replace(tiny_model, scheduler_config=config))(request)
    for backend, pipeline in pipelines.items():
        monkeypatch.setattr(pipeline, "scheduler_config", config)
        fed: list[float] = []
        spy = SpyEngine(pipeline.engines["unet"])
        spy.replace = lambda feed, spy=spy, fed=fed: (fed.append(float(feed["timestep"])), spy.engine(feed))[1]
        monkeypatch.setitem(pipeline.engines, "unet", spy)
        got = pipeline(request)
        assert any(t != round(t) for t in fed), (backend, fed)
        assert relative_l2(got.latents, want.latents) < LATENT_REL_L2, backend


def test_the_images_of_one_call_each_take_their_own_guidance(pipelines):
    """One guidance per image (how a served batch takes requests of different guidance): each image
    is, bit for bit, the image of a call at its own scale, and records that scale."""
    from sdexport.runtime.images import image_parameters

    same = {"prompt": ["a cat", "a dog"], "steps": 3, "scheduler": "euler", "seeds": [1, 2], "height": 64, "width": 64}
    for backend, pipeline in pipelines.items():
        mixed = pipeline(GenerationRequest(**same, guidance=[3.0, 9.5]))
        for i, scale in enumerate([3.0, 9.5]):
            assert torch.equal(mixed.latents[i], pipeline(GenerationRequest(**same, guidance=scale)).latents[i]), backend
        assert [image_parameters(mixed, i, {})[1]["guidance"] for i in range(2)] == [3.0, 9.5]
        assert "CFG scale: 9.5," in image_parameters(mixed, 1, {})[0]


def test_guidance_in_half_precision_is_the_same_per_image_as_for_the_call():
    """``guided`` on the dtypes an fp16 or bf16 U-Net returns: a column of scales gives each image
    what its own scale gives it, bit for bit (the fp32 tiny engines above cannot show rounding)."""
    from sdexport.runtime.txt2img import guidance_factor, guided

    generator = torch.Generator().manual_seed(0)
    scales = [7.3, 5.0, 1.7]
    column = guidance_factor(scales, torch.device("cpu"))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        noise = torch.randn((6, 4, 8, 8), generator=generator).to(dtype)  # unconditional half first
        mixed = guided(noise, column)
        assert mixed.dtype == dtype
        for i, scale in enumerate(scales):
            assert torch.equal(mixed[i], guided(noise, scale)[i]), (dtype, scale)


def test_same_seed_same_image_different_seed_different_image(pipelines):
    pipeline = pipelines["onnxruntime-cpu"]
    a, b, c = (pipeline(GenerationRequest(prompt=["x"], steps=2, seeds=[s], height=64, width=64)) for s in (5, 5, 6))
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


def test_a_result_records_its_request_as_it_ran_though_the_caller_changes_it_after(pipelines):
    """The result's request shared the caller's lists: changing them in place between calls
    (``request.seeds[0] = seed``) made every earlier image's metadata record the last seed and prompt
    (an audit's finding)."""
    request = GenerationRequest(prompt=["a lighthouse"], steps=1, seeds=[0], height=64, width=64)
    results = []
    for seed in (1, 2):
        request.seeds[0], request.prompt[0] = seed, f"a lighthouse {seed}"
        results.append(pipelines["onnxruntime-cpu"](request))
    assert [(r.request.seeds, r.request.prompt) for r in results] == [([1], ["a lighthouse 1"]),
                                                                      ([2], ["a lighthouse 2"])]
    nested = GenerationRequest(prompt=["a"], control_scale=[[0.5, 1.0]])
    copy = nested.detached()
    nested.control_scale[0][0] = 0.9  # type: ignore[index]
    assert copy.control_scale == [[0.5, 1.0]]


def test_timings_cover_every_stage(pipelines):
    # DDIM: one U-Net call per step (PNDM, the SD default, adds one in its first PLMS step)
    result = pipelines["onnxruntime-cpu"](GenerationRequest(prompt=["x"], steps=3, scheduler="ddim", height=64, width=64))
    t = result.timings
    assert len(t.unet_steps) == 3 and all(s > 0 for s in t.unet_steps)
    assert t.text_encoder > 0 and t.vae_decoder > 0 and t.total >= t.unet_total
    assert set(t.to_dict()) >= {"text_encoder", "unet_steps", "vae_decoder", "loop_overhead", "it_per_s"}


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"height": 512}, ProfileError, r"height 512 is outside the engines' profile: height must be in \[64, 256\]"),
        ({"width": 72}, ProfileError, "width 72 must be a multiple of 16"),
        ({"prompt": ["a"] * 3, "seeds": [0, 1, 2]}, ProfileError, r"3 images in one call: the engines. profile takes at most 2; split"),
        ({"prompt": ("a",) * 3, "seeds": [0, 1, 2]}, ProfileError, r"3 images in one call: .*request.split\(2\)"),
        ({"scheduler": "heun9"}, SdexportError, "unknown scheduler 'heun9'"),
        ({"scheduler": ["euler"]}, SdexportError, r"unknown scheduler \['euler'\]; choose one of"),  # (a TypeError)
        ({"prompt": [], "seeds": []}, SdexportError, "no prompt given"),
        ({"guidance": 1e300}, SdexportError, "guidance 1e.300: need a finite number >= 0 .*within float32's range"),
    ],
)
def test_bad_requests_are_refused_before_any_engine_runs(change, error, message, pipelines, monkeypatch):
    pipeline = pipelines["onnxruntime-cpu"]
    spies = {name: SpyEngine(engine) for name, engine in pipeline.engines.items()}
    monkeypatch.setattr(pipeline, "engines", spies)
    fields = {"prompt": ["a"], "height": 64, "width": 64, **change}
    with pytest.raises(error, match=message):
        pipeline(GenerationRequest(**fields))
    assert not any(spy.batches for spy in spies.values())


def test_damaged_engine_directory_is_refused(engine_copy: Path):
    with open(engine_copy / "unet" / "model.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(EngineDirError, match="unet/model.onnx does not match its sha256"):
        load_pipeline(engine_copy)
    (engine_copy / "manifest.json").unlink()
    with pytest.raises(EngineDirError, match="no manifest.json"):
        load_pipeline(engine_copy)


def test_an_engine_that_fails_while_it_runs_ends_in_one_line_not_a_traceback(engine_copy: Path, tmp_path: Path,
                                                                            monkeypatch, capfd):
    """A graph that loads and then fails in a node (here a reshape no image size divides; in the field,
    out of memory) is the run's failure, not the input's: one line naming the engine with ONNX
    Runtime's own words, exit 1, nothing written; ONNX Runtime's raw copy of the error is not printed
    first (it shows with -v). The torch backend says the same of its module."""
    from onnx import TensorProto, helper

    from sdexport.errors import EngineRunError
    from sdexport.runtime import torch_backend

    path = _end_the_decoder_with(engine_copy, [
        helper.make_node("Shape", ["before"], ["its_shape"]),
        helper.make_node("Reshape", ["before", "by_sevens"], ["sevens"]),
        helper.make_node("Reshape", ["sevens", "its_shape"], ["after"])],
        helper.make_tensor("by_sevens", TensorProto.INT64, [2], [-1, 7]))
    out = tmp_path / "x.png"
    assert run_cli("run", engine_copy, "-p", "x", "--steps", "2", "-o", out) == 1
    err = capfd.readouterr().err
    assert f"error: {path}: onnxruntime failed while it ran (" in err and "cannot be reshaped" in err
    assert "Traceback" not in err and "[E:onnxruntime" not in err
    assert not out.exists()

    class OutOfMemory(torch.nn.Module):
        def forward(self, *inputs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    spec = dataclasses.replace(UNET, wrapper=lambda module: OutOfMemory())
    with torch_backend.TorchEngine(spec, torch.nn.Identity(), profile=ShapeProfile.single(1, 64, 64),
                                   device=torch.device("cpu")) as engine, \
            pytest.raises(EngineRunError, match=r"^unet: torch failed while it ran \(CUDA out of memory\. Tried to "
                                                r"allocate 2\.00 GiB\); a smaller batch or image needs less memory$"):
        engine({t.name: torch.zeros(1) for t in UNET.inputs})


def _end_the_decoder_with(engine_dir: Path, nodes: list, *initializers) -> Path:
    """Put ``nodes`` (from "before", the decoder's output, to "after", what it returns now) at the
    end of the VAE decoder's graph, and record its new hash, as a hand-edited or foreign graph."""
    import onnx

    from sdexport.manifest import sha256_file

    path = engine_dir / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["before" if o == output else o for o in node.output]
    for node in nodes:
        node.output[:] = [output if o == "after" else o for o in node.output]
    graph.initializer.extend(initializers)
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["files"]["vae_decoder/model.onnx"] = sha256_file(path)
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_graph_whose_outputs_have_other_sizes_than_the_call_needs_is_refused(engine_copy: Path, tmp_path: Path,
                                                                               capsys):
    """Load checks a graph's names, dtypes and ranks. A decoder returning half-size images made `run`
    save a 64x64 PNG recorded as 128x128 (and serve answer 200 with it); one returning a single image
    for a batch of two listed two files and wrote one. Each call's outputs are held to the spec's
    sizes: one line, exit 1, nothing written."""
    from onnx import helper

    path = _end_the_decoder_with(engine_copy, [helper.make_node("MaxPool", ["before"], ["after"], kernel_shape=[2, 2],
                                                                strides=[2, 2])])
    out = tmp_path / "x.png"
    assert run_cli("run", engine_copy, "-p", "x", "--steps", "2", "--height", "128", "--width", "128", "-o", out) == 1
    assert (f"error: {path}: onnxruntime failed while it ran (it returned vae_decoder.sample of shape [1, 3, 64, 64] "
            "where this call needs [1, 3, 128, 128]: the graph does not compute what a vae_decoder does)"
            in capsys.readouterr().err)
    assert not out.exists()


def test_cli_run_writes_pngs_with_parameters(tiny_engine_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "img.png"
    code = run_cli("run", tiny_engine_dir, "-p", "a red fox", "-n", "blurry", "--steps", "3", "--batch", "2",
                   "--scheduler", "dpmpp_2m_karras", "--seed", "42", "--height", "64", "--width", "128", "-o", out)
    assert code == 0
    captured = capsys.readouterr()
    assert "it/s" in captured.err and "img-1.png" in captured.out
    image = Image.open(tmp_path / "img-1.png")
    assert image.size == (128, 64)
    params = json.loads(image.text["sdexport"])
    assert params["seed"] == 43 and params["scheduler"] == "dpmpp_2m_karras" and params["random_weights"]
    assert "Negative prompt: blurry" in image.text["parameters"]


def test_the_timing_line_counts_one_step_as_one(tiny_engine_dir: Path, tmp_path: Path, capsys):
    """It said "U-Net 4.1 ms (1 steps; ...)" (an audit)."""
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "--scheduler", "ddim", "-o", tmp_path / "x.png") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert " ms (1 step; " in err, err


def test_cli_run_refuses_size_outside_profile(tiny_engine_dir: Path, tmp_path: Path, capsys):
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--height", "1024", "-o", tmp_path / "x.png") == 2
    assert "height 1024 is outside the engines' profile" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_run_unknown_backend(tiny_engine_dir: Path, capsys):
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--backend", "openvino") == 2
    assert "unknown backend 'openvino'" in capsys.readouterr().err


def test_fp16_vae_overflow_falls_back_or_refuses(pipelines, monkeypatch):
    pipeline = pipelines["onnxruntime-cpu"]
    vae = pipeline.engines["vae_decoder"]
    overflowing = SpyEngine(vae, replace=lambda feed: {"sample": torch.full((1, 3, 64, 64), float("nan"))})
    monkeypatch.setitem(pipeline.engines, "vae_decoder", overflowing)
    request = GenerationRequest(prompt=["x"], steps=1, height=64, width=64)
    with pytest.raises(SdexportError, match="NaN/Inf"):
        pipeline(request)
    monkeypatch.setattr(pipeline, "fallback_vae", vae)
    result = pipeline(request)
    assert result.vae_fallback and np.isfinite(result.pixels).all()
    assert result.info["vae_decoder"] == "fp32" and "vae_decoder" not in pipeline.info  # the images say what decoded them


def test_an_overflow_of_a_vae_part_a_build_lowered_names_the_fp32_build(pipelines, tiny_engine_dir, monkeypatch):
    """An fp32 export's decoder or encoder that ``sdexport build`` made fp16 (``lowered``, from
    ``runs_lowered`` at load) has no fp32 graph beside it: its overflow is blamed on fp16, with the
    build that runs it in fp32 for the backend."""
    from sdexport.runtime import loading
    from sdexport.runtime.txt2img import lowered_overflow

    pipeline = pipelines["onnxruntime-cpu"]
    nan = SpyEngine(pipeline.engines["vae_decoder"], replace=lambda feed: {"sample": torch.full((1, 3, 64, 64), float("nan"))})
    monkeypatch.setitem(pipeline.engines, "vae_decoder", nan)
    request = GenerationRequest(prompt=["x"], steps=1, height=64, width=64)
    with pytest.raises(SdexportError, match="the fp32 VAE decoder produced NaN/Inf"):
        pipeline(request)
    monkeypatch.setattr(pipeline, "lowered", frozenset({"vae_decoder"}))
    with pytest.raises(SdexportError, match=r"fp16 overflow: `sdexport build --target onnxruntime-cuda` converted") as info:
        pipeline(request)
    assert "--target onnxruntime-cuda --fp32 --components vae_decoder" in str(info.value)
    said = lowered_overflow({"backend": "tensorrt", "engine_dir": "sd15"}, "vae_decoder")
    assert "TensorRT plan was built with the fp16 flag" in said and "`sdexport build sd15 --fp32 --components vae_decoder`" in said
    # the encoder alike
    with load_pipeline(tiny_engine_dir, "onnxruntime-cpu", image_inputs=True) as img2img:
        nan = SpyEngine(img2img.engines["vae_encoder"], replace=lambda feed: {"latent_parameters": torch.full((1, 8, 8, 8), float("nan"))})
        monkeypatch.setitem(img2img.engines, "vae_encoder", nan)
        with pytest.raises(SdexportError, match="the fp32 VAE encoder produced NaN/Inf"):
            img2img.encode(torch.zeros(1, 3, 64, 64), [torch.Generator().manual_seed(0)])
        monkeypatch.setattr(img2img, "lowered", frozenset({"vae_encoder"}))
        with pytest.raises(SdexportError, match="VAE encoder produced NaN/Inf .*fp16 overflow.*--fp32 --components vae_encoder"):
            img2img.encode(torch.zeros(1, 3, 64, 64), [torch.Generator().manual_seed(0)])
    # load_pipeline asks runs_lowered of the VAE parts it runs and of the U-Net (emphasis's range), of nothing else
    asked: list[str] = []

    def lowered(engine_dir, manifest, name, *args):
        asked.append(name)
        return name == "vae_encoder"

    monkeypatch.setattr(loading, "runs_lowered", lowered)
    with load_pipeline(tiny_engine_dir, "onnxruntime-cpu", image_inputs=True) as loaded:
        assert loaded.lowered == {"vae_encoder"} and sorted(asked) == ["unet", "vae_decoder", "vae_encoder"]


def test_fp16_export_runs_and_keeps_an_fp32_fallback_vae(tiny_fp16_engine_dir: Path, reference):
    from sdexport.manifest import load_manifest

    out = tiny_fp16_engine_dir  # export("tiny", out, ExportOptions(dtype="fp16", verify="quick")), shared
    manifest = load_manifest(out)
    assert manifest.components["vae_decoder_fp32"].dtype == "fp32"
    assert manifest.components["unet"].dtype == "fp16"
    pipeline = load_pipeline(out, "onnxruntime-cpu")
    assert pipeline.fallback_vae is not None
    assert not pipeline.upcast_vae  # its VAE config's force_upcast (true) is SDXL's to honour, as in diffusers
    request = GenerationRequest(prompt=["a cat"], steps=4, scheduler="euler", seeds=[1], height=64, width=64)
    got, want = pipeline(request), reference(request)
    rel = relative_l2(got.latents, want.latents)
    print(f"fp16 ORT vs fp32 diffusers: latents rel-L2 {rel:.2e}")
    assert rel < 5e-2 and not got.vae_fallback


def test_the_torch_backends_fp32_vae_parts_keep_the_weights_as_loaded_beside_fp16_ones(tiny_fp16_engine_dir: Path):
    """On a GPU an fp16 export's Torch modules run in fp16, while the VAE decoder's fp32 fallback
    shares their module: each dtype gets its own copy, taken before any engine converts the module
    in place (a copy taken after held fp16-rounded weights). The GPU's dtype choice, asked for on
    the CPU."""
    from sdexport.build.vae_upcast import upcast_parts
    from sdexport.manifest import load_manifest
    from sdexport.runtime.loading import _torch_engines, pipeline_components

    manifest = load_manifest(tiny_fp16_engine_dir, verify_files=False)
    names = pipeline_components(manifest, True, upcast=upcast_parts(tiny_fp16_engine_dir, manifest))
    assert names.index("vae_decoder") < names.index("vae_decoder_fp32")  # the fp16 part converts first
    engines = _torch_engines(manifest, names, compile=False, device=torch.device("cpu"), dtype=torch.float16)
    source = manifest.model["source"]
    loaded = dict(load_model(source["name"], seed=source.get("seed", 0)).modules["vae"].named_parameters())
    kept = dict(engines["vae_decoder_fp32"].module.model.named_parameters())
    assert all(p.dtype == torch.float32 and torch.equal(p, loaded[k]) for k, p in kept.items())
    for fp16 in ("vae_decoder", "vae_encoder"):  # (the encoder shares the fp16 module)
        assert next(engines[fp16].module.model.parameters()).dtype == torch.float16


def test_closing_an_onnxruntime_engine_releases_its_session(tiny_engine_dir: Path):
    """``close`` lets the session (and its memory arena) go at once, not whenever the engine itself is
    collected: a server that replaces its model gets the memory back."""
    import gc
    import weakref

    from sdexport.manifest import load_manifest
    from sdexport.runtime.onnxruntime_backend import OnnxRuntimeEngine

    manifest = load_manifest(tiny_engine_dir)
    with OnnxRuntimeEngine(manifest.spec("text_encoder"), tiny_engine_dir / manifest.components["text_encoder"].onnx,
                           dims=manifest.model_dims, profile=manifest.shape_profile) as engine:
        session = weakref.ref(engine.session)
    gc.collect()
    assert engine.session is None and session() is None


def test_runtime_does_not_hash_plans_for_other_gpus(engine_copy: Path, monkeypatch):
    """A plan is checked only by the TensorRT loader that picks it, never by every backend's load."""
    from sdexport.manifest import load_manifest, save_manifest

    manifest = load_manifest(engine_copy)
    (engine_copy / "unet" / "other-gpu.plan").write_bytes(b"plan built elsewhere")
    manifest.files["unet/other-gpu.plan"] = "0" * 64  # would not match if it were hashed
    save_manifest(engine_copy, manifest)
    load_pipeline(engine_copy, "onnxruntime-cpu")
    with pytest.raises(EngineDirError, match="other-gpu.plan does not match"):
        load_manifest(engine_copy)  # `sdexport inspect` still checks everything


class BufferReusingEngine(SpyEngine):
    """Returns the same output tensor every call, overwritten in place, as TensorRT does."""

    def __call__(self, feed):
        result = self.engine(feed)
        if not hasattr(self, "buffers"):
            self.buffers = {k: v.clone() for k, v in result.items()}
        for name, value in result.items():
            self.buffers[name].copy_(value)
        return self.buffers


def test_engines_that_reuse_output_buffers_give_the_same_images(pipelines, monkeypatch):
    """Without CFG the U-Net output goes straight to the scheduler; PNDM keeps past outputs."""
    pipeline = pipelines["onnxruntime-cpu"]
    request = GenerationRequest(prompt=["x"], guidance=1.0, steps=6, scheduler="pndm", height=64, width=64)
    want = pipeline(request).latents
    monkeypatch.setitem(pipeline.engines, "unet", BufferReusingEngine(pipeline.engines["unet"]))
    assert torch.equal(pipeline(request).latents, want)


def test_cli_run_refuses_a_directory_as_output(tiny_engine_dir: Path, tmp_path: Path, capsys):
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "-o", tmp_path) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    # a folder that does not exist yet, named as one: not a file called like it, nor -0.png files beside it
    for batch in ("1", "2"):
        assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "--batch", batch, "-o", f"{tmp_path / 'new'}/") == 2
        assert f"-o {tmp_path / 'new'}/: a folder (it ends in a separator); give a file name such as" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_torch_backend_keeps_an_fp16_export_and_its_fp32_fallback_apart(tmp_path):
    """The fp16 decoder and the fp32 fallback wrap the same VAE; converting one must not convert
    the other (on a GPU the Torch backend runs fp16 exports in fp16)."""
    import torch

    from sdexport.export.exporter import ExportOptions, export
    from sdexport.manifest import load_manifest
    from sdexport.runtime.loading import _torch_engines

    out = tmp_path / "fp16"
    export("tiny", out, ExportOptions(dtype="fp16", verify="none", components=["vae_decoder", "vae_decoder_fp32"]))
    engines = _torch_engines(load_manifest(out), ["vae_decoder", "vae_decoder_fp32"], compile=False,
                             device=torch.device("cpu"), dtype=torch.float16)
    latent = {"latent_sample": torch.randn(1, 4, 8, 8)}
    half, full = engines["vae_decoder"](latent)["sample"], engines["vae_decoder_fp32"](latent)["sample"]
    assert next(engines["vae_decoder"].module.parameters()).dtype == torch.float16
    assert next(engines["vae_decoder_fp32"].module.parameters()).dtype == torch.float32
    assert torch.allclose(half, full, atol=5e-2)


@pytest.mark.parametrize(("value", "threads"), [("3", 3), ("1", 1), ("4 ", 4), ("2,1", 2), (None, 0), ("", 0), ("0", 0),
                                                ("two", 0), ("²", 0), ("100000", 8)])
def test_onnxruntime_sessions_take_the_cpu_threads_omp_num_threads_gives(monkeypatch, value, threads):
    """One setting for sdexport's CPU threads: torch reads OMP_NUM_THREADS, ONNX Runtime's sessions
    are given it (0: ONNX Runtime's own default, a thread per core), at most the CPUs there are
    (8 here): 100000 started 17,000 threads."""
    import onnxruntime as ort

    from sdexport import console
    from sdexport.console import onnxruntime_session_options

    monkeypatch.setattr(console, "usable_cpus", lambda: 8)

    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert onnxruntime_session_options(ort).intra_op_num_threads == threads


def test_a_request_without_a_size_takes_its_images_or_the_profiles_opt(tiny_engine_dir):
    """As `sdexport run` and diffusers' pipelines: the init image's (or init latents', or first
    control or adapter image's) size, else the size the engines are made for; not a fixed 512."""
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu", image_inputs=True)
    opt = (pipeline.profile.height[1], pipeline.profile.width[1])
    result = pipeline(GenerationRequest(prompt=["a cat"], steps=2))
    assert result.request.size == opt and result.images[0].size == opt[::-1]
    result = pipeline(GenerationRequest(prompt=["a cat"], steps=2, image=Image.new("RGB", (192, 64)), height=None))
    assert result.request.size == (64, 192) and result.images[0].size == (192, 64)
    latents = pipeline(GenerationRequest(prompt=["a cat"], steps=2, height=64, width=128)).latents
    request = GenerationRequest(prompt=["a cat"], init_latents=latents, denoising_start=0.5)
    assert pipeline.sized(request).size == (64, 128)
    assert pipeline.sized(GenerationRequest(prompt=["a cat"], width=64)).size == (opt[0], 64)
    with pytest.raises(SdexportError, match="height or width is not set yet"):
        _ = GenerationRequest(prompt=["a cat"]).size
    # split, each part with its own control image: every part takes the whole request's size
    maps = [Image.new("RGB", (128, 128)), Image.new("RGB", (192, 256))]
    parts = GenerationRequest(prompt=["a", "b"], seeds=[0, 1], control_image=[maps]).split(1)
    assert [(p.height, p.width) for p in parts] == [(128, 128)] * 2


def test_pixels_are_rounded_to_eight_bits_as_diffusers_rounds_them():
    """diffusers' numpy_to_pil rounds; truncating instead darkens every pixel by half a level on average."""
    from sdexport.runtime.txt2img import to_pil

    [image] = to_pil(np.array([[[[0.999, 0.5, 0.0021]]]], dtype=np.float32))
    assert image.getpixel((0, 0)) == (255, 128, 1)


def test_a_directory_replaced_after_its_check_or_while_it_loads_is_refused(engine_copy, tiny_fp16_engine_dir,
                                                                           monkeypatch):
    """An audit's race: run hashed one export, then `export --force` swapped in another, and run made
    that one's images (or, swapped during the load, images of one's text encoder and U-Net and the
    other's VAE decoder). The manifest's files are held to the ones checked, before and after the load."""
    import shutil

    from sdexport.manifest import load_manifest
    from sdexport.runtime import loading

    checked = load_manifest(engine_copy, verify_files=False).files
    with pytest.raises(EngineDirError, match="the directory changed after its files were checked"):
        load_pipeline(engine_copy, "onnxruntime-cpu", verify_files=False,
                      hashed={**checked, "unet/model.onnx": "0" * 64})
    with pytest.raises(EngineDirError, match="the directory changed after its files were checked"):
        load_pipeline(engine_copy, "onnxruntime-cpu", verify_files=False, hashed={**checked, "unet/gone.plan": "0" * 64})
    # a file listed since the check (a build's new plan), before the load: no reason to refuse (a run
    # started beside a build failed so); what the load reads is hashed as it loads
    listed = json.loads((engine_copy / "manifest.json").read_text())
    (engine_copy / "manifest.json").write_text(json.dumps({**listed, "files": {**checked, "unet/new.plan": "0" * 64}}))
    verified = []
    monkeypatch.setattr(loading, "verify_for_backend", lambda *args, **kwargs: verified.append(args[2]))
    load_pipeline(engine_copy, "onnxruntime-cpu", verify_files=False, hashed=checked).close()
    assert verified == ["onnxruntime-cpu"]
    monkeypatch.undo()
    (engine_copy / "manifest.json").write_text(json.dumps(listed))
    real = loading._load_engines

    def planned_meanwhile(*args, **kwargs):  # a build listing a new plan: nothing the load read
        engines = real(*args, **kwargs)
        data = json.loads((engine_copy / "manifest.json").read_text())
        data["files"]["unet/other.plan"] = "0" * 64
        (engine_copy / "manifest.json").write_text(json.dumps(data))
        return engines

    monkeypatch.setattr(loading, "_load_engines", planned_meanwhile)
    load_pipeline(engine_copy, "onnxruntime-cpu", verify_files=False, hashed=checked).close()
    (engine_copy / "manifest.json").write_text(json.dumps({**json.loads((engine_copy / "manifest.json").read_text()),
                                                          "files": checked}))

    def swapped_meanwhile(*args, **kwargs):
        engines = real(*args, **kwargs)
        shutil.rmtree(engine_copy)
        shutil.copytree(tiny_fp16_engine_dir, engine_copy)
        return engines

    monkeypatch.setattr(loading, "_load_engines", swapped_meanwhile)
    with pytest.raises(EngineDirError, match="the directory changed while its engines loaded"):
        load_pipeline(engine_copy, "onnxruntime-cpu", verify_files=False, hashed=checked)

    def gone_meanwhile(*args, **kwargs):  # mid-swap: the old directory gone, the new one not yet in place
        engines = real(*args, **kwargs)
        (engine_copy / "manifest.json").unlink()
        return engines

    # (mutation testing round 8: a manifest unreadable after the load, taken as unchanged, failed no test)
    monkeypatch.setattr(loading, "_load_engines", gone_meanwhile)
    with pytest.raises(EngineDirError, match="the directory changed while its engines loaded"):
        load_pipeline(engine_copy, "onnxruntime-cpu", verify_files=False)
    shutil.rmtree(engine_copy)
    shutil.copytree(tiny_fp16_engine_dir, engine_copy)
    monkeypatch.setattr(loading, "_load_engines", real)
    load_pipeline(engine_copy, "onnxruntime-cpu").close()  # (the new export, checked, loads)

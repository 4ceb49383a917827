"""Union ControlNets (diffusers' ControlNetUnionModel, xinsir's controlnet-union-sdxl) through the
same specs, engines and loop: parity with diffusers' union pipelines (one image, several images
with their own scales and windows, several union ControlNets, guess mode, img2img, inpainting, ONNX
Runtime and Torch), the attention over the batch that the published model computes, its specs,
manifest and TensorRT profiles, serving, the benchmark, and the refusals a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pictures import box_mask, picture
from PIL import Image
from test_controlnet import TOLERANCE, _agree, _rel, bench_agreeing, no_engines, watch  # noqa: F401  (no_engines: a fixture)

from conftest import MadeOnFirstUse, run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.controlnet import CONTROLNET_PRESETS, preset_config
from sdexport.models.presets import PRESETS
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("without_gpu")

MODELS = {  # name: (ControlNets, images each takes per call)
    "one": (["tiny-union"], 1),
    "two-images": (["tiny-union"], 2),
    "two-nets": (["tiny-union", "tiny-union"], 1),  # diffusers' MultiControlNetUnionModel; -m slow
}
SLOW = pytest.mark.slow
"""On the cases of two union ControlNets, a combination whose parts the default run checks apart
(a union ControlNet here, several ControlNets in tests/test_controlnet.py): left to ``-m slow``,
with the export only they read. By default: the model index such a directory has (the
pipeline-directory test below), and each net's image, modes and window as the loop hands them over
(test_two_union_controlnets_each_get_their_own_image_modes_and_scales)."""
NAMES = [pytest.param(name, marks=SLOW) if name == "two-nets" else name for name in MODELS]


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory) -> MadeOnFirstUse[Path]:
    root = tmp_path_factory.mktemp("union")

    def make(name: str) -> Path:
        nets, images = MODELS[name]
        export("tiny-sdxl", root / name, ExportOptions(verify="quick", controlnets=nets, union_images=images))
        return root / name

    return MadeOnFirstUse(MODELS, make)


@pytest.fixture(scope="module")
def references() -> MadeOnFirstUse[DiffusersReference]:
    return MadeOnFirstUse(MODELS, lambda name: DiffusersReference(
        load_model("tiny-sdxl", controlnets=MODELS[name][0], union_images=MODELS[name][1])))


def _request(name: str, **changes) -> GenerationRequest:
    images = 2 if name != "one" else 1
    request = GenerationRequest(
        prompt=["a lighthouse", "a harbour"], negative_prompt=["fog", "rain"], steps=6, seeds=[3, 4], height=64,
        width=128, scheduler="euler_a",
        # 80x100: resized to 64x128 by both, so the preprocessing is compared too
        control_image=[picture(80, 100, 10 + i) for i in range(images)], control_mode=[3, 1][:images],
        control_scale=[0.8, 1.3][:images],
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_union_pipeline(engine_dirs, references, name, backend):
    """StableDiffusionXLControlNetUnionPipeline (two union ControlNets: its MultiControlNetUnionModel),
    same seeds, batch 2 with CFG, a scale per image, a stochastic scheduler; the modes and the images
    both change the result. Control images per prompt (its batch of control images, whose rows the
    network attends across) agree too."""
    pipeline = load_pipeline(engine_dirs[name], backend)
    ours = pipeline(_request(name))
    _agree(ours, references[name](_request(name)))
    assert ours.timings.controlnet_steps
    modes = pipeline(_request(name, control_mode=[0, 5][:len(_request(name).control_image)]))
    assert _rel(modes, ours) > 10 * TOLERANCE
    images = pipeline(_request(name, control_image=[picture(80, 100, 20 + i)
                                                    for i in range(len(_request(name).control_image))]))
    assert _rel(images, ours) > 10 * TOLERANCE
    if backend == "onnxruntime-cpu":  # the first place takes one image per prompt
        per_prompt = _request(name)
        per_prompt.control_image = [[picture(80, 100, 30), picture(80, 100, 31)], *per_prompt.control_image[1:]]
        _agree(pipeline(per_prompt), references[name](per_prompt))


def test_a_base_model_cut_for_a_refiner_weighs_the_union_windows_over_the_whole_schedule(engine_dirs, references):
    """diffusers' SDXL union pipeline with ``denoising_end``, as its plain one: each image's window
    is a share of the whole schedule, weighed before the timesteps are cut."""
    request = _request("one", control_start=0.0, control_end=0.5, denoising_end=0.6)
    ours = load_pipeline(engine_dirs["one"], "onnxruntime-cpu")(request)
    assert _rel(ours, references["one"](request)) < TOLERANCE and len(ours.timings.controlnet_steps) == 3


def test_windows_per_image_and_the_steps_a_union_controlnet_runs(engine_dirs, references):
    """Each image has its own window. One union ControlNet taking several images runs at every step
    (diffusers scales those images' features inside it, so it adds residuals even where every
    window is closed); one taking one image is skipped outside its window (it would add zeros)."""
    pipeline = load_pipeline(engine_dirs["two-images"], "onnxruntime-cpu")
    calls = watch(pipeline)
    # 6 steps: image 1 acts at step 0, image 2 at steps 3-5; steps 1 and 2 have both windows closed
    windows = _request("two-images", control_start=[0.0, 0.5], control_end=[0.3, 1.0])
    _agree(pipeline(windows), references["two-images"](windows))
    scales = [feed["conditioning_scale"] for engine, feed in calls if engine == "controlnet"]
    torch.testing.assert_close(torch.stack(scales), torch.tensor([[0.8, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.3],
                                                                  [0.0, 1.3], [0.0, 1.3]]))
    single = load_pipeline(engine_dirs["one"], "onnxruntime-cpu")
    calls = watch(single)
    early = _request("one", control_end=0.5)
    _agree(single(early), references["one"](early))
    assert [engine for engine, _ in calls].count("controlnet") == 3


@pytest.mark.parametrize("name", ["one", "two-images"])
def test_guess_mode_matches_diffusers(engine_dirs, references, name, monkeypatch):
    """Without CFG as diffusers' union pipeline runs it; with CFG as it would, were it to give its union
    ControlNet the one-hot modes at the batch it runs at (diffusers 0.42 gives it the guidance
    batch's, twice as many rows, and fails): sdexport runs the conditional half, as for every
    ControlNet."""
    pipeline = load_pipeline(engine_dirs[name], "onnxruntime-cpu")
    calls = watch(pipeline)
    plain = _request(name, guess_mode=True, guidance=1.0, negative_prompt=None)
    _agree(pipeline(plain), references[name](plain))
    reference = references[name]
    net = reference.pipe.controlnet
    forward = net.forward

    def at_its_batch(sample, timestep, encoder_hidden_states, controlnet_cond, control_type, *args, **kwargs):
        return forward(sample, timestep, encoder_hidden_states, controlnet_cond, control_type[:sample.shape[0]],
                       *args, **kwargs)

    monkeypatch.setattr(net, "forward", at_its_batch)
    calls.clear()
    request = _request(name, guess_mode=True)
    result = pipeline(request)
    _agree(result, reference(request))
    assert result.guess_mode
    assert {feed["control_type"].shape[0] for engine, feed in calls if engine == "controlnet"} == {2}


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpainting_match_diffusers(engine_dirs, references, task):
    """StableDiffusionXLControlNetUnionImg2ImgPipeline and ...UnionInpaintPipeline, at their defaults
    (strength, ControlNet scale, guidance) where the request gives none."""
    pipeline = load_pipeline(engine_dirs["two-images"], "onnxruntime-cpu", image_inputs=True)
    request = _request("two-images", image=[picture(64, 128, 30)], control_scale=None, guidance=None,
                       mask=[box_mask(64, 128)] if task == "inpaint" else None)
    _agree(pipeline(request), references["two-images"](request))


def test_the_defaults_are_the_union_pipelines():
    """The tables the runtime fills a request from agree with the union pipelines' signatures."""
    import inspect

    import diffusers

    for task, cls in (("txt2img", diffusers.StableDiffusionXLControlNetUnionPipeline),
                      ("img2img", diffusers.StableDiffusionXLControlNetUnionImg2ImgPipeline),
                      ("inpaint", diffusers.StableDiffusionXLControlNetUnionInpaintPipeline)):
        defaults = inspect.signature(cls.__call__).parameters
        request = GenerationRequest(prompt=["x"], image=[picture(8, 8, 0)] if task != "txt2img" else None,
                                    mask=[box_mask(8, 8)] if task == "inpaint" else None,
                                    control_image=[picture(8, 8, 0)], control_mode=[0])
        assert request.control_settings(1, "sdxl")[0][0] == defaults["controlnet_conditioning_scale"].default
        assert request.effective_guidance("sdxl") == defaults["guidance_scale"].default
        if task != "txt2img":
            assert request.effective_strength("sdxl") == defaults["strength"].default


def test_the_rows_of_a_call_attend_to_each_other(engine_dirs):
    """The union model's attention runs over the batch (diffusers' code, with which the published
    weights were trained): computed by hand with the module's weights, exactly. So a row's residuals
    depend on the other rows' control images where they differ, in the engine as in diffusers."""
    from sdexport.export.inputs import sample_inputs
    from sdexport.specs import _attention_over_the_batch

    attention = torch.nn.MultiheadAttention(32, 8).eval()
    tokens = torch.randn(3, 2, 32)  # (batch, K + 1, width), as the union model hands them
    with torch.no_grad():
        expected = attention(tokens, tokens, tokens, need_weights=False)[0]
        computed = _attention_over_the_batch()(attention)(tokens, tokens, tokens, need_weights=False)[0]
    torch.testing.assert_close(computed, expected, rtol=1e-5, atol=1e-6)
    manifest = load_manifest(engine_dirs["one"])
    engine = load_pipeline(engine_dirs["one"], "onnxruntime-cpu").engines["controlnet"]
    feed = {name: torch.from_numpy(value) for name, value in
            sample_inputs(manifest.spec("controlnet"), manifest.model_dims.sizes(2, 64, 64), vocab_size=100).items()}
    alone = {name: value[:1] if value.dim() and value.shape[0] == 2 and name != "control_type_idx" else value
             for name, value in feed.items()}
    first = engine(feed)["down_block_res_samples.0"][:1]
    assert float((first - engine(alone)["down_block_res_samples.0"]).abs().max()) > 1e-3
    same = {**feed, "controlnet_cond": feed["controlnet_cond"][:1].expand_as(feed["controlnet_cond"]).contiguous()}
    torch.testing.assert_close(engine(same)["down_block_res_samples.0"][:1],
                               engine({**alone, "controlnet_cond": same["controlnet_cond"][:1]})["down_block_res_samples.0"],
                               rtol=1e-4, atol=1e-5)


def test_specs_and_manifest_describe_the_union_inputs(engine_dirs):
    manifest = load_manifest(engine_dirs["two-images"])
    assert (manifest.dims["K"], manifest.dims["N"]) == (2, 8)
    spec = manifest.spec("controlnet")
    assert spec.union and spec.input_names[-4:] == ["controlnet_cond", "control_type", "control_type_idx",
                                                   "conditioning_scale"]
    graph = onnx.load(str(engine_dirs["two-images"] / "controlnet" / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["controlnet_cond"] == ["B", 2, 3, "H", "W"]
    assert dims["control_type"] == ["B", 8] and dims["control_type_idx"] == [2]
    assert "K" not in load_manifest(engine_dirs["one"]).spec("unet").input_names


@pytest.mark.parametrize("damage", ["no N", "K above N"])
def test_a_manifest_with_half_the_union_dims_is_refused(engine_dirs, tmp_path, capsys, damage):
    import shutil

    directory = tmp_path / "d"
    shutil.copytree(engine_dirs["one"], directory)
    data = json.loads((directory / "manifest.json").read_text())
    if damage == "no N":
        del data["dims"]["N"]
    else:  # (more images per call than the modes they could each have)
        data["dims"].update(N=2, K=3)
    (directory / "manifest.json").write_text(json.dumps(data))
    assert run_cli("inspect", directory) == 2
    assert "union ControlNets need dims.residuals, dims.N" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.1"], ids=["trt10", "trt11"])
def test_tensorrt_profiles_cover_the_union_inputs(engine_dirs, tmp_path, monkeypatch, version):
    """The profiles come from the specs: K images on the guidance batch, one mode each."""
    from test_tensorrt_fakes import build_profiles

    (net,) = build_profiles(monkeypatch, tmp_path, version, engine_dirs["two-images"], ["controlnet"])
    profile = net["profiles"][0]
    # tiny profile: batch 1-2 (CFG: up to 4), sides 64-256 px
    cond = profile["controlnet_cond"]
    assert (tuple(cond.min), tuple(cond.max)) == ((1, 2, 3, 64, 64), (4, 2, 3, 256, 256))
    assert (tuple(profile["control_type"].min), tuple(profile["control_type"].max)) == ((1, 8), (4, 8))
    for name in ("control_type_idx", "conditioning_scale"):
        assert tuple(profile[name].min) == tuple(profile[name].max) == (2,)


def test_onnxruntime_fusions_keep_the_attention_over_the_batch(engine_dirs, tmp_path):
    """``build --target onnxruntime-cuda`` fuses a union ControlNet as a U-Net: the fusions ONNX Runtime
    runs on a CPU compute what the portable graph computes, rows with their own images included."""
    import onnxruntime as ort

    from sdexport.build import onnxruntime_build as ob
    from sdexport.export import graph
    from sdexport.export.inputs import sample_inputs

    portable = engine_dirs["two-images"] / "controlnet" / "model.onnx"
    fused, stats = ob.fuse(onnx.load(str(portable)), "unet", fp16=False, gpu=False)
    assert stats["MultiHeadAttention"] > 0
    graph.save(fused, tmp_path / "fused.onnx")
    manifest = load_manifest(engine_dirs["two-images"])
    feed = sample_inputs(manifest.spec("controlnet"), manifest.model_dims.sizes(3, 64, 64), vocab_size=100)
    for ours, theirs in zip(ort.InferenceSession(str(tmp_path / "fused.onnx")).run(None, feed),
                            ort.InferenceSession(str(portable)).run(None, feed)):
        assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_the_union_wrapper_compiles_as_one_graph():
    """``torch-compile-max`` compiles with ``fullgraph=True``: the modes' lookup must not break the
    graph (a 0-d index does), and the compiled wrapper computes what the module does."""
    from sdexport.export.inputs import sample_inputs
    from sdexport.specs import component

    model = load_model("tiny-sdxl", controlnets=["tiny-union"], union_images=2)
    spec = component("sdxl", "controlnet").for_model(model.dims)
    wrapper = spec.wrapper(model.module("controlnet")).eval()
    feed = [torch.from_numpy(v) for v in
            sample_inputs(spec, model.dims.sizes(2, 64, 64), vocab_size=100).values()]
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(wrapper, backend="eager", fullgraph=True)(*feed)
        for ours, theirs in zip(compiled, wrapper(*feed)):
            torch.testing.assert_close(ours, theirs)


def test_a_hand_edited_images_per_call_is_refused_when_engines_load(engine_dirs, tmp_path, capsys):
    """dims.K that the graph does not have: one line when the ONNX Runtime session loads, not an
    error in the loop."""
    import shutil

    directory = tmp_path / "d"
    shutil.copytree(engine_dirs["two-images"], directory)
    data = json.loads((directory / "manifest.json").read_text())
    data["dims"]["K"] = 3
    (directory / "manifest.json").write_text(json.dumps(data))
    picture(64, 64, 0).save(tmp_path / "edges.png")
    images = [arg for mode in (1, 2, 3) for arg in ("--control-image", tmp_path / "edges.png", "--control-mode", mode)]
    assert run_cli("run", directory, "-p", "x", "-o", tmp_path / "o.png", "--steps", "1", "--backend",
                   "onnxruntime-cpu", *images) == 2
    err = capsys.readouterr().err
    assert "controlnet_cond has size 2 where the manifest's dims give K = 3" in err
    assert "Traceback" not in err


def test_a_union_directory_exports_in_fp16_and_runs(engine_dirs, tmp_path):
    """--controlnet DIR of a ControlNetUnionModel (its own weights) exports in fp16: control_type
    stays float32 into its sinusoidal projection, as diffusers computes it, and the export's check
    against PyTorch passes. Only the ControlNet is exported (the rest of an fp16 export is checked in
    tests/test_sdxl.py): the run from the CLI with --control-mode is the module's own fp32 export's,
    whose graphs take the same float32 inputs."""
    load_model("tiny-sdxl", controlnets=["tiny-union"]).module("controlnet").save_pretrained(tmp_path / "net")
    out = tmp_path / "engines"
    assert run_cli("export", "tiny-sdxl", "--controlnet", tmp_path / "net", "--dtype", "fp16", "-o", out,
                   "--verify", "quick", "--components", "controlnet") == 0
    graph = onnx.load(str(out / "controlnet" / "model.onnx"), load_external_data=False).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types["control_type"] == onnx.TensorProto.FLOAT and types["control_type_idx"] == onnx.TensorProto.INT32
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in graph.initializer}
    picture(64, 64, 0).save(tmp_path / "edges.png")
    assert run_cli("run", engine_dirs["one"], "-p", "x", "-o", tmp_path / "o.png", "--control-image",
                   tmp_path / "edges.png", "--control-mode", "3", "--steps", "2", "--backend", "onnxruntime-cpu") == 0
    saved = json.loads(Image.open(tmp_path / "o.png").text["sdexport"])
    assert saved["control"] == [{"scale": 1.0, "start": 0.0, "end": 1.0, "mode": 3}]


def test_a_union_pipeline_directory_exports_with_its_controlnets(tmp_path):
    """A StableDiffusionXLControlNetUnionPipeline directory (saved by sdexport, loaded back by diffusers
    itself) is exported with its own union ControlNet; one of two union ControlNets too, which
    diffusers saves as MultiControlNetUnionModel and cannot load back (it exports no such class).
    Only the ControlNets are exported, which is what it is about: the U-Net's residual inputs come
    from the ControlNets' configs however they are named (the tests above name them with --controlnet)."""
    import diffusers

    load_model("tiny-sdxl", controlnets=["tiny-union"]).save_pretrained(tmp_path / "pipe")
    pipe = diffusers.StableDiffusionXLControlNetUnionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.controlnet).__name__ == "ControlNetUnionModel"
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["controlnet"] == [
        "diffusers", "ControlNetUnionModel"]
    load_model("tiny-sdxl", controlnets=["tiny-union", "tiny-union"]).save_pretrained(tmp_path / "two")
    out = tmp_path / "engines"
    assert run_cli("export", tmp_path / "two", "-o", out, "--verify", "none", "--components", "controlnet,controlnet_1") == 0
    manifest = load_manifest(out)
    assert manifest.controlnets == ["controlnet", "controlnet_1"] and manifest.dims["N"] == 8
    index = json.loads((out / "model_index.json").read_text())  # what optimum and diffusers read
    assert index["_class_name"] == "StableDiffusionXLControlNetUnionPipeline"
    assert index["controlnet"] == ["diffusers", "MultiControlNetUnionModel"]


@pytest.mark.parametrize("args, message", [
    (["--controlnet", "tiny-union", "--controlnet", "tiny-controlnet"], "union and plain ControlNets together"),
    (["--controlnet", "tiny-controlnet", "--union-images", "2"], "--union-images is for a union ControlNet"),
    (["--controlnet", "tiny-union", "--union-images", "9"], "--union-images 9: a union ControlNet takes 1 to 8"),
    (["--controlnet", "tiny-union", "--union-images", "0"], "--union-images 0: a union ControlNet takes 1 to 8"),
    (["--controlnet", "tiny-union", "--controlnet", "tiny-union", "--union-images", "2"],
     "together they take one image each"),
    (["--controlnet", "{sd_union}"], "a union ControlNet, which diffusers runs with SDXL models only, not sd"),
    (["--union-images", "2"], "--union-images is for a union ControlNet (--controlnet); this export has none"),
    (["--controlnet", "{xl_union}"], "a union ControlNet beside an inpainting U-Net (9 input channels)"),
])
def test_export_refuses_what_does_not_fit(tmp_path, capsys, monkeypatch, args, message):
    from sdexport.models import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    sd_union = tmp_path / "sd-union"  # a union config beside an SD model: refused from its config
    sd_union.mkdir()
    (sd_union / "config.json").write_text(json.dumps({"_class_name": "ControlNetUnionModel",
                                                      "num_control_type": 8}))
    (sd_union / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    xl_union = tmp_path / "xl-union"  # a union directory that fits tiny-sdxl, beside its inpainting U-Net
    xl_union.mkdir()
    config = preset_config(CONTROLNET_PRESETS["tiny-union"], PRESETS["tiny-sdxl"].unet)
    (xl_union / "config.json").write_text(json.dumps(config))
    (xl_union / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    base = {"{sd_union}": "tiny", "{xl_union}": "tiny-sdxl-inpaint"}.get(args[-1], "tiny-sdxl")
    args = [a.format(sd_union=sd_union, xl_union=xl_union) for a in args]
    assert run_cli("export", base, "-o", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, args, message", [
    ("one", ["--control-image", "{img}"], "union ControlNets need --control-mode for each control image"),
    ("one", ["--control-image", "{img}", "--control-mode", "1", "--control-mode", "2"],
     "2 control modes for 1 control image"),
    ("one", ["--control-image", "{img}", "--control-mode", "8"], "--control-mode 8: this union ControlNet knows modes"),
    ("two-images", ["--control-image", "{img}", "--control-mode", "1"],
     "1 control images for a union ControlNet exported to take 2 (--union-images)"),
    ("two-images", ["--control-image", "{img}", "--control-image", "{img}", "--control-mode", "1",
                    "--control-mode", "3", "--control-scale", "1", "--control-scale", "1", "--control-scale", "1"],
     "--control-scale: 3 values for 2 control images"),
    ("two-images", ["-p", "y", "--control-image", "{img}", "--control-image", "{img}", "--control-mode", "1",
                    "--control-mode", "3", *[a for v in ("1", "1", "0.5", "1") for a in ("--control-scale", v)]],
     "--control-scale 1, 0.5 (control image 1 of 2): a union ControlNet taking 2 images weighs them inside it"),
    pytest.param("two-nets", [], "has 2 ControlNets: give --control-image", marks=SLOW),
])
@pytest.mark.usefixtures("no_engines")
def test_bad_union_requests_are_refused_before_engines_load(engine_dirs, tmp_path, capsys, name, args, message):
    picture(64, 64, 0).save(tmp_path / "edges.png")
    args = [a.format(img=tmp_path / "edges.png") for a in args]
    engine_dir = engine_dirs[name]
    capsys.readouterr()  # the export's progress, where this test is the first to need the directory
    assert run_cli("run", engine_dir, "-p", "x", "-o", tmp_path / "o.png", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_two_union_controlnets_each_get_their_own_image_modes_and_scales():
    """What the slow two-nets cases check against diffusers, at the loop's level and without an
    export: each union ControlNet gets its own image, its mode (control_type one-hot over all N
    modes, control_type_idx) and its scale and window; one outside its window is not run."""
    from types import SimpleNamespace

    from sdexport.runtime.request import _check_control
    from sdexport.runtime.txt2img import Txt2ImgPipeline

    request = GenerationRequest(prompt=["a lighthouse"], steps=4, height=64, width=64, control_mode=[3, 1],
                                control_image=[picture(64, 64, 1), picture(64, 64, 2)], control_scale=[0.8, 1.3],
                                control_start=[0.0, 0.5], control_end=[1.0, 1.0])
    pipeline = SimpleNamespace(dims=SimpleNamespace(K=1, N=8), controlnets=["controlnet", "controlnet_1"],
                               device=torch.device("cpu"), family="sdxl", pooled_controlnets=[],
                               guess_mode=lambda request: False)
    pipeline.control_modes = lambda request, batch: Txt2ImgPipeline.control_modes(pipeline, request, batch)
    control = Txt2ImgPipeline.control_conditioning(pipeline, request, 4)
    first, second = control.active_nets(3)
    for (_, name, inputs, gains), want_name, mode, scale in zip((first, second), pipeline.controlnets, (3, 1),
                                                                (0.8, 1.3)):
        assert name == want_name and gains is None
        assert inputs["control_type"].shape == (2, 8) and inputs["control_type"][:, mode].eq(1).all()
        assert inputs["control_type"].sum() == 2  # one mode, on both rows of the guidance batch
        assert inputs["control_type_idx"].tolist() == [mode]
        assert inputs["conditioning_scale"].tolist() == pytest.approx([scale])
        assert inputs["controlnet_cond"].shape == (2, 1, 3, 64, 64)
    assert not torch.equal(first[2]["controlnet_cond"], second[2]["controlnet_cond"])
    assert [name for _, name, _, _ in control.active_nets(0)] == ["controlnet"]  # the second starts halfway
    with pytest.raises(SdexportError, match="has 2 ControlNets: give control_image"):
        _check_control(GenerationRequest(prompt=["x"]), 2, "sdxl", union_modes=8)


def test_control_modes_in_any_sequence_are_read_and_numpy_ints_named():
    """control_mode is typed a Sequence[int]: a tuple or a range was refused as "tuple control modes";
    numpy's int64 was told "control_mode 3: ... knows modes 0 to 7" (which it does)."""
    import numpy as np

    from sdexport.runtime.request import _check_control

    for modes in ((3, 1), range(2)):
        request = GenerationRequest(prompt=["x"], control_image=[picture(8, 8, 0)] * 2, control_mode=modes)
        assert request.control_mode == list(modes)
        _check_control(request, 1, "sdxl", union_modes=8, union_images=2)
    with pytest.raises(SdexportError, match=r"^control_mode 3 \(int64\): expected a Python int, one of the modes 0 to 7$"):
        _check_control(GenerationRequest(prompt=["x"], control_image=[picture(8, 8, 0)] * 2,
                                         control_mode=[np.int64(3), 1]), 1, "sdxl", union_modes=8, union_images=2)


def test_a_negative_control_mode_is_refused_not_read_from_the_end():
    """Mode -1 is no mode; taken as an index it would condition on the last mode (7), unsaid
    (mutation testing round 8: the check's lower bound, dropped, failed no test)."""
    from sdexport.runtime.request import _check_control

    with pytest.raises(SdexportError, match=r"^control_mode -1: this union ControlNet knows modes 0 to 7$"):
        _check_control(GenerationRequest(prompt=["x"], control_image=[picture(8, 8, 0)] * 2, control_mode=[-1, 1]),
                       1, "sdxl", union_modes=8, union_images=2)


def test_a_control_mode_for_other_controlnets_is_refused(tiny_engine_dir, tmp_path, capsys):
    from sdexport.runtime.request import _check_control

    with pytest.raises(SdexportError, match="control_mode is for union ControlNets"):
        _check_control(GenerationRequest(prompt=["x"], control_image=[picture(8, 8, 0)], control_mode=[1]), 1, "sd")
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tmp_path / "o.png", "--control-mode", "1") == 2
    assert "need an engine directory exported with --controlnet" in capsys.readouterr().err


def test_served_union_requests_are_the_images_run_writes(engine_dirs, tmp_path):
    """serve takes control_mode; a request gives run's image pixel for pixel, also when its rows
    share a call with another request's (the same control image: they change nothing)."""
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    picture(64, 128, 2).save(tmp_path / "edges.png")
    out = tmp_path / "cli.png"
    assert run_cli("run", engine_dirs["one"], "-p", "x", "-p", "y", "--steps", "3", "--seed", "5",
                   "--control-image", tmp_path / "edges.png", "--control-mode", "3", "--backend", "onnxruntime-cpu",
                   "-o", out) == 0
    logged: list[str] = []
    model = ServedModel(ServeSettings(str(engine_dirs["one"]), backend="onnxruntime-cpu", max_steps=50),
                        log=logged.append)
    try:
        def request(prompts: list[str], seeds: list[int], mode: int = 3) -> dict[str, np.ndarray]:
            inputs = _inputs(prompts, steps=3, seed=seeds)
            inputs["control_image"] = np.array([[(tmp_path / "edges.png").read_bytes()]] * len(prompts), dtype=object)
            inputs["control_mode"] = np.array([[mode]] * len(prompts), dtype=np.int32)
            return inputs

        [x, y] = model.generate([request(["x"], [5]), request(["y"], [6])])
        assert not isinstance(x, str) and not isinstance(y, str), (x, y)
        assert "2 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
        for (generated,), path in ((x, out.with_name("cli-0.png")), (y, out.with_name("cli-1.png"))):
            np.testing.assert_array_equal(_png_pixels(generated.png), np.asarray(Image.open(path).convert("RGB")))
        [refused] = model.generate([request(["x"], [5], mode=9)])
        assert refused == "control_mode 9: this union ControlNet knows modes 0 to 7"
    finally:
        model.close()


def test_scales_per_prompt_weigh_each_image_of_a_union_controlnet_taking_one(engine_dirs):
    """A union ControlNet taking one image scales its residuals (linear): scales per prompt give each
    image as a call with its scale for every prompt does, bit for bit, though its rows attend to
    each other (the scale does not reach that far). One taking several weighs them inside: a
    per-prompt list is refused unless its values agree."""
    pipeline = load_pipeline(engine_dirs["one"], "onnxruntime-cpu")
    mixed = pipeline(_request("one", control_scale=[[0.5, 1.2]]))
    for row, scale in enumerate((0.5, 1.2)):
        assert torch.equal(mixed.latents[row], pipeline(_request("one", control_scale=[scale])).latents[row])
    two = load_pipeline(engine_dirs["two-images"], "onnxruntime-cpu")
    calls = watch(two)
    with pytest.raises(SdexportError, match=r"control_end 1, 0.5 \(control image 2 of 2\): a union ControlNet "
                                            r"taking 2 images weighs them inside it"):
        two(_request("two-images", control_end=[1.0, [1.0, 0.5]]))
    assert not calls
    same = two(_request("two-images", control_scale=[[0.8, 0.8], 1.3]))
    assert torch.equal(same.latents, two(_request("two-images")).latents)


def test_served_rows_keep_apart_only_with_their_own_control_pixels():
    """Rows with the same control images share a call across requests; a request whose rows differ
    in their control pixels (masked-init, made from each row's own init image, or images of their
    own) keeps its rows together, as run generates them, and apart from other requests' rows."""
    from sdexport.runtime.request import MASKED_INIT
    from sdexport.serving.requests import Row, group_rows, union_control_apart

    def row(control: object, digest: str = "edges") -> Row:
        return Row(prompt="x", seed=0, steps=2, guidance=5.0, scheduler="default", height=64, width=64,
                   control_image=[control], control_mode=[3], control_digests=(digest,))

    def sizes(rows: list) -> list[int]:
        return [len(c) for c in group_rows(rows, 4, union_control_apart(rows))]

    assert sizes([((r, 0), row("edges")) for r in range(2)]) == [2]
    assert sizes([((r, 0), row(MASKED_INIT, "masked-init")) for r in range(2)]) == [1, 1]
    assert sizes([((r, 0), row(f"edges{r}", f"edges{r}")) for r in range(2)]) == [1, 1]
    # request 0's two rows differ: together, and apart from request 1's row, which matches the first
    mixed = [((0, 0), row("edges0", "edges0")), ((0, 1), row("edges1", "edges1")), ((1, 0), row("edges0", "edges0"))]
    assert [[owner for owner, _ in call] for call in group_rows(mixed, 4, union_control_apart(mixed))] == [
        [(0, 0), (0, 1)], [(1, 0)]]
    # scales per image: shared by one taking an image per call, kept apart by one taking several
    scaled = [((r, 0), row("edges")) for r in range(2)]
    scaled[0][1].control_scale, scaled[1][1].control_scale = 1.0, 0.5
    assert [len(c) for c in group_rows(scaled, 4, union_control_apart(scaled, images=1))] == [2]
    assert [len(c) for c in group_rows(scaled, 4, union_control_apart(scaled, images=2))] == [1, 1]


UNION_SCENARIO = ('model = "tiny-sdxl"\nheight = 64\nwidth = 64\nsteps = [3]\nbatch = [2]\nwarmup = 0\nrepeats = 1\n'
                  'contenders = ["diffusers", "onnxruntime-cpu"]\n')


@SLOW  # a bench with a ControlNet (test_controlnet) and the union pipeline's parity, each by default
def test_bench_runs_a_union_scenario(tmp_path):
    """The harness exports the union ControlNet, gives every contender the same edge map as the
    scenario's mode, and compares with diffusers' union pipeline."""
    _, out, _ = bench_agreeing(tmp_path, "un", UNION_SCENARIO + 'controlnets = ["tiny-union"]\ncontrol_mode = [3]\n')
    assert "edge map at scale 1.0 as control mode(s) 3" in (out / "results.md").read_text()


def test_a_union_scenario_needs_its_modes_and_union_engines(engine_dirs, tmp_path, capsys):
    """Refused as the bench plans, before anything is exported."""
    base, scenario = UNION_SCENARIO, tmp_path / "un.toml"
    for text, message in (('controlnets = ["tiny-union"]\n', "union ControlNets need control_mode"),
                          ('controlnets = ["tiny-union"]\ncontrol_mode = [3, 1]\n',
                           "control_mode: 2 modes for 1 ControlNet(s)"),
                          ('controlnets = ["tiny-controlnet"]\ncontrol_mode = [3]\n',
                           "control_mode is for union ControlNets"),
                          ('controlnets = ["tiny-union"]\ncontrol_mode = [3]\nguess_mode = true\n',
                           "guess_mode with union ControlNets under guidance: diffusers' union pipelines fail")):
        scenario.write_text(base + text)
        assert run_cli("bench", scenario, "-o", tmp_path / "b") == 2
        assert message in capsys.readouterr().err
    scenario.write_text(base + 'controlnets = ["tiny-controlnet"]\n')
    assert run_cli("bench", scenario, "--engine-dir", engine_dirs["one"], "-o", tmp_path / "c") == 2
    assert "has union ControlNets, the scenario plain ones" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_union_preset_for_sdxl_plans_from_configs(tmp_path):
    """sdxl-union plans against the real SDXL architecture from configs (no weights drawn), as an
    export and as the shipped benchmark scenario."""
    from sdexport.bench.plan import Options, plan_bench
    from sdexport.bench.scenario import load_scenario
    from sdexport.export.plan import plan_export

    plan = plan_export("sdxl", tmp_path / "x", ExportOptions(controlnets=["sdxl-union"]))
    assert [s.name for s in plan.specs].index("controlnet") == [s.name for s in plan.specs].index("unet") - 1
    assert plan.controlnets[0].config(plan.outline.unet_config or {})["num_control_type"] == 8
    scenario = load_scenario(Path("benchmarks/scenarios/sdxl-1024-union.toml"))
    assert scenario.control_mode == [3] and plan_bench(scenario, Options()).contenders

"""T2I-Adapters through the same specs, engines and loop: parity with diffusers' adapter pipelines
(SD and SDXL, ONNX Runtime and Torch, with and without CFG, a greyscale adapter from a directory),
the feature specs every stage reads, TensorRT profiles for them, and the refusals a user can cause."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pictures import box_mask, picture
from PIL import Image
from test_controlnet import (  # noqa: F401  (no_engines: a fixture)
    TOLERANCE,
    _agree,
    _rel,
    bench_agreeing,
    no_engines,
    tensors_made_in_the_loop,
    watch,
)

from conftest import run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import ModelLoadError, SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.adapter import check_fits, feature_layout, intrablock_layout, preset_config
from sdexport.models.presets import PRESETS
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("without_gpu")

MODELS = {"sd": "tiny", "sdxl": "tiny-sdxl"}


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter")
    dirs = {}
    for name, preset in MODELS.items():
        dirs[name] = root / name
        export(preset, dirs[name], ExportOptions(verify="quick", adapters=["tiny-adapter"]))
    return dirs


@pytest.fixture(scope="module")
def references() -> dict[str, DiffusersReference]:
    return {name: DiffusersReference(load_model(preset, adapters=["tiny-adapter"])) for name, preset in MODELS.items()}


def _request(name: str, **changes) -> GenerationRequest:
    request = GenerationRequest(
        prompt=["a lighthouse", "a harbour"], negative_prompt=["fog", "rain"], steps=6, seeds=[3, 4], height=64,
        width=128, scheduler="euler_a",
        # 80x100: resized to 64x128 by both (Lanczos), so the preprocessing is compared too
        adapter_image=[picture(80, 100, 10), picture(80, 100, 11)], adapter_scale=0.8,
        adapter_factor=0.5 if name == "sdxl" else 1.0,  # diffusers' SD pipeline has no factor
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_diffusers_adapter_pipeline(engine_dirs, references, name, backend):
    """StableDiffusion(XL)AdapterPipeline, same seeds, batch 2 with CFG, one adapter image per prompt,
    a scale, SDXL's conditioning factor (the adapter stops half-way), a stochastic scheduler."""
    pipeline = load_pipeline(engine_dirs[name], backend)
    request = _request(name)
    ours = pipeline(request)
    _agree(ours, references[name](request))
    assert ours.timings.adapter > 0 and "adapter" in ours.timings.to_dict()
    # the adapter acts: at scale 0 the latents differ, and so they do for another image
    quiet = pipeline(_request(name, adapter_scale=0.0))
    assert _rel(quiet, ours) > 10 * TOLERANCE
    other = pipeline(_request(name, adapter_image=[picture(80, 100, 20), picture(80, 100, 21)]))
    assert _rel(other, ours) > 10 * TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_pndm_matches_diffusers_at_every_call(engine_dirs, references, name):
    """PNDM (SD's default) calls the U-Net once more than it has steps: diffusers' SD adapter
    pipeline gives that call the features too, its SDXL one (factor 1) does not."""
    pipeline = load_pipeline(engine_dirs[name], "onnxruntime-cpu")
    request = _request(name, scheduler="default" if name == "sd" else "pndm", steps=3, adapter_factor=1.0)
    ours = pipeline(request)
    assert ours.scheduler == "pndm" and len(ours.timings.unet_steps) == 4
    _agree(ours, references[name](request))


def test_a_base_model_cut_for_a_refiner_gives_the_features_to_a_share_of_its_own_calls(engine_dirs, references,
                                                                                        monkeypatch):
    """SDXL's adapter pipeline with ``denoising_end`` (the base model of an ensemble): diffusers cuts
    ``num_inference_steps`` to the calls it runs before it takes ``adapter_conditioning_factor`` of
    them, so the features go to int(calls x factor) of the base model's calls, not of all steps."""
    pipeline = load_pipeline(engine_dirs["sdxl"], "onnxruntime-cpu")
    request = _request("sdxl", adapter_factor=0.7, denoising_end=0.6)
    fed: list[bool] = []  # per U-Net call: were the features given (not zeros)?

    class Watched:  # the U-Net engine, noting each call's features
        def __init__(self, engine):
            self.engine = engine

        def __call__(self, feed):
            fed.append(any(bool(feed[name].abs().sum() > 0) for name in self.engine.spec.adapter_inputs))
            return self.engine(feed)

        def __getattr__(self, name):
            return getattr(self.engine, name)

    monkeypatch.setitem(pipeline.engines, "unet", Watched(pipeline.engines["unet"]))
    ours = pipeline(request)
    assert _rel(ours, references["sdxl"](request)) < TOLERANCE
    calls = len(fed)
    assert 3 <= calls < 6 and sum(fed) == int(calls * 0.7) < int(6 * 0.7)


def test_adapter_factors_per_prompt_stop_each_image_after_its_own_share(engine_dirs, references, monkeypatch):
    """A list of factors, one per prompt: each image's features stop after its own share of the U-Net
    calls, so each image comes out bit for bit as in a call where its factor serves every prompt
    (SDXL, and SD's PNDM, whose factor 1 reaches its extra call; ONNX Runtime and Torch), and served
    requests with other factors share a call; the row masks are on the device before the loop. A
    split cuts the list; the diffusers reference, which has no per-image factors, refuses it; a bad
    value names its image."""
    for name, scheduler, factors in (("sdxl", "euler_a", [0.5, 1.0]), ("sd", "pndm", [1.0, 0.34])):
        for backend in ("onnxruntime-cpu", "torch"):
            pipeline = load_pipeline(engine_dirs[name], backend)
            ours = pipeline(_request(name, scheduler=scheduler, adapter_factor=factors))
            alone = [pipeline(_request(name, scheduler=scheduler, adapter_factor=f)) for f in factors]
            for row in range(2):
                assert torch.equal(ours.latents[row], alone[row].latents[row]), (name, backend, row)
                assert not torch.equal(ours.latents[row], alone[1 - row].latents[row])  # its factor acts
    request = _request("sdxl", adapter_factor=[0.5, 1.0])
    assert tensors_made_in_the_loop(load_pipeline(engine_dirs["sdxl"], "onnxruntime-cpu"), request, monkeypatch) == []
    assert [part.adapter_factor for part in request.split(1)] == [[0.5], [1.0]]
    assert [request.adapter_factor_of(i) for i in range(2)] == [0.5, 1.0]  # what each image records
    with pytest.raises(SdexportError, match="one adapter factor for every prompt"):
        references["sdxl"](request)
    pipeline = load_pipeline(engine_dirs["sdxl"], "onnxruntime-cpu")
    with pytest.raises(SdexportError, match=r"adapter_factor 2 \(image 2 of 2\): a fraction of the steps"):
        pipeline(_request("sdxl", adapter_factor=[0.5, 2.0]))
    with pytest.raises(SdexportError, match=r"adapter_factor: 3 given for 2 images; give one, or one per image"):
        pipeline(_request("sdxl", adapter_factor=[0.5, 1.0, 0.2]))
    with pytest.raises(SdexportError, match=r"adapter_factor nan \(image 1 of 2\): expected a finite number"):
        pipeline(_request("sdxl", adapter_factor=[float("nan"), 1.0]))


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory) -> Path:
    """A 9-channel inpainting U-Net with an adapter beside it."""
    out = tmp_path_factory.mktemp("adapter-inpaint") / "tiny-inpaint"
    export("tiny-inpaint", out, ExportOptions(verify="quick", adapters=["tiny-adapter"]))
    return out


def _with_features(preset: str, adapter, request: GenerationRequest, monkeypatch) -> tuple[object, list[bool]]:
    """diffusers' own img2img or inpainting pipeline for ``request``, its U-Net given the adapter's
    features as diffusers' adapter pipelines give them (``adapter_state``: the adapter on images
    diffusers preprocesses, times the scale, twice under CFG; cloned for each call) at the first
    int(calls x factor) of the calls it runs, SD's factor 1 at every call; and which calls had
    them. diffusers has no adapter pipeline that starts from an image: this is the one it would
    be, on its own image loops."""
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image

    reference = DiffusersReference(load_model(preset))  # (the same seeded U-Net as with the adapter)
    pixels = torch.cat([_preprocess_adapter_image(image, request.height, request.width)
                        for image in request.adapter_image])
    with torch.no_grad():
        states = [state * request.adapter_scale for state in adapter(pixels)]
    states = [torch.cat([state] * 2) if request.cfg else state for state in states]
    unet = reference.pipeline_for(request.task).unet
    forward, fed = unet.forward, []
    total = int(request.steps * request.effective_strength(reference.model.family))  # the calls img2img runs (Euler)

    def given(*args, **kwargs):
        fed.append(len(fed) < int(total * request.adapter_factor))
        if fed[-1]:
            kwargs["down_intrablock_additional_residuals"] = [state.clone() for state in states]
        return forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", given)
    return reference(request), fed


@pytest.mark.parametrize(("name", "task", "scheduler"), [
    ("sd", "img2img", "euler_a"), ("sd", "inpaint", "euler_a"), ("sd-inpaint", "inpaint", "euler_a"),
    ("sdxl", "img2img", "euler_a"), ("sdxl", "img2img", "pndm"),  # (PNDM: one call more than the steps)
])
def test_from_an_init_image_the_features_go_to_a_share_of_the_steps_it_runs(engine_dirs, references, inpaint_dir,
                                                                           monkeypatch, name, task, scheduler):
    """img2img and inpainting (a standard U-Net blending the kept region back, and a 9-channel one)
    with an adapter: diffusers' image pipelines with the adapter's features added as its adapter
    pipelines add them, at the first int(steps x factor) U-Net calls of the steps the strength
    leaves (PNDM's extra first call not counted, as in text to image)."""
    preset, directory = {"sd": ("tiny", engine_dirs["sd"]), "sd-inpaint": ("tiny-inpaint", inpaint_dir),
                         "sdxl": ("tiny-sdxl", engine_dirs["sdxl"])}[name]
    factor = 0.6 if name == "sdxl" else 1.0  # (PNDM: int(4 x 0.6) = 2 of its 5 calls; its calls would give 3)
    request = _request(name, image=[picture(64, 128, 30), picture(64, 128, 31)], strength=0.7, adapter_factor=factor,
                       mask=[box_mask(64, 128)] if task == "inpaint" else None, scheduler=scheduler)
    pipeline = load_pipeline(directory, "onnxruntime-cpu", image_inputs=True)
    ours = pipeline(request)
    assert ours.request.task == task
    adapter = references["sd" if name.startswith("sd-") else name].model.modules["adapter"]
    theirs, fed = _with_features(preset, adapter, request, monkeypatch)
    _agree(ours, theirs)
    extra = scheduler == "pndm"
    assert len(ours.timings.unet_steps) == len(fed) == 4 + extra and sum(fed) == int(4 * factor)  # int(6 x 0.7) steps
    quiet = pipeline(_request(name, image=request.image, strength=0.7, mask=request.mask, adapter_scale=0.0,
                              scheduler=scheduler))
    assert _rel(quiet, ours) > 10 * TOLERANCE  # the adapter acts


@pytest.mark.parametrize("name", MODELS)
def test_one_adapter_image_serves_every_prompt(engine_dirs, references, name):
    """One image for two prompts (diffusers fails on that under CFG: it is given the image per
    prompt), and without CFG; batches split over calls give the same images."""
    pipeline = load_pipeline(engine_dirs[name], "onnxruntime-cpu")
    calls = watch(pipeline)
    one = _request(name, adapter_image=[picture(64, 128, 5)])
    ours = pipeline(one)
    _agree(ours, references[name](one))
    # at the prompts' batch, which every engine's profile was checked for
    assert [feed["image"].shape[0] for engine, feed in calls if engine == "adapter"] == [2]
    halves = [pipeline(part) for part in one.split(1)]
    assert torch.allclose(torch.cat([h.latents for h in halves]), ours.latents, atol=1e-5)
    plain = _request(name, adapter_image=[picture(64, 128, 5)], guidance=1.0, negative_prompt=None)
    _agree(pipeline(plain), references[name](plain))


def test_a_greyscale_adapter_directory_exports_and_runs(tmp_path):
    """--adapter DIR (its own weights, every one read) with a 1-channel adapter, as TencentARC's
    sketch and canny ones: the image is read in greyscale, as diffusers takes it."""
    from diffusers import T2IAdapter

    config = {k: v for k, v in preset_config(PRESETS["tiny"].unet, 8).items() if not k.startswith("_")}
    torch.manual_seed(7)
    T2IAdapter(**{**config, "in_channels": 1}).save_pretrained(tmp_path / "sketch-adapter")
    out = tmp_path / "engines"
    export("tiny", out, ExportOptions(verify="quick", adapters=[str(tmp_path / "sketch-adapter")]))
    manifest = load_manifest(out)
    assert manifest.dims["A"] == 1 and manifest.model["source"]["adapter"]["kind"] == "diffusers"
    reference = DiffusersReference(load_model("tiny", adapters=[str(tmp_path / "sketch-adapter")]))
    request = _request("sd", adapter_image=[picture(64, 128, 1, "L"), picture(64, 128, 2, "L")])
    for backend in ("onnxruntime-cpu", "torch"):
        _agree(load_pipeline(out, backend)(request), reference(request))
    # an RGB image is read in greyscale: the same result as the greyscale image
    rgb = _request("sd", adapter_image=[picture(64, 128, 1), picture(64, 128, 2)])
    grey = _request("sd", adapter_image=[picture(64, 128, 1).convert("L"), picture(64, 128, 2).convert("L")])
    pipeline = load_pipeline(out, "onnxruntime-cpu")
    assert torch.equal(pipeline(rgb).latents, pipeline(grey).latents)
    _agree(pipeline(rgb), reference(rgb))  # the reference reads it in greyscale too (diffusers would fail)
    # a CIELab image converts to RGB (the request's check) but not to greyscale: one line, not
    # Pillow's ValueError (a review)
    from PIL import Image

    with pytest.raises(SdexportError, match="^adapter image: Pillow's LAB mode, which it cannot convert to L"):
        pipeline(_request("sd", adapter_image=[Image.new("LAB", (128, 64))]))


def test_an_adapter_pipeline_directory_exports_with_its_adapter(tmp_path):
    """A diffusers StableDiffusionAdapterPipeline directory brings its adapter, as diffusers saves it."""
    load_model("tiny", adapters=["tiny-adapter"], seed=2).save_pretrained(tmp_path / "pipeline")
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionAdapterPipeline"
    export(str(tmp_path / "pipeline"), tmp_path / "engines", ExportOptions(verify="none"))
    manifest = load_manifest(tmp_path / "engines")
    assert manifest.adapter
    assert manifest.model["source"]["adapter"]["path"] == str((tmp_path / "pipeline" / "adapter").resolve())
    assert load_manifest(tmp_path / "engines").spec("unet").adapter_inputs


def test_run_writes_the_image_and_its_adapter_settings(engine_dirs, tmp_path, capsys):
    picture(96, 96, 0).save(tmp_path / "sketch.png")
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", "--adapter-image", tmp_path / "sketch.png",
                   "--adapter-scale", "0.7", "--steps", "3", "-o", tmp_path / "o.png") == 0
    said = "".join(capsys.readouterr())
    assert "T2I-Adapter" in said and "resized from 96x96" not in said  # its own size is the default
    params = json.loads(Image.open(tmp_path / "o.png").info["sdexport"])
    assert params["adapter"] == {"scale": 0.7, "factor": 1.0}
    assert params["adapter_image"] == [str(tmp_path / "sketch.png")]
    assert (params["height"], params["width"]) == (96, 96)
    # a factor per image: each image records its own
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", "--batch", "2", "--adapter-image", tmp_path / "sketch.png",
                   "--adapter-factor", "0.5", "--adapter-factor", "1", "--steps", "3", "-o", tmp_path / "two.png") == 0
    assert [json.loads(Image.open(tmp_path / f"two-{i}.png").info["sdexport"])["adapter"] for i in range(2)] == [
        {"scale": 1.0, "factor": 0.5}, {"scale": 1.0, "factor": 1.0}]
    assert "features reached no U-Net call" not in " ".join(capsys.readouterr().err.split())
    # a factor whose share of the steps rounds down to 0 (3 x 0.3): the image was the adapter's
    # scale 0's, recorded with the adapter and said nowhere
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", "--batch", "2", "--adapter-image", tmp_path / "sketch.png",
                   "--adapter-factor", "0.3", "--adapter-factor", "1", "--steps", "3", "-o", tmp_path / "none.png") == 0
    assert ("note: the T2I-Adapter features reached no U-Net call in image 1: --adapter-factor times the steps that "
            "ran rounds down to 0") in " ".join(capsys.readouterr().err.split())
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", "--adapter-image", tmp_path / "sketch.png",
                   "--adapter-factor", "0", "--steps", "3", "-o", tmp_path / "zero.png") == 0
    assert "features reached no U-Net call" not in capsys.readouterr().err  # (0 is asked for: nothing rounded)


def test_specs_and_manifest_describe_the_features(engine_dirs):
    for name, preset in MODELS.items():
        manifest = load_manifest(engine_dirs[name])
        layout = feature_layout(preset_config(PRESETS[preset].unet, 8), 8)
        assert [tuple(f) for f in manifest.dims["adapter_features"]] == list(layout)
        assert manifest.adapter and not manifest.controlnets
        unet, adapter = manifest.spec("unet"), manifest.spec("adapter")
        assert unet.adapter_inputs == [f"down_intrablock_additional_residuals.{i}" for i in range(len(layout))]
        assert adapter.adapter_outputs == [f"adapter_state.{i}" for i in range(len(layout))]
        assert not unet.residual_inputs
        graph = onnx.load(str(engine_dirs[name] / "unet" / "model.onnx"), load_external_data=False).graph
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        channels, scale = layout[-1]
        side = "h" if scale == 1 else f"h/{scale}"
        assert dims[f"down_intrablock_additional_residuals.{len(layout) - 1}"][:3] == ["B", channels, side]
        index = json.loads((engine_dirs[name] / "model_index.json").read_text())
        pipeline = {"sd": "StableDiffusionAdapterPipeline", "sdxl": "StableDiffusionXLAdapterPipeline"}[name]
        assert index["_class_name"] == pipeline and index["adapter"] == ["diffusers", "T2IAdapter"]


# TencentARC's published configs (config.json of each Hub repository), as diffusers reads them
TENCENT_SD15 = {"_class_name": "T2IAdapter", "adapter_type": "full_adapter", "channels": [320, 640, 1280, 1280],
                "downscale_factor": 8, "in_channels": 3, "num_res_blocks": 2}
TENCENT_SD14_SKETCH = {**TENCENT_SD15, "in_channels": 1}
TENCENT_SD15_LIGHT = {"_class_name": "T2IAdapter", "adapter_type": "light_adapter", "channels": [320, 640, 1280],
                      "downscale_factor": 8, "in_channels": 3, "num_res_blocks": 4}
TENCENT_SDXL = {"_class_name": "T2IAdapter", "adapter_type": "full_adapter_xl", "channels": [320, 640, 1280, 1280],
                "downscale_factor": 16, "in_channels": 3, "num_res_blocks": 2}


@pytest.mark.parametrize(("config", "base", "fits"), [
    (TENCENT_SD15, "sd15", True),
    (TENCENT_SD14_SKETCH, "sd15", True),
    (TENCENT_SD15_LIGHT, "sd15", True),
    (TENCENT_SD15, "sd21", True),
    (TENCENT_SDXL, "sdxl", True),
    (TENCENT_SDXL, "sd15", False),
    (TENCENT_SD15, "sdxl", False),
])
def test_real_adapter_configs_fit_their_base_models(config, base, fits):
    """From the configs alone: every feature lands where the U-Net adds one (SDXL's fourth in its
    mid block), and an adapter for the other family is refused in one line."""
    unet = PRESETS[base].unet
    if fits:
        layout = check_fits(config, unet, PRESETS[base].family, 8, "--adapter x")
        assert layout == intrablock_layout(unet)[:len(layout)]
    else:
        with pytest.raises(ModelLoadError, match="do not match where the U-Net adds them"):
            check_fits(config, unet, PRESETS[base].family, 8, "--adapter x")


def test_the_real_architecture_presets_fit(tmp_path, capsys, monkeypatch):
    """sd15-adapter and sdxl-adapter plan against their bases from configs (no weights drawn)."""
    from sdexport.export.plan import plan_export

    for base, adapter in (("sd15", "sd15-adapter"), ("sdxl", "sdxl-adapter")):
        plan = plan_export(base, tmp_path / base, ExportOptions(adapters=[adapter]))
        assert [s.name for s in plan.specs].index("adapter") == [s.name for s in plan.specs].index("unet") - 1


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.1"], ids=["trt10", "trt11"])
def test_tensorrt_profiles_cover_the_features(engine_dirs, tmp_path, monkeypatch, version):
    """The profiles come from the specs: the adapter at the prompts' batch, the U-Net's features at
    the guidance batch, on the latents' grid."""
    from test_tensorrt_fakes import build_profiles

    (adapter, unet) = build_profiles(monkeypatch, tmp_path, version, engine_dirs["sd"], ["adapter", "unet"])
    feature = unet["profiles"][0]["down_intrablock_additional_residuals.1"]
    # tiny profile: batch 1-2 (CFG: up to 4), sides 64-256 px = latents 8-32, halved after the first block
    assert (tuple(feature.min), tuple(feature.max)) == ((1, 64, 4, 4), (4, 64, 16, 16))
    assert tuple(adapter["profiles"][0]["image"].max) == (2, 3, 256, 256)


@pytest.mark.parametrize("args, message", [
    ([], "has a T2I-Adapter: give --adapter-image"),
    (["--adapter-image", "{img}", "--adapter-image", "{img}", "--adapter-image", "{img}", "-p", "y"],
     "3 adapter images for 2 prompts"),
    (["--adapter-image", "{bad}"], "--adapter-image {bad}: not a readable image"),
    (["--adapter-image", "{big}"], "(the size of the first --adapter-image; give --height and --width"),
    (["--adapter-image", "{img}", "--adapter-factor", "1.5"], "--adapter-factor 1.5: a fraction of the steps"),
    (["--adapter-image", "{img}", "--batch", "2", "--adapter-factor", "0.5", "--adapter-factor", "2"],
     "--adapter-factor 2 (image 2 of 2): a fraction of the steps"),
    (["--adapter-image", "{img}", "--batch", "2", "--adapter-factor", "0.5", "--adapter-factor", "1",
      "--adapter-factor", "1"], "--adapter-factor: 3 given for 2 images; give one, or one per image"),
    (["--adapter-image", "{img}", "--adapter-scale", "nan"], "--adapter-scale nan: expected a finite number"),
    (["--adapter-image", "{img}", "--height", "64"], "with --adapter-image, give both --height and --width"),
])
@pytest.mark.usefixtures("no_engines")
def test_bad_adapter_requests_are_refused_before_engines_load(engine_dirs, tmp_path, capsys, args, message):
    files = {"img": tmp_path / "sketch.png", "bad": tmp_path / "bad.png", "big": tmp_path / "big.png"}
    picture(64, 64, 0).save(files["img"])
    files["bad"].write_bytes(b"not a png")
    picture(1024, 1024, 0).save(files["big"])
    args = [a.format(**files) for a in args]
    assert run_cli("run", engine_dirs["sd"], "-p", "x", "-o", tmp_path / "o.png", *args) == 2
    err = capsys.readouterr().err
    assert message.format(**files) in err and len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("no_engines")
def test_adapter_settings_without_an_adapter_are_refused(tiny_engine_dir, tmp_path, capsys):
    picture(64, 64, 0).save(tmp_path / "sketch.png")
    for setting in (["--adapter-image", tmp_path / "sketch.png"], ["--adapter-scale", "0.5"], ["--adapter-factor", "0"],
                    ["--adapter-scale", "1", "--adapter-scale", "1"],  # values at the default, but more than one
                    ["-p", "y", "--adapter-factor", "1", "--adapter-factor", "1"],
                    ["--adapter-scale", "1"], ["--adapter-factor", "1"]):  # the default, given: meant all the same
        assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tmp_path / "o.png", *setting) == 2
        assert "need an engine directory exported with --adapter" in capsys.readouterr().err


def test_python_api_refuses_before_any_engine_runs(engine_dirs):
    pipeline = load_pipeline(engine_dirs["sd"], "onnxruntime-cpu")
    calls = watch(pipeline)
    with pytest.raises(SdexportError, match="give adapter_image"):
        pipeline(_request("sd", adapter_image=None))
    with pytest.raises(SdexportError, match="adapter image: expected a PIL image"):
        pipeline(_request("sd", adapter_image=[np.zeros((8, 8, 3))]))
    with pytest.raises(SdexportError, match="adapter_image: expected a list of PIL images"):
        pipeline(_request("sd", adapter_image=picture(64, 64, 0)))
    with pytest.raises(SdexportError, match="adapter_factor -0.1"):
        pipeline(_request("sd", adapter_factor=-0.1))
    assert not calls


@pytest.mark.parametrize(("base", "args", "message"), [
    ("tiny", ["--adapter", "tiny-adapter", "--controlnet", "tiny-controlnet"], "--adapter with ControlNets"),
    ("tiny", ["--adapter", "sd15-adapter"], "this preset goes with the preset(s) sd15, not tiny"),
    ("tiny", ["--adapter", "no-such-adapter"], "no such directory, and not a T2I-Adapter preset"),
    ("tiny", ["--adapter", "tiny-controlnet"], "a ControlNet preset, not a T2I-Adapter one: pass it as --controlnet"),
    ("tiny", ["--adapter", "tiny-adapter", "--components", "unet,vae_decoder"], "export them together (unet,adapter) or none of them"),
])
def test_export_refuses_what_does_not_fit(tmp_path, capsys, base, args, message):
    assert run_cli("export", base, "-o", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_refused_before_weights_load(tmp_path, capsys):
    from diffusers import T2IAdapter

    config = {k: v for k, v in preset_config(PRESETS["tiny-sdxl"].unet, 8).items() if not k.startswith("_")}
    T2IAdapter(**config).save_pretrained(tmp_path / "xl-adapter")
    assert run_cli("export", "tiny", "-o", tmp_path / "out", "--adapter", tmp_path / "xl-adapter") == 2
    assert "does not fit the sd model" in capsys.readouterr().err
    # given where a ControlNet goes, it is named for what it is
    assert run_cli("export", "tiny-sdxl", "-o", tmp_path / "out", "--controlnet", tmp_path / "xl-adapter") == 2
    assert "a T2I-Adapter, not a ControlNet: pass it as --adapter" in capsys.readouterr().err
    # and the other way round (it said "a ControlNetModel; sdexport runs diffusers T2IAdapters", an audit)
    from diffusers import ControlNetModel

    from sdexport.models.controlnet import CONTROLNET_PRESETS
    from sdexport.models.controlnet import preset_config as controlnet_config

    config = controlnet_config(CONTROLNET_PRESETS["tiny-controlnet"], dict(PRESETS["tiny"].unet))
    ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")}).save_pretrained(tmp_path / "net")
    assert run_cli("export", "tiny", "-o", tmp_path / "out", "--adapter", tmp_path / "net") == 2
    assert "a ControlNet, not a T2I-Adapter: pass it as --controlnet" in capsys.readouterr().err


def test_served_adapter_images_are_the_images_run_writes(engine_dirs, tmp_path):
    """serve takes one adapter image per row: a row gives run's image pixel for pixel, and rows with
    different adapter images share one call."""
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    for seed in (2, 3):
        picture(64, 128, seed).save(tmp_path / f"a{seed}.png")
    out = tmp_path / "cli.png"
    assert run_cli("run", engine_dirs["sdxl"], "-p", "x", "--steps", "3", "--seed", "5", "--adapter-image",
                   tmp_path / "a2.png", "--adapter-scale", "0.7", "--adapter-factor", "0.5", "--backend",
                   "onnxruntime-cpu", "-o", out) == 0
    logged: list[str] = []
    model = ServedModel(ServeSettings(str(engine_dirs["sdxl"]), backend="onnxruntime-cpu", max_steps=50),
                        log=logged.append)
    try:
        [one] = model.generate([_inputs(["x"], steps=3, seed=[5], adapter_scale=0.7, adapter_factor=0.5,
                                        adapter_image=(tmp_path / "a2.png").read_bytes())])
        assert not isinstance(one, str), one
        np.testing.assert_array_equal(_png_pixels(one[0].png), np.asarray(Image.open(out).convert("RGB")))
        assert json.loads(Image.open(out).text["sdexport"])["adapter"] == {"scale": 0.7, "factor": 0.5}
        two = _inputs(["x", "x"], steps=3, seed=[5, 5], adapter_scale=0.7, adapter_factor=0.5)
        two["adapter_image"] = np.array([[(tmp_path / f"a{s}.png").read_bytes()] for s in (2, 3)], dtype=object)
        [pair] = model.generate([two])
        assert not isinstance(pair, str), pair
        assert "1 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
        assert not np.array_equal(pair[0].pixels, pair[1].pixels)  # each row its own image
        # rows that give no size take the first row's, as `run` resizes every image to the first one's
        picture(80, 100, 4).save(tmp_path / "a4.png")
        sizes = _inputs(["x", "x"], steps=2, seed=[5, 5])
        sizes["adapter_image"] = np.array([[(tmp_path / f"a{s}.png").read_bytes()] for s in (2, 4)], dtype=object)
        [resized] = model.generate([sizes])
        assert not isinstance(resized, str), resized
        assert [g.pixels.shape for g in resized] == [(64, 128, 3)] * 2
        # requests with other adapter factors share a call too, and a request's image (pixels and the
        # metadata its PNG records) is the one it gets beside a request with its own factor
        def stopping(factor: float) -> dict[str, np.ndarray]:
            return _inputs(["x"], steps=3, seed=[5], adapter_scale=0.7, adapter_factor=factor,
                           adapter_image=(tmp_path / "a2.png").read_bytes())

        together = model.generate([stopping(0.5), stopping(1.0)])
        assert "2 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
        same = model.generate([stopping(1.0), stopping(1.0)])
        assert not isinstance(together[1], str) and not isinstance(same[1], str)
        assert together[1][0].png == same[1][0].png
        assert not np.array_equal(together[0][0].pixels, together[1][0].pixels)
        assert json.loads(Image.open(io.BytesIO(together[0][0].png)).text["sdexport"])["adapter"]["factor"] == 0.5
        [refused] = model.generate([_inputs(["x"], steps=3, adapter_factor=2.0,
                                            adapter_image=(tmp_path / "a2.png").read_bytes())])
        assert refused == "adapter_factor 2: a fraction of the steps, from 0 to 1"
    finally:
        model.close()


def test_bench_runs_an_adapter_scenario(engine_dirs, tiny_engine_dir, tmp_path, capsys):
    """The harness exports the adapter, gives every contender the same synthetic edge map, compares
    with diffusers' adapter pipeline, and reports the adapter's time apart; engines must match."""
    scenario, out, report = bench_agreeing(
        tmp_path, "ad", 'model = "tiny"\nheight = 64\nwidth = 64\nsteps = [3]\nbatch = [2]\nwarmup = 0\nrepeats = 1\n'
        'contenders = ["diffusers", "onnxruntime-cpu"]\nadapter = "tiny-adapter"\nadapter_scale = 0.8\n')
    assert all("adapter_s" in r for r in report["results"])
    assert load_manifest(out / "engines" / "ad").adapter
    markdown = (out / "results.md").read_text()
    assert "| adapter ms |" in markdown and "T2I-Adapter tiny-adapter on a synthetic edge map at scale 0.8" in markdown
    shutil.copy(out / "results.json", tmp_path / "again.json")
    assert run_cli("bench", "compare", out, tmp_path / "again.json") == 0
    assert "| adapter |" in capsys.readouterr().out
    # engines with and without an adapter are not the scenario's model the other way round
    assert run_cli("bench", scenario, "--engine-dir", tiny_engine_dir, "-o", tmp_path / "b") == 2
    assert "has no T2I-Adapter, the scenario tiny-adapter" in capsys.readouterr().err
    plain = tmp_path / "plain.toml"
    plain.write_text(scenario.read_text().replace('adapter = "tiny-adapter"\nadapter_scale = 0.8\n', ""))
    assert run_cli("bench", plain, "--engine-dir", engine_dirs["sd"], "-o", tmp_path / "b") == 2
    assert "has a T2I-Adapter, the scenario none: the baseline and the engines must be the same" in capsys.readouterr().err
    # an adapter pipeline directory as the model: its adapter is named in the scenario
    load_model("tiny", adapters=["tiny-adapter"]).save_pretrained(tmp_path / "pipeline")
    plain.write_text(plain.read_text().replace('"tiny"', repr(str(tmp_path / "pipeline"))))
    assert run_cli("bench", plain, "-o", tmp_path / "b") == 2
    assert "a T2I-Adapter pipeline directory: name its adapter in the scenario" in capsys.readouterr().err


def test_a_manifest_without_the_adapter_dims_is_refused(engine_dirs, tmp_path, capsys):
    import shutil

    directory = tmp_path / "d"
    shutil.copytree(engine_dirs["sd"], directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["dims"]["A"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("inspect", directory) != 0
    assert "a T2I-Adapter needs both dims.adapter_features" in capsys.readouterr().err


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_an_adapter_factor_of_zero_is_a_share():
    """0 is a share of the steps (the adapter acts on none), as diffusers takes it; below it is not."""
    from sdexport.runtime.request import _check_adapter_factor

    _check_adapter_factor(0.0, 1)
    _check_adapter_factor([0.0, 1.0], 2)
    with pytest.raises(SdexportError, match="a fraction of the steps, from 0 to 1"):
        _check_adapter_factor(-0.1, 1)


def test_a_file_given_as_an_adapter_is_told_what_to_give(tmp_path, capsys):
    """It said "no such directory" of a file that exists; T2IAdapter has no from_single_file, which a
    first version of this message named (a review)."""
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    assert run_cli("export", "tiny", "-o", tmp_path / "out", "--adapter", tmp_path / "adapter.safetensors") == 2
    assert (f"--adapter {tmp_path / 'adapter.safetensors'}: a file; it takes a diffusers T2IAdapter directory, its "
            "config.json beside its weights") in " ".join(capsys.readouterr().err.split())


def test_a_palette_or_rgba_adapter_image_is_read_as_its_rgb_conversion():
    """diffusers' adapter pipelines take an image in the adapter's mode only (a palette or RGBA map
    fails there), so its users convert first; sdexport resized in the image's own mode, which Pillow
    does by the nearest pixel for a palette image: latents 3.4e-2 rel-L2 off the reference (an audit)."""
    from types import SimpleNamespace

    from sdexport.runtime.request import GenerationRequest
    from sdexport.runtime.txt2img import Txt2ImgPipeline

    edges = picture(96, 96, 3)
    pipeline = SimpleNamespace(adapters=["adapter"], dims=SimpleNamespace(adapter_image_channels=[3]),
                               device=torch.device("cpu"))

    def pixels(image):
        request = GenerationRequest(prompt=["x"], height=64, width=64, adapter_image=[image])
        return Txt2ImgPipeline.adapter_pixels(pipeline, request)[0]

    for mode in ("P", "RGBA"):
        given = edges.convert(mode)
        torch.testing.assert_close(pixels(given), pixels(given.convert("RGB")), rtol=0, atol=0)
    assert not torch.equal(pixels(edges.convert("P")), pixels(edges))  # (the palette's colours: another image)

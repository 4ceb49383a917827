"""Latent consistency models (LCM-distilled SD and SDXL, whose U-Net takes the guidance scale as an
input) and the LCM scheduler: parity with diffusers' pipelines, the spec every stage reads, and what
``run`` does with the guidance and negative prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pictures import box_mask, picture
from PIL import Image

from conftest import MadeOnFirstUse, run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import ModelLoadError, SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.presets import PRESETS
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest
from sdexport.runtime.txt2img import guidance_embedding
from sdexport.specs import GUIDANCE_EMBEDDING, components_for

pytestmark = pytest.mark.usefixtures("without_gpu")

TOLERANCE = 1e-4
"""rel-L2 of the final latents against diffusers in fp32 (measured: about 4e-7)."""

MODELS = {  # name: (preset, ControlNets, T2I-Adapters)
    "sd": ("tiny-lcm", [], []),
    "sdxl": ("tiny-sdxl-lcm", [], []),
    "sd-controlnet": ("tiny-lcm", ["tiny-controlnet"], []),
    "sdxl-adapter": ("tiny-sdxl-lcm", [], ["tiny-adapter"]),
}


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory) -> MadeOnFirstUse[Path]:
    root = tmp_path_factory.mktemp("lcm")

    def make(name: str) -> Path:
        preset, nets, adapters = MODELS[name]
        export(preset, root / name, ExportOptions(verify="quick", controlnets=nets, adapters=adapters))
        return root / name

    return MadeOnFirstUse(MODELS, make)


@pytest.fixture(scope="module")
def references() -> MadeOnFirstUse[DiffusersReference]:
    def make(name: str) -> DiffusersReference:
        preset, nets, adapters = MODELS[name]
        return DiffusersReference(load_model(preset, controlnets=nets, adapters=adapters))

    return MadeOnFirstUse(MODELS, make)


def _rel(ours, theirs) -> float:
    return float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs))


def _request(**changes) -> GenerationRequest:
    request = GenerationRequest(prompt=["a lighthouse", "a harbour"], negative_prompt=["fog", "rain"], steps=4,
                                seeds=[3, 4], height=64, width=96, scheduler="lcm")
    for key, value in changes.items():
        setattr(request, key, value)
    return request


CASES = [
    # name, backend, changes to the request
    pytest.param("sd", "onnxruntime-cpu", {}, id="sd-default-guidance"),
    pytest.param("sd", "torch", {"guidance": 2.0}, id="sd-torch"),
    pytest.param("sdxl", "onnxruntime-cpu", {"guidance": 8.5}, id="sdxl"),
    pytest.param("sd", "onnxruntime-cpu", {"image": [picture(64, 96, 1)], "strength": 0.6}, id="sd-img2img"),
    pytest.param("sdxl", "onnxruntime-cpu", {"image": [picture(64, 96, 1)], "strength": 0.6}, id="sdxl-img2img"),
    pytest.param("sd", "onnxruntime-cpu", {"image": [picture(64, 96, 1)], "mask": [box_mask(64, 96)]},
                 id="sd-inpaint-blended"),
    pytest.param("sd-controlnet", "onnxruntime-cpu", {"control_image": [picture(64, 96, 2)], "control_scale": 0.8},
                 id="sd-controlnet"),
    pytest.param("sdxl-adapter", "onnxruntime-cpu", {"adapter_image": [picture(64, 96, 3)], "adapter_scale": 0.9},
                 id="sdxl-adapter", marks=pytest.mark.slow),  # the ControlNet case maps the same extra inputs
]


@pytest.mark.parametrize(("name", "backend", "changes"), CASES)
def test_matches_diffusers(engine_dirs, references, name, backend, changes):
    """diffusers' SD and SDXL pipelines (txt2img, img2img, inpainting, ControlNet, adapter) read a
    U-Net's ``time_cond_proj_dim``: no unconditional half, the guidance embedded instead."""
    pipeline = load_pipeline(engine_dirs[name], backend, image_inputs="image" in changes)
    request = _request(**changes)
    ours, theirs = pipeline(request), references[name](request)
    assert _rel(ours.latents, theirs.latents) < TOLERANCE
    assert np.abs(ours.pixels - theirs.pixels).max() < 1e-3
    assert not ours.request.cfg and ours.request.guidance_embedding


class Recording:
    """An engine that keeps a copy of each feed it is given (its spec and profile are the engine's)."""

    def __init__(self, engine, feeds: list) -> None:
        self.engine, self.feeds = engine, feeds
        self.spec, self.profile, self.device = engine.spec, engine.profile, engine.device

    def __call__(self, feed):
        self.feeds.append({k: v.clone() for k, v in feed.items()})
        return self.engine(feed)


def test_each_image_takes_its_own_embedded_guidance(engine_dirs, references):
    """One call, one guidance per image on both sides of 1 (no CFG batch to keep apart): each image
    is diffusers' with its own scale, and the scale acts."""
    pipeline = load_pipeline(engine_dirs["sd"], "onnxruntime-cpu")
    feeds = []
    unet = pipeline.engines["unet"]
    pipeline.engines["unet"] = Recording(unet, feeds)
    ours = pipeline(_request(prompt=["a lighthouse"] * 2, negative_prompt=None, seeds=[5, 5], guidance=[1.0, 8.5]))
    assert {tuple(feed["sample"].shape) for feed in feeds} == {(2, 4, 8, 12)}  # the images alone, no negatives
    torch.testing.assert_close(feeds[0][GUIDANCE_EMBEDDING], guidance_embedding([1.0, 8.5], 24))
    for i, scale in enumerate((1.0, 8.5)):
        theirs = references["sd"](_request(prompt=["a lighthouse"], negative_prompt=None, seeds=[5], guidance=scale))
        assert _rel(ours.latents[i:i + 1], theirs.latents) < TOLERANCE
    assert _rel(ours.latents[0], ours.latents[1]) > 1e-2


def test_the_guidance_embedding_is_diffusers():
    from diffusers import StableDiffusionPipeline

    for size in (256, 24, 33):  # diffusers zero-pads an odd size
        for scales in ([7.5], [1.0, 2.0, 8.5]):
            theirs = StableDiffusionPipeline.get_guidance_scale_embedding(
                None, torch.tensor([s - 1 for s in scales]), embedding_dim=size)
            assert torch.equal(guidance_embedding(scales, size), theirs)


def test_the_spec_adds_the_guidance_embedding_before_residuals_and_features():
    """The U-Net takes ``timestep_cond`` (optimum's name) after its own inputs and before any
    ControlNet residuals or adapter features; no component of such a model sees a CFG batch, so
    TensorRT profiles and CUDA graphs are sized for the images alone."""
    dims = load_model("tiny-lcm", controlnets=["tiny-controlnet"]).dims
    assert dims.G == 24
    specs = {s.name: s.for_model(dims) for s in components_for("sd", 1)}
    unet = specs["unet"]
    assert unet.input_names[:4] == ["sample", "timestep", "encoder_hidden_states", GUIDANCE_EMBEDDING]
    assert unet.input_names[4:] == unet.residual_inputs
    assert unet.tensor(GUIDANCE_EMBEDDING).shape(dims.sizes(3, 64, 64)) == (3, 24)
    assert not any(s.cfg_batch for s in specs.values())
    profile = PRESETS["tiny-lcm"].profile  # batch 1:1:2, and so the U-Net's (a CFG model's: 1:2:4)
    assert profile.tensor_ranges(unet, dims)[GUIDANCE_EMBEDDING] == ((1, 24), (1, 24), (2, 24))
    assert unet.for_model(dims) == unet  # once
    plain = load_model("tiny").dims
    assert "G" not in plain.record() and dims.record()["G"] == 24
    assert GUIDANCE_EMBEDDING not in components_for("sd")[1].for_model(plain).input_names
    # a graph without the embedding, or without a residual, would run with it dropped unsaid (an
    # adopted optimum export of an LCM, made before optimum knew LCMs, ignored the guidance scale)
    from sdexport.errors import EngineDirError
    from sdexport.graph_io import GraphTensor, check_io

    tensors = {t.name: GraphTensor(t.name, "float32" if t.dtype == "float" else t.dtype, len(t.dims))
               for t in (*unet.inputs, *unet.outputs)}
    outputs = [tensors[name] for name in unet.output_names]
    check_io(unet, [tensors[name] for name in unet.input_names], outputs, "unet")
    for dropped in (GUIDANCE_EMBEDDING, unet.residual_inputs[-1]):
        with pytest.raises(EngineDirError, match=f"^unet takes no {dropped}, which its model's configs call for"):
            check_io(unet, [tensors[name] for name in unet.input_names if name != dropped], outputs, "unet")


def test_a_guidance_embedding_too_small_to_embed_is_refused():
    from types import SimpleNamespace

    from sdexport.models.dims import model_dims

    unet = {"cross_attention_dim": 32, "out_channels": 4, "in_channels": 4, "down_block_types": ["a", "b"],
            "time_cond_proj_dim": 2}
    configs = {"unet": SimpleNamespace(**unet), "vae": SimpleNamespace(block_out_channels=[1, 2, 3, 4]),
               "text_encoder": SimpleNamespace(hidden_size=32)}
    with pytest.raises(ModelLoadError, match="time_cond_proj_dim 2 is too small for a guidance embedding"):
        model_dims("sd", configs, {"tokenizer": 77}, "m")
    unet["time_cond_proj_dim"] = 4
    assert model_dims("sd", {**configs, "unet": SimpleNamespace(**unet)}, {"tokenizer": 77}, "m").G == 4


def test_run_says_the_negatives_are_not_read_and_takes_guidances_on_both_sides_of_one(engine_dirs, tiny_engine_dir,
                                                                                      tmp_path, capsys):
    out = tmp_path / "lcm.png"
    assert run_cli("run", engine_dirs["sd"], "-p", "a lighthouse", "--negative-prompt", "fog", "--batch", "2",
                   "--guidance", "1", "--guidance", "8", "--steps", "4", "--scheduler", "lcm", "-o", out) == 0
    said = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert ("--negative-prompt ignored: this latent consistency model takes the guidance as an input of its U-Net, "
            "with no unconditional half for the negatives to act in") in said
    with Image.open(tmp_path / "lcm-1.png") as image:
        record = json.loads(image.text["sdexport"])
        assert "Sampler: LCM, CFG scale: 8.0" in image.text["parameters"]
    assert record["guidance"] == 8.0 and record["scheduler"] == "lcm" and "negative_prompt" not in record
    # a model guided by a second batch half takes no such pair in one call
    assert run_cli("run", tiny_engine_dir, "-p", "a lighthouse", "--batch", "2", "--guidance", "1", "--guidance", "8",
                   "-o", tmp_path / "plain.png") != 0
    assert "a call guides all its images or none" in capsys.readouterr().err


def test_an_adopted_latent_consistency_export_runs_as_the_original(engine_dirs, tmp_path):
    """optimum exports such a U-Net with the same ``timestep_cond`` input: its directory is adopted."""
    foreign = tmp_path / "optimum-export"
    shutil.copytree(engine_dirs["sd"], foreign)
    (foreign / "manifest.json").unlink()
    assert run_cli("adopt", foreign, "--height", "64:128:256", "--width", "64:128:256") == 0
    assert load_manifest(foreign).model_dims.G == 24
    request = _request(guidance=3.0)
    ours = load_pipeline(foreign, "onnxruntime-cpu")(request)
    np.testing.assert_array_equal(ours.pixels, load_pipeline(engine_dirs["sd"], "onnxruntime-cpu")(request).pixels)


def test_the_lcm_scheduler_alone_takes_at_most_its_original_steps():
    """A saved LCM config's ``original_inference_steps`` limits the LCM scheduler, not another one
    built from the same config (which carries the key unread)."""
    from sdexport.runtime.schedulers import check_steps

    config = PRESETS["tiny-lcm"].scheduler
    with pytest.raises(SdexportError, match=r"^steps 51: the default \(LCMScheduler\) scheduler takes at most 50"):
        check_steps("default", config, 51)
    check_steps("euler", config, 60)
    check_steps("lcm", config, 50)


def test_a_controlnet_with_an_init_image_is_refused_on_a_latent_consistency_model():
    """diffusers' ControlNet img2img and inpaint pipelines guide such a U-Net by a batch half and
    never give it the embedding (unlike their txt2img one): no behaviour to match."""
    from sdexport.runtime.request import check_request

    dims = load_model("tiny-lcm", controlnets=["tiny-controlnet"]).dims
    request = _request(image=[picture(64, 96, 1)], control_image=[picture(64, 96, 2)])
    profile = PRESETS["tiny-lcm"].profile
    with pytest.raises(SdexportError, match="^ControlNets with an init image on a latent consistency model"):
        check_request(request, family="sd", dims=dims, profile=profile, controlnets=1, guidance_embedding=True)
    check_request(request, family="sd", dims=dims, profile=profile, controlnets=1)  # a model guided by a batch half


def test_served_rows_take_their_guidance_embedded_as_run_does(engine_dirs):
    """A served latent consistency model: each row's guidance goes into the embedding (rows on both
    sides of 1, with and without a negative prompt, share a call and give the Python API's images,
    made without negatives)."""
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    want = load_pipeline(engine_dirs["sd"], "onnxruntime-cpu")(GenerationRequest(
        prompt=["a lighthouse"] * 2, steps=4, seeds=[5, 5], guidance=[1.0, 8.5], height=64, width=96))
    logs: list[str] = []
    model = ServedModel(ServeSettings(str(engine_dirs["sd"]), backend="onnxruntime-cpu", max_steps=50),
                        log=logs.append)
    try:
        answers = model.generate([
            _inputs(["a lighthouse"], steps=4, seed=[5], guidance=1.0, height=64, width=96),
            _inputs(["a lighthouse"], steps=4, seed=[5], guidance=8.5, height=64, width=96, negative_prompt="fog"),
        ])
    finally:
        model.close()
    assert "2 request(s), 2 image(s) in 1 call(s) of 2" in logs[-1]
    for i, answer in enumerate(answers):
        assert not isinstance(answer, str), answer
        np.testing.assert_array_equal(_png_pixels(answer[0].png), np.asarray(want.images[i]))


def test_bench_plans_refuse_what_run_refuses_and_engines_of_the_other_kind(engine_dirs, tmp_path, capsys):
    """Before any export or baseline: a ControlNet with an init image on such a model, and an
    engine directory that is one where the scenario's model is not (the baseline would guide by
    a batch half, the engines not)."""
    from sdexport.bench.plan import Options, plan_bench
    from sdexport.bench.scenario import load_scenario

    scenario = tmp_path / "s.toml"
    common = 'height = 64\nwidth = 64\ncontenders = ["diffusers", "onnxruntime-cpu"]\n'
    scenario.write_text('model = "tiny-lcm"\ncontrolnets = ["tiny-controlnet"]\nstrength = 0.6\n' + common)
    with pytest.raises(SdexportError, match="^ControlNets with an init image on a latent consistency model"):
        plan_bench(load_scenario(scenario), Options())
    scenario.write_text('model = "tiny"\n' + common)
    with pytest.raises(SdexportError, match="holds a latent consistency model, the scenario's model tiny is a model "
                                            "guided by a batch half"):
        plan_bench(load_scenario(scenario), Options(engine_dir=engine_dirs["sd"]))
    scenario.write_text('model = "tiny-lcm"\n' + common)
    plan_bench(load_scenario(scenario), Options(engine_dir=engine_dirs["sd"]))
    # the scheduler's own limit, checked as the run starts, names the scenario's key as the plan does
    scenario.write_text('model = "tiny-lcm"\nscheduler = "lcm"\nsteps = [60]\n' + common)
    capsys.readouterr()  # (the engines made for the test above)
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
    assert capsys.readouterr().err.startswith(f"error: {scenario}: steps 60: the lcm scheduler takes at most 50 steps")
    assert not (tmp_path / "out").exists()


def test_a_latent_consistency_pipeline_directory_exports(tmp_path):
    """diffusers saves an LCM-distilled SD 1.5 (SimianLuo/LCM_Dreamshaper_v7) as a
    LatentConsistencyModelPipeline: an SD directory whose U-Net takes the guidance."""
    source = tmp_path / "lcm-dreamshaper"
    load_model("tiny-lcm").save_pretrained(source)
    index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**index, "_class_name": "LatentConsistencyModelPipeline"}))
    out = tmp_path / "engines"
    assert run_cli("export", source, "-o", out, "--components", "text_encoder,unet", "--verify", "none") == 0
    manifest = load_manifest(out)
    assert (manifest.family, manifest.model_dims.G) == ("sd", 24)
    assert GUIDANCE_EMBEDDING in manifest.spec("unet").input_names

"""The SDXL refiner (``sdxl-refiner``): the second text encoder alone and time ids that carry an
aesthetic score, through the one loop. Parity with diffusers' refiner pipelines (same seeds, same
latents), its directory, single-file and ONNX layouts, and the refusals a user can cause."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pictures import box_mask, picture
from PIL import Image

from conftest import run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import ModelLoadError, SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.outline import outline_model
from sdexport.models.presets import PRESETS
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest, check_request

pytestmark = pytest.mark.usefixtures("without_gpu")

PRESET = "tiny-sdxl-refiner"
TOLERANCE = 1e-4
"""rel-L2 of the final latents against diffusers in fp32 (as the other image tasks')."""


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refiner") / "engines"
    export(PRESET, out, ExportOptions(verify="quick"))
    return out


@pytest.fixture(scope="module")
def reference() -> DiffusersReference:
    return DiffusersReference(load_model(PRESET))


@pytest.fixture(scope="module")
def pipeline(refiner_dir):
    return load_pipeline(refiner_dir, "onnxruntime-cpu", image_inputs=True)


def _request(**fields) -> GenerationRequest:
    base = GenerationRequest(prompt=["a lighthouse", "a harbour"], steps=8, seeds=[3, 4], height=64, width=128,
                             image=[picture(64, 128, 0)])
    return dataclasses.replace(base, **fields)


CASES = {
    # the defaults (strength 0.3, guidance 5, aesthetic scores 6 and 2.5: diffusers', checked against its
    # signatures in test_controlnet's DEFAULT_CASES), the empty negative encoded
    "img2img-defaults": _request(),
    "img2img-given": _request(negative_prompt=["blurry", ""], strength=0.6, scheduler="euler_a",
                              aesthetic_score=8.5, negative_aesthetic_score=1.0, original_size=(512, 256),
                              crops_coords_top_left=(16, 32), image=[picture(64, 128, i) for i in range(2)]),
    "img2img-no-cfg": _request(guidance=1.0, strength=0.8),
    "inpaint-blended": _request(mask=[box_mask(64, 128)], scheduler="dpmpp_2m"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(pipeline, reference, case):
    """StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline with the refiner's
    components (requires_aesthetics_score, text_encoder None)."""
    request = CASES[case]
    ours, theirs = pipeline(request), reference(request)
    rel = float(torch.linalg.norm(ours.latents - theirs.latents) / torch.linalg.norm(theirs.latents))
    assert rel < TOLERANCE, rel
    assert np.abs(ours.pixels - theirs.pixels).max() < 1e-3


def test_torch_backend_runs_the_same_loop(refiner_dir, reference):
    request = _request(prompt=["a lighthouse"], seeds=[7], steps=5, height=64, width=64, image=[picture(64, 64, 1)],
                       aesthetic_score=3.0)
    ours = load_pipeline(refiner_dir, "torch", image_inputs=True)(request)
    theirs = reference(request)
    assert float(torch.linalg.norm(ours.latents - theirs.latents) / torch.linalg.norm(theirs.latents)) < TOLERANCE


def test_unet_takes_the_second_encoder_and_aesthetic_time_ids(pipeline):
    """The hidden states are text_encoder_2's penultimate layer alone (E = E2 = 48), and CFG's
    unconditional half carries the negative aesthetic score, and no crop (diffusers' default for
    it), where the base model repeats its ids."""
    fed = pipeline.encode_prompt(_request(aesthetic_score=7.0, crops_coords_top_left=(8, 16)))
    assert fed["encoder_hidden_states"].shape == (4, 77, 48)
    assert fed["text_embeds"].shape == (4, 40)
    assert fed["time_ids"].tolist() == [[64, 128, 0, 0, 2.5]] * 2 + [[64, 128, 8, 16, 7.0]] * 2
    assert "text_encoder" not in pipeline.engines
    one = pipeline.encode_prompt(_request(guidance=1.0, negative_aesthetic_score=0.5))
    assert one["time_ids"].tolist() == [[64, 128, 0, 0, 6.0]] * 2


def test_manifest_and_model_index(refiner_dir):
    manifest = load_manifest(refiner_dir)
    assert manifest.family == "sdxl-refiner"
    assert sorted(manifest.components) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    dims = manifest.model_dims
    assert (dims.T, dims.E, dims.E2, dims.E1, dims.L1, dims.P) == (5, 48, 48, 0, 0, 40)
    assert not (refiner_dir / "tokenizer").exists() and (refiner_dir / "tokenizer_2").is_dir()
    index = json.loads((refiner_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]


def test_diffusers_directory_and_single_file_round_trip(tmp_path):
    """Saved as stabilityai's refiner is (diffusers loads it back as its refiner pipeline); read back
    as a directory, and from one original-layout file whose only embedder is the OpenCLIP one."""
    import diffusers
    from safetensors import safe_open

    from tests.ldm_layout import write_single_file_checkpoint

    model = load_model(PRESET)
    model.save_pretrained(tmp_path / "pipe")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and pipe.text_encoder is None
    assert pipe.config.requires_aesthetics_score
    assert outline_model(str(tmp_path / "pipe")).family == "sdxl-refiner"
    again = load_model(str(tmp_path / "pipe"))
    assert again.family == "sdxl-refiner" and again.dims == model.dims and set(again.modules) == set(model.modules)
    path = tmp_path / "refiner.safetensors"
    write_single_file_checkpoint(model, path)
    with safe_open(str(path), framework="pt") as handle:
        assert not any(k.startswith("conditioner.embedders.1.") for k in handle.keys())
    single = load_model(str(path), config=PRESET)
    assert single.family == "sdxl-refiner" and set(single.modules) == set(model.modules)
    for name, module in model.modules.items():
        want, got = module.state_dict(), single.modules[name].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    # the other SDXL kind's config is named for what it is, before any weight is read
    with pytest.raises(ModelLoadError, match="an SDXL refiner checkpoint .* give --config sdxl-refiner"):
        load_model(str(path), config="tiny-sdxl")
    write_single_file_checkpoint(load_model("tiny-sdxl"), tmp_path / "base.safetensors")
    with pytest.raises(ModelLoadError, match="an SDXL base checkpoint .* give --config sdxl or"):
        load_model(str(tmp_path / "base.safetensors"), config=PRESET)


def test_adopt_an_onnx_export_of_the_refiner(refiner_dir, tmp_path):
    """optimum's layout with the refiner's model_index.json (its ORT class name included)."""
    foreign = tmp_path / "optimum-export"
    shutil.copytree(refiner_dir, foreign)
    (foreign / "manifest.json").unlink()
    index = json.loads((foreign / "model_index.json").read_text())
    (foreign / "model_index.json").write_text(json.dumps({**index, "_class_name": "ORTStableDiffusionXLImg2ImgPipeline"}))
    assert run_cli("adopt", foreign) == 0
    assert load_manifest(foreign).family == "sdxl-refiner"
    request = _request(prompt=["x"], seeds=[5], steps=4, strength=0.5, height=64, width=64, image=[picture(64, 64, 2)])
    pixels = [load_pipeline(d, "onnxruntime-cpu", image_inputs=True)(request).pixels for d in (foreign, refiner_dir)]
    np.testing.assert_array_equal(*pixels)


def test_cli_records_the_aesthetic_scores(refiner_dir, tmp_path, capsys):
    picture(64, 64, 0).save(tmp_path / "init.png")
    out = tmp_path / "refined.png"
    assert run_cli("run", refiner_dir, "-p", "a cat", "--init-image", tmp_path / "init.png", "--steps", "4",
                   "--aesthetic-score", "7.5", "-o", out) == 0
    record = json.loads(Image.open(out).text["sdexport"])
    assert (record["aesthetic_score"], record["negative_aesthetic_score"]) == (7.5, 2.5)
    assert record["family"] == "sdxl-refiner" and record["strength"] == 0.3
    # without guidance the negative score has no half to act on: said, and not recorded
    capsys.readouterr()
    assert run_cli("run", refiner_dir, "-p", "a cat", "--init-image", tmp_path / "init.png", "--steps", "4",
                   "--guidance", "1", "--negative-aesthetic-score", "1", "-o", out) == 0
    assert "--negative-aesthetic-score ignored: --guidance 1 disables classifier-free guidance" in " ".join(
        capsys.readouterr().err.split())
    record = json.loads(Image.open(tmp_path / "refined.png").text["sdexport"])
    assert record["aesthetic_score"] == 6.0 and "negative_aesthetic_score" not in record


@pytest.mark.parametrize(("args", "message"), [
    ((), "the SDXL refiner refines an image (img2img, inpainting): give --init-image"),
    (("--init-image", "{init}", "--prompt-2", "x"), "--prompt-2: not the SDXL refiner's conditioning"),
    (("--init-image", "{init}", "--target-size", "64x64"), "--target-size: not the SDXL refiner's conditioning"),
    (("--init-image", "{init}", "--aesthetic-score", "nan"), "--aesthetic-score nan: expected a finite number"),
])
def test_cli_refusals(refiner_dir, tmp_path, capsys, args, message):
    picture(64, 64, 0).save(tmp_path / "init.png")
    args = tuple(str(a).format(init=tmp_path / "init.png") for a in args)
    assert run_cli("run", refiner_dir, "-p", "a cat", *args, "-o", tmp_path / "out.png") == 2
    err = capsys.readouterr().err.strip()
    assert message in " ".join(err.split()) and len(err.splitlines()) <= 2, err
    assert not (tmp_path / "out.png").exists()


def test_aesthetic_scores_are_the_refiners_alone():
    for family, label in (("sd", "SD"), ("sdxl", "SDXL")):
        request = GenerationRequest(prompt=["x"], height=64, width=64, aesthetic_score=6.0)
        with pytest.raises(SdexportError, match=f"the SDXL refiner's conditioning, but this is an {label} model") as caught:
            check_request(request, family=family, dims=load_model("tiny").dims, profile=PRESETS["tiny"].profile)
        assert ("with --refiner" in str(caught.value)) == (family == "sdxl")  # where it goes: the base model's refiner


def test_what_the_refiner_does_not_run_is_refused_before_loading(tmp_path, capsys):
    """ControlNets (none fit its U-Net), a refiner with a first text encoder, the flag on a pipeline
    that does not honour it, and a U-Net whose time ids are not the refiner's."""
    import diffusers

    net = diffusers.ControlNetModel.from_unet(load_model(PRESET).modules["unet"])  # even one made from its U-Net
    net.save_pretrained(tmp_path / "controlnet")
    assert run_cli("export", PRESET, "--controlnet", tmp_path / "controlnet", "-o", tmp_path / "never") == 2
    assert "the sdxl-refiner family takes no ControlNets or T2I-Adapters" in capsys.readouterr().err
    load_model("tiny-sdxl").save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    refusals = {
        "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner (requires_aesthetics_score) with a first text encoder",
        "StableDiffusionXLControlNetPipeline": ("sets requires_aesthetics_score (the SDXL refiner's time ids) for a "
                                                "StableDiffusionXLControlNetPipeline"),
    }
    for pipeline, message in refusals.items():
        (tmp_path / "pipe" / "model_index.json").write_text(
            json.dumps({**index, "_class_name": pipeline, "requires_aesthetics_score": True}))
        assert run_cli("export", tmp_path / "pipe", "-o", tmp_path / "never") == 2
        err = capsys.readouterr().err.strip()
        assert message in " ".join(err.split()) and len(err.splitlines()) == 1, err
    # the base model's 6-id U-Net beside the refiner's flag and its one text encoder
    shutil.rmtree(tmp_path / "pipe" / "text_encoder")
    shutil.rmtree(tmp_path / "pipe" / "tokenizer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {**index, "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
         "text_encoder": [None, None], "tokenizer": [None, None]}))
    assert run_cli("export", tmp_path / "pipe", "-o", tmp_path / "never") == 2
    err = " ".join(capsys.readouterr().err.split())
    widths = "inconsistent SDXL refiner configs: text_encoder_2 width 48 (the refiner's only one) != unet cross"
    assert widths in err and "5 time ids" in err, err
    assert not (tmp_path / "never").exists()


def test_served_refiner_refines_as_run_does(refiner_dir, tmp_path):
    """``sdexport serve``: an init image with the refiner's conditioning (aesthetic scores, size and
    crop) gives the image ``run`` writes with the same flags; a row without an image gets the
    refiner's one-line refusal, one with the base model's ``target_size`` its own, and the others
    their images."""
    import io

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    picture(64, 64, 3).save(tmp_path / "init.png")
    out = tmp_path / "cli.png"
    assert run_cli("run", refiner_dir, "-p", "x", "--steps", "4", "--init-image", tmp_path / "init.png",
                   "--aesthetic-score", "7.3", "--negative-aesthetic-score", "1.5", "--original-size", "96x80",
                   "--crop-top-left", "8,4", "--backend", "onnxruntime-cpu", "-o", out) == 0
    png = (tmp_path / "init.png").read_bytes()
    rows = {"prompt": np.array([[b"x"]], dtype=object), "steps": np.array([[4]], dtype=np.int32)}
    conditioning = {"aesthetic_score": np.array([[7.3]], dtype=np.float32),
                    "negative_aesthetic_score": np.array([[1.5]], dtype=np.float32),
                    "original_size": np.array([[96, 80]], dtype=np.int32),
                    "crops_coords_top_left": np.array([[8, 4]], dtype=np.int32)}
    init = {"init_image": np.array([[png]], dtype=object)}
    logs: list[str] = []
    model = ServedModel(ServeSettings(str(refiner_dir), backend="onnxruntime-cpu", max_steps=50), log=logs.append)
    try:
        refined, refused, targeted = model.generate([{**rows, **init, **conditioning}, rows,
                                                     {**rows, **init, "target_size": np.array([[64, 64]], dtype=np.int32)}])
        # the defaults filled in, and a negative score that no CFG reads dropped: one call for both
        unguided = {**rows, **init, "guidance": np.array([[1.0]], dtype=np.float32)}
        same = model.generate([unguided, {**unguided, "aesthetic_score": np.array([[6.0]], dtype=np.float32),
                                          "negative_aesthetic_score": np.array([[1.0]], dtype=np.float32)}])
    finally:
        model.close()
    assert logs[-1].endswith("2 request(s), 2 image(s) in 1 call(s) of 2"), logs
    assert not any(isinstance(images, str) for images in same)
    assert not isinstance(refined, str)
    np.testing.assert_array_equal(refined[0].pixels, np.asarray(Image.open(out).convert("RGB")))
    record = json.loads(Image.open(io.BytesIO(refined[0].png)).text["sdexport"])
    written = json.loads(Image.open(out).text["sdexport"])
    assert record["family"] == "sdxl-refiner" and record == {k: v for k, v in written.items() if k != "init_image"}
    assert (record["aesthetic_score"], record["negative_aesthetic_score"], record["crops_coords_top_left"]) == (7.3, 1.5, [8, 4])
    assert isinstance(refused, str) and "the SDXL refiner refines an image" in refused
    assert isinstance(targeted, str) and targeted.startswith("target_size: not the SDXL refiner's conditioning")


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.1"], ids=["trt10", "trt11"])
def test_tensorrt_builds_the_refiners_components_with_its_shapes(refiner_dir, tmp_path, monkeypatch, version):
    """The profiles come from the specs: the text encoder is text_encoder_2 alone, the U-Net's time
    ids are 5 wide and its hidden states text_encoder_2's 48 (fake TensorRT of both majors)."""
    from test_tensorrt_fakes import build_profiles

    (text, unet) = build_profiles(monkeypatch, tmp_path, version, refiner_dir, ["text_encoder_2", "unet"])
    assert text["path"].endswith("text_encoder_2/model.onnx")
    profile = unet["profiles"][0]
    assert (tuple(profile["time_ids"].min), tuple(profile["time_ids"].max)) == ((1, 5), (4, 5))
    assert tuple(profile["encoder_hidden_states"].max) == (4, 2 * 77, 48)  # (the tiny presets' two prompt chunks)
    assert text["profiles"][0]["input_ids"].max[1] == 77  # the text encoder reads a chunk a call


def test_bench_refuses_a_refiner_scenario_without_an_image(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'model = "{PRESET}"\nheight = 64\nwidth = 64\nsteps = [2]\n')
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
    assert "the SDXL refiner refines an image: set strength (img2img) or inpaint = true" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_api_refusals_are_one_line_not_key_errors(refiner_dir):
    """Without an init image, or with a control image: refused as the CLI refuses them, before a
    default the refiner has no row for (txt2img, ControlNet img2img) is looked up. The pipeline
    loads its VAE encoder unasked: its one task starts from an image."""
    pipeline = load_pipeline(refiner_dir, "onnxruntime-cpu")
    assert "vae_encoder" in pipeline.engines
    with pytest.raises(SdexportError, match="the SDXL refiner refines an image"):
        pipeline(GenerationRequest(prompt=["x"], height=64, width=64))
    request = _request(prompt=["x"], seeds=[1], height=64, width=64, image=[picture(64, 64, 0)],
                       control_image=[picture(64, 64, 1)])
    with pytest.raises(SdexportError) as refused:
        pipeline(request)
    assert "ControlNet" in str(refused.value) and "\n" not in str(refused.value)


def test_adapters_and_directories_without_an_encoder_are_refused(refiner_dir, tmp_path, capsys):
    """A T2I-Adapter as a ControlNet, from the CLI and from ``load_model``; an ONNX export without
    the VAE encoder the refiner's one task needs, to adopt, and an export without one, to serve
    (refused before a server starts)."""
    import diffusers

    assert run_cli("export", PRESET, "--adapter", "tiny-adapter", "-o", tmp_path / "never") == 2
    err = capsys.readouterr().err.strip()
    assert "--adapter: the sdxl-refiner family takes no ControlNets or T2I-Adapters" in err and len(err.splitlines()) == 1
    diffusers.ControlNetModel.from_unet(load_model(PRESET).modules["unet"]).save_pretrained(tmp_path / "controlnet")
    with pytest.raises(ModelLoadError, match="--controlnet: the sdxl-refiner family takes no ControlNets"):
        load_model(PRESET, controlnets=[str(tmp_path / "controlnet")])
    foreign = tmp_path / "optimum-export"
    shutil.copytree(refiner_dir, foreign, ignore=shutil.ignore_patterns("vae_encoder", "manifest.json"))
    assert run_cli("adopt", foreign) == 2
    assert "no vae_encoder/model.onnx; the SDXL refiner (img2img, inpainting) needs them" in capsys.readouterr().err
    partial = tmp_path / "partial"
    export(PRESET, partial, ExportOptions(verify="none", components=["text_encoder_2", "unet", "vae_decoder"]))
    capsys.readouterr()
    for command in (("serve", partial), ("triton-repo", partial, "-o", tmp_path / "repo")):
        assert run_cli(*command) == 2
        err = capsys.readouterr().err.strip()
        assert "the engine directory has no vae_encoder" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "repo").exists()


# -- the ensemble of experts: the base model's latents handed to the refiner ------------------------


def rel_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs))


def test_emphasis_weighs_the_refiner_s_encoder_and_a_refusal_names_it(pipeline, monkeypatch):
    """The refiner reads the prompt with its one encoder (SDXL's second), weighed as A1111 weighs it;
    a reading it cannot hold is refused naming the refiner (its half runs after the base model's)."""
    from test_emphasis import RUNS, _a1111, _hand_ids

    model = load_model(PRESET)
    request = GenerationRequest(prompt=["a (red:1.5) fox [tail]"], steps=2, seeds=[3], height=64, width=128,
                                guidance=1.0, emphasis="original")
    ids, weights = _hand_ids(model.tokenizers["tokenizer_2"], RUNS)
    with torch.no_grad():
        want = _a1111(model.modules["text_encoder_2"](ids, output_hidden_states=True).hidden_states[-2], weights)
    assert torch.allclose(pipeline.encode_prompt(request)["encoder_hidden_states"], want, atol=1e-5)
    monkeypatch.setattr(pipeline, "_runs_fp32", lambda part: False)  # as an fp16 refiner
    with pytest.raises(SdexportError, match="^the texts' emphasis weights take the refiner's text encoding past "
                                            "65504, the range of the U-Net's fp16"):
        pipeline.encode_prompt(dataclasses.replace(request, prompt=["(a red fox lighthouse:100000)"], emphasis="no-norm"))


@pytest.fixture(scope="module")
def base_reference() -> DiffusersReference:
    return DiffusersReference(load_model("tiny-sdxl"))


@pytest.mark.parametrize(("scheduler", "switch", "guidance"), [
    ("default", 0.799, None), ("dpmpp_2m", 0.729, 6.0),
    # the ancestral sampler's draws from each image's generator, without CFG: both checked apart by default
    pytest.param("euler_a", 0.6, 1.0, marks=pytest.mark.slow)])
def test_the_ensemble_of_experts_matches_diffusers(tiny_sdxl_engine_dir, pipeline, reference, base_reference,
                                                   scheduler, switch, guidance):
    """diffusers' "ensemble of experts": the base model stops at ``denoising_end`` and returns its
    latents (``output_type="latent"``), the refiner starts from them at ``denoising_start``, noise
    unadded. Each half against its pipeline, the refiner's from the same latents. The switches
    cut at a timestep the schedule holds (201, 271), which the base model runs, not the refiner."""
    base = load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu")
    first = GenerationRequest(prompt=["a lighthouse", "a harbour"], steps=10, seeds=[3, 4], height=64, width=128,
                              scheduler=scheduler, guidance=guidance, denoising_end=switch)
    ours, theirs = base(first), base_reference(first)
    assert rel_l2(ours.latents, theirs.latents) < TOLERANCE and ours.images == [] and len(ours.pixels) == 0
    assert 0 < len(ours.timings.unet_steps) < 10
    second = dataclasses.replace(first, denoising_end=None, denoising_start=switch, init_latents=theirs.latents)
    refined, expected = pipeline(second), reference(second)
    assert rel_l2(refined.latents, expected.latents) < TOLERANCE
    assert np.abs(refined.pixels - expected.pixels).max() < 1e-3
    assert len(ours.timings.unet_steps) + len(refined.timings.unet_steps) == 10


@pytest.mark.parametrize(("preset", "scheduler", "guidance"), [
    # a standard U-Net blends the kept region back; the ancestral sampler draws after the refiner's noise
    ("tiny-sdxl", "euler_a", None),
    ("tiny-sdxl-inpaint", "default", 1.0),  # a 9-channel U-Net takes the mask; no CFG
])
def test_an_inpainting_ensemble_matches_diffusers(preset, scheduler, guidance, tiny_sdxl_engine_dir,
                                                  tiny_sdxl_inpaint_engine_dir, pipeline, reference):
    """diffusers' SDXL inpainting with a refiner: the base model's inpaint pipeline stops at
    ``denoising_end`` (strength 0.9999: the init image noised to the first timestep), and the
    refiner's inpaint pipeline takes its latents as the image, with the same mask: it draws noise
    but adds none, and blends those latents back outside the mask after each step. Each half
    against its pipeline, the refiner's from diffusers' latents."""
    engine_dir = tiny_sdxl_inpaint_engine_dir if preset == "tiny-sdxl-inpaint" else tiny_sdxl_engine_dir
    first = GenerationRequest(prompt=["a lighthouse", "a harbour"], steps=10, seeds=[3, 4], height=64, width=128,
                              scheduler=scheduler, guidance=guidance, image=[picture(64, 128, 1)],
                              mask=[box_mask(64, 128)], denoising_end=0.7)
    with load_pipeline(engine_dir, "onnxruntime-cpu", image_inputs=True) as base:
        ours = base(first)
    theirs = DiffusersReference(load_model(preset))(first)
    assert rel_l2(ours.latents, theirs.latents) < TOLERANCE
    second = dataclasses.replace(first, image=None, denoising_end=None, denoising_start=0.7,
                                 init_latents=theirs.latents)
    assert second.task == "inpaint"
    refined, expected = pipeline(second), reference(second)
    assert rel_l2(refined.latents, expected.latents) < TOLERANCE
    assert np.abs(refined.pixels - expected.pixels).max() < 1e-3
    assert len(ours.timings.unet_steps) + len(refined.timings.unet_steps) == 9  # int(10 x 0.9999) in all


def test_run_with_a_refiner_writes_the_ensembles_images(tiny_sdxl_engine_dir, refiner_dir, tmp_path, capsys):
    """``run BASE --refiner DIR``: the base model's latents at --denoising-end (here from an init
    image), refined by the refiner from there; the images are the Python API's two calls', and
    each records both halves, the base model's as its own run would (its prompt_2, strength and
    init image). The refiner loads no encoder: it starts from latents."""
    picture(64, 64, 5).save(tmp_path / "init.png")
    out = tmp_path / "out.png"
    assert run_cli("run", tiny_sdxl_engine_dir, "-p", "a lighthouse", "-p", "a harbour", "--steps", "6",
                   "--seed", "3", "--refiner", refiner_dir, "--denoising-end", "0.7", "--aesthetic-score", "7",
                   "--prompt-2", "at dusk", "--prompt-2", "at dawn", "--init-image", tmp_path / "init.png",
                   "--strength", "0.9", "--backend", "onnxruntime-cpu", "-o", out) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "base model: text encoder" in said and "(3 U-Net calls in its share of the 6 steps;" in said
    assert "refiner: text encoder" in said and "(2 U-Net calls in its share of the 6 steps;" in said
    request = GenerationRequest(prompt=["a lighthouse", "a harbour"], prompt_2=["at dusk", "at dawn"], steps=6,
                                seeds=[3, 4], height=64, width=64)
    with load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu", image_inputs=True) as base:
        latents = base(dataclasses.replace(request, denoising_end=0.7, image=[picture(64, 64, 5)],
                                           strength=0.9)).latents
    with load_pipeline(refiner_dir, "onnxruntime-cpu", image_inputs=False) as refiner:
        assert "vae_encoder" not in refiner.engines
        refined = refiner(dataclasses.replace(request, prompt_2=None, aesthetic_score=7.0, denoising_start=0.7,
                                              init_latents=latents))
    for i, prompt_2 in enumerate(("at dusk", "at dawn")):
        written = Image.open(tmp_path / f"out-{i}.png")
        np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(refined.images[i]))
        record = json.loads(written.text["sdexport"])
        assert (record["family"], record["task"], record["denoising_start"], record["aesthetic_score"]) == (
            "sdxl-refiner", "img2img", 0.7, 7.0)
        assert "strength" not in record and "init_image" not in record and "vae_encoder" not in record["graphs"]
        base = record["base"]
        assert (base["family"], base["denoising_end"], base["prompt_2"], base["seed"]) == ("sdxl", 0.7, prompt_2, 3 + i)
        assert (base["task"], base["strength"], base["init_image"]) == ("img2img", 0.9, str(tmp_path / "init.png"))


def test_the_a1111_text_names_the_base_models_sampler(tiny_sdxl_engine_dir, refiner_dir, tmp_path):
    """Each model runs its own saved scheduler, as diffusers does; the A1111 text's "Sampler:" is the
    run's, as its strength and clip skip are the base model's: it named the refiner's (DDIM here)."""
    from sdexport.manifest import SCHEDULER_CONFIG_FILE, sha256_file

    ddim = tmp_path / "ddim-refiner"
    shutil.copytree(refiner_dir, ddim)
    config_path = ddim / SCHEDULER_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "DDIMScheduler"}))
    manifest = json.loads((ddim / "manifest.json").read_text())
    manifest["files"][SCHEDULER_CONFIG_FILE] = sha256_file(config_path)
    (ddim / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out.png"
    assert run_cli("run", tiny_sdxl_engine_dir, "-p", "a lighthouse", "--steps", "6", "--refiner", ddim,
                   "--denoising-end", "0.7", "--backend", "onnxruntime-cpu", "-o", out) == 0
    written = Image.open(out)
    assert ", Sampler: Euler, " in written.text["parameters"], written.text["parameters"]
    record = json.loads(written.text["sdexport"])
    assert (record["scheduler"], record["base"]["scheduler"]) == ("ddim", "euler")


def test_run_with_a_refiner_inpaints_through_both_models(tiny_sdxl_engine_dir, refiner_dir, tmp_path, capsys):
    """``run BASE --refiner DIR --init-image I --mask M``: the mask goes to both halves (the init
    image and strength to the base model alone), as the Python API's two calls take them; each
    image records the mask for the refiner's half and the base model's."""
    picture(64, 64, 5).save(tmp_path / "init.png")
    box_mask(64, 64).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert run_cli("run", tiny_sdxl_engine_dir, "-p", "a lighthouse", "--steps", "6", "--seed", "3", "--refiner",
                   refiner_dir, "--denoising-end", "0.7", "--init-image", tmp_path / "init.png", "--mask",
                   tmp_path / "mask.png", "--backend", "onnxruntime-cpu", "-o", out) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "5 of 6 steps: the default --strength of SDXL inpainting is diffusers' 0.9999" in said
    request = GenerationRequest(prompt=["a lighthouse"], steps=6, seeds=[3], height=64, width=64, mask=[box_mask(64, 64)])
    with load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu", image_inputs=True) as base:
        latents = base(dataclasses.replace(request, image=[picture(64, 64, 5)], denoising_end=0.7)).latents
    with load_pipeline(refiner_dir, "onnxruntime-cpu", image_inputs=False) as refiner:
        refined = refiner(dataclasses.replace(request, denoising_start=0.7, init_latents=latents))
    written = Image.open(out)
    np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(refined.images[0]))
    record = json.loads(written.text["sdexport"])
    assert (record["task"], record["mask"], record["base"]["task"], record["base"]["mask"]) == (
        "inpaint", str(tmp_path / "mask.png"), "inpaint", str(tmp_path / "mask.png"))
    assert record["base"]["init_image"] == str(tmp_path / "init.png") and "init_image" not in record
    # the A1111 text says the run as A1111 says one with a refiner: the base model's strength (it
    # said none: the refiner's half has none), then the refiner and its switch point
    assert written.text["parameters"].endswith(
        f", Denoising strength: 0.9999, Refiner: {refiner_dir.name}, Refiner switch at: 0.7")
    from sdexport.runtime.images import _a1111_value  # (a name A1111's parser would cut at its comma: quoted)

    assert _a1111_value("my, refiner") == '"my, refiner"' and _a1111_value("refiner") == "refiner"


@pytest.mark.parametrize(("args", "message"), [
    (["{base}", "--denoising-end", "0.7"], "--denoising-end needs --refiner"),
    (["{sd}", "--refiner", "{refiner}"], "--refiner: an SDXL base model hands its latents to the refiner, and"),
    (["{base}", "--refiner", "{base}"], "not an SDXL refiner (SDXL); give an sdxl-refiner engine directory"),
    (["{base}", "--refiner", "{missing}"], "--refiner: {missing}: no such engine directory"),
    (["{base}", "--refiner", "{refiner}", "--denoising-end", "1"], "--denoising-end 1.0: need the base model's fraction"),
    (["{base}", "--refiner", "{refiner}", "--steps", "3", "--scheduler", "dpmpp_2m"],
     "the refiner's share of the schedule (--steps 3, cut at --denoising-end 0.8) holds no step; raise --steps"),
    (["{base}", "--refiner", "{refiner}", "--init-image", "{image}", "--strength", "0.1", "--steps", "10"],
     ("the base model's share of the schedule (--strength 0.1 of --steps 10, cut at --denoising-end 0.8) holds "
      "no step; raise --strength to 0.3 (the least that leaves a step at 10 steps), or move --denoising-end")),
    # the strength left out, SDXL img2img's default (0.3): named, and --strength advised, as no count of
    # steps helps where it starts the schedule below the cut (an audit's, then a review's finding)
    (["{base}", "--refiner", "{refiner}", "--init-image", "{image}", "--steps", "100", "--denoising-end", "0.7"],
     ("the base model's share of the schedule (--strength 0.3 (the default) of --steps 100, cut at --denoising-end "
      "0.7) holds no step; raise --strength to 0.31 (the least that leaves a step at 100 steps), or move "
      "--denoising-end")),
    (["{base}", "--refiner", "{refiner}", "--mask", "{image}"],
     "--mask needs --init-image"),
])
def test_run_refuses_an_ensemble_it_cannot_run_in_one_line(args, message, tiny_sdxl_engine_dir, tiny_engine_dir,
                                                           refiner_dir, tmp_path, capsys):
    picture(64, 64, 0).save(tmp_path / "image.png")
    names = {"base": tiny_sdxl_engine_dir, "sd": tiny_engine_dir, "refiner": refiner_dir,
             "missing": tmp_path / "nothing", "image": tmp_path / "image.png"}
    filled = [a.format(**names) for a in args]
    assert run_cli("run", filled[0], "-p", "x", *filled[1:], "--backend", "onnxruntime-cpu", "-o",
                   tmp_path / "out.png") == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**names) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.png").exists()


def test_served_ensemble_gives_the_images_run_writes(tiny_sdxl_engine_dir, refiner_dir, tmp_path):
    """``serve BASE --refiner DIR``: a request gives the image ``run --refiner`` writes with the same
    parameters, and records both halves as it does; ``denoising_end`` per request, else the
    server's; rows that leave it out share a call with rows that send the server's. An init image
    and mask inpaint through both halves, as the Python API's two calls do. A request the ensemble
    cannot run gets run's one-line refusal (a share of the schedule without a step, no step at
    all), the others their images."""
    import io

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    out = tmp_path / "cli.png"
    assert run_cli("run", tiny_sdxl_engine_dir, "-p", "x", "--prompt-2", "at dusk", "--steps", "6", "--seed", "5",
                   "--refiner", refiner_dir, "--denoising-end", "0.7", "--aesthetic-score", "7",
                   "--backend", "onnxruntime-cpu", "-o", out) == 0
    rows = {"prompt": np.array([[b"x"]], dtype=object), "steps": np.array([[6]], dtype=np.int32),
            "seed": np.array([[5]], dtype=np.uint64)}
    asked = {**rows, "prompt_2": np.array([[b"at dusk"]], dtype=object),
             "denoising_end": np.array([[0.7]], dtype=np.float32), "aesthetic_score": np.array([[7.0]], dtype=np.float32)}
    picture(64, 64, 0).save(tmp_path / "image.png")
    png = (tmp_path / "image.png").read_bytes()
    inpaint = {**rows, "init_image": np.array([[png]], dtype=object), "mask": np.array([[png]], dtype=object)}
    logs: list[str] = []
    model = ServedModel(ServeSettings(str(tiny_sdxl_engine_dir), backend="onnxruntime-cpu", max_steps=50,
                                      refiner=str(refiner_dir), denoising_end=0.6), log=logs.append)
    try:
        assert model.refining is not None and "vae_encoder" not in model.refining.engines
        empty = {**rows, "steps": np.array([[3]], dtype=np.int32), "scheduler": np.array([[b"dpmpp_2m"]], dtype=object),
                 "denoising_end": np.array([[0.8]], dtype=np.float32)}
        served, inpainted, refused, none = model.generate([asked, inpaint, empty,
                                                           {**rows, "steps": np.array([[0]], dtype=np.int32)}])
        default, same = model.generate([rows, {**rows, "denoising_end": np.array([[0.6]], dtype=np.float32)}])
        image = Image.open(tmp_path / "image.png")
        asked_alone = GenerationRequest(prompt=["x"], steps=6, seeds=[5], height=64, width=64, mask=[image])
        latents = model.pipeline(dataclasses.replace(asked_alone, image=[image], denoising_end=0.6)).latents
        repainted = model.refining(dataclasses.replace(asked_alone, denoising_start=0.6, init_latents=latents))
    finally:
        model.close()
    assert "refined by" in logs[0] and "from 0.6" in logs[0], logs
    assert not isinstance(served, str)
    np.testing.assert_array_equal(served[0].pixels, np.asarray(Image.open(out).convert("RGB")))
    record = json.loads(Image.open(io.BytesIO(served[0].png)).text["sdexport"])
    written = json.loads(Image.open(out).text["sdexport"])
    assert (record["family"], record["denoising_start"], record["aesthetic_score"]) == ("sdxl-refiner", 0.7, 7.0)
    assert record == written, (record, written)
    assert not isinstance(inpainted, str), inpainted
    np.testing.assert_array_equal(inpainted[0].pixels, np.asarray(repainted.images[0]))
    record = json.loads(Image.open(io.BytesIO(inpainted[0].png)).text["sdexport"])
    assert (record["task"], record["base"]["task"], record["base"]["denoising_end"]) == ("inpaint", "inpaint", 0.6)
    assert isinstance(refused, str) and refused.startswith(
        "the refiner's share of the schedule (steps 3, cut at denoising_end 0.8) holds no step")
    assert none == "steps 0: need at least 1 step"  # the request's own checks first, as in run
    assert logs[-1].endswith("2 request(s), 2 image(s) in 1 call(s) of 2"), logs
    assert not isinstance(default, str) and not isinstance(same, str)
    np.testing.assert_array_equal(default[0].pixels, same[0].pixels)
    assert json.loads(Image.open(io.BytesIO(default[0].png)).text["sdexport"])["denoising_start"] == 0.6


def test_the_halves_give_each_model_its_own_inputs(tiny_sdxl_engine_dir):
    """The refiner's request leaves every base-only field at its default (the init image and
    strength, ControlNets' and adapters' inputs and settings, the second prompt) and keeps the
    mask; the base model's leaves the aesthetic scores out; and a request that starts from latents
    refuses ControlNets (the refiner has none)."""
    from sdexport.runtime.ensemble import BASE_ONLY, REFINER_ONLY, halves

    request = GenerationRequest(prompt=["x"], prompt_2=["y"], height=64, width=64, image=[picture(64, 64, 0)],
                                mask=[box_mask(64, 64)], strength=0.5, control_image=[picture(64, 64, 1)],
                                control_end=0.5, control_scale=0.7, adapter_image=[picture(64, 64, 2)],
                                adapter_factor=0.5, aesthetic_score=7.0)
    base, refine = halves(request, 0.7)
    plain = GenerationRequest(prompt=["x"])
    assert all(getattr(refine, name) == getattr(plain, name) for name in BASE_ONLY)
    assert all(getattr(base, name) == getattr(request, name) for name in BASE_ONLY)
    assert all(getattr(base, name) is None for name in REFINER_ONLY) and refine.aesthetic_score == 7.0
    assert base.mask is refine.mask is request.mask and (base.denoising_end, refine.denoising_start) == (0.7, 0.7)
    manifest = load_manifest(tiny_sdxl_engine_dir, verify_files=False)
    with pytest.raises(SdexportError, match="denoising_start with ControlNets or T2I-Adapters: the refiner's share"):
        check_request(dataclasses.replace(refine, init_latents=torch.zeros(1, 4, 8, 8), mask=None, aesthetic_score=None,
                                          control_image=[picture(64, 64, 1)]),
                      family="sdxl", dims=manifest.model_dims, profile=manifest.shape_profile, scheduler_config={})


def test_each_half_of_an_ensemble_defaults_to_the_same_guidance():
    """A served row takes one guidance for both halves (the refiner's default where it gives none),
    where ``run`` leaves each half its own: the same figure for every task an ensemble runs, so
    the two give the same images. (A ControlNet inpainting base, 5.0, would part them.)"""
    from sdexport.runtime.ensemble import halves

    for image, mask in ((None, None), ([picture(64, 64, 0)], None), ([picture(64, 64, 0)], [box_mask(64, 64)])):
        request = GenerationRequest(prompt=["x"], height=64, width=64, image=image, mask=mask)
        base, refine = halves(request, 0.8)
        assert base.effective_guidance("sdxl") == refine.effective_guidance("sdxl-refiner"), base.task


def test_served_without_a_refiner_refuses_denoising_end(refiner_dir):
    """A model served alone hands out images, not latents: a request that cuts its schedule is refused."""
    from sdexport.serving.triton_model import ServedModel, ServeSettings

    model = ServedModel(ServeSettings(str(refiner_dir), backend="onnxruntime-cpu"), log=lambda *a: None)
    try:
        (refused,) = model.generate([{"prompt": np.array([[b"x"]], dtype=object),
                                      "denoising_end": np.array([[0.5]], dtype=np.float32)}])
    finally:
        model.close()
    assert refused == "denoising_end: this server runs no refiner after the model (config.pbtxt parameter refiner)"


def test_the_stock_servers_refiner_is_refused_as_its_config_names_it(tiny_sdxl_engine_dir):
    """Loaded by Triton from config.pbtxt, not by ``serve --refiner``: the parameter its operator edits."""
    from sdexport.serving.triton_model import ServedModel, ServeSettings

    with pytest.raises(SdexportError, match=r"^config.pbtxt parameter refiner .*: not an SDXL refiner \(SDXL\)"):
        ServedModel(ServeSettings(str(tiny_sdxl_engine_dir), backend="onnxruntime-cpu", refiner=str(tiny_sdxl_engine_dir)))


def test_triton_repo_writes_the_refiner_beside_the_base_model(tiny_sdxl_engine_dir, refiner_dir, tmp_path):
    """The repository's model loads both directories (as the server will see them) and takes the
    smaller of their batches."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from sdexport.serving.triton_model import ServeSettings

    assert run_cli("triton-repo", tiny_sdxl_engine_dir, "-o", tmp_path / "repo", "--refiner", refiner_dir,
                   "--denoising-end", "0.75", "--engine-path", "/engines/base", "--refiner-path", "/engines/refiner") == 0
    config = text_format.Parse((tmp_path / "repo" / "sdexport" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    settings = ServeSettings.from_parameters({k: v.string_value for k, v in config.parameters.items()})
    assert (settings.engine_dir, settings.refiner, settings.denoising_end) == ("/engines/base", "/engines/refiner", 0.75)
    batch = min(load_manifest(d, verify_files=False).shape_profile.batch[2] for d in (tiny_sdxl_engine_dir, refiner_dir))
    assert config.max_batch_size == batch


@pytest.mark.parametrize("mask", [True, False])
def test_an_inpainting_unet_does_not_start_from_a_base_models_latents(tiny_sdxl_engine_dir, mask):
    """A 9-channel U-Net needs the masked init image's latents, which handed latents do not give:
    the refiner's half must be a standard U-Net (diffusers' pipeline fails on it deep inside)."""
    manifest = load_manifest(tiny_sdxl_engine_dir, verify_files=False)
    request = GenerationRequest(prompt=["x"], height=64, width=64, denoising_start=0.7,
                                init_latents=torch.zeros(1, 4, 8, 8), mask=[box_mask(64, 64)] if mask else None)
    with pytest.raises(SdexportError, match="init_latents: this is an inpainting model, whose U-Net takes the masked"):
        check_request(request, family="sdxl", dims=dataclasses.replace(manifest.model_dims, U=9),
                      profile=manifest.shape_profile, scheduler_config={})


def test_an_ensemble_refuses_profiles_without_a_size_in_common(tiny_sdxl_engine_dir, refiner_dir):
    """No request could pass both models' profiles: refused when the pair is opened, with both ranges."""
    from types import SimpleNamespace

    from sdexport.runtime.ensemble import Refiner
    from sdexport.shapes import ShapeProfile

    real = load_manifest(tiny_sdxl_engine_dir, verify_files=False)
    theirs = load_manifest(refiner_dir, verify_files=False).shape_profile
    above = theirs.height[2] + 8
    base = SimpleNamespace(family="sdxl", model_dims=real.model_dims, controlnets=[], adapters=[],
                           shape_profile=ShapeProfile(real.shape_profile.batch, (above, above, above + 8),
                                                      real.shape_profile.width))
    with pytest.raises(SdexportError, match=f"and the base model's \\({above}-{above + 8} x .*\\) have none in common"):
        Refiner.open(refiner_dir, tiny_sdxl_engine_dir, base)


def test_serve_names_a_damaged_refiner_file_before_starting_triton(tiny_sdxl_engine_dir, refiner_dir, tmp_path, capsys):
    damaged = tmp_path / "refiner"
    shutil.copytree(refiner_dir, damaged)
    path = damaged / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    assert run_cli("serve", tiny_sdxl_engine_dir, "--refiner", damaged, "--backend", "onnxruntime-cpu") == 2
    assert "unet/model.onnx does not match its sha256" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "{base}", "--denoising-end", "0.7"], "--denoising-end needs --refiner"),
    (["triton-repo", "{base}", "-o", "{tmp}/r", "--refiner-path", "/r"], "--refiner-path needs --refiner"),
    (["triton-repo", "{base}", "-o", "{tmp}/r", "--refiner", "{refiner}", "--refiner-path", "r"], "--refiner-path r: an absolute path"),
    # (it wrote this machine's path for the refiner beside the server's for the base model)
    (["triton-repo", "{base}", "-o", "{tmp}/r", "--refiner", "{refiner}", "--engine-path", "/e"],
     "--engine-path with --refiner: give --refiner-path too, the refiner's path as the server will see it"),
    (["serve", "{sd}", "--refiner", "{refiner}"], "--refiner: an SDXL base model hands its latents to the refiner"),
    (["triton-repo", "{base}", "-o", "{tmp}/r", "--refiner", "{base}"], "not an SDXL refiner (SDXL)"),
    (["serve", "{base}", "--refiner", "{refiner}", "--denoising-end", "0"], "--denoising-end 0.0: need the base model's fraction"),
    (["triton-repo", "{base}", "-o", "{refiner}", "--refiner", "{refiner}"], "would replace"),
])
def test_serving_refuses_an_ensemble_it_cannot_serve_in_one_line(args, message, tiny_sdxl_engine_dir, tiny_engine_dir,
                                                                 refiner_dir, tmp_path, capsys):
    names = {"base": tiny_sdxl_engine_dir, "sd": tiny_engine_dir, "refiner": refiner_dir, "tmp": tmp_path}
    assert run_cli(*[a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("end", [1.0, 1])
def test_the_python_api_refuses_a_denoising_end_of_the_whole_schedule(end):
    """``denoising_end`` 1 (the CLI refuses it in check_denoising_end) ran every step and handed back
    undecoded latents and no image: the API refuses it with the same sentence as 0 or 1.5."""
    request = GenerationRequest(prompt=["x"], height=64, width=64, denoising_end=end)
    with pytest.raises(SdexportError, match=f"^denoising_end {end}: need a fraction of the schedule above 0 and below 1"):
        check_request(request, family="sdxl", dims=load_model("tiny-sdxl").dims, profile=PRESETS["tiny-sdxl"].profile)


def test_a_window_that_starts_where_it_ends_is_refused_for_any_scheduler():
    """start == end: empty for a first-order scheduler; a second-order one (Heun, saved by a model)
    would add the timestep before the cut-off and run half a step."""
    request = GenerationRequest(prompt=["x"], height=64, width=64, denoising_start=0.5, denoising_end=0.5,
                                init_latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(SdexportError, match="^denoising_start 0.5 and denoising_end 0.5: the window is empty"):
        check_request(request, family="sdxl-refiner", dims=load_model(PRESET).dims, profile=PRESETS[PRESET].profile)


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_init_latents_of_another_batch_are_refused_before_any_engine_runs(tiny_sdxl_engine_dir, tmp_path):
    """A base model's latents are one row, or one per prompt: three rows for two prompts are
    refused in one line by the check, not left to a RuntimeError in the loop."""
    import dataclasses

    from sdexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu")
    request = GenerationRequest(prompt=["a", "b"], seeds=[0, 1], height=64, width=64, denoising_start=0.5)
    shape = pipeline.latent_shape(pipeline.sized(request))
    with pytest.raises(SdexportError, match=r"^init_latents of shape \(3, "):
        pipeline.check(dataclasses.replace(request, init_latents=torch.zeros(3, *shape[1:])))
    for rows in (1, 2):
        pipeline.check(dataclasses.replace(request, init_latents=torch.zeros(rows, *shape[1:])))
    # a numpy array (an AttributeError in the loop); NaN latents (the whole loop ran, then blamed the weights)
    with pytest.raises(SdexportError, match="^init_latents: expected a torch tensor .*, got ndarray"):
        pipeline.check(dataclasses.replace(request, init_latents=torch.zeros(shape).numpy()))
    with pytest.raises(SdexportError, match="^init_latents hold NaN or infinite values"):
        pipeline.check(dataclasses.replace(request, init_latents=torch.full(shape, float("nan"))))
    # the base model's half has latents, no images: saving it wrote nothing and returned []
    handed = pipeline(GenerationRequest(prompt=["a"], steps=2, height=64, width=64, denoising_end=0.5))
    # latents that require grad (a user's optimisation) ran to an EngineRunError, the server's kind
    # of failure: "Can't call numpy() on Tensor that requires grad"
    graded = handed.latents.clone().requires_grad_()
    again = pipeline(GenerationRequest(prompt=["a"], steps=2, height=64, width=64, denoising_start=0.5,
                                       init_latents=graded))
    plain = pipeline(GenerationRequest(prompt=["a"], steps=2, height=64, width=64, denoising_start=0.5,
                                       init_latents=handed.latents))
    assert torch.equal(again.latents, plain.latents)
    with pytest.raises(SdexportError, match=r"o.png: this result has no images to save \(a request with denoising_end"):
        handed.save(tmp_path / "o.png")


# From mutation testing round 6


def test_adopt_refuses_a_refiner_export_without_its_vae_encoder(refiner_dir, tmp_path, capsys):
    """The refiner's one task starts from an image: an export of it without the VAE encoder adopts
    as a directory nothing can run, found only when the first run loads it."""
    foreign = tmp_path / "optimum-export"
    shutil.copytree(refiner_dir, foreign)
    (foreign / "manifest.json").unlink()
    shutil.rmtree(foreign / "vae_encoder")
    assert run_cli("adopt", foreign) == 2
    assert ("no vae_encoder/model.onnx; the SDXL refiner (img2img, inpainting) needs them"
            in " ".join(capsys.readouterr().err.split()))
    assert not (foreign / "manifest.json").exists()


def test_a_bench_names_the_given_directory_it_takes_on_trust(tiny_sdxl_engine_dir, refiner_dir, tmp_path,
                                                             monkeypatch):
    """An adopted refiner without --model records no checkpoint: that directory alone is on trust
    (its contenders take the model its manifest names), and the report says so on the Refiner line;
    the base model's, proven the scenario's, still reloads the scenario's checkpoint. Before, one
    flag for both said "their directory" under the base model and sent both to their manifests."""
    from sdexport.bench import contenders
    from sdexport.bench.plan import Options, plan_bench
    from sdexport.bench.report import _on_trust_words
    from sdexport.bench.scenario import load_scenario

    adopted = tmp_path / "adopted"
    shutil.copytree(refiner_dir, adopted)
    (adopted / "manifest.json").unlink()
    assert run_cli("adopt", adopted, "-q") == 0
    path = tmp_path / "ensemble.toml"
    path.write_text('model = "tiny-sdxl"\nrefiner = "tiny-sdxl-refiner"\nheight = 64\nwidth = 64\nsteps = [5]\n'
                    'batch = [1]\nwarmup = 0\nrepeats = 1\ncontenders = ["onnxruntime-cpu"]\n')
    scenario = load_scenario(path)
    plan = plan_bench(scenario, Options(engine_dir=tiny_sdxl_engine_dir, refiner_engine_dir=adopted))
    assert plan.on_trust == ("--refiner-engine-dir",)
    assert plan.from_scenario("--engine-dir") and not plan.from_scenario("--refiner-engine-dir")
    assert plan_bench(scenario, Options(engine_dir=tiny_sdxl_engine_dir, refiner_engine_dir=refiner_dir)).on_trust == ()

    sources = {}
    made = contenders.RuntimeContender.__init__

    def recording(self, name, engine_dir, *args, model_source=None, **kwargs):
        sources[Path(engine_dir)] = model_source
        made(self, name, engine_dir, *args, model_source=model_source, **kwargs)

    monkeypatch.setattr(contenders.RuntimeContender, "__init__", recording)
    out = tmp_path / "out"
    assert run_cli("bench", path, "-o", out, "--engine-dir", tiny_sdxl_engine_dir, "--refiner-engine-dir", adopted) == 0
    assert sources[Path(tiny_sdxl_engine_dir)] is not None and sources[adopted] is None
    assert json.loads((out / "results.json").read_text())["engines_on_trust"] == ["--refiner-engine-dir"]
    lines = (out / "results.md").read_text().split("\n- ")
    model = next(line for line in lines if line.startswith("Model:"))
    refiner = " ".join(next(line for line in lines if line.startswith("Refiner:")).split())
    assert "on trust" not in model
    assert ("**Engines taken on trust**: the directory given as --refiner-engine-dir does not record the checkpoint "
            "they were made from (an ONNX export adopted without --model), or its ControlNets' or adapters' files, so nothing proves they are the "
            "refiner's") in refiner
    # a report from before the flags recorded true, for either directory: said on the Model line, as then
    assert "their directory does not record" in _on_trust_words(True, "--engine-dir")
    assert _on_trust_words(True, "--refiner-engine-dir") == "" == _on_trust_words(None, "--engine-dir")


def test_served_rows_share_a_call_only_where_both_models_read_as_many_chunks(tiny_sdxl_engine_dir, refiner_dir):
    """The refiner reads ``prompt`` alone: a row whose ``prompt_2`` took the base model two chunks and
    one whose ``prompt`` took both models two shared a call (the larger count alone was compared),
    and the refiner padded the first row's prompt to two chunks: another image (an audit)."""
    from sdexport.serving.triton_model import ServedModel, ServeSettings
    long = ", ".join(["a red boat"] * 12).encode()  # two chunks in the tiny vocabulary

    def row(prompt: bytes, prompt_2: bytes) -> dict[str, np.ndarray]:
        return {"prompt": np.array([[prompt]], dtype=object), "prompt_2": np.array([[prompt_2]], dtype=object),
                "steps": np.array([[4]], dtype=np.int32), "seed": np.array([[1]], dtype=np.uint64)}

    model = ServedModel(ServeSettings(str(tiny_sdxl_engine_dir), backend="onnxruntime-cpu", max_steps=50,
                                      refiner=str(refiner_dir)), log=lambda *a: None)
    try:
        [alone] = model.generate([row(b"a cat", long)])
        beside, other = model.generate([row(b"a cat", long), row(long, b"x")])
    finally:
        model.close()
    assert not isinstance(alone, str) and not isinstance(beside, str) and not isinstance(other, str)
    np.testing.assert_array_equal(beside[0].pixels, alone[0].pixels)

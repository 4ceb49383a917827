"""ControlNet through the same specs, engines and loop: parity with diffusers' ControlNet pipelines
(one and two ControlNets, SD and SDXL, txt2img, img2img and inpainting with either U-Net, ONNX
Runtime and Torch), the residual specs every stage reads, TensorRT profiles for them, and the
refusals a user can cause."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
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
from sdexport.models.controlnet import residual_layout
from sdexport.models.presets import PRESETS
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.prompt_text import kept_text
from sdexport.runtime.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("without_gpu")

TOLERANCE = 1e-4
"""rel-L2 of the final latents against diffusers in fp32 (measured: about 2e-6)."""

MODELS = {  # name: (preset, ControlNets)
    "sd-one": ("tiny", ["tiny-controlnet"]),
    "sd-two": ("tiny", ["tiny-controlnet", "tiny-controlnet"]),
    "sdxl-one": ("tiny-sdxl", ["tiny-controlnet"]),
    "inpaint-one": ("tiny-inpaint", ["tiny-controlnet"]),  # a 9-channel inpainting U-Net
    "sdxl-inpaint-one": ("tiny-sdxl-inpaint", ["tiny-controlnet"]),  # its cases: -m slow (SLOW)
}
SLOW = pytest.mark.slow
"""On the cases of a combination whose parts the default run checks apart (SDXL ControlNets,
9-channel U-Nets with one): left to ``-m slow``, with the export only they read."""
TXT2IMG = [name for name in MODELS if "inpaint" not in name]


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory) -> MadeOnFirstUse[Path]:
    root = tmp_path_factory.mktemp("controlnet")

    def make(name: str) -> Path:
        preset, nets = MODELS[name]
        export(preset, root / name, ExportOptions(verify="quick", controlnets=nets))
        return root / name

    return MadeOnFirstUse(MODELS, make)


@pytest.fixture(scope="module")
def references() -> MadeOnFirstUse[DiffusersReference]:
    return MadeOnFirstUse(MODELS, lambda name: DiffusersReference(load_model(MODELS[name][0], controlnets=MODELS[name][1])))


def _request(name: str, **changes) -> GenerationRequest:
    count = len(MODELS[name][1])
    request = GenerationRequest(
        prompt=["a lighthouse", "a harbour"], negative_prompt=["fog", "rain"], steps=6, seeds=[3, 4], height=64,
        width=128, scheduler="euler_a",
        # 80x100: resized to 64x128 by both (Lanczos), so the preprocessing is compared too
        control_image=[picture(80, 100, 10 + i) for i in range(count)],
        control_scale=[0.7, 1.3][:count] if count > 1 else 0.8,
        control_start=[0.0, 0.2][:count] if count > 1 else 0.1,
        control_end=[0.8, 1.0][:count] if count > 1 else 0.9,
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def _rel(ours, theirs) -> float:
    return float(torch.linalg.norm(ours.latents - theirs.latents) / torch.linalg.norm(theirs.latents))


def _agree(ours, theirs) -> None:
    rel = _rel(ours, theirs)
    assert rel < TOLERANCE, rel
    assert np.abs(ours.pixels - theirs.pixels).max() < 1e-3


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
@pytest.mark.parametrize("name", TXT2IMG)
def test_matches_diffusers_controlnet_pipeline(engine_dirs, references, name, backend):
    """StableDiffusion(XL)ControlNetPipeline (two ControlNets: its MultiControlNetModel), same seeds,
    batch 2 with CFG, per-ControlNet scales and start/end windows, a stochastic scheduler."""
    pipeline = load_pipeline(engine_dirs[name], backend)
    request = _request(name)
    ours = pipeline(request)
    _agree(ours, references[name](request))
    # the ControlNets act: without them (scale 0) the latents differ, and the time is reported apart
    steps, settings = len(ours.timings.unet_steps), request.control_settings(len(MODELS[name][1]),
                                                                          PRESETS[MODELS[name][0]].family)
    active = [i for i in range(steps) if any(not (i / steps < s or (i + 1) / steps > e) for _, s, e in settings)]
    assert len(ours.timings.controlnet_steps) == len(active)
    quiet = pipeline(_request(name, control_scale=0.0))
    assert float(torch.linalg.norm(quiet.latents - ours.latents)) > 1e-2
    assert not quiet.timings.controlnet_steps  # a ControlNet at scale 0 adds zeros: it is not run
    # the image itself matters well beyond the tolerance: the parity above compares its preprocessing
    count = len(MODELS[name][1])
    other = pipeline(_request(name, control_image=[picture(80, 100, 20 + i) for i in range(count)]))
    assert _rel(other, ours) > 10 * TOLERANCE


@pytest.mark.parametrize(("scheduler", "schedule"), [("euler_a", 6), ("pndm", 7)])  # PNDM: one call more
def test_a_base_model_cut_for_a_refiner_weighs_the_controlnet_over_the_whole_schedule(engine_dirs, references,
                                                                                     scheduler, schedule):
    """SDXL's ControlNet pipeline with ``denoising_end`` (the base model of an ensemble): diffusers
    weighs each ControlNet's [start, end] over the whole schedule (its timesteps, PNDM's extra one
    included), then cuts the timesteps. Here the ControlNet ends at half of them: it runs for that
    many of the base model's calls, where half of the cut schedule's would be fewer."""
    request = _request("sdxl-one", control_start=0.0, control_end=0.5, denoising_end=0.6, scheduler=scheduler)
    ours = load_pipeline(engine_dirs["sdxl-one"], "onnxruntime-cpu")(request)
    assert _rel(ours, references["sdxl-one"](request)) < TOLERANCE
    calls, kept = len(ours.timings.unet_steps), int(schedule * 0.5)
    assert kept <= calls < schedule and len(ours.timings.controlnet_steps) == kept and int(calls * 0.5) < kept


def test_control_images_per_prompt_match_diffusers(engine_dirs, references):
    """A list of control images, one per prompt, in one ControlNet's place beside another's shared
    image: diffusers given its nested list (a list per prompt) computes the same, and each image
    comes out bit for bit as in a call where its control image serves every prompt (ONNX Runtime
    and Torch), so served requests with different control images can share a call. A batch split
    over calls cuts the lists."""
    first, second, shared = (picture(80, 100, 30 + i) for i in range(3))
    request = _request("sd-two", control_image=[[first, second], shared])
    for backend in ("onnxruntime-cpu", "torch"):
        pipeline = load_pipeline(engine_dirs["sd-two"], backend)
        ours = pipeline(request)
        if backend == "onnxruntime-cpu":
            _agree(ours, references["sd-two"](request))
        for row, image in enumerate((first, second)):
            alone = pipeline(_request("sd-two", control_image=[image, shared]))
            assert torch.equal(ours.latents[row], alone.latents[row]), backend
    parts = request.split(1)
    assert [part.control_image[0] for part in parts] == [[first], [second]]
    assert all(part.control_image[1] is shared for part in parts)


@pytest.mark.parametrize(("name", "mixed", "alone", "guess"), [
    # two ControlNets: a scale per prompt in one place, a window per prompt in the other (its second
    # image's net starts acting later), one shared value elsewhere
    ("sd-two", {"control_scale": [[0.4, 1.1], 1.3], "control_start": [0.0, [0.2, 0.5]], "control_end": [[0.8, 1.0], 1.0]},
     [{"control_scale": [0.4, 1.3], "control_start": [0.0, 0.2], "control_end": [0.8, 1.0]},
      {"control_scale": [1.1, 1.3], "control_start": [0.0, 0.5], "control_end": [1.0, 1.0]}], False),
    # one ControlNet in guess mode (its gains on top), the first image's at scale 0 (alone: not run)
    ("sd-one", {"control_scale": [[0.0, 0.9]]}, [{"control_scale": 0.0}, {"control_scale": 0.9}], True),
])
def test_controlnet_settings_per_prompt_weigh_each_image(engine_dirs, references, name, mixed, alone, guess,
                                                         monkeypatch):
    """Scales and windows given per prompt in a ControlNet's place: each image comes out bit for bit
    as in a call where its own settings serve every prompt (ONNX Runtime and Torch), so served
    requests with other settings share a call. The ControlNet runs at every step some image needs
    it, and the weights are on the device before the loop. A batch split over calls cuts the lists;
    the diffusers reference, which has no per-image settings, refuses them."""
    request = _request(name, guess_mode=guess, **mixed)
    for backend in ("onnxruntime-cpu", "torch"):
        pipeline = load_pipeline(engine_dirs[name], backend)
        ours = pipeline(request)
        for row, changes in enumerate(alone):
            own = pipeline(_request(name, guess_mode=guess, **changes))
            assert torch.equal(ours.latents[row], own.latents[row]), (backend, row)
            if changes.get("control_scale") == 0.0:  # alone at scale 0: not run
                assert not own.timings.controlnet_steps
        steps, family = len(ours.timings.unet_steps), PRESETS[MODELS[name][0]].family
        needed = [i for i in range(steps) if any(scale and not (i / steps < start or (i + 1) / steps > end)
                                                 for image in range(request.batch) for scale, start, end
                                                 in request.control_settings(len(MODELS[name][1]), family, image))]
        assert len(ours.timings.controlnet_steps) == len(needed)
    assert tensors_made_in_the_loop(pipeline, request, monkeypatch) == []
    parts = request.split(1)
    assert [part.control_scale for part in parts] == [[[0.4], 1.3], [[1.1], 1.3]] if name == "sd-two" else [
        [[0.0]], [[0.9]]]
    with pytest.raises(SdexportError, match="no per-image settings"):
        references[name](request)


@pytest.mark.slow
def test_per_prompt_scales_in_an_fp16_graph_on_the_cpu(tmp_path):
    """ONNX Runtime's CPU provider multiplies an fp16 graph's residuals by its scale in float32, as
    the loop weighs them where the prompts' scales differ: bit for bit there too. (A GPU multiplies
    in fp16: the ControlNet docstring says what that changes.)"""
    export("tiny", tmp_path / "fp16", ExportOptions(dtype="fp16", verify="none", controlnets=["tiny-controlnet"]))
    pipeline = load_pipeline(tmp_path / "fp16", "onnxruntime-cpu")
    mixed = pipeline(_request("sd-one", control_scale=[[0.4, 1.1]]))
    for row, scale in enumerate((0.4, 1.1)):
        assert torch.equal(mixed.latents[row], pipeline(_request("sd-one", control_scale=scale)).latents[row])


def test_img2img_with_a_controlnet_matches_diffusers(engine_dirs, references):
    pipeline = load_pipeline(engine_dirs["sd-one"], "onnxruntime-cpu", image_inputs=True)
    request = _request("sd-one", image=[picture(64, 128, 1)], strength=0.7, scheduler="default")
    _agree(pipeline(request), references["sd-one"](request))


INPAINT_CASES = [
    # engine directory, strength, scheduler, backend
    pytest.param("sd-one", 1.0, "euler_a", "onnxruntime-cpu", id="blended-full-strength"),
    pytest.param("sd-two", 0.6, "default", "onnxruntime-cpu", id="blended-partial-two-controlnets"),
    pytest.param("inpaint-one", 1.0, "euler_a", "onnxruntime-cpu", id="9-channel-full-strength"),
    pytest.param("inpaint-one", 0.6, "default", "torch", id="9-channel-partial-torch"),
    pytest.param("sd-one", 0.7, "euler_a", "torch", id="blended-partial-torch"),
    # SDXL: strength None is diffusers' 0.9999 (the init image noised, one step fewer)
    pytest.param("sdxl-one", None, "euler_a", "onnxruntime-cpu", id="sdxl-blended-default-strength"),
    pytest.param("sdxl-inpaint-one", None, "default", "onnxruntime-cpu", id="sdxl-9-channel-default-strength",
                 marks=SLOW),
    pytest.param("sdxl-inpaint-one", 1.0, "euler_a", "torch", id="sdxl-9-channel-full-strength-torch", marks=SLOW),
]


@pytest.mark.parametrize(("name", "strength", "scheduler", "backend"), INPAINT_CASES)
def test_inpainting_with_controlnets_matches_diffusers(engine_dirs, references, name, strength, scheduler, backend):
    """StableDiffusion(XL)ControlNetInpaintPipeline, same seeds, batch 2 with CFG: the ControlNets read
    the latents alone; a 9-channel U-Net also takes the mask and the masked image's latents, a standard
    one blends the kept region back after every step."""
    pipeline = load_pipeline(engine_dirs[name], backend, image_inputs=True)
    inpaint = {"image": [picture(64, 128, 1)], "mask": [box_mask(64, 128)], "strength": strength,
               "scheduler": scheduler}
    request = _request(name, **inpaint)
    ours = pipeline(request)
    assert request.task == "inpaint"
    _agree(ours, references[name](request))
    quiet = pipeline(_request(name, **inpaint, control_scale=0.0))  # the ControlNets act
    assert float(torch.linalg.norm(quiet.latents - ours.latents)) > 1e-2


GUESS_CASES = [
    # engine directory, backend, guidance, task
    pytest.param("sd-two", "onnxruntime-cpu", 7.5, "txt2img", id="two-controlnets-cfg"),
    pytest.param("sdxl-one", "torch", 7.5, "txt2img", id="sdxl-cfg-torch"),
    pytest.param("sd-one", "onnxruntime-cpu", 1.0, "txt2img", id="no-cfg-gains-only"),
    pytest.param("sd-one", "torch", 7.5, "img2img", id="img2img-torch"),
    pytest.param("inpaint-one", "onnxruntime-cpu", 7.5, "inpaint", id="9-channel-inpaint"),
    pytest.param("sdxl-one", "onnxruntime-cpu", 7.5, "inpaint", id="sdxl-blended-inpaint"),
]


def _task(task: str) -> dict[str, object]:
    """An init image (and mask) for ``task``, at the requests' 64x128."""
    if task == "txt2img":
        return {}
    return {"image": [picture(64, 128, 1)], "strength": 0.7, **({"mask": [box_mask(64, 128)]} if task == "inpaint" else {})}


@pytest.mark.parametrize(("name", "backend", "guidance", "task"), GUESS_CASES)
def test_guess_mode_matches_diffusers(engine_dirs, references, name, backend, guidance, task):
    """diffusers' ``guess_mode``: under CFG the ControlNets run on the conditional half alone (the
    unconditional half gets zeros) and their residuals are scaled from 0.1 to 1; without CFG only
    the scaling. Same seeds, the same latents; and not the latents of a run without it."""
    pipeline = load_pipeline(engine_dirs[name], backend, image_inputs=task != "txt2img")
    request = _request(name, guidance=guidance, guess_mode=True, **_task(task))
    ours = pipeline(request)
    assert ours.guess_mode
    _agree(ours, references[name](request))
    plain = pipeline(_request(name, guidance=guidance, **_task(task)))
    assert not plain.guess_mode and _rel(plain, ours) > 10 * TOLERANCE


def test_a_control_window_holding_no_step_is_said(engine_dirs, tmp_path, capsys):
    """0.3 to 0.6 of two steps holds neither (diffusers' controlnet_keep): the ControlNet never runs,
    as in diffusers, and the image records the window; said, not left to be found."""
    picture(64, 64, 2).save(tmp_path / "e.png")
    args = ["run", engine_dirs["sd-one"], "-p", "x", "--scheduler", "euler", "--control-image", tmp_path / "e.png",
            "--control-start", "0.3", "--control-end", "0.6", "-o", tmp_path / "o.png"]
    assert run_cli(*args, "--steps", "2") == 0
    said = " ".join(capsys.readouterr().err.split())
    assert ("note: control image 1 guided nothing: its --control-start to --control-end window holds none of the "
            "steps that ran (as diffusers runs it)") in said and said.count("guided") == 1
    assert run_cli(*args, "--steps", "5") == 0  # step 3 of 5 (0.4 to 0.6) lies in it
    assert "guided" not in capsys.readouterr().err
    # three images over two calls (the profile's batch 2), the third's window other: numbered as the run's,
    # said once
    assert run_cli(*args[:-6], "-p", "y", "-p", "z", "--control-start", "0.3", "--control-start", "0.3",
                   "--control-start", "0", "--control-end", "0.6", "-o", tmp_path / "o.png", "--steps", "2") == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "note: control image 1 guided nothing in images 1, 2: its" in said and said.count("guided") == 1


def test_a_resized_control_image_records_no_fit(engine_dirs, tmp_path, capsys):
    """--fit is the init image's (and mask's): a text-to-image run whose control image was resized
    records no fit it was never given (and could not be: --fit needs --init-image)."""
    picture(80, 100, 2).save(tmp_path / "e.png")
    out = tmp_path / "o.png"
    assert run_cli("run", engine_dirs["sd-one"], "-p", "x", "--steps", "1", "--control-image", tmp_path / "e.png",
                   "--height", "64", "--width", "128", "-o", out) == 0
    assert "resized" in capsys.readouterr().err
    assert "fit" not in json.loads(Image.open(out).text["sdexport"])
    # with --fit crop the init image is cropped, the control image stretched: said (a map made from
    # the init image no longer lies on it)
    picture(96, 160, 3).save(tmp_path / "init.png")
    assert run_cli("run", engine_dirs["sd-one"], "-p", "x", "--steps", "2", "--control-image", tmp_path / "init.png",
                   "--init-image", tmp_path / "init.png", "--height", "128", "--width", "128", "--fit", "crop",
                   "-o", out) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert (f"--control-image {tmp_path / 'init.png'} resized from 96x160 to 128x128 (as diffusers does: stretched, "
            "where --fit crop crops the init image and mask only; give it at 128x128 to keep the two aligned)") in said
    assert "cropped to 128x128 (centre)" in said


def test_served_guess_mode_is_the_image_run_writes(engine_dirs, tmp_path):
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    picture(64, 128, 2).save(tmp_path / "e.png")
    out = tmp_path / "cli.png"
    assert run_cli("run", engine_dirs["sd-one"], "-p", "x", "--steps", "3", "--seed", "5", "--control-image",
                   tmp_path / "e.png", "--guess-mode", "--backend", "onnxruntime-cpu", "-o", out) == 0
    assert json.loads(Image.open(out).text["sdexport"])["guess_mode"] is True
    model = ServedModel(ServeSettings(str(engine_dirs["sd-one"]), backend="onnxruntime-cpu", max_steps=50))
    try:
        served = {}
        for guess in (True, False):
            [generated] = model.generate([_inputs(["x"], steps=3, seed=[5], guess_mode=guess,
                                                  control_image=(tmp_path / "e.png").read_bytes())])
            assert not isinstance(generated, str), generated
            served[guess] = _png_pixels(generated[0].png)
        np.testing.assert_array_equal(served[True], np.asarray(Image.open(out).convert("RGB")))
        assert not np.array_equal(served[False], served[True])
    finally:
        model.close()


def test_run_and_serve_refine_a_controlnet_base_models_images(engine_dirs, tmp_path, capsys):
    """``run BASE --refiner DIR`` where the base model has a ControlNet: the control image and its
    settings are the base model's (recorded under "base"), the refiner's half has none; the image
    is the Python API's two calls', and ``serve --refiner`` gives it too. An init image with the
    ControlNet is refused in one line before loading (diffusers' SDXL ControlNet img2img pipeline
    takes no denoising_end)."""
    import dataclasses

    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    refiner = tmp_path / "refiner"
    export("tiny-sdxl-refiner", refiner, ExportOptions(verify="none"))
    picture(64, 64, 2).save(tmp_path / "edges.png")
    out = tmp_path / "cli.png"
    base_dir = engine_dirs["sdxl-one"]
    assert run_cli("run", base_dir, "-p", "x", "--steps", "6", "--seed", "5", "--control-image", tmp_path / "edges.png",
                   "--control-end", "0.5", "--refiner", refiner, "--denoising-end", "0.6", "--backend",
                   "onnxruntime-cpu", "-o", out) == 0
    record = json.loads(Image.open(out).text["sdexport"])
    assert "control" not in record and "control_image" not in record
    assert record["base"]["control_image"] == [str(tmp_path / "edges.png")]
    assert record["base"]["control"][0]["end"] == 0.5
    request = GenerationRequest(prompt=["x"], steps=6, seeds=[5], height=64, width=64)
    with load_pipeline(base_dir, "onnxruntime-cpu") as base:
        latents = base(dataclasses.replace(request, control_image=[Image.open(tmp_path / "edges.png")],
                                           control_end=0.5, denoising_end=0.6)).latents
    with load_pipeline(refiner, "onnxruntime-cpu", image_inputs=False) as refining:
        refined = refining(dataclasses.replace(request, denoising_start=0.6, init_latents=latents))
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(refined.images[0]))
    model = ServedModel(ServeSettings(str(base_dir), backend="onnxruntime-cpu", refiner=str(refiner),
                                      denoising_end=0.6), log=lambda *a: None)
    try:
        [served] = model.generate([_inputs(["x"], steps=6, seed=[5], control_end=0.5,
                                           control_image=(tmp_path / "edges.png").read_bytes())])
    finally:
        model.close()
    assert not isinstance(served, str), served
    np.testing.assert_array_equal(_png_pixels(served[0].png), np.asarray(refined.images[0]))
    capsys.readouterr()
    assert run_cli("run", base_dir, "-p", "x", "--control-image", tmp_path / "edges.png", "--init-image",
                   tmp_path / "edges.png", "--refiner", refiner, "--backend", "onnxruntime-cpu", "-o",
                   tmp_path / "no.png") == 2
    err = capsys.readouterr().err.strip()
    assert "a ControlNet img2img ensemble of experts is not run yet" in err and len(err.splitlines()) == 1, err


POOLED = {  # name: (preset, ControlNets before the pooling one, export verification)
    "sd-pooled": ("tiny", [], "full"),  # alone: diffusers runs it in guess mode by itself
    "sd-mixed": ("tiny", ["tiny-controlnet"], "quick"),  # second: diffusers reads the first one's flag only
    "sdxl-inpaint": ("tiny-sdxl-inpaint", [], "quick"),  # diffusers' SDXL inpainting ignores the flag (SLOW)
}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> MadeOnFirstUse[tuple[Path, DiffusersReference]]:
    """Engine directories with a pooling ControlNet (``global_pool_conditions``, as the shuffle
    ControlNets have), and diffusers' own pipelines over the same modules, told nothing about it."""
    root = tmp_path_factory.mktemp("pooled")

    def make(name: str) -> tuple[Path, DiffusersReference]:
        preset, plain, verify = POOLED[name]
        net = _controlnet_dir(root, preset, f"{name}-net")
        config = json.loads((net / "config.json").read_text())
        (net / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
        nets = [*plain, str(net)]
        export(preset, root / name, ExportOptions(verify=verify, controlnets=nets))  # full: every size checked
        return root / name, DiffusersReference(load_model(preset, controlnets=nets))

    return MadeOnFirstUse(POOLED, make)


@pytest.mark.parametrize("backend", ["torch", "tensorrt"])
def test_a_controlnet_config_edited_after_the_export_is_refused_on_every_backend(engine_dirs, tmp_path, backend):
    """The loop reads a ControlNet's config.json (its pooling turns guess mode on) whatever runs the
    graphs; only the ONNX Runtime backends hashed it: an edit changed torch's image without a word
    (an audit), and TensorRT's would have."""
    from sdexport.errors import EngineDirError
    from sdexport.runtime.loading import pooled_controlnets, verify_for_backend

    copy = tmp_path / "edited"
    shutil.copytree(engine_dirs["sd-one"], copy)
    manifest = load_manifest(copy, verify_files=False)
    verify_for_backend(copy, manifest, backend)  # (as exported)
    config = json.loads((copy / "controlnet" / "config.json").read_text())
    (copy / "controlnet" / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    assert pooled_controlnets(copy, manifest) == ("controlnet",)  # what it would have read
    with pytest.raises(EngineDirError, match=r"controlnet/config\.json"):
        verify_for_backend(copy, manifest, backend)


POOLED_CASES = [
    # engine directory, backend, task, guess mode asked for, guess mode run (diffusers' rule)
    pytest.param("sd-pooled", "onnxruntime-cpu", "txt2img", False, True, id="alone-forced"),
    pytest.param("sd-pooled", "torch", "img2img", False, True, id="alone-forced-img2img-torch"),
    # diffusers' rule here is test_the_pooling_note_follows_diffusers_rule's; the latents: -m slow
    pytest.param("sd-mixed", "onnxruntime-cpu", "txt2img", False, False, id="second-not-forced", marks=SLOW),
    pytest.param("sd-mixed", "onnxruntime-cpu", "inpaint", True, True, id="second-asked"),
    pytest.param("sdxl-inpaint", "onnxruntime-cpu", "inpaint", False, False, id="sdxl-inpaint-not-forced", marks=SLOW),
    pytest.param("sdxl-inpaint", "torch", "inpaint", True, True, id="sdxl-inpaint-asked-torch", marks=SLOW),
]


@pytest.mark.parametrize(("name", "backend", "task", "asked", "ran"), POOLED_CASES)
def test_a_pooling_controlnet_runs_as_diffusers_runs_it(pooled, name, backend, task, asked, ran):
    """The pooling ControlNet's residuals are one value per channel (averaged over the pixels in the
    graph, expanded to the U-Net's residual sides); guess mode is on where diffusers turns it on by
    itself (the first ControlNet pools, not in SDXL inpainting) or where it is asked for, and the
    latents are diffusers' own in each case."""
    engine_dir, reference = pooled[name]
    pipeline = load_pipeline(engine_dir, backend, image_inputs=task != "txt2img")
    like = {"sd-mixed": "sd-two", "sdxl-inpaint": "sdxl-one"}.get(name, "sd-one")  # as many ControlNets
    request = _request(like, guess_mode=asked, **_task(task))
    ours = pipeline(request)
    assert ours.guess_mode == ran
    _agree(ours, reference(request))
    other = pipeline(_request(like, guess_mode=not asked, **_task(task)))
    assert other.guess_mode == (not ran or name == "sd-pooled")  # alone, it is always on
    assert pipeline.pooled_controlnets == ("controlnet_1" if name == "sd-mixed" else "controlnet",)
    net = pipeline.engines[pipeline.pooled_controlnets[0]]
    conditioning = pipeline.encode_prompt(_request(like))
    feed = {"sample": torch.randn(2, 4, 8, 16), "timestep": torch.tensor(500.0),
            "controlnet_cond": torch.rand(2, 3, 64, 128), "conditioning_scale": torch.tensor(1.0),
            **{k: v[2:] for k, v in conditioning.items() if k in net.spec.input_names}}
    out = net(feed)
    for output, (channels, scale) in zip(net.spec.residual_outputs, load_manifest(engine_dir).dims["residuals"]):
        residual = out[output]
        assert residual.shape == (2, channels, 8 // scale, 16 // scale)
        assert torch.equal(residual, residual[..., :1, :1].expand_as(residual))  # one value per channel
        assert residual.abs().sum() > 0


@pytest.mark.parametrize(("name", "args", "said"), [
    ("sd-pooled", [], ("guess mode: controlnet pools its conditions (global_pool_conditions), which diffusers runs "
                      "in guess mode: this run does as --guess-mode")),
    ("sd-pooled", ["--guess-mode"], None),  # asked for: nothing to say
    ("sd-mixed", [], ("controlnet_1 pools its conditions (global_pool_conditions), but diffusers turns guess mode on "
                     "only when the first ControlNet pools: this run is not in guess mode")),
    pytest.param("sdxl-inpaint", ["--init-image", "{i}", "--mask", "{m}"],
                 "but diffusers' SDXL inpainting pipeline does not read the flag: this run is not in guess mode",
                 marks=SLOW),  # the rule alone: test_the_pooling_note_follows_diffusers_rule
])
def test_run_says_what_a_pooling_controlnet_does_to_guess_mode(pooled, tmp_path, capsys, name, args, said):
    files = {"e": tmp_path / "e.png", "i": tmp_path / "i.png", "m": tmp_path / "m.png"}
    for key, image in (("e", picture(64, 64, 0)), ("i", picture(64, 64, 1)), ("m", box_mask(64, 64))):
        image.save(files[key])
    controls = ["--control-image", str(files["e"])] * (2 if name == "sd-mixed" else 1)
    assert run_cli("run", pooled[name][0], "-p", "x", "-o", tmp_path / "o.png", *controls, "--steps", "2",
                   "--height", "64", "--width", "64", *[a.format(**files) for a in args]) == 0
    err = capsys.readouterr().err
    assert (said in err) if said else ("pools its" not in err)
    saved = json.loads(Image.open(tmp_path / "o.png").text["sdexport"])
    assert saved.get("guess_mode", False) == (said is None or said.startswith("guess mode"))


@pytest.mark.parametrize(("family", "task", "first_pools", "said"), [
    ("sdxl", "inpaint", True, "but diffusers' SDXL inpainting pipeline does not read the flag"),
    ("sdxl", "img2img", True, "which diffusers runs in guess mode"),
    ("sd", "inpaint", True, "which diffusers runs in guess mode"),
    ("sd", "txt2img", False, "diffusers turns guess mode on only when the first ControlNet pools"),
])
def test_the_pooling_note_follows_diffusers_rule(family, task, first_pools, said):
    """The rule ``run`` states (its SDXL-inpainting run is a slow case), without an export."""
    from sdexport.runtime.request import forced_guess_mode, pooling_note

    controlnets = ["controlnet", "controlnet_1"]
    pooled = [controlnets[0 if first_pools else 1]]
    request = _request("sd-two", **_task(task))
    assert forced_guess_mode(first_pools, family, task) == ("runs in guess mode" in said)
    assert said in pooling_note(pooled, controlnets, request, family)
    assert pooling_note(pooled, controlnets, _request("sd-two", guess_mode=True, **_task(task)), family) is None


def test_cuda_graph_sessions_capture_the_controlnets_at_the_batch_they_run(pooled, engine_dirs, monkeypatch):
    """ONNX Runtime CUDA graphs are captured at load for one batch: a ControlNet in guess mode runs at
    the prompts' batch, not the guidance batch (asked for, or the first ControlNet pools)."""
    from sdexport.runtime import loading, onnxruntime_backend
    from sdexport.shapes import ShapeProfile

    captured: dict[str, int] = {}

    class Recording:
        def __init__(self, spec, path, **options):
            captured[spec.name] = options["sizes"]["B"] if options["cuda_graph"] else 0

    monkeypatch.setattr(onnxruntime_backend, "OnnxRuntimeEngine", Recording)
    # a class, as torch's is: diffusers, imported later in a run of this test alone, writes `Stream | None`
    monkeypatch.setattr(torch.cuda, "Stream", type("Stream", (), {"__init__": lambda self, *a, **k: None}))
    for directory, guess, expected in [(engine_dirs["sd-two"], False, {"controlnet": 4, "controlnet_1": 4}),
                                       (engine_dirs["sd-two"], True, {"controlnet": 2, "controlnet_1": 2}),
                                       (pooled["sd-pooled"][0], False, {"controlnet": 2}),
                                       (pooled["sd-mixed"][0], False, {"controlnet": 4, "controlnet_1": 4})]:
        manifest = load_manifest(directory)
        captured.clear()
        loading._load_engines(directory, manifest, [*manifest.controlnets, "unet"], "onnxruntime-cuda", cuda_graph=True,
                              request_profile=ShapeProfile.single(2, 64, 128), guess_mode=guess,
                              pooled=loading.pooled_controlnets(directory, manifest))
        assert captured == {**expected, "unet": 4}


def _inpaint_condition(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """The control image of diffusers' ControlNet inpainting example (``make_inpaint_condition``),
    written from its documentation: pixels in [0, 1], -1 where the mask is over half white."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels[np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 > 0.5] = -1.0
    return torch.from_numpy(pixels[None].transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize(("name", "backend"), [("sd-one", "onnxruntime-cpu"), ("inpaint-one", "torch"),
                                               pytest.param("sdxl-inpaint-one", "onnxruntime-cpu", marks=SLOW)])
def test_masked_init_control_image_matches_diffusers_inpaint_condition(engine_dirs, references, name, backend):
    """``masked-init``: what an inpainting ControlNet reads, made from the request's init images and
    masks (one each per prompt here; one a grey ramp, so the threshold is compared), as diffusers'
    example makes it and its pipeline batches it."""
    from sdexport.runtime.request import MASKED_INIT

    pipeline = load_pipeline(engine_dirs[name], backend, image_inputs=True)
    images = [picture(64, 128, 1), picture(64, 128, 2)]
    masks = [Image.fromarray(np.tile(np.linspace(0, 255, 128).round().astype(np.uint8), (64, 1))), box_mask(64, 128)]
    inpaint = {"image": images, "mask": masks, "strength": 0.8}
    ours = pipeline(_request(name, **inpaint, control_image=[MASKED_INIT]))
    condition = torch.cat([_inpaint_condition(image, mask) for image, mask in zip(images, masks)])
    _agree(ours, references[name](_request(name, **inpaint, control_image=[condition])))
    with pytest.raises(SdexportError, match="not masked-init: pass the masked init image as a tensor"):
        references[name](_request(name, **inpaint, control_image=[MASKED_INIT]))
    # the parity above would notice the -1 region, or the second image's row, missing
    for wrong in (images[0], picture(64, 128, 3)):
        other = pipeline(_request(name, **inpaint, control_image=[wrong]))
        assert _rel(other, ours) > 10 * TOLERANCE


def test_masked_init_needs_an_init_image_and_a_mask(engine_dirs, tmp_path, monkeypatch, no_engines, capsys):
    from sdexport.runtime.request import MASKED_INIT

    picture(64, 64, 0).save(tmp_path / "i.png")
    run = ("run", engine_dirs["sd-one"], "-p", "x", "-o", tmp_path / "o.png", "--control-image", MASKED_INIT)
    assert run_cli(*run) == 2
    assert "control image masked-init is the init image with the mask's region at -1" in capsys.readouterr().err
    assert run_cli(*run, "--init-image", tmp_path / "i.png") == 2
    assert "it needs --init-image and --mask" in capsys.readouterr().err
    picture(64, 64, 0).save(tmp_path / "m.png")
    sdxl = ("run", engine_dirs["sdxl-one"], "-p", "x", "-o", tmp_path / "o.png", "--control-image", MASKED_INIT)
    assert run_cli(*sdxl, "--init-image", tmp_path / "i.png") == 2  # SDXL alike
    assert "it needs --init-image and --mask" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "masked-init").write_bytes(b"not an image")
    assert run_cli(*run, "--init-image", "i.png", "--mask", "m.png") == 2
    assert "a file of that name is here too: pass ./masked-init for the file" in capsys.readouterr().err
    assert run_cli(*run[:-1], "./masked-init", "--init-image", "i.png", "--mask", "m.png") == 2
    assert "--control-image masked-init: not a readable image" in capsys.readouterr().err  # the file, read


DEFAULT_CASES = [  # family, task, ControlNets?, the diffusers pipeline that does it
    ("sd", "txt2img", False, "StableDiffusionPipeline"),
    ("sdxl", "txt2img", False, "StableDiffusionXLPipeline"),
    ("sd", "txt2img", True, "StableDiffusionControlNetPipeline"),
    ("sd", "img2img", True, "StableDiffusionControlNetImg2ImgPipeline"),
    ("sd", "inpaint", True, "StableDiffusionControlNetInpaintPipeline"),
    ("sdxl", "txt2img", True, "StableDiffusionXLControlNetPipeline"),
    ("sdxl", "img2img", True, "StableDiffusionXLControlNetImg2ImgPipeline"),
    ("sdxl", "inpaint", True, "StableDiffusionXLControlNetInpaintPipeline"),
    ("sd", "img2img", False, "StableDiffusionImg2ImgPipeline"),
    ("sd", "inpaint", False, "StableDiffusionInpaintPipeline"),
    ("sdxl", "img2img", False, "StableDiffusionXLImg2ImgPipeline"),
    ("sdxl", "inpaint", False, "StableDiffusionXLInpaintPipeline"),
    ("sdxl-refiner", "img2img", False, "StableDiffusionXLImg2ImgPipeline"),
    ("sdxl-refiner", "inpaint", False, "StableDiffusionXLInpaintPipeline"),
]


@pytest.mark.parametrize(("family", "task", "controlnet", "pipeline"), DEFAULT_CASES,
                         ids=[f"{c[3]}-refiner" if c[0] == "sdxl-refiner" else c[3] for c in DEFAULT_CASES])
def test_the_default_scale_strength_and_guidance_are_diffusers_for_the_task(family, task, controlnet, pipeline):
    """Read from diffusers' own signatures: SDXL inpainting keeps the scale at 1.0 where SD lowers it
    to 0.5, and takes strength 0.9999 where SD takes 1; SDXL guides at 5.0, except its inpainting
    pipeline without ControlNets (7.5)."""
    import inspect

    import diffusers

    defaults = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    request = GenerationRequest(prompt=["x"], control_image=[picture(64, 64, 0)] if controlnet else None,
                                image=None if task == "txt2img" else [picture(64, 64, 1)],
                                mask=[box_mask(64, 64)] if task == "inpaint" else None)
    assert request.task == task
    if controlnet:
        scale = defaults["controlnet_conditioning_scale"].default
        assert request.control_settings(2, family) == [(scale, 0.0, 1.0)] * 2
    if task != "txt2img":
        assert request.effective_strength(family) == defaults["strength"].default
    assert request.effective_guidance(family) == defaults["guidance_scale"].default
    assert request.with_defaults(family).guidance == defaults["guidance_scale"].default
    if family == "sdxl-refiner":  # the refiner's pipelines are SDXL's: their aesthetic scores
        scores = (defaults["aesthetic_score"].default, defaults["negative_aesthetic_score"].default)
        assert request.aesthetic_scores() == scores


def test_specs_and_manifest_describe_the_residuals(engine_dirs):
    manifest = load_manifest(engine_dirs["sd-two"])
    layout = residual_layout(PRESETS["tiny"].unet)
    assert [tuple(r) for r in manifest.dims["residuals"]] == list(layout)
    assert manifest.controlnets == ["controlnet", "controlnet_1"]
    unet, net = manifest.spec("unet"), manifest.spec("controlnet_1")
    assert unet.residual_inputs == [*(f"down_block_additional_residuals.{i}" for i in range(len(layout) - 1)),
                                    "mid_block_additional_residual"]
    assert len(net.residual_outputs) == len(layout)
    # the graphs: residual sides are symbolic, halved where the U-Net downsamples
    graph = onnx.load(str(engine_dirs["sd-two"] / "unet" / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    last = f"down_block_additional_residuals.{len(layout) - 2}"
    assert dims[last] == ["B", layout[-2][0], "h/2", "w/2"]
    index = json.loads((engine_dirs["sd-two"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    assert (engine_dirs["sd-two"] / "controlnet_1" / "config.json").is_file()
    # the U-Net of a plain directory takes no residuals
    assert not load_manifest(engine_dirs["sd-one"]).spec("vae_decoder").residual_inputs


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.1"], ids=["trt10", "trt11"])
def test_tensorrt_profiles_cover_the_residuals(engine_dirs, tmp_path, monkeypatch, version):
    """The profiles come from the specs: the ControlNet's and the U-Net's residual shapes follow h/2."""
    from test_tensorrt_fakes import build_profiles

    (net, unet) = build_profiles(monkeypatch, tmp_path, version, engine_dirs["sd-one"], ["controlnet", "unet"])
    residual = unet["profiles"][0]["down_block_additional_residuals.3"]
    # tiny profile: batch 1-2 (CFG: up to 4), sides 64-256 px = latents 8-32, halved after the first block
    assert (tuple(residual.min), tuple(residual.max)) == ((1, 64, 4, 4), (4, 64, 16, 16))
    assert tuple(net["profiles"][0]["controlnet_cond"].max) == (4, 3, 256, 256)
    assert "conditioning_scale" not in net["profiles"][0]  # a scalar, like the timestep: no shape to profile


@pytest.fixture
def no_engines(monkeypatch):
    from sdexport.runtime import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("engines were loaded"))


@pytest.mark.parametrize("args, message", [
    ([], "has 1 ControlNet: give --control-image"),
    (["--control-image", "{img}", "--control-image", "{img}"], "2 control images (--control-image) for 1 ControlNet"),
    (["--control-image", "{bad}"], "--control-image {bad}: not a readable image"),
    (["--control-image", ""], "--control-image '': an empty path; name an image file"),  # (was ".: a directory")
    (["--control-image", "{img}", "--height", "512", "--width", "512"], "height 512 is outside the engines' profile"),
    (["--control-image", "{big}"], "(the size of the first --control-image; give --height and --width"),
    (["--control-image", "{img}", "--control-start", "0.6", "--control-end", "0.5"], "--control-start 0.6 is not before"),
    # an empty window: the ControlNet would act at no step (diffusers refuses start >= end too)
    (["--control-image", "{img}", "--control-start", "0.5", "--control-end", "0.5"],
     "--control-start 0.5 is not before --control-end 0.5"),
    (["--control-image", "{img}", "--control-end", "1.5"], "--control-end 1.5: a fraction of the steps"),
    (["--control-image", "{img}", "--control-scale", "1", "--control-scale", "2"], "--control-scale: 2 values for 1"),
    (["--control-image", "{img}", "--control-scale", "nan"], "--control-scale nan: expected a finite number"),
    (["--control-image", "{img}", "--height", "64"], "give both --height and --width"),
    # one per image (here 2): that many, and masked-init in every image's place or none
    (["-p", "y"] + ["--control-image", "{img}"] * 3, ("3 --control-image for 2 images: give 1 (one per ControlNet, "
                                                      "in the order they were exported, for every image) or 2 (1 "
                                                      "per image, image by image)")),
    (["-p", "y", "--control-image", "{img}", "--control-image", "masked-init"],
     "--control-image masked-init: give it for every image or none"),
    # settings per image too
    (["-p", "y", "--control-image", "{img}", *[a for v in "123" for a in ("--control-scale", v)]],
     "3 --control-scale for 2 images: give 1 (for every image) or 2 (one per image)"),
    (["-p", "y", "--control-image", "{img}", "--control-start", "0.5", "--control-start", "0.9", "--control-end",
      "0.8"], "--control-start 0.9 is not before --control-end 0.8 (image 2 of 2)"),
    # over the whole run, which the profile (at most 2 per call) splits: image 3 is in a call of its own
    (["--batch", "3", "--control-image", "{img}", *[a for v in ("0", "0", "0.9") for a in ("--control-start", v)],
      "--control-end", "0.8"], "--control-start 0.9 is not before --control-end 0.8 (image 3 of 3)"),
])
def test_bad_control_requests_are_refused_before_engines_load(engine_dirs, tmp_path, no_engines, capsys, args,
                                                               message):
    files = {"img": tmp_path / "edges.png", "bad": tmp_path / "bad.png", "big": tmp_path / "big.png"}
    picture(64, 64, 0).save(files["img"])
    files["bad"].write_bytes(b"not a png")
    picture(1024, 1024, 0).save(files["big"])
    args = [a.format(**files) for a in args]
    assert run_cli("run", engine_dirs["sd-one"], "-p", "x", "-o", tmp_path / "o.png", *args) == 2
    assert message.format(**files) in capsys.readouterr().err


def test_control_image_without_controlnets_is_refused(tiny_engine_dir, tmp_path, no_engines, capsys):
    picture(64, 64, 0).save(tmp_path / "edges.png")
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tmp_path / "o.png", "--control-image",
                   tmp_path / "edges.png") == 2
    assert "need an engine directory exported with --controlnet" in capsys.readouterr().err
    for setting in (["--control-scale", "1"], ["--guess-mode"],  # a setting alone, said too
                    ["--control-start", "0"], ["--control-end", "1"]):  # its default, given: meant all the same
        assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tmp_path / "o.png", *setting) == 2
        assert "need an engine directory exported with --controlnet" in capsys.readouterr().err


def test_python_api_refuses_before_any_engine_runs(engine_dirs):
    from sdexport.runtime.request import MASKED_INIT

    pipeline = load_pipeline(engine_dirs["sd-two"], "onnxruntime-cpu")
    calls = watch(pipeline)
    with pytest.raises(SdexportError, match=r"1 control images \(control_image\) for 2 ControlNets"):
        pipeline(_request("sd-two", control_image=[picture(64, 64, 0)]))
    with pytest.raises(SdexportError, match="control image: expected a PIL image"):
        pipeline(_request("sd-two", control_image=[picture(64, 64, 0), np.zeros((8, 8, 3))]))
    with pytest.raises(SdexportError, match="masked-init is the init image with the mask's region at -1"):
        pipeline(_request("sd-two", control_image=[picture(64, 64, 0), MASKED_INIT], image=[picture(64, 128, 0)]))
    # one per prompt: a list of one or one per prompt in a ControlNet's place, which a flat list is not
    image = picture(64, 64, 0)
    with pytest.raises(SdexportError, match=r"3 control images for 2 prompts \(control image 1 of 2\): give one"):
        pipeline(_request("sd-two", control_image=[[image] * 3, image]))
    with pytest.raises(SdexportError, match="masked-init is made for each prompt from its init image and mask"):
        pipeline(_request("sd-two", control_image=[image, [image, MASKED_INIT]]))
    with pytest.raises(SdexportError, match=r"4 control images \(control_image\) for 2 ControlNets: .*; with one per prompt, give a "
                                            r"list in each place \(control_image=\[\[image_1, image_2, ...\], ...\]\)"):
        pipeline(_request("sd-two", control_image=[image] * 4))
    # settings per prompt: the same layout
    with pytest.raises(SdexportError, match=r"control_scale: 3 values for 2 prompts \(control image 2 of 2\)"):
        pipeline(_request("sd-two", control_scale=[1.0, [0.5, 0.6, 0.7]]))
    # control_scale=None is its default; the window has none (a TypeError in a comparison: an audit)
    with pytest.raises(SdexportError, match=r"^control_start None: expected an int or a float, not NoneType"):
        pipeline(_request("sd-two", control_start=None))
    with pytest.raises(SdexportError, match=r"^control_scale 0.5 \(control image 1 of 2\): expected an int or a float, not float32"):
        pipeline(_request("sd-two", control_scale=[np.float32(0.5), 1.0]))  # (numpy's float32 is no float)
    with pytest.raises(SdexportError, match=r"control_end: 4 values for 2 ControlNets: .*; with one per prompt, "
                                            r"give a list in each place"):
        pipeline(_request("sd-two", control_end=[0.8, 0.9, 1.0, 1.0]))
    with pytest.raises(SdexportError, match=r"control_start 0.9 is not before control_end 0.8 \(control image 1, "
                                            r"image 2 of 2\)"):
        pipeline(_request("sd-two", control_start=[[0.1, 0.9], 0.0], control_end=0.8))
    with pytest.raises(SdexportError, match=r"control_start 1.5 \(control image 1 of 2, image 2 of 2\): a fraction"):
        pipeline(_request("sd-two", control_start=[[0.1, 1.5], 0.0]))
    # a window given once for both is not said of the first alone; a place given is named (an audit)
    with pytest.raises(SdexportError, match=r"^control_start 0 is not before control_end 0$"):
        pipeline(_request("sd-two", control_start=0.0, control_end=0.0))
    with pytest.raises(SdexportError, match=r"^control_start 0.5 is not before control_end 0.5 \(control image 2\)$"):
        pipeline(_request("sd-two", control_start=[0.0, 0.5], control_end=0.5))
    with pytest.raises(SdexportError, match=r"^guess_mode True: expected true or false \(a bool\), not numpy.bool"):
        pipeline(_request("sd-two", guess_mode=np.bool_(True)))
    assert not calls


class Watched:
    """An engine that notes each call, its name and feed, in ``calls`` before running it."""

    def __init__(self, engine, calls: list[tuple[str, dict]]):
        self.engine, self.calls = engine, calls
        self.spec, self.device, self.profile = engine.spec, engine.device, engine.profile

    def __call__(self, feed):
        self.calls.append((self.spec.name, feed))
        return self.engine(feed)


def watch(pipeline) -> list[tuple[str, dict]]:
    """Watch every engine of ``pipeline``: the list its calls are noted in, in order."""
    calls: list[tuple[str, dict]] = []
    pipeline.engines = {name: Watched(engine, calls) for name, engine in pipeline.engines.items()}
    return calls


def tensors_made_in_the_loop(pipeline, request: GenerationRequest, monkeypatch) -> list[str]:
    """Where sdexport's own code called ``torch.tensor`` (on a GPU, with Python values: a copy to the
    device that waits for it) inside ``pipeline(request)``'s loop: from the moment the starting
    latents and the ControlNet or adapter inputs are ready (``initial_latents`` or
    ``image_conditioning``, then ``control_conditioning``, ``adapter_features``) to the VAE decode.

    It sees that one call, made in an sdexport module: not ``as_tensor``, ``.item()`` or ``.to``,
    and not what diffusers' schedulers do when sdexport calls them (their per-step copies:
    docs/design-notes.md)."""
    made: list[str] = []
    state = {"loop": False, "setting_up": 0}  # set-up methods may call one another
    real = torch.tensor

    def noted(*args, **kwargs):
        caller = sys._getframe(1)
        if state["loop"] and not state["setting_up"] and caller.f_globals.get("__name__", "").startswith("sdexport"):
            made.append(f"{caller.f_globals['__name__']}.{caller.f_code.co_name}:{caller.f_lineno}")
        return real(*args, **kwargs)

    def setting_up(method):  # makes its tensors before the loop, which may start once it returns
        def run(*args, **kwargs):
            state["setting_up"] += 1
            try:
                return method(*args, **kwargs)
            finally:
                state["setting_up"] -= 1
                state["loop"] = True
        return run

    def decoding(method):
        def run(*args, **kwargs):
            state["loop"] = False
            return method(*args, **kwargs)
        return run

    with monkeypatch.context() as patch:
        patch.setattr(torch, "tensor", noted)
        for name in ("initial_latents", "image_conditioning", "control_conditioning", "adapter_features"):
            patch.setattr(pipeline, name, setting_up(getattr(pipeline, name)))
        patch.setattr(pipeline, "decode", decoding(pipeline.decode))
        pipeline(request)
    return made


def _controlnet_dir(tmp_path: Path, preset: str, name: str = "net") -> Path:
    """A diffusers ControlNet directory made from a preset's U-Net (as a user would download one)."""
    model = load_model(preset, controlnets=["tiny-controlnet"])
    model.module("controlnet").save_pretrained(tmp_path / name)
    return tmp_path / name


def test_a_controlnet_directory_exports_and_runs(tmp_path):
    """--controlnet DIR: its own weights (not a preset's), every one of them read."""
    net = _controlnet_dir(tmp_path, "tiny")
    out = tmp_path / "engines"
    assert run_cli("export", "tiny", "--controlnet", net, "-o", out, "--verify", "quick") == 0
    manifest = load_manifest(out)
    assert manifest.model["source"]["controlnets"] == [{"kind": "diffusers", "path": str(net.resolve())}]
    picture(64, 64, 0).save(tmp_path / "edges.png")
    assert run_cli("run", out, "-p", "x", "-o", tmp_path / "o.png", "--control-image", tmp_path / "edges.png",
                   "--steps", "2", "--backend", "torch") == 0
    saved = json.loads(Image.open(tmp_path / "o.png").text["sdexport"])
    assert saved["control"] == [{"scale": 1.0, "start": 0.0, "end": 1.0}]
    assert saved["control_image"] == [str(tmp_path / "edges.png")]


@pytest.mark.parametrize("base, net, message", [
    ("tiny-sdxl", "sd15-controlnet", "this preset goes with the preset(s) sd15, not tiny-sdxl"),
    ("tiny", "{missing}", "no such directory, and not a ControlNet preset"),
    ("tiny", "{sdxl_net}", "an SDXL ControlNet for an sd model"),
    ("tiny", "{other_class}", "a ControlNetXSAdapter; sdexport runs diffusers ControlNetModels"),
    ("tiny", "{a_vae}", "an AutoencoderKL; sdexport runs diffusers ControlNetModels"),
    # an adapter preset, or a file (how most ControlNets are shared): it said "no such directory" (an audit)
    ("tiny", "tiny-adapter", "--controlnet tiny-adapter: a T2I-Adapter preset, not a ControlNet one: pass it as --adapter"),
    ("tiny", "{a_file}", ("a file; it takes a diffusers ControlNetModel directory (convert a single file with diffusers' "
                          "ControlNetModel.from_single_file(FILE).save_pretrained(DIR))")),
])
def test_export_refuses_a_controlnet_that_does_not_fit(tmp_path, capsys, monkeypatch, base, net, message):
    from sdexport.models import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "ControlNetXSAdapter"}))
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    vae = tmp_path / "vae"
    shutil.copytree(other, vae)
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "control_canny.safetensors").write_bytes(b"")
    paths = {"missing": tmp_path / "missing", "sdxl_net": _controlnet_dir(tmp_path, "tiny-sdxl"), "other_class": other,
             "a_vae": vae, "a_file": tmp_path / "control_canny.safetensors"}
    assert run_cli("export", base, "--controlnet", net.format(**paths), "-o", tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_controlnet_for_another_unet_is_refused_on_load():
    """The same check on the loaded modules (the Python API skips the export plan)."""
    with pytest.raises(ModelLoadError, match="goes with the preset"):
        load_model("tiny-v", controlnets=["sd15-controlnet"])


def bench_agreeing(tmp_path: Path, name: str, text: str) -> tuple[Path, Path, dict]:
    """Bench the scenario ``text`` (saved as ``name``.toml) into ``tmp_path / "out"``: the scenario
    file, the output folder and the report, once the runtime is seen to agree with diffusers."""
    scenario, out = tmp_path / f"{name}.toml", tmp_path / "out"
    scenario.write_text(text)
    assert run_cli("bench", scenario, "-o", out) == 0
    report = json.loads((out / "results.json").read_text())
    runtime = next(r for r in report["results"] if r["contender"] == "onnxruntime-cpu")
    assert runtime["agreement"]["latents_rel_l2"] < TOLERANCE
    return scenario, out, report


def test_bench_runs_a_controlnet_scenario(tmp_path):
    """The harness exports the ControlNets, gives every contender the same synthetic edge map, compares
    with diffusers' ControlNet pipeline (in guess mode here, as every contender), and reports the
    ControlNet's time apart."""
    scenario, out, report = bench_agreeing(
        tmp_path, "cn", 'model = "tiny"\nheight = 64\nwidth = 64\nsteps = [3]\nbatch = [1]\nwarmup = 0\nrepeats = 1\n'
        'contenders = ["diffusers", "onnxruntime-cpu"]\ncontrolnets = ["tiny-controlnet"]\ncontrol_scale = 0.9\n'
        'guess_mode = true\n')
    runtime = next(r for r in report["results"] if r["contender"] == "onnxruntime-cpu")
    baseline = next(r for r in report["results"] if r["contender"] == "diffusers")
    assert runtime["controlnet_calls"] == baseline["controlnet_calls"] == 3
    assert load_manifest(out / "engines" / "cn").controlnets == ["controlnet"]
    markdown = (out / "results.md").read_text()
    assert "| ControlNet ms/step |" in markdown and "1 ControlNet(s) (tiny-controlnet)" in markdown
    assert "at scale 0.9 in guess mode" in markdown
    # A second run reuses the engines only for the same export key, which the ControlNets are part
    # of (tests/test_bench_compare.py); that a changed key exports again: tests/test_bench.py.


def test_a_stray_second_controlnet_folder_beside_one_controlnet_is_not_read(tmp_path):
    """As diffusers loads it: model_index.json naming one ControlNetModel reads controlnet/ alone
    (the pipeline given as --controlnet was refused as a MultiControlNetModel); one naming a
    MultiControlNetModel, or none (a folder put together by hand), reads them all."""
    from sdexport.models.outline import pipeline_controlnets

    for name in ("controlnet", "controlnet_1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert pipeline_controlnets(tmp_path) == (tmp_path / "controlnet", tmp_path / "controlnet_1")
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"controlnet": ["diffusers", "ControlNetModel"]}))
    assert pipeline_controlnets(tmp_path) == (tmp_path / "controlnet",)
    index.write_text(json.dumps({"controlnet": ["diffusers", "MultiControlNetModel"]}))
    assert len(pipeline_controlnets(tmp_path)) == 2


def test_a_controlnet_pipeline_directory_exports_with_its_controlnets(tmp_path, capsys):
    """A diffusers ControlNet pipeline directory (here: saved by sdexport, loaded back by diffusers
    itself, MultiControlNetModel and all) is exported with its own ControlNets (only they are
    exported here; such a directory's U-Net, with their residuals, in the inpainting test below)."""
    import diffusers

    model = load_model("tiny", controlnets=["tiny-controlnet", "tiny-controlnet"])
    model.save_pretrained(tmp_path / "pipe")
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "pipe")
    assert len(pipe.controlnet.nets) == 2
    out = tmp_path / "engines"
    assert run_cli("export", tmp_path / "pipe", "-o", out, "--verify", "quick",
                   "--components", "controlnet,controlnet_1") == 0
    assert load_manifest(out).controlnets == ["controlnet", "controlnet_1"]
    # --controlnet names others instead
    assert run_cli("export", tmp_path / "pipe", "-o", tmp_path / "one", "--verify", "none",
                   "--controlnet", tmp_path / "pipe" / "controlnet_1", "--components", "controlnet") == 0
    assert load_manifest(tmp_path / "one").controlnets == ["controlnet"]
    # the pipeline directory as --controlnet (one ControlNet): refused with each folder's flag, not cut to
    # the first (the second was dropped without a word), as a MultiAdapter is
    capsys.readouterr()
    assert run_cli("export", "tiny", "-o", tmp_path / "cut", "--verify", "none", "--controlnet", tmp_path / "pipe") == 2
    err = capsys.readouterr().err
    assert ("a MultiControlNetModel (controlnet/, controlnet_1/); pass its folders one each, in order (--controlnet "
            f"{tmp_path / 'pipe' / 'controlnet'} --controlnet {tmp_path / 'pipe' / 'controlnet_1'}), or the pipeline "
            "directory as the model") in " ".join(err.split()) and not (tmp_path / "cut").exists()


def test_a_pipeline_directory_missing_a_network_its_index_names_is_refused(tiny_diffusers_dir, tmp_path, capsys):
    """Its model_index.json naming a ControlNet (or adapter) whose folder, or the folder's config,
    is missing (an incomplete download), it exported as plain text-to-image with exit 0, where
    diffusers refuses it (an audit). Refused in one line; --controlnet stands in, as diffusers'
    from_pretrained(controlnet=...) does. A Multi one missing a numbered folder's config likewise."""
    from sdexport.models.outline import incomplete_part

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_diffusers_dir, pipe)
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionControlNetPipeline",
                                                       "controlnet": ["diffusers", "ControlNetModel"]}))
    assert run_cli("export", pipe, "-o", tmp_path / "out", "--verify", "none") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"error: {pipe / 'model_index.json'} names a ControlNetModel in controlnet/, which is not there (an "
            "incomplete download?); complete it, or give --controlnet DIR") in err and err.count("error:") == 1, err
    assert not (tmp_path / "out").exists()
    scenario = tmp_path / "s.toml"  # (the benchmark's diffusers baseline would refuse it too)
    scenario.write_text(f'model = "{pipe}"\nheight = 64\nwidth = 64\nsteps = [2]\ncontenders = ["diffusers"]\n')
    assert run_cli("bench", scenario, "-o", tmp_path / "bench") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "names a ControlNetModel in controlnet/, which is not there" in err and "set controlnets in the scenario" in err
    load_model("tiny", controlnets=["tiny-controlnet"]).save_pretrained(tmp_path / "whole")
    assert run_cli("export", pipe, "-o", tmp_path / "out", "--verify", "none", "--controlnet",
                   tmp_path / "whole" / "controlnet", "--components", "controlnet") == 0
    for name in ("controlnet", "controlnet_1", "controlnet_2"):
        (pipe / name).mkdir()
        if name != "controlnet_2":
            (pipe / name / "config.json").write_text("{}")
    assert incomplete_part(pipe, (pipe / "controlnet",), ()) is None  # (one ControlNetModel: controlnet/ alone)
    (pipe / "model_index.json").write_text(json.dumps({**index, "controlnet": ["diffusers", "MultiControlNetModel"],
                                                       "adapter": [None, None]}))
    missing, flag = incomplete_part(pipe, (pipe / "controlnet", pipe / "controlnet_1"), ())
    assert "names a MultiControlNetModel in controlnet_2/, which has no config.json" in missing and flag == "--controlnet"
    (pipe / "model_index.json").write_text(json.dumps({**index, "adapter": ["diffusers", "T2IAdapter"]}))
    assert incomplete_part(pipe, (), ())[1] == "--adapter"


@pytest.mark.parametrize(("name", "pipeline", "strength", "scale"), [
    ("inpaint-one", "StableDiffusionControlNetInpaintPipeline", 1.0, 0.5),
    pytest.param("sdxl-inpaint-one", "StableDiffusionXLControlNetInpaintPipeline", 0.9999, 1.0, marks=SLOW),
])
def test_an_inpainting_unet_with_a_controlnet_exports_and_runs(engine_dirs, tmp_path, name, pipeline, strength, scale):
    """The U-Net takes 9 channels and the residuals, the ControlNet 4 (the latents alone); the directory
    is a StableDiffusion(XL)ControlNetInpaintPipeline, which diffusers loads and sdexport exports back;
    ``run`` inpaints with the ControlNet and records both, with diffusers' defaults, in the image."""
    import diffusers

    manifest = load_manifest(engine_dirs[name])
    sizes = manifest.model_dims.sizes(2, 64, 128)
    unet, net = manifest.spec("unet"), manifest.spec("controlnet")
    assert unet.tensor("sample").shape(sizes) == (2, 9, 8, 16) and unet.residual_inputs
    assert net.tensor("sample").shape(sizes) == (2, 4, 8, 16)
    index = json.loads((engine_dirs[name] / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    load_model(MODELS[name][0], controlnets=["tiny-controlnet"]).save_pretrained(tmp_path / "pipe")
    pipe = getattr(diffusers, pipeline).from_pretrained(tmp_path / "pipe")
    assert pipe.unet.config.in_channels == 9 and pipe.controlnet.config.in_channels == 4
    out = tmp_path / "engines"
    assert run_cli("export", tmp_path / "pipe", "-o", out, "--verify", "none", "--height", "64:64:128", "--width",
                   "64:64:128") == 0
    assert load_manifest(out).controlnets == ["controlnet"]
    for name, image in (("i.png", picture(64, 64, 0)), ("m.png", box_mask(64, 64)), ("e.png", picture(64, 64, 1))):
        image.save(tmp_path / name)
    assert run_cli("run", out, "-p", "x", "-o", tmp_path / "o.png", "--init-image", tmp_path / "i.png", "--mask",
                   tmp_path / "m.png", "--control-image", tmp_path / "e.png", "--steps", "2") == 0
    saved = json.loads(Image.open(tmp_path / "o.png").text["sdexport"])
    assert saved["task"] == "inpaint" and saved["strength"] == strength
    assert saved["control"] == [{"scale": scale, "start": 0.0, "end": 1.0}]  # diffusers' defaults for inpainting


@pytest.mark.parametrize("name", ["inpaint-one", pytest.param("sdxl-inpaint-one", marks=SLOW)])
def test_served_inpainting_with_a_controlnet_is_the_image_run_writes(engine_dirs, tmp_path, name):
    """The Triton model's inputs (init image, mask and control image as bytes) reach the same loop,
    with the same defaults (SDXL's strength 0.9999 included)."""
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    files = {"init": picture(64, 128, 1), "mask": box_mask(64, 128), "control": picture(64, 128, 2)}
    for key, image in files.items():
        image.save(tmp_path / f"{key}.png")
    model = ServedModel(ServeSettings(str(engine_dirs[name]), backend="onnxruntime-cpu", max_steps=50))
    try:
        for control in (tmp_path / "control.png", "masked-init"):  # a file, and the masked init image by name
            out = tmp_path / "cli.png"
            assert run_cli("run", engine_dirs[name], "-p", "x", "--steps", "3", "--seed", "5", "--init-image",
                           tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--control-image", control,
                           "--control-scale", "0.6", "--backend", "onnxruntime-cpu", "-o", out) == 0
            [generated] = model.generate([_inputs(
                ["x"], steps=3, seed=[5], control_scale=0.6, init_image=(tmp_path / "init.png").read_bytes(),
                mask=(tmp_path / "mask.png").read_bytes(),
                control_image=control.read_bytes() if isinstance(control, Path) else control.encode())])
            assert not isinstance(generated, str), generated
            np.testing.assert_array_equal(_png_pixels(generated[0].png), np.asarray(Image.open(out).convert("RGB")))
            assert json.loads(Image.open(out).text["sdexport"])["control_image"] == [str(control)]
    finally:
        model.close()


def test_served_requests_with_their_own_control_images_share_a_call(engine_dirs, tmp_path):
    """Two requests with different control images and scales are generated in one call, each the
    image `run` writes given one control image and one scale per image; each saved image records
    its own file and scale. A request that leaves the scale out joins them with the task's default."""
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    files = [tmp_path / f"control{i}.png" for i in range(2)]
    for i, path in enumerate(files):
        picture(64, 128, 40 + i).save(path)
    out = tmp_path / "cli.png"
    assert run_cli("run", engine_dirs["sd-one"], "-p", "x", "-p", "y", "--steps", "3", "--seed", "5",
                   "--control-image", files[0], "--control-image", files[1], "--control-scale", "0.7",
                   "--control-scale", "1", "--backend", "onnxruntime-cpu", "-o", out) == 0
    written = [out.with_name(f"cli-{i}.png") for i in range(2)]
    records = [json.loads(Image.open(p).text["sdexport"]) for p in written]
    assert [record["control_image"] for record in records] == [[str(f)] for f in files]
    assert [record["control"][0]["scale"] for record in records] == [0.7, 1.0]
    logged: list[str] = []
    model = ServedModel(ServeSettings(str(engine_dirs["sd-one"]), backend="onnxruntime-cpu", max_steps=50),
                        log=logged.append)
    try:
        scales = ({"control_scale": 0.7}, {})  # the second: txt2img's default, 1
        served = model.generate([_inputs([prompt], steps=3, seed=[seed], control_image=path.read_bytes(), **scale)
                                 for prompt, seed, path, scale in zip("xy", (5, 6), files, scales)])
        assert "2 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
        for generated, path in zip(served, written):
            assert not isinstance(generated, str), generated
            np.testing.assert_array_equal(_png_pixels(generated[0].png), np.asarray(Image.open(path).convert("RGB")))
        # a pooling ControlNet averages after its scale (per image only to rounding): requests of other
        # settings kept apart, a request's own rows together (run's one call)
        model.pipeline.pooled_controlnets = ("controlnet",)
        model.generate([_inputs([prompt], steps=1, control_image=path.read_bytes(), **scale)
                        for prompt, path, scale in zip("xy", files, scales)])
        assert "2 request(s), 2 image(s) in 2 call(s)" in logged[-1]
        model.generate([_inputs(["x", "y"], steps=1, control_image=files[0].read_bytes(), control_scale=[0.7, 1.0])])
        assert "1 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
    finally:
        model.close()


def test_review_findings_are_refused(tmp_path, capsys):
    """ControlNet subsets of --components, an engine directory or a weightless folder as
    --controlnet: one line each, before the model loads."""
    net = _controlnet_dir(tmp_path, "tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((net / "config.json").read_text())
    two = ["--controlnet", "tiny-controlnet", "--controlnet", "tiny-controlnet"]
    for args, message in [
        ([*two, "--components", "text_encoder,controlnet_1,unet,vae_decoder"], "export every ControlNet or none"),
        ([*two, "--components", "text_encoder,unet,vae_decoder"], "export it with its ControlNets"),
        (["--controlnet", empty], "no weight file (diffusion_pytorch_model.safetensors or"),
    ]:
        assert run_cli("export", "tiny", *args, "-o", tmp_path / "out") == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_engine_directory_named_like_the_preset_does_not_shadow_it(engine_dirs, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(engine_dirs["sd-one"], "tiny-controlnet")
    picture(64, 64, 0).save("e.png")
    assert run_cli("run", "tiny-controlnet", "-p", "x", "-o", "o.png", "--control-image", "e.png", "--steps", "2",
                   "--backend", "torch") == 0
    assert run_cli("export", "tiny", "--controlnet", "tiny-controlnet", "-o", "again", "--verify", "none") == 0
    assert run_cli("export", "tiny", "--controlnet", engine_dirs["sd-one"], "-o", "x") == 2
    assert "an ONNX engine directory, not a ControlNet checkpoint" in capsys.readouterr().err


def test_a_manifest_with_other_residual_sides_is_refused(engine_dirs, tmp_path, capsys):
    import shutil

    directory = tmp_path / "d"
    shutil.copytree(engine_dirs["sd-one"], directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["dims"]["residuals"] = [[c, 4 if s == 2 else s] for c, s in manifest["dims"]["residuals"]]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("inspect", directory) != 0
    assert "the manifest does not describe this graph" in capsys.readouterr().err



def test_a_long_prompt_reaches_the_controlnet_in_every_chunk(engine_dirs):
    """The ControlNet attends to the U-Net's text, two chunks of it: ONNX Runtime's graph and the
    PyTorch module agree there (the quick export verified one chunk only), and the second chunk
    changes the image."""
    long = ", ".join(["a lighthouse on a cliff"] * 6)  # two chunks in the tiny vocabulary
    request = _request("sd-one", prompt=[long, "a harbour"])
    onnx, eager = (load_pipeline(engine_dirs["sd-one"], backend) for backend in ("onnxruntime-cpu", "torch"))
    assert onnx.chunk_count(request) == 2
    ours = onnx(request)
    assert _rel(ours, eager(request)) < TOLERANCE
    first = kept_text(long, onnx.tokenizer, 77, limit=1)  # the first chunk alone
    assert _rel(onnx(_request("sd-one", prompt=[first, "a harbour"])), ours) > 10 * TOLERANCE


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1", "RGBA"])
def test_a_control_image_is_resized_in_its_own_mode_then_made_rgb_as_diffusers_does(mode):
    """diffusers' control image processor resizes first: PIL resizes a palette or 1-bit image by
    the nearest pixel and an RGBA one premultiplied. Converting to RGB first gave other pixels (a
    1-bit map: latents 0.17 rel-L2 off diffusers' ControlNet pipeline, measured once)."""
    from diffusers.image_processor import VaeImageProcessor

    from sdexport.runtime.image_inputs import control_pixels

    image = picture(80, 100, 10, "RGBA" if mode == "RGBA" else "RGB")
    if mode == "RGBA":  # an alpha ramp: pixels of every transparency
        array = np.array(image)
        array[..., 3] = (np.arange(100)[None, :] * 2.55).astype(np.uint8)
        image = Image.fromarray(array, "RGBA")
    image = image.convert(mode)
    theirs = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(
        image, height=64, width=128)
    assert torch.allclose(control_pixels(image, 64, 128), theirs, atol=1e-6)


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_a_per_prompt_list_of_one_serves_every_prompt():
    """A place's list of one value (``control_scale=[[0.5]]``, which the checks take for any
    batch) gives that value to every image, as one number would, not an IndexError for the second."""
    request = GenerationRequest(prompt=["a", "b"], seeds=[0, 1], control_scale=[[0.5]], control_end=[[0.8]],
                                adapter_scale=[[0.25]])
    assert request.control_settings(1, "sd", image=1) == [(0.5, 0.0, 0.8)]
    assert request.adapter_scales(1, image=1) == [0.25]


def test_with_defaults_fills_in_the_directorys_clip_skip_whatever_else_is_given():
    """A request that gives its guidance still takes the directory's clip skip (what ran, and
    what its image records), not None."""
    given = GenerationRequest(prompt=["x"], guidance=7.5).with_defaults("sd", clip_skip=1)
    assert (given.guidance, given.clip_skip) == (7.5, 1)
    own = GenerationRequest(prompt=["x"], guidance=7.5, clip_skip=0).with_defaults("sd", clip_skip=1)
    assert own.clip_skip == 0


# From mutation testing round 5 (image checks): each seen to fail with the change it guards against.

def test_an_empty_control_image_is_refused_in_one_line():
    """An image with a side of 0 is refused where no size is asked of it (control and adapter
    images, which are resized), not left to fail in the resize."""
    from PIL import Image

    from sdexport.runtime.image_inputs import check_image

    for size in ((0, 64), (64, 0)):
        with pytest.raises(SdexportError, match=r"^control image is empty"):
            check_image(Image.new("RGB", size), None, None, "control image")

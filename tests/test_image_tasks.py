"""img2img and inpainting through the one loop: parity with diffusers' pipelines (same seeds, same
latents), the inpainting U-Net's spec, and the refusals a user can cause."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pictures import box_mask, picture
from PIL import Image

from conftest import run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import EngineDirError, SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.runtime.images import read_parameters
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("without_gpu")

TOLERANCE = 1e-4
"""rel-L2 of the final latents against diffusers in fp32 (measured: about 2e-6)."""


@pytest.fixture(scope="module")
def engine_dirs(tiny_engine_dir, tiny_sdxl_engine_dir, tiny_sdxl_inpaint_engine_dir, tmp_path_factory) -> dict[str, Path]:
    dirs = {"tiny": tiny_engine_dir, "tiny-sdxl": tiny_sdxl_engine_dir, "tiny-sdxl-inpaint": tiny_sdxl_inpaint_engine_dir,
            "tiny-inpaint": tmp_path_factory.mktemp("image-tasks") / "tiny-inpaint"}
    export("tiny-inpaint", dirs["tiny-inpaint"], ExportOptions(verify="quick"))
    return dirs


@pytest.fixture(scope="module")
def references() -> dict[str, DiffusersReference]:
    return {preset: DiffusersReference(load_model(preset))
            for preset in ("tiny", "tiny-inpaint", "tiny-sdxl", "tiny-sdxl-inpaint")}


def _agree(ours, theirs) -> None:
    rel = float(torch.linalg.norm(ours.latents - theirs.latents) / torch.linalg.norm(theirs.latents))
    assert rel < TOLERANCE, rel
    assert np.abs(ours.pixels - theirs.pixels).max() < 1e-3


CASES = [
    # preset, mask?, strength, scheduler, images per prompt
    pytest.param("tiny", False, 0.6, "euler_a", 1, id="sd-img2img-one-image-stochastic"),
    pytest.param("tiny", False, None, "default", 2, id="sd-img2img-image-per-prompt-default-strength"),
    pytest.param("tiny-sdxl", False, 0.6, "euler_a", 1, id="sdxl-img2img"),
    pytest.param("tiny-inpaint", True, 1.0, "euler_a", 1, id="inpaint-9-channel-full-strength"),
    pytest.param("tiny-inpaint", True, 0.6, "default", 2, id="inpaint-9-channel-partial"),
    pytest.param("tiny", True, 1.0, "euler_a", 1, id="inpaint-blended-full-strength"),
    pytest.param("tiny", True, 0.6, "default", 2, id="inpaint-blended-partial"),
    # SDXL: strength None is diffusers' 0.9999, the init image noised to the first timestep
    pytest.param("tiny-sdxl-inpaint", True, None, "euler_a", 1, id="sdxl-inpaint-9-channel-default-strength"),
    pytest.param("tiny-sdxl-inpaint", True, 1.0, "default", 2, id="sdxl-inpaint-9-channel-full-strength"),
    pytest.param("tiny-sdxl", True, None, "default", 2, id="sdxl-inpaint-blended-default-strength"),
    pytest.param("tiny-sdxl", True, 0.6, "euler_a", 1, id="sdxl-inpaint-blended-partial"),
]


@pytest.mark.parametrize(("preset", "masked", "strength", "scheduler", "images"), CASES)
def test_matches_diffusers(engine_dirs, references, preset, masked, strength, scheduler, images):
    """StableDiffusion(XL)Img2ImgPipeline and StableDiffusion(XL)InpaintPipeline (9-channel U-Net, and a
    standard U-Net blending the kept region back), same seeds, batch 2, a non-square size."""
    pipeline = load_pipeline(engine_dirs[preset], "onnxruntime-cpu", image_inputs=True)
    request = GenerationRequest(
        prompt=["a lighthouse", "a harbour"], steps=8, seeds=[3, 4], height=64, width=128, scheduler=scheduler,
        image=[picture(64, 128, i) for i in range(images)],
        mask=[box_mask(64, 128)] if masked else None, strength=strength,
    )
    _agree(pipeline(request), references[preset](request))


@pytest.mark.parametrize("preset", ["tiny-inpaint", "tiny-sdxl-inpaint"])
def test_torch_backend_runs_the_same_loop(engine_dirs, references, preset):
    pipeline = load_pipeline(engine_dirs[preset], "torch", image_inputs=True)
    request = GenerationRequest(prompt=["a lighthouse"], steps=6, seeds=[7], height=64, width=64,
                                image=[picture(64, 64, 1)], mask=[box_mask(64, 64)], strength=0.8)
    _agree(pipeline(request), references[preset](request))


def test_the_strength_picks_the_steps(engine_dirs):
    pipeline = load_pipeline(engine_dirs["tiny"], "onnxruntime-cpu", image_inputs=True)
    calls = []
    request = GenerationRequest(prompt=["x"], steps=10, scheduler="euler", height=64, width=64,
                                image=[picture(64, 64, 0)], strength=0.35)
    pipeline(request, on_step=lambda done, total: calls.append(total))
    assert calls[-1] == 3 == request.denoising_steps("sd")  # int(10 x 0.35)


@pytest.mark.parametrize(("preset", "pipeline"), [("tiny-inpaint", "StableDiffusionInpaintPipeline"),
                                                  ("tiny-sdxl-inpaint", "StableDiffusionXLInpaintPipeline")])
def test_inpainting_unet_spec_and_files(engine_dirs, preset, pipeline):
    manifest = load_manifest(engine_dirs[preset])
    assert manifest.dims["U"] == 9 and manifest.model_dims.inpainting
    assert "U" not in load_manifest(engine_dirs["tiny"]).dims  # other directories stay as before
    unet = manifest.spec("unet")
    sizes = manifest.model_dims.sizes(2, 64, 128)
    assert unet.tensor("sample").shape(sizes) == (2, 9, 8, 16)
    assert unet.tensor("out_sample").shape(sizes) == (2, 4, 8, 16)
    index = json.loads((engine_dirs[preset] / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    import onnx

    graph = onnx.load(str(engine_dirs[preset] / manifest.components["unet"].onnx), load_external_data=False)
    channels = graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert channels == 9


def test_tensorrt_profiles_cover_the_inpainting_inputs(engine_dirs):
    from sdexport.build.profiles import input_ranges

    manifest = load_manifest(engine_dirs["tiny-inpaint"])
    ranges = input_ranges(manifest.spec("unet"), manifest.shape_profile, manifest.model_dims)
    low, _, high = ranges["sample"]
    assert low[1] == high[1] == 9 and low[0] == 1 and high[0] == 2 * manifest.shape_profile.batch[2]


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_api_refusals(engine_dirs):
    sd = load_pipeline(engine_dirs["tiny"], "onnxruntime-cpu", image_inputs=True)
    base = {"prompt": ["x"], "steps": 4, "height": 64, "width": 64}
    with pytest.raises(SdexportError, match="64x128 .*the request 64x64"):
        sd(GenerationRequest(**base, image=[picture(64, 128, 0)]))
    with pytest.raises(SdexportError, match="expected a PIL image"):
        sd(GenerationRequest(**base, image=[np.zeros((64, 64, 3))]))
    with pytest.raises(SdexportError, match="a mask without an init image"):
        sd(GenerationRequest(**base, mask=[box_mask(64, 64)]))
    with pytest.raises(SdexportError, match=r"^strength needs an init image \(image\)"):  # the API's field names
        sd(GenerationRequest(**base, strength=0.5))
    with pytest.raises(SdexportError, match="strength 1.5: need a number above 0 and at most 1"):
        sd(GenerationRequest(**base, image=[picture(64, 64, 0)], strength=1.5))
    with pytest.raises(SdexportError, match=r"runs no step \(int\(steps x strength\) = 0\)"):
        sd(GenerationRequest(**base, image=[picture(64, 64, 0)], strength=0.2))
    with pytest.raises(SdexportError, match="3 init images for 2 prompts"):
        sd(GenerationRequest(**{**base, "prompt": ["a", "b"], "seeds": [0, 1]}, image=[picture(64, 64, 0)] * 3))
    text_only = load_pipeline(engine_dirs["tiny"], "onnxruntime-cpu")
    with pytest.raises(SdexportError, match="needs the VAE encoder"):
        text_only(GenerationRequest(**base, image=[picture(64, 64, 0)]))
    inpaint = load_pipeline(engine_dirs["tiny-inpaint"], "onnxruntime-cpu", image_inputs=True)
    with pytest.raises(SdexportError, match="inpainting model"):
        inpaint(GenerationRequest(**base))
    with pytest.raises(SdexportError, match="inpainting model"):
        inpaint(GenerationRequest(**base, image=[picture(64, 64, 0)]))
    # a mode Pillow cannot make greyscale (CIELab) or RGB (premultiplied La): one line, not Pillow's
    # ValueError from inside the loop (an audit); a CIELab init image converts, so it is taken
    from PIL import Image

    with pytest.raises(SdexportError, match="^mask: Pillow's LAB mode, which it cannot convert to L"):
        inpaint(GenerationRequest(**base, image=[picture(64, 64, 0)], mask=[Image.new("LAB", (64, 64))]))
    with pytest.raises(SdexportError, match="^init image: Pillow's La mode, which it cannot convert to RGB"):
        sd(GenerationRequest(**base, image=[Image.new("La", (64, 64))]))
    sd(GenerationRequest(**base, image=[Image.new("LAB", (64, 64))]))
    # an image whose file was closed before its pixels were read (a `with Image.open(...)` block), or
    # a file cut short: a bare AssertionError or OSError mid-call (an audit's finding)
    import io

    with Image.open(io.BytesIO(_png_bytes(picture(64, 64, 0)))) as closed:
        pass
    with pytest.raises(SdexportError, match=r"^init image: its pixels cannot be read \(its file is closed: opened in a "
                                            r"`with Image.open\(...\)` block that has ended\?\); load the image"):
        sd(GenerationRequest(**base, image=[closed]))
    with pytest.raises(SdexportError, match=r"^mask: its pixels cannot be read \(image file is truncated"):
        inpaint(GenerationRequest(**base, image=[picture(64, 64, 0)],
                                  mask=[Image.open(io.BytesIO(_png_bytes(box_mask(64, 64))[:80]))]))
    # the arguments' kinds (diffusers' pipe("a prompt"), a number for the step callback, a path in bytes)
    with pytest.raises(SdexportError, match=r"^expected a GenerationRequest, got str 'a lighthouse'"):
        sd("a lighthouse")
    with pytest.raises(SdexportError, match="^on_step: expected a callable"):
        sd(GenerationRequest(**base), on_step=5)
    for engine_dir in (None, 5, bytes(engine_dirs["tiny"])):
        with pytest.raises(SdexportError, match="^engine_dir: expected a path"):
            load_pipeline(engine_dir, "onnxruntime-cpu")
    with pytest.raises(SdexportError, match="^provider_options: expected a dict"):
        load_pipeline(engine_dirs["tiny"], "onnxruntime-cpu", provider_options="x")
    with pytest.raises(SdexportError, match="^graphs: 'Auto'; choose 'auto'"):
        load_pipeline(engine_dirs["tiny"], "onnxruntime-cpu", graphs="Auto")


def test_a_mask_file_pillow_cannot_make_greyscale_is_refused_before_the_engines_load(engine_dirs, tmp_path, capsys):
    from PIL import Image

    mask = tmp_path / "lab.tif"
    Image.new("LAB", (64, 64)).save(mask)
    init = tmp_path / "init.png"
    picture(64, 64, 0).save(init)
    assert run_cli("run", engine_dirs["tiny-inpaint"], "-p", "x", "--steps", "2", "--init-image", init,
                   "--mask", mask, "-o", tmp_path / "o.png") == 2
    err = capsys.readouterr().err
    assert f"--mask {mask}: Pillow's LAB mode, which it cannot convert to L" in " ".join(err.split())
    assert "Loading engines" not in err


def test_an_inpainting_unet_s_masked_image_falls_back_like_the_init_image(engine_dirs, monkeypatch):
    """An inpainting U-Net at strength 1 encodes only the masked image: an fp16 overflow there is
    rerun on the fp32 encoder and recorded, as for an init image. (tiny-inpaint is an fp32 export
    with no fp32 encoder beside it: the precision and the rerun are stood in for.)"""
    pipeline = load_pipeline(engine_dirs["tiny-inpaint"], "onnxruntime-cpu", image_inputs=True)
    request = GenerationRequest(prompt=["a red fox"], steps=2, height=64, width=64, seeds=[3],
                                image=[picture(64, 64, 1)], mask=[box_mask(64, 64)])
    want = pipeline(request)
    encoder = pipeline.engines["vae_encoder"]
    calls: list[int] = []

    class Overflowing:
        spec, profile, device = encoder.spec, encoder.profile, encoder.device

        def __call__(self, feed):
            calls.append(feed["sample"].shape[0])
            return {"latent_parameters": torch.full((1, 8, 8, 8), float("nan"))}

    monkeypatch.setitem(pipeline.info, "dtype", "fp16")
    monkeypatch.setitem(pipeline.engines, "vae_encoder", Overflowing())
    monkeypatch.setattr(pipeline, "fallback_encoder", encoder)
    got = pipeline(request)
    assert calls == [1] and got.encoder_fallback and got.info["vae_encoder"] == "fp32"
    np.testing.assert_array_equal(got.pixels, want.pixels)  # the masked latents are the fp32 encoder's
    pipeline.close()


def test_a_directory_without_the_vae_encoder_is_named(tmp_path):
    out = tmp_path / "no-encoder"
    export("tiny", out, ExportOptions(components=["text_encoder", "unet", "vae_decoder"], verify="none"))
    with pytest.raises(EngineDirError, match="no vae_encoder .*export it too"):
        load_pipeline(out, "onnxruntime-cpu", image_inputs=True)
    load_pipeline(out, "onnxruntime-cpu")  # txt2img still loads


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    paths = {"image": tmp_path / "in.png", "wide": tmp_path / "wide.png", "mask": tmp_path / "mask.png",
             "broken": tmp_path / "broken.png"}
    picture(64, 128, 0).save(paths["image"])
    picture(96, 200, 1).save(paths["wide"])
    box_mask(64, 128).save(paths["mask"])
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths["huge"] = tmp_path / "huge.png"  # a header declaring 13000x13000, its pixels cut short: never decoded
    paths["huge"].write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
                              + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)))
    return paths


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_cli_img2img_and_inpainting(engine_dirs, files, tmp_path, capsys):
    out = tmp_path / "img2img.png"
    assert run_cli("run", engine_dirs["tiny"], "-p", "a lighthouse", "--init-image", files["image"],
                   "--strength", "0.5", "--steps", "6", "-o", out) == 0
    with Image.open(out) as image:
        assert image.size == (128, 64)  # the init image's size by default
        record = json.loads(image.text["sdexport"])
        assert "Denoising strength: 0.5" in image.text["parameters"]
    assert record["task"] == "img2img" and record["strength"] == 0.5 and record["init_image"] == str(files["image"])
    with pytest.MonkeyPatch.context() as patch:  # paths given relative are recorded absolute: read from anywhere
        patch.chdir(files["image"].parent)
        assert run_cli("run", os.path.relpath(engine_dirs["tiny"]), "-p", "a", "--init-image", files["image"].name,
                       "--steps", "2", "-o", "relative.png") == 0
    relative = read_parameters(tmp_path / "relative.png")
    assert relative["init_image"] == str(files["image"]) and Path(relative["engine_dir"]).is_absolute()
    assert Path(relative["engine_dir"]).resolve() == engine_dirs["tiny"].resolve()  # ('..' kept: links read first)
    out = tmp_path / "inpaint.png"
    assert run_cli("run", engine_dirs["tiny-inpaint"], "-p", "a lighthouse", "--init-image", files["wide"],
                   "--mask", files["wide"], "--height", "64", "--width", "128", "--fit", "crop", "--steps", "4",
                   "-o", out) == 0
    said = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "scaled from 96x200 to 64x133 and cropped to 64x128 (centre)" in said
    with Image.open(out) as image:
        record = json.loads(image.text["sdexport"])
    assert record["task"] == "inpaint" and record["strength"] == 1.0 and record["fit"] == "crop"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-image", "{broken}"], "not a readable image"),
        (["--init-image", "{missing}"], "no such file"),
        (["--init-image", "https://example.com/a.png"], "a URL? sdexport reads local files: download it first"),
        (["--init-image", "/dev/zero"], "--init-image /dev/zero: not a regular file; give an image file"),
        (["--init-image", "{image}", "--height", "64", "--width", "64"],
         "is 64x128 (HxW), the request 64x64: pass --height 64 --width 128"),
        (["--init-image", "{wide}"], "(the size of --init-image; give --height and --width with --fit"),
        # refused from its header, before it is decoded (else "not a readable image": truncated)
        (["--init-image", "{huge}"], ("--init-image {huge} is 13000x13000 (HxW), larger than the engines' profile takes: "
                                      "height at most 256, width at most 256 (the size of --init-image; give --height "
                                      "and --width with --fit")),
        (["--init-image", "{huge}", "--height", "64", "--width", "64", "--fit", "crop"], "not a readable image"),
        (["--control-image", "{broken}"], "need an engine directory exported with --controlnet"),  # before it is read
        (["--adapter-image", "{huge}"], "need an engine directory exported with --adapter"),
        (["--init-image", "{wide}", "--height", "64", "--width", "64"],  # its own size is not suggested
         "is 96x200 (HxW), the request 64x64: pass --fit resize / --fit crop to make it fit (its own size is no multiple"),
        (["--init-image", "{wide}", "--fit", "crop"], "give --height and --width: --fit crop fits the image to them)"),
        (["--init-image", "{image}", "--height", "64"], "give both --height and --width, or neither"),
        (["--mask", "{mask}"], "--mask needs --init-image"),
        (["--init-image", "{image}", "--init-image", "{image}"], "--init-image given 2 times: one per run"),
        (["--init-image", "{image}", "--mask", "{mask}", "--mask", "{mask}"], "--mask given 2 times: one per run"),
        (["--init-image", "{wide}", "--mask", "{image}"], "is 64x128 (HxW), --init-image"),
        (["--fit", "crop"], "--fit needs --init-image"),
        (["--init-image", "{image}", "--fit", "squash"], "--fit 'squash': choose one of exact, resize, crop"),
        (["--strength", "0.5"], "--strength needs an init image"),
        (["--init-image", "{image}", "--strength", "0"], "--strength 0.0: need a number above 0"),
        (["--init-image", "{image}", "--strength", "0.1", "--steps", "5"], "runs no step"),
    ],
)
def test_cli_refuses_bad_image_inputs_in_one_line(engine_dirs, files, tmp_path, capsys, args, message):
    values = {**{k: str(v) for k, v in files.items()}, "missing": str(tmp_path / "nope.png")}
    out = tmp_path / "never.png"
    assert run_cli("run", engine_dirs["tiny"], "-p", "x", *[a.format(**values) for a in args], "-o", out) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**values) in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_crop_alone_is_not_called_a_scaling():
    from sdexport.runtime.image_inputs import fit_image

    image, note = fit_image(picture(128, 256, 0), 128, 128, "crop", "--init-image x.png")
    assert image.size == (128, 128) and note == "--init-image x.png (128x256) cropped to 128x128 (centre)"


def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 30% grey 16-bit mask keeps everything (binarised at 50%), a 16-bit depth map keeps its levels."""
    from sdexport.runtime.image_inputs import read_image

    Image.fromarray(np.full((8, 8), 20000, np.uint16)).save(tmp_path / "mask.png")
    Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "mask.png").mode.startswith("I")  # (what Pillow reads a 16-bit PNG as)
    assert np.asarray(read_image(tmp_path / "mask.png", "--mask", mode="L")).max() == 78  # 20000 / 257
    depth = np.asarray(read_image(tmp_path / "depth.png", "--control-image"))
    assert depth.shape == (8, 8, 3) and (depth[0, 0, 0], depth[-1, -1, 0]) == (0, 255) and len(np.unique(depth)) == 64


def test_the_python_apis_16_bit_and_float_images_are_read_as_files_are(tmp_path):
    """A PIL image given to the Python API is scaled as the same file read by ``run`` (Pillow's
    ``convert`` would clip a 30% grey 16-bit mask to white, repainting everything, and a 0/1 float
    mask to black, repainting nothing)."""
    from sdexport.runtime.image_inputs import binary_mask, control_pixels, pixels, read_image

    grey = np.full((8, 8), 20000, np.uint16)  # 30% grey: kept
    grey[:, :2] = 65535  # white: repainted
    ones = np.zeros((8, 8), np.float32)
    ones[2:6, 2:6] = 1.0
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(ones, "F").save(tmp_path / "ones.tiff")
    for name in ("grey.png", "ones.tiff"):
        given = Image.open(tmp_path / name)
        read = read_image(tmp_path / name, "--mask", mode=None)
        assert given.mode != read.mode
        assert torch.equal(binary_mask([given], 1), binary_mask([read], 1))
        assert torch.equal(pixels([given], 1), pixels([read], 1))
        assert torch.equal(control_pixels(given, 8, 8), control_pixels(read, 8, 8))
    assert binary_mask([Image.open(tmp_path / "grey.png")], 1).mean() == 0.25


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # (Pillow's, on the P map's conversions)
def test_run_and_serve_read_control_and_adapter_images_as_the_python_api_takes_them(tmp_path):
    """A control image is resized in its own mode, then made RGB (README, as diffusers' processor):
    ``run`` and ``serve`` made the file RGB as they read it, so a 1-bit or palette map of another
    size gave another image than the same file opened for the Python API (21/255 at most)."""
    from sdexport.cli import _condition_images
    from sdexport.runtime.image_inputs import control_pixels
    from sdexport.serving.requests import decode_rows

    rng = np.random.default_rng(5)
    for mode in ("1", "P", "RGBA", "LA", "LAB"):  # (LAB: RGB can be made of it, not L, a mask's mode)
        path = tmp_path / f"map-{mode}.{'tiff' if mode == 'LAB' else 'png'}"
        rgba = Image.fromarray(rng.integers(0, 255, (9, 10, 4), dtype=np.uint8), "RGBA")
        (rgba.convert("RGB") if mode == "LAB" else rgba).convert(mode).save(path)
        given = control_pixels(Image.open(path), 8, 8)
        read = _condition_images([str(path)], None, None, "--control-image")[0]
        assert torch.equal(control_pixels(read, 8, 8), given), mode
        row = decode_rows({"prompt": np.array([[b"a"]], dtype=object), "height": np.array([[8]]),
                           "width": np.array([[8]]), "control_image": np.array([[path.read_bytes()]], dtype=object),
                           "adapter_image": np.array([[path.read_bytes()]], dtype=object)}, (8, 8))[0]
        assert row.control_image is not None
        assert torch.equal(control_pixels(row.control_image[0], 8, 8), given), mode
        assert torch.equal(control_pixels(row.adapter_image, 8, 8), given), mode


def test_a_32_bit_integer_image_is_read_at_its_range(tmp_path):
    """Mode I (a TIFF of int32, ``Image.fromarray`` of int32): a 0/255 mask was divided by 257 as if
    16-bit, so it repainted nothing; 0 to 255 is kept, to 65535 scaled, beyond refused. A 16-bit PNG
    Pillow before 11 opens as I (its format says 16 bits) is scaled whatever its values."""
    from sdexport.errors import SdexportError
    from sdexport.runtime.image_inputs import binary_mask, eight_bits, read_image

    mask = np.zeros((8, 8), np.int32)
    mask[:, :2] = 255
    Image.fromarray(mask).save(tmp_path / "mask.tif")
    assert Image.open(tmp_path / "mask.tif").mode == "I"
    assert binary_mask([read_image(tmp_path / "mask.tif", "--mask", mode=None)], 1).mean() == 0.25
    assert binary_mask([Image.fromarray(mask)], 1).mean() == 0.25  # the Python API's image, as the file
    wide = Image.fromarray(mask * 257)
    assert np.asarray(eight_bits(wide, "map")).max() == 255
    with pytest.raises(SdexportError, match=r"^--mask: a 32-bit integer image with values from -1 to 254; "):
        eight_bits(Image.fromarray(mask - 1), "--mask")
    dark = Image.fromarray(np.full((8, 8), 255, np.int32))
    dark.format = "PNG"  # (as Pillow 10 opens a 16-bit PNG)
    assert np.asarray(eight_bits(dark, "map")).max() == 1  # 255 / 257


def test_a_dark_16_bit_ppm_file_is_scaled_as_16_bits(tmp_path):
    """Pillow opens a 16-bit PPM as mode I; ``read_image`` turns it upright first, a copy that no
    longer names its format, so the file's format is passed on: a dark one (levels up to 255) was
    otherwise read as 8 bits, 257 times too bright (mutation testing round 8: that argument, dropped,
    failed no test)."""
    from sdexport.runtime.image_inputs import read_image

    Image.fromarray(np.full((8, 8), 255 * 257 // 2, np.uint16)).save(tmp_path / "grey.ppm")  # (a file as written)
    Image.fromarray(np.full((8, 8), 255, np.uint16)).save(tmp_path / "dark.ppm")
    assert Image.open(tmp_path / "dark.ppm").mode == "I"
    assert np.asarray(read_image(tmp_path / "grey.ppm", "--mask", mode=None)).max() == 127
    assert np.asarray(read_image(tmp_path / "dark.ppm", "--mask", mode=None)).max() == 1  # 255 / 257


def test_a_floating_point_image_is_read_at_its_range_not_clipped(tmp_path):
    """A 0/1 float mask (TIFF, as segmentation tools write) repaints where it is 1; 0 to 255 floats
    keep their levels; another range is refused in one line, not guessed."""
    from sdexport.errors import SdexportError
    from sdexport.runtime.image_inputs import read_image

    mask = np.zeros((8, 8), np.float32)
    mask[2:6, 2:6] = 1.0
    Image.fromarray(mask, "F").save(tmp_path / "mask.tiff")
    assert Image.open(tmp_path / "mask.tiff").mode == "F"
    read = np.asarray(read_image(tmp_path / "mask.tiff", "--mask", mode="L"))
    assert read[3, 3] == 255 and read[0, 0] == 0
    Image.fromarray(np.full((8, 8), 77.0, np.float32), "F").save(tmp_path / "levels.tiff")
    assert np.asarray(read_image(tmp_path / "levels.tiff", "--mask", mode="L")).max() == 77
    Image.fromarray(np.full((8, 8), -3.0, np.float32), "F").save(tmp_path / "depth.tiff")
    with pytest.raises(SdexportError, match=r"--control-image .*depth.tiff: a floating-point image with values from -3 to -3"):
        read_image(tmp_path / "depth.tiff", "--control-image")


def test_fit_image_makes_a_float_or_32_bit_mask_8_bits_before_it_resizes():
    """Lanczos overshoots a 0/1 float mask (-0.11 to 1.22) and a 0/255 int32 one: the request then
    refused the range, though the error had sent the user to ``fit_image``."""
    from sdexport.runtime.image_inputs import binary_mask, check_image, fit_image

    square = np.zeros((64, 64), np.float32)
    square[16:48, 16:48] = 1.0
    for mask in (Image.fromarray(square, "F"), Image.fromarray((square * 255).astype(np.int32), "I")):
        for fit in ("resize", "crop"):
            fitted, _ = fit_image(mask, 128, 128, fit, "mask")
            check_image(fitted, 128, 128, "mask")
            repaint = binary_mask([fitted], 1)
            assert repaint[0, 0, 64, 64] == 1 and repaint[0, 0, 4, 4] == 0, (mask.mode, fit)


def test_run_notes_a_mask_or_control_image_with_transparent_pixels(tmp_path, monkeypatch):
    """Read as diffusers' processors read them: the colour under a transparent pixel at the image's
    own size, black where it is resized (premultiplied), so the area a mask repaints changed with
    --fit (all of it at its size, a third resized): said, not changed."""
    from sdexport.cli import _condition_images, _image_inputs
    from sdexport.console import console

    monkeypatch.setattr(console, "_file", console._file)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 255  # white under transparency
    rgba[16:48, 16:48, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    picture(64, 64, 1).save(tmp_path / "init.png")
    Image.fromarray(np.full((64, 64, 4), 255, np.uint8), "RGBA").save(tmp_path / "opaque.png")
    with console.capture() as captured:
        _image_inputs(tmp_path / "init.png", tmp_path / "mask.png", None, None, "exact")
        _condition_images([str(tmp_path / "mask.png"), str(tmp_path / "opaque.png")], None, None, "--control-image")
    said = " ".join(captured.get().split())
    assert said.count("has transparent pixels: they are read as the colour under them at the image's own size, as "
                      "black where it is resized (as diffusers reads them)") == 2
    assert f"--mask {tmp_path / 'mask.png'} has" in said and f"--control-image {tmp_path / 'mask.png'} has" in said
    assert "opaque.png" not in said


def test_a_damaged_png_is_not_called_another_format(tmp_path):
    from sdexport.runtime.image_inputs import read_image

    picture(64, 64, 1).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:30])
    with pytest.raises(SdexportError, match="or a damaged file of one of them"):
        read_image(tmp_path / "cut.png", "--init-image")


@pytest.mark.parametrize("preset", ["tiny-inpaint", "tiny-sdxl-inpaint"])
def test_cli_refuses_a_maskless_inpainting_model(engine_dirs, files, tmp_path, capsys, preset):
    assert run_cli("run", engine_dirs[preset], "-p", "x", "-o", tmp_path / "b.png") == 2
    assert "give --init-image and --mask" in capsys.readouterr().err
    assert run_cli("run", engine_dirs[preset], "-p", "x", "--init-image", files["image"], "-o", tmp_path / "b.png") == 2
    assert "give --mask with the init image" in capsys.readouterr().err


def test_sdxl_inpainting_from_a_diffusers_directory(engine_dirs, files, tmp_path, capsys):
    """A StableDiffusionXLInpaintPipeline directory (9 channels) exports and inpaints; the base SDXL
    U-Net inpaints too (blending). Without --strength both take diffusers' 0.9999: one step fewer."""
    import diffusers

    load_model("tiny-sdxl-inpaint").save_pretrained(tmp_path / "pipe")
    assert diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "pipe").unet.config.in_channels == 9
    out = tmp_path / "engines"
    assert run_cli("export", tmp_path / "pipe", "-o", out, "--verify", "none", "--height", "64:64:128", "--width",
                   "64:128:128") == 0
    for i, directory in enumerate((out, engine_dirs["tiny-sdxl"])):
        image = tmp_path / f"o{i}.png"
        assert run_cli("run", directory, "-p", "x", "--init-image", files["image"], "--mask", files["mask"],
                       "--steps", "4", "-o", image) == 0
        said = " ".join(capsys.readouterr().err.split())
        assert "3 of 4 steps: the default --strength of SDXL inpainting is diffusers' 0.9999" in said and "3 steps" in said
        record = json.loads(Image.open(image).text["sdexport"])
        assert record["task"] == "inpaint" and record["strength"] == 0.9999
    assert run_cli("run", out, "-p", "x", "--init-image", files["image"], "--mask", files["mask"], "--steps", "1",
                   "-o", tmp_path / "never.png") == 2
    assert "the default strength 0.9999 with --steps 1 runs no step" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny-inpaint", "tiny-sdxl-inpaint"])
def test_an_adopted_inpainting_export_inpaints_as_its_source(engine_dirs, tmp_path, preset):
    """An ONNX export in optimum's layout (ours, less its manifest) of an inpainting U-Net is adopted
    and gives its source's image."""
    import shutil

    foreign = tmp_path / "optimum-export"
    shutil.copytree(engine_dirs[preset], foreign)
    (foreign / "manifest.json").unlink()
    assert run_cli("adopt", foreign) == 0
    assert load_manifest(foreign).model_dims.inpainting
    request = GenerationRequest(prompt=["x"], steps=3, seeds=[5], height=64, width=64, image=[picture(64, 64, 0)],
                                mask=[box_mask(64, 64)])
    pixels = [load_pipeline(d, "onnxruntime-cpu", image_inputs=True)(request).pixels for d in (foreign, engine_dirs[preset])]
    np.testing.assert_array_equal(*pixels)


def test_what_sdexport_does_not_run_is_refused_not_dropped(engine_dirs, tmp_path, capsys):
    """A refiner's ``requires_aesthetics_score`` beside a first text encoder, which the refiner would
    not read (``test_sdxl_refiner`` runs the refiner), as a checkpoint and as an ONNX export to adopt;
    a U-Net of another channel count."""
    import shutil

    load_model("tiny-sdxl-inpaint").save_pretrained(tmp_path / "pipe")
    foreign = tmp_path / "optimum-export"
    shutil.copytree(engine_dirs["tiny-sdxl-inpaint"], foreign)
    (foreign / "manifest.json").unlink()
    for directory in (tmp_path / "pipe", foreign):
        index = json.loads((directory / "model_index.json").read_text())
        (directory / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    assert run_cli("export", tmp_path / "pipe", "-o", tmp_path / "never") == 2
    err = capsys.readouterr().err.strip()
    assert "an SDXL refiner (requires_aesthetics_score) with a first text encoder" in err, err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "never").exists()
    assert run_cli("adopt", foreign) == 2
    assert "an SDXL refiner (requires_aesthetics_score) with a first text encoder" in capsys.readouterr().err
    (foreign / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((foreign / "unet" / "config.json").read_text())
    (foreign / "unet" / "config.json").write_text(json.dumps({**unet, "in_channels": 8}))
    assert run_cli("adopt", foreign) == 2
    assert "the U-Net takes 8 channels and the VAE makes 4: a conditioned U-Net other than inpainting" in " ".join(
        capsys.readouterr().err.split())


def test_a_result_records_its_own_familys_defaults(engine_dirs, tmp_path):
    """The saved strength and ControlNet scale come from the pipeline's family, also for a pipeline
    whose ``info`` does not name it."""
    pipeline = load_pipeline(engine_dirs["tiny-sdxl"], "onnxruntime-cpu", image_inputs=True)
    pipeline.info = {}
    result = pipeline(GenerationRequest(prompt=["x"], steps=3, height=64, width=64, image=[picture(64, 64, 0)],
                                        mask=[box_mask(64, 64)]))
    assert result.family == "sdxl"
    [path] = result.save(tmp_path / "o.png")
    assert json.loads(Image.open(path).text["sdexport"])["strength"] == 0.9999


def test_only_a_default_inpainting_strength_below_1_is_noted():
    from sdexport.runtime.request import default_notes

    request = GenerationRequest(prompt=["x"], image=[picture(64, 64, 0)], mask=[box_mask(64, 64)])
    assert default_notes(request, "sd") == []  # 1.0: every step
    [note] = default_notes(request, "sdxl")
    assert note.startswith("29 of 30 steps: the default strength of SDXL inpainting is diffusers' 0.9999")
    request.strength = 1.0
    assert default_notes(request, "sdxl") == []  # asked for
    img2img = GenerationRequest(prompt=["x"], image=[picture(64, 64, 0)])
    assert default_notes(img2img, "sdxl") == []  # img2img: strength is its whole point, known to the user


def test_any_inpainting_unet_is_taken_and_other_channel_counts_refused_before_export():
    from sdexport.errors import ModelLoadError
    from sdexport.models.outline import unet_extra_channels

    assert unet_extra_channels(9, 4, "x") == 9 and unet_extra_channels(4, 4, "x") == 0
    with pytest.raises(ModelLoadError, match="sdexport runs U-Nets that take the latents"):
        unet_extra_channels(8, 4, "x")


def test_the_vae_encoder_runs_at_the_request_batch(engine_dirs):
    """One image for two prompts: diffusers samples it once, but the encoder engine is called at the
    batch its (TensorRT, static) profile was built for."""
    for preset in ("tiny", "tiny-inpaint"):
        pipeline = load_pipeline(engine_dirs[preset], "onnxruntime-cpu", image_inputs=True)
        seen: list[tuple[int, ...]] = []

        class Recorded:
            def __init__(self, engine, shapes):
                self.engine, self.shapes = engine, shapes

            def __getattr__(self, name):
                return getattr(self.engine, name)

            def __call__(self, feed):
                self.shapes.append(tuple(feed["sample"].shape))
                return self.engine(feed)

        pipeline.engines["vae_encoder"] = Recorded(pipeline.engines["vae_encoder"], seen)
        pipeline(GenerationRequest(prompt=["a", "b"], seeds=[1, 2], steps=4, height=64, width=64, strength=0.5,
                                   image=[picture(64, 64, 0)], mask=[box_mask(64, 64)]))
        assert seen and all(shape[0] == 2 for shape in seen), (preset, seen)


def test_image_files_are_read_as_shown_and_refused_in_one_line(engine_dirs, tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage

    from sdexport.runtime.image_inputs import read_image

    rotated = tmp_path / "rotated.jpg"
    exif = PILImage.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to display
    picture(64, 128, 0).save(rotated, exif=exif)
    assert read_image(rotated, "--init-image").size == (64, 128)  # as a viewer shows it (W x H)
    grey = tmp_path / "grey.png"
    PILImage.new("LA", (128, 64)).save(grey)
    assert read_image(grey, "--init-image").mode == "RGB"
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    big = tmp_path / "big.png"
    picture(64, 128, 0).save(big)
    assert run_cli("run", engine_dirs["tiny"], "-p", "x", "--init-image", big, "-o", tmp_path / "o.png") == 2
    err = capsys.readouterr().err.strip()
    assert "too large to read safely" in err and len(err.splitlines()) == 1


def test_an_eps_file_is_never_handed_to_ghostscript(monkeypatch):
    """Pillow opens EPS through Ghostscript, a program a served request's bytes must not reach; the
    formats read are a list of image formats (``IMAGE_FORMATS``), each opened as before."""
    import io

    from PIL import EpsImagePlugin, Image

    from sdexport.errors import SdexportError
    from sdexport.runtime.image_inputs import IMAGE_FORMATS, decode_image

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"
    with pytest.raises(SdexportError, match=r"^init_image: not a readable image \(not PNG, JPEG, WebP or another"):
        decode_image(eps, "init_image")
    assert ran == []
    for name in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        data = io.BytesIO()
        picture(8, 8, 0).save(data, format=name)
        assert name in IMAGE_FORMATS and decode_image(data.getvalue(), "init_image").size == (8, 8)
    # a Pillow that has no reader of a listed format (AVIF before 11.2) reads the others
    monkeypatch.delitem(Image.OPEN, "AVIF")
    monkeypatch.setattr(Image, "init", lambda: True)
    assert decode_image(data.getvalue(), "init_image").size == (8, 8)


def test_an_icon_is_not_decoded_to_learn_its_size_and_a_broken_png_is_one_line():
    """Pillow's ICO reader decodes a frame while it opens, at the frame's own size (a 16x16 entry
    can hold a 9000x9000 PNG): ICO is not read. A PNG whose chunk is corrupt raised Pillow's
    SyntaxError, a traceback in ``run`` and a 500 in ``serve``."""
    import io
    import struct
    import zlib

    from sdexport.errors import SdexportError
    from sdexport.runtime.image_inputs import IMAGE_FORMATS, decode_image, image_size

    inner = io.BytesIO()
    picture(64, 64, 0).save(inner, format="PNG")
    png = inner.getvalue()
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    assert "ICO" not in IMAGE_FORMATS
    with pytest.raises(SdexportError, match=r"^init_image: not a readable image \(not PNG"):
        image_size(icon, "init_image")
    # a valid first IDAT, then a chunk whose type bytes are garbage, inside the image data
    pixels = zlib.compress(bytes(1 + 3 * 64) * 64)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    broken = (png[:8] + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
              + chunk(b"IDAT", pixels[:20]) + chunk(b"\x01\x02\x03\x04", pixels[20:]) + chunk(b"IEND", b""))
    with pytest.raises(SdexportError, match=r"^mask: not a readable image \(broken PNG file"):
        decode_image(broken, "mask")


def test_the_output_may_not_be_the_init_image(engine_dirs, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert run_cli("run", engine_dirs["tiny"], "-p", "x", "--steps", "2", "--height", "64", "--width", "64",
                   "-o", first) == 0
    before = first.read_bytes()
    assert run_cli("run", engine_dirs["tiny"], "-p", "x", "--init-image", first, "-o", first) == 2
    assert "that is the image this run reads" in capsys.readouterr().err
    assert first.read_bytes() == before


def test_bench_refuses_an_inpainting_model_without_inpaint(engine_dirs, tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text('model = "tiny-inpaint"\nheight = 64\nwidth = 64\nsteps = [2]\n')
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
    assert "an inpainting model (its U-Net takes a mask): set inpaint = true in the scenario" in capsys.readouterr().err
    # and engines of the other kind of U-Net than the baseline's
    scenario.write_text(scenario.read_text() + "inpaint = true\n")
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", engine_dirs["tiny"]) == 2
    assert "holds a standard U-Net, the scenario's model tiny-inpaint does not" in capsys.readouterr().err
    scenario.write_text(scenario.read_text().replace("tiny-inpaint", "tiny"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", engine_dirs["tiny-inpaint"]) == 2
    assert "holds an inpainting U-Net, the scenario's model tiny does not" in capsys.readouterr().err
    without_encoder = tmp_path / "no-encoder"
    export("tiny", without_encoder, ExportOptions(components=["text_encoder", "unet", "vae_decoder"], verify="none"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", without_encoder) == 2
    assert "has no vae_encoder, which the scenario's init image needs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_mask_fitted_to_the_request_is_made_greyscale_after_its_resize_as_diffusers_makes_it(tmp_path):
    """diffusers' mask processor resizes a mask, then makes it greyscale and binarizes it; made
    greyscale first (as run read masks), a coloured, anti-aliased one came out otherwise at the edge."""
    from diffusers.image_processor import VaeImageProcessor

    from sdexport.runtime.image_inputs import binary_mask, fit_image, read_image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)  # every pixel near some threshold
    path = tmp_path / "mask.png"
    Image.fromarray(colours).save(path)
    fitted, _ = fit_image(read_image(path, "--mask", mode=None), 64, 64, "resize", "--mask")
    ours = binary_mask([fitted], 1)
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    theirs = processor.preprocess(Image.open(path), height=64, width=64)
    assert torch.equal(ours, theirs)
    early, _ = fit_image(read_image(path, "--mask", mode="L"), 64, 64, "resize", "--mask")  # (the old order)
    assert not torch.equal(binary_mask([early], 1), theirs)


def test_an_init_image_starting_on_a_repeated_timestep_starts_at_its_own_step(engine_dirs, references):
    """DPM++ 2M Karras at 50 steps lists timestep 1 twice (entries 47 and 48); strength 0.07 starts
    on the first. diffusers tells the scheduler where the window begins (``set_begin_index``): found
    by the timestep's value instead, the start is the second entry, another noise level."""
    pipeline = load_pipeline(engine_dirs["tiny"], "onnxruntime-cpu", image_inputs=True)
    request = GenerationRequest(prompt=["a lighthouse"], steps=50, seeds=[3], height=64, width=64,
                                scheduler="dpmpp_2m_karras", image=[picture(64, 64, 0)], strength=0.07)
    assert request.denoising_steps("sd") == 3
    _agree(pipeline(request), references["tiny"](request))


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_sixteen_bit_levels_are_scaled_by_257():
    """65535 is 255, and each 16-bit level 257 k is 8-bit level k (a depth map keeps its levels;
    a mask pixel just below half stays kept)."""
    from PIL import Image

    from sdexport.runtime.image_inputs import eight_bits

    levels = np.arange(256, dtype=np.uint16) * 257
    image = Image.fromarray(levels.reshape(16, 16))  # (Pillow reads uint16 as I;16)
    assert image.mode.startswith("I")
    assert np.array_equal(np.asarray(eight_bits(image, "depth map")).reshape(-1), np.arange(256))


def test_a_directory_given_as_an_image_is_called_a_directory(tmp_path):
    """``--init-image DIR`` is refused as a directory, not as a file that does not exist."""
    from sdexport.runtime.image_inputs import read_image

    with pytest.raises(SdexportError, match=r"a directory; give an image file$"):
        read_image(tmp_path, "--init-image")


def test_a_crop_keeps_the_centre():
    """``fit crop`` cuts the overflow equally from both sides: a 64x192 image cropped to 64x64
    keeps its middle third."""
    from PIL import Image

    from sdexport.runtime.image_inputs import fit_image

    thirds = np.concatenate([np.full((64, 64, 3), v, np.uint8) for v in (0, 128, 255)], axis=1)
    image, _ = fit_image(Image.fromarray(thirds), 64, 64, "crop", "init image")
    assert np.unique(np.asarray(image)).tolist() == [128]


def test_an_exact_fit_suggests_the_images_own_size_only_where_the_engines_could_take_it():
    """An image whose height is no multiple of the model's is not offered as a size to ask for."""
    from PIL import Image

    from sdexport.runtime.image_inputs import fit_image

    with pytest.raises(SdexportError, match=r"its own size is no multiple of 16"):
        fit_image(Image.new("RGB", (64, 100)), 64, 64, "exact", "init image", multiple=16)
    with pytest.raises(SdexportError, match=r"pass height=96 width=64 "):
        fit_image(Image.new("RGB", (64, 96)), 64, 64, "exact", "init image", multiple=16)


def test_the_python_apis_refusal_of_a_size_an_image_gave_says_whose_it_was(tiny_engine_dir):
    """``run`` and ``serve`` said so; a request without height and width whose init image (64x72)
    the engines cannot take was "height 72 must be a multiple of 16", as if the caller had given it."""
    from sdexport.errors import ProfileError

    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu", image_inputs=True)
    with pytest.raises(ProfileError, match=r"height 72 must be a multiple of 16 \(the size of image; give "
                                           r"images of a size the engines take \(sdexport.runtime.image_inputs"):
        pipeline(GenerationRequest(prompt="a", image=Image.new("RGB", (64, 72)), steps=2))
    with pytest.raises(ProfileError, match=r"multiple of 16$"):  # (given, the size is the caller's own)
        pipeline(GenerationRequest(prompt="a", image=Image.new("RGB", (64, 72)), steps=2, height=72, width=64))
    with pytest.raises(ProfileError, match=r"^width 72 must be a multiple of 16$"):  # (one side given: not the image's)
        pipeline(GenerationRequest(prompt="a", image=Image.new("RGB", (64, 64)), steps=2, width=72))
    # a batch the profile does not take is the caller's own too, not the image's: check_request (run's and
    # bench's check) did not name the image (mutation testing round 8: the batch's part of that, dropped,
    # failed no test; the refusal told to resize an image of a size the engines take)
    from dataclasses import replace

    from sdexport.runtime.request import check_request

    with pytest.raises(ProfileError, match=r"^batch 1 is outside the engines' profile: .*--batch\)$") as refused:
        check_request(GenerationRequest(prompt="a", image=Image.new("RGB", (64, 64)), steps=2), family=pipeline.family,
                      dims=pipeline.dims, profile=replace(pipeline.profile, batch=(2, 2, 2)))
    assert "image" not in str(refused.value)


# From mutation testing round 5 (what a result records): each seen to fail with the change it guards against.

def test_a_text_to_image_result_records_no_encoder_graph(tiny_engine_dir):
    """A pipeline loaded for image inputs has the VAE encoder; an image made from text alone
    does not record its graph (it did not run), one made from an init image does."""
    from PIL import Image

    from sdexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu", image_inputs=True)
    assert "vae_encoder" in pipeline.info["graphs"]
    text = pipeline.run_info(GenerationRequest(prompt=["x"]), False, False)
    image = pipeline.run_info(GenerationRequest(prompt=["x"], image=Image.new("RGB", (64, 64))), False, False)
    assert "vae_encoder" not in text["graphs"] and "vae_encoder" in image["graphs"]


def test_a_crop_scales_only_what_it_keeps(monkeypatch):
    """A 1x16000 strip cropped to 128x128 was scaled whole to 2048000x128 first (0.8 GB, from a
    131-byte PNG; a served request's too): only the kept box is scaled, to the request's size, and
    the pixels are those of scaling the whole then cropping, to rounding."""
    import numpy as np
    from PIL import Image

    from sdexport.runtime.image_inputs import fit_image

    strip = Image.new("RGB", (16000, 1), (200, 10, 10))
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    image, note = fit_image(strip, 128, 128, "crop", "init image")
    assert image.size == (128, 128) and sizes == [(128, 128)]
    assert note == "init image scaled from 1x16000 to 128x2048000 and cropped to 128x128 (centre)"
    assert np.asarray(image)[0, 0].tolist() == [200, 10, 10]
    wide = picture(96, 200, 0)
    whole = resize(wide, (133, 64), Image.Resampling.LANCZOS).crop((2, 0, 130, 64))
    cropped, _ = fit_image(wide, 64, 128, "crop", "init image")
    assert np.abs(np.asarray(cropped, dtype=int) - np.asarray(whole, dtype=int)).max() <= 1

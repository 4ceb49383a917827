"""Several T2I-Adapters at once (diffusers' MultiAdapter): each its own component and image, one
greyscale beside an RGB one, their features added up before the U-Net. Parity with diffusers'
adapter pipelines given a MultiAdapter (SD and SDXL, ONNX Runtime and Torch), the pipeline
directories diffusers saves, the specs, manifest and TensorRT profiles, run, serve, and the
refusals a user can cause."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pictures import picture
from PIL import Image
from test_controlnet import TOLERANCE, _agree, _rel, bench_agreeing, no_engines, watch  # noqa: F401  (no_engines: a fixture)

from conftest import run_cli
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.adapter import preset_config
from sdexport.models.presets import PRESETS
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("without_gpu")

MODELS = {"sd": "tiny", "sdxl": "tiny-sdxl"}


def sketch_adapter(directory: Path, base: str = "tiny", **changes) -> Path:
    """A greyscale T2I-Adapter directory for ``base`` (TencentARC's sketch and canny ones read one channel)."""
    from diffusers import T2IAdapter

    config = {k: v for k, v in preset_config(PRESETS[base].unet, 8).items() if not k.startswith("_")}
    torch.manual_seed(7)
    T2IAdapter(**{**config, "in_channels": 1, **changes}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, list[str]]:
    """SD: an RGB preset and a greyscale directory; SDXL: the preset twice (each its own weights)."""
    sketch = sketch_adapter(tmp_path_factory.mktemp("sketch") / "sketch-adapter")
    return {"sd": ["tiny-adapter", str(sketch)], "sdxl": ["tiny-adapter", "tiny-adapter"]}


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory, adapters) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi-adapter")
    dirs = {}
    for name, preset in MODELS.items():
        dirs[name] = root / name
        export(preset, dirs[name], ExportOptions(verify="quick", adapters=adapters[name]))
    return dirs


@pytest.fixture(scope="module")
def references(adapters) -> dict[str, DiffusersReference]:
    return {name: DiffusersReference(load_model(preset, adapters=adapters[name])) for name, preset in MODELS.items()}


def _request(name: str, **changes) -> GenerationRequest:
    request = GenerationRequest(
        prompt=["a lighthouse", "a harbour"], negative_prompt=["fog", "rain"], steps=6, seeds=[3, 4], height=64,
        width=128, scheduler="euler_a",
        # each prompt its two images (80x100: resized to 64x128 by both), the second adapter's greyscale
        adapter_image=[(picture(80, 100, 10), picture(80, 100, 12, "L")),
                       (picture(80, 100, 11), picture(80, 100, 13, "L"))],
        adapter_scale=[0.8, 0.5], adapter_factor=0.5 if name == "sdxl" else 1.0,  # diffusers' SD pipeline has no factor
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_diffusers_multi_adapter_pipeline(engine_dirs, references, name, backend):
    """StableDiffusion(XL)AdapterPipeline with a MultiAdapter, same seeds, batch 2 with CFG, each
    prompt its own images, a scale per adapter, SDXL's conditioning factor."""
    pipeline = load_pipeline(engine_dirs[name], backend)
    calls = watch(pipeline)
    request = _request(name)
    ours = pipeline(request)
    _agree(ours, references[name](request))
    assert [engine for engine, _ in calls if engine.startswith("adapter")] == ["adapter", "adapter_1"]
    assert ours.timings.adapter > 0
    # each adapter acts: without the second (scale 0), or with another image for it, the latents differ
    alone = pipeline(_request(name, adapter_scale=[0.8, 0.0]))
    assert _rel(alone, ours) > 10 * TOLERANCE
    entries = [(first, picture(80, 100, 30, "L")) for first, _ in request.adapter_image]
    assert _rel(pipeline(_request(name, adapter_image=entries)), ours) > 10 * TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_one_image_per_adapter_serves_every_prompt(engine_dirs, references, name):
    """One image per adapter for both prompts, one scale for both adapters; a batch split over calls
    gives the same images; without CFG too."""
    pipeline = load_pipeline(engine_dirs[name], "onnxruntime-cpu")
    shared = [(picture(64, 128, 5), picture(64, 128, 6, "L"))]
    one = _request(name, adapter_image=shared, adapter_scale=0.7)
    ours = pipeline(one)
    _agree(ours, references[name](one))
    halves = [pipeline(part) for part in one.split(1)]
    assert torch.allclose(torch.cat([h.latents for h in halves]), ours.latents, atol=1e-5)
    plain = _request(name, adapter_image=shared, guidance=1.0, negative_prompt=None)
    _agree(pipeline(plain), references[name](plain))


def test_adapter_scales_per_prompt_weigh_each_image(engine_dirs, references):
    """A list of scales, one per prompt, in an adapter's place beside a shared one: each image comes
    out bit for bit as in a call where its scales serve every prompt (ONNX Runtime and Torch), so
    served requests with other scales share a call. A split cuts the list; the diffusers reference,
    which has no per-image scales, refuses it."""
    request = _request("sd", adapter_scale=[[0.8, 0.3], 0.5])
    for backend in ("onnxruntime-cpu", "torch"):
        pipeline = load_pipeline(engine_dirs["sd"], backend)
        ours = pipeline(request)
        for row, first in enumerate((0.8, 0.3)):
            alone = pipeline(_request("sd", adapter_scale=[first, 0.5]))
            assert torch.equal(ours.latents[row], alone.latents[row]), (backend, row)
    assert [part.adapter_scale for part in request.split(1)] == [[[0.8], 0.5], [[0.3], 0.5]]
    assert [request.adapter_scale_of(i, 2) for i in range(2)] == [[0.8, 0.5], [0.3, 0.5]]  # what each image records
    assert _request("sd", adapter_scale=[[0.5, 0.3], 0.5]).adapter_scale_of(0, 2) == 0.5  # one number where equal
    with pytest.raises(SdexportError, match="no per-image settings"):
        references["sd"](request)
    with pytest.raises(SdexportError, match=r"adapter_scale: 3 values for 2 prompts \(adapter 1 of 2\)"):
        pipeline(_request("sd", adapter_scale=[[0.8, 0.3, 0.1], 0.5]))
    with pytest.raises(SdexportError, match=r"adapter_scale nan \(adapter 2 of 2, image 2 of 2\): expected a finite"):
        pipeline(_request("sd", adapter_scale=[0.8, [0.3, float("nan")]]))


def test_specs_and_manifest_give_each_adapter_its_channels(engine_dirs):
    manifest = load_manifest(engine_dirs["sd"])
    assert manifest.adapters == ["adapter", "adapter_1"] and manifest.dims["A"] == 3
    assert manifest.dims["adapter_channels"] == [3, 1]
    assert [r["kind"] for r in manifest.model["source"]["adapters"]] == ["preset", "diffusers"]
    assert manifest.spec("adapter").tensor("image").dims == ("B", "3", "H", "W")
    assert manifest.spec("adapter_1").tensor("image").dims == ("B", "1", "H", "W")
    assert manifest.spec("adapter_1").adapter_outputs == manifest.spec("adapter").adapter_outputs
    for component, channels in (("adapter", 3), ("adapter_1", 1)):
        graph = onnx.load(str(engine_dirs["sd"] / component / "model.onnx"), load_external_data=False).graph
        [image] = graph.input
        assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["B", channels, "H", "W"]
    index = json.loads((engine_dirs["sd"] / "model_index.json").read_text())
    assert index["adapter"] == ["diffusers", "MultiAdapter"] and "adapter_1" not in index
    assert load_manifest(engine_dirs["sdxl"]).dims["adapter_channels"] == [3, 3]
    # with one adapter, none are recorded: such directories read as before
    assert "adapter_channels" not in replace(manifest.model_dims, adapter_channels=()).record()


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.1"], ids=["trt10", "trt11"])
def test_tensorrt_profiles_give_each_adapter_its_image(engine_dirs, tmp_path, monkeypatch, version):
    from test_tensorrt_fakes import build_profiles

    first, second = build_profiles(monkeypatch, tmp_path, version, engine_dirs["sd"], ["adapter", "adapter_1"])
    assert tuple(first["profiles"][0]["image"].max) == (2, 3, 256, 256)
    assert tuple(second["profiles"][0]["image"].max) == (2, 1, 256, 256)


def test_a_multi_adapter_pipeline_directory_exports_with_its_adapters(tmp_path, capsys):
    """diffusers reads a MultiAdapter from adapter/, adapter_1/, adapter_2/, ...; given as the model,
    such a directory brings every adapter, in order. Given as --adapter (one adapter), it is refused
    with the flags that name its folders. diffusers 0.42 saves a third adapter in adapter_1_2/,
    which it does not read back: refused, not dropped."""
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline

    pipeline = tmp_path / "pipeline"
    names = ["adapter", "adapter_1", "adapter_2"]
    load_model("tiny", adapters=["tiny-adapter"] * 3, seed=2).save_pretrained(pipeline)
    assert json.loads((pipeline / "model_index.json").read_text())["adapter"] == ["diffusers", "MultiAdapter"]
    assert all((pipeline / n / "config.json").is_file() for n in names)
    loaded = StableDiffusionAdapterPipeline.from_pretrained(pipeline, safety_checker=None)
    assert isinstance(loaded.adapter, MultiAdapter) and len(loaded.adapter.adapters) == 3
    export(str(pipeline), tmp_path / "engines", ExportOptions(verify="none"))
    manifest = load_manifest(tmp_path / "engines")
    assert manifest.adapters == names
    assert [r["path"] for r in manifest.model["source"]["adapters"]] == [str((pipeline / n).resolve()) for n in names]
    capsys.readouterr()
    assert run_cli("export", "tiny", "-o", tmp_path / "out", "--adapter", pipeline) == 2
    err = capsys.readouterr().err
    assert "a MultiAdapter (adapter/, adapter_1/, adapter_2/); pass its folders one each, in order" in err
    assert f"--adapter {pipeline / 'adapter_1'}" in err and len(err.strip().splitlines()) == 1
    # as diffusers saves three
    loaded.adapter.save_pretrained(str(tmp_path / "saved" / "adapter"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["adapter", "adapter_1", "adapter_1_2"]
    shutil.rmtree(pipeline / "adapter_2")
    shutil.copytree(tmp_path / "saved" / "adapter_1_2", pipeline / "adapter_1_2")
    assert run_cli("export", pipeline, "-o", tmp_path / "out") == 2
    assert "adapter_1_2/ holds a MultiAdapter's third T2I-Adapter where diffusers saves it" in capsys.readouterr().err


def test_a_stray_adapter_folder_beside_one_t2i_adapter_is_not_read(tmp_path):
    """A pipeline whose model_index.json names one T2IAdapter reads adapter/ alone, as diffusers
    does, whatever other adapter_i/ folders lie beside it."""
    from sdexport.export.plan import plan_export

    pipeline = tmp_path / "pipeline"
    load_model("tiny", adapters=["tiny-adapter"]).save_pretrained(pipeline)
    shutil.copytree(pipeline / "adapter", pipeline / "adapter_1")
    plan = plan_export(str(pipeline), tmp_path / "out", ExportOptions())
    assert [a.path for a in plan.adapters] == [pipeline / "adapter"]


def test_run_takes_an_image_and_a_scale_per_adapter(engine_dirs, tmp_path, capsys):
    for seed in (1, 2, 3, 4):
        picture(64, 64, seed).save(tmp_path / f"a{seed}.png")
    images = [a for s in (1, 2) for a in ("--adapter-image", tmp_path / f"a{s}.png")]
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", *images, "--adapter-scale", "0.7", "--adapter-scale",
                   "0.4", "--steps", "2", "-o", tmp_path / "o.png") == 0
    params = json.loads(Image.open(tmp_path / "o.png").info["sdexport"])
    assert params["adapter"] == {"scale": [0.7, 0.4], "factor": 1.0}
    assert params["adapter_image"] == [str(tmp_path / "a1.png"), str(tmp_path / "a2.png")]
    # two prompts, two images each (prompt by prompt): each prompt its own
    images = [a for s in (1, 2, 3, 4) for a in ("--adapter-image", tmp_path / f"a{s}.png")]
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", "-p", "a dog", *images, "--steps", "2", "-o",
                   tmp_path / "p.png") == 0
    # and scales per image the same way, each image recording its own
    scales = [a for v in ("0.7", "0.4", "0.2", "0.4") for a in ("--adapter-scale", v)]
    assert run_cli("run", engine_dirs["sd"], "-p", "a cat", "-p", "a dog", *images, *scales, "--steps", "2", "-o",
                   tmp_path / "q.png") == 0
    recorded = [json.loads(Image.open(tmp_path / f"q-{i}.png").info["sdexport"])["adapter"]["scale"] for i in (0, 1)]
    assert recorded == [[0.7, 0.4], [0.2, 0.4]]
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    ([], "this engine directory has 2 T2I-Adapters: give 2 adapter images (--adapter-image), one each"),
    (["--adapter-image", "{img}"], "1 --adapter-image for 2 T2I-Adapters and 1 prompt(s): give 2 (one per adapter"),
    (["--adapter-image", "{img}"] * 3 + ["-p", "y"], ("3 --adapter-image for 2 T2I-Adapters and 2 prompt(s): give 2 "
     "(one per adapter, in the order they were exported, for every prompt) or 4 (2 per prompt)")),
    (["--adapter-image", "{img}"] * 2 + ["--adapter-scale", "1", "--adapter-scale", "1", "--adapter-scale", "1"],
     "--adapter-scale: 3 values for 2 T2I-Adapters: give one, or one each"),
    (["--adapter-image", "{img}"] * 2 + ["--adapter-scale", "1", "--adapter-scale", "nan"],
     "--adapter-scale nan (adapter 2 of 2): expected a finite number"),
    (["--adapter-image", "{img}"] * 2 + ["-p", "y"] + ["--adapter-scale", "1"] * 3,
     ("3 --adapter-scale for 2 images: give 1 (for every image), 2 (one per adapter, in the order they were "
      "exported, for every image) or 4 (2 per image, image by image)")),
])
@pytest.mark.usefixtures("no_engines")
def test_bad_multi_adapter_requests_are_refused_before_engines_load(engine_dirs, tmp_path, capsys, args, message):
    picture(64, 64, 0).save(tmp_path / "sketch.png")
    args = [a.format(img=tmp_path / "sketch.png") for a in args]
    assert run_cli("run", engine_dirs["sd"], "-p", "x", "-o", tmp_path / "o.png", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_python_api_refuses_wrong_counts_before_any_engine_runs(engine_dirs):
    pipeline = load_pipeline(engine_dirs["sd"], "onnxruntime-cpu")
    calls = watch(pipeline)
    with pytest.raises(SdexportError, match="1 adapter image\\(s\\) for 2 T2I-Adapters"):
        pipeline(_request("sd", adapter_image=[picture(64, 64, 0)]))
    with pytest.raises(SdexportError, match="adapter images for 3 prompts, not 2"):
        pipeline(_request("sd", adapter_image=[(picture(64, 64, 0), picture(64, 64, 1))] * 3))
    with pytest.raises(SdexportError, match="adapter image: expected a PIL image"):
        pipeline(_request("sd", adapter_image=[(picture(64, 64, 0), np.zeros((8, 8)))]))
    assert not calls


def test_export_refuses_adapters_that_do_not_go_together(tmp_path, capsys):
    """Features that differ in number cannot add up (both fit the U-Net: SDXL's mid-block feature is
    optional); more adapters than sdexport runs at once; a U-Net without all its adapters."""
    short = sketch_adapter(tmp_path / "short", "tiny-sdxl", in_channels=3, channels=[32])  # one feature of two
    for args, message in (
        (["tiny-sdxl", "--adapter", "tiny-adapter", "--adapter", str(short)],
         ("its features [(32, 2)] differ from --adapter tiny-adapter's [(32, 2), (64, 2)]; diffusers' MultiAdapter adds "
         "them feature by feature")),
        (["tiny", *["--adapter", "tiny-adapter"] * 5], "5 --adapter: sdexport runs at most 4 T2I-Adapters at once"),
        (["tiny", "--adapter", "tiny-adapter", "--adapter", "tiny-adapter", "--components", "unet,adapter"],
         "export them together (unet,adapter,adapter_1) or none of them"),
    ):
        assert run_cli("export", *args, "-o", tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_manifest_with_wrong_adapter_channels_is_refused(engine_dirs, tmp_path, capsys):
    for channels, message in (([1, 1], "the first dims.A (3)"), ([3], "is too short")):
        directory = tmp_path / f"d{len(channels)}{channels[0]}"
        shutil.copytree(engine_dirs["sd"], directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["dims"]["adapter_channels"] = channels
        (directory / "manifest.json").write_text(json.dumps(manifest))
        assert run_cli("inspect", directory) != 0
        assert message in capsys.readouterr().err


def test_a_manifest_naming_more_adapters_than_it_has_is_refused(engine_dirs, tmp_path, capsys):
    directory = tmp_path / "d"
    shutil.copytree(engine_dirs["sd"], directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["dims"]["adapter_channels"] = [3, 1, 3]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("inspect", directory) != 0
    assert ("its U-Net takes the features of 3 T2I-Adapter(s) (dims.adapter_channels), but components has no "
            "adapter_2") in capsys.readouterr().err


def test_the_torch_backend_refuses_adapters_its_sources_no_longer_give(engine_dirs, tmp_path):
    """The Torch backend reloads the adapters from model.source: a manifest naming fewer, or other
    channels than its dims, is refused in one line before any convolution fails."""
    from sdexport.errors import EngineDirError

    for edit in ("cut", "channels"):
        directory = tmp_path / edit
        shutil.copytree(engine_dirs["sd"], directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        if edit == "cut":
            manifest["model"]["source"]["adapters"] = manifest["model"]["source"]["adapters"][:1]
        else:
            manifest["dims"]["adapter_channels"] = [3, 3]
        (directory / "manifest.json").write_text(json.dumps(manifest))
        # a directory adapter cut from model.source leaves its files recorded (models.source_files)
        message = ("model.source no longer names the part it belongs to: the manifest was edited" if edit == "cut"
                   else "the Torch backend reloaded T2I-Adapter\\(s\\) reading")
        with pytest.raises(EngineDirError, match=message):
            load_pipeline(directory, "torch")


def test_served_rows_give_an_image_per_adapter(engine_dirs, tmp_path):
    """serve takes one image per adapter in a row's adapter_image: a row gives run's image pixel
    for pixel, rows with different images share one call, and a row with too few is refused."""
    from test_serving import _inputs, _png_pixels

    from sdexport.serving.triton_model import ServedModel, ServeSettings

    for seed in (2, 3, 4):
        picture(64, 128, seed).save(tmp_path / f"a{seed}.png")
    out = tmp_path / "cli.png"
    assert run_cli("run", engine_dirs["sdxl"], "-p", "x", "--steps", "3", "--seed", "5", "--adapter-image",
                   tmp_path / "a2.png", "--adapter-image", tmp_path / "a3.png", "--adapter-scale", "0.7",
                   "--adapter-scale", "0.3", "--adapter-factor", "0.5", "--backend", "onnxruntime-cpu", "-o", out) == 0
    logged: list[str] = []
    model = ServedModel(ServeSettings(str(engine_dirs["sdxl"]), backend="onnxruntime-cpu", max_steps=50),
                        log=logged.append)
    files = {s: (tmp_path / f"a{s}.png").read_bytes() for s in (2, 3, 4)}
    try:
        one = _inputs(["x"], steps=3, seed=[5], adapter_factor=0.5)
        one["adapter_image"] = np.array([[files[2], files[3]]], dtype=object)
        one["adapter_scale"] = np.array([[0.7, 0.3]], dtype=np.float32)
        [row] = model.generate([one])
        assert not isinstance(row, str), row
        np.testing.assert_array_equal(_png_pixels(row[0].png), np.asarray(Image.open(out).convert("RGB")))
        two = _inputs(["x", "x"], steps=3, seed=[5, 5])
        two["adapter_image"] = np.array([[files[2], files[3]], [files[4], files[3]]], dtype=object)
        [pair] = model.generate([two])
        assert not isinstance(pair, str), pair
        assert "1 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
        # requests with other adapter scales share a call too, and a request's image (pixels and the
        # metadata its PNG records) is the one it gets beside a request with its own scales
        def scaled(second: float) -> dict[str, np.ndarray]:
            request = _inputs(["x"], steps=3, seed=[5], adapter_factor=0.5)
            request["adapter_image"] = np.array([[files[2], files[3]]], dtype=object)
            request["adapter_scale"] = np.array([[0.7, second]], dtype=np.float32)
            return request

        together = model.generate([scaled(0.3), scaled(0.6)])
        assert "2 request(s), 2 image(s) in 1 call(s) of 2" in logged[-1]
        same = model.generate([scaled(0.6), scaled(0.6)])
        assert not isinstance(together[1], str) and not isinstance(same[1], str)
        assert together[1][0].png == same[1][0].png
        assert json.loads(Image.open(io.BytesIO(together[1][0].png)).text["sdexport"])["adapter"]["scale"] == [0.7, 0.6]
        assert not np.array_equal(pair[0].pixels, pair[1].pixels)
        [refused] = model.generate([_inputs(["x"], steps=3, adapter_image=files[2])])
        assert refused == ("1 adapter image(s) for 2 T2I-Adapters: give 2 adapter images (adapter_image), one each, "
                           "in the order they were exported")
    finally:
        model.close()


MULTI_ADAPTER_SCENARIO = ('model = "tiny"\nheight = 64\nwidth = 64\nsteps = [3]\nbatch = [2]\nwarmup = 0\nrepeats = 1\n'
                          'contenders = ["diffusers", "onnxruntime-cpu"]\nadapter = ["tiny-adapter", "tiny-adapter"]\n'
                          'adapter_scale = 0.6\n')


@pytest.mark.slow  # a bench with one adapter (test_adapter) and the MultiAdapter's parity, each by default
def test_bench_runs_a_multi_adapter_scenario(tmp_path):
    """adapter as a list: the harness exports every adapter, gives each its own synthetic edge map,
    compares with diffusers' adapter pipeline given a MultiAdapter."""
    _, out, report = bench_agreeing(tmp_path, "mad", MULTI_ADAPTER_SCENARIO)
    assert all("adapter_s" in r for r in report["results"])
    assert load_manifest(out / "engines" / "mad").adapters == ["adapter", "adapter_1"]
    markdown = (out / "results.md").read_text()
    assert "T2I-Adapter tiny-adapter + tiny-adapter on a synthetic edge map at scale 0.6" in markdown


def test_a_multi_adapter_scenario_refuses_other_engines_and_a_pipeline_whose_adapters_it_leaves_out(
        engine_dirs, tmp_path, capsys):
    """Refused as the bench plans, before anything is exported."""
    scenario = tmp_path / "mad.toml"
    scenario.write_text(MULTI_ADAPTER_SCENARIO)
    # a directory with another number of adapters is not the scenario's model
    single = tmp_path / "single.toml"
    single.write_text(scenario.read_text().replace('["tiny-adapter", "tiny-adapter"]', '"tiny-adapter"'))
    assert run_cli("bench", single, "--engine-dir", engine_dirs["sd"], "-o", tmp_path / "b") == 2
    assert "has 2 T2I-Adapters, the scenario tiny-adapter: the baseline and the engines must be" in capsys.readouterr().err
    # a MultiAdapter pipeline directory as the model: its adapters are named in the scenario
    load_model("tiny", adapters=["tiny-adapter"] * 2).save_pretrained(tmp_path / "pipeline")
    plain = tmp_path / "plain.toml"
    plain.write_text(scenario.read_text().replace('"tiny"', repr(str(tmp_path / "pipeline")))
                     .replace('adapter = ["tiny-adapter", "tiny-adapter"]\nadapter_scale = 0.6\n', ""))
    assert run_cli("bench", plain, "-o", tmp_path / "b") == 2
    assert f'(adapter = ["{tmp_path / "pipeline" / "adapter"}", "{tmp_path / "pipeline" / "adapter_1"}"])' in \
        capsys.readouterr().err
    assert not (tmp_path / "b").exists()

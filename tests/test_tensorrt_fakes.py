"""The TensorRT build and runtime code against fakes of TensorRT 10.x and 11.x (tests/fake_tensorrt.py).

No GPU and no TensorRT here: these pin down what sdexport asks of TensorRT (which flags, which
typing mode, which addresses, in which order) for both majors. Whether TensorRT then does the
right thing is for the GPU tests (tests/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import inspect
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import fake_tensorrt
import numpy as np
import pytest
import torch

from sdexport.build import tensorrt_build
from sdexport.build.tensorrt_build import Precision, resolve_precision
from sdexport.errors import (
    EngineDirError,
    EngineRunError,
    MissingDependencyError,
    ProfileError,
    SdexportError,
)
from sdexport.shapes import ShapeProfile
from sdexport.specs import UNET

VERSIONS = ["10.13.3.9", "11.4.0.1"]


@pytest.fixture(params=VERSIONS, ids=["trt10", "trt11"])
def trt(request, monkeypatch):
    module = fake_tensorrt.make_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


# -- version floor and typing mode ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["8.6.1", "10.0.1.6"])
def test_tensorrt_before_10_1_is_refused(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_tensorrt(version))
    too_old = rf"the TensorRT installed \({version}\) is too old: .* needs TensorRT 10.1 or newer"
    with pytest.raises(MissingDependencyError, match=too_old):
        tensorrt_build.require_tensorrt()


@pytest.mark.parametrize(("tensorrt", "polygraphy", "refused"), [
    ("11.4.0.9", "0.49.27", True),  # the polygraphy TensorRT 11.0's own repository carries
    ("11.4.0.9", "0.50.3", False),
    ("10.13.3.9", "0.49.0", True),  # no CreateConfig(progress_monitor=): a TypeError in the build (an audit)
    ("10.13.3.9", "0.50.3", False),
])
def test_a_polygraphy_too_old_is_refused(monkeypatch, tensorrt, polygraphy, refused):
    """Not an AttributeError (``precision_is_set``, TensorRT 11) or a TypeError (``progress_monitor``)
    from polygraphy's CreateConfig in the build."""
    import polygraphy as installed

    monkeypatch.setattr(installed, "__version__", polygraphy)
    if refused:
        with pytest.raises(MissingDependencyError, match=rf"the polygraphy installed \({polygraphy}\) is too old"):
            tensorrt_build.require_polygraphy(tensorrt)
    else:
        tensorrt_build.require_polygraphy(tensorrt)


def test_tensorrt_10_1_itself_is_accepted(monkeypatch):
    """10.1 is the floor (``device_memory_size_v2`` and ``set_device_memory`` arrived in it), not below it."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_tensorrt("10.1.0.27"))
    assert tensorrt_build.require_tensorrt().__version__ == "10.1.0.27"


def test_refittable_builds_are_refused_on_the_tensorrt_whose_refit_drops_biases(monkeypatch, tiny_fp16_engine_dir):
    """TensorRT 11.3.0's refit page: BuilderFlag.REFIT "may produce incorrect numerical output ... A
    GEMM bias can be dropped and treated as zero", even with no refit done."""
    from sdexport.runtime.tensorrt_backend import refit

    trt = fake_tensorrt.make_tensorrt("11.3.0.4")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(SdexportError, match=r"^--refittable: TensorRT 11.3.0.4's refittable engines may drop"):
        tensorrt_build.build_engines(tiny_fp16_engine_dir, refittable=True)
    with pytest.raises(SdexportError, match=r"^unet/plan: run-time LoRA: TensorRT 11.3.0.4's refittable engines"):
        refit(_refittable(trt, {"w": (2, 2)}), {"w": np.zeros((2, 2), np.float16)}, Path("unet/plan"))
    tensorrt_build.check_refittable("11.4.0.1")
    tensorrt_build.check_refittable("10.13.3.9")


def test_both_majors_are_accepted(trt):
    assert tensorrt_build.require_tensorrt() is trt
    assert tensorrt_build.has_weak_typing(trt) == trt.__version__.startswith("10.")


@pytest.mark.parametrize(
    ("onnx_dtype", "fp16", "strongly_typed", "always_fp32", "weak", "expected"),
    [
        # fp16 graphs: strongly typed on both majors, never the flag
        ("fp16", True, False, False, True, Precision(False, True)),
        ("fp16", True, False, False, False, Precision(False, True)),
        # fp32 graphs asking for fp16: the flag on 10...
        ("fp32", True, False, False, True, Precision(True, False)),
        # ...the fallback VAE stays fp32 (weakly typed on 10, strongly on 11)
        ("fp32", True, False, True, True, Precision(False, False)),
        ("fp32", True, False, True, False, Precision(False, True)),
        # fp32 asked for: fp32 engines
        ("fp32", False, False, False, True, Precision(False, False)),
        ("fp32", False, False, False, False, Precision(False, True)),
    ],
)
def test_precision_follows_graph_and_tensorrt(onnx_dtype, fp16, strongly_typed, always_fp32, weak, expected):
    got = resolve_precision(fp16=fp16, strongly_typed=strongly_typed, onnx_dtype=onnx_dtype,
                            always_fp32=always_fp32, weak_typing=weak)
    assert (got.fp16_flag, got.strongly_typed) == (expected.fp16_flag, expected.strongly_typed)


def test_fp16_from_an_fp32_graph_on_tensorrt_11_says_to_export_fp16():
    with pytest.raises(SdexportError, match="--dtype fp16.*--fp32") as info:
        resolve_precision(fp16=True, strongly_typed=False, onnx_dtype="fp32", always_fp32=False, weak_typing=False)
    assert "\n" not in str(info.value)


def test_notes_for_requests_read_differently():
    assert "fp16" in resolve_precision(fp16=False, strongly_typed=False, onnx_dtype="fp16",
                                       always_fp32=False, weak_typing=True).note
    forced = resolve_precision(fp16=True, strongly_typed=True, onnx_dtype="fp32", always_fp32=False, weak_typing=True)
    assert forced == Precision(False, True, note=forced.note) and "fp32" in forced.note


# -- build: what polygraphy is asked for ------------------------------------------------------


class Recorder:
    """polygraphy's three loaders, recording their arguments; refuses what TensorRT would refuse."""

    def __init__(self, trt: Any) -> None:
        self.trt = trt
        self.builds: list[dict[str, Any]] = []
        self.progress = fake_tensorrt.ProgressDriver(trt)
        """How each build calls its progress monitor (a test may set its ``before_step``)."""

    def install(self, monkeypatch) -> None:
        import polygraphy.backend.trt as backend

        # the installed polygraphy takes the build's arguments first: a parameter it lacks is a
        # TypeError here as in a real build (the fakes accepted any keyword, an audit); CreateConfig
        # passes its **kwargs on to a base class, so the real one is made (it only stores them); from
        # the modules that define them, which a second install leaves alone
        loader = importlib.import_module("polygraphy.backend.trt.loader")
        self.signatures = {name: inspect.signature(getattr(loader, name))
                           for name in ("network_from_onnx_path", "engine_bytes_from_network")}
        self.real_config = importlib.import_module("polygraphy.backend.trt.config").CreateConfig
        monkeypatch.setattr(backend, "network_from_onnx_path", self.network)
        monkeypatch.setattr(backend, "CreateConfig", self.config)
        monkeypatch.setattr(backend, "engine_bytes_from_network", self.build)
        monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda device=None: ("NVIDIA H200", "9.0"))

    def network(self, path: str, strongly_typed: bool = False) -> dict[str, Any]:
        self.signatures["network_from_onnx_path"].bind(path, strongly_typed=strongly_typed)
        return {"path": path, "strongly_typed": strongly_typed}

    def config(self, **kwargs: Any) -> dict[str, Any]:
        self.real_config(**kwargs)
        return kwargs

    def build(self, network: dict[str, Any], config: dict[str, Any], save_timing_cache: Any = None) -> bytes:
        from polygraphy.exception import PolygraphyException

        self.signatures["engine_bytes_from_network"].bind(network, config, save_timing_cache=save_timing_cache)

        if config["fp16"] and not hasattr(self.trt.BuilderFlag, "FP16"):  # polygraphy's try_set_flag
            raise PolygraphyException(f"FP16 is not available on TensorRT version {self.trt.__version__}")
        if config["fp16"] and network["strongly_typed"]:
            raise PolygraphyException("precision flags are not allowed on strongly typed networks")
        if not self.progress.run(config["progress_monitor"]):  # cancelled: TensorRT returns None, and
            raise PolygraphyException("Invalid Engine. Please ensure the engine was built correctly")  # polygraphy says so
        self.builds.append({**network, **config})
        if save_timing_cache is not None:  # polygraphy writes the updated cache (a path, or an open file)
            save_timing_cache.write(b"timing cache after " + network["path"].encode())
        return b"plan for " + network["path"].encode()


TXT2IMG = ["text_encoder", "unet", "vae_decoder", "vae_decoder_fp32"]


def build_profiles(monkeypatch, tmp_path: Path, version: str, engine_dir: Path, components: list[str]) -> list[dict[str, Any]]:
    """What polygraphy is asked for when ``components`` of a copy of ``engine_dir`` are built against
    a fake TensorRT ``version``: one record per build, in order (its ``profiles`` among them)."""
    import shutil

    trt = fake_tensorrt.make_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = tmp_path / "d"
    shutil.copytree(engine_dir, directory)
    tensorrt_build.build_engines(directory, fp16=False, components=components, timing_cache=tmp_path / "timing.cache")
    assert not any(b["tf32"] for b in recorder.builds)  # asked for fp32: exact fp32
    return recorder.builds


def _copy(source: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_fp16_export_builds_strongly_typed_on_both_majors(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch):
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    results = tensorrt_build.build_engines(directory, components=TXT2IMG, timing_cache=tmp_path / "timing.cache")
    assert [r.status for r in results] == ["built"] * 4
    assert not any(b["fp16"] for b in recorder.builds)
    weak = trt.__version__.startswith("10.")
    for result, build in zip(results, recorder.builds):
        fallback = result.component == "vae_decoder_fp32"  # an fp32 graph: weakly typed fp32 on 10
        assert result.key.strongly_typed == build["strongly_typed"] == (not (fallback and weak))
        assert result.key.tf32 == build["tf32"] == fallback  # fp32 for range, at tensor-core speed
        assert not result.key.fp16
        assert result.key.tensorrt_version == trt.__version__
        assert result.path.read_bytes().startswith(b"plan for ")


def test_a_plan_half_written_by_a_killed_build_is_removed_by_the_next(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch):
    """A build killed while it wrote a plan left ``.NAME.plan.PID.tmp`` (gigabytes on SD) for good: the
    next build, holding the directory's lock, removes it; a look-alike of the user's stays."""
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    (built,) = tensorrt_build.build_engines(directory, components=["text_encoder"])
    half = built.path.with_name(f".{built.path.name}.4242.tmp")
    half.write_bytes(b"half a plan")
    mine = built.path.with_name(f".{built.path.name}.mine.tmp")
    mine.write_bytes(b"the user's")
    (again,) = tensorrt_build.build_engines(directory, components=["text_encoder"])
    assert again.status == "cached" and not half.exists() and mine.read_bytes() == b"the user's"


def test_a_plan_is_listed_before_a_byte_of_it_is_written(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch):
    """A first build killed while it writes a plan (gigabytes) must leave the temporary file of a
    listed name, which the next build removes and --force counts as sdexport's: the manifest on disk
    lists the plan, with the hash of what is being written, before the write starts."""
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    real, seen = Path.write_bytes, []

    def write_bytes(self, data):
        if self.name.endswith(".tmp") and ".plan." in self.name:
            listed = json.loads((directory / "manifest.json").read_text())["files"]
            rel = self.relative_to(directory).parent / self.name.removeprefix(".").rsplit(".", 2)[0]
            seen.append(listed.get(rel.as_posix()) == hashlib.sha256(data).hexdigest())
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    tensorrt_build.build_engines(directory, components=["text_encoder"])
    assert seen == [True]


def test_a_listed_plan_a_stopped_build_never_wrote_is_passed_over(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch):
    """The manifest lists a plan before it is written: a build stopped then (Ctrl-C, SIGKILL) left it
    listed, the newest, and missing, and run chose it over an intact plan that serves, failing on the
    file (an audit). Missing plans are passed over; where only they would serve, one line says so."""
    from sdexport.errors import EngineDirError
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import choose_plans

    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    (intact,) = tensorrt_build.build_engines(directory, components=["unet"])
    real = Path.write_bytes

    def stopped(self, data):
        if self.name.endswith(".tmp") and self.parent.name == "unet":
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", stopped)
    with pytest.raises(KeyboardInterrupt):
        tensorrt_build.build_engines(directory, components=["unet"], static=True)
    monkeypatch.setattr(Path, "write_bytes", real)
    manifest = load_manifest(directory, verify_files=False)
    assert len(manifest.components["unet"].engines) == 2
    here = {"tensorrt_version": trt.__version__, "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
    assert choose_plans(directory, manifest, ["unet"], **here)["unet"]["path"] == intact.path.relative_to(directory).as_posix()
    intact.path.unlink()
    with pytest.raises(EngineDirError, match=r"is listed in the manifest but missing \(a build stopped while writing "
                                             r"it\?\); run `sdexport build .*` again"):
        choose_plans(directory, manifest, ["unet"], **here)


def test_every_graph_is_hashed_before_the_first_plan_is_built(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch):
    from sdexport.errors import EngineDirError

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    with (directory / "vae_decoder" / "model.onnx").open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(EngineDirError, match="vae_decoder/model.onnx does not match its sha256"):
        tensorrt_build.build_engines(directory, components=TXT2IMG, timing_cache=tmp_path / "timing.cache")
    assert recorder.builds == []  # not the text encoder's and the U-Net's first


def test_sdxl_fp16_build_leaves_out_the_vae_parts_the_runtime_does_not_load(trt, tiny_sdxl_fp16_engine_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """SDXL's VAE sets force_upcast: the runtime decodes with vae_decoder_fp32 and encodes with
    vae_encoder_fp32 (``upcast_parts``), so a build of every component skips the fp16 decoder and
    encoder, saying so, and builds the fp32 ones without the fp16 flag; naming one builds it."""
    from sdexport.build.vae_upcast import upcast_parts
    from sdexport.manifest import load_manifest
    from sdexport.runtime.loading import pipeline_components

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_sdxl_fp16_engine_dir, tmp_path)
    results = tensorrt_build.build_engines(directory, timing_cache=tmp_path / "timing.cache")
    built = ["text_encoder", "text_encoder_2", "unet", "vae_decoder_fp32", "vae_encoder_fp32"]
    assert [r.component for r in results] == built
    assert [r.key.fp16 for r in results[3:]] == [False, False]
    assert [r.key.tf32 for r in results] == [False, False, False, True, True]  # the VAE's fp32, with TF32
    assert ("not building vae_decoder (vae_decoder_fp32 runs) and vae_encoder (vae_encoder_fp32 runs)"
            in " ".join(capsys.readouterr().err.split()))
    manifest = load_manifest(directory)  # what load_pipeline hands the TensorRT loader: the plans built
    assert pipeline_components(manifest, True, upcast=upcast_parts(directory, manifest)) == built
    for part in ("vae_decoder", "vae_encoder"):
        (named,) = tensorrt_build.build_engines(directory, components=[part], timing_cache=tmp_path / "timing.cache")
        assert named.component == part and named.status == "built"


def test_sdxl_fp32_build_keeps_the_vae_decoder_fp32_under_the_fp16_flag(tiny_sdxl_engine_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """An fp32 SDXL export has no fp32 fallback decoder, and diffusers decodes its VAE in fp32
    (force_upcast): TensorRT 10's fp16 flag goes to the other components built, not to the decoder."""
    trt = fake_tensorrt.make_tensorrt("10.13.3.9")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    results = tensorrt_build.build_engines(_copy(tiny_sdxl_engine_dir, tmp_path), components=["unet", "vae_decoder"])
    assert [(r.component, r.key.fp16) for r in results] == [("unet", True), ("vae_decoder", False)]
    assert [b["fp16"] for b in recorder.builds] == [True, False]
    assert [b["tf32"] for b in recorder.builds] == [False, True]
    assert "keeping vae_decoder fp32: the VAE's config sets force_upcast" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.1"])
def test_sdxl_fp32_vae_decoder_is_kept_fp32_only_where_a_build_would_lower_it(version, tiny_sdxl_engine_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """--strongly-typed on TensorRT 10 builds fp32 graphs fp32 anyway, and TensorRT 11 refuses an
    fp32 export's fp16 build outright (decoder included, as the README says): no "keeping" note."""
    trt = fake_tensorrt.make_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_sdxl_engine_dir, tmp_path)
    if version.startswith("10."):
        (result,) = tensorrt_build.build_engines(directory, components=["vae_decoder"], strongly_typed=True)
        assert result.key.strongly_typed and not result.key.fp16
    else:
        with pytest.raises(SdexportError, match="no fp16 builder flag"):
            tensorrt_build.build_engines(directory, components=["vae_decoder"])
    assert "keeping vae_decoder fp32" not in " ".join(capsys.readouterr().err.split())


def test_the_runtime_passes_over_an_fp16_flag_plan_of_an_fp32_sdxl_vae_decoder(tiny_sdxl_engine_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """A plan built with the fp16 flag before an fp32 export's force_upcast decoder stayed fp32 is
    not picked, even when newest; with only such plans the loader says to rebuild."""
    from conftest import run_cli
    from sdexport.build import vae_upcast
    from sdexport.manifest import load_manifest
    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.plan_choice import select_engine

    trt = fake_tensorrt.make_tensorrt("10.13.3.9")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_sdxl_engine_dir, tmp_path)
    with monkeypatch.context() as before:  # the build before the rule
        before.setattr(vae_upcast, "kept_fp32", lambda *_: ())
        *_, flagged, encoder = tensorrt_build.build_engines(
            directory, components=["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"])
    assert (flagged.component, encoder.component) == ("vae_decoder", "vae_encoder")
    assert flagged.key.fp16 and encoder.key.fp16
    manifest = load_manifest(directory)
    assert vae_upcast.kept_fp32(directory, manifest) == ("vae_decoder", "vae_encoder")
    with pytest.raises(EngineDirError, match="vae_decoder's TensorRT engines .* were built with the fp16 flag"):
        load_pipeline(directory, "tensorrt")  # the loader's own choice, before any plan is read
    assert run_cli("inspect", directory, "--no-check") == 0
    said = " ".join(capsys.readouterr().out.split())
    assert all(f"{n}: 1 TensorRT plan(s) built with the fp16 flag are passed over" in said
               for n in ("vae_decoder", "vae_encoder"))
    here = {"tensorrt_version": flagged.key.tensorrt_version, "gpu_name": flagged.key.gpu_name,
            "compute_capability": flagged.key.compute_capability}
    with pytest.raises(EngineDirError) as info:
        select_engine(directory, manifest, "vae_decoder", fp32=True, **here)
    message = " ".join(str(info.value).split())
    assert "were built with the fp16 flag, which this VAE overflows" in message
    assert f"run `sdexport build {directory}` again" in message
    (kept,) = tensorrt_build.build_engines(directory, components=["vae_decoder"])  # the rebuild asked for
    assert not kept.key.fp16 and kept.key != flagged.key
    capsys.readouterr()
    assert run_cli("inspect", directory, "--no-check") == 0  # the decoder has nothing left to build; the encoder has
    said = " ".join(capsys.readouterr().out.split())
    assert "vae_decoder: 1 TensorRT plan(s)" not in said and "vae_encoder: 1 TensorRT plan(s)" in said
    data = json.loads((directory / "manifest.json").read_text())  # the flagged plan chosen last
    data["components"]["vae_decoder"]["engines"][flagged.key.digest()]["chosen"] = "9999-12-31T00:00:00+00:00"
    (directory / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(directory, verify_files=False)
    assert select_engine(directory, manifest, "vae_decoder", fp32=True, **here)["path"].endswith(kept.path.name)
    assert select_engine(directory, manifest, "vae_decoder", **here)["path"].endswith(flagged.path.name)
    # inspect's table says the same: the fp32 plan is the one a run loads, the newer flagged one passed over
    from sdexport.console import out

    monkeypatch.setattr(out, "_width", 250)  # a row a line
    capsys.readouterr()
    assert run_cli("inspect", directory, "--no-check") == 0
    rows = {cells[1]: cells for line in capsys.readouterr().out.splitlines() if line.count("│") >= 8 and ".plan" in line
            for cells in [[cell.strip() for cell in line.split("│")[1:-1]]]}
    assert rows[kept.path.name][-1] == "yes" and rows[flagged.path.name][-1] == "passed over (fp16 builder flag)"
    # asked for shapes only the passed-over plan covers, the refusal says why that one does not count
    exported = manifest.shape_profile
    narrow = exported.with_ranges(height=f"{exported.height[0]}:{exported.height[0]}:{exported.height[0]}")
    (small,) = tensorrt_build.build_engines(directory, components=["vae_decoder"], profile=narrow)
    data = json.loads((directory / "manifest.json").read_text())
    del data["components"]["vae_decoder"]["engines"][kept.key.digest()]
    (directory / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(directory, verify_files=False)
    wide = exported.with_ranges(height=f"{exported.height[2]}:{exported.height[2]}:{exported.height[2]}")
    assert not small.key.fp16 and wide.within(narrow)  # (reaches outside the fp32 plan's profile)
    with pytest.raises(ProfileError) as refused:
        select_engine(directory, manifest, "vae_decoder", fp32=True, profile=wide, **here)
    assert "1 plan(s) that do were built with the fp16 flag, which this VAE overflows" in " ".join(str(refused.value).split())
    beyond = exported.with_ranges(batch=f"1:1:{exported.batch[2] + 1}")  # no plan at all covers: nothing to count
    with pytest.raises(ProfileError) as refused:
        select_engine(directory, manifest, "vae_decoder", fp32=True, profile=beyond, **here)
    assert "fp16 flag" not in str(refused.value)


def test_a_graph_fixing_the_batch_builds_with_a_build_batch_it_takes(trt, engine_copy, monkeypatch, capsys):
    """A decoder fixed at batch 1 (another exporter's, adopted before sdexport checked fixed sizes):
    the build's own --batch, not the export's wider profile, is what its fixed sizes must hold."""
    import onnx

    from conftest import run_cli
    from sdexport.manifest import sha256_file

    Recorder(trt).install(monkeypatch)
    graph = engine_copy / "vae_decoder" / "model.onnx"
    model = onnx.load(str(graph))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(graph))
    data = json.loads((engine_copy / "manifest.json").read_text())
    data["files"]["vae_decoder/model.onnx"] = sha256_file(graph)
    (engine_copy / "manifest.json").write_text(json.dumps(data))
    assert run_cli("build", engine_copy, "--components", "vae_decoder", "--fp32") == 2
    assert "latent_sample fixes its batch (B) at 1, but the profile's calls give 1 to 2" in \
        " ".join(capsys.readouterr().err.split())
    assert run_cli("build", engine_copy, "--components", "vae_decoder", "--fp32", "--batch", "1:1:1") == 0


def test_fp32_export_on_tensorrt_10_uses_the_fp16_flag(tiny_engine_dir, tmp_path, monkeypatch):
    trt = fake_tensorrt.make_tensorrt("10.13.3.9")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    results = tensorrt_build.build_engines(_copy(tiny_engine_dir, tmp_path), components=["unet"])
    assert [(b["fp16"], b["strongly_typed"]) for b in recorder.builds] == [(True, False)]
    assert results[0].key.fp16 and not results[0].key.strongly_typed


def test_an_fp16_flag_plan_of_an_fp32_export_runs_lowered(tiny_engine_dir, tmp_path, monkeypatch):
    """The runtime knows when the decoder it loaded computes in fp16 though the export is fp32 (a
    TensorRT 10 plan built with the fp16 flag, an fp16 ONNX Runtime CUDA graph), so that an
    overflow there is blamed on fp16 and the fp32 build is named, not on the fp32 export."""
    import dataclasses
    from types import SimpleNamespace

    from sdexport.manifest import load_manifest
    from sdexport.runtime.loading import runs_lowered

    trt = fake_tensorrt.make_tensorrt("10.13.3.9")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_engine_dir, tmp_path)
    (flagged,) = tensorrt_build.build_engines(directory, components=["vae_decoder"])
    (fp32,) = tensorrt_build.build_engines(directory, fp16=False, components=["vae_decoder"])
    assert flagged.key.fp16 and not fp32.key.fp16
    manifest = load_manifest(directory, verify_files=False)

    def lowered(path: Path, backend: str = "tensorrt", graphs: str = "auto") -> bool:
        return runs_lowered(directory, manifest, "vae_decoder", backend, graphs, SimpleNamespace(source=path))

    assert lowered(flagged.path) and not lowered(fp32.path)
    assert not lowered(flagged.path, "onnxruntime-cuda") and not lowered(flagged.path, "torch")
    entry = manifest.components["vae_decoder"]
    for dtype, want in (("fp16", True), ("fp32", False)):
        fused = dataclasses.replace(entry, optimized={"onnxruntime-cuda": {"onnx": "vae_decoder/fused.onnx", "dtype": dtype}})
        manifest.components["vae_decoder"] = fused
        assert lowered(flagged.path, "onnxruntime-cuda") is want
        assert not lowered(flagged.path, "onnxruntime-cuda", "portable") and not lowered(flagged.path, "onnxruntime-cpu")


def test_a_fallback_vae_without_a_plan_is_left_out_with_a_note(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch,
                                                               capsys):
    """The fp32 decoder that reruns an fp16 overflow is optional to the TensorRT loader: a build with
    --components may have skipped it, and a run without it only loses the rerun. What the run needs
    is not: its missing plan is refused, before any plan is read."""
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import choose_plans

    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    (built,) = tensorrt_build.build_engines(directory, components=["unet"])
    manifest = load_manifest(directory, verify_files=False)
    here = {"tensorrt_version": built.key.tensorrt_version, "gpu_name": built.key.gpu_name,
            "compute_capability": built.key.compute_capability}
    capsys.readouterr()
    chosen = choose_plans(directory, manifest, ["unet", "vae_decoder_fp32"], {"vae_decoder_fp32": "unet"}, **here)
    assert list(chosen) == ["unet"]
    assert "loading no vae_decoder_fp32 (the fp32 rerun of an fp16 overflow): no TensorRT engine" in \
        " ".join(capsys.readouterr().err.split())
    with pytest.raises(EngineDirError, match="no TensorRT engine .* for vae_decoder"):
        choose_plans(directory, manifest, ["unet", "vae_decoder", "vae_decoder_fp32"],
                     {"vae_decoder_fp32": "vae_decoder"}, **here)
    # a plan whose profile does not cover the request (given, or else the part's plan's), alike
    exported = manifest.shape_profile
    narrow = exported.with_ranges(height=f"{exported.height[0]}:{exported.height[0]}:{exported.height[0]}")
    tensorrt_build.build_engines(directory, components=["vae_decoder_fp32"], profile=narrow)
    manifest = load_manifest(directory, verify_files=False)
    wide = exported.with_ranges(height=f"{exported.height[2]}:{exported.height[2]}:{exported.height[2]}")
    fallback = {"vae_decoder_fp32": "vae_decoder"}
    assert list(choose_plans(directory, manifest, ["vae_decoder_fp32"], fallback, profile=narrow, **here))
    assert not choose_plans(directory, manifest, ["vae_decoder_fp32"], fallback, profile=wide, **here)
    tensorrt_build.build_engines(directory, components=["vae_decoder"])  # the export's whole profile
    manifest = load_manifest(directory, verify_files=False)
    assert list(choose_plans(directory, manifest, ["vae_decoder", "vae_decoder_fp32"], fallback, **here)) == ["vae_decoder"]
    # what the run needs is refused outside the shapes asked for, never left out
    beyond = exported.with_ranges(batch=f"1:1:{exported.batch[2] + 1}")
    with pytest.raises(ProfileError, match="no unet engine"):
        choose_plans(directory, manifest, ["unet", "vae_decoder_fp32"], fallback, profile=beyond, **here)


def test_fp32_export_on_tensorrt_11_is_refused_before_any_build(tiny_engine_dir, tmp_path, monkeypatch):
    trt = fake_tensorrt.make_tensorrt("11.4.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_engine_dir, tmp_path)
    with pytest.raises(SdexportError, match="no fp16 builder flag.*--dtype fp16"):
        tensorrt_build.build_engines(directory)
    assert recorder.builds == []
    # --fp32 works: strongly typed fp32 engines
    results = tensorrt_build.build_engines(directory, fp16=False, components=["vae_decoder"])
    assert [(b["fp16"], b["strongly_typed"]) for b in recorder.builds] == [(False, True)]
    assert results[0].key.strongly_typed


def test_typing_mode_is_part_of_the_cache_key(tiny_engine_dir, tmp_path, monkeypatch):
    """Plans built weakly typed on 10 are not reused for a strongly typed request, and say why."""
    trt = fake_tensorrt.make_tensorrt("10.13.3.9")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_engine_dir, tmp_path)
    tensorrt_build.build_engines(directory, components=["unet"])
    again = tensorrt_build.build_engines(directory, components=["unet"], strongly_typed=True)
    assert again[0].status == "built"
    assert any("strongly typed off != on" in r for r in again[0].reasons)
    assert any("fp16 builder flag on != off" in r for r in again[0].reasons)
    cached = tensorrt_build.build_engines(directory, components=["unet"], strongly_typed=True)
    assert cached[0].status == "cached"


# -- build: progress and stops -------------------------------------------------------------------


def test_a_build_says_tensorrt_s_phases_on_its_line(trt, tiny_fp16_engine_dir, tmp_path, monkeypatch, capsys):
    """TensorRT's progress monitor is the build's own (both majors), and its phases are said on the
    build's step line: here, with no terminal, as lines (at most one a minute; every call here)."""
    from sdexport import console

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 0.0)
    monkeypatch.setattr(type(console.console), "is_terminal", property(lambda self: False))  # (FORCE_COLOR)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    (built,) = tensorrt_build.build_engines(directory, components=["text_encoder"])
    err = capsys.readouterr().err
    assert built.status == "built" and recorder.progress.steps_done == 8 and not recorder.progress.printed
    said = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("  Building text_encoder (")]
    assert said[:3] == ["Building engine 0/2 (0 s so far)", "Building engine 0/2 › Tactic selection 0/3 (0 s so far)",
                        "Building engine 0/2 › Tactic selection 1/3 (0 s so far)"]
    assert "Building engine 2/2 (0 s so far)" in said


def test_a_build_says_nothing_more_in_a_log_before_a_minute_has_passed(trt, tiny_fp16_engine_dir, tmp_path,
                                                                        monkeypatch, capsys):
    Recorder(trt).install(monkeypatch)
    tensorrt_build.build_engines(_copy(tiny_fp16_engine_dir, tmp_path), components=["text_encoder"])
    assert "Tactic selection" not in capsys.readouterr().err


@pytest.mark.parametrize(("listen", "number", "raised"), [
    (True, "SIGTERM", "Terminated"),  # a CI timeout
    (True, "SIGINT", "KeyboardInterrupt"),  # Ctrl-C at the command line
    (False, "SIGINT", "KeyboardInterrupt"),  # sdexport as a library
])
def test_a_stop_during_a_build_cancels_it_at_its_next_step_and_keeps_no_plan(
        trt, tiny_fp16_engine_dir, tmp_path, monkeypatch, listen, number, raised):
    """Before, a stop waited for the whole build (one call into TensorRT, minutes on SD): the monitor
    now cancels it at the next step, the stop is raised as the stop it was (not "could not build",
    nor the binding's "[ERROR] Exception caught in step_complete()"), and no plan is written."""
    import contextlib
    import signal

    import sdexport.errors
    from sdexport import stopping
    from sdexport.manifest import load_manifest

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    sent: list[str] = []

    def stop_while(phase: str, step: int) -> None:  # (TensorRT's C++ at work: no Python runs until a callback)
        if not sent and (phase, step) == ("Tactic selection", 1):
            sent.append(phase)
            signal.raise_signal(getattr(signal, number))

    recorder.progress.before_step = stop_while
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.listening() if listen else contextlib.nullcontext():
            handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt) as caught:
                tensorrt_build.build_engines(directory, components=["text_encoder"])
            assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert type(caught.value) is getattr(sdexport.errors, raised, KeyboardInterrupt)
    assert recorder.progress.cancelled and recorder.progress.steps_done == 2 and not recorder.progress.printed
    assert recorder.builds == [] and not list((directory / "text_encoder").glob("*.plan*"))
    assert load_manifest(directory).components["text_encoder"].engines == {}


@pytest.mark.parametrize("raises", [True, False])
def test_another_programs_sigint_handler_is_called_once_the_build_has_returned(
        trt, tiny_fp16_engine_dir, tmp_path, monkeypatch, raises):
    """sdexport as a library, under its caller's own SIGINT handler: a signal during the build would
    run that handler at the monitor's first line, where what it raises reaches the binding (printed,
    the build cancelled, "could not build"; a review). The handler is called once TensorRT has
    returned instead, as it would have been, and the build is not cancelled for it: a handler that
    raises stops the build with no plan written; one that only takes note lets it finish."""
    import signal

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    seen: list[int] = []

    def programs_own(number, frame):
        seen.append(number)
        if raises:
            raise KeyboardInterrupt

    def stop_while(phase: str, step: int) -> None:
        if not seen and recorder.progress.steps_done == 1:
            signal.raise_signal(signal.SIGINT)
            assert seen == [], "the program's handler ran inside the build"

    recorder.progress.before_step = stop_while
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    previous = signal.signal(signal.SIGINT, programs_own)
    try:
        if raises:
            with pytest.raises(KeyboardInterrupt):
                tensorrt_build.build_engines(directory, components=["text_encoder"])
        else:
            (built,) = tensorrt_build.build_engines(directory, components=["text_encoder"])
            assert built.status == "built" and built.path.is_file()
        assert signal.getsignal(signal.SIGINT) is programs_own
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIGINT] and recorder.progress.steps_done == 8 and not recorder.progress.cancelled
    assert not recorder.progress.printed
    assert bool(list((directory / "text_encoder").glob("*.plan"))) is not raises


def test_a_stop_raised_inside_a_callback_cancels_the_build_and_is_raised(trt, tiny_fp16_engine_dir, tmp_path,
                                                                           monkeypatch):
    """A KeyboardInterrupt raised in the monitor's callback all the same (a display's) is caught there
    (the binding would print it and lose it), the build is cancelled, and it is raised once TensorRT
    returns, not "could not build"."""
    from sdexport import console

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    calls: list[str] = []

    def interrupted(self, detail: str) -> None:
        calls.append(detail)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(console.StepProgress, "__call__", interrupted)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tensorrt_build.build_engines(directory, components=["text_encoder"])
    assert recorder.progress.cancelled and not recorder.progress.printed and recorder.builds == []


def test_a_failing_display_stops_showing_and_the_build_goes_on():
    from sdexport.build.tensorrt_progress import BuildPhases

    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        raise ValueError("a display fault")

    phases = BuildPhases(say)
    phases.phase_start("a", None, 2)
    for name in "bcd":
        phases.phase_start(name, "a", 1)
    assert phases.step_complete("d", 0) and said == ["a 0/2"]
    assert phases.line() == "b 0/1 › c 0/1 › d 1/1"  # the deepest three
    phases.phase_finish("d")
    assert phases.line() == "a 0/2 › b 0/1 › c 0/1" and not phases.cancelled


# -- runtime: bindings, staging, graphs, lifetime -------------------------------------------------


RANGES = {
    "sample": ((2, 4, 8, 8), (2, 4, 8, 8), (4, 4, 16, 16)),
    "encoder_hidden_states": ((2, 8, 16), (2, 8, 16), (4, 8, 16)),
}
"""The profile's dynamic inputs; the timestep is a static scalar, in no profile."""
PROFILE = ShapeProfile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 64, 128))


@pytest.fixture
def engine_factory(trt, monkeypatch):
    from sdexport.runtime.tensorrt_backend import SharedDeviceMemory, TensorRTEngine

    fake_tensorrt.fake_cuda(monkeypatch)
    made: list[Any] = []

    def make(*, cuda_graph: bool = False, ranges=RANGES, memory=None, dtypes=None) -> TensorRTEngine:
        memory = memory or SharedDeviceMemory(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream())
        engine = TensorRTEngine(UNET, fake_tensorrt.FakeEngine(trt, ranges, dtypes=dtypes), profile=PROFILE,
                                memory=memory, cuda_graph=cuda_graph)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def _feed(batch: int = 2, side: int = 8, t: float = 979.6) -> dict[str, torch.Tensor]:
    torch.manual_seed(batch * side)
    timesteps = torch.tensor([999.0, 990.1, t, 5.0], dtype=torch.float32)
    return {
        "sample": torch.randn(batch, 4, side, side),
        "timestep": timesteps[2],  # a view 8 bytes into a larger tensor, as the denoising loop passes it
        "encoder_hidden_states": torch.randn(batch, 8, 16),
    }


def test_inputs_are_staged_in_owned_aligned_buffers(engine_factory):
    engine = engine_factory()
    feed = _feed()
    assert feed["timestep"].data_ptr() % 256 != 0  # what TensorRT would have been given before
    out = engine(feed)["out_sample"]
    assert torch.equal(out, 2 * feed["sample"] + torch.tensor(979.6))  # float32 timestep, not 979.5
    for name, buffer in (*engine.inputs.items(), *engine.outputs.items()):
        assert buffer.data_ptr() % 256 == 0
        assert engine.context.addresses[name] == buffer.data_ptr()
    binds = engine.context.bind_calls
    engine(_feed(t=5.0))
    assert engine.context.bind_calls == binds == 4  # bound once, at load


def test_a_plan_with_a_vector_timestep_is_fed_the_scalar_reshaped(engine_factory):
    """Older exports (optimum before 1.14, ONNX Runtime's SD tool) take the timestep as (1,)."""
    engine = engine_factory(ranges={**RANGES, "timestep": ((1,), (1,), (1,))})
    assert engine.io.reshaped == {"timestep"}
    feed = _feed()
    assert torch.equal(engine(feed)["out_sample"], 2 * feed["sample"] + torch.tensor(979.6))


def test_a_plan_with_float16_io_is_fed_and_read_through_casts(engine_factory, trt):
    """An optimum fp16 export's plan takes and returns float16 (its timestep stays float32): the
    runtime stages the float32 feed into float16 buffers and returns float32, as graph_io bridges
    ONNX Runtime's."""
    half = trt.DataType.HALF
    engine = engine_factory(dtypes={"sample": half, "encoder_hidden_states": half, "out_sample": half})
    assert engine.inputs["sample"].dtype == torch.float16 and engine.inputs["timestep"].dtype == torch.float32
    assert engine.outputs["out_sample"].dtype == torch.float16
    feed = _feed()
    out = engine(feed)["out_sample"]
    assert out.dtype == torch.float32
    expected = (2 * feed["sample"].half().numpy() + np.float32(979.6)).astype(np.float16)  # the plan's own math
    assert torch.equal(out, torch.from_numpy(expected).float())
    assert not torch.equal(out, 2 * feed["sample"] + torch.tensor(979.6))  # float16 it was


@pytest.mark.parametrize(("dtype", "refusal"), [
    ("BF16", r"sample is bfloat16, but a unet graph's sample is float32 or float16"),
    ("FP8", r"sample is TensorRT's DataType.FP8, which sdexport cannot feed or read"),
])
def test_a_plan_with_io_types_sdexport_does_not_make_is_refused_at_load_in_one_line(engine_factory, trt, dtype,
                                                                                  refusal):
    with pytest.raises(EngineDirError, match=refusal) as info:
        engine_factory(dtypes={"sample": getattr(trt.DataType, dtype)})
    assert "\n" not in str(info.value)


def test_a_plan_of_another_component_is_refused_at_load(trt, monkeypatch):
    from sdexport.errors import EngineDirError
    from sdexport.runtime.tensorrt_backend import SharedDeviceMemory, TensorRTEngine
    from sdexport.specs import VAE_DECODER

    fake_tensorrt.fake_cuda(monkeypatch)
    memory = SharedDeviceMemory(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream())
    with pytest.raises(EngineDirError, match=r"takes \['sample', 'timestep', 'encoder_hidden_states'\] .* but a "
                                             r"vae_decoder graph takes \['latent_sample'\]"):
        TensorRTEngine(VAE_DECODER, fake_tensorrt.FakeEngine(trt, RANGES), profile=PROFILE, memory=memory)


def test_a_refused_binding_is_an_error(engine_factory, monkeypatch):
    monkeypatch.setattr(fake_tensorrt.FakeContext, "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(EngineDirError, match="refused the address of 'sample'"):
        engine_factory()


def test_the_callers_tensors_can_be_freed_after_the_call(engine_factory):
    engine = engine_factory()
    feed = _feed()
    expected = 2 * feed["sample"] + feed["timestep"]
    out = engine(feed)["out_sample"]
    feed["sample"].fill_(float("nan"))  # the caller reuses its memory: the engine kept a copy
    assert torch.equal(out, expected)


def test_shapes_outside_the_plan_are_refused_before_running(engine_factory):
    engine = engine_factory()
    with pytest.raises(ProfileError, match=r"axis 0 \(B\) is 6"):
        engine(_feed(batch=6))
    assert engine.engine.executions == 0


def test_shapes_below_the_plan_are_refused_before_running_too(engine_factory):
    """The lower end of the plan's range is checked as its upper end is: a batch below the profile's
    minimum is refused in sdexport's words, naming the range, before anything is copied or run."""
    engine = engine_factory()
    with pytest.raises(ProfileError, match=r"axis 0 \(B\) is 1, but this TensorRT engine was built for B in \[2, 4\]"):
        engine(_feed(batch=1))
    assert engine.engine.executions == 0


def test_cuda_graph_is_captured_on_first_use_and_replayed(engine_factory):
    engine = engine_factory(cuda_graph=True)
    plan = engine.engine
    fake_tensorrt.Capture.modes.clear()
    first = engine(_feed(t=1.0))["out_sample"].clone()
    assert plan.executions == 1  # the warm-up ran; the capture recorded without running
    # a capture does not forbid other threads' CUDA calls (their own pipelines: README, "a pipeline per thread")
    assert fake_tensorrt.Capture.modes == ["thread_local"]
    (small,) = engine._graphs.values()
    second = engine(_feed(t=2.0))["out_sample"]
    assert small.graph.replays == 1 and plan.executions == 2
    torch.testing.assert_close(second, first + 1.0)  # the replay read the new inputs
    big_feed = _feed(batch=4, side=16)
    big = engine(big_feed)["out_sample"].clone()  # new shapes: run and capture again, the old graph kept
    assert len(engine._graphs) == 2
    third = engine(_feed(t=3.0))["out_sample"]  # the old shapes again, after the new ones ran
    assert small.graph.replays == 2 and third.shape == (2, 4, 8, 8)
    torch.testing.assert_close(third, first + 2.0)
    torch.testing.assert_close(engine(big_feed)["out_sample"], big)


def test_each_graph_has_its_own_context(engine_factory):
    engine = engine_factory(cuda_graph=True)
    engine(_feed())
    engine(_feed(batch=4, side=16))
    contexts = [entry.context for entry in engine._graphs.values()]
    assert len({id(c) for c in contexts}) == 2 and engine.context not in contexts
    assert engine.engine.contexts == 3  # the engine's own, one per captured shape set
    for context in contexts:  # bound to the same buffers and the shared block
        assert context.addresses == engine.context.addresses
        assert context.device_memory == engine.context.device_memory


@pytest.fixture
def syncs_and_frees(monkeypatch):
    """The order in which the fake stream was synchronised and fake contexts were destroyed."""
    fake_tensorrt.DESTROYED.clear()
    monkeypatch.setattr(fake_tensorrt.FakeStream, "synchronize", lambda self: fake_tensorrt.DESTROYED.append("sync"))
    return fake_tensorrt.DESTROYED


def test_an_evicted_graphs_context_is_freed_after_the_stream_is_done(engine_factory, monkeypatch, syncs_and_frees):
    """The least recently used graph goes when a new one exceeds MAX_GRAPHS; a replay of it still
    queued on the stream reads its context, so the context is freed only after the stream is done."""
    from sdexport.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "MAX_GRAPHS", 1)
    engine = engine_factory(cuda_graph=True)
    engine(_feed())
    syncs_and_frees.clear()
    engine(_feed(batch=4, side=16))
    assert len(engine._graphs) == 1
    assert syncs_and_frees == ["sync", "context"], syncs_and_frees


def test_a_failed_capture_frees_its_context_after_the_stream_is_done(engine_factory, monkeypatch, capsys,
                                                                    syncs_and_frees):
    """The warm-up run before a capture is queued on the context made for it: a capture that fails
    drops that context only after the stream is done (torch's capture synchronises before it
    begins, so with real torch nothing is left by then; the order holds either way)."""
    def failing(graph, stream=None, capture_error_mode="global"):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = engine_factory(cuda_graph=True)
    monkeypatch.setattr(torch.cuda, "graph", failing)
    syncs_and_frees.clear()
    feed = _feed()
    torch.testing.assert_close(engine(feed)["out_sample"], 2 * feed["sample"] + feed["timestep"])
    assert not engine.cuda_graph and "CUDA graph capture failed" in capsys.readouterr().err
    assert syncs_and_frees == ["sync", "context"], syncs_and_frees


def test_the_least_recently_used_graph_is_the_one_evicted(engine_factory, monkeypatch):
    """Past MAX_GRAPHS the graph dropped is the one replayed longest ago, not the one captured first:
    a pipeline alternating between its usual shapes and occasional others keeps its usual graph."""
    from sdexport.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "MAX_GRAPHS", 2)
    engine = engine_factory(cuda_graph=True)
    usual, other, third = _feed(), _feed(batch=4, side=16), _feed(batch=3, side=12)
    engine(usual)
    engine(other)
    engine(usual)  # replayed: now the most recently used
    engine(third)  # a third set of shapes: ``other`` goes
    sample = engine.input_names.index("sample")
    assert [shapes[sample] for shapes in engine._graphs] == [(2, 4, 8, 8), (3, 4, 12, 12)]


def test_a_static_plans_shapes_are_read_from_its_profile(engine_factory):
    """TensorRT keeps -1 on the graph's dynamic axes even where a profile fixes them (``--static``):
    the one shape, which loading captures ahead of the first call, comes from the profile."""
    one = {name: (lo, lo, lo) for name, (lo, _, _) in RANGES.items()}
    engine = engine_factory(ranges=one)
    assert -1 in tuple(engine.engine.get_tensor_shape("sample"))
    assert engine.ranges == {**one, "timestep": ((), (), ())}
    assert all(lo == hi for lo, _, hi in engine.ranges.values())  # (load_engines' test for a capture at load)


def test_capture_ahead_of_the_first_call(engine_factory):
    engine = engine_factory(cuda_graph=True)
    engine.capture({"sample": (2, 4, 8, 8), "timestep": (), "encoder_hidden_states": (2, 8, 16)})
    (entry,) = engine._graphs.values()
    engine(_feed())
    assert entry.graph.replays == 1


def test_shared_memory_serves_every_engine_and_repoints_on_growth(engine_factory, trt):
    from sdexport.runtime.tensorrt_backend import SharedDeviceMemory

    memory = SharedDeviceMemory(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream())
    small = engine_factory(memory=memory, cuda_graph=True)
    small(_feed())
    assert small._graphs
    from sdexport.runtime.tensorrt_backend import TensorRTEngine

    big = TensorRTEngine(UNET, fake_tensorrt.FakeEngine(trt, RANGES, workspace=1 << 20), profile=PROFILE,
                         memory=memory)
    assert memory.nbytes >= 1 << 20
    assert small.context.device_memory == big.context.device_memory == (memory.address, memory.nbytes)
    assert not small._graphs  # captured against the old block: dropped
    big.close()


def test_binding_an_engine_the_block_already_fits_keeps_the_block_and_the_graphs(engine_factory):
    """The block grows only for a larger engine: one that needs no more than it holds (every engine
    but the largest, after ``load_tensorrt_engines`` reserved for that one) binds to it as it is, so
    the graphs other engines captured on it stay valid."""
    from sdexport.runtime.tensorrt_backend import SharedDeviceMemory

    memory = SharedDeviceMemory(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream())
    first = engine_factory(memory=memory, cuda_graph=True)
    first(_feed())
    size = memory.nbytes
    engine_factory(memory=memory)  # the same plan: as much memory as the block holds
    memory.reserve(size)
    assert memory.nbytes == size and first._graphs
    assert first.context.device_memory == (memory.address, size)


def test_close_destroys_context_before_engine_and_leaves_no_cycle(engine_factory):
    fake_tensorrt.DESTROYED.clear()
    engine = engine_factory(cuda_graph=True)
    engine(_feed())
    memory = engine.memory
    engine.close()
    assert fake_tensorrt.DESTROYED == ["context", "context", "engine"]  # the graph's, the engine's
    engine.close()  # idempotent
    with pytest.raises(EngineDirError, match="closed"):
        engine(_feed())
    assert len(memory._engines) == 0


def test_a_failed_run_gives_tensorrts_reason_which_its_logger_records_not_prints(engine_factory, monkeypatch, capsys):
    """The runtime's logger records TensorRT's errors for the one line a refusal makes; that line
    said "see the TensorRT messages above", above which nothing was printed. A reason is its own
    call's: an error reported before the call (an unchecked call's) is not given for its failure."""
    from sdexport.runtime import tensorrt_backend

    engine = engine_factory()
    tensorrt_backend._runtime()  # (the logger the runtime's plans report to)
    logger = tensorrt_backend._Logs.logger

    def failing(self, stream):
        logger.log(fake_tensorrt.ILogger.Severity.ERROR, "IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime "
                   "(an illegal memory access was encountered)\nmore detail")
        return False

    monkeypatch.setattr(fake_tensorrt.FakeContext, "execute_async_v3", failing)
    with pytest.raises(EngineRunError) as failed:  # (the run's failure: the CLI's one line, exit 1)
        engine(_feed())
    assert str(failed.value) == ("unet: TensorRT failed while it ran (IExecutionContext::enqueueV3: Error Code 1: Cuda "
                                 "Runtime (an illegal memory access was encountered))")
    captured = capsys.readouterr()
    assert "illegal" not in captured.out + captured.err
    logger.log(fake_tensorrt.ILogger.Severity.ERROR, "IExecutionContext::setDeviceMemory: an earlier, unchecked call")
    monkeypatch.setattr(fake_tensorrt.FakeContext, "execute_async_v3", lambda self, stream: False)
    with pytest.raises(EngineRunError, match=r"^unet: TensorRT failed while it ran \(execute_async_v3 returned false\)$"):
        engine(_feed())
    engine.close()


def test_a_reason_is_its_own_threads(trt):
    """One pipeline per thread (README): another thread's call forgetting or reporting its own
    error between this thread's failing call and its message neither erases nor replaces its reason."""
    import threading

    from sdexport.runtime import tensorrt_backend

    tensorrt_backend._runtime()
    logger = tensorrt_backend._Logs.logger
    logger.log(fake_tensorrt.ILogger.Severity.ERROR, "mine")

    def other_pipeline() -> None:
        tensorrt_backend._forget()
        logger.log(fake_tensorrt.ILogger.Severity.ERROR, "theirs")

    other = threading.Thread(target=other_pipeline)
    other.start()
    other.join()
    assert tensorrt_backend._last_error() == "mine" and tensorrt_backend._last_error("none") == "none"


def test_an_unclosed_engine_is_freed_by_reference_counting(engine_factory, trt):
    from sdexport.runtime.tensorrt_backend import SharedDeviceMemory, TensorRTEngine

    memory = SharedDeviceMemory(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream())
    engine = TensorRTEngine(UNET, fake_tensorrt.FakeEngine(trt, RANGES), profile=PROFILE, memory=memory,
                            cuda_graph=True)
    engine(_feed())
    alive = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert alive() is None, "a reference cycle keeps the engine (and its device memory) alive"
    finally:
        gc.enable()


def test_the_shared_block_is_freed_with_the_last_engine(engine_factory, trt):
    from sdexport.runtime.tensorrt_backend import SharedDeviceMemory

    memory = SharedDeviceMemory(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream())
    first, second = engine_factory(memory=memory), engine_factory(memory=memory)
    assert memory.nbytes > 0
    first.close()
    assert memory.nbytes > 0  # still serving the second
    second.close()
    assert memory.nbytes == 0


def _refittable(trt, names: dict[str, tuple[int, ...]]) -> fake_tensorrt.FakeEngine:
    engine = fake_tensorrt.FakeEngine(trt, RANGES)
    engine.refittable = True
    engine.weights = {name: np.zeros(shape, np.float16) for name, shape in names.items()}
    return engine


@pytest.fixture
def logger(monkeypatch):
    from sdexport.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend._Logs, "logger", object())


def test_run_time_lora_refits_a_refittable_engine(trt, logger, tmp_path):
    """TensorRT 10 and 11: the new initializers go in by their ONNX names, before any context exists."""
    from sdexport.runtime.tensorrt_backend import refit

    engine = _refittable(trt, {"onnx::MatMul_12": (32, 32), "model.conv_in.weight": (32, 4, 3, 3)})
    new = np.full((32, 32), 0.5, np.float16)
    refit(engine, {"onnx::MatMul_12": new}, tmp_path / "engines" / "unet" / "plan")
    assert engine.refits == 1 and np.array_equal(engine.weights["onnx::MatMul_12"], new)
    assert not engine.weights["model.conv_in.weight"].any()


def test_refit_refusals_say_what_to_do(trt, logger, tmp_path):
    from sdexport.errors import EngineDirError, SdexportError
    from sdexport.runtime.tensorrt_backend import refit

    source = tmp_path / "engines" / "unet" / "plan"
    plain = fake_tensorrt.FakeEngine(trt, RANGES)
    with pytest.raises(EngineDirError, match=r"not a refittable engine.*--refittable` \(and the shapes of this run\)"):
        refit(plain, {"w": np.zeros(2, np.float16)}, source)
    engine = _refittable(trt, {"kept": (2, 2)})
    with pytest.raises(SdexportError, match="merged 1 of the weights --lora changes into others .e.g. folded"):
        refit(engine, {"folded": np.zeros((2, 2), np.float16)}, source)
    with pytest.raises(SdexportError, match="refused the new kept"):
        refit(engine, {"kept": np.zeros((3, 3), np.float16)}, source)
    with pytest.raises(SdexportError, match=r"refused the new kept \(float32, \[2, 2\]\)"):
        refit(engine, {"kept": np.zeros((2, 2), np.float32)}, source)  # TensorRT checks the type, not the shape
    # an array of a type TensorRT's binding does not know: its bare ValueError, said in sdexport's words
    with pytest.raises(SdexportError, match=r"the new kept is float64, which a refit cannot give TensorRT"):
        engine.weights["kept"] = np.zeros((2, 2), np.float32)
        refit(engine, {"kept": np.zeros((2, 2), np.float64)}, source)
    engine.weights["kept"] = np.zeros((2, 2), np.float16)
    engine.refit_needs = ["kept_bias"]
    with pytest.raises(SdexportError, match="needs 1 more weights to refit with these .e.g. kept_bias"):
        refit(engine, {"kept": np.zeros((2, 2), np.float16)}, source)
    assert engine.refits == 0


def test_a_refit_tensorrt_fails_is_refused_not_run_with_the_old_weights(trt, logger, tmp_path, monkeypatch):
    """Every weight accepted, TensorRT's refit itself may still fail: the run stops there, rather than
    draw with the engine's old weights as though the LoRA were applied."""
    from sdexport.errors import SdexportError
    from sdexport.runtime.tensorrt_backend import refit

    monkeypatch.setattr(fake_tensorrt.FakeRefitter, "refit_cuda_engine", lambda self: False)
    engine = _refittable(trt, {"w": (2, 2)})
    with pytest.raises(SdexportError, match=r"unet/plan: TensorRT could not refit the engine"):
        refit(engine, {"w": np.ones((2, 2), np.float16)}, tmp_path / "engines" / "unet" / "plan")
    assert engine.refits == 0 and not engine.weights["w"].any()


def test_weights_tensorrt_fused_with_a_changed_one_are_given_again_as_exported(trt, logger, tmp_path):
    """IRefitter's missing weights (a bias folded into its matrix product): read from the graph by
    name, as NVIDIA's diffusion demo refits; one the graph does not hold, or of another type, refused."""
    from sdexport.errors import SdexportError
    from sdexport.runtime.tensorrt_backend import refit

    source = tmp_path / "engines" / "unet" / "plan"
    engine = _refittable(trt, {"w": (2, 3), "b": (3,)})
    engine.refit_needs = ["b"]
    exported = {"b": np.arange(3, dtype=np.float16)}
    with pytest.raises(SdexportError, match=r"refused b as exported \(float32, \[3\]\)"):
        refit(engine, {"w": np.ones((2, 3), np.float16)}, source, lambda name: exported[name].astype(np.float32))
    refit(engine, {"w": np.ones((2, 3), np.float16)}, source, exported.get)
    assert engine.refits == 1 and engine.weights["w"].all() and np.array_equal(engine.weights["b"], exported["b"])


def test_the_fake_refitter_keeps_tensorrts_rules(trt):
    """What IRefitter does (NvInferRuntime.h): weights of another type or count are refused, a
    refit with weights still missing returns False, and once they are given it refits."""
    engine = _refittable(trt, {"w": (2, 3), "b": (3,)})
    engine.refit_needs = ["b"]
    refitter = trt.Refitter(engine, None)
    assert not refitter.set_named_weights("w", trt.Weights(np.ones((2, 3), np.float32)))
    assert not refitter.set_named_weights("w", trt.Weights(np.ones((2, 2), np.float16)))
    assert refitter.set_named_weights("w", trt.Weights(np.ones((3, 2), np.float16)))  # no shape, only a count
    assert refitter.get_missing_weights() == ["b"] and not refitter.refit_cuda_engine() and engine.refits == 0
    assert refitter.set_named_weights("b", trt.Weights(np.ones(3, np.float16)))
    assert refitter.get_missing_weights() == [] and refitter.refit_cuda_engine() and engine.refits == 1
    assert engine.weights["w"].shape == (2, 3) and engine.weights["w"].all()


CACHE_ERRORS = [
    ("1: [stdArchiveReader.cpp::StdArchiveReaderInitCommon::47] Error Code 1: Serialization (Serialization "
    "assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)"),
    "4: The timing cache will not be used!",
]
"""What TensorRT logs as errors for a timing cache it cannot read, before building without it."""


@pytest.mark.parametrize("cache_errors", [[], CACHE_ERRORS], ids=["plain", "after-an-unreadable-timing-cache"])
def test_a_failed_build_says_tensorrts_first_error_and_its_log_goes_to_stderr(trt, tiny_fp16_engine_dir, tmp_path,
                                                                               monkeypatch, capsys, cache_errors):
    """polygraphy's exception says only "Invalid Engine"; TensorRT's reason is a line of its log,
    which a failure recorded away from the terminal (the bench's report) never held. Errors about
    a timing cache TensorRT could not read come first and are not the reason: it builds without it."""
    import polygraphy.backend.trt as backend
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)

    def failing(network: dict[str, Any], config: dict[str, Any], save_timing_cache: Any = None) -> bytes:
        G_LOGGER.warning("a warning first")
        for line in cache_errors:
            G_LOGGER.error(line)
        G_LOGGER.error("10: Could not find any implementation for node /down/conv.")
        G_LOGGER.error("2: [builder.cpp::buildSerializedNetwork::751] Error Code 2: Internal Error (engine == nullptr)")
        raise PolygraphyException("Invalid Engine. Please ensure the engine was built correctly")

    monkeypatch.setattr(backend, "engine_bytes_from_network", failing)
    if cache_errors:  # a cache file there to load: another TensorRT's
        (tmp_path / "timing.cache").write_bytes(b"another TensorRT's timing cache")
    with pytest.raises(SdexportError) as failed:
        tensorrt_build.build_engines(directory, components=["unet"], timing_cache=tmp_path / "timing.cache")
    assert str(failed.value).endswith("Invalid Engine. Please ensure the engine was built correctly "
                                      "(TensorRT: 10: Could not find any implementation for node /down/conv.)")
    captured = capsys.readouterr()
    assert "a warning first" in captured.err and "Error Code 2" in captured.err and captured.out == ""


def test_a_build_that_fails_after_only_timing_cache_errors_gives_those(trt, tiny_fp16_engine_dir, tmp_path,
                                                                       monkeypatch):
    import polygraphy.backend.trt as backend
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)

    def failing(network: dict[str, Any], config: dict[str, Any], save_timing_cache: Any = None) -> bytes:
        for line in CACHE_ERRORS:
            G_LOGGER.error(line)
        raise PolygraphyException("Invalid Engine. Please ensure the engine was built correctly")

    monkeypatch.setattr(backend, "engine_bytes_from_network", failing)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"another TensorRT's timing cache")
    for given in (cache, None):  # loaded, or not (then they are not set aside either)
        with pytest.raises(SdexportError, match=r"\(TensorRT: 1: \[stdArchiveReader.cpp::.*Magic tag does not match\)\)$"):
            tensorrt_build.build_engines(directory, components=["unet"], timing_cache=given, force=True)


def test_the_timing_cache_is_replaced_whole_and_never_kept_in_the_engine_directory(trt, tiny_fp16_engine_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """polygraphy writes a timing cache path in place (a stopped or failed build truncated it) and
    makes FILE.lock beside it: it is given open files instead, and the cache is replaced once the
    build succeeds. A folder, or a file in the engine directory (a graph, the manifest), is refused
    before anything builds."""
    import polygraphy.backend.trt as backend
    from polygraphy.exception import PolygraphyException

    from conftest import run_cli

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    cache = tmp_path / "caches" / "timing.cache"
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=cache)
    before = cache.read_bytes()
    assert before.startswith(b"timing cache after ") and recorder.builds[-1]["load_timing_cache"] is None

    def failing(network: dict[str, Any], config: dict[str, Any], save_timing_cache: Any = None) -> bytes:
        save_timing_cache.write(b"half a cache")
        raise PolygraphyException("out of memory")

    monkeypatch.setattr(backend, "engine_bytes_from_network", failing)
    with pytest.raises(SdexportError, match="could not build unet"):
        tensorrt_build.build_engines(directory, components=["unet"], timing_cache=cache, force=True)
    assert cache.read_bytes() == before and [p.name for p in cache.parent.iterdir()] == ["timing.cache"]
    recorder.install(monkeypatch)
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=cache, force=True)
    assert recorder.builds[-1]["load_timing_cache"].name == str(cache)  # read from the cache the first build saved
    assert [p.name for p in cache.parent.iterdir()] == ["timing.cache"]
    link = tmp_path / "linked.cache"  # a link to a shared cache: that cache is updated, the link kept
    link.symlink_to(cache)
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=link, force=True)
    assert link.is_symlink() and link.resolve() == cache and recorder.builds[-1]["load_timing_cache"].name == str(cache)
    graph = (directory / "unet" / "model.onnx").read_bytes()
    for bad, words in ((cache.parent, "a folder; name the cache file"),
                       (directory / "unet" / "model.onnx", "inside the engine directory"),
                       (tiny_fp16_engine_dir / "shared.cache", f"inside the engine directory {tiny_fp16_engine_dir}")):
        assert run_cli("build", directory, "--timing-cache", bad) == 2
        assert words in capsys.readouterr().err
    assert (directory / "unet" / "model.onnx").read_bytes() == graph


def test_a_timing_cache_file_sdexport_did_not_write_is_read_never_replaced(trt, tiny_fp16_engine_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """A file named by mistake (TensorRT reads what it cannot parse as no cache, and the build then
    saved its cache over it), a cache another tool wrote, or one sdexport wrote and something changed
    since: read, left as it is, and said so once. One sdexport wrote is replaced, as before."""
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=notes)
    assert notes.read_text() == "my notes" and recorder.builds[-1]["load_timing_cache"].name == str(notes)
    assert "--timing-cache " + str(notes) + " was not written by sdexport: read, not replaced" in " ".join(
        capsys.readouterr().err.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([directory.name, "notes.txt"])
    ours = tmp_path / "ours.cache"
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=ours, force=True)
    written = ours.stat().st_ino
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=ours, force=True)
    assert ours.stat().st_ino != written and "not written by sdexport" not in capsys.readouterr().err  # replaced
    ours.write_bytes(b"changed since")
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=ours, force=True)
    assert ours.read_bytes() == b"changed since" and "not written by sdexport" in capsys.readouterr().err


def _loadable_unet_plan(engine_dir: Path, tmp_path: Path, monkeypatch, version: str) -> tuple[Path, Any]:
    """A copy of ``engine_dir`` with a U-Net plan the fake runtime can load (``plan_bytes``), built
    against a fake TensorRT ``version``; the loader's device memory on the CPU."""
    from sdexport.runtime import tensorrt_backend

    trt = fake_tensorrt.make_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fake_tensorrt.fake_cuda(monkeypatch)
    Recorder(trt).install(monkeypatch)
    monkeypatch.setattr(tensorrt_build, "_build_plan", lambda *args: memoryview(fake_tensorrt.plan_bytes(RANGES)))
    real = tensorrt_backend.SharedDeviceMemory
    monkeypatch.setattr(tensorrt_backend, "SharedDeviceMemory",
                        lambda *args, **kwargs: real(device=torch.device("cpu"), stream=fake_tensorrt.FakeStream()))
    directory = _copy(engine_dir, tmp_path)
    (built,) = tensorrt_build.build_engines(directory, components=["unet"], fp16=False)
    return directory, built


def test_the_tensorrt_loader_refuses_a_plan_that_is_not_the_one_built(tiny_engine_dir, tmp_path, monkeypatch):
    """The plan a run picks is checked against its sha256 before TensorRT reads it: one replaced or
    damaged since the build (here by a plan TensorRT could load) is refused, naming it, not run."""
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import load_tensorrt_engines

    directory, built = _loadable_unet_plan(tiny_engine_dir, tmp_path, monkeypatch, "10.13.3.9")
    manifest = load_manifest(directory, verify_files=False)
    (engine,) = load_tensorrt_engines(directory, manifest, ["unet"]).values()
    assert engine.source == built.path
    engine.close()
    other = {name: tuple(tuple(2 * d for d in shape) for shape in shapes) for name, shapes in RANGES.items()}
    built.path.write_bytes(fake_tensorrt.plan_bytes(other))
    with pytest.raises(EngineDirError, match=f"{built.path.parent.name}/{built.path.name}.*does not match its sha256"):
        load_tensorrt_engines(directory, manifest, ["unet"])


def test_a_refittable_plan_is_loaded_with_a_warning_on_the_tensorrt_whose_refit_drops_biases(
        tiny_engine_dir, tmp_path, monkeypatch, capsys):
    """TensorRT 11.3's refittable engines may compute wrongly with no refit at all: a run that loads
    one (a plan built elsewhere, or before sdexport refused such builds) says so; other plans, and
    other TensorRT versions, load without a word."""
    from sdexport.manifest import load_manifest
    from sdexport.runtime import tensorrt_backend

    real = tensorrt_backend.deserialize_plan

    def refittable(path: Path, runtime: Any = None) -> Any:
        engine = real(path, runtime)
        engine.refittable = True
        return engine

    for version, warned in (("11.3.0.4", True), ("11.4.0.1", False)):
        directory, _ = _loadable_unet_plan(tiny_engine_dir, tmp_path / version, monkeypatch, version)
        manifest = load_manifest(directory, verify_files=False)
        with monkeypatch.context() as patch:
            patch.setattr(tensorrt_backend, "deserialize_plan", refittable)
            capsys.readouterr()
            (engine,) = tensorrt_backend.load_tensorrt_engines(directory, manifest, ["unet"]).values()
        engine.close()
        said = " ".join(capsys.readouterr().err.split())
        assert (f"is refittable: TensorRT {version}'s refittable engines may drop a matrix product's bias" in said) is warned
    capsys.readouterr()
    (engine,) = tensorrt_backend.load_tensorrt_engines(directory, manifest, ["unet"]).values()  # not refittable
    engine.close()
    assert "refittable" not in capsys.readouterr().err


def test_a_plan_tensorrt_cannot_load_is_one_line_with_its_own_reason(trt, tmp_path, monkeypatch, capsys):
    """The process's logger and runtime (``_runtime``), against a fake runtime that, as TensorRT,
    returns None for a damaged or foreign plan after logging why; a warning it logs is shown."""
    from sdexport.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend._Logs, "runtime", None)
    monkeypatch.setattr(tensorrt_backend._Logs, "logger", None)
    folder = tmp_path / "engines" / "unet"
    folder.mkdir(parents=True)
    good, damaged, empty = folder / "good.plan", folder / "damaged.plan", folder / "empty.plan"
    good.write_bytes(fake_tensorrt.plan_bytes(RANGES))
    damaged.write_bytes(b"\x00" * 64)
    empty.write_bytes(b"")
    engine = tensorrt_backend.deserialize_plan(good)
    assert tuple(engine.get_tensor_shape("sample")) == (-1, 4, -1, -1)  # read as trt.Dims
    with pytest.raises(EngineDirError) as refused:
        tensorrt_backend.deserialize_plan(damaged)
    assert str(refused.value).startswith(
        f"{damaged}: TensorRT {trt.__version__} cannot load this plan (IRuntime::deserializeCudaEngine: Error Code 1: "
        "Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)); it is "
        "damaged or was built by another TensorRT version or GPU: rebuild it with `sdexport build")
    with pytest.raises(EngineDirError, match=r"cannot load this plan \(empty or unrecognized file\)"):
        tensorrt_backend.deserialize_plan(empty)  # (the last error does not linger)
    tensorrt_backend._Logs.logger.log(trt.ILogger.Severity.WARNING, "Using an engine plan file across devices")
    assert "TensorRT: Using an engine plan file across devices" in " ".join(capsys.readouterr().err.split())


def test_a_timing_cache_in_a_read_only_folder_is_read_and_the_build_goes_on(trt, tiny_fp16_engine_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """The default cache lies in the user cache, which may be a read-only mount: the build failed on
    the temporary file beside it. It reads the cache, says it cannot update it, and builds."""
    from sdexport import output_dir

    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    cache = tmp_path / "mounted" / "timing.cache"
    tensorrt_build.build_engines(directory, components=["unet"], timing_cache=cache)
    before = cache.read_bytes()
    real = output_dir.unwritable
    monkeypatch.setattr(output_dir, "unwritable",  # (tests run as root, which any folder lets write)
                        lambda folder: "Read-only file system" if folder == cache.parent else real(folder))
    (result,) = tensorrt_build.build_engines(directory, components=["unet"], timing_cache=cache, force=True)
    assert result.status == "built" and recorder.builds[-1]["load_timing_cache"].name == str(cache)
    assert cache.read_bytes() == before and sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]
    assert (f"--timing-cache {cache} cannot be written (Read-only file system): read where it exists, not updated"
            in " ".join(capsys.readouterr().err.split()))


def test_a_profile_of_one_shape_is_keyed_static_as_static_builds_are(tiny_engine_dir, tmp_path, monkeypatch):
    """``--profile`` collapsed to one point builds what ``--static`` builds: the key says static either
    way, so the second is reused (and ``inspect`` labels it static shapes), not rebuilt."""
    from sdexport.build.profiles import static_profile
    from sdexport.manifest import load_manifest

    trt = fake_tensorrt.make_tensorrt("10.13.3.9")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    recorder = Recorder(trt)
    recorder.install(monkeypatch)
    directory = _copy(tiny_engine_dir, tmp_path)
    one_point = static_profile(load_manifest(directory).shape_profile)
    (first,) = tensorrt_build.build_engines(directory, components=["unet"], profile=one_point)
    assert first.status == "built" and first.key.static
    (again,) = tensorrt_build.build_engines(directory, components=["unet"], static=True)
    assert again.status == "cached" and len(recorder.builds) == 1


# From mutation testing round 6


def test_the_fallback_vae_is_held_to_its_parts_plan_whatever_order_the_names_come_in(trt, tiny_fp16_engine_dir,
                                                                                     tmp_path, monkeypatch):
    """The fp32 rerun of an fp16 overflow must serve every shape its part's plan serves: chosen
    before that part (the names in another order), it would be chosen for no shapes at all and
    fail the first call its narrower plan does not cover."""
    from sdexport.manifest import load_manifest
    from sdexport.runtime.plan_choice import choose_plans

    Recorder(trt).install(monkeypatch)
    directory = _copy(tiny_fp16_engine_dir, tmp_path)
    exported = load_manifest(directory, verify_files=False).shape_profile
    low = exported.height[0]
    tensorrt_build.build_engines(directory, components=["vae_decoder_fp32"],
                                 profile=exported.with_ranges(height=f"{low}:{low}:{low}"))
    (built,) = tensorrt_build.build_engines(directory, components=["vae_decoder"])  # the export's whole profile
    manifest = load_manifest(directory, verify_files=False)
    here = {"tensorrt_version": built.key.tensorrt_version, "gpu_name": built.key.gpu_name,
            "compute_capability": built.key.compute_capability}
    fallback = {"vae_decoder_fp32": "vae_decoder"}
    for names in (["vae_decoder", "vae_decoder_fp32"], ["vae_decoder_fp32", "vae_decoder"]):
        assert list(choose_plans(directory, manifest, names, fallback, **here)) == ["vae_decoder"], names

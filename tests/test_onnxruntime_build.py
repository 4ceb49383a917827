"""``sdexport build --target onnxruntime-cuda``: onnxruntime's SD fusions, checked on the CPU.

The fused graph's CUDA-only operators (GroupNorm, NhwcConv, BiasSplitGelu, ...) cannot run here, so
these tests check its structure (fused-operator counts against the architecture), run the CPU
variant of the same fusions against the portable graph, and check what the build records and how
the runtime picks the graphs. tests/test_gpu_runtime.py runs the fused graphs on a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import run_cli
from sdexport.build import onnxruntime_build as ob
from sdexport.errors import EngineDirError, SdexportError
from sdexport.export import graph
from sdexport.export.inputs import sample_inputs
from sdexport.manifest import load_manifest, sha256_file
from sdexport.specs import component

pytestmark = pytest.mark.usefixtures("without_gpu")


@pytest.fixture(scope="module")
def built_dir(tiny_fp16_engine_dir: Path, tmp_path_factory) -> Path:
    """An fp16 export with its ONNX Runtime CUDA graphs (built once for the module)."""
    out = tmp_path_factory.mktemp("ort-built") / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, out)
    assert run_cli("build", out, "--target", "onnxruntime-cuda") == 0
    return out


def _run(path: Path, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(names, feed)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _feed(name: str, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
    from sdexport.specs import ModelDims

    spec = component("sd", name)
    dims = ModelDims(S=77, E=32, P=32, C=4, vae_scale_factor=2, unet_downsample=2)
    return sample_inputs(spec, dims.sizes(2, 64, 64, chunks), vocab_size=256, seed=seed)


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_widening_an_fp16_graph_gives_the_fp32_graph_back(tiny_engine_dir: Path, tiny_fp16_engine_dir: Path, name: str, tmp_path):
    """The fusions need fp32: an fp16 export is widened, to the same structure as an fp32 export
    and to the values its fp16 weights hold."""
    fp32 = onnx.load(str(tiny_engine_dir / name / "model.onnx"))
    widened = graph.to_fp32(onnx.load(str(tiny_fp16_engine_dir / name / "model.onnx")))
    assert _ops(widened) == _ops(fp32)
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in widened.graph.initializer)
    onnx.checker.check_model(widened, full_check=True)
    graph.save(widened, tmp_path / "w.onnx")
    spec = component("sd", name)
    feed = _feed(name)
    got = _run(tmp_path / "w.onnx", feed, spec.output_names)
    want = _run(tiny_fp16_engine_dir / name / "model.onnx", feed, spec.output_names)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-2  # the same weights, computed in fp32 instead of fp16


def test_widening_reaches_fp16_graph_io_and_constant_nodes(tmp_path):
    """An adopted fp16 graph (optimum's) has fp16 inputs and outputs and Constant nodes that sdexport's
    own exports fold away: widened, each is float32, with the values the fp16 graph computes."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([[0.5, -1.25], [2.0, 0.375]], dtype=np.float16)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "adopted", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2])]), opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[1.5, -3.0]], dtype=np.float16)
    graph.save(model, tmp_path / "fp16.onnx")
    want = _run(tmp_path / "fp16.onnx", {"x": x}, ["y"])[0]

    widened = graph.to_fp32(model)
    assert [v.type.tensor_type.elem_type for v in (*widened.graph.input, *widened.graph.output)] == [TensorProto.FLOAT] * 2
    assert widened.graph.node[0].attribute[0].t.data_type == TensorProto.FLOAT
    onnx.checker.check_model(widened, full_check=True)
    graph.save(widened, tmp_path / "fp32.onnx")
    got = _run(tmp_path / "fp32.onnx", {"x": x.astype(np.float32)}, ["y"])[0]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))  # (values exact in fp16)


def test_unet_fusions_match_the_architecture(tiny_engine_dir: Path, tiny_model):
    """One MultiHeadAttention per attention module (self and cross in every transformer block), one
    NhwcConv per convolution, one BiasSplitGelu per GEGLU: a pattern hidden by the export's constant
    folding (the attention scale chain, say) would show here as a smaller count."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    unet = tiny_model.module("unet")
    portable = onnx.load(str(tiny_engine_dir / "unet" / "model.onnx"))
    fused, stats = ob.fuse(onnx.load(str(tiny_engine_dir / "unet" / "model.onnx")), "unet", fp16=True)
    attention = sum(isinstance(m, Attention) for m in unet.modules())
    assert attention > 0
    assert stats["MultiHeadAttention"] + stats.get("Attention", 0) == attention
    assert stats["NhwcConv"] == _ops(portable)["Conv"]
    assert stats["BiasSplitGelu"] == sum(isinstance(m, GEGLU) for m in unet.modules())
    assert stats["GroupNorm"] + stats["SkipGroupNorm"] == _ops(portable)["InstanceNormalization"]
    assert stats["BiasAdd"] > 0
    assert _ops(fused)["Softmax"] == 0  # no attention left unfused
    assert any(o.domain == ob.CONTRIB_DOMAIN for o in fused.opset_import)


def test_vae_fusions_cover_every_convolution_and_resnet_group_norm(tiny_engine_dir: Path, tiny_model):
    """onnxruntime's VAE attention fusion matches the pre-SDPA pattern only, so the mid-block
    attention (and the GroupNorm in front of it) stays unfused: one block, run once per image."""
    from diffusers.models.attention_processor import Attention

    portable = onnx.load(str(tiny_engine_dir / "vae_decoder" / "model.onnx"))
    _, stats = ob.fuse(onnx.load(str(tiny_engine_dir / "vae_decoder" / "model.onnx")), "vae", fp16=True)
    attention = sum(isinstance(m, Attention) for m in tiny_model.module("vae").decoder.modules())
    assert stats["NhwcConv"] == _ops(portable)["Conv"]
    assert stats["GroupNorm"] + stats["SkipGroupNorm"] == _ops(portable)["InstanceNormalization"] - attention


@pytest.mark.parametrize(("name", "model_type"), [("unet", "unet"), ("vae_decoder", "vae"), ("text_encoder", "clip")])
def test_cpu_variant_of_the_fusions_matches_the_portable_graph(tiny_engine_dir: Path, name, model_type, tmp_path):
    """The fusions onnxruntime can run on a CPU (attention among them for the U-Net) compute what the
    portable graph computes; the U-Net's attention at two prompt chunks too (its text axis is dynamic)."""
    fused, stats = ob.fuse(onnx.load(str(tiny_engine_dir / name / "model.onnx")), model_type, fp16=False, gpu=False)
    if name == "unet":
        assert stats["MultiHeadAttention"] > 0
    assert not any(stats.get(op) for op in ("GroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd", "SkipGroupNorm"))
    graph.save(fused, tmp_path / "fused.onnx")
    spec = component("sd", name)
    for chunks in (1, 2) if name == "unet" else (1,):
        feed = _feed(name, seed=3, chunks=chunks)
        for g, w in zip(_run(tmp_path / "fused.onnx", feed, spec.output_names),
                        _run(tiny_engine_dir / name / "model.onnx", feed, spec.output_names)):
            assert _rel(g, w) < 1e-4


def test_the_fp16_fused_graph_keeps_float32_io_and_the_fp32_timestep(built_dir: Path):
    model = onnx.load(str(built_dir / "unet" / "onnxruntime-cuda" / "model.onnx"))
    onnx.checker.check_model(model)
    float_io = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
                if v.name != "timestep"]
    assert set(float_io) == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # the sinusoidal projection stays float32: the timestep is not rounded to fp16 on its way in
    # (fp16 holds t near 1000 only to 0.5)
    uses = [n for n in model.graph.node if "timestep" in n.input]
    assert uses and not [n for n in uses if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]
    counts = _ops(model)
    assert counts["MultiHeadAttention"] > 0 and counts["NhwcConv"] > 0 and counts["GroupNorm"] > 0


@pytest.mark.parametrize("where", ["unet/model.onnx", "unet/onnxruntime-cuda/model.onnx"])
def test_no_graph_rounds_the_timestep_to_fp16(built_dir: Path, where: str):
    """fp16 holds t near 1000 only to 0.5: the float32 projection must read the float32 input itself,
    not a round trip through fp16 at the graph's edge (the fp16 converter's default)."""
    model = onnx.load(str(built_dir / where))
    uses = [n for n in model.graph.node if "timestep" in n.input]
    assert uses
    assert not [n for n in uses if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]


def test_the_build_records_artifacts_fusions_and_parity(tiny_fp16_engine_dir: Path, built_dir: Path, capsys, monkeypatch):
    manifest = load_manifest(built_dir)  # every hash checks, the layout is closed
    before = load_manifest(tiny_fp16_engine_dir)
    for name, entry in manifest.components.items():
        record = entry.optimized[ob.TARGET]
        assert record["onnx"] == f"{name}/onnxruntime-cuda/model.onnx"
        assert record["onnx"] in manifest.files
        assert record["dtype"] == ("fp32" if name == "vae_decoder_fp32" else "fp16")
        assert record["parity"]["status"] == "passed-cpu-variant"  # not "passed": the graph itself has not run
        assert record["parity"]["provider"] == "CPUExecutionProvider"
        assert "CPU variant" in record["parity"]["variant"]
        assert record["onnxruntime"] == ort.__version__
        # the portable graph is untouched
        assert manifest.files[entry.onnx] == before.files[entry.onnx] == sha256_file(built_dir / entry.onnx)
    assert manifest.components["unet"].optimized[ob.TARGET]["fusions"]["MultiHeadAttention"] > 0
    from sdexport.console import out

    monkeypatch.setattr(out, "_width", 250)  # a row a line
    capsys.readouterr()
    assert run_cli("inspect", built_dir) == 0
    shown = capsys.readouterr().out  # a table of the fused graphs: what each fused and how it was checked
    assert "ONNX Runtime CUDA graphs (sdexport build --target onnxruntime-cuda)" in shown
    *_, unet = (line for line in shown.splitlines() if line.count("│") >= 6 and line.split("│")[1].strip() == "unet")
    assert "MultiHeadAttention" in unet and "passed-cpu-variant" in unet and "CPU variant" in unet


def test_a_second_build_reuses_and_force_rebuilds(built_dir: Path, tmp_path: Path, capsys):
    """The text encoder stands for every component here: its fusions take a second, the U-Net's ten."""
    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 0
    assert "cached" in capsys.readouterr().out
    before = load_manifest(copy).components["text_encoder"].optimized[ob.TARGET]["built"]
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder", "--force") == 0
    assert "--force" in capsys.readouterr().out
    manifest = load_manifest(copy)
    assert manifest.components["text_encoder"].optimized[ob.TARGET]["built"] >= before
    assert not list((copy / "text_encoder").glob(".*.tmp"))  # no staging left behind


def test_a_damaged_or_stale_fused_graph_is_rebuilt(built_dir: Path, tmp_path: Path):
    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    manifest = load_manifest(copy)
    wanted = {"source_sha256": manifest.components["unet"].optimized[ob.TARGET]["source_sha256"],
              "dtype": "fp16", "onnxruntime": ort.__version__}
    assert ob._rebuild_reasons(copy, manifest, "unet", wanted, False) == []
    # fused on a CPU-only machine, checked through its CPU variant: on a GPU it is built and checked
    # itself (it was "cached" there, its parity on CUDA never run)
    assert manifest.components["unet"].optimized[ob.TARGET]["parity"]["status"] == "passed-cpu-variant"
    assert "checked through its CPU variant only" in ob._rebuild_reasons(copy, manifest, "unet", wanted, False,
                                                                           on_cuda=True)[0]
    assert ob._rebuild_reasons(copy, manifest, "unet", {**wanted, "source_sha256": "0" * 64}, False)[0].startswith(
        "source_sha256")
    (copy / "unet" / "onnxruntime-cuda" / "model.onnx").write_bytes(b"damaged")
    assert "damaged" in ob._rebuild_reasons(copy, manifest, "unet", wanted, False)[0]


def test_files_the_user_put_in_the_target_folder_are_not_replaced(built_dir: Path, tmp_path: Path, capsys,
                                                                   monkeypatch):
    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    mine = copy / "unet" / "onnxruntime-cuda" / "notes.txt"
    mine.write_text("mine")
    # refused before anything is built, not after (minutes on SD 1.5)
    monkeypatch.setattr(ob, "_build_one", lambda *args, **kwargs: pytest.fail("built before refusing"))
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder,unet", "--force") == 2
    assert "did not write" in capsys.readouterr().err
    assert mine.read_text() == "mine"
    assert not list((copy / "unet").glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_link_where_the_target_folder_goes_is_refused_before_the_build(
        tiny_fp16_engine_dir: Path, tmp_path: Path, capsys, monkeypatch, kind):
    """Found only after the manifest listed the new graph, when the old folder was to go: a file left
    a directory whose graph was listed and missing (and every build failed the same way), a link one
    every command refused (an audit). Refused before anything is fused; the directory still runs."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, copy)
    where = copy / "text_encoder" / "onnxruntime-cuda"
    if kind == "file":
        where.write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        where.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(ob, "_build_one", lambda *args, **kwargs: pytest.fail("built before refusing"))
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{where} is a {'file' if kind == 'file' else 'symbolic link'}, not a folder sdexport wrote" in err, err
    assert run_cli("inspect", copy) == 0


def test_a_file_put_there_during_the_build_is_not_replaced_either(built_dir: Path, tmp_path: Path, monkeypatch):
    """The folder is checked again when the built graph moves in: the build takes minutes on SD 1.5."""
    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    mine = copy / "text_encoder" / "onnxruntime-cuda" / "notes.txt"
    build_one = ob._build_one

    def meanwhile(*args, **kwargs):
        record = build_one(*args, **kwargs)
        mine.write_text("mine")
        return record

    monkeypatch.setattr(ob, "_build_one", meanwhile)
    with pytest.raises(EngineDirError, match="did not write"):
        ob.build_onnxruntime(copy, components=["text_encoder"], force=True)
    assert mine.read_text() == "mine"
    assert not list((copy / "text_encoder").glob(".*.tmp"))


@pytest.mark.parametrize("flags", [["--static"], ["--batch", "1"], ["--refittable"], ["--optimization-level", "3"],
                                   ["--optimization-level", "0"]])  # (0 == False: it was taken, unsaid)
def test_tensorrt_only_settings_are_refused_for_onnxruntime(tiny_fp16_engine_dir: Path, flags, capsys):
    assert run_cli("build", tiny_fp16_engine_dir, "--target", "onnxruntime-cuda", *flags) == 2
    err = capsys.readouterr().err
    assert "TensorRT build settings" in err and len(err.strip().splitlines()) == 1


def test_a_graph_whose_recorded_precision_is_wrong_is_refused_before_it_is_fused(tiny_fp16_engine_dir: Path,
                                                                                 tmp_path: Path, capsys):
    """The build widens an fp16 graph by its recorded dtype: an fp16 graph recorded as fp32 was fused
    as one (onnxruntime failed inside, with a traceback)."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["components"]["vae_decoder"]["dtype"] = "fp32"
    (copy / "manifest.json").write_text(json.dumps(data))
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "vae_decoder") == 2
    assert "its weights are fp16, but the manifest's components.vae_decoder.dtype is fp32" in capsys.readouterr().err
    assert not (copy / "vae_decoder" / ob.TARGET).exists()


def test_an_unknown_target_is_one_line(tiny_fp16_engine_dir: Path, capsys):
    assert run_cli("build", tiny_fp16_engine_dir, "--target", "openvino") == 2
    assert "--target 'openvino'" in capsys.readouterr().err


def test_the_runtime_picks_the_fused_graphs_for_onnxruntime_cuda_only(built_dir: Path):
    from sdexport.runtime.loading import graph_for

    manifest = load_manifest(built_dir, verify_files=False)
    assert graph_for(manifest, "unet", "onnxruntime-cuda") == "unet/onnxruntime-cuda/model.onnx"
    assert graph_for(manifest, "unet", "onnxruntime-cuda", "portable") == "unet/model.onnx"
    assert graph_for(manifest, "unet", "onnxruntime-cpu") == "unet/model.onnx"


def test_the_runtime_hashes_the_graphs_it_runs(built_dir: Path, tmp_path: Path):
    from sdexport.errors import EngineDirError
    from sdexport.runtime.loading import verify_for_backend

    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    (copy / "unet" / "onnxruntime-cuda" / "model.onnx").write_bytes(b"damaged")
    manifest = load_manifest(copy, verify_files=False)
    verify_for_backend(copy, manifest, "onnxruntime-cpu")  # does not read the fused graph
    verify_for_backend(copy, manifest, "onnxruntime-cuda", "portable")
    with pytest.raises(EngineDirError, match="onnxruntime-cuda/model.onnx"):
        verify_for_backend(copy, manifest, "onnxruntime-cuda")


def test_the_cpu_backend_still_runs_a_built_directory(built_dir: Path, tmp_path: Path):
    assert run_cli("run", built_dir, "-p", "a cat", "--steps", "2", "--backend", "onnxruntime-cpu",
                   "-o", tmp_path / "a.png") == 0
    assert (tmp_path / "a.png").is_file()


def test_cuda_provider_options():
    from sdexport.runtime.onnxruntime_backend import cuda_provider_options

    plain = cuda_provider_options(0, 1234)
    assert plain["user_compute_stream"] == "1234" and "prefer_nhwc" not in plain and "enable_cuda_graph" not in plain
    fused = cuda_provider_options(1, 5, fused=True, cuda_graph=True, extra={"sdpa_kernel": "2"})
    assert fused["device_id"] == "1" and fused["prefer_nhwc"] == "1" and fused["enable_cuda_graph"] == "1"
    assert fused["sdpa_kernel"] == "2"
    assert all(isinstance(v, str) for v in fused.values())


def test_provider_options_sdexport_sets_itself_are_refused_from_the_python_api_too():
    """``load_pipeline(provider_options=...)`` reaches the sessions without the CLI's check: an option
    that would undo the pipeline's stream or CUDA graphs is refused where the options are made."""
    from sdexport.runtime.onnxruntime_backend import cuda_provider_options

    for option in ("user_compute_stream", "enable_cuda_graph", "device_id"):
        with pytest.raises(SdexportError, match=f"^--ort-option {option}: set by sdexport itself"):
            cuda_provider_options(0, 1234, extra={option: "0"})


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "onnxruntime-cpu", "--cuda-graph"], "--cuda-graph: for --backend tensorrt or onnxruntime-cuda"),
    (["--backend", "onnxruntime-cpu", "--portable-graphs"], "--portable-graphs: for --backend onnxruntime-cuda"),
    (["--ort-option", "sdpa_kernel"], "expected KEY=VALUE"),
    (["--ort-option", "enable_cuda_graph=1"], "set by sdexport itself"),
    (["--ort-option", "user_compute_stream=0"], "set by sdexport itself"),
])
def test_run_refuses_onnxruntime_cuda_options_elsewhere(built_dir: Path, tmp_path: Path, args, message, capsys):
    assert run_cli("run", built_dir, "-p", "a cat", "-o", tmp_path / "a.png", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_numpy_scalar_compat_leaves_onnxruntime_as_it_was():
    from onnxruntime.transformers import onnx_model_unet

    before = onnx_model_unet.FusionAttentionUnet.__dict__["get_num_heads"]
    with ob.numpy_scalar_compat():
        pass
    assert onnx_model_unet.FusionAttentionUnet.__dict__["get_num_heads"] is before


def test_the_manifest_schema_knows_the_record(built_dir: Path):
    data = json.loads((built_dir / "manifest.json").read_text())
    data["components"]["unet"]["optimized"]["tensorrt"] = data["components"]["unet"]["optimized"][ob.TARGET]
    from sdexport.manifest_schema import SCHEMA, first_error

    assert "tensorrt" in (first_error(SCHEMA, data) or "")


def test_a_fused_graph_that_disagrees_with_the_reference_is_not_kept(tiny_fp16_engine_dir: Path, tmp_path: Path,
                                                                      monkeypatch):
    """Parity beyond the tolerance refuses the build, naming the component, the point and the error,
    and leaves the directory as it was: no fused graph, no record of one for the runtime to pick."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, copy)
    real = ob.parity

    def disagreeing(*args, **kwargs):
        report = real(*args, **kwargs)
        point = report["points"][0]
        output = next(iter(point["outputs"]))
        point["outputs"][output]["rel_l2"] = 1.0
        point["status"] = report["status"] = "failed"
        return report

    monkeypatch.setattr(ob, "parity", disagreeing)
    with pytest.raises(SdexportError, match=r"^text_encoder: the fused graph disagrees with the fp32 reference .*"
                                            r"min: \w+ rel-L2 1\.00e\+00.*nothing was kept"):
        ob.build_onnxruntime(copy, components=["text_encoder"])
    assert not load_manifest(copy).components["text_encoder"].optimized
    assert not (copy / "text_encoder" / ob.TARGET).exists() and not list((copy / "text_encoder").glob(".*.tmp"))


def test_parity_fails_where_any_output_is_off_though_the_others_agree(tiny_engine_dir: Path, tmp_path: Path):
    """Every output of a point is held to the tolerance: a candidate whose pooled output alone is off
    (its hidden states exact) fails the point and the check, naming that output."""
    from onnx import helper

    reference = tiny_engine_dir / "text_encoder" / "model.onnx"
    model = onnx.load(str(reference))
    pooled = next(o for o in model.graph.output if o.name == "pooler_output")
    for node in model.graph.node:  # the pooled output, doubled on its way out
        node.output[:] = ["pooled_raw" if name == pooled.name else name for name in node.output]
        node.input[:] = ["pooled_raw" if name == pooled.name else name for name in node.input]
    two = helper.make_tensor("two", onnx.TensorProto.FLOAT, [], [2.0])
    model.graph.initializer.append(two)
    model.graph.node.append(helper.make_node("Mul", ["pooled_raw", "two"], [pooled.name]))
    candidate = tmp_path / "model.onnx"
    onnx.save(model, str(candidate))
    report = ob.parity(component("sd", "text_encoder"), reference, candidate,
                       manifest=load_manifest(tiny_engine_dir, verify_files=False), provider="CPUExecutionProvider",
                       dtype="fp32", variant="a candidate")
    (point,) = report["points"]
    assert point["outputs"]["last_hidden_state"]["rel_l2"] == 0 and point["outputs"]["pooler_output"]["rel_l2"] > 0.5
    assert point["status"] == report["status"] == "failed"
    with pytest.raises(SdexportError, match=r"min: pooler_output rel-L2") as info:
        ob._require_parity("text_encoder", report)
    assert "last_hidden_state" not in str(info.value)


def test_an_interrupted_build_leaves_nothing_that_blocks_the_next(built_dir: Path, tmp_path: Path):
    """A build killed while staging leaves ``.onnxruntime-cuda.PID.tmp``: the next build removes
    it, and meanwhile the directory still counts as sdexport's (export --force may replace it)."""
    from sdexport.manifest import not_an_engine_dir

    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    leftover = copy / "unet" / ".onnxruntime-cuda.99999.tmp"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    assert not_an_engine_dir(copy) is None
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 0
    assert not leftover.exists()
    mine = copy / "unet" / ".onnxruntime-cuda.my-experiment.tmp"  # named like one, not one: the user's
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 0
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_built_graph_listed_and_missing_is_named_as_a_stopped_builds(built_dir: Path, tmp_path: Path, capsys):
    """A build stopped between its manifest and moving its folder in lists a fused graph it lacks:
    inspect said "listed in the manifest but missing" and no more (an audit's finding); it says to
    build again, which mends it. A missing exported file says no such thing."""
    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    fused = copy / "text_encoder" / "onnxruntime-cuda"
    shutil.rmtree(fused)
    capsys.readouterr()
    assert run_cli("inspect", copy) == 2
    assert capsys.readouterr().err.endswith("text_encoder/onnxruntime-cuda/model.onnx is listed in the manifest but "
                                            "missing (a build stopped part-way? run `sdexport build` again)\n")
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 0
    assert run_cli("inspect", copy) == 0
    (copy / "text_encoder" / "model.onnx").unlink()
    capsys.readouterr()
    assert run_cli("inspect", copy) == 2
    assert capsys.readouterr().err.endswith("text_encoder/model.onnx is listed in the manifest but missing\n")


def test_fp32_builds_an_fp32_fused_graph_and_says_why_it_rebuilt(built_dir: Path, tmp_path: Path):
    """``build --fp32`` on an fp16 export: the fused graph stays fp32 (no build tested fp16=False)."""
    import onnx

    from sdexport.build.onnxruntime_build import build_onnxruntime
    from sdexport.manifest import load_manifest

    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    (result,) = build_onnxruntime(copy, components=["text_encoder"], fp16=False)
    assert result.status == "built" and "dtype fp16 != fp32" in result.reasons
    record = load_manifest(copy).components["text_encoder"].optimized["onnxruntime-cuda"]
    assert record["dtype"] == "fp32"
    graph = onnx.load(str(copy / record["onnx"]))
    assert not [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]


def test_the_scratch_folder_is_inside_the_staging_folder(built_dir: Path, tmp_path: Path, monkeypatch):
    """The fp32 reference (a whole U-Net) is written in a scratch folder: in /tmp, a build killed
    there left it for good; in the staging folder, the next build removes it with the rest."""
    from sdexport.build import onnxruntime_build

    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    real, seen = onnxruntime_build.parity, []

    def parity(*args, **kwargs):
        seen.append(Path.cwd())
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime_build, "parity", parity)
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder", "--force") == 0
    assert len(seen) == 1 and seen[0].parent.name.startswith(".onnxruntime-cuda.")
    assert seen[0].parent.parent == (copy / "text_encoder").resolve() and not seen[0].parent.exists()


def test_a_stopped_build_says_which_components_it_had_built(tiny_fp16_engine_dir: Path, tmp_path: Path,
                                                              monkeypatch, capsys):
    """Those are listed and in place, and the next build reuses them: the user should hear so rather
    than take the stop for a loss of everything (it said only "interrupted")."""
    from sdexport.build import onnxruntime_build

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, copy)
    real = onnxruntime_build._build_one

    def stopped_at_the_unet(engine_dir, manifest, spec, dtype, on_cuda):
        if spec.name == "unet":
            raise KeyboardInterrupt
        return real(engine_dir, manifest, spec, dtype, on_cuda)

    monkeypatch.setattr(onnxruntime_build, "_build_one", stopped_at_the_unet)
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder,unet") == 130
    said = " ".join(capsys.readouterr().err.split())
    assert "interrupted; already built: text_encoder (a build run again reuses them)" in said
    monkeypatch.setattr(onnxruntime_build, "_build_one", real)
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 0
    assert "✓ text_encoder: cached" in capsys.readouterr().err


def test_shape_inference_sees_no_weights_and_types_the_same(tiny_engine_dir: Path, monkeypatch):
    """onnxruntime's symbolic shape inference copies the model it is given: it gets a weightless
    copy (for an SD 1.5 U-Net the difference is 3.4 GB per inference), with the same result."""
    import copy

    fused, _ = ob.fuse(onnx.load(str(tiny_engine_dir / "unet" / "model.onnx")), "unet", fp16=True)
    normal = ob.to_fp16_fused(copy.deepcopy(fused), ["timestep"])
    monkeypatch.setattr(ob, "WEIGHTLESS_ABOVE", 4)  # the tiny model's weights are all small
    skeleton = ob.weightless(fused)
    assert sum(len(t.raw_data) for t in skeleton.graph.initializer) < 0.01 * sum(
        len(t.raw_data) for t in fused.graph.initializer)
    assert [(t.name, list(t.dims), t.data_type) for t in skeleton.graph.initializer] == [
        (t.name, list(t.dims), t.data_type) for t in fused.graph.initializer]
    stripped = ob.to_fp16_fused(copy.deepcopy(fused), ["timestep"])
    assert [(n.op_type, list(n.input)) for n in stripped.graph.node] == [(n.op_type, list(n.input)) for n in normal.graph.node]
    refused, _ = ob.fuse(onnx.load(str(tiny_engine_dir / "unet" / "model.onnx")), "unet", fp16=True)
    assert _ops(refused) == _ops(fused)  # the fusion passes' own inferences ran weightless too


def test_sessions_on_cuda_are_made_without_onnxruntimes_silent_cpu_fallback(tiny_engine_dir: Path, monkeypatch):
    """ORT's Python layer catches a CUDA provider that throws while the session is made, prints a
    banner to stdout and makes a CPU session; the parity check asks it not to, and says the cause."""
    made = []

    class Session:
        def __init__(self, path, options, providers, **kwargs):
            if any("CUDA" in str(p) for p in providers):
                made.append(kwargs)
                raise RuntimeError("bad provider option")

    monkeypatch.setattr(ort, "InferenceSession", Session)
    graph_path = tiny_engine_dir / "unet" / "model.onnx"
    with pytest.raises(SdexportError, match=r"cannot load the graphs to compare them \(bad provider option\)"):
        ob.parity(component("sd", "unet"), graph_path, graph_path, manifest=load_manifest(tiny_engine_dir, verify_files=False),
                  provider="CUDAExecutionProvider", dtype="fp32", variant="the fused graph")
    assert made == [{"enable_fallback": 0}]


def test_every_graph_is_checked_before_the_first_is_fused(tiny_engine_dir: Path, tmp_path: Path, capsys):
    """A damaged U-Net graph was found only when its turn came, after the text encoder's fusing
    (minutes on SD) had been spent and written."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, copy)
    with (copy / "unet" / "model.onnx").open("r+b") as handle:
        handle.truncate(1000)
    assert run_cli("build", copy, "--target", "onnxruntime-cuda") == 2
    assert "unet/model.onnx does not match its sha256" in capsys.readouterr().err
    assert not any(copy.glob(f"*/{ob.TARGET}"))


def test_the_built_directory_fuses_what_the_architecture_has(built_dir: Path, tiny_model):
    """The counts the build recorded for the fp16 export (widened, fused, converted): the same as the
    architecture's, for the U-Net and for CLIP (one QuickGelu and two SkipLayerNorms per layer)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    manifest = load_manifest(built_dir, verify_files=False)
    unet = manifest.components["unet"].optimized[ob.TARGET]["fusions"]
    modules = list(tiny_model.module("unet").modules())
    assert unet["MultiHeadAttention"] + unet.get("Attention", 0) == sum(isinstance(m, Attention) for m in modules)
    assert sum(isinstance(m, GEGLU) for m in modules) and not unet.get("BiasSplitGelu")  # (the tiny widths: below)
    layers = tiny_model.module("text_encoder").config.num_hidden_layers
    clip = manifest.components["text_encoder"].optimized[ob.TARGET]["fusions"]
    assert clip["QuickGelu"] == layers and clip["SkipLayerNormalization"] == 2 * layers


def test_fusions_whose_cuda_kernels_refuse_the_models_sizes_are_left_out(built_dir: Path, tiny_engine_dir: Path):
    """onnxruntime's BiasSplitGelu and BiasAdd CUDA kernels take Stable Diffusion's widths only (the
    tiny model's GEGLU of 256, its 32 channels: refused at run time on a GPU, where the CPU variant a
    build without CUDA checks has none of them): the build fuses again without them and records
    why; the rest stays fused, GroupNorm among it (the tiny model's groups hold even channels)."""
    fused, _ = ob.fuse(onnx.load(str(tiny_engine_dir / "unet" / "model.onnx")), "unet", fp16=False)
    limits = ob.kernel_limits(fused)
    assert limits == {"enable_bias_splitgelu": "BiasSplitGelu of hidden size 256 (the kernel takes 2560, 5120, 10240)",
                      "enable_bias_add": "BiasAdd of 32 channels (the kernel takes 320, 640, 1280)"}
    manifest = load_manifest(built_dir, verify_files=False)
    for name, entry in manifest.components.items():
        record = entry.optimized[ob.TARGET]
        graph_here = onnx.load(str(built_dir / record["onnx"]), load_external_data=False)
        assert ob.kernel_limits(graph_here) == {}, name
        assert set(record.get("left_out", {})) <= set(ob.GPU_ONLY_FUSIONS)
    unet = manifest.components["unet"].optimized[ob.TARGET]
    # the fp16 build packs Q, K and V too, which the tiny heads (4 wide) cannot be read packed at
    assert set(unet["left_out"]) == {*limits, "enable_packed_qkv", "enable_packed_kv"}
    assert unet["left_out"]["enable_packed_kv"] == ("MultiHeadAttention reading K and V packed, of head size 4 (its "
                                                    "kernels for that take a multiple of 8, at most 256)")
    assert unet["fusions"]["NhwcConv"] > 0 and unet["fusions"]["GroupNorm"] > 0 and unet["fusions"]["MultiHeadAttention"] > 0


def test_a_graph_fused_before_the_kernel_limits_is_built_again(tiny_fp16_engine_dir: Path, tmp_path: Path,
                                                                 monkeypatch, capsys):
    """A cached fused graph is checked against the limits too: one built before them (here: with
    the check turned off) would fail on the first GPU, so the next build replaces it."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, copy)
    real = ob.kernel_limits
    monkeypatch.setattr(ob, "kernel_limits", lambda model: {})
    ob.build_onnxruntime(copy, components=["unet", "text_encoder"])
    monkeypatch.setattr(ob, "kernel_limits", real)
    results = {r.component: r for r in ob.build_onnxruntime(copy, components=["unet", "text_encoder"])}
    unet, clip = results["unet"], results["text_encoder"]
    assert (unet.status, clip.status) == ("built", "cached")
    assert unet.reasons[0].startswith("fused with MultiHeadAttention reading Q, K and V packed, of head size 4")
    assert unet.reasons[0].endswith("which onnxruntime's CUDA kernel refuses")
    assert real(onnx.load(str(copy / ob.artifact_path("unet")), load_external_data=False)) == {}


def test_sd_sizes_pass_the_kernel_limits():
    """What the limits take: SD's widths (320, 640, 1280 channels in 32 groups; a GEGLU of 4 × 2 × 320)."""
    from onnx import TensorProto, helper

    def node(op: str, width: int, **attrs: int) -> onnx.ModelProto:
        bias = helper.make_tensor("w", TensorProto.FLOAT, [width], [0.0] * width)
        made = helper.make_node(op, ["x", "w"], ["y"], domain=ob.CONTRIB_DOMAIN, **attrs)
        return helper.make_model(helper.make_graph([made], "g", [], [], initializer=[bias]))

    assert all(ob.kernel_limits(node("GroupNorm", c, groups=32)) == {} for c in (320, 640, 960, 1280, 1920, 2560))
    why = "GroupNorm of 96 channels in 32 groups (the kernel takes an even number of channels per group, at most 512)"
    # (one kernel for both: without the skip fusion, the same norm would be fused as a GroupNorm)
    assert ob.kernel_limits(node("GroupNorm", 96, groups=32)) == {"enable_group_norm": why, "enable_skip_group_norm": why}
    assert ob.kernel_limits(node("GroupNorm", 64 * 1024, groups=32))  # more than a block holds
    assert all(ob.kernel_limits(node("BiasSplitGelu", h)) == {} for h in (2560, 5120, 10240))
    assert all(ob.kernel_limits(node("BiasAdd", c)) == {} for c in (320, 640, 1280))
    assert ob.kernel_limits(node("BiasAdd", 384)) == {"enable_bias_add": "BiasAdd of 384 channels (the kernel takes 320, 640, 1280)"}


def test_packed_attention_heads_up_to_256_wide_pass_the_kernel_limits():
    """Packed Q, K and V are taken at head sizes that are multiples of 8 up to 256 (flash's widest),
    256 itself included; one multiple of 8 past it is fused unpacked."""
    from onnx import TensorProto, helper

    def packed(head: int) -> onnx.ModelProto:
        shape = helper.make_tensor("shape", TensorProto.INT64, [5], [0, 0, 2, 3, head])
        reshape = helper.make_node("Reshape", ["qkv", "shape"], ["packed"])
        attention = helper.make_node("MultiHeadAttention", ["packed"], ["y"], domain=ob.CONTRIB_DOMAIN, num_heads=2)
        return helper.make_model(helper.make_graph([reshape, attention], "g", [], [], initializer=[shape]))

    assert ob.kernel_limits(packed(256)) == {} and ob.kernel_limits(packed(64)) == {}
    assert set(ob.kernel_limits(packed(264))) == {"enable_packed_qkv"}


def test_group_norms_of_up_to_512_channels_a_group_pass_the_kernel_limits():
    """The GroupNorm kernel's block holds 512 channels of a group: 512 itself is taken, 514 is not."""
    from onnx import TensorProto, helper

    def norm(channels: int) -> onnx.ModelProto:
        gamma = helper.make_tensor("gamma", TensorProto.FLOAT, [channels], [1.0] * channels)
        node = helper.make_node("GroupNorm", ["x", "gamma"], ["y"], domain=ob.CONTRIB_DOMAIN, groups=2)
        return helper.make_model(helper.make_graph([node], "g", [], [], initializer=[gamma]))

    assert ob.kernel_limits(norm(2 * 512)) == {}
    assert set(ob.kernel_limits(norm(2 * 514))) == {"enable_group_norm", "enable_skip_group_norm"}


def test_an_fp32_sdxl_vae_decoder_stays_fp32_in_an_fp16_build(tiny_sdxl_engine_dir: Path, tmp_path: Path):
    """SDXL's VAE sets force_upcast (diffusers decodes it in fp32), and an fp32 export has no fp32
    decoder to fall back on: its fused graph stays fp32 while the others are converted. (An fp16
    export's unused fp16 decoder is left out of builds: tests/test_tensorrt_fakes.py, same code.)"""
    fp32 = tmp_path / "fp32"
    shutil.copytree(tiny_sdxl_engine_dir, fp32)
    ob.build_onnxruntime(fp32, components=["text_encoder", "vae_decoder", "vae_encoder"])
    built = load_manifest(fp32).components
    dtypes = [built[n].optimized[ob.TARGET]["dtype"] for n in ("text_encoder", "vae_decoder", "vae_encoder")]
    assert dtypes == ["fp16", "fp32", "fp32"]  # diffusers' SDXL img2img upcasts the encoder too


def test_fp16_fused_sdxl_vae_graphs_from_before_the_rule_are_refused_at_load(
        tiny_sdxl_engine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """A directory fused before an fp32 export's force_upcast VAE stayed fp32 holds fp16 fused VAE
    graphs: the CUDA runtime (run, serve) refuses each it would load before any session, saying to
    rebuild (which now makes it fp32) or to run the portable graphs; inspect warns."""
    from sdexport.build import vae_upcast
    from sdexport.cli import _serve_settings
    from sdexport.runtime import providers
    from sdexport.runtime.loading import load_pipeline

    fp32 = tmp_path / "fp32"
    shutil.copytree(tiny_sdxl_engine_dir, fp32)
    with monkeypatch.context() as before:  # the build before the rule
        before.setattr(vae_upcast, "kept_fp32", lambda *_: ())
        ob.build_onnxruntime(fp32, components=["vae_decoder", "vae_encoder"])
    built = load_manifest(fp32).components
    assert [built[n].optimized[ob.TARGET]["dtype"] for n in ("vae_decoder", "vae_encoder")] == ["fp16", "fp16"]
    with pytest.raises(EngineDirError) as info:
        load_pipeline(fp32, "onnxruntime-cuda")
    message = str(info.value)
    assert "vae_decoder's ONNX Runtime CUDA graph was fused in fp16" in message and "\n" not in message
    assert f"sdexport build {fp32} --target onnxruntime-cuda` again" in message
    assert "(--backend onnxruntime-cuda --portable-graphs)" in message
    # serve: the backend as this machine resolves it (here made to have CUDA); what the message says works
    monkeypatch.setattr(providers, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EngineDirError, match="vae_decoder's ONNX Runtime CUDA graph was fused in fp16"):
        _serve_settings(fp32, "onnxruntime", False, False, 50, command="serve")
    _serve_settings(fp32, "onnxruntime-cuda", False, True, 50, command="serve")
    _serve_settings(fp32, "onnxruntime", False, False, 50, "/models/fp32", command="triton-repo")  # a repository for another server
    capsys.readouterr()
    assert run_cli("inspect", fp32, "--no-check") == 0
    said = " ".join(capsys.readouterr().out.split())
    assert all(f"{n}: its ONNX Runtime CUDA graph was fused in fp16" in said for n in ("vae_decoder", "vae_encoder"))
    monkeypatch.undo()
    load_pipeline(fp32, "onnxruntime-cpu").close()  # the portable graphs: nothing to refuse
    ob.build_onnxruntime(fp32, components=["vae_decoder"])  # the rebuild the message asks for
    assert load_manifest(fp32).components["vae_decoder"].optimized[ob.TARGET]["dtype"] == "fp32"
    with pytest.raises(EngineDirError, match="vae_encoder's ONNX Runtime CUDA graph was fused in fp16"):
        load_pipeline(fp32, "onnxruntime-cuda", image_inputs=True)


def test_an_export_without_built_graphs_writes_no_optimized_key(tiny_fp16_engine_dir: Path):
    """So sdexport releases from before this build target still read new exports."""
    data = json.loads((tiny_fp16_engine_dir / "manifest.json").read_text())
    assert all("optimized" not in entry for entry in data["components"].values())


def test_only_a_component_level_staging_folder_counts_as_ours(built_dir: Path, tmp_path: Path):
    from sdexport.manifest import not_an_engine_dir

    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    deep = copy / "unet" / "onnxruntime-cuda" / ".onnxruntime-cuda.1.tmp"
    deep.mkdir()
    (deep / "mine.txt").write_text("mine")
    assert not_an_engine_dir(copy) is not None


def test_a_build_keeps_a_users_folder_named_like_a_staging_folder_below_a_component(built_dir: Path, tmp_path: Path):
    """Builds stage ``<component>/.onnxruntime-cuda.PID.tmp`` and remove what a killed one left there;
    a folder of that name one level deeper is not theirs (``unlisted_files`` agrees) and stays."""
    copy = tmp_path / "tiny"
    shutil.copytree(built_dir, copy)
    deep = copy / "unet" / "onnxruntime-cuda" / ".onnxruntime-cuda.1.tmp"
    deep.mkdir()
    (deep / "mine.txt").write_text("mine")
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 0
    assert (deep / "mine.txt").read_text() == "mine"


def test_a_stop_while_a_component_goes_in_place_finishes_putting_it_there(tiny_fp16_engine_dir: Path, tmp_path: Path,
                                                                          monkeypatch, capsys):
    """A SIGTERM between the manifest's save and the folder's move left the manifest listing a unet
    folder that was not in place (inspect: "listed in the manifest but missing", an audit): the move
    finishes, and the stop says the component was built."""
    import signal

    from sdexport.build import onnxruntime_build

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_fp16_engine_dir, copy)
    real = onnxruntime_build.save_manifest

    def stopped_after_saving(engine_dir, manifest):
        real(engine_dir, manifest)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(onnxruntime_build, "save_manifest", stopped_after_saving)
    assert run_cli("build", copy, "--target", "onnxruntime-cuda", "--components", "text_encoder") == 130
    assert "already built: text_encoder" in " ".join(capsys.readouterr().err.split())
    monkeypatch.setattr(onnxruntime_build, "save_manifest", real)
    assert run_cli("inspect", copy) == 0

"""Every exported graph is valid ONNX: onnx's full check, which TensorRT's parser and polygraphy's
lint rely on (sorted nodes, consistent types, strict shape inference), for both families and precisions.

The exporter runs the same check and refuses to keep an invalid graph; these tests re-check the
files on disk, and prove that the check fires on the defect it was added for (fp16 conversion used
to leave its input casts at the end of the node list).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from sdexport.errors import SdexportError
from sdexport.export import graph

SHARED = {("tiny", "fp16"): "tiny_fp16_engine_dir", ("tiny-sdxl", "fp16"): "tiny_sdxl_fp16_engine_dir",
          ("tiny-sdxl", "fp32"): "tiny_sdxl_engine_dir"}
"""(model, dtype): the session's export of it (tests/conftest.py), made for other tests too."""


@pytest.fixture(scope="module", params=list(SHARED), ids=lambda p: "-".join(p))
def exported(request) -> tuple[str, str, Path]:
    model, dtype = request.param
    return model, dtype, request.getfixturevalue(SHARED[model, dtype])


def _graphs(directory: Path) -> list[Path]:
    found = sorted(directory.glob("*/model.onnx"))
    assert found
    return found


def test_every_graph_passes_the_full_check(exported):
    _, _, directory = exported
    for path in _graphs(directory):
        onnx.checker.check_model(str(path), full_check=True)


def test_tiny_fp32_graphs_pass_the_full_check(tiny_engine_dir: Path):
    for path in _graphs(tiny_engine_dir):
        onnx.checker.check_model(str(path), full_check=True)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    infos = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in infos}


def test_fp16_unet_projects_timesteps_in_float32(exported):
    """As diffusers does (``timesteps.float()``): fp16 would round t=979.6 to 979.5 before sin/cos."""
    model_name, dtype, directory = exported
    if dtype != "fp16":
        pytest.skip("fp32 export")
    model = onnx.load(str(directory / "unet" / "model.onnx"))
    types = _elem_types(model)
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    # SD: the timestep projection; SDXL: also the time-id projection.
    assert len(trig) == (4 if model_name == "tiny-sdxl" else 2)
    for node in trig:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    # ...and the layers after it are fp16, as before.
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert gemms and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in gemms)


def test_fp32_cone_stops_at_the_first_weighted_layer(tiny_engine_dir: Path):
    model = onnx.load(str(tiny_engine_dir / "unet" / "model.onnx"))
    cone = graph.fp32_cone(model, ["timestep"])
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {"Sin", "Cos"} <= {ops[name] for name in cone}
    assert not {"MatMul", "Gemm", "Conv"} & {ops[name] for name in cone}
    assert len(cone) < 20  # the projection only, not the network behind it
    assert graph.fp32_cone(model, []) == []


def test_fp32_cone_ends_at_a_weighted_layer_without_a_cast_before_it():
    """The exports' cone ends at diffusers' cast to the model's dtype; a graph without that cast (a
    float32 timestep straight into a Gemm) ends at the layer itself, not at the end of the network."""
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Sin", ["t"], ["s"], name="sin"), helper.make_node("Gemm", ["s", "w"], ["h"], name="gemm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "cone", [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.0] * 16)]))
    assert graph.fp32_cone(model, ["t"]) == ["sin"]


def test_an_unsorted_graph_is_refused_in_one_line(tiny_engine_dir: Path, tmp_path: Path):
    model = onnx.load(str(tiny_engine_dir / "vae_decoder" / "model.onnx"))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SdexportError, match="not valid ONNX.*topologically sorted") as info:
        graph.check(path)
    assert "\n" not in str(info.value)


def test_a_graph_whose_types_do_not_infer_is_refused_in_one_line(tmp_path: Path):
    """The full check's strict shape inference fails with its own error type (a float added to an
    int64): refused as an invalid export in one line, as the checker's own errors are."""
    from onnx import TensorProto, helper

    add = helper.make_node("Add", ["x", "n"], ["y"])
    model = helper.make_model(helper.make_graph(
        [add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                     helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SdexportError, match=rf"^{path}: the exported graph is not valid ONNX \(.*\); nothing was kept") as info:
        graph.check(path)
    assert "\n" not in str(info.value)


def test_fp16_latent_consistency_unet_is_valid(tmp_path: Path):
    """A latent consistency model's U-Net adds its ``timestep_cond`` projection to the timestep
    embedding before the first layer: the fp32 cone hands over at diffusers' cast before that Add
    (it was kept float32 against an fp16 operand, and the export failed the checker)."""
    from sdexport.export.exporter import ExportOptions, export

    export("tiny-lcm", tmp_path / "lcm", ExportOptions(dtype="fp16", verify="quick", components=["unet"]))
    model = onnx.load(str(tmp_path / "lcm" / "unet" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    types = _elem_types(model)
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in trig)

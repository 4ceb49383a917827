"""Export: dynamic shapes really work, parity is enforced, bad input fails cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import bench_refusal, run_cli
from sdexport.manifest import MANIFEST_NAME, load_manifest


def test_export_writes_a_complete_verified_directory(tiny_engine_dir: Path):
    manifest = load_manifest(tiny_engine_dir)
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert manifest.random_weights and "random weights" in manifest.model["label"]
    for name, entry in manifest.components.items():
        assert entry.parity["status"] == "passed", name
        assert entry.parity["tolerance"] == 1e-3, name  # fp32's bound, not fp16's 3e-2
        assert [p["label"] for p in entry.parity["points"]] == ["min", "opt", "max", "odd"]
        for point in entry.parity["points"]:
            for err in point["outputs"].values():
                assert err["rel_l2"] < 1e-3 and err["max_abs"] >= 0
        assert (tiny_engine_dir / entry.onnx).is_file()
    for sub in ("tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "unet/model.onnx"):
        assert sub in manifest.files
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(manifest.tools)
    assert not list(tiny_engine_dir.parent.glob(".tiny.partial-*"))


def test_the_manifest_names_the_onnxruntime_that_imports_where_two_are_installed(tmp_path, monkeypatch):
    """As on the GPU lease: the image's onnxruntime beside an onnxruntime-gpu put ahead on the path;
    or one installed over the other in one folder. Both packages' metadata is visible; the export
    used (and records) the one that imports: the one whose RECORD holds the module's file as it is."""
    import base64
    import hashlib
    import sys

    from sdexport.export.exporter import tool_versions

    def install(site: Path, name: str, version: str, code: str) -> None:
        (site / "onnxruntime").mkdir(parents=True, exist_ok=True)
        (site / "onnxruntime" / "__init__.py").write_text(code)
        digest = base64.urlsafe_b64encode(hashlib.sha256(code.encode()).digest()).rstrip(b"=").decode()
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"onnxruntime/__init__.py,sha256={digest},{len(code)}\n{info.name}/RECORD,,\n")

    install(tmp_path / "gpu", "onnxruntime_gpu", "1.31.1", "# the GPU build\n")
    install(tmp_path / "cpu", "onnxruntime", "1.30.0", "# the CPU build\n")
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)  # (found where it was imported from)
    path = sys.path.copy()
    for first, expected in ((["gpu", "cpu"], {"onnxruntime-gpu": "1.31.1"}), (["cpu"], {"onnxruntime": "1.30.0"})):
        monkeypatch.setattr(sys, "path", [str(tmp_path / site) for site in first] + path)
        assert {k: v for k, v in tool_versions().items() if k.startswith("onnxruntime")} == expected
    install(tmp_path / "cpu", "onnxruntime_gpu", "1.31.1", "# the GPU build\n")  # over the CPU one, one folder
    assert {k: v for k, v in tool_versions().items() if k.startswith("onnxruntime")} == {"onnxruntime-gpu": "1.31.1"}


def test_unet_graph_has_dynamic_batch_and_size(tiny_engine_dir: Path):
    model = onnx.load(str(tiny_engine_dir / "unet" / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", 4, "h", "w"]
    session = ort.InferenceSession(str(tiny_engine_dir / "unet" / "model.onnx"))
    for batch, side in ((1, 8), (3, 16)):
        feed = {
            "sample": np.zeros((batch, 4, side, side), np.float32),
            "timestep": np.array(10.0, np.float32),
            "encoder_hidden_states": np.zeros((batch, 77, 32), np.float32),
        }
        (out,) = session.run(None, feed)
        assert out.shape == (batch, 4, side, side)


def test_broken_export_fails_and_leaves_nothing(tmp_path: Path, monkeypatch, capsys):
    from sdexport.export.weight_store import WeightStore

    real_bytes = WeightStore.tensor_bytes
    scaled: list[str] = []

    def corrupt(self, tensor):  # scale the first convolution weight saved: a subtly wrong graph
        data = real_bytes(self, tensor)
        if len(tensor.dims) == 4 and not scaled:
            scaled.append(tensor.name)
            return (np.frombuffer(data, np.float32) * 1.5).tobytes()
        return data

    monkeypatch.setattr(WeightStore, "tensor_bytes", corrupt)
    out = tmp_path / "broken"
    code = run_cli("export", "tiny", "-o", out, "--components", "unet", "--verify", "quick")
    assert code != 0
    assert "disagrees with PyTorch" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_diffusers_directory_exports(tiny_diffusers_dir: Path, tmp_path: Path):
    out = tmp_path / "from-dir"
    code = run_cli(
        "export", tiny_diffusers_dir, "-o", out, "--batch", "1:1:2",
        "--height", "64:64:128", "--width", "64:128:128", "--components", "text_encoder,unet",
    )
    assert code == 0
    manifest = load_manifest(out)
    assert manifest.model["source"]["kind"] == "diffusers" and not manifest.random_weights
    assert manifest.profile == {"batch": [1, 1, 2], "height": [64, 64, 128], "width": [64, 128, 128],
                                "chunks": [1, 1, 3]}  # (a checkpoint's default: the family's prompt chunks)
    assert all(e.parity["status"] == "passed" for e in manifest.components.values())


@pytest.mark.parametrize(("change", "message"), [
    ({"block_out_channels": [32]}, "unet/config.json: Must provide the same number of `block_out_channels`"),
    ({"in_channels": "four"}, "the U-Net or VAE config has a value sdexport cannot read (invalid literal for int()"),
    # what diffusers does not check: each gave a traceback (ZeroDivisionError, torch's RuntimeError)
    ({"attention_head_dim": 0}, "unet/config.json: a value in it cannot build the model (ZeroDivisionError"),
    ({"block_out_channels": [-32, -64]}, "a value in it cannot build the model (RuntimeError: Trying to create tensor"),
    # one block type as a string: its letters were counted as blocks ("not a multiple of 4194304")
    ({"down_block_types": "CrossAttnDownBlock2D"}, "cannot read (expected a list of blocks, got 'CrossAttnDownBlock2D')"),
])
def test_a_config_diffusers_refuses_is_one_line_naming_it(tiny_diffusers_dir: Path, tmp_path: Path, capsys, change,
                                                           message):
    """diffusers' own checks of a config (at model construction) ended in a traceback."""
    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    config = model / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    assert run_cli("export", model, "-o", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message.lower() in err.lower() and "Traceback" not in err, err


def test_a_preset_changed_since_the_export_is_not_taken_for_it(engine_copy: Path, tmp_path: Path, capsys):
    """A preset is recorded by name, seed and a digest of its configs: the Torch backend, which
    rebuilds it, and the bench, which reuses engines of the model it names, refuse one rebuilt from
    other configs (the tiny presets' groups changed once); a record without the digest is trusted."""
    from sdexport.models.source_files import made_from

    source = load_manifest(engine_copy).model["source"]
    assert source["kind"] == "preset" and len(source["config_sha256"]) == 64
    assert made_from(source, source["name"], None, ["unet"]) is True
    data = json.loads((engine_copy / "manifest.json").read_text())
    data["model"]["source"]["config_sha256"] = "0" * 64
    (engine_copy / "manifest.json").write_text(json.dumps(data))
    assert made_from(data["model"]["source"], source["name"], None, ["unet"]) is False
    run = ("run", engine_copy, "-p", "x", "--steps", "1", "--backend", "torch", "-o", tmp_path / "a.png")
    assert run_cli(*run) == 2
    assert f"the preset {source['name']}'s configs changed since this export" in " ".join(capsys.readouterr().err.split())
    # (the bench said "was exported from preset tiny, not from the scenario's model tiny")
    assert ("was exported from preset tiny as another sdexport defined it (its configs changed since): the baseline "
            "and the engines must be the same model; export it again") in bench_refusal(engine_copy, tmp_path, capsys)
    del data["model"]["source"]["config_sha256"]  # an export from before the digest
    (engine_copy / "manifest.json").write_text(json.dumps(data))
    assert run_cli(*run) == 0


def test_a_weight_file_replaced_after_it_was_hashed_is_refused_not_recorded(tiny_diffusers_dir: Path, tmp_path: Path,
                                                                            monkeypatch, capsys):
    """A diffusers folder's files are hashed first and each part read later: a U-Net file replaced in
    between (`mv` of a new one) gave a manifest recording the old file's hash beside graphs of the
    new weights, which the Torch backend then refused, or ran, wrongly (an audit's race)."""
    from sdexport.export import exporter

    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    real = exporter.fingerprint

    def then_replaced(files):
        hashed = real(files)
        shutil.copy(weights, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", weights)  # the same bytes, another file: as a `mv` leaves it
        return hashed

    monkeypatch.setattr(exporter, "fingerprint", then_replaced)
    out = tmp_path / "out"
    assert run_cli("export", model, "-o", out, "--verify", "none") == 2
    assert (f"error: {weights.absolute()}: the file changed while the export read it (its size, times or inode)"
            in capsys.readouterr().err)
    assert not out.exists()


def test_the_torch_backend_refuses_weights_changed_since_the_export(tiny_diffusers_dir: Path, tmp_path: Path, capsys):
    """The export records the sha256 of each weight file it read; the Torch backend, which reloads
    them, refuses a changed or missing one (the ONNX graphs still run), and runs again once restored."""
    import shutil

    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    out = tmp_path / "engines"
    assert run_cli("export", model, "-o", out, "--batch", "1", "--height", "64", "--width", "64",
                   "--components", "text_encoder,unet,vae_decoder", "--verify", "none") == 0
    files = load_manifest(out).model["source"]["files"]
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    assert sorted(files) == sorted(str((model / p).resolve()) for p in (
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"))
    run = ("run", out, "-p", "x", "--steps", "1", "--height", "64", "--width", "64", "-q")
    assert run_cli(*run, "--backend", "torch", "-o", tmp_path / "a.png") == 0
    original = vae.read_bytes()
    vae.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    capsys.readouterr()
    assert run_cli(*run, "--backend", "torch", "-o", tmp_path / "b.png") == 2
    assert f"{vae.resolve()} changed since the manifest recorded it (its sha256 differs)" in capsys.readouterr().err
    assert run_cli(*run, "-o", tmp_path / "c.png") == 0  # the graphs hold what they held
    vae.write_bytes(original)
    assert run_cli(*run, "--backend", "torch", "-o", tmp_path / "d.png") == 0
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert run_cli(*run, "--backend", "torch", "-o", tmp_path / "e.png") == 2
    assert "which the manifest records and which is gone" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "e.png").exists()


def test_the_torch_backend_refuses_other_files_than_the_export_read(tiny_diffusers_dir: Path, tmp_path: Path, capsys):
    """A link pointed at other weights since, and a file the loader now prefers (a .safetensors beside
    the .bin the export read), are other weights too, though every recorded file is unchanged."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    store = tmp_path / "store"
    store.mkdir()
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    shutil.move(vae, store / "a.safetensors")
    original = (store / "a.safetensors").read_bytes()
    (store / "b.safetensors").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    vae.symlink_to(store / "a.safetensors")
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet), unet.with_suffix(".bin"))
    shutil.move(unet, tmp_path / "unet.safetensors")
    out = tmp_path / "engines"
    assert run_cli("export", model, "-o", out, "--batch", "1", "--height", "64", "--width", "64",
                   "--components", "text_encoder,unet,vae_decoder", "--verify", "none", "-q") == 0
    assert {str(vae), str(unet.with_suffix(".bin"))} < set(load_manifest(out).model["source"]["files"])
    run = ("run", out, "-p", "x", "--steps", "1", "--height", "64", "--width", "64", "-q", "--backend", "torch")
    assert run_cli(*run, "-o", tmp_path / "a.png") == 0
    vae.unlink()
    vae.symlink_to(store / "b.safetensors")
    capsys.readouterr()
    assert run_cli(*run, "-o", tmp_path / "b.png") == 2
    assert f"{vae} changed since the manifest recorded it" in capsys.readouterr().err
    vae.unlink()
    vae.symlink_to(store / "a.safetensors")
    shutil.copy(tmp_path / "unet.safetensors", unet)  # preferred to the .bin by from_pretrained
    assert run_cli(*run, "-o", tmp_path / "c.png") == 2
    assert f"the Torch backend would now read {unet}, not the weight files the manifest records" in capsys.readouterr().err


def test_the_weight_files_an_export_reads_follow_its_parts(tmp_path: Path):
    """A single file whole; a replaced VAE's files instead of the model's; ControlNets and T2I-Adapters
    read from directories; presets none."""
    from sdexport.models.source_files import source_weight_files

    for folder in ("vae", "net", "adapter"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    single = tmp_path / "m.safetensors"
    assert source_weight_files({"kind": "single_file", "path": str(single)}, ["unet"]) == [single]
    assert source_weight_files({"kind": "preset", "name": "tiny"}, ["unet", "vae"]) == []
    source = {"kind": "preset", "name": "tiny", "vae": str(tmp_path / "vae"),
              "controlnets": [{"kind": "preset", "name": "tiny-controlnet"}, {"kind": "diffusers", "path": str(tmp_path / "net")}],
              "adapter": {"kind": "diffusers", "path": str(tmp_path / "adapter")}}
    assert [p.parent.name for p in source_weight_files(source, ["vae", "unet"])] == ["vae", "net", "adapter"]
    assert [p.parent.name for p in source_weight_files(source, ["unet"])] == ["net", "adapter"]


def test_a_moved_checkpoint_is_reloaded_where_it_lies_with_what_the_export_kept(tiny_diffusers_dir: Path,
                                                                                  tmp_path: Path):
    """``relocated``: the manifest's source with the checkpoint's (and each part's) new place; a
    replaced VAE, its config and seed kept; other content refused."""
    import shutil

    from sdexport.errors import EngineDirError
    from sdexport.models.source_files import fingerprint, relocated, source_weight_files

    first, vae = shutil.copytree(tiny_diffusers_dir, tmp_path / "a"), shutil.copytree(tiny_diffusers_dir / "vae", tmp_path / "vae")
    net = shutil.copytree(tiny_diffusers_dir / "unet", tmp_path / "net")  # (any diffusers folder stands for one)
    parts = ["text_encoder", "unet", "vae"]
    source = {"kind": "diffusers", "path": str(first), "vae": str(vae), "argument": "a",
              "adapter": {"kind": "diffusers", "path": str(net)}}
    recorded = {**source, "files": fingerprint(source_weight_files(source, parts))}
    moved_net = net.rename(tmp_path / "net-moved")
    here = {"kind": "diffusers", "path": str(first.rename(tmp_path / "b")), "adapter": {"kind": "diffusers", "path": str(moved_net)}}
    again = relocated(recorded, here, parts)
    assert (again["path"], again["vae"], again["argument"], again["adapter"]["path"]) == (
        str(tmp_path / "b"), str(vae), "a", str(moved_net))
    assert sorted(again["files"].values()) == sorted(recorded["files"].values())
    (tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other")
    with pytest.raises(EngineDirError, match="is not the checkpoint the engines were exported from"):
        relocated(recorded, here, parts)


def test_fp16_export_keeps_float32_io(tiny_fp16_engine_dir: Path):
    out = tiny_fp16_engine_dir
    manifest = load_manifest(out)
    assert manifest.components["vae_decoder_fp32"].dtype == "fp32"
    entry = manifest.components["unet"]
    assert entry.dtype == "fp16" and entry.parity["tolerance"] == 3e-2
    assert entry.parity["status"] == "passed"
    model = onnx.load(str(out / entry.onnx))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def _dit_dir(path: Path) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    return path


def _unet_dir(path: Path) -> Path:
    from sdexport.models.presets import PRESETS

    path.mkdir()
    (path / "config.json").write_text(json.dumps({**PRESETS["tiny"].unet, "_class_name": "UNet2DConditionModel"}))
    return path


def _vae_dir(path: Path, config: dict, weights: str | None = None) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / weights).write_bytes(b"")  # never read: refused by its name
    return path


def _broken_diffusers_dir(path: Path, case: str) -> Path:
    """A diffusers directory (configs only: it must be refused before any weight is read)."""
    from sdexport.models.loader import write_config_dir
    from sdexport.models.presets import PRESETS

    write_config_dir(PRESETS["tiny"], path)
    if case == "no-weights":
        return path
    if case == "truncated-vae":  # headers that parse for the parts before it: the VAE's file is cut short
        from safetensors.numpy import save_file

        for part, name in (("text_encoder", "model"), ("unet", "diffusion_pytorch_model"),
                           ("vae", "diffusion_pytorch_model")):
            save_file({"w": np.zeros(256, np.float32)}, path / part / f"{name}.safetensors")
        vae = path / "vae" / "diffusion_pytorch_model.safetensors"
        vae.write_bytes(vae.read_bytes()[:-64])
        return path
    part, change = {"nan-scaling": ("vae/config.json", {"scaling_factor": float("nan")}),
                    "bad-scheduler": ("scheduler/scheduler_config.json", {"num_train_timesteps": -5})}[case]
    config = json.loads((path / part).read_text())
    (path / part).write_text(json.dumps({**config, **change}))
    return path


@pytest.mark.parametrize("pipeline", ["StableDiffusionImg2ImgPipeline", "StableDiffusionControlNetImg2ImgPipeline"])
def test_a_model_saved_from_an_img2img_pipeline_is_the_same_model(pipeline, tiny_diffusers_dir, tmp_path):
    from sdexport.models.outline import outline_model

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    assert outline_model(str(model)).family == "sd"


def test_weights_that_are_not_finite_are_blamed_not_the_export(tiny_diffusers_dir, tiny_engine_dir, tmp_path, capsys):
    """A NaN weight is named as the export reads it, also where no verification point reaches it
    (one word's row of the token embedding exported as verified, and `run` blamed the U-Net); a
    module whose own output is not finite at a point is still blamed, not the export."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ParityError
    from sdexport.export.verify import Reference, compare_with_onnx
    from sdexport.specs import UNET

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    for part, name, named in (("unet/diffusion_pytorch_model.safetensors", "conv_in.weight", "conv_in.weight"),
                              ("text_encoder/model.safetensors", "text_model.embeddings.token_embedding.weight",
                               "embeddings.token_embedding.weight")):  # (as the text model names it)
        weights = model / part
        state = load_file(str(weights))
        state[name][-1, 0] = float("nan")  # (the token embedding's last row: a word no point's ids reach)
        save_file(state, str(weights))
        assert run_cli("export", model, "-o", tmp_path / "e", "--verify", "quick", "--components", part.split("/")[0]) == 2
        assert f"the model's weight {named} holds NaN or infinite values" in capsys.readouterr().err
        assert not (tmp_path / "e").exists()
        shutil.copy(tiny_diffusers_dir / part, weights)
    # finite weights whose own output is not (an overflow): blamed at the point, not the export
    overflowed = Reference("min", {"sample": np.zeros(1, np.float32)}, outputs=[np.array([np.inf], np.float32)])
    with pytest.raises(ParityError, match="^unet: PyTorch's own out_sample is not finite .* at the min point: the model's"):
        compare_with_onnx(UNET, tiny_engine_dir / "unet" / "model.onnx", [overflowed], dtype="fp32")


def _corrupt_safetensors(path: Path) -> Path:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file or directory, and not a preset"),
        ("fifo", "fifo.safetensors: not a regular file or a directory"),  # (was read: waited for a writer)
        ("link-loop", "loop.safetensors: a link that leads nowhere (a loop, or to a path that does not exist)"),
        ("unknown-preset", "not a preset (tiny"),
        ("empty-dir", "not a diffusers model directory"),
        ("checkpoint-dir", "to export the single-file checkpoint in it, pass the file ({tmp}/downloads/model.safetensors)"),
        ("component-dir", "unet/ is one part of the diffusers directory {tmp}/model: pass that"),
        ("optimum-dir", "an ONNX export (unet/model.onnx), not a PyTorch checkpoint: run it after `sdexport adopt"),
        ("dit", "unsupported architecture PixArtAlphaPipeline"),
        # (a community pipeline's [module, class] was a TypeError traceback: unhashable)
        ("community", "unsupported architecture pipeline_foo/FooPipeline"),
        ("corrupt", "not a readable safetensors file"),
        ("no-config", "needs --config"),
        ("bad-profile", "height min 100 is not a multiple of 16"),
        ("bad-range", "--batch '4:1:2'"),
        ("bad-dtype", "--dtype int8"),
        ("bad-component", "unknown component(s) clip"),
        ("fp32-fallback", "vae_decoder_fp32 is the fp32 fallback of an fp16 export; an fp32 export's vae_decoder is"),
        # (SD has no fp32 encoder: this said the fp16 export was an fp32 one)
        ("no-such-fallback", "unknown component(s) vae_encoder_fp32; choose from text_encoder, unet, vae_decoder"),
        ("opset-low", "--opset 13: sdexport exports opsets 14 to 20"),
        ("opset-high", "--opset 24: sdexport exports opsets 14 to 20"),
        ("bad-seed", "--seed -1: preset weight seeds go from 0 to"),
        ("seed-for-weights", "--seed 5: only a preset's random weights take a seed"),
        ("missing-with-config", "no such file or directory, and not a preset"),
        ("pt-with-config", "not a diffusers directory or a .safetensors/.ckpt checkpoint"),
        ("partial-named-like-a-preset", "tiny: a folder named like the preset, with a unet/ but no model_index.json"),
        ("zero-height", "--height '0': need 0 < min <= opt <= max"),
        ("huge-batch", "would need a VAE activation of"),
        ("huge-side", "beyond the 2^31 elements"),
        ("huge-chunks", "--prompt-chunks max 1000000: at most 32 chunks (2,400 tokens of text)"),
        ("bad-verify", "--verify sometimes: choose full, quick or none"),
        ("vae-not-a-vae", "--vae"),
        ("not-a-number", "Invalid value for '--opset'"),
        ("empty-components", "--components '': expected comma-separated names"),
        ("empty-range", "--batch '': expected integers as min:opt:max, e.g. 1:1:4"),
        ("word-range", "--height 'abc': expected integers as min:opt:max, e.g. 256:512:1024"),
        # (a side's example, pasted, was refused: at most 32 chunks; an audit)
        ("word-chunks", "--prompt-chunks 'abc': expected integers as min:opt:max, e.g. 1:1:3"),
        ("vae-is-a-unet", "a UNet2DConditionModel, not an AutoencoderKL"),
        ("nan-scaling", "scaling_factor nan is not a positive number"),
        ("bad-scheduler", "num_train_timesteps: -5 is less than the minimum of 1"),
        ("no-weights", "text_encoder: no weight file (model.safetensors or pytorch_model.bin)"),
        ("truncated-vae", "vae/diffusion_pytorch_model.safetensors: not a readable safetensors file"),
        ("empty-model", "'': an empty model; give a preset"),
        ("empty-vae", "--vae '': an empty path; name one"),
        ("empty-config", "--config '': an empty path; name one"),
        ("vae-is-a-text-encoder", "a CLIPTextModel, not an AutoencoderKL"),
        ("vae-config-only", "no weight file (diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin)"),
        ("vae-variant-only", "a variant, which sdexport does not read: rename it to diffusion_pytorch_model.safetensors"),
        ("vae-truncated", "diffusion_pytorch_model.safetensors: not a readable safetensors file"),
        ("vae-missing", "--vae {tmp}/nowhere: no such file or directory"),
        ("vae-a-file", "--vae {tmp}/vae.safetensors: not a readable safetensors file"),
        ("vae-another-file", "--vae {tmp}/vae.pt: a file, not a .safetensors/.ckpt VAE file; name one, or an AutoencoderKL"),
    ],
)
def test_bad_input_gives_one_clear_line_and_no_output(case, message, tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "out"
    model, extra = "tiny", []
    if case == "missing":
        model = str(tmp_path / "nowhere")
    elif case == "fifo":
        os.mkfifo(tmp_path / "fifo.safetensors")
        model = str(tmp_path / "fifo.safetensors")
    elif case == "link-loop":  # (said to be missing: "no such file or directory")
        (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
        model = str(tmp_path / "loop.safetensors")
    elif case == "unknown-preset":
        model = "sd99"
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "checkpoint-dir":  # a folder a checkpoint was downloaded into, given for the checkpoint
        (tmp_path / "downloads").mkdir()
        (tmp_path / "downloads" / "model.safetensors").write_bytes(b"")
        model = str(tmp_path / "downloads")
    elif case in ("component-dir", "optimum-dir"):  # a pipeline's unet/ given for it; optimum's own class name
        (tmp_path / "model" / "unet").mkdir(parents=True)
        (tmp_path / "model" / "unet" / "config.json").write_text("{}")
        (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "ORTStableDiffusionPipeline"}')
        if case == "optimum-dir":
            (tmp_path / "model" / "unet" / "model.onnx").write_bytes(b"")
        model = str(tmp_path / "model" / ("unet" if case == "component-dir" else ""))
    elif case == "dit":
        model = str(_dit_dir(tmp_path / "pixart"))
    elif case == "community":
        (tmp_path / "community").mkdir()
        (tmp_path / "community" / "model_index.json").write_text(
            json.dumps({"_class_name": ["pipeline_foo", "FooPipeline"], "unet": ["diffusers", "UNet2DConditionModel"]}))
        model = str(tmp_path / "community")
    elif case == "corrupt":
        model, extra = str(_corrupt_safetensors(tmp_path / "x.safetensors")), ["--config", "tiny"]
    elif case == "no-config":  # (a file that holds a U-Net: one that does not is named as what it is first)
        import torch
        from safetensors.torch import save_file

        model = str(tmp_path / "x.safetensors")
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, model)
    elif case == "huge-chunks":
        extra = ["--prompt-chunks", "1:1:1000000"]
    elif case == "bad-profile":
        extra = ["--height", "100:128:256"]
    elif case == "bad-range":
        extra = ["--batch", "4:1:2"]
    elif case == "bad-dtype":
        extra = ["--dtype", "int8"]
    elif case == "bad-component":
        extra = ["--components", "clip"]
    elif case == "fp32-fallback":  # (it wrote the fp32 decoder twice)
        extra = ["--components", "unet,vae_decoder_fp32"]
    elif case == "no-such-fallback":
        extra = ["--dtype", "fp16", "--components", "vae_encoder_fp32"]
    elif case == "empty-model":
        model = ""
    elif case in ("empty-vae", "empty-config"):
        model, extra = str(_corrupt_safetensors(tmp_path / "x.safetensors")), ["--" + case[6:], ""]
    elif case.startswith("vae-") and case != "vae-not-a-vae" and case != "vae-is-a-unet":
        from sdexport.models.presets import PRESETS

        config, weights = {"vae-is-a-text-encoder": ({"architectures": ["CLIPTextModel"],
                                                      "model_type": "clip_text_model"}, None),
                           "vae-config-only": (PRESETS["tiny"].vae, None),
                           "vae-variant-only": (PRESETS["tiny"].vae, "diffusion_pytorch_model.fp16.safetensors"),
                           "vae-truncated": (PRESETS["tiny"].vae, "diffusion_pytorch_model.safetensors"),
                           "vae-missing": (None, None), "vae-a-file": (None, None), "vae-another-file": (None, None)}[case]
        if case == "vae-missing":
            extra = ["--vae", str(tmp_path / "nowhere")]
        elif case in ("vae-a-file", "vae-another-file"):
            name = "vae.safetensors" if case == "vae-a-file" else "vae.pt"
            (tmp_path / name).write_bytes(b"x")
            extra = ["--vae", str(tmp_path / name)]
        else:
            extra = ["--vae", str(_vae_dir(tmp_path / "vae", config, weights))]
    else:
        extra = {
            "opset-low": ["--opset", "13"], "opset-high": ["--opset", "24"], "bad-seed": ["--seed", "-1"],
            "zero-height": ["--height", "0"], "huge-batch": ["--batch", "1:1:100000"],
            "huge-side": ["--height", "64:64:1048576", "--width", "64:64:1048576"],
            "bad-verify": ["--verify", "sometimes"], "vae-not-a-vae": ["--vae", str(tmp_path)],
            "not-a-number": ["--opset", "seventeen"], "empty-components": ["--components", ""],
            "empty-range": ["--batch", ""], "word-range": ["--height", "abc"],
            "word-chunks": ["--prompt-chunks", "abc"], "vae-is-a-unet": ["--vae", str(_unet_dir(tmp_path / "u"))],
        }.get(case, [])
        if case in ("nan-scaling", "bad-scheduler", "no-weights", "truncated-vae"):
            model = str(_broken_diffusers_dir(tmp_path / "broken", case))
        if case in ("missing-with-config", "pt-with-config"):
            model, extra = str(tmp_path / "model.pt"), ["--config", "tiny"]
            if case == "pt-with-config":
                (tmp_path / "model.pt").write_bytes(b"\0")
        if case == "partial-named-like-a-preset":  # a download without its model_index.json, in the working folder
            (tmp_path / "tiny" / "unet").mkdir(parents=True)
            monkeypatch.chdir(tmp_path)
        if case == "seed-for-weights":  # (a directory whose weights are never reached)
            model, extra = str(_broken_diffusers_dir(tmp_path / "broken", "no-weights")), ["--seed", "5"]
    started = time.perf_counter()
    code = run_cli("export", model, "-o", out, *extra)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2
    assert message.format(tmp=tmp_path) in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert "Loading" not in err, "refused before any weight was read"
    print(f"refused in {seconds:.2f} s")  # reported, not asserted: tests do not time things


def test_inspect_prints_parity(tiny_engine_dir: Path, capsys):
    assert run_cli("inspect", tiny_engine_dir) == 0
    text = capsys.readouterr().out
    assert text.count("random weights") == 1 and "unet" in text and "verification, each component: 4 points checked" in " ".join(text.split())


def test_inspect_shows_each_components_worst_error_and_its_whole_size(engine_copy: Path, capsys, monkeypatch):
    """The table's max-abs and rel-L2 are the worst over the points checked (not the best), and a
    graph's size counts its external weights file as the manifest lists it (``model.onnx.data``,
    which exports over 2 GB write; optimum's ``model.onnx_data``: test_interop) and the small files
    beside it."""
    from sdexport.console import out
    from sdexport.inspect_dir import print_summary

    monkeypatch.setattr(out, "_width", 250)  # a row a line
    manifest = load_manifest(engine_copy)
    (engine_copy / "unet" / "model.onnx.data").write_bytes(bytes(3 * 1024**2))
    manifest.files["unet/model.onnx.data"] = "0" * 64  # (listed as an export writes it; not hashed here)
    capsys.readouterr()
    print_summary(engine_copy, manifest)
    rows: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():  # the components table's rows (the memory table's follow)
        if line.count("│") == 8:
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
            rows.setdefault(cells[0], cells)
    for name, entry in manifest.components.items():
        errors = [e for p in entry.parity["points"] for e in p.get("outputs", {}).values()]
        assert len({e["max_abs"] for e in errors}) > 1, name  # (points that differ: the worst is one of them)
        assert rows[name][3:5] == [f"{max(e['max_abs'] for e in errors):.2e}", f"{max(e['rel_l2'] for e in errors):.2e}"]
    unet = sum(path.stat().st_size for path in (engine_copy / "unet").iterdir() if path.is_file())
    assert rows["unet"][1] == f"{unet / 1024**2:,.1f} MiB" and unet > 3 * 1024**2


def test_inspect_refuses_damaged_directory(engine_copy: Path, capsys):
    (engine_copy / "vae_decoder" / "model.onnx").write_bytes(b"garbage")
    assert run_cli("inspect", engine_copy) == 2
    assert "vae_decoder/model.onnx does not match its sha256" in capsys.readouterr().err
    (engine_copy / MANIFEST_NAME).unlink()
    assert run_cli("inspect", engine_copy) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_export_to_an_existing_file_is_refused(tmp_path: Path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run_cli("export", "tiny", "-o", target) == 2
    assert "is a file; -o takes the engine directory" in capsys.readouterr().err


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path: Path, monkeypatch):
    from sdexport.models import load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    source = load_model("tiny").source
    assert {k: v for k, v in source.items() if k != "config_sha256"} == {"kind": "preset", "name": "tiny", "seed": 0}


def test_an_engine_directory_named_like_a_preset_does_not_shadow_it(tiny_engine_dir, tmp_path: Path, monkeypatch):
    """`sdexport export tiny -o tiny`, then from that folder: export again, reload it for the Torch
    backend, outline it for bench, take it as a single file's --config. An engine directory holds a
    model_index.json (for optimum), but no checkpoint; a diffusers directory of that name still wins,
    except where a manifest records the preset."""
    import shutil

    from sdexport.models import load_model
    from sdexport.models.outline import looks_like_a_model, outline_model, single_file_config

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_engine_dir, "tiny")
    assert not looks_like_a_model(Path("tiny"))
    assert outline_model("tiny").preset == "tiny"
    assert single_file_config(Path("model.safetensors"), "tiny")[0].name == "tiny"
    assert run_cli("run", "tiny", "-p", "x", "--steps", "2", "--backend", "torch", "-o", "x.png") == 0
    assert run_cli("export", "tiny", "-o", "tiny", "--force", "--components", "unet", "--verify", "none") == 0
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model_index.json").write_text("{}")
    monkeypatch.chdir(checkpoint.parent)
    shutil.rmtree("tiny")
    checkpoint.rename("tiny")
    assert looks_like_a_model(Path("tiny"))  # a diffusers directory: what `export tiny` reads
    assert load_model("tiny", kind="preset").source["kind"] == "preset"  # as a manifest records it
    assert single_file_config(Path("model.safetensors"), "tiny", recorded=True)[0].name == "tiny"  # likewise


def test_opset_range_is_torchs_exporter_range(tmp_path: Path):
    import torch.onnx._constants as constants

    from sdexport.export.plan import MAX_OPSET, MIN_OPSET

    assert MAX_OPSET == constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET  # gone or moved: check the range again
    assert run_cli("export", "tiny", "-o", tmp_path / "e", "--opset", str(MIN_OPSET), "--components", "unet",
                   "--verify", "quick") == 0


def test_an_fp16_export_below_opset_17_says_its_layer_norms_compute_in_fp16(tmp_path: Path, capsys):
    """Below opset 17 torch writes LayerNorm as its pieces, which the fp16 conversion puts in fp16:
    the squared deviation overflows past 256 (an audit saw fp16 Pow nodes in the graphs at 14)."""
    assert run_cli("export", "tiny", "-o", tmp_path / "e", "--dtype", "fp16", "--opset", "16",
                   "--components", "text_encoder", "--verify", "none") == 0
    assert "--opset 16 has no LayerNormalization: the fp16 graphs compute LayerNorm's variance in fp16" in \
        " ".join(capsys.readouterr().err.split())
    assert run_cli("export", "tiny", "-o", tmp_path / "f", "--dtype", "fp16", "--components", "text_encoder",
                   "--verify", "none") == 0
    assert "LayerNormalization" not in capsys.readouterr().err


def test_weight_files_are_the_ones_from_pretrained_reads(tmp_path: Path):
    """A sharded checkpoint is its index and every shard it names; a missing shard or a shard
    outside the folder is refused, and safetensors come before .bin as the libraries look for them."""
    from sdexport.errors import ModelLoadError
    from sdexport.models.outline import weight_files

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert weight_files(tmp_path, "transformers") == [tmp_path / "model.safetensors"]
    unet = tmp_path / "unet"
    unet.mkdir()
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    index.write_text(json.dumps({"weight_map": {"a": shards[1], "b": shards[0], "c": shards[1]}}))
    (unet / shards[0]).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="shard diffusion_pytorch_model-00002-of-00002.safetensors is missing"):
        weight_files(unet, "diffusers")
    (unet / shards[1]).write_bytes(b"")
    assert weight_files(unet, "diffusers") == [index, *(unet / s for s in shards)]
    index.write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(ModelLoadError, match="is not a file name beside it"):
        weight_files(unet, "diffusers")
    vae = tmp_path / "vae"  # diffusers reads no sharded .bin: refused now, not after the parts before it
    vae.mkdir()
    (vae / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "x-00001-of-00001.bin"}}))
    (vae / "x-00001-of-00001.bin").write_bytes(b"")
    (vae / "diffusion_pytorch_model.bin.bak").write_bytes(b"")  # no variant: not named as one
    with pytest.raises(ModelLoadError, match=r"vae: no weight file \(diffusion_pytorch_model.safetensors or "
                                             r"diffusion_pytorch_model.bin\); it holds diffusion_pytorch_model.bin."
                                             r"index.json, a sharded checkpoint that diffusers reads only as safetensors$"):
        weight_files(vae, "diffusers")
    # a sharded variant, as diffusers saves one: its index, renamed, is read (its shards keep their names)
    variant = tmp_path / "variant"
    variant.mkdir()
    shard = "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"
    (variant / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    (variant / shard).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape("a sharded variant, which sdexport does not read: rename that "
                                                       "index to diffusion_pytorch_model.safetensors.index.json")):
        weight_files(variant, "diffusers")
    (variant / "diffusion_pytorch_model.safetensors.index.fp16.json").rename(
        variant / "diffusion_pytorch_model.safetensors.index.json")
    assert weight_files(variant, "diffusers")[1:] == [variant / shard]


def test_a_text_encoder_config_naming_its_weight_file_is_read_as_transformers_reads_it(tiny_diffusers_dir: Path,
                                                                                     tmp_path: Path):
    """transformers 5 loads the file a config's ``transformers_weights`` names before the usual ones;
    the weight files sdexport checks and fingerprints are that one, and a bad name is refused."""
    import shutil

    from transformers import CLIPTextModel

    from sdexport.errors import ModelLoadError
    from sdexport.models.outline import weight_files

    folder = shutil.copytree(tiny_diffusers_dir / "text_encoder", tmp_path / "text_encoder")
    (folder / "model.safetensors").rename(folder / "clip-l.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "clip-l.safetensors"}))
    assert weight_files(folder, "transformers") == [folder / "clip-l.safetensors"]
    _, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)  # the library agrees
    assert not info["missing_keys"]
    (folder / "sub").mkdir()  # a path inside the folder, as transformers takes it
    (folder / "clip-l.safetensors").rename(folder / "sub" / "clip-l.safetensors")
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "sub/clip-l.safetensors"}))
    assert weight_files(folder, "transformers") == [folder / "sub" / "clip-l.safetensors"]
    for name, message in (("gone.safetensors", "transformers_weights names gone.safetensors, which is not there"),
                          ("../x.safetensors", "is not a .safetensors file or index in its folder"),
                          ("pytorch_model.bin", "is not a .safetensors file or index in its folder")):
        (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": name}))
        with pytest.raises(ModelLoadError, match=re.escape(message)):
            weight_files(folder, "transformers")


def test_a_vae_replacement_needs_no_weights_in_the_models_own_vae_folder(tiny_diffusers_dir: Path, tmp_path: Path):
    import shutil

    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    shutil.move(model / "vae", tmp_path / "other-vae")
    (model / "vae").mkdir()
    shutil.copy(tmp_path / "other-vae" / "config.json", model / "vae")
    assert run_cli("export", model, "--vae", tmp_path / "other-vae", "-o", tmp_path / "out", "--components", "vae_decoder",
                   "--batch", "1", "--height", "64", "--width", "64", "--verify", "none", "-q") == 0


def test_the_python_api_takes_paths_and_names_a_missing_vae_once(tmp_path: Path):
    """export() takes the model and the output folder as paths or text, as load_pipeline does; a
    missing --vae is named once (it was "--vae --vae PATH" from load_model)."""
    from sdexport.errors import ModelLoadError
    from sdexport.export.exporter import ExportOptions, export
    from sdexport.models import load_model

    with pytest.raises(ModelLoadError, match=r"^--vae \S*nowhere: "):
        load_model("tiny", vae=str(tmp_path / "nowhere"))
    out = str(tmp_path / "engines")  # text, as a caller types it
    manifest = export(Path("tiny"), out, ExportOptions(components=["text_encoder"], verify="none"))
    assert manifest.components.keys() == {"text_encoder"} and (tmp_path / "engines" / MANIFEST_NAME).is_file()


def test_load_model_refuses_what_the_cli_refuses(tiny_diffusers_dir: Path, tmp_path: Path, monkeypatch):
    """The Python API's loader checks a name as the CLI does before reading weights: a partial
    download in a folder named like a preset is not the preset's random weights, and a directory
    takes no config (it was silently ignored)."""
    from sdexport.errors import ModelLoadError
    from sdexport.models import load_model

    (tmp_path / "tiny" / "unet").mkdir(parents=True)
    (tmp_path / "tiny" / "unet" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="^tiny: a folder named like the preset, with a unet/ but no model_index"):
        load_model("tiny")
    with pytest.raises(ModelLoadError, match="only a single-file checkpoint .* takes --config"):
        load_model(str(tiny_diffusers_dir), config="tiny")
    with pytest.raises(ModelLoadError, match="an empty model"):
        load_model("")


def test_a_vae_replacement_needs_no_vae_folder_at_all(tiny_diffusers_dir: Path, tmp_path: Path, capsys):
    """diffusers' ``from_pretrained(path, vae=...)`` reads no ``vae/``: neither does ``--vae``; without
    one the message says what else would do."""
    import shutil

    from sdexport.models.loader import load_model

    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    shutil.move(model / "vae", tmp_path / "other-vae")
    assert run_cli("export", model, "-o", tmp_path / "refused", "--components", "vae_decoder") == 2
    assert "missing vae/ (`sdexport export --vae DIR` can replace the VAE)" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert run_cli("export", model, "--vae", tmp_path / "other-vae", "-o", tmp_path / "out", "--components", "unet,vae_decoder",
                   "--batch", "1", "--height", "64", "--width", "64", "--verify", "none", "-q") == 0
    for lazy in (False, True):  # as the Torch backend reloads it
        loaded = load_model(str(model), vae=str(tmp_path / "other-vae"), lazy=lazy)
        assert loaded.materialize("vae").config.latent_channels == 4
        assert str(tmp_path / "other-vae") in loaded.source["vae"]


def test_a_checkpoints_default_profile_is_made_for_its_unets_size(tiny_diffusers_dir: Path, tmp_path: Path):
    """What diffusers' pipelines default to (``sample_size`` latents times the VAE's factor), as adopt
    reads it: an SD 2.x 768 checkpoint gets the sd21 preset's 256:768:1024, not SD 1.x's 512 opt; a
    tiny one half to twice its 128."""
    from sdexport.errors import ModelLoadError
    from sdexport.models.outline import outline_model

    model = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    config = json.loads((model / "unet" / "config.json").read_text())
    assert outline_model(str(model)).default_profile.height == (64, 128, 256)
    (model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 96}))
    assert outline_model(str(model)).default_profile.height == outline_model("sd21").default_profile.height \
        == (256, 768, 1024)
    for size in (101, 256):  # 808 px (no image side: not a multiple of 16), 2048 (past the family's sides)
        (model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": size}))
        assert outline_model(str(model)).default_profile.height == (256, 512, 1024)  # exports without flags
    (model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": "x"}))
    with pytest.raises(ModelLoadError, match="sample_size 'x' is not a size in latents"):
        outline_model(str(model))


@pytest.mark.parametrize("case", ["text-encoder-width", "vae-channels", "scheduler-with-unet", "scheduler-fp32-vae"])
def test_a_model_whose_parts_do_not_fit_together_is_refused_before_any_graph(tiny_diffusers_dir, tmp_path, capsys, case):
    """Each exported to a directory that `run` then refused (a text encoder of another width than the
    U-Net attends to), or failed mid-export in a traceback (a VAE of 8 latent channels), or went
    into place before the export failed (an unknown scheduler class with --components)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    extra: list[str] = []
    if case == "text-encoder-width":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig.from_pretrained(model / "text_encoder")
        config.hidden_size, config.intermediate_size = 48, 96
        shutil.rmtree(model / "text_encoder")
        CLIPTextModel(config).save_pretrained(model / "text_encoder")
        words = "inconsistent SD configs: text encoder width 48 != unet cross_attention_dim 32"
    elif case == "vae-channels":
        config = json.loads((model / "vae" / "config.json").read_text())
        (model / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
        words = "the model's VAE: 8 latent channels, but the U-Net takes 4"
    else:
        index = json.loads((model / "model_index.json").read_text())
        (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "FooBarScheduler"]}))
        extra = ["--components", "text_encoder,unet,vae_decoder"]
        if case == "scheduler-fp32-vae":  # the fp32 decoder alone runs in the fp16 one's place
            extra = ["--dtype", "fp16", "--components", "text_encoder,unet,vae_decoder_fp32"]
        words = "scheduler config names 'FooBarScheduler', which is not a diffusers scheduler"
    assert run_cli("export", model, "-o", tmp_path / "out", "--verify", "none", *extra) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_bin_weights_export_without_diffusers_safetensors_first_error(tiny_diffusers_dir, tmp_path):
    """diffusers looks for safetensors first and logs a failure at error level before it reads the
    .bin weights: with -q a user saw an "error occurred" line for a folder that exports fine."""
    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    shutil.rmtree(model / "vae")
    vae.save_pretrained(model / "vae", safe_serialization=False)
    assert (model / "vae" / "diffusion_pytorch_model.bin").is_file()
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFUSERS_", "TRANSFORMERS_"))}
    done = subprocess.run([sys.executable, "-m", "sdexport", "-q", "export", str(model), "-o", str(tmp_path / "out"),
                           "--components", "vae_decoder", "--verify", "none"], capture_output=True, text=True,
                          env=environment, timeout=300)  # (a process of its own: as a user's, its first import)
    assert done.returncode == 0, done.stderr
    assert "An error occurred" not in done.stderr and "no file named" not in done.stderr, done.stderr


@pytest.mark.parametrize("damage, words", [
    ("cut", "truncated or damaged: its zip archive cannot be read"),
    ("empty", "empty or unreadable (0 bytes read): download it again"),
    ("safetensors", "a safetensors file by its content: name it diffusion_pytorch_model.safetensors"),
    ("page", "an HTML or XML page, not the weights"),
])
def test_a_damaged_bin_is_refused_before_any_part_is_exported(tiny_diffusers_dir, tmp_path, capsys, damage, words):
    """Only a .bin that was a Git LFS pointer or a web page was refused up front: an empty or cut one
    was found when its part loaded, after the parts before it were exported (an audit: a U-Net
    first, minutes and gigabytes on a real model), diffusers then reading it whole as text."""
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    weights = model / "vae" / "diffusion_pytorch_model.bin"
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    if damage == "safetensors":
        save_file({"w": torch.zeros(4)}, weights)
    elif damage == "page":
        weights.write_bytes(b"<!DOCTYPE html><html>Sign in</html>")
    else:
        torch.save({"w": torch.zeros(4096)}, weights)
        weights.write_bytes(weights.read_bytes()[:-300] if damage == "cut" else b"")
    assert run_cli("export", model, "-o", tmp_path / "out", "--verify", "none") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: {weights}: {words}" in err and err.count("error:") == 1 and "Exporting" not in err, err
    assert not (tmp_path / "out").exists()


# From mutation testing round 5 (verification): each seen to fail with the change it guards against.

def test_a_report_of_skipped_points_alone_is_skipped_not_passed():
    """A component none of whose points ran (``--verify none``, or every point too large) is
    reported skipped, never passed; one failed point fails it."""
    from sdexport.export.verify import OutputError, ParityReport, PointResult

    skipped = PointResult("all", "skipped", reason="verification off")
    assert ParityReport("unet", "fp32", 1e-3, [skipped]).status == "skipped"
    passed = PointResult("min", "passed", outputs={"out_sample": OutputError(0.0, 1e-6)})
    assert ParityReport("unet", "fp32", 1e-3, [passed, skipped]).status == "passed"
    failed = PointResult("max", "failed", outputs={"out_sample": OutputError(1.0, 0.5)})
    assert ParityReport("unet", "fp32", 1e-3, [passed, failed]).status == "failed"


def test_an_output_that_should_be_zero_is_compared_by_its_absolute_error():
    """Where PyTorch's output is all zeros (a ControlNet's zero convolutions), the relative
    error has no scale: the graph's absolute error is the measure, so a graph giving ones fails."""
    from sdexport.export.verify import compare

    assert compare(np.ones(4, np.float32), np.zeros(4, np.float32)).rel_l2 == pytest.approx(2.0)
    assert compare(np.zeros(4, np.float32), np.zeros(4, np.float32)).rel_l2 == 0.0


@pytest.mark.parametrize("flags, words", [
    (["--vae", "{vae}", "--components", "unet"], "it replaces the VAE, which --components leaves out"),
    (["--controlnet", "tiny-controlnet", "--components", "text_encoder"],
     "it conditions the U-Net, which --components leaves out with the controlnet's own graph"),
])
def test_a_part_for_a_component_the_export_leaves_out_is_refused(tiny_diffusers_dir: Path, tmp_path: Path, capsys,
                                                                 flags, words):
    """--lora and --textual-inversion were refused for left-out components; --vae and --controlnet
    were taken, and the manifest's label named a VAE or ControlNet nothing of which was exported.
    (With the U-Net a ControlNet is used: its residual inputs.)"""
    given = [flag.format(vae=tiny_diffusers_dir / "vae") for flag in flags]
    assert run_cli("export", "tiny", "-o", tmp_path / "out", *given) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert words in err and "Loading" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, dtype, components, left", [
    ("tiny-sdxl", "fp16", "text_encoder,text_encoder_2,unet,vae_decoder", "vae_decoder_fp32"),
    ("tiny-sdxl", "fp16", "unet,vae_decoder,vae_encoder,vae_decoder_fp32", "vae_encoder_fp32"),
    ("tiny-sdxl", "fp16", "vae_decoder,vae_encoder", "vae_decoder_fp32 and vae_encoder_fp32"),
    ("tiny-sdxl", "fp16", "vae_decoder,vae_decoder_fp32", None),
    ("tiny-sdxl", "fp16", "unet", None),  # no VAE graph: none of its fp32 twins is missed
    ("tiny-sdxl", "fp16", None, None),
    ("tiny-sdxl", "fp32", "vae_decoder", None),  # fp32 already
    ("tiny", "fp16", "vae_decoder", None),  # SD's pipelines ignore force_upcast
])
def test_an_fp16_sdxl_export_leaving_out_its_fp32_vae_says_so(tmp_path: Path, model, dtype, components, left):
    """An fp16 SDXL export whose --components left out vae_decoder_fp32 ran the fp16 decoder, which
    SDXL's own VAE overflows (its config sets force_upcast), and said nothing until a run refused
    the NaN after every step (an audit)."""
    from sdexport.export.plan import ExportOptions, fp32_vae_note, plan_export

    plan = plan_export(model, tmp_path / "out", ExportOptions(dtype=dtype, components=components.split(",")
                                                              if components else None))
    note = fp32_vae_note(plan, dtype)
    if left is None:
        assert note is None
    else:
        assert note is not None and note.startswith(f"--components leaves out {left}, while the VAE's config sets "
                                                    "force_upcast"), note
        assert note.endswith(f"add {left.replace(' and ', ',')} to --components, or export with an fp16-safe --vae "
                             "(a folder whose config sets force_upcast false)")


def test_an_fp16_safe_vae_is_not_noted(tiny_diffusers_dir: Path, tmp_path: Path):
    """A VAE whose config turns force_upcast off (madebyollin's fp16 fix) runs in fp16 as diffusers runs it."""
    from sdexport.export.plan import ExportOptions, fp32_vae_note, plan_export

    vae = tmp_path / "vae"
    shutil.copytree(tiny_diffusers_dir / "vae", vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025, "force_upcast": False}))
    options = ExportOptions(dtype="fp16", components=["vae_decoder"], vae=str(vae))
    assert fp32_vae_note(plan_export("tiny-sdxl", tmp_path / "out", options), "fp16") is None
    options = ExportOptions(dtype="fp16", components=["vae_decoder"])
    assert fp32_vae_note(plan_export("tiny-sdxl", tmp_path / "out", options), "fp16") is not None

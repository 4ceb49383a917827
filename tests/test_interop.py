"""Interop with optimum's layout: the files other tools read, `sdexport adopt`, and the I/O bridge.

optimum itself needs transformers < 4.58 and cannot share this environment: the end-to-end check
(optimum generating from our directories, ONNX Runtime's optimize_pipeline accepting them, sdexport
generating from optimum's exports) is scripts/interop-check.sh, run by the ``interop``-marked test
at the end: two of its four cases and two of ONNX Runtime's optimizer's three variants in the
default run (``-m "not interop"`` skips it), everything with ``-m slow``. The tests before it need
no optimum: an optimum export has our layout, so a copy of our own export without its manifest
stands in for one, and graphs edited to take what optimum's take (int64 token ids, float16 I/O, a
one-element timestep) stand in for its variations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_cli
from sdexport.errors import EngineDirError

pytestmark = pytest.mark.usefixtures("without_gpu")
REPO = Path(__file__).resolve().parents[1]
RUN = ["-p", "a photo of a cat", "--steps", "3", "--seed", "5", "--height", "64", "--width", "64"]


def _pixels(engine_dir: Path) -> np.ndarray:
    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.request import GenerationRequest

    request = GenerationRequest(prompt=["a photo of a cat"], steps=3, seeds=[5], height=64, width=64)
    return load_pipeline(engine_dir, "onnxruntime-cpu")(request).pixels


@pytest.fixture
def foreign_export(tiny_engine_dir: Path, tmp_path: Path) -> Path:
    """An ONNX export in optimum's layout without an sdexport manifest (ours, less its manifest)."""
    target = tmp_path / "optimum-export"
    shutil.copytree(tiny_engine_dir, target)
    (target / "manifest.json").unlink()
    return target


# -- what an export writes for other tools -------------------------------------------------------


def test_an_export_has_model_index_configs_and_v4_tokenizer_files(tiny_engine_dir: Path, tiny_model):
    index = json.loads((tiny_engine_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"][1] == tiny_model.scheduler_config["_class_name"]
    for name in ("unet", "vae_decoder", "vae_encoder", "text_encoder"):
        assert (tiny_engine_dir / name / "config.json").is_file(), name
    unet = json.loads((tiny_engine_dir / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel" and unet["in_channels"] == 4
    text = json.loads((tiny_engine_dir / "text_encoder" / "config.json").read_text())
    assert text["num_hidden_layers"] == tiny_model.config("text_encoder").num_hidden_layers
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (tiny_engine_dir / "tokenizer").iterdir()}


def test_vocab_and_merges_alone_tokenize_as_tokenizer_json(tmp_path: Path):
    """transformers 4's CLIPTokenizer reads only vocab.json and merges.txt (optimum's loads them; the
    interop check runs it): they must hold the BPE that tokenizer.json holds, merges included."""
    from transformers import CLIPTokenizer

    from sdexport.models.tokenizer import BOS, EOS, MERGES_HEADER, byte_level_clip_tokenizer, save_tokenizer

    vocab = dict(byte_level_clip_tokenizer().get_vocab())
    for token in ("ca", "cat</w>", "ph", "pho"):
        vocab[token] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o")]
    original = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    save_tokenizer(original, tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == MERGES_HEADER and lines[1:] == [" ".join(m) for m in merges]
    written = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert written == original.get_vocab() and written[BOS] == 0 and written[EOS] == 1
    again = CLIPTokenizer(vocab=written, merges=[tuple(line.split()) for line in lines[1:]], model_max_length=77)
    text = ["a photo of a cat, highly detailed", "ünïcode and 123"]
    assert again(text).input_ids == original(text).input_ids
    assert vocab["cat</w>"] in original(["cat"]).input_ids[0]  # the merges are used


def test_the_bpe_of_a_real_vocabulary_round_trips():
    """Merges written as pairs (tokenizers >= 0.20) or as strings both become "a b" lines."""
    from sdexport.models.tokenizer import bpe_files

    vocab, merges = bpe_files({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                         "merges": [["a", "b"], "ab c"]}})
    assert vocab == {"a": 0, "b": 1, "ab": 2} and merges == ["a b", "ab c"]
    with pytest.raises(ValueError, match="not a BPE tokenizer"):
        bpe_files({"model": {"type": "WordPiece"}})


def test_a_format_1_directory_is_refused_with_the_command_that_reexports_it(engine_copy: Path, capsys):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["format_version"] = 1
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("run", engine_copy, *RUN, "-o", engine_copy.parent / "x.png") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "written by an older sdexport (format 1)" in err
    assert f"sdexport export tiny -o {engine_copy} --force --dtype fp32 --batch 1:1:2 --height 64:128:256" in err


def test_the_reexport_command_names_a_local_model_by_its_absolute_path(tmp_path: Path):
    """``export ./mymodel`` recorded its argument as typed: the command failed pasted from elsewhere."""
    from sdexport.manifest import reexport_command

    source = {"kind": "diffusers", "argument": "./mymodel", "path": "/work/proj/mymodel"}
    assert reexport_command(tmp_path, {"model": {"source": source}}).startswith(
        f"sdexport export /work/proj/mymodel -o {tmp_path} --force")
    preset = {"kind": "preset", "argument": "tiny", "name": "tiny"}
    assert reexport_command(tmp_path, {"model": {"source": preset}}).startswith("sdexport export tiny -o ")


# -- sdexport adopt --------------------------------------------------------------------------------


def test_run_on_an_unadopted_export_says_to_adopt_it(foreign_export: Path, capsys):
    assert run_cli("run", foreign_export, *RUN, "-o", foreign_export.parent / "x.png") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "without an sdexport manifest" in err and f"sdexport adopt {foreign_export}" in err


def test_a_manifest_that_is_a_folder_is_named_as_one(engine_copy: Path, capsys):
    """Not "no manifest: adopt it", which adopt answers with "already has a manifest.json: inspect it"."""
    (engine_copy / "manifest.json").unlink()
    (engine_copy / "manifest.json").mkdir()
    for command in ("inspect", "run"):
        assert run_cli(command, engine_copy, *(RUN if command == "run" else ())) == 2
        assert "manifest.json is not a file (a folder, or a link to nothing?)" in capsys.readouterr().err
    (engine_copy / "manifest.json").rmdir()
    (engine_copy / "manifest.json").symlink_to(engine_copy / "gone.json")
    assert run_cli("inspect", engine_copy) == 2
    assert "manifest.json is not a file (a folder, or a link to nothing?)" in capsys.readouterr().err


def test_a_command_a_message_suggests_works_when_pasted(foreign_export: Path, capsys):
    spaced = foreign_export.rename(foreign_export.parent / "my export")
    assert run_cli("inspect", spaced) == 2
    assert f"sdexport adopt '{spaced}'" in " ".join(capsys.readouterr().err.split())


def test_export_of_an_onnx_export_says_what_it_is(foreign_export: Path, tiny_engine_dir: Path, tmp_path: Path, capsys):
    """Adopt it where it has no manifest; run it where it has one (sdexport's, or adopted); and as a
    single file's --config it is no checkpoint's architecture."""
    assert run_cli("export", foreign_export, "-o", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "an ONNX export (unet/model.onnx), not a PyTorch checkpoint: run it after `sdexport adopt" in err
    assert run_cli("export", tiny_engine_dir, "-o", tmp_path / "out") == 2
    assert f"not a PyTorch checkpoint: `sdexport run {tiny_engine_dir}` runs it" in " ".join(capsys.readouterr().err.split())
    single = tmp_path / "m.safetensors"  # (a file that holds a U-Net: an unreadable one is refused as that first)
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, single)
    assert run_cli("export", single, "--config", tiny_engine_dir, "-o", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--config {tiny_engine_dir}: an ONNX export, not the diffusers directory of a checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_adopted_export_runs_and_generates_what_the_original_does(foreign_export: Path, tiny_engine_dir: Path):
    assert run_cli("adopt", foreign_export, "--height", "64:128:256", "--width", "64:128:256") == 0
    from sdexport.manifest import load_manifest

    manifest = load_manifest(foreign_export)
    assert manifest.model["source"]["kind"] == "onnx"
    assert {e.parity["status"] for e in manifest.components.values()} == {"unchecked"}
    assert sorted(p.name for p in foreign_export.iterdir()) == sorted(p.name for p in tiny_engine_dir.iterdir())
    np.testing.assert_array_equal(_pixels(foreign_export), _pixels(tiny_engine_dir))


def test_adopt_with_the_model_proves_each_graph(foreign_export: Path, capsys):
    """The other points are adopt's to skip: inspect said "3 skipped by request", which nobody made."""
    from sdexport.manifest import load_manifest

    assert run_cli("adopt", foreign_export, "--model", "tiny") == 0
    assert "skipped: opt, max, odd (adopt checks the min point only)" in capsys.readouterr().err
    manifest = load_manifest(foreign_export)
    assert manifest.shape_profile.height == (64, 128, 256)  # from the U-Net's sample_size, not SD's 512
    assert {e.parity["status"] for e in manifest.components.values()} == {"passed"}
    assert manifest.model["source"]["kind"] == "preset" and manifest.model["source"]["adopted_from"]
    assert run_cli("inspect", foreign_export) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "1 point checked, 3 skipped (adopt checks the min point only)" in said and "by request" not in said


def test_adopt_with_the_model_says_in_one_line_that_onnx_runtime_cannot_load_a_graph(foreign_export: Path, capsys):
    """A graph this ONNX Runtime cannot load (ONNX Runtime's own SD tool's CUDA-only fusions, an
    operator it does not have) was a 63-line traceback from the parity check (an audit). (An opset
    newer than onnx knows is refused before: test_a_graph_stamped_with_an_opset_onnx_does_not_know...)"""
    model = onnx.load(str(foreign_export / "vae_decoder" / "model.onnx"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type, node.domain = "Mystery", "com.example"  # (a kernel only another build of ORT has)
    onnx.save(model, str(foreign_export / "vae_decoder" / "model.onnx"))
    assert run_cli("adopt", foreign_export, "--model", "tiny") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: vae_decoder: ONNX Runtime cannot load ") and "on the CPU (" in err


def test_adopt_proves_graphs_against_a_single_file_checkpoint_with_its_config(foreign_export: Path, tiny_model,
                                                                              tmp_path: Path, capsys):
    from ldm_layout import write_single_file_checkpoint

    from sdexport.manifest import load_manifest

    checkpoint = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(tiny_model, checkpoint)
    for args, message in [(["--model", checkpoint], "a single-file checkpoint needs --config"),
                          (["--config", "tiny"], "--config goes with --model")]:
        assert run_cli("adopt", foreign_export, *args) == 2
        assert message in capsys.readouterr().err
    assert not (foreign_export / "manifest.json").exists()
    assert run_cli("adopt", foreign_export, "--model", checkpoint, "--config", "tiny") == 0
    manifest = load_manifest(foreign_export)
    assert {e.parity["status"] for e in manifest.components.values()} == {"passed"}
    assert manifest.model["source"]["config"] == "tiny"  # so that --backend torch reloads it
    assert list(manifest.model["source"]["files"]) == [str(checkpoint.resolve())]  # and proves it the same
    checkpoint.write_bytes(checkpoint.read_bytes()[:-1] + b" ")
    run = ["run", foreign_export, "-p", "x", "--steps", "1", "--height", "64", "--width", "64", "-o", tmp_path / "x.png"]
    assert run_cli(*run, "--backend", "torch") == 2
    assert "changed since the manifest recorded it" in capsys.readouterr().err


def test_adopt_with_another_model_is_refused(foreign_export: Path, capsys):
    assert run_cli("adopt", foreign_export, "--model", "tiny-sdxl") == 2
    err = capsys.readouterr().err
    assert "--model tiny-sdxl: an sdxl model, the export an sd one; give the checkpoint" in " ".join(err.split())
    assert run_cli("adopt", foreign_export, "--model", "tiny-inpaint") == 2  # the same family: what differs
    err = " ".join(capsys.readouterr().err.split())
    assert "its sizes are not the export's" in err and len(err) < 400, err
    assert not (foreign_export / "manifest.json").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", "not an ONNX export of a diffusers pipeline"),
    ("diffusers", "a diffusers checkpoint (PyTorch weights, no unet/model.onnx), not an ONNX export; export it"),
    ("graph-folder", "not an ONNX export of a diffusers pipeline"),  # (not said to be a checkpoint either)
    ("sd3", "a StableDiffusion3Pipeline; sdexport runs Stable Diffusion 1.x/2.x and XL"),
    ("pag", "a StableDiffusionPAGPipeline; sdexport runs Stable Diffusion 1.x/2.x and XL"),  # guidance it has not
    ("legacy", "an ONNX export in diffusers' older layout (OnnxStableDiffusionPipeline"),  # (was "sdexport runs ...")
    ("no-vae", "no vae_decoder/model.onnx"),
    ("manifest", "already has a manifest.json"),
    ("truncated", "unet/model.onnx is not a readable ONNX graph"),  # a partial copy or download
    ("sample-size", "unet/config.json: sample_size 'x' is not a size in latents"),
    ("sample-sides", "unet/config.json: sample_size [8, 0] is not a size in latents"),
    ("scheduler-classes", ("model_index.json names the scheduler EulerDiscreteScheduler, "
                           "scheduler/scheduler_config.json 'PNDMScheduler'; make them agree")),
])
def test_adopt_refuses_what_it_cannot_adopt(case: str, message: str, foreign_export: Path, tiny_diffusers_dir: Path,
                                            tiny_engine_dir: Path, tmp_path: Path, capsys):
    target = {"missing": tmp_path / "nothing", "empty": tmp_path, "diffusers": tiny_diffusers_dir,
              "manifest": tiny_engine_dir}.get(case, foreign_export)
    if case in ("sd3", "pag", "legacy"):
        index = json.loads((target / "model_index.json").read_text())
        pipeline = {"sd3": "StableDiffusion3Pipeline", "pag": "StableDiffusionPAGPipeline",
                    "legacy": "OnnxStableDiffusionPipeline"}[case]
        (target / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    if case == "no-vae":
        shutil.rmtree(target / "vae_decoder")
    if case == "graph-folder":  # unet/model.onnx a folder, beside the PyTorch weights of a half-made copy
        shutil.copytree(tiny_diffusers_dir, target := tmp_path / "odd")
        (target / "unet" / "model.onnx").mkdir()
    if case == "scheduler-classes":  # diffusers would sample with the index's, the runtime with the config's
        index = json.loads((target / "model_index.json").read_text())
        (target / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    if case == "truncated":
        graph = (target / "unet" / "model.onnx").read_bytes()
        (target / "unet" / "model.onnx").write_bytes(graph[:len(graph) // 2])
    if case.startswith("sample-"):
        config = json.loads((target / "unet" / "config.json").read_text())
        size = "x" if case == "sample-size" else [8, 0]
        (target / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": size}))
    assert run_cli("adopt", target) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_sample_size_of_height_and_width_gives_each_its_own_range(foreign_export: Path):
    """diffusers takes a U-Net's sample_size as [height, width] too: the profile is centred on each."""
    from sdexport.manifest import load_manifest

    config = json.loads((foreign_export / "unet" / "config.json").read_text())
    (foreign_export / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": [8, 16]}))
    assert run_cli("adopt", foreign_export) == 0
    profile = load_manifest(foreign_export, verify_files=False).shape_profile
    assert (tuple(profile.height), tuple(profile.width)) == ((32, 64, 128), (64, 128, 256))


def test_adopt_prompt_chunks_reads_long_prompts_whole_where_the_u_net_takes_any_text_length(
        foreign_export: Path, tiny_engine_dir: Path):
    """optimum's U-Net takes any sequence length, as ours: adopted with --prompt-chunks, it reads a
    long prompt in A1111's chunks, and draws what the export it came from draws."""
    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.request import GenerationRequest

    assert run_cli("adopt", foreign_export, "--prompt-chunks", "1:1:2") == 0
    request = GenerationRequest(prompt=[", ".join(["a red fox"] * 12)], steps=2, seeds=[3], height=64, width=64)
    adopted, ours = load_pipeline(foreign_export, "onnxruntime-cpu"), load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    assert adopted.prompt_chunks == 2 and adopted.chunk_count(request) == 2
    np.testing.assert_array_equal(adopted(request).pixels, ours(request).pixels)


def _fix_axis(name: str, axis: int, size: int):
    def edit(graph) -> None:
        dim = next(v for v in graph.input if v.name == name).type.tensor_type.shape.dim[axis]
        dim.dim_value = size  # (replaces its dim_param)
    return edit


@pytest.mark.parametrize("edit, options, option", [
    (_fix_axis("encoder_hidden_states", 1, 77), ["--prompt-chunks", "1:1:2"], "--prompt-chunks"),  # optimum's fixed text
    (_fix_axis("sample", 0, 2), [], "--batch"),  # a batch the default 1:1:4 (2 to 8 under CFG) passes
    (_fix_axis("sample", 2, 8), [], "--height"),  # 64 pixels high, where the profile reaches 64 to 256
])
def test_a_graph_that_fixes_an_axis_the_profile_ranges_over_is_refused_naming_the_option(
        edit, options: list[str], option: str, foreign_export: Path, capsys):
    _edit_graph(foreign_export / "unet" / "model.onnx", edit)
    assert run_cli("adopt", foreign_export, *options) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unet/model.onnx:" in err and f"(or narrow {option} to" in err and len(err.splitlines()) == 1
    assert not (foreign_export / "manifest.json").exists()


def test_a_u_net_fixed_at_one_image_under_cfg_is_adopted_with_batch_one_and_runs(foreign_export: Path, capsys):
    """Other exporters' static U-Nets take batch 2: one image with guidance. Held to its CFG calls,
    it is adopted with --batch 1:1:1 (and refused with more, whose CFG calls are larger); that a run
    without guidance fails at it is said (it was found after the text encoder ran)."""
    from sdexport.manifest import load_manifest

    _edit_graph(foreign_export / "unet" / "model.onnx", _fix_axis("sample", 0, 2))
    assert run_cli("adopt", foreign_export, "--batch", "2:2:2") == 2  # (its CFG calls are 4)
    capsys.readouterr()
    assert run_cli("adopt", foreign_export, "--batch", "1:1:1") == 0
    assert ("note: unet fixes its batch at 2: it runs 1 image a call with guidance above 1 only; a run with "
            "--guidance 1 or below fails at it (export it with a dynamic batch for those)") in " ".join(
        capsys.readouterr().err.split())
    assert load_manifest(foreign_export, verify_files=False).shape_profile.batch == (1, 1, 1)
    assert _pixels(foreign_export).shape == (1, 64, 64, 3)


def test_a_text_encoder_fixed_at_one_text_is_refused_without_advice_that_cannot_help(foreign_export: Path, capsys):
    """Static exporters fix the text encoder at batch 1 (diffusers calls it per prompt list); one
    call reads the negatives and the prompts together here. The refusal said to narrow --batch to
    half of it, which --batch 1:1:1 already was."""
    _edit_graph(foreign_export / "text_encoder" / "model.onnx", _fix_axis("input_ids", 0, 1))
    assert run_cli("adopt", foreign_export, "--batch", "1:1:1") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "input_ids fixes its batch (B) at 1, but the profile's calls under CFG give 2" in err
    assert "a graph fixed at 1 cannot take" in err and "narrow" not in err, err


def test_a_u_net_fixed_at_one_chunk_is_adopted_reading_one(foreign_export: Path):
    from sdexport.manifest import load_manifest

    _edit_graph(foreign_export / "unet" / "model.onnx", _fix_axis("encoder_hidden_states", 1, 77))
    assert run_cli("adopt", foreign_export) == 0
    assert load_manifest(foreign_export, verify_files=False).shape_profile.chunks == (1, 1, 1)


def test_force_replaces_only_a_manifest_adopt_wrote(foreign_export: Path, engine_copy: Path, capsys):
    assert run_cli("adopt", foreign_export) == 0
    assert run_cli("adopt", foreign_export, "--force") == 0
    assert run_cli("adopt", engine_copy, "--force") == 2
    assert "not a manifest `sdexport adopt` wrote; refusing to replace it" in capsys.readouterr().err
    assert (engine_copy / "manifest.json").is_file()


def test_building_again_after_a_forced_adoption_replaces_what_it_forgot(foreign_export: Path):
    """--force forgets what was built since; its files (still as the old manifest hashed them) go
    too, so the next build does not refuse them as files sdexport did not write."""
    assert run_cli("adopt", foreign_export) == 0
    build = ("build", foreign_export, "--target", "onnxruntime-cuda", "--components", "vae_decoder")
    assert run_cli(*build) == 0
    fused = foreign_export / "vae_decoder" / "onnxruntime-cuda"
    assert any(fused.iterdir())
    (foreign_export / "vae_decoder" / "notes.txt").write_text("mine")  # unlisted: never the adoption's
    assert run_cli("adopt", foreign_export, "--force") == 0
    assert not fused.exists() and (foreign_export / "vae_decoder" / "notes.txt").read_text() == "mine"
    assert run_cli(*build) == 0


def test_a_forced_adoption_stopped_as_it_saves_leaves_nothing_a_build_refuses(foreign_export: Path, monkeypatch):
    """The new manifest was saved before the built files it forgets were removed: stopped in between
    (or the removal failing), sdexport's own fused graphs stayed unlisted, and every build refused
    them as the user's, adopt --force again no longer knowing them (an audit's finding)."""
    from sdexport import manifest
    from sdexport.export import adopt

    assert run_cli("adopt", foreign_export) == 0
    build = ("build", foreign_export, "--target", "onnxruntime-cuda", "--components", "vae_decoder")
    assert run_cli(*build) == 0

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    for where in (adopt, manifest):  # stopped before the removal, then between it and the save
        monkeypatch.setattr(where, "_remove_forgotten" if where is adopt else "save_manifest", stopped)
        assert run_cli("adopt", foreign_export, "--force") == 130
        monkeypatch.undo()
        assert run_cli(*build) == 0, where  # (the old manifest lists a removed graph: built again)
        assert run_cli("inspect", foreign_export) == 0


def test_a_forced_adoption_removes_only_what_sdexport_built(tmp_path: Path):
    """The adopted files are the user's export: one the new manifest no longer lists (optimum's
    older weights file, say) stays; only plans and fused graphs, as hashed, are removed."""
    import json

    from sdexport.export.adopt import _built_files, _remove_forgotten
    from sdexport.manifest import sha256_file

    files = {"unet/model.onnx_data": b"the user's weights", "unet/0123.plan": b"plan",
             "unet/onnxruntime-cuda/model.onnx": b"fused"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "files": {rel: sha256_file(tmp_path / rel) for rel in files},
        "components": {"unet": {"engines": {"k": {"path": "unet/0123.plan"}}, "optimized": {"onnxruntime-cuda": {}}}}}))
    built = _built_files(tmp_path)
    assert sorted(built) == ["unet/0123.plan", "unet/onnxruntime-cuda/model.onnx"]
    _remove_forgotten(tmp_path, built, {})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "manifest.json", "unet/model.onnx_data"]


def test_an_adopted_weight_map_is_hashed(foreign_export: Path, tiny_engine_dir: Path):
    """Run-time LoRA reads a component's weights.json where there is one: adopt lists it."""
    shutil.copy(tiny_engine_dir / "unet" / "weights.json", foreign_export / "unet" / "weights.json")
    assert run_cli("adopt", foreign_export) == 0
    from sdexport.manifest import load_manifest

    assert "unet/weights.json" in load_manifest(foreign_export, verify_files=False).files


def test_a_failed_force_keeps_the_adopted_manifest(foreign_export: Path, capsys):
    """--force replaces the manifest at the end, atomically: a refused re-adoption leaves it as it was."""
    assert run_cli("adopt", foreign_export) == 0
    before = (foreign_export / "manifest.json").read_bytes()
    assert run_cli("adopt", foreign_export, "--force", "--height", "65:128:256") == 2
    assert "height min 65 is not a multiple of 16" in capsys.readouterr().err
    assert run_cli("adopt", foreign_export, "--force", "--height", "64:128:300000") == 2  # as export refuses it
    assert "beyond the 2^31 elements" in capsys.readouterr().err
    assert (foreign_export / "manifest.json").read_bytes() == before
    assert run_cli("run", foreign_export, *RUN, "-o", foreign_export.parent / "x.png") == 0


def test_adopt_lists_only_what_sdexport_reads_and_never_claims_the_directory(foreign_export: Path, capsys):
    """A README or a .git folder in an adopted directory stays the user's: unhashed (editing it breaks
    no run) and never replaced by ``export --force``."""
    (foreign_export / "README.md").write_text("my model card\n")
    (foreign_export / ".git").mkdir()
    (foreign_export / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert run_cli("adopt", foreign_export) == 0
    from sdexport.manifest import load_manifest

    files = load_manifest(foreign_export).files
    assert "README.md" not in files and not any(f.startswith(".git/") for f in files)
    assert {"model_index.json", "unet/model.onnx", "unet/config.json", "tokenizer/vocab.json",
            "scheduler/scheduler_config.json"} <= set(files)
    (foreign_export / "README.md").write_text("edited\n")
    assert run_cli("run", foreign_export, *RUN, "-o", foreign_export.parent / "x.png") == 0
    capsys.readouterr()
    assert run_cli("export", "tiny", "-o", foreign_export, "--force") == 2
    assert "`sdexport adopt` gave a manifest: its files are not sdexport's" in " ".join(capsys.readouterr().err.split())
    assert (foreign_export / "README.md").read_text() == "edited\n"


@pytest.mark.parametrize("location", ["../../secret", "..\\secret"])
def test_adopt_reads_no_weight_file_outside_a_graphs_folder(foreign_export: Path, capsys, location):
    """``..\\secret`` is a file beside the graph here and the folder's parent's file on Windows,
    where the directory may be adopted too: refused as any location that is not a plain name."""
    (foreign_export.parent / "secret").write_bytes(b"\0" * 64)

    def outside(graph) -> None:
        init = graph.initializer[0]
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", location

    _edit_graph(foreign_export / "unet" / "model.onnx", outside)
    assert run_cli("adopt", foreign_export) == 2
    assert f"keeps weights in {location!r}, not a file beside it" in capsys.readouterr().err
    assert not (foreign_export / "manifest.json").exists()


def test_a_weight_file_cut_short_is_refused_by_adopt_and_by_inspect(foreign_export: Path, capsys):
    """A hash made of a truncated copy matches it: adopt and inspect compare the weight file's size
    with what the graph reads from it, which only a run would have met (ONNX Runtime's own error)."""
    import onnx

    from sdexport.manifest import sha256_file

    path = foreign_export / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    data = path.parent / "model.onnx_data"
    whole = data.read_bytes()
    data.write_bytes(whole[:100_000])
    assert run_cli("adopt", foreign_export) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"unet/model.onnx: its weight file {data.name} (100,000 bytes, the weights need" in err
    assert "is cut short; copy or download it again" in err and not (foreign_export / "manifest.json").exists()
    data.write_bytes(whole)
    assert run_cli("adopt", foreign_export) == 0
    data.write_bytes(whole[:100_000])  # a manifest that hashed the cut copy (an older adopt's): its hash matches
    manifest = json.loads((foreign_export / "manifest.json").read_text())
    manifest["files"]["unet/model.onnx_data"] = sha256_file(data)
    (foreign_export / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("inspect", foreign_export) == 2
    assert "unet/model.onnx: its weight file model.onnx_data (100,000 bytes" in " ".join(capsys.readouterr().err.split())


def test_a_weight_file_linked_out_of_its_graphs_folder_is_refused_by_adopt_and_inspect(foreign_export: Path, capsys):
    """git-annex's (or any deduplicating store's) layout: the weight file is a link into another
    folder of the directory. adopt and inspect passed it, and run then met ONNX Runtime's "External
    data path escapes model directory"."""
    import onnx

    path = foreign_export / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=1024)  # (ONNX Runtime reads the small constants of shapes only in the graph)
    (foreign_export / "blobs").mkdir()
    data = path.parent / "model.onnx_data"
    data.rename(foreign_export / "blobs" / "model.onnx_data")
    data.symlink_to("../blobs/model.onnx_data")
    assert run_cli("adopt", foreign_export) == 2
    line = (f"unet/model.onnx: its weight file model.onnx_data is a link to {foreign_export.resolve()}/blobs/"
            "model.onnx_data, outside the graph's folder, which ONNX Runtime refuses to read")
    assert line in " ".join(capsys.readouterr().err.split())
    data.unlink()
    (foreign_export / "blobs" / "model.onnx_data").rename(data)
    assert run_cli("adopt", foreign_export) == 0
    data.rename(foreign_export / "blobs" / "model.onnx_data")
    data.symlink_to("../blobs/model.onnx_data")  # after adoption (its hash is the file's, through the link)
    capsys.readouterr()
    assert run_cli("inspect", foreign_export) == 2
    assert line in " ".join(capsys.readouterr().err.split())
    # the graph linked into the same store as its weights: ONNX Runtime reads the weights beside the
    # graph's real file, so this one is taken (a review's case)
    path.rename(foreign_export / "blobs" / "model.onnx")
    path.symlink_to("../blobs/model.onnx")
    assert run_cli("inspect", foreign_export) == 0
    assert run_cli("run", foreign_export, "-p", "a", "--steps", "2", "-o", foreign_export.parent / "x.png") == 0, capsys.readouterr().err


def test_a_graph_replaced_in_an_adopted_folder_is_told_to_be_adopted_again(foreign_export: Path, tmp_path: Path,
                                                                            capsys):
    """The other tool exported into the adopted folder again: "re-export or rebuild it" sent the user
    to `sdexport export --force`, which refuses an adopted folder, and to build, which met the same
    hash. `adopt --force` is what mends it, and is said (as is rebuilding, for a file a build added)."""
    import onnx

    assert run_cli("adopt", foreign_export) == 0
    path = foreign_export / "unet" / "model.onnx"
    model = onnx.load(str(path))
    model.producer_version = "again"  # (the same graph, written again by the other tool)
    onnx.save_model(model, str(path))
    capsys.readouterr()
    assert run_cli("run", foreign_export, "-p", "a", "--steps", "2", "-o", tmp_path / "x.png") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unet/model.onnx does not match its sha256 in the manifest (damaged, or replaced since `sdexport adopt`)" in err
    assert f"adopt the folder again: sdexport adopt --force {foreign_export}" in err, err
    assert run_cli("adopt", foreign_export, "--force") == 0
    assert run_cli("run", foreign_export, "-p", "a", "--steps", "2", "-o", tmp_path / "x.png") == 0


def test_a_changed_file_a_build_added_to_an_adopted_folder_is_told_to_be_rebuilt(tmp_path: Path):
    """In an adopted folder, a file sdexport's build added (a plan, a rewritten graph) is sdexport's
    own: changed, it is rebuilt, not adopted again, which would not make it (mutation testing round 8:
    the ``built`` exception, dropped, failed no test)."""
    from sdexport.errors import EngineDirError
    from sdexport.manifest import check_files

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.plan").write_bytes(b"a plan, changed since")
    files = {"unet/model.plan": "0" * 64}
    with pytest.raises(EngineDirError, match=r"unet/model.plan does not match its sha256 in the manifest \(damaged or "
                                             r"replaced\); re-export or rebuild it$"):
        check_files(tmp_path, files, built={"unet/model.plan"}, adopted=True)
    with pytest.raises(EngineDirError, match=r"adopt the folder again: sdexport adopt --force "):
        check_files(tmp_path, files, adopted=True)


def test_a_graph_stamped_with_an_opset_onnx_does_not_know_is_refused_by_adopt(foreign_export: Path, capsys):
    """adopt and inspect passed a U-Net at opset 99, and run met ONNX Runtime's refusal, cut before its
    reason (250 characters of C++ source location and signature came first)."""
    path = foreign_export / "unet" / "model.onnx"
    model = onnx.load(str(path))
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 99
    onnx.save(model, str(path))
    assert run_cli("adopt", foreign_export) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"unet/model.onnx is stamped opset 99, newer than any this onnx {onnx.__version__} knows" in err, err
    assert "ONNX Runtime" not in err  # (another onnx and ONNX Runtime pair may differ: the claim was not ours)


def test_a_graph_of_onnx_runtimes_fused_operators_is_refused_by_adopt(foreign_export: Path, capsys):
    """onnxruntime's optimize_pipeline output was adopted, then failed at run on the CPU (no
    NhwcConv kernel) and at every build: refused, saying what to adopt instead."""
    path = foreign_export / "unet" / "model.onnx"
    model = onnx.load(str(path))
    model.graph.node.append(onnx.helper.make_node("NhwcConv", ["sample"], ["unused"], domain="com.microsoft"))
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    assert run_cli("adopt", foreign_export) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("unet/model.onnx holds ONNX Runtime's fused operators (NhwcConv: onnxruntime's optimize_pipeline or "
            "optimum's --optimize), which TensorRT does not read and the CPU provider runs only in part; adopt the export "
            "from before that step, "
            "then `sdexport build DIR --target onnxruntime-cuda` makes the fused graphs beside it") in err, err
    assert not (foreign_export / "manifest.json").exists()


def test_adopt_names_a_missing_tokenizer_folder_as_missing(foreign_export: Path, capsys):
    """It said 'tokenizer: no tokenizer_config.json', as if the folder were there (an audit)."""
    shutil.rmtree(foreign_export / "tokenizer")
    assert run_cli("adopt", foreign_export) == 2
    assert (f"{foreign_export / 'tokenizer'}: no such folder (the tokenizer, which reads the prompt)"
            in capsys.readouterr().err)


def test_onnx_runtimes_source_location_is_left_out_of_its_one_line_messages():
    from sdexport.errors import one_line

    message = ("[ONNXRuntimeError] : 1 : FAIL : Load model from u.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
               "model_load_utils.h:46 void onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map"
               "<std::__cxx11::basic_string<char>, int>&, const onnxruntime::logging::Logger&, bool, const std::string&, "
               "int) ONNX Runtime only *guarantees* support for models stamped with official released onnx opset "
               "versions. Opset 99 is under development.\n")
    assert one_line(RuntimeError(message)) == ("[ONNXRuntimeError] : 1 : FAIL : Load model from u.onnx failed: ONNX "
                                              "Runtime only *guarantees* support for models stamped with official "
                                              "released onnx opset versions. Opset 99 is under development.")
    plain = "Load model failed: In Node, (\"\", Bogus, \"\", -1) : (\"x\": tensor(float),)"
    assert one_line(RuntimeError(plain)) == plain


def test_inspect_counts_a_graphs_weights_whatever_their_file_is_called(foreign_export: Path, capsys):
    """optimum names its weight file model.onnx_data: the size column counted sdexport's
    model.onnx.data only, and said 0.4 MB for a 3.4 MB U-Net (a real one: 1 MB for 3.4 GB)."""
    import onnx

    path = foreign_export / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    assert run_cli("adopt", foreign_export) == 0
    capsys.readouterr()
    assert run_cli("inspect", foreign_export, "--no-check") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if " unet " in line)
    megabytes = float(row.split("│")[2].split()[0])
    assert megabytes * 1024**2 >= (path.parent / "model.onnx_data").stat().st_size


def test_an_encoder_of_older_optimum_is_refused_saying_the_rest_can_be_adopted_without_it(foreign_export: Path,
                                                                                        tmp_path: Path, capsys):
    """Older optimum's VAE encoder returns latent_sample: the whole adoption was refused with
    "re-export", though text-to-image needs no encoder. The refusal says so, and a directory adopted
    without one is told, for an init image, to add the graph and adopt again (not to "export it too",
    with --components it never had)."""
    def renamed(graph) -> None:
        old = graph.output[0].name
        for node in graph.node:
            node.output[:] = ["latent_sample" if name == old else name for name in node.output]
        graph.output[0].name = "latent_sample"

    _edit_graph(foreign_export / "vae_encoder" / "model.onnx", renamed)
    assert run_cli("adopt", foreign_export) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("returns ['latent_sample'], but a vae_encoder graph takes ['sample'] and returns ['latent_parameters']"
            in err and f"to adopt the rest for text-to-image, move {foreign_export / 'vae_encoder'} out" in err), err
    shutil.move(foreign_export / "vae_encoder", tmp_path / "encoder")
    assert run_cli("adopt", foreign_export) == 0
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    capsys.readouterr()
    assert run_cli("run", foreign_export, "-p", "a", "--init-image", tmp_path / "red.png", "-o", tmp_path / "x.png") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("no vae_encoder (it was adopted with the graphs text_encoder, unet, vae_decoder); add its vae_encoder "
            "graph and adopt it again (--force)") in err, err


def test_another_tools_manifest_json_is_named_as_such_with_the_way_out(foreign_export: Path, capsys):
    """A folder holding another tool's manifest.json went in a circle: adopt said to inspect it,
    inspect "not an sdexport manifest", adopt --force refused to replace it. Each now says to move
    the file out, and adopt is never allowed to replace it."""
    (foreign_export / "manifest.json").write_text('{"name": "another tool"}')
    for args in (["adopt", foreign_export], ["adopt", foreign_export, "--force"]):
        assert run_cli(*args) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "a manifest.json that is not sdexport's (another tool's?)" in err and "move it out" in err, err
    assert run_cli("inspect", foreign_export) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"move that file out of it and adopt it with `sdexport adopt {foreign_export}`" in err, err
    assert (foreign_export / "manifest.json").read_text() == '{"name": "another tool"}'


def test_run_on_a_legacy_diffusers_onnx_export_says_to_export_again_not_to_adopt(foreign_export: Path, capsys):
    """diffusers' older ONNX pipelines (OnnxStableDiffusionPipeline) lack each component's
    config.json: run said to adopt the folder, and adopt then refused an SD 1.x pipeline as one
    sdexport does not run."""
    index = json.loads((foreign_export / "model_index.json").read_text())
    (foreign_export / "model_index.json").write_text(json.dumps({**index, "_class_name": "OnnxStableDiffusionPipeline"}))
    assert run_cli("run", foreign_export, "-p", "a", "-o", foreign_export.parent / "x.png") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "diffusers' older layout" in err and "sdexport adopt" in err and "export the checkpoint again" in err, err
    assert f"`sdexport adopt {foreign_export}`" not in err


def test_adopting_the_current_folder_labels_it_by_its_name(foreign_export: Path, monkeypatch):
    """``adopt .`` labelled the model " (ONNX export adopted by sdexport)", the label every image's
    metadata then carried."""
    from sdexport.manifest import load_manifest

    monkeypatch.chdir(foreign_export)
    assert run_cli("adopt", ".") == 0
    assert load_manifest(foreign_export).model["label"] == "optimum-export (ONNX export adopted by sdexport)"
    link = foreign_export.parent / "sd15-optimum"  # adopted through a link: the link's name, not its target's
    link.symlink_to(foreign_export)
    monkeypatch.chdir(foreign_export.parent)
    assert run_cli("adopt", "sd15-optimum", "--force") == 0
    assert load_manifest(foreign_export).model["label"] == "sd15-optimum (ONNX export adopted by sdexport)"


def test_adopt_refuses_a_cache_folder_inside_the_folder_it_adopts(foreign_export: Path, monkeypatch, capsys):
    """Its hash records went into the folder, and every command then refused the directory (a review)."""
    monkeypatch.setenv("SDEXPORT_CACHE_DIR", str(foreign_export / "cache"))
    assert run_cli("adopt", foreign_export) == 2
    assert f"SDEXPORT_CACHE_DIR={foreign_export / 'cache'}: inside {foreign_export}" in " ".join(
        capsys.readouterr().err.split())
    assert not (foreign_export / "manifest.json").exists() and not (foreign_export / "cache").exists()


def test_optimums_own_save_pretrained_class_names_are_adopted(foreign_export: Path):
    """ORTDiffusionPipeline.save_pretrained writes ORTStableDiffusionPipeline into model_index.json."""
    index = json.loads((foreign_export / "model_index.json").read_text())
    (foreign_export / "model_index.json").write_text(json.dumps({**index, "_class_name": "ORTStableDiffusionPipeline"}))
    assert run_cli("adopt", foreign_export) == 0


def test_an_adopted_folders_versions_are_printed_as_written(foreign_export: Path, capsys):
    """The summary after adopt (and every inspect after it) read the folder's _diffusers_version as
    markup: "0.42.1[/]" ended both in a traceback, "0.42.1 [dev]" lost its bracket (an audit's finding)."""
    index = json.loads((foreign_export / "model_index.json").read_text())
    (foreign_export / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": "0.42.1[/] [dev]"}))
    assert run_cli("adopt", foreign_export) == 0
    capsys.readouterr()
    assert run_cli("inspect", foreign_export, "--no-check") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "(adopted ONNX export (diffusers 0.42.1[/] [dev]" in printed
    # the versions sdexport records are those that adopted the folder, not its exporter's (read as them)
    assert "U-Net opset" in printed and "adopted with sdexport " in printed


def test_the_torch_backend_says_an_adopted_directory_needs_its_model(foreign_export: Path, capsys):
    assert run_cli("adopt", foreign_export) == 0
    assert run_cli("run", foreign_export, *RUN, "--backend", "torch", "-o", foreign_export.parent / "x.png") == 2
    assert "adopted from an ONNX export without its PyTorch model" in " ".join(capsys.readouterr().err.split())


# -- graphs that take what optimum's take ---------------------------------------------------------


def _edit_graph(path: Path, edit) -> None:
    model = onnx.load(str(path))
    edit(model.graph)
    onnx.save(model, str(path))


def _int64_ids(graph) -> None:
    """input_ids as int64, cast to int32 inside (optimum's text encoders take int64)."""
    graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    for node in graph.node:
        node.input[:] = ["input_ids_i32" if i == "input_ids" else i for i in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["input_ids"], ["input_ids_i32"], to=TensorProto.INT32))


def _vector_timestep(graph) -> None:
    """timestep as (1,), reshaped to a scalar inside (older optimum exports)."""
    value = next(v for v in graph.input if v.name == "timestep")
    value.type.tensor_type.shape.dim.add().dim_value = 1
    for node in graph.node:
        node.input[:] = ["timestep_scalar" if i == "timestep" else i for i in node.input]
    graph.initializer.append(helper.make_tensor("scalar_shape", TensorProto.INT64, [0], []))
    graph.node.insert(0, helper.make_node("Reshape", ["timestep", "scalar_shape"], ["timestep_scalar"]))


def _float16_io(graph) -> None:
    """float16 input and output around the float32 decoder (optimum's fp16 exports)."""
    source, result = graph.input[0], graph.output[0]
    for node in graph.node:
        node.input[:] = ["latent_f32" if i == source.name else i for i in node.input]
        node.output[:] = ["sample_f32" if o == result.name else o for o in node.output]
    graph.node.insert(0, helper.make_node("Cast", [source.name], ["latent_f32"], to=TensorProto.FLOAT))
    graph.node.append(helper.make_node("Cast", ["sample_f32"], [result.name], to=TensorProto.FLOAT16))
    source.type.tensor_type.elem_type = result.type.tensor_type.elem_type = TensorProto.FLOAT16


def test_graphs_with_optimums_io_are_bridged(foreign_export: Path, tiny_engine_dir: Path):
    from sdexport.manifest import check_graph, load_manifest

    _edit_graph(foreign_export / "text_encoder" / "model.onnx", _int64_ids)
    _edit_graph(foreign_export / "unet" / "model.onnx", _vector_timestep)
    _edit_graph(foreign_export / "vae_decoder" / "model.onnx", _float16_io)
    assert run_cli("adopt", foreign_export, "--model", "tiny") == 0  # parity through the bridge
    manifest = load_manifest(foreign_export)
    bridged = {n: check_graph(foreign_export, manifest, n).bridged for n in ("text_encoder", "unet", "vae_decoder")}
    assert bridged == {"text_encoder": ["input_ids (int64, rank 2)"], "unet": ["timestep (float32, rank 1)"],
                       "vae_decoder": ["latent_sample (float16, rank 4)", "sample (float16, rank 4)"]}
    np.testing.assert_allclose(_pixels(foreign_export), _pixels(tiny_engine_dir), atol=2e-2)


@pytest.mark.parametrize("component, edit", [("text_encoder", _int64_ids), ("vae_decoder", _float16_io)],
                         ids=["int64-ids", "float16-io"])
def test_the_onnxruntime_cuda_build_takes_adopted_graphs(component: str, edit, foreign_export: Path):
    """Its parity check runs the portable and the fused graph on sample inputs, each fed as it takes
    them (int64 ids); fusions run on a widened fp32 copy, whose inputs and outputs must be float32 too."""
    from sdexport.manifest import load_manifest

    _edit_graph(foreign_export / component / "model.onnx", edit)
    assert run_cli("adopt", foreign_export) == 0
    assert run_cli("build", foreign_export, "--target", "onnxruntime-cuda", "--components", component) == 0
    record = load_manifest(foreign_export).components[component].optimized["onnxruntime-cuda"]
    assert record["parity"]["status"] == "passed-cpu-variant"


def test_tensorrt_profiles_follow_the_graphs_timestep():
    """A scalar timestep has no profile entry; a one-element one (older exports) gets (1,)."""
    from sdexport.build.tensorrt_build import profile_shapes
    from sdexport.graph_io import GraphTensor, check_io
    from sdexport.specs import UNET

    ranges = {"sample": ((1, 4, 8, 8),) * 3, "timestep": ((), (), ()), "encoder_hidden_states": ((1, 77, 32),) * 3}

    def io(rank: int):
        inputs = [GraphTensor("sample", "float32", 4), GraphTensor("timestep", "float32", rank),
                  GraphTensor("encoder_hidden_states", "float32", 3)]
        return check_io(UNET, inputs, [GraphTensor("out_sample", "float32", 4)], "unet")

    assert "timestep" not in profile_shapes(ranges, io(0))
    assert profile_shapes(ranges, io(1))["timestep"] == ((1,), (1,), (1,))
    assert profile_shapes(ranges, io(0))["sample"] == ranges["sample"]


@pytest.mark.parametrize("dropped", ["encoder_hidden_states", "text_embeds", "time_ids"])
def test_a_unet_graph_without_an_input_its_model_reads_is_refused(dropped: str):
    """An SDXL U-Net graph without the pooled embedding (or time ids) ran with it left out, unsaid."""
    from sdexport.errors import EngineDirError
    from sdexport.graph_io import GraphTensor, check_io
    from sdexport.specs import SDXL_UNET

    inputs = [GraphTensor(t.name, "int32" if t.dtype == "int32" else "float32", len(t.dims))
              for t in SDXL_UNET.inputs if t.name != dropped]
    with pytest.raises(EngineDirError, match=f"^unet takes no {dropped}, which its model's configs call for"):
        check_io(SDXL_UNET, inputs, [GraphTensor("out_sample", "float32", 4)], "unet")


def test_a_graph_with_a_wrong_dtype_is_refused_at_load(foreign_export: Path, capsys):
    def float_ids(graph) -> None:
        graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT

    _edit_graph(foreign_export / "text_encoder" / "model.onnx", float_ids)
    assert run_cli("adopt", foreign_export) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "input_ids is float32, but a text_encoder graph's input_ids is int32 or int64" in err


def test_the_onnxruntime_engine_refuses_a_wrong_dtype_when_it_loads(tiny_engine_dir: Path, tmp_path: Path):
    """Not as ONNX Runtime's "Unexpected input data type" in the middle of the loop."""
    from sdexport.manifest import load_manifest
    from sdexport.runtime.onnxruntime_backend import OnnxRuntimeEngine

    manifest = load_manifest(tiny_engine_dir)
    path = tmp_path / "model.onnx"
    shutil.copy(tiny_engine_dir / "unet" / "model.onnx", path)

    def int_timestep(graph) -> None:
        value = next(v for v in graph.input if v.name == "timestep")
        value.type.tensor_type.elem_type = TensorProto.INT64
        for node in graph.node:
            node.input[:] = ["t_f32" if i == "timestep" else i for i in node.input]
        graph.node.insert(0, helper.make_node("Cast", ["timestep"], ["t_f32"], to=TensorProto.FLOAT))

    _edit_graph(path, int_timestep)
    with pytest.raises(EngineDirError, match="timestep is int64, but a unet graph's timestep is float32 or float16"):
        OnnxRuntimeEngine(manifest.spec("unet"), path, dims=manifest.model_dims, profile=manifest.shape_profile)


# -- the end-to-end check with optimum and ONNX Runtime's tool --------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize(("cases", "variants"), [
    # both pipelines, both precisions. Of ONNX Runtime's optimizer: the variant whose output optimum
    # runs, and --float16 (the tool's own fp16 conversion, which nothing else checks on our graphs).
    # Its defaults, left to -m slow, are --float16's fusions without the conversion (and without
    # packed QKV/KV): the fusions build --target onnxruntime-cuda runs, which test_onnxruntime_build checks.
    pytest.param("sd-fp32,sdxl-fp16", "cpu,float16", id="sd-fp32,sdxl-fp16"),
    pytest.param("", "", id="all", marks=pytest.mark.slow),
])
def test_optimum_and_onnxruntime_tools_read_our_directories_and_we_read_theirs(cases: str, variants: str,
                                                                                tmp_path: Path):
    """scripts/interop-check.sh: builds (once) a virtualenv with optimum from PyPI; about a minute
    for the default run's two cases, more for all four (README, "Interop")."""
    run = subprocess.run(["bash", str(REPO / "scripts" / "interop-check.sh"), str(tmp_path / "work")],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable, "SDEXPORT_INTEROP_CASES": cases,
                              "SDEXPORT_INTEROP_OPTIMIZE": variants})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert report["comparisons"] and all(c["passed"] for c in report["comparisons"])
    assert all(r["accepted"] for r in report["optimize_pipeline"].values())
    assert report["cases"] == (cases.split(",") if cases else ["sd-fp32", "sd-fp16", "sdxl-fp32", "sdxl-fp16"])
    assert report["optimum_exports"] == (["tiny"] if cases else ["tiny", "tiny-sdxl"])
    assert report["optimizer_variants"] == (variants.split(",") if variants else ["cuda", "float16", "cpu"])
    labels = {"cuda": "", "float16": " --float16", "cpu": " (CPU operators)"}
    assert set(report["optimize_pipeline"]) == {f"{case}{labels[variant]}" for case in report["cases"]
                                                if case.endswith("fp32") for variant in report["optimizer_variants"]}
    for name, result in report["optimize_pipeline"].items():  # accepted, and the attention fused (packed in fp16)
        unet = result["fused_operators"]["unet"]
        assert unet.get("Attention", 0) + unet.get("MultiHeadAttention", 0) > 0, name
    optimized = [c["check"] for c in report["comparisons"] if "optimize_pipeline" in c["check"]]
    assert optimized == [f"{case}: optimum on ONNX Runtime's optimize_pipeline output" for case in report["cases"]
                         if case.endswith("fp32")]


def test_the_interop_check_refuses_an_unknown_case_or_variant_before_building_anything(tmp_path: Path):
    run = subprocess.run(["bash", str(REPO / "scripts" / "interop-check.sh"), str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": sys.executable, "SDEXPORT_INTEROP_VENV": str(tmp_path / "venv"),
                              "SDEXPORT_INTEROP_CASES": "sd-fp32,sd-fp8", "SDEXPORT_INTEROP_OPTIMIZE": ""})
    assert run.returncode == 2 and "unknown case sd-fp8 (cases: sd-fp32, sd-fp16, sdxl-fp32, sdxl-fp16)" in run.stderr
    run = subprocess.run(["bash", str(REPO / "scripts" / "interop-check.sh"), str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": sys.executable, "SDEXPORT_INTEROP_VENV": str(tmp_path / "venv"),
                              "SDEXPORT_INTEROP_CASES": "", "SDEXPORT_INTEROP_OPTIMIZE": "cpu,tensorrt"})
    assert run.returncode == 2 and "unknown variant tensorrt (variants: cuda, float16, cpu)" in run.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "work").exists()


def test_the_interop_check_removes_no_folder_it_did_not_make(tmp_path: Path):
    """SDEXPORT_INTEROP_VENV naming the user's own folder (a project, another virtualenv, ``.``) is
    refused, not emptied to build optimum's environment in."""
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "main.py").write_text("my code\n")
    run = subprocess.run(["bash", str(REPO / "scripts" / "interop-check.sh"), str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": sys.executable, "SDEXPORT_INTEROP_VENV": str(mine),
                              "SDEXPORT_INTEROP_CASES": "sd-fp32", "SDEXPORT_INTEROP_OPTIMIZE": ""})
    assert run.returncode == 2, run.stderr
    assert f"{mine} holds files this script did not make" in run.stderr
    assert (mine / "src" / "main.py").read_text() == "my code\n"


def test_the_optimum_environment_shares_torch_only_when_the_pin_is_the_installed_version():
    """interop-check.sh links sdexport's torch into optimum's virtualenv (instead of installing 900 MB
    again) only when SDEXPORT_TORCH pins exactly the installed version; only torch's own entries."""
    from importlib.metadata import version

    sys.path.insert(0, str(REPO / "scripts" / "interop"))
    try:
        from shared_torch import shared_torch
    finally:
        sys.path.pop(0)
    installed = version("torch")
    public = installed.split("+")[0]
    found, site, entries = shared_torch(f"torch=={public}").split("\t")
    assert found == installed and shared_torch(f"torch=={installed}") == shared_torch(f"torch=={public}")
    assert "torch" in entries.split(",") and all(not e.startswith("..") and (Path(site) / e).exists()
                                                 for e in entries.split(","))
    assert not any(e.startswith(("numpy", "sympy", "onnx")) for e in entries.split(","))
    for other in (f"torch=={public}.post9", f"torch=={public}+other", f"torch>={public}", "torch",
                  "https://example.com/torch.whl", f"numpy=={public}", f"torch=={public},<3"):
        assert shared_torch(other) == "", other


def test_export_force_never_replaces_a_directory_adopted_with_its_model(foreign_export: Path, capsys):
    """``adopt --model`` proves another tool's graphs against the model and records it as the source
    (``adopted_from``), not as ``onnx``: the files are still that tool's, and ``export --force`` refuses them."""
    from sdexport.manifest import load_manifest

    assert run_cli("adopt", foreign_export, "--model", "tiny") == 0
    manifest = (foreign_export / "manifest.json").read_bytes()
    capsys.readouterr()
    assert run_cli("export", "tiny", "-o", foreign_export, "--force") == 2
    assert "`sdexport adopt` gave a manifest: its files are not sdexport's" in " ".join(capsys.readouterr().err.split())
    assert (foreign_export / "manifest.json").read_bytes() == manifest
    assert load_manifest(foreign_export).model["source"]["adopted_from"]


# From mutation testing round 6


def test_the_reexport_command_names_everything_the_manifest_recorded():
    """The command a format-1 refusal gives writes the same directory again: the source as the user
    named it, every axis of the profile (a missing --width re-exports the default sizes), the
    architecture, VAE and seed of the weights, and the components it had."""
    from sdexport.manifest import reexport_command

    data = {"model": {"source": {"argument": "my model", "name": "tiny", "path": "/elsewhere", "config": "sd15",
                                 "vae": "vae-dir", "seed": 3}},
            "dtype": "fp16", "profile": {"batch": [1, 1, 2], "height": [64, 128, 256], "width": [64, 96, 128]},
            "components": {"text_encoder": {}, "unet": {}, "vae_decoder": {}}}
    assert reexport_command(Path("/engines/sd"), data) == (
        "sdexport export 'my model' -o /engines/sd --force --dtype fp16 --batch 1:1:2 --height 64:128:256 "
        "--width 64:96:128 --config sd15 --vae vae-dir --seed 3 --components text_encoder,unet,vae_decoder")


def test_adopt_refuses_a_directory_whose_manifest_is_a_dangling_link(foreign_export: Path, tmp_path: Path, capsys):
    """A manifest.json that is a link to nothing is still someone's manifest (a directory being
    copied, a moved target): adopt refuses it as any manifest, and leaves the link as it was."""
    (foreign_export / "manifest.json").symlink_to(tmp_path / "gone.json")
    assert run_cli("adopt", foreign_export) == 2
    assert "already has a manifest.json" in " ".join(capsys.readouterr().err.split())
    assert (foreign_export / "manifest.json").is_symlink() and not (tmp_path / "gone.json").exists()


def test_adopt_force_replaces_a_manifest_adopt_wrote_with_the_model_but_never_through_a_link(
        foreign_export: Path, tmp_path: Path, capsys):
    """``adopt --model`` records the model as the source (``adopted_from`` beside it, not ``onnx``):
    still adopt's own manifest, which ``--force`` replaces. A manifest.json that links to an adopted
    manifest elsewhere is not this directory's, and is refused."""
    assert run_cli("adopt", foreign_export, "--model", "tiny") == 0
    assert run_cli("adopt", foreign_export, "--force") == 0
    elsewhere = tmp_path / "adopted.json"
    (foreign_export / "manifest.json").rename(elsewhere)
    (foreign_export / "manifest.json").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    capsys.readouterr()
    assert run_cli("adopt", foreign_export, "--force") == 2
    assert "not a manifest `sdexport adopt` wrote; refusing to replace it" in capsys.readouterr().err
    assert (foreign_export / "manifest.json").is_symlink() and elsewhere.read_bytes() == before


def test_adopt_takes_a_model_index_that_names_no_scheduler(foreign_export: Path):
    """The scheduler class is compared only where model_index.json names one: without it, the
    saved scheduler config is what both diffusers and the runtime read."""
    index = json.loads((foreign_export / "model_index.json").read_text())
    del index["scheduler"]
    (foreign_export / "model_index.json").write_text(json.dumps(index))
    assert run_cli("adopt", foreign_export) == 0


def test_adopt_refuses_a_u_net_conditioned_on_more_than_the_latents_other_than_inpainting(
        foreign_export: Path, capsys):
    """A U-Net of twice the latent channels (instruct-pix2pix's image conditioning) is neither text
    to image nor inpainting (2 × 4 + 1): refused for what it is, before any graph is read."""
    config = json.loads((foreign_export / "unet" / "config.json").read_text())
    (foreign_export / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 8}))
    assert run_cli("adopt", foreign_export) == 2
    assert ("the U-Net takes 8 channels and the VAE makes 4: a conditioned U-Net other than inpainting (9)"
            in " ".join(capsys.readouterr().err.split()))


@pytest.mark.parametrize(("file", "key", "words"), [
    ("tokenizer/tokenizer_config.json", "model_max_length", "model_max_length True is not a sequence length"),
    ("vae_decoder/config.json", "scaling_factor", "scaling_factor True is not a positive number"),
])
def test_adopt_refuses_a_true_where_a_config_needs_a_number(foreign_export: Path, capsys, file: str, key: str,
                                                            words: str):
    """JSON's true is Python's 1: read as a number it would give a text length of one token, or a
    latent scale of 1, and the graphs would pass their checks with it."""
    config = json.loads((foreign_export / file).read_text())
    (foreign_export / file).write_text(json.dumps({**config, key: True}))
    assert run_cli("adopt", foreign_export) == 2
    assert words in " ".join(capsys.readouterr().err.split())
    assert not (foreign_export / "manifest.json").exists()


def test_an_adopted_v_prediction_model_keeps_its_prediction_type(foreign_export: Path):
    """SD 2.x's 768 models predict v: the scheduler config says so, and the manifest the runtime
    samples by must too (read as epsilon, every image is noise)."""
    from sdexport.manifest import load_manifest

    path = foreign_export / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    assert run_cli("adopt", foreign_export) == 0
    assert load_manifest(foreign_export).prediction_type == "v_prediction"


def test_a_forced_adoption_keeps_a_built_file_changed_since(tmp_path: Path):
    """Only a file that still matches the sha256 the old manifest recorded is sdexport's to remove:
    one replaced since (the user's own plan, a copy) stays."""
    from sdexport.export.adopt import _built_files, _remove_forgotten
    from sdexport.manifest import sha256_file

    plan = tmp_path / "unet" / "0123.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "files": {"unet/0123.plan": sha256_file(plan)},
        "components": {"unet": {"engines": {"k": {"path": "unet/0123.plan"}}}}}))
    built = _built_files(tmp_path)
    plan.write_bytes(b"the user's own plan")
    _remove_forgotten(tmp_path, built, {})
    assert plan.read_bytes() == b"the user's own plan"

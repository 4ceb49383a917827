"""LoRA: fused at export (matching diffusers' load_lora_weights + fuse_lora, and PEFT's own merge for
the text encoder), and switched at run time without re-exporting (matching the fused export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import bench_refusal, run_cli
from sdexport.errors import EngineDirError, SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.lora import LoraFile
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("without_gpu")

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


def _random_peft_state(module: torch.nn.Module, targets: list[str], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout LoRA for ``module``'s layers whose names end in ``targets``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in module.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        if isinstance(layer, torch.nn.Linear):
            down, up = (RANK, layer.in_features), (layer.out_features, RANK)
        elif isinstance(layer, torch.nn.Conv2d):
            down, up = (RANK, layer.in_channels, *layer.kernel_size), (layer.out_channels, RANK, 1, 1)
        else:
            continue
        state[f"{prefix}.{name}.lora_A.weight"] = torch.randn(down, generator=generator) * 0.3
        state[f"{prefix}.{name}.lora_B.weight"] = torch.randn(up, generator=generator) * 0.3
    return state


KOHYA_MODULES = {  # kohya name: (down, up) shapes in the tiny model
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((RANK, 32), (32, RANK)),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0": ((RANK, 32), (32, RANK)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((RANK, 32, 1, 1), (32, RANK, 1, 1)),  # a 1x1 conv in SD 1.x
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": ((RANK, 32), (256, RANK)),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((RANK, 32, 3, 3), (32, RANK, 1, 1)),
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": ((RANK, 128), (32, RANK)),
    "lora_te_text_model_encoder_layers_1_self_attn_k_proj": ((RANK, 32), (32, RANK)),
}


def _kohya_state(seed: int, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """The kohya/A1111 layout: underscores for dots, lora_down/lora_up and a per-module alpha, on
    attention, projection, feed-forward, 3x3 convolution and time-embedding layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (down, up) in KOHYA_MODULES.items():
        state[f"{module}.lora_down.weight"] = torch.randn(down, generator=generator) * 0.3
        state[f"{module}.lora_up.weight"] = torch.randn(up, generator=generator) * 0.3
        state[f"{module}.alpha"] = torch.tensor(alpha)
    return state


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    model = load_model("tiny")
    files = {
        "unet": _random_peft_state(model.modules["unet"], UNET_TARGETS, "unet", 1),
        "text": _random_peft_state(model.modules["text_encoder"], TEXT_TARGETS, "text_encoder", 2),
        "kohya": _kohya_state(3),
    }
    files["both"] = {**files["unet"], **files["text"]}
    paths = {}
    for name, state in files.items():
        paths[name] = root / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def fused_dir(lora_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "tiny-lora"
    loras = [LoraFile(lora_files["both"], 0.8), LoraFile(lora_files["kohya"], 0.6)]
    export("tiny", out, ExportOptions(verify="quick", loras=loras))
    return out


REQUEST = GenerationRequest(prompt=["a lighthouse", "a harbour"], steps=6, seeds=[5, 6], height=64, width=64,
                            scheduler="euler_a")


def _rel(a, b) -> float:
    return float(torch.linalg.norm(a.latents - b.latents) / torch.linalg.norm(b.latents))


@pytest.mark.parametrize(("file", "scale"), [("unet", 0.8), ("kohya-unet", 1.0), ("metadata", 0.25),
                                             ("metadata-rslora", 0.25)])
def test_export_fuses_as_diffusers_does(lora_files, tmp_path, file, scale):
    """A U-Net LoRA, fused at export, against diffusers' load_lora_weights + fuse_lora (diffusers'
    text-encoder loading goes through transformers' PEFT integration, which refuses every PEFT on PyPI
    with the pinned transformers; the text encoder is checked against PEFT itself below)."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the dev extra)")
    from sdexport.bench.reference import DiffusersReference

    path = lora_files["unet"]
    if file == "kohya-unet":  # alpha 8 at rank 4: a scale of 2 on every kind of layer
        path = tmp_path / "kohya-unet.safetensors"
        save_file({k: v for k, v in _kohya_state(3, alpha=8.0).items() if k.startswith("lora_unet")}, str(path))
    if file.startswith("metadata"):  # diffusers' own save with the PEFT config: lora_alpha 16 at rank 4
        import diffusers
        from safetensors.torch import load_file

        state = {k.removeprefix("unet."): v for k, v in load_file(str(lora_files["unet"])).items()}
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path / "meta", unet_lora_layers=state,
            unet_lora_adapter_metadata={"r": RANK, "lora_alpha": 16, "target_modules": UNET_TARGETS,
                                        "rank_pattern": {}, "alpha_pattern": {},  # (diffusers 0.39 reads both)
                                        "use_rslora": file == "metadata-rslora"})  # (alpha / sqrt(rank))
        path = tmp_path / "meta" / "pytorch_lora_weights.safetensors"
    out = tmp_path / "engines"
    export("tiny", out, ExportOptions(verify="quick", loras=[LoraFile(path, scale)]))
    reference = DiffusersReference(load_model("tiny"))
    reference.pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # (diffusers 0.39 offline: by name)
    reference.pipe.fuse_lora(lora_scale=scale)
    ours = load_pipeline(out, "onnxruntime-cpu")(REQUEST)
    assert _rel(ours, reference(REQUEST)) < 1e-4
    assert _rel(ours, load_pipeline(out, "torch")(REQUEST)) < 1e-4  # the Torch backend fuses it again


def test_text_encoder_updates_match_peft(lora_files):
    """The text encoder's fused weights equal PEFT's own merge of the same file."""
    pytest.importorskip("peft", reason="the reference is PEFT's merge (the dev extra)")
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from sdexport.models.lora import fuse_into

    ours = load_model("tiny")
    fuse_into(ours.modules, [LoraFile(lora_files["text"], 0.5)], "sd")
    theirs = load_model("tiny").modules["text_encoder"]
    config = LoraConfig(r=RANK, lora_alpha=RANK * 0.5, target_modules=TEXT_TARGETS)  # alpha/r = the scale
    theirs = inject_adapter_in_model(config, theirs)
    state = {k.removeprefix("text_encoder."): v for k, v in load_file(str(lora_files["text"])).items()}
    set_peft_model_state_dict(theirs, state)
    for layer in theirs.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    changed = 0
    for name, value in ours.modules["text_encoder"].state_dict().items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6)
        changed += not torch.equal(value, load_model("tiny").modules["text_encoder"].state_dict()[name])
    assert changed == 2 * 3  # q_proj, v_proj, fc1 in each of the 2 layers


def test_manifest_records_each_file(fused_dir, lora_files):
    manifest = load_manifest(fused_dir)
    records = manifest.model["loras"]
    assert [Path(r["path"]).name for r in records] == ["both.safetensors", "kohya.safetensors"]
    assert [r["scale"] for r in records] == [0.8, 0.6]
    assert all(len(r["sha256"]) == 64 for r in records)
    assert "+ LoRA both.safetensors:0.8, kohya.safetensors:0.6" in manifest.model["label"]


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
def test_run_time_lora_matches_the_fused_export(tiny_engine_dir, fused_dir, lora_files, backend):
    """The same files given to `run --lora` on a plain export: no re-export, the fused result."""
    loras = [LoraFile(lora_files["both"], 0.8), LoraFile(lora_files["kohya"], 0.6)]
    fused = load_pipeline(fused_dir, "onnxruntime-cpu")(REQUEST)
    switched = load_pipeline(tiny_engine_dir, backend, loras=loras)(REQUEST)
    plain = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")(REQUEST)
    assert _rel(plain, fused) > 1e-2  # the LoRA changes the result: the test can tell
    assert _rel(switched, fused) < 1e-5
    assert json.loads((tiny_engine_dir / "unet" / "weights.json").read_text())  # files unchanged: still plain
    assert _rel(load_pipeline(tiny_engine_dir, "onnxruntime-cpu")(REQUEST), plain) == 0


def test_a_run_time_lora_at_scale_0_gives_the_plain_pipelines_image(tiny_engine_dir, lora_files):
    """A LoRA slider at 0 is off: on ONNX Runtime, whose sessions with changed weights run at another
    optimisation level, it gave other pixels (latents 4.6e-5 apart at 20 steps, 1/255). Its file is
    still read and matched: a LoRA that does not fit is refused at any scale."""
    plain = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")(REQUEST)
    zero = load_pipeline(tiny_engine_dir, "onnxruntime-cpu", loras=[LoraFile(lora_files["both"], 0.0)])(REQUEST)
    assert torch.equal(zero.latents, plain.latents)


def test_a_lora_fused_at_export_and_added_again_at_run_time_is_noted(fused_dir, lora_files, capsys, tmp_path):
    """Its scales add up (0.8 fused + 1.0 added): maybe meant, so a note rather than a refusal. The
    same file by its contents: a copy was not noted, and another file at the recorded path was."""
    load_pipeline(fused_dir, "onnxruntime-cpu", loras=[LoraFile(lora_files["both"], 1.0)])
    said = " ".join(capsys.readouterr().err.split())
    assert (f"note: LoRA {lora_files['both']} was fused into this directory at export (scale 0.8); added again "
            "at run time it applies twice (0.8 + 1)") in said
    load_pipeline(fused_dir, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"], 1.0)])  # another file: no note
    assert "was fused into this directory" not in capsys.readouterr().err
    copy = tmp_path / "copy.safetensors"
    shutil.copy(lora_files["both"], copy)
    load_pipeline(fused_dir, "onnxruntime-cpu", loras=[LoraFile(copy, 1.0)])
    assert (f"note: LoRA {copy} was fused into this directory at export as {lora_files['both'].resolve()} (scale 0.8)"
            in " ".join(capsys.readouterr().err.split()))
    record = load_manifest(fused_dir).model["loras"][0]
    record_path = Path(record["path"])
    kept = record_path.read_bytes()
    try:  # another LoRA written at the recorded path since: not the one fused
        record_path.write_bytes(lora_files["unet"].read_bytes())
        load_pipeline(fused_dir, "onnxruntime-cpu", loras=[LoraFile(record_path, 1.0)])
    finally:
        record_path.write_bytes(kept)
    assert "was fused into this directory" not in capsys.readouterr().err


def test_cli_export_and_run_with_lora(tiny_engine_dir, lora_files, tmp_path, capsys):
    out = tmp_path / "lora.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "3", "--height", "64", "--width", "64",
                   "--lora", f"{lora_files['unet']}:0.7", "-o", out) == 0
    from PIL import Image

    with Image.open(out) as image:
        record = json.loads(image.text["sdexport"])
    assert record["loras"] == [{"path": str(lora_files["unet"]), "scale": 0.7}]
    engines = tmp_path / "engines"
    assert run_cli("export", "tiny", "-o", engines, "--verify", "none", "--components", "text_encoder,unet,vae_decoder",
                   "--lora", str(lora_files["kohya"])) == 0
    assert load_manifest(engines).model["loras"][0]["scale"] == 1.0
    # a LoRA of the text encoder alone, on an export without one: recorded as fused, it changed nothing
    assert run_cli("export", "tiny", "-o", tmp_path / "unet-only", "--verify", "none", "--components", "unet",
                   "--lora", str(lora_files["text"])) == 2
    assert not (tmp_path / "unet-only").exists()
    assert "it changes only text_encoder, which this export leaves out" in capsys.readouterr().err
    # a LoRA of both, on an export of one: fused where it can be, and the part left out said so
    assert run_cli("export", "tiny", "-o", tmp_path / "unet-only", "--verify", "none", "--components", "unet",
                   "--lora", str(lora_files["both"])) == 0
    assert (f"note: --lora {lora_files['both']}: its text_encoder part is not fused: this export leaves it out "
            "(--components); unet gets the rest") in " ".join(capsys.readouterr().err.split())


def _mismatched_files(tmp_path: Path) -> dict[str, Path]:
    shapes = tmp_path / "shapes.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(shapes))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"unet.mid_block.nowhere.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.mid_block.nowhere.to_q.lora_B.weight": torch.zeros(32, 4)}, str(unknown))
    alone = tmp_path / "alone.safetensors"  # numbered: its module is attn1, as to_out.0's (a review)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.0.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.0.lora_B.weight": torch.zeros(32, 4)},
              str(alone))
    pickled = tmp_path / "pickled.safetensors"  # (told to be named .ckpt, then refused as one: a review)
    torch.save({"w": torch.zeros(1)}, pickled)
    sibling = tmp_path / "sibling.safetensors"  # a layer beside those of a module the model has
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_x.lora_B.weight": torch.zeros(32, 4)},
              str(sibling))
    other = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, str(other))
    text = tmp_path / "not-a-lora.safetensors"
    text.write_text("hello")
    ckpt = tmp_path / "lora.ckpt"
    ckpt.write_bytes(b"x")
    nan = tmp_path / "nan.safetensors"  # (it fits: only its values are wrong)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight":
                   torch.full((32, 4), float("nan"), dtype=torch.float16)}, str(nan))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    return {"shapes": shapes, "unknown": unknown, "sibling": sibling, "alone": alone, "pickled": pickled, "empty": empty, "other": other, "text": text, "ckpt": ckpt, "nan": nan}


def test_only_the_layers_of_a_weight_map_come_with_its_reason_for_leaving_one_out(tiny_engine_dir, tmp_path):
    """The Torch backend matches a LoRA against the modules themselves: a layer it lacks is just
    missing, with no word of weights.json (a review's find: it said so for every backend)."""
    from sdexport.models.lora import torch_layers
    from sdexport.runtime.lora_runtime import updates_for

    manifest = load_manifest(tiny_engine_dir)
    lora = LoraFile(_mismatched_files(tmp_path)["unknown"])
    with pytest.raises(SdexportError) as refused:
        updates_for(manifest, [lora], torch_layers(load_model("tiny").modules))
    assert str(refused.value).endswith("(no such linear or convolution layer)")


def test_a_float8_lora_is_read(tiny_engine_dir, tmp_path):
    """A LoRA saved in float8 runs as before the check for NaN values (torch has no isfinite for
    float8_e4m3fn: it is asked of the float32 values)."""
    fp8 = tmp_path / "fp8.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
               torch.randn(4, 32).to(torch.float8_e4m3fn),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight":
               torch.randn(32, 4).to(torch.float8_e4m3fn)}, str(fp8))
    from sdexport.models.lora import read_updates

    assert [u.module for u in read_updates(LoraFile(fp8), "sd")] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]


@pytest.mark.parametrize(
    ("command", "file", "message"),
    [
        ("run", "shapes", ("does not fit this model: 1 mismatches, first unet.down_blocks.0.attentions.0."
                          "transformer_blocks.0.attn1.to_q (LoRA makes [32, 48], the layer has [32, 32])")),
        # weights.json's way out only for a layer the model may have: for a block it lacks (an SDXL
        # LoRA given to SD), it sent the user to an export that failed alike (an audit)
        ("run", "unknown", "unet.mid_block.nowhere.to_q (no such linear or convolution layer)"),
        ("run", "sibling", ("attn1.to_x (no such linear or convolution layer) (the export's weights.json also leaves "
                            "out any layer whose weight the exported graph reads as another tensor as well: fuse a "
                            "LoRA for such a layer at export, sdexport export --lora)")),
        ("export", "unknown", "unet.mid_block.nowhere.to_q (no such linear or convolution layer)"),
        ("run", "other", "tensors for no part of an SD pipeline"),
        ("run", "text", "not a readable safetensors file"),
        ("run", "alone", "attn1.to_x.0 (no such linear or convolution layer) (the export's weights.json also leaves"),
        ("export", "pickled", ("--lora {pickled}: not a readable safetensors file (a torch checkpoint by its content: "
                              "convert it to .safetensors)")),
        ("export", "empty", "--lora {empty}: not a readable safetensors file (empty (0 bytes): an interrupted download"),
        ("export", "ckpt", "LoRA files are read as .safetensors"),
        ("run", "nan", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q holds NaN or infinite values"),
        ("export", "nan", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q holds NaN or infinite"),
        ("run", "missing", "no such file"),
        ("run", "scale", "the scale after ':' is not a finite number"),
        ("export", "huge", "the scale after ':' is not a finite number within float32's range"),  # 1e39: inf to the U-Net
    ],
)
def test_loras_that_do_not_fit_are_refused_in_one_line(tiny_engine_dir, tmp_path, capsys, command, file, message):
    files = _mismatched_files(tmp_path)
    argument = {"missing": str(tmp_path / "nope.safetensors"), "scale": f"{files['shapes']}:nan",
                "huge": f"{files['shapes']}:1e39"}.get(file) or str(files[file])
    out = tmp_path / "out"
    args = (["run", tiny_engine_dir, "-p", "x", "--steps", "2", "--height", "64", "--width", "64", "-o", out / "x.png"]
            if command == "run" else ["export", "tiny", "-o", out, "--verify", "none"])
    assert run_cli(*args, "--lora", argument) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message.format(**files) in err, err
    assert file != "unknown" or "weights.json" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch", pytest.param("export", marks=pytest.mark.slow)])
def test_a_lora_whose_update_is_not_finite_is_refused_before_the_loop(tiny_engine_dir, tmp_path, capsys, backend):
    """Each factor and the scale were checked finite, not their product: a scale of 1e38 (or factors
    of 1e30) made infinite weights, seen only as NaN latents after the whole loop (an audit). (The
    export fuses through the Torch backend's add_updates: that case with -m slow.)"""
    state = _kohya_state(3)
    big = tmp_path / "big.safetensors"
    save_file({k: v * 1e30 if k.endswith("_up.weight") or k.endswith("_down.weight") else v for k, v in state.items()},
              str(big))
    out = tmp_path / "x.png"
    if backend == "export":
        assert run_cli("export", "tiny", "-o", tmp_path / "out", "--verify", "none", "--lora", big) == 2
    else:
        assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "2", "--backend", backend, "--lora", big,
                       "-o", out) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "weight with the LoRA update added is not finite in float32" in err and "lower the scale" in err, err
    assert "NaN" not in err and not out.exists() and not (tmp_path / "out").exists()


def test_a_lora_given_twice_at_run_time_is_noted(tiny_engine_dir, lora_files, capsys, tmp_path):
    """Its scales added without a word (an audit); a note, as for one fused at export and given again."""
    copy = tmp_path / "copy.safetensors"
    shutil.copy(lora_files["unet"], copy)
    load_pipeline(tiny_engine_dir, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"], 1.0), LoraFile(copy, -0.5),
                                                             LoraFile(lora_files["text"], 1.0)])
    said = " ".join(capsys.readouterr().err.split())
    assert f"note: LoRA {lora_files['unet']} is given 2 times; it applies 2 times (1 + -0.5)" in said, said
    assert said.count("note: LoRA") == 1


def test_a_lora_given_as_a_url_is_told_to_be_downloaded():
    """diffusers' loaders take URLs: the refusal named 'https:' and a path with its slashes collapsed."""
    with pytest.raises(SdexportError, match=r"^--lora https://example.com/l.safetensors:0.5: a URL\? sdexport reads "
                                            r"local files: download it first$"):
        LoraFile.parse("https://example.com/l.safetensors:0.5")


def test_run_time_lora_needs_what_it_changes(tiny_engine_dir, lora_files, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_engine_dir, copy)
    (copy / "unet" / "weights.json").unlink()  # as an older sdexport (or an adopted export) left it
    from sdexport.manifest import save_manifest

    manifest = load_manifest(copy, verify_files=False)
    del manifest.files["unet/weights.json"]
    save_manifest(copy, manifest)
    with pytest.raises(EngineDirError, match="no weights.json, which run-time LoRA needs"):
        load_pipeline(copy, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"])])


def test_torch_backend_refuses_a_changed_lora_file(lora_files, tmp_path):
    path = tmp_path / "mine.safetensors"
    shutil.copy(lora_files["unet"], path)
    out = tmp_path / "engines"
    export("tiny", out, ExportOptions(verify="none", components=["text_encoder", "unet", "vae_decoder"],
                                      loras=[LoraFile(path)]))
    state = {"unet.conv_in.lora_A.weight": torch.zeros(RANK, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, RANK, 1, 1)}
    save_file(state, str(path))
    with pytest.raises(EngineDirError, match="changed since it was fused at export"):
        load_pipeline(out, "torch")


def test_sdxl_run_time_lora_matches_the_fused_export(tiny_sdxl_engine_dir, tmp_path):
    model = load_model("tiny-sdxl")
    state = {**_random_peft_state(model.modules["unet"], ["to_q", "to_v"], "unet", 4),
             **_random_peft_state(model.modules["text_encoder_2"], ["q_proj"], "text_encoder_2", 5)}
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))
    plain, fused = tiny_sdxl_engine_dir, tmp_path / "fused"
    export("tiny-sdxl", fused, ExportOptions(verify="none", loras=[LoraFile(path, 0.9)]))
    request = GenerationRequest(prompt=["x"], steps=4, height=64, width=64)
    a = load_pipeline(plain, "onnxruntime-cpu", loras=[LoraFile(path, 0.9)])(request)
    b = load_pipeline(fused, "onnxruntime-cpu")(request)
    assert _rel(a, b) < 1e-5
    assert np.abs(a.pixels - b.pixels).max() < 1e-4


def test_run_time_lora_hashes_what_it_reads(tiny_engine_dir, lora_files, tmp_path):
    """weights.json says where each weight is: a changed one is refused like a changed graph (also
    for TensorRT, whose refit reads the portable graph and this file, not the plans it loads)."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, copy)
    names = json.loads((copy / "unet" / "weights.json").read_text())
    first = sorted(names)[0]
    names[first]["transposed"] = not names[first]["transposed"]
    (copy / "unet" / "weights.json").write_text(json.dumps(names))
    load_pipeline(copy, "torch", loras=[LoraFile(lora_files["unet"])])  # the Torch backend reads its modules
    with pytest.raises(EngineDirError, match=r"unet/weights.json"):
        load_pipeline(copy, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"])])


@pytest.mark.parametrize("damage, words", [
    ("{garbage", "damaged, not valid JSON"),
    ('{"conv_in.weight": {"initializer": 3}}', "not a weight map sdexport wrote"),
    ('{"conv_in.weight": {"initializer": "w", "transposed": "no"}}', "not a weight map sdexport wrote"),
])
def test_a_damaged_weight_map_is_one_line(tiny_engine_dir, lora_files, tmp_path, damage, words):
    """A damaged weights.json was a JSONDecodeError or KeyError traceback (run-time LoRA reads only
    one the manifest lists and hashes, since 2026-12-07; read_weight_map still refuses garbage)."""
    from sdexport.export.weight_names import read_weight_map

    (tmp_path / "weights.json").write_text(damage)
    with pytest.raises(EngineDirError, match=words):
        read_weight_map(tmp_path)


def test_sdxl_kohya_files_named_after_the_original_blocks(tmp_path):
    """SDXL kohya files often name the U-Net's original blocks (input_blocks_3_1): diffusers maps them
    with the U-Net's config; so does sdexport, at export and at run time."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the dev extra)")
    from sdexport.bench.reference import DiffusersReference
    from sdexport.models.lora import fuse_into

    module = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "sgm.safetensors"
    save_file({f"{module}.lora_down.weight": torch.randn(RANK, 64, generator=generator),
               f"{module}.lora_up.weight": torch.randn(64, RANK, generator=generator),
               f"{module}.alpha": torch.tensor(2.0)}, str(path))
    reference = DiffusersReference(load_model("tiny-sdxl"))
    reference.pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # (diffusers 0.39 offline: by name)
    reference.pipe.fuse_lora(components=["unet"])
    theirs = {k.replace(".base_layer", ""): v for k, v in reference.pipe.unet.state_dict().items() if "lora_" not in k}
    ours = load_model("tiny-sdxl")
    fuse_into(ours.modules, [LoraFile(path)], "sdxl")
    for name, value in ours.modules["unet"].state_dict().items():
        assert torch.equal(value, theirs[name]), name
    plain = tmp_path / "plain"
    export("tiny-sdxl", plain, ExportOptions(verify="none", components=["text_encoder", "text_encoder_2", "unet",
                                                                        "vae_decoder"]))
    load_pipeline(plain, "onnxruntime-cpu", loras=[LoraFile(path)])  # the engine directory's config maps it too


def test_fp16_run_time_lora_is_within_fp16_rounding_of_the_fused_export(tiny_fp16_engine_dir, lora_files, tmp_path):
    """fp16 weights round twice at run time (the export's, then with the update) and once in a fused
    export: the two differ by that rounding, not by more."""
    loras = [LoraFile(lora_files["both"], 0.8)]
    fused = tmp_path / "fused"
    export("tiny", fused, ExportOptions(dtype="fp16", verify="none", loras=loras))
    a = load_pipeline(tiny_fp16_engine_dir, "onnxruntime-cpu", loras=loras)(REQUEST)
    b = load_pipeline(fused, "onnxruntime-cpu")(REQUEST)
    plain = load_pipeline(tiny_fp16_engine_dir, "onnxruntime-cpu")(REQUEST)
    assert _rel(a, b) < 1e-2 < _rel(plain, b)


def test_variants_and_odd_arguments_are_refused(tmp_path):
    dora = tmp_path / "dora.safetensors"
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{module}.lora_down.weight": torch.zeros(RANK, 32), f"{module}.lora_up.weight": torch.zeros(32, RANK),
               f"{module}.dora_scale": torch.ones(1, 32)}, str(dora))
    from sdexport.models.lora import read_updates

    with pytest.raises(SdexportError, match="a DoRA"):
        read_updates(LoraFile(dora), "sd")
    projection = tmp_path / "projection.safetensors"  # (SD's text encoder has none: matching refuses it)
    save_file({"lora_te_text_projection.lora_down.weight": torch.zeros(RANK, 32),
               "lora_te_text_projection.lora_up.weight": torch.zeros(32, RANK)}, str(projection))
    assert [(u.component, u.module) for u in read_updates(LoraFile(projection), "sd")] == [
        ("text_encoder", "text_projection")]
    with pytest.raises(SdexportError, match="a ':' but no scale after it"):
        LoraFile.parse(f"{dora}:")
    with pytest.raises(SdexportError, match="'1_5' after ':' is not a scale"):
        LoraFile.parse(f"{dora}:1_5")  # the file is there: what follows it was meant as its scale
    with pytest.raises(SdexportError, match="no such file"):
        LoraFile.parse(f"{tmp_path / 'gone.safetensors'}:1_5")  # neither the file nor a file of that name
    assert LoraFile.parse(f"{dora}:-0.5").scale == -0.5
    upper = tmp_path / "UPPER.SAFETENSORS"
    shutil.copy(dora, upper)
    assert LoraFile.parse(str(upper)).path == upper
    plain = tmp_path / "PLAIN.SAFETENSORS"
    save_file({f"{module}.lora_down.weight": torch.zeros(RANK, 32), f"{module}.lora_up.weight": torch.zeros(32, RANK)},
              str(plain))
    assert read_updates(LoraFile(plain), "sd")  # (by a lower-case link: diffusers took .SAFETENSORS for a pickle)
    folder = tmp_path / "my-lora"  # diffusers' save_lora_weights writes a folder
    folder.mkdir()
    shutil.copy(plain, folder / "pytorch_lora_weights.safetensors")
    with pytest.raises(SdexportError, match=f"a directory; pass the LoRA file in it \\({folder}/pytorch_lora_weights"):
        LoraFile.parse(str(folder))


@pytest.mark.parametrize(("tensors", "metadata", "refusal"), [
    ({"lora_A": (0, 32), "lora_B": (32, 0)}, None, "has rank 0 and alpha 0; a LoRA's rank is a positive number"),
    ({}, {"unet.r": 0, "unet.lora_alpha": 4}, "has rank 0 and alpha 4; a LoRA's rank is a positive number"),
    ({}, {"unet.r": 4, "unet.lora_alpha": "x"}, "has rank 4 and alpha 'x'; a LoRA's rank is a positive number, its alpha"),
    ({}, {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"(": 3}},
     "its metadata's pattern '(' is not a regular expression"),
    ({"alpha": (2,)}, None, "to_q.alpha holds 2 values where an alpha is one number"),
    # a config whose rank is not the tensors' (diffusers' load fails on the shapes): alpha / r would scale it wrong
    ({}, {"unet.r": RANK // 2, "unet.lora_alpha": 4}, (f"to_q has rank {RANK}, and the file's LoRA config (metadata) "
                                                      f"says {RANK // 2}: a damaged or hand-edited file")),
    ({}, {"unet.r": RANK, "unet.lora_alpha": 4, "unet.rank_pattern": {"to_q": RANK * 2}}, f"says {RANK * 2}: a damaged"),
    # a 0-d lora_A was an IndexError traceback (an audit)
    ({"lora_A": (), "lora_B": (32, 1)}, None, "to_q's lora_A and lora_B are not matrices (shapes [] and [32, 1])"),
])
def test_a_rank_or_alpha_that_gives_no_scale_is_refused_in_one_line(tmp_path, tensors, metadata, refusal):
    """Each raised ZeroDivisionError, ValueError or re.error from the middle of read_updates."""
    import json
    import re

    from sdexport.models.lora import read_updates

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    shapes = {"lora_A": (RANK, 32), "lora_B": (32, RANK), **tensors}
    path = tmp_path / "odd.safetensors"
    save_file({f"{module}.{name}" + (".weight" if name.startswith("lora") else ""): torch.ones(shape)
               for name, shape in shapes.items()}, str(path),
              metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata else None)
    with pytest.raises(SdexportError, match=f"^--lora {path}: .*{re.escape(refusal)}"):
        read_updates(LoraFile(path), "sd")


def _kohya_text_encoder_state(alpha: float) -> tuple[dict[str, torch.Tensor], set[str]]:
    """kohya's text encoder names for attention without ``out_proj`` and for the MLPs: diffusers
    converts the first to its older layout and the second to its newer one, in one part."""
    generator = torch.Generator().manual_seed(7)
    modules = {f"text_model.encoder.layers.{i}.{name}" for i in (0, 1)
               for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")}
    state = {}
    for module in modules:
        out_features = 37 if module.endswith("fc1") else 32  # (the tiny text encoder's MLP width)
        key = "lora_te_" + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(RANK, 32, generator=generator)
        state[f"{key}.lora_up.weight"] = torch.randn(out_features, RANK, generator=generator)
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state, modules


@pytest.mark.parametrize(("alpha", "scale"), [(2.0, 0.5), (0.0, 0.0)], ids=["alpha", "alpha-0"])
def test_every_update_of_a_mixed_layout_part_is_read_at_its_alphas_scale(tmp_path, alpha, scale):
    """All of a kohya text encoder LoRA's updates (before: attention's six of ten were dropped
    without a word), at alpha / rank; an alpha of 0 zeroes them, as A1111, ComfyUI and diffusers
    apply it (kohya's trainer never saves one: it stores the rank in its place)."""
    from sdexport.models.lora import read_updates

    state, modules = _kohya_text_encoder_state(alpha)
    path = tmp_path / "te.safetensors"
    save_file(state, str(path))
    updates = read_updates(LoraFile(path, 0.5), "sd")
    assert {u.module.removeprefix("text_model.") for u in updates} == {m.removeprefix("text_model.") for m in modules}
    assert {u.scale for u in updates} == {0.5 * scale}
    model = load_model("tiny")
    from sdexport.models.lora import match_updates, torch_layers

    assert len(match_updates(updates, torch_layers(model.modules), "--lora te")) == len(modules)


@pytest.mark.parametrize("names", ["peft", "diffusers"])
def test_an_alpha_beside_diffusers_or_peft_names_scales_its_module(tmp_path, names):
    """``<module>.alpha`` beside ``lora_A``/``lora.down`` (kohya files converted by hand): diffusers
    refuses them; sdexport reads the alpha as kohya does (before: the update went in at scale 1)."""
    from sdexport.models.lora import read_updates

    generator = torch.Generator().manual_seed(8)
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = ("lora_A", "lora_B") if names == "peft" else ("lora.down", "lora.up")
    path = tmp_path / "alpha.safetensors"
    save_file({f"{module}.{down}.weight": torch.randn(RANK, 32, generator=generator),
               f"{module}.{up}.weight": torch.randn(32, RANK, generator=generator),
               f"{module}.alpha": torch.tensor(1.0)}, str(path))
    assert [u.scale for u in read_updates(LoraFile(path), "sd")] == [1.0 / RANK]


def test_an_alpha_for_a_module_the_file_does_not_update_is_refused_or_said(tmp_path, capsys):
    """An audit's file: ``to_q``'s update beside ``to_k.alpha`` (a misspelt name) went in with
    to_q at alpha = rank and the alpha dropped unsaid (kohya's layout was refused by diffusers).
    With PEFT metadata, which decides the alphas, a per-module alpha is said to go unread."""
    import json

    from sdexport.models.lora import read_updates

    generator = torch.Generator().manual_seed(8)
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {f"{block}.to_q.lora_A.weight": torch.randn(RANK, 32, generator=generator),
               f"{block}.to_q.lora_B.weight": torch.randn(32, RANK, generator=generator),
               f"{block}.to_k.alpha": torch.tensor(1.0)}
    path = tmp_path / "orphan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(SdexportError, match=rf"1 alphas for modules it has no update for \(e.g. {block}.to_k.alpha\)"):
        read_updates(LoraFile(path), "sd")
    tensors[f"{block}.to_q.alpha"] = tensors.pop(f"{block}.to_k.alpha")
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": RANK})})
    assert [u.scale for u in read_updates(LoraFile(path), "sd")] == [1.0]  # (the metadata's alpha)
    assert f"its 1 per-module alpha tensors (e.g. {block}.to_q.alpha) are not read" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(("tensors", "refusal"), [
    (["lora_B"], r"unet.down_blocks.0.attentions.0.proj_in has lora_B but no lora_A"),
    (["lora_A", "lora_B", "lora_C"], (r"1 tensors of its unet part are in no LoRA layout sdexport reads \(e.g. "
                                        r"unet.down_blocks.0.attentions.0.proj_in.lora_C.weight\)")),
])
def test_tensors_that_would_be_left_over_are_refused_in_one_line(tmp_path, tensors, refusal):
    from sdexport.models.lora import read_updates

    module = "unet.down_blocks.0.attentions.0.proj_in"
    path = tmp_path / "odd.safetensors"
    save_file({f"{module}.{t}.weight": torch.zeros(RANK, RANK) for t in tensors}, str(path))
    with pytest.raises(SdexportError, match=refusal) as info:
        read_updates(LoraFile(path), "sd")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("tails", "kind"), [
    (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"], "a LyCORIS LoHa"),
    (["lokr_w1", "lokr_w2", "alpha"], "a LyCORIS LoKr"),
    (["lora_down.weight", "lora_mid.weight", "lora_up.weight", "alpha"], "a LyCORIS LoCon with Tucker decomposition"),
    (["diff", "diff_b"], "a LyCORIS full-weight difference"),
    (["on_input", "weight"], "a LyCORIS (IA)^3"),
    (["w_norm", "b_norm"], "a LyCORIS norm-layer update"),
    (["oft_blocks", "alpha"], "an OFT"),
    (["oft_diag"], "a LyCORIS OFT"),
    (["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"], "a LyCORIS GLoRA"),
])
def test_lycoris_files_are_refused_by_their_kind_in_one_short_line(tmp_path, tails, kind):
    """Before: diffusers' refusal, listing every key it could not rename (18,000 characters for a
    tiny LoHa) and never naming what the file was."""
    from sdexport.models.lora import read_updates

    path = tmp_path / "lycoris.safetensors"
    plain = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"  # the rest may be plain
    save_file({**{f"lora_unet_down_blocks_0_resnets_0_conv1.{tail}": torch.ones(2, 2) for tail in tails},
               f"{plain}.lora_down.weight": torch.zeros(RANK, 32), f"{plain}.lora_up.weight": torch.zeros(32, RANK)},
              str(path))
    with pytest.raises(SdexportError) as info:
        read_updates(LoraFile(path), "sd")
    assert str(info.value) == (f"--lora {path}: {kind} ({info.value.args[0].split(f'{kind} (')[1].split(')')[0]}), "
                               "which sdexport does not apply (plain low-rank LoRAs only, LoCon's convolutions included)")


def test_a_file_naming_blocks_in_both_layouts_is_refused_not_half_applied(tmp_path):
    """A merge of a kohya SDXL file (original block names) and a diffusers-named one: diffusers'
    converter drops every key of the first kind without a word when both are there."""
    from sdexport.models.lora import read_updates

    path = tmp_path / "merged.safetensors"
    state = {}
    for module in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                   "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"):
        state |= {f"{module}.lora_down.weight": torch.zeros(RANK, 32), f"{module}.lora_up.weight": torch.zeros(32, RANK)}
    save_file(state, str(path))
    with pytest.raises(SdexportError, match=r"its U-Net keys name blocks both as the original layout does "
                                            r"\(lora_unet_input_blocks_4_1.*and as diffusers does \(lora_unet_down_blocks_1"):
        read_updates(LoraFile(path), "sdxl")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_text_encoder_layer_named_both_te_and_te1_is_refused_not_half_applied(tmp_path, family):
    """diffusers reads lora_te_X and lora_te1_X as one layer and keeps the later without a word (an
    audit: the fused delta was the first file's alone, exit 0), as a merge of an SD and an SDXL file
    can name it."""
    from sdexport.models.lora import read_updates

    path = tmp_path / "merged.safetensors"
    module = "text_model_encoder_layers_0_self_attn_q_proj"
    state = {}
    for prefix in ("lora_te_", "lora_te1_"):
        state |= {f"{prefix}{module}.lora_down.weight": torch.zeros(RANK, 32),
                  f"{prefix}{module}.lora_up.weight": torch.zeros(32, RANK)}
    save_file(state, str(path))
    with pytest.raises(SdexportError, match=rf"names one text encoder layer both as lora_te_ and as lora_te1_ "
                                            rf"\({module}\)"):
        read_updates(LoraFile(path), family)


def test_a_file_giving_fewer_updates_than_it_has_down_matrices_is_refused(tmp_path):
    """Whatever the two names (here PEFT's lora_A and diffusers' older lora.down for one layer),
    diffusers' converters collect into dicts and keep one: every down matrix must give an update."""
    from sdexport.models.lora import read_updates

    path = tmp_path / "twice.safetensors"
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{module}.lora_A.weight": torch.zeros(RANK, 32), f"{module}.lora_B.weight": torch.zeros(32, RANK),
               f"{module}.lora.down.weight": torch.zeros(RANK, 32), f"{module}.lora.up.weight": torch.zeros(32, RANK)},
              str(path))
    with pytest.raises(SdexportError, match=r"its 2 LoRA down matrices give only 1 update once diffusers has read it"):
        read_updates(LoraFile(path), "sd")


@pytest.mark.parametrize("key", ["emb_params", "<cat-toy>"])
def test_an_embedding_given_as_a_lora_is_named(tmp_path, key):
    """It was "1 tensors for no part of an SD pipeline, e.g. emb_params"."""
    from sdexport.models.lora import read_updates

    path = tmp_path / "style.safetensors"
    save_file({key: torch.ones(2, 32)}, str(path))
    with pytest.raises(SdexportError, match=rf"^--lora {path}: a textual inversion embedding, not a LoRA: give it to "
                                            r"export as --textual-inversion FILE$"):
        read_updates(LoraFile(path), "sd")


def test_a_lora_bundling_embeddings_is_refused_naming_them_and_what_to_do(tmp_path):
    """diffusers reads kohya keys only when every key is one: its refusal called the LoRA's own
    tensors foreign, beside the A1111 bundled embeddings that were the cause."""
    from sdexport.models.lora import read_updates

    path = tmp_path / "bundled.safetensors"
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{module}.lora_down.weight": torch.zeros(RANK, 32), f"{module}.lora_up.weight": torch.zeros(32, RANK),
               "bundle_emb.mystyle.string_to_param.*": torch.zeros(2, 32)}, str(path))
    with pytest.raises(SdexportError, match=r"it bundles textual inversion embeddings \(mystyle: bundle_emb\.\*, as "
                                            r"A1111 saves them\).*give each with --textual-inversion"):
        read_updates(LoraFile(path), "sd")


def test_an_upstream_refusal_is_cut_to_a_readable_line(tmp_path):
    from sdexport.models.lora import read_updates

    path = tmp_path / "odd.safetensors"
    save_file({f"lora_unet_down_blocks_0_resnets_0_conv1.odd_{i}.weight": torch.zeros(2) for i in range(200)}, str(path))
    with pytest.raises(SdexportError, match=r"diffusers cannot .*\.\.\.\)$") as info:
        read_updates(LoraFile(path), "sd")
    assert len(str(info.value)) < 600 and "\n" not in str(info.value)


def test_the_python_api_refuses_a_lora_up_front_as_the_cli_does(tiny_engine_dir, lora_files, tmp_path):
    """LoraFile made in Python: a text path works, a scale the engines cannot take and a missing file
    are one line before anything loads (not NaN latents after the run, nor a FileNotFoundError)."""
    import numpy as np

    from sdexport.export.exporter import ExportOptions, export
    from sdexport.runtime.loading import load_pipeline

    assert LoraFile(str(lora_files["unet"]), 0.5).path == lora_files["unet"]
    for scale in (np.float32(0.5), np.int64(1), 2):  # numbers as numpy gives them: held as floats
        assert type(LoraFile(lora_files["unet"], scale).scale) is float
    for scale in (float("nan"), float("inf"), 1e39, 10**400, "0.8", True):
        with pytest.raises(SdexportError, match="is not a finite number within float32's range"):
            LoraFile(lora_files["unet"], scale)
    missing = LoraFile(tmp_path / "nope.safetensors")
    with pytest.raises(SdexportError, match=f"^LoRA {missing.path}: no such file$"):
        load_pipeline(tiny_engine_dir, "onnxruntime-cpu", loras=[missing])
    with pytest.raises(SdexportError, match=f"^LoRA {missing.path}: no such file$"):
        export("tiny", tmp_path / "out", ExportOptions(loras=[missing]))
    assert not (tmp_path / "out").exists()


def test_loras_given_as_an_iterator_are_applied(tiny_engine_dir, lora_files):
    """The checks read an iterator to its end before the engines were made: the pipeline ran without
    the LoRA and its info recorded none."""
    pipe = load_pipeline(tiny_engine_dir, "onnxruntime-cpu", loras=iter([LoraFile(lora_files["kohya"], 0.8)]))
    assert [entry["scale"] for entry in pipe.info["loras"]] == [0.8]
    request = GenerationRequest(prompt="a lighthouse", steps=2, seeds=[1], height=64, width=64)
    plain = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    assert not torch.equal(pipe(request).latents, plain(request).latents)


def test_the_python_api_refuses_one_lora_given_without_a_list_in_one_line(tmp_path):
    """``loras`` takes a list: one LoraFile, a path or the CLI's "file:scale" text given alone is
    refused in one line saying so, before the directory is read (not a TypeError from iterating a
    LoraFile or a path, nor a refusal of the text's first letter)."""
    from sdexport.runtime.loading import load_pipeline

    one = LoraFile(tmp_path / "style.safetensors", 0.8)
    for given in (one, one.path, f"{one.path}:0.8"):
        with pytest.raises(SdexportError, match="^loras: expected a list of LoraFile entries"):
            load_pipeline(tmp_path / "not-read", "onnxruntime-cpu", loras=given)


def test_bench_refuses_an_engine_dir_with_fused_lora(fused_dir, tmp_path, capsys):
    assert "has LoRA fused into its weights" in bench_refusal(fused_dir, tmp_path, capsys)


def test_a_file_that_may_not_be_read_is_said_so_not_missing(lora_files, monkeypatch):
    """safetensors reports a file it may not open as "No such file or directory"."""
    from pathlib import Path

    from sdexport.errors import SdexportError
    from sdexport.models.lora import LoraFile
    from sdexport.models.outline import safetensors_keys

    path = Path(lora_files["both"])
    real = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(SdexportError, match=r"^--lora .*: cannot read it \(Permission denied\)$"):
        LoraFile(path).check()
    with pytest.raises(SdexportError, match=r": cannot read it \(Permission denied\)$"):
        safetensors_keys(path)


@pytest.mark.parametrize("stored", ["linear", "1x1"])
def test_a_linear_update_fits_a_1x1_convolution_and_back(tmp_path, stored):
    """SD 1.x's transformer projections are 1x1 convolutions, SD 2.x's and SDXL's linear layers: a
    LoRA made for one is reshaped to the other's weight (as A1111 and ComfyUI apply it), not refused."""
    from sdexport.models.lora import fuse_into

    model, name = ("tiny", "down_blocks.0.attentions.0.proj_in") if stored == "linear" else (
        "tiny-sdxl", "down_blocks.1.attentions.0.proj_in")
    module = "lora_unet_" + name.replace(".", "_")
    base = load_model(model)
    layer = base.modules["unet"].get_submodule(name)
    assert layer.weight.dim() == (4 if stored == "linear" else 2)  # (the other form than the file's)
    out_ch, in_ch = layer.weight.shape[:2]
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(RANK, in_ch, generator=generator), torch.randn(out_ch, RANK, generator=generator)
    if stored == "1x1":
        down, up = down[:, :, None, None], up[:, :, None, None]
    path = tmp_path / "reshaped.safetensors"
    save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
               f"{module}.alpha": torch.tensor(float(RANK))}, str(path))
    before = layer.weight.detach().clone()
    fuse_into(base.modules, [LoraFile(path, 0.5)], base.family)
    expected = before + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
    assert torch.allclose(layer.weight, expected, atol=1e-5)


def test_peft_patterns_match_a_whole_trailing_module_name():
    """PEFT's rank_pattern/alpha_pattern keys match the end of a module's name, whole: a key naming a
    block does not reach the layers inside it."""
    from sdexport.models.lora import _pattern

    assert _pattern("down_blocks.0.attentions.0.proj_in", {"down_blocks.0": 99}, 4) == 4
    assert _pattern("down_blocks.0.attentions.0.to_q", {"to_q": 8}, 4) == 8
    assert _pattern("down_blocks.0.attentions.0.to_q", {"attentions.0.to_q": 8}, 4) == 8
    assert _pattern("down_blocks.0.attentions.0.xto_q", {"to_q": 8}, 4) == 4


def test_a_weight_two_initializers_could_be_is_left_unmapped():
    """Two equal weights: guessing one would patch the wrong tensor at run time."""
    from sdexport.export.weight_names import weight_map

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(3, 4))
    with torch.no_grad():
        module[1].weight.copy_(module[0].weight)
    weight = module[0].weight.detach().numpy()
    assert weight_map(module, [("a", weight.T.copy()), ("b", weight.T.copy())]) == {}


def test_the_exporter_stores_equal_weights_once_and_the_map_names_it_for_both():
    """What the next test stands on: TorchScript's exporter keeps one initializer for two equal
    weights, and ``weight_map`` then gives both layers that one initializer."""
    import io

    import onnx
    from onnx import numpy_helper

    from sdexport.export.weight_names import weight_map

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        module[1].weight.copy_(module[0].weight)
    graph = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.randn(1, 4),), graph, dynamo=False)
    model = onnx.load_from_string(graph.getvalue())
    names = weight_map(module, [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer])
    assert names["0.weight"]["initializer"] == names["1.weight"]["initializer"]


def test_run_time_lora_refuses_a_weight_stored_once_for_two_layers(engine_copy, lora_files):
    """Changing the one initializer of two equal weights would change the layer the LoRA does not
    name too: refused before any session is made, naming both, where it was applied to both."""
    import hashlib

    from sdexport.manifest import save_manifest

    path = engine_copy / "unet" / "weights.json"
    names = json.loads(path.read_text())
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    names[f"{block}.to_k.weight"] = names[f"{block}.to_q.weight"]  # as the exporter writes equal weights
    path.write_text(json.dumps(names))
    manifest = load_manifest(engine_copy, verify_files=False)
    manifest.files["unet/weights.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    save_manifest(engine_copy, manifest)
    with pytest.raises(SdexportError, match=rf"changes unet\.{block}\.to_q, whose weight equals unet\.{block}\.to_k's"):
        load_pipeline(engine_copy, "onnxruntime-cpu", loras=[LoraFile(lora_files["kohya"])])


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_a_peft_alpha_pattern_scales_the_modules_it_names(tmp_path):
    """A diffusers-saved LoRA whose PEFT config gives some modules an alpha of their own
    (``alpha_pattern``) has those updates scaled by it, the others by ``lora_alpha``, as PEFT loads it."""
    import diffusers

    from sdexport.models.lora import LoraFile, read_updates

    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    generator = torch.Generator().manual_seed(0)
    state = {f"{block}.{name}.lora_{half}.weight": torch.randn(shape, generator=generator)
             for name in ("to_q", "to_k") for half, shape in (("A", (4, 32)), ("B", (32, 4)))}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=state,
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 16, "target_modules": ["to_q", "to_k"],
                                    "rank_pattern": {}, "alpha_pattern": {"to_q": 8}, "use_rslora": False})
    updates = read_updates(LoraFile(tmp_path / "pytorch_lora_weights.safetensors", 0.5), "sd")
    assert {u.module.rsplit(".", 1)[1]: u.scale for u in updates} == {"to_q": 0.5 * 8 / 4, "to_k": 0.5 * 16 / 4}


def test_module_names_are_matched_across_the_text_model_level_both_ways():
    """CLIP's ``text_model.`` level is in transformers 4's names and not in 5's; a LoRA's names
    reach the model's whichever side has it."""
    from sdexport.models.lora import resolve_name

    with_level = {"text_model.encoder.layers.0.self_attn.q_proj": (32, 32)}
    without = {"encoder.layers.0.self_attn.q_proj": (32, 32)}
    assert resolve_name(with_level, "encoder.layers.0.self_attn.q_proj") == "text_model.encoder.layers.0.self_attn.q_proj"
    assert resolve_name(without, "text_model.encoder.layers.0.self_attn.q_proj") == "encoder.layers.0.self_attn.q_proj"
    assert resolve_name(without, "encoder.layers.1.self_attn.q_proj") is None


def test_a_weight_map_without_shapes_gives_the_pytorch_shapes_from_the_graph(engine_copy):
    """A weights.json written before it held each weight's shape (an older export): the shapes
    are read from the graph, a transposed initializer's turned back to PyTorch's, as the map with
    shapes gives them (a LoRA matched against them fits)."""
    import json

    from sdexport.manifest import load_manifest
    from sdexport.runtime.lora_runtime import onnx_layers

    manifest = load_manifest(engine_copy)
    expected = onnx_layers(engine_copy, manifest)
    for component in expected:
        path = (engine_copy / manifest.components[component].onnx).parent / "weights.json"
        names = json.loads(path.read_text())
        path.write_text(json.dumps({p: {k: v for k, v in where.items() if k != "shape"} for p, where in names.items()}))
    assert onnx_layers(engine_copy, manifest) == expected
    assert any(len(set(shape)) > 1 and len(shape) == 2 for shape in expected["unet"].values())  # (non-square ones)


def test_run_time_lora_initializers_keep_the_graphs_dtype(tiny_fp16_engine_dir, tmp_path):
    """The changed initializers of an fp16 graph are fp16, as TensorRT's refit takes them (the
    weight's own dtype), not the float32 they are summed in."""
    from safetensors.torch import save_file

    from sdexport.manifest import load_manifest
    from sdexport.models.lora import LoraFile
    from sdexport.runtime.lora_runtime import onnx_initializers, onnx_layers, updates_for

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "lora.safetensors"
    save_file({f"{module}.lora_A.weight": torch.ones(4, 32), f"{module}.lora_B.weight": torch.ones(32, 4)}, str(path))
    manifest = load_manifest(tiny_fp16_engine_dir)
    updates = updates_for(manifest, [LoraFile(path)], onnx_layers(tiny_fp16_engine_dir, manifest))
    changed = onnx_initializers(tiny_fp16_engine_dir, manifest, "unet", updates, manifest.components["unet"].onnx)
    assert len(changed) == 1 and all(value.dtype == np.float16 for value in changed.values())


def test_run_time_lora_reads_no_weight_map_the_manifest_does_not_list(tiny_engine_dir, lora_files, tmp_path):
    """An export lists every file it writes; a weights.json it does not list was put there since (or
    left unlisted by an adopt before 2026-12-05) and said where to add each update unchecked."""
    from sdexport.manifest import save_manifest

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, copy)
    manifest = load_manifest(copy, verify_files=False)
    del manifest.files["unet/weights.json"]
    save_manifest(copy, manifest)
    with pytest.raises(EngineDirError, match=r"unet/weights.json: not in the manifest's files, so nothing checks .* "
                                             r"this one is not the export's: remove it, or export again"):
        load_pipeline(copy, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"])])
    load_pipeline(copy, "onnxruntime-cpu")  # without --lora nothing reads it
    # adopted (today's adopt lists it), then as an older adopt left it
    from conftest import run_cli

    (copy / "manifest.json").unlink()
    assert run_cli("adopt", copy, "-q") == 0
    manifest = load_manifest(copy, verify_files=False)
    assert manifest.adopted and "unet/weights.json" in manifest.files
    load_pipeline(copy, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"])])
    del manifest.files["unet/weights.json"]
    save_manifest(copy, manifest)
    with pytest.raises(EngineDirError, match=r"if it is the adopted export's own \(an adopt before 2026-12-05 left it "
                                             r"out\), adopt again with --force and the options you adopted with"):
        load_pipeline(copy, "onnxruntime-cpu", loras=[LoraFile(lora_files["unet"])])

"""Round trip: a model written in the original SD layout loads back through load_model(path, config=...)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdexport.models import LoadedModel, load_model
from sdexport.models.loader import _clean, load_preset, write_config_dir
from sdexport.models.presets import PRESETS
from tests.ldm_layout import ldm_state_dict, write_single_file_checkpoint

PARTS = ("unet", "vae", "text_encoder")

# Deeper than "tiny": 3 levels, 2 layers per block, attention at both ends of the U-Net but not in the
# middle (so upsamplers sit at output_blocks.N.1 and .N.2), a 3-level VAE with 2 layers per block.
_DEEPER = dataclasses.replace(
    PRESETS["tiny"],
    name="tiny-deeper",
    unet={
        **PRESETS["tiny"].unet,
        "layers_per_block": 2,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
    },
    vae={
        **PRESETS["tiny"].vae,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 2,
    },
)


def assert_same_weights(original: LoadedModel, loaded: LoadedModel) -> None:
    """Every parameter and buffer equal, none missing, none left on the meta device (never loaded)."""
    problems: list[str] = []
    for part in PARTS:
        want, got = original.modules[part].state_dict(), loaded.modules[part].state_dict()
        missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        if missing or unexpected:
            problems.append(
                f"{part}: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        differ = [
            k
            for k in sorted(want.keys() & got.keys())
            if got[k].is_meta or got[k].shape != want[k].shape or not torch.equal(got[k], want[k])
        ]
        if differ:
            problems.append(f"{part}: {len(differ)} of {len(want)} tensors differ, e.g. {differ[:5]}")
    assert not problems, "\n".join(problems)


def test_tiny_round_trip(tmp_path: Path) -> None:
    original = load_model("tiny")
    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(original, path)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    # tiny: UpBlock2D first (upsampler in slot .1), the VAE's mid attention as a 1x1 conv.
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in keys
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [64, 64, 1, 1]

    loaded = load_model(str(path), config="tiny")
    assert loaded.source["kind"] == "single_file"
    assert_same_weights(original, loaded)
    shouting = path.rename(tmp_path / "My ckpt.SAFETENSORS")  # a suffix in another case is the same kind of file
    from sdexport.models.outline import outline_model

    assert outline_model(str(shouting), config="tiny").family == "sd"
    assert_same_weights(original, load_model(str(shouting), config="tiny"))


def test_deeper_architecture_round_trip(tmp_path: Path) -> None:
    original = load_preset(_DEEPER, seed=3)
    write_config_dir(_DEEPER, tmp_path / "config")  # a diffusers directory with configs, no weights
    path = tmp_path / "deeper.safetensors"
    write_single_file_checkpoint(original, path)
    loaded = load_model(str(path), config=str(tmp_path / "config"))
    assert_same_weights(original, loaded)


def test_sd15_key_names() -> None:
    """The names real SD 1.5 checkpoints use (built on the meta device: no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = PRESETS["sd15"]
    with torch.device("meta"):
        state = ldm_state_dict(
            UNet2DConditionModel.from_config(_clean(preset.unet)),
            AutoencoderKL.from_config(_clean(preset.vae)),
            CLIPTextModel(CLIPTextConfig(**_clean(preset.text_encoder))),
        )
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {k: tuple(state[k].shape) for k in expected if k in state} == expected
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state
    assert "model.diffusion_model.input_blocks.12.0.op.weight" not in state
    counts = {
        p: sum(k.startswith(p) for k in state) for p in ("model.", "first_stage_model.", "cond_stage_model.")
    }
    assert counts == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197}


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_unmapped_weights_fail_loudly(kind: str) -> None:
    model = load_model("tiny")
    module = model.modules[kind]
    module.register_buffer("surprise", torch.zeros(1))
    with pytest.raises(ValueError, match="no LDM name"):
        ldm_state_dict(model.modules["unet"], model.modules["vae"], model.modules["text_encoder"])


@pytest.mark.parametrize(
    "prefix, suffix, part",
    [
        ("cond_stage_model.", "fc1.weight", "text_encoder"),
        ("model.diffusion_model.", "proj_in.weight", "unet"),
        ("model.diffusion_model.", "time_embed.0.weight", "unet"),
        ("first_stage_model.", "conv_in.bias", "vae"),
    ],
)
def test_checkpoint_missing_a_weight_is_refused(tmp_path, prefix, suffix, part):
    """Whatever diffusers or transformers would do with a gap (meta tensor, random values), the load
    compares the checkpoint's keys with the module's own and refuses, naming the component."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(load_model("tiny"), path)
    weights = load_file(str(path))
    key = next(k for k in weights if k.startswith(prefix) and k.endswith(suffix))
    del weights[key]
    save_file(weights, str(path))
    with pytest.raises(ModelLoadError, match=rf"checkpoint lacks .*{part} weight"):
        load_model(str(path), config="tiny")


def test_checkpoint_with_a_wrongly_shaped_weight_keeps_the_whole_explanation(tmp_path):
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(load_model("tiny"), path)
    weights = load_file(str(path))
    key = next(k for k in weights if k.startswith("cond_stage_model.") and k.endswith("fc1.weight"))
    weights[key] = torch.zeros(3, 3)
    save_file(weights, str(path))
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(path), config="tiny")
    message = str(caught.value)
    # torch's explanation comes after "Error(s) in loading state_dict for ...:" and a line break
    assert "size mismatch" in message and "fc1.weight" in message and "\n" not in message


def test_a_checkpoint_with_weights_the_config_lacks_is_refused(tmp_path):
    """A deeper text encoder than the --config's (a layer more): its extra weights are named and the
    file refused, not dropped so that the layers the config has load as though nothing were amiss."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(load_model("tiny"), path)
    weights = load_file(str(path))
    layers = PRESETS["tiny"].text_encoder["num_hidden_layers"]
    prefix = "cond_stage_model.transformer.text_model.encoder.layers."
    extra = {k.replace(f"{prefix}0.", f"{prefix}{layers}."): v.clone() for k, v in weights.items() if k.startswith(f"{prefix}0.")}
    save_file({**weights, **extra}, str(path))
    with pytest.raises(ModelLoadError, match=rf"has {len(extra)} text_encoder weights the --config architecture does "
                                             rf"not, e\.g\. (text_model\.)?encoder\.layers\.{layers}\."):
        load_model(str(path), config="tiny")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from sdexport.errors import ModelLoadError

    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(load_model("tiny"), path)
    with pytest.raises(ModelLoadError, match="is --config the right"):
        load_model(str(path), config="tiny-sdxl")


def test_diffusers_directory_missing_a_weight_is_refused(tiny_diffusers_dir: Path, tmp_path: Path):
    import shutil

    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_diffusers_dir, broken)
    for part in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        weights = load_file(str(broken / part))
        del weights[sorted(weights)[0]]
        save_file(weights, str(broken / part))
        with pytest.raises(ModelLoadError, match=r"weight files lack 1 of the weights"):
            load_model(str(broken))
        shutil.copy(tiny_diffusers_dir / part, broken / part)


def test_diffusers_directory_with_weights_its_config_has_no_place_for_is_refused(tiny_diffusers_dir: Path,
                                                                               tmp_path: Path):
    """diffusers and transformers drop weights the config has no module for, and only log it: a
    depth-2 U-Net under a depth-1 config, or a text encoder config with fewer layers, exported and
    verified (against the same cut-down module) and drew other images. A weight that a shard's index
    names and the shard lacks stayed on the meta device, and failed deep in the trace."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_diffusers_dir, broken)
    part = "unet/diffusion_pytorch_model.safetensors"
    weights = load_file(str(broken / part))
    save_file({**weights, "bogus.weight": torch.zeros(2)}, str(broken / part))
    with pytest.raises(ModelLoadError, match=r"unet: the weight files hold 1 weights its config.json has no place for "
                                             r"\(a config for a smaller architecture\?\), e.g. bogus.weight$"):
        load_model(str(broken))
    # whole numbers where the model's weights are floating point: diffusers cast them, and the export went on
    save_file({**weights, "conv_in.bias": weights["conv_in.bias"].to(torch.int32)}, str(broken / part))
    with pytest.raises(ModelLoadError, match=r"unet: the weight files store conv_in.bias as I32 \(whole numbers or "
                                             r"booleans\), where the model's weights are floating point"):
        load_model(str(broken))
    shutil.copy(tiny_diffusers_dir / part, broken / part)
    config = broken / "text_encoder" / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "num_hidden_layers": settings["num_hidden_layers"] - 1}))
    with pytest.raises(ModelLoadError, match=r"text_encoder: the weight files hold 16 weights its config.json has no "
                                             r"place for .*encoder\.layers\.\d\."):
        load_model(str(broken))
    shutil.copy(tiny_diffusers_dir / "text_encoder" / "config.json", config)
    # a wrongly shaped weight: transformers raised "For details look at the above report!", a report
    # never shown; the weight and both shapes are named
    encoder = broken / "text_encoder" / "model.safetensors"
    weights = load_file(str(encoder))
    name = "text_model.final_layer_norm.bias"
    save_file({**weights, name: torch.zeros(weights[name].shape[0] + 1)}, str(encoder))
    with pytest.raises(ModelLoadError, match=rf"text_encoder: the weight files have wrongly shaped 1 of the weights .*"
                                             rf"final_layer_norm.bias \(\[{weights[name].shape[0] + 1}\] in the file, "
                                             rf"\[{weights[name].shape[0]}\] by the config\)$"):
        load_model(str(broken))
    shutil.copy(tiny_diffusers_dir / "text_encoder" / "model.safetensors", encoder)
    (broken / part).unlink()
    load_model("tiny").module("unet").save_pretrained(broken / "unet", max_shard_size="20KB")
    index = json.loads((broken / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = broken / "unet" / index["weight_map"]["conv_in.bias"]
    save_file({k: v for k, v in load_file(str(shard)).items() if k != "conv_in.bias"}, str(shard))
    with pytest.raises(ModelLoadError, match=r"unet: the weight files lack 1 of the weights its config.json describes "
                                             r"\(a shard without the weights its index names\?\), e.g. conv_in.bias$"):
        load_model(str(broken))


def test_single_file_exports_through_the_cli(tmp_path, capsys):
    from conftest import run_cli
    from sdexport.manifest import load_manifest
    from sdexport.models import load_model

    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(load_model("tiny"), path)
    out = tmp_path / "engine"
    assert run_cli("export", path, "--config", "tiny", "-o", out, "--components", "unet,vae_decoder") == 0
    manifest = load_manifest(out)
    assert manifest.model["source"]["kind"] == "single_file"
    assert all(e.parity["status"] == "passed" for e in manifest.components.values())
    assert "rel-L2" in capsys.readouterr().err


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[LoadedModel, Path]:
    original = load_model("tiny")
    path = tmp_path / "tiny.safetensors"
    write_single_file_checkpoint(original, path)
    return original, path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tensors read from safetensors checkpoints, in order."""
    from sdexport.models import single_file

    seen: list[str] = []
    read = single_file._LookupTensors.__getitem__

    def recorded(self: single_file._LookupTensors, key: str) -> torch.Tensor:
        tensor = read(self, key)
        seen.append(key)
        return tensor

    monkeypatch.setattr(single_file._LookupTensors, "__getitem__", recorded)
    return seen


def test_a_lazy_load_reads_each_part_when_it_is_built(tiny_checkpoint, reads) -> None:
    """Every part is checked from the header alone, and built from its own tensors only when asked:
    an export holds one component's weights at a time, as for a diffusers directory."""
    from sdexport.models.loader import is_skeleton

    original, path = tiny_checkpoint
    loaded = load_model(str(path), config="tiny", lazy=True)
    assert reads == [] and all(is_skeleton(m) for m in loaded.modules.values())
    assert loaded.dims == original.dims

    loaded.materialize("vae")
    assert reads and all(k.startswith("first_stage_model.") for k in reads)
    assert is_skeleton(loaded.modules["unet"]) and is_skeleton(loaded.modules["text_encoder"])
    vae_reads = len(reads)
    for part in ("unet", "text_encoder"):
        loaded.materialize(part)
    assert not any(k.startswith("first_stage_model.") for k in reads[vae_reads:])
    assert_same_weights(original, loaded)

    loaded.release("unet")  # built again from the file, unlike a part loaded at once
    assert is_skeleton(loaded.modules["unet"])
    assert torch.equal(loaded.materialize("unet").conv_in.weight, original.modules["unet"].conv_in.weight)


def test_a_checkpoint_of_another_architecture_is_refused_before_any_weight_is_read(tiny_checkpoint, reads):
    from sdexport.errors import ModelLoadError

    _, path = tiny_checkpoint
    with pytest.raises(ModelLoadError, match="is --config the right"):
        load_model(str(path), config="tiny-sdxl")
    with pytest.raises(ModelLoadError, match="lacks .* unet weights .* is --config the right"):
        load_model(str(path), config=_deeper_config(path.parent))
    assert reads == []


def _deeper_config(folder: Path) -> str:
    write_config_dir(_DEEPER, folder / "deeper-config")
    return str(folder / "deeper-config")


def test_a_wrongly_shaped_weight_is_refused_before_any_weight_is_read(tiny_checkpoint, reads):
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    _, path = tiny_checkpoint
    weights = load_file(str(path))
    key = next(k for k in weights if k.startswith("first_stage_model.") and k.endswith("conv_in.weight"))
    weights[key] = torch.zeros(1, 1, 1, 1)
    save_file(weights, str(path))
    with pytest.raises(ModelLoadError, match=r"the vae weights do not fit .*size mismatch"):
        load_model(str(path), config="tiny", lazy=True)
    assert reads == []


def test_a_checkpoint_without_vae_weights_is_refused_by_name(tiny_checkpoint, reads):
    """diffusers' VAE converter takes every tensor of a file with no VAE prefix as the VAE's."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    _, path = tiny_checkpoint
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(ModelLoadError, match=r"no VAE weights \(first_stage_model\.\* or vae\.\*\) in the checkpoint; "
                                             r"give --vae FILE \(a VAE file, .safetensors or .ckpt\) or --vae DIR"):
        load_model(str(path), config="tiny", lazy=True)
    assert reads == []


@pytest.mark.parametrize("pruned", ["cond_stage_model.", "first_stage_model."], ids=["text encoder", "vae"])
def test_a_checkpoint_pruned_of_a_part_exports_the_parts_it_holds(tiny_checkpoint, tmp_path, capsys, pruned):
    """A file without a text encoder's (or a VAE's) weights was refused even for ``--components unet``
    ("the file alone cannot be exported without one"; an audit), where a diffusers directory without
    that folder exports. The parts it holds export; asking for the missing one is still refused in
    one line, before any graph is written."""
    from safetensors.torch import load_file, save_file

    from conftest import run_cli

    _, path = tiny_checkpoint
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith(pruned)}, str(path))
    out = tmp_path / "engines"
    assert run_cli("export", path, "--config", "tiny", "--components", "unet", "-o", out, "--verify", "none") == 0, \
        capsys.readouterr().err
    assert (out / "unet" / "model.onnx").is_file()
    missing = "text_encoder" if pruned == "cond_stage_model." else "vae_decoder"
    assert run_cli("export", path, "--config", "tiny", "--components", f"unet,{missing}", "-o", tmp_path / "other",
                   "--verify", "none") == 2
    said = capsys.readouterr().err
    assert f"no {'text encoder' if missing == 'text_encoder' else 'VAE'} weights" in said
    assert said.rstrip().endswith("; or leave out of --components the parts that need it")
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_without_vae_weights_exports_with_another_vae(tiny_checkpoint, tiny_diffusers_dir, tmp_path,
                                                                     capsys):
    """--vae replaces the checkpoint's VAE, so the file need not hold one (as diffusers'
    ``from_single_file(..., vae=...)`` takes such a file): it was refused by name all the same."""
    from safetensors.torch import load_file, save_file

    from conftest import run_cli

    _, path = tiny_checkpoint
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("first_stage_model.")}, str(path))
    out = tmp_path / "engines"
    assert run_cli("export", path, "--config", "tiny", "--vae", tiny_diffusers_dir / "vae", "-o", out,
                   "--verify", "none") == 0, capsys.readouterr().err
    assert (out / "vae_decoder" / "model.onnx").is_file()


def _vae_alone(checkpoint: Path, suffix: str, tmp_path: Path) -> Path:
    """The checkpoint's VAE as a file of its own, as vae-ft-mse-840000-ema-pruned ships: no prefix."""
    from safetensors.torch import load_file, save_file

    vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(checkpoint)).items()
           if k.startswith("first_stage_model.")}
    path = tmp_path / f"vae-alone{suffix}"
    save_file(vae, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": vae}, path)
    return path


def test_weights_diffusers_converters_would_drop_are_refused_and_a_vae_trainings_loss_is_not(tiny_checkpoint,
                                                                                             tmp_path):
    """diffusers' U-Net and VAE converters copy every key under their prefix and keep those they
    know: an unCLIP-like label_emb, a deeper U-Net's blocks or a stray VAE tensor were dropped, and
    the export drew other images than the file (an audit's files). The VAE's reshaped attention
    weights are not counted as dropped, nor is a VAE training checkpoint's loss network. Whole numbers
    where the model has floating-point weights are refused as such, not as shapes that do not fit."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    _, checkpoint = tiny_checkpoint
    weights = load_file(str(checkpoint))
    width = weights["model.diffusion_model.time_embed.0.weight"].shape[0]
    for extra, refusal in (({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(width, 8)},
                            "has 1 unet weights the --config architecture does not, e.g. model.diffusion_model.label_emb"),
                           ({"first_stage_model.decoder.extra.weight": torch.zeros(4)},
                            "has 1 vae weights the --config architecture does not, e.g. first_stage_model.decoder.extra")):
        path = tmp_path / "more.safetensors"
        save_file({**weights, **extra}, str(path))
        with pytest.raises(ModelLoadError, match=re.escape(refusal)):
            load_model(str(path), config="tiny", lazy=True)
    # integers where the model's weights are floating point: torch said the shapes did not fit, naming two equal ones
    whole = tmp_path / "whole.safetensors"
    save_file({**weights, "model.diffusion_model.out.2.bias": torch.zeros(4, dtype=torch.int32)}, str(whole))
    with pytest.raises(ModelLoadError, match=r"stores 1 unet weights as whole numbers or booleans \(conv_out.bias is "
                                             r"int32\), where the model's are floating point"):
        load_model(str(whole), config="tiny", lazy=True)
    trained = tmp_path / "trained.safetensors"  # (its EMA's counters too, as vae-ft-mse-840000-ema-pruned has)
    save_file({**weights, "first_stage_model.loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4),
               "first_stage_model.loss.logvar": torch.zeros(()), "first_stage_model.model_ema.decay": torch.zeros(()),
               "first_stage_model.model_ema.num_updates": torch.zeros((), dtype=torch.int32)}, str(trained))
    load_model(str(trained), config="tiny", lazy=True)
    vae = _vae_alone(trained, ".safetensors", tmp_path)  # (with its loss.*: no prefix, as a VAE file ships)
    load_model("tiny", vae=str(vae))
    save_file({**load_file(str(vae)), "decoder.extra.weight": torch.zeros(4)}, str(vae))
    with pytest.raises(ModelLoadError, match=r"^--vae .*vae-alone.safetensors: the checkpoint has 1 vae weights the "
                                             r"--config architecture does not, e.g. decoder.extra.weight;"):
        load_model("tiny", vae=str(vae))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_vae_file_is_read_with_the_models_own_vae_config_as_diffusers_reads_it(tiny_checkpoint, tiny_diffusers_dir,
                                                                                  tmp_path, suffix):
    """A VAE alone in the original layout (the common way VAEs are shared) was refused by --vae, which
    took directories only; it is converted for the model's VAE architecture, weight for weight what
    diffusers' AutoencoderKL.from_single_file gives with that config, for a preset, a diffusers
    directory and a single file (whose own VAE weights it need not hold)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    model, checkpoint = tiny_checkpoint
    vae = _vae_alone(checkpoint, suffix, tmp_path)
    want = AutoencoderKL.from_single_file(str(vae), config=str(tiny_diffusers_dir), subfolder="vae").state_dict()
    pruned = tmp_path / "pruned.safetensors"
    save_file({k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("first_stage_model.")},
              str(pruned))
    for loaded in (load_model("tiny", vae=str(vae), seed=1), load_model(str(tiny_diffusers_dir), vae=str(vae)),
                   load_model(str(pruned), config="tiny", vae=str(vae), lazy=True)):
        got = loaded.module("vae").state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), loaded.label
        assert loaded.source["vae"] == str(vae.absolute()) and loaded.label.endswith(f"VAE from {vae}")


def test_a_checkpoint_and_a_vae_file_are_read_again_through_hugging_faces_cache_links(tiny_checkpoint, tmp_path,
                                                                                      capsys):
    """``hf_hub_download`` gives a link named as the file to a blob named by its hash, with no suffix.
    The manifest recorded the resolved paths: the export's own hashing then took the VAE's blob for a
    folder ("no weight file") and the Torch backend's reload refused the checkpoint's blob as "not a
    .safetensors/.ckpt checkpoint" (an audit's finding). The paths are recorded as given."""
    from conftest import run_cli
    from sdexport.manifest import load_manifest

    _, checkpoint = tiny_checkpoint
    vae = _vae_alone(checkpoint, ".safetensors", tmp_path)
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, file, blob in (("model.safetensors", checkpoint, "5f3e9a"), ("vae.safetensors", vae, "77aa01")):
        file.rename(blobs / blob)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    out = tmp_path / "engines"
    assert run_cli("export", snapshot / "model.safetensors", "--config", "tiny", "--vae", snapshot / "vae.safetensors",
                   "-o", out, "--verify", "none") == 0, capsys.readouterr().err
    source = load_manifest(out).model["source"]
    assert (source["path"], source["vae"]) == (str(snapshot / "model.safetensors"), str(snapshot / "vae.safetensors"))
    # its folder is resolved all the same: 'link/..' is where the system goes, not where the text folds
    # (os.path.abspath recorded a file that was not there: a review's finding)
    import os

    from sdexport.models.loader import recorded_path

    (tmp_path / "deeper").symlink_to(snapshot)
    assert recorded_path(tmp_path / "deeper" / ".." / "0123abc" / "model.safetensors") == str(
        snapshot / "model.safetensors")
    assert recorded_path(tmp_path / "deeper" / ".." / "0123abc" / "model.safetensors") != os.path.abspath(
        tmp_path / "deeper" / ".." / "0123abc" / "model.safetensors")
    assert run_cli("run", out, "--backend", "torch", "-p", "a cat", "--steps", "2", "-o", tmp_path / "cat.png") == 0, \
        capsys.readouterr().err


def test_a_vae_file_that_cannot_be_one_is_refused_before_anything_loads(tiny_checkpoint, tiny_diffusers_dir, tmp_path,
                                                                        capsys):
    import shutil

    from safetensors.torch import save_file

    from conftest import run_cli

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    no_vae_config = shutil.copytree(tiny_diffusers_dir, tmp_path / "model")
    shutil.rmtree(no_vae_config / "vae")  # (it was refused as a model missing vae/ that --vae could replace)
    vae = _vae_alone(tiny_checkpoint[1], ".safetensors", tmp_path)
    diffusers_vae = tiny_diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"  # (an audit: "lacks 168 of 180")
    for model, given, said in (
            ("tiny", lora, (f"--vae {lora}: no VAE weights (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, "
                                   "first_stage_model.*, vae.*) in it")),
            ("tiny", diffusers_vae, (f"--vae {diffusers_vae}: a diffusers VAE's weight file (its keys are diffusers', not "
                                     "the original layout's): give the folder holding it and its config.json as --vae DIR")),
            ("tiny", tmp_path / "gone.safetensors", f"--vae {tmp_path / 'gone.safetensors'}: no such file"),
            (no_vae_config, vae, (f"--vae {vae}: a VAE file is read with the model's own VAE config, and "
                                 f"{no_vae_config} has no vae/config.json"))):
        assert run_cli("export", model, "--vae", given, "-o", tmp_path / "out", "--verify", "none") == 2
        assert said in " ".join(capsys.readouterr().err.split())
    assert run_cli("export", diffusers_vae, "-o", tmp_path / "out") == 2  # given as the model: where it goes
    assert ("a diffusers VAE's weight file (its keys are diffusers', not the original layout's): give the folder "
            "holding it and its config.json as --vae DIR beside the model") in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_changed_after_the_check_is_not_read(tiny_checkpoint):
    """A part built later must come from the file that was checked, not from its replacement."""
    from sdexport.errors import ModelLoadError
    from sdexport.models.loader import is_skeleton

    _, path = tiny_checkpoint
    loaded = load_model(str(path), config="tiny", lazy=True)
    loaded.materialize("text_encoder")
    replacement = path.with_name("other.safetensors")
    write_single_file_checkpoint(load_model("tiny", seed=1), replacement)
    replacement.replace(path)
    with pytest.raises(ModelLoadError, match="changed after sdexport checked it"):
        loaded.materialize("unet")
    assert is_skeleton(loaded.modules["unet"])


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "state_dict"])
def test_ckpt_round_trip(tmp_path: Path, nested: bool) -> None:
    """A torch-pickled checkpoint (zip format, mapped rather than read) loads the same weights, lazily,
    its tensors perhaps under ``state_dict`` beside training counters."""
    original = load_model("tiny")
    state = {k: v.detach().clone().contiguous() for k, v in ldm_state_dict(
        original.modules["unet"], original.modules["vae"], original.modules["text_encoder"]).items()}
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 7} if nested else state, path)
    if nested:  # a suffix in another case is the same kind of file
        path = path.rename(tmp_path / "tiny.CKPT")
    loaded = load_model(str(path), config="tiny", lazy=True)
    for part in PARTS:
        loaded.materialize(part)
    assert_same_weights(original, loaded)


def test_a_ckpt_holding_other_values_beside_its_tensors_is_read_for_its_tensors(tmp_path: Path) -> None:
    """Training scripts save counters beside the weights (``global_step``, ``epoch``): the layout
    leaves them out rather than take them for tensors (and fail on an int's shape)."""
    from sdexport.models.single_file import read_layout

    path = tmp_path / "model.ckpt"
    torch.save({"model.diffusion_model.conv_in.weight": torch.zeros(2, 3), "global_step": 1234, "epoch": 7}, path)
    layout = read_layout(path)
    assert list(layout) == ["model.diffusion_model.conv_in.weight"]
    assert layout["model.diffusion_model.conv_in.weight"].shape == (2, 3)


def test_a_plain_fp8_checkpoint_loads_its_weights_as_they_were_cast(tiny_checkpoint, tmp_path: Path) -> None:
    """The README's "plain fp8 weights are read as they were cast": e4m3 U-Net weights come out as
    those values, in the model's dtype."""
    from safetensors.torch import load_file, save_file

    _, path = tiny_checkpoint
    state = load_file(str(path))
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.dim() > 1 else v
           for k, v in state.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    loaded = load_model(str(tmp_path / "fp8.safetensors"), config="tiny")
    weight = loaded.modules["unet"].state_dict()["down_blocks.0.resnets.0.conv1.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, fp8["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].float())


def test_a_comfyui_scaled_fp8_checkpoint_is_refused_saying_what_it_is(tiny_checkpoint, tmp_path: Path) -> None:
    """Its weights are fp8 divided by a per-tensor ``scale_weight``: before, the refusal listed those
    as weights the architecture lacks, without saying what the file was."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    _, path = tiny_checkpoint
    state = load_file(str(path))
    key = "model.diffusion_model.input_blocks.0.0.scale_weight"
    save_file({**state, "scaled_fp8": torch.zeros(0), key: torch.ones(1)}, str(tmp_path / "scaled.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"a ComfyUI scaled-fp8 checkpoint \({key}, 2 scale tensors\): its fp8 "
                                             "weights are stored divided by scales sdexport does not apply"):
        load_model(str(tmp_path / "scaled.safetensors"), config="tiny")


@pytest.mark.parametrize(("markers", "words"), [
    (("v_pred",), (r"a checkpoint that predicts v \(its v_pred key\), but the --config's scheduler predicts epsilon: "
                  r"give a diffusers directory of the model as --config, its scheduler config with prediction_type "
                  r"v_prediction$")),
    (("v_pred", "ztsnr"), (r"prediction_type v_prediction with rescale_betas_zero_snr and trailing timestep_spacing "
                          r"\(its ztsnr key\)$")),
    (("edm_mean", "edm_std"), r"a Playground v2.5-style checkpoint \(edm_mean/edm_std"),
    (("ztsnr",), (r"a checkpoint trained for zero terminal SNR \(its ztsnr key\), but the --config's scheduler does "
                  r"not sample it so: give a diffusers directory of the model as --config, its scheduler config with "
                  r"rescale_betas_zero_snr true and timestep_spacing trailing \(or linspace\)$")),
])
def test_a_file_that_says_it_is_sampled_otherwise_is_not_read_as_plain(tiny_checkpoint, tmp_path, markers, words):
    """Top-level keys no converter reads (ComfyUI's convention, diffusers' model-type inference reads
    them too): a v-prediction SDXL file, or Playground v2.5's, loaded as plain epsilon SDXL. A file
    trained for zero terminal SNR was read with any config that predicted v (an audit's finding: the
    README said it was refused); the config must rescale its betas and sample the last timestep."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    _, path = tiny_checkpoint
    save_file({**load_file(str(path)), **{key: torch.zeros(0) for key in markers}}, str(tmp_path / "marked.safetensors"))
    with pytest.raises(ModelLoadError, match=words):
        load_model(str(tmp_path / "marked.safetensors"), config="tiny")
    if markers == ("v_pred",):  # with a config that predicts v, as it says
        assert load_model(str(tmp_path / "marked.safetensors"), config="tiny-v", lazy=True).family == "sd"
    if markers == ("v_pred", "ztsnr"):  # refused with tiny-v too, then read with a config sampling as it says
        with pytest.raises(ModelLoadError, match=r"zero terminal SNR \(its ztsnr key\)"):
            load_model(str(tmp_path / "marked.safetensors"), config="tiny-v", lazy=True)
        from sdexport.models.loader import write_config_dir
        from sdexport.models.presets import PRESETS

        config = tmp_path / "config"
        write_config_dir(PRESETS["tiny-v"], config)
        scheduler = config / "scheduler" / "scheduler_config.json"
        scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "rescale_betas_zero_snr": True,
                                         "timestep_spacing": "trailing"}))
        assert load_model(str(tmp_path / "marked.safetensors"), config=str(config), lazy=True).family == "sd"
        # linspace starts at the last timestep too (a review: it was refused)
        scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "timestep_spacing": "linspace"}))
        assert load_model(str(tmp_path / "marked.safetensors"), config=str(config), lazy=True).family == "sd"


def test_a_file_declaring_v_in_its_header_or_a_yaml_beside_it_is_not_read_as_epsilon(tiny_checkpoint, tmp_path):
    """kohya's sd-scripts write SAI ModelSpec's modelspec.prediction_type into the header; A1111
    reads a .yaml of the file's name (model.params.parameterization). Neither was read: such a file
    given an epsilon config was exported as epsilon without a word (an audit)."""
    from safetensors.torch import load_file, save_file

    from sdexport.errors import ModelLoadError

    _, path = tiny_checkpoint
    state = load_file(str(path))
    spec = tmp_path / "spec.safetensors"
    save_file(state, str(spec), metadata={"modelspec.prediction_type": "v"})
    with pytest.raises(ModelLoadError, match=r"predicts v \(its header's modelspec.prediction_type 'v'\), but the "
                                             r"--config's scheduler predicts epsilon"):
        load_model(str(spec), config="tiny", lazy=True)
    assert load_model(str(spec), config="tiny-v", lazy=True).family == "sd"
    save_file(state, str(spec), metadata={"modelspec.prediction_type": "epsilon"})
    assert load_model(str(spec), config="tiny", lazy=True).family == "sd"
    beside = tmp_path / "beside.safetensors"
    shutil.copy(path, beside)
    (tmp_path / "beside.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                          "  params:\n    parameterization: \"v\"\n")
    with pytest.raises(ModelLoadError, match=r"predicts v \(beside.yaml beside it: parameterization 'v'\)"):
        load_model(str(beside), config="tiny", lazy=True)
    for text in ("model:\n  params:\n    parameterization: eps\n", "[not: yaml", "- a list\n", "model: null\n",
                 "model: [1]\n", "model:\n  params: ldm\n"):  # (a model that is no mapping: AttributeError, a review)
        (tmp_path / "beside.yaml").write_text(text)  # epsilon, or no config of one: read as before
        assert load_model(str(beside), config="tiny", lazy=True).family == "sd"


def test_a_unet_of_another_model_is_refused_naming_the_config_to_give(tmp_path) -> None:
    """An inpainting file (9 input channels) read with sd15, or an SDXL file with sd15: torch's list of
    size mismatches, cut at 600 characters, never said which config to give."""
    from sdexport.errors import ModelLoadError
    from sdexport.models.single_file import UNET_PREFIX, _check_unet_inputs

    inpaint = tmp_path / "inpaint.safetensors"
    write_single_file_checkpoint(load_model("tiny-inpaint"), inpaint)
    with pytest.raises(ModelLoadError, match=r"an inpainting model's U-Net, taking 9 input channels, but the --config's "
                                             r"takes 4: give an inpainting config: sd15-inpaint, sd2-inpaint or sdxl-inpaint"):
        load_model(str(inpaint), config="tiny")
    assert load_model(str(inpaint), config="tiny-inpaint", lazy=True).modules["unet"].config.in_channels == 9
    write_config_dir(PRESETS["sd15"], tmp_path / "sd15")
    layout = {f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 2048, device="meta")}
    with pytest.raises(ModelLoadError, match=r"attending to text 2048 wide, as SDXL \(--config sdxl\), but the --config's "
                                             r"attends to 768"):
        _check_unet_inputs(tmp_path / "sdxl.safetensors", layout, tmp_path / "sd15")
    assert PRESETS["sd2-inpaint"].scheduler["prediction_type"] == "epsilon" and PRESETS["sdxl-inpaint"].family == "sdxl"
    # an inpainting file with another family's inpainting config is sent to its own inpainting config
    # (to sd15, which then refused it as an inpainting file: an audit's finding)
    write_config_dir(PRESETS["sd2-inpaint"], tmp_path / "sd2-inpaint")
    sd15_inpainting = {f"{UNET_PREFIX}input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta"),
                       f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                       torch.empty(320, 768, device="meta")}
    with pytest.raises(ModelLoadError, match=r"attending to text 768 wide, as SD 1.x inpainting \(--config "
                                             r"sd15-inpaint\), but the --config's attends to 1024"):
        _check_unet_inputs(tmp_path / "sd15-inpainting.safetensors", sd15_inpainting, tmp_path / "sd2-inpaint")


@pytest.mark.parametrize(("channels", "kind"), [(8, "an instruct-pix2pix model"), (5, "a depth-to-image model"),
                                               (7, "the x4 upscaler"), (6, "a model of another kind")])
def test_a_unet_taking_other_inputs_is_refused_by_kind_not_sent_to_a_config(tmp_path, channels, kind) -> None:
    """No config of sdexport's runs these; the refusal used to tell the user to give one ("a U-Net U-Net")."""
    from sdexport.errors import ModelLoadError
    from sdexport.models.single_file import UNET_PREFIX, _check_unet_inputs

    write_config_dir(PRESETS["tiny"], tmp_path / "tiny")
    layout = {f"{UNET_PREFIX}input_blocks.0.0.weight": torch.empty(32, channels, 3, 3, device="meta")}
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/m.safetensors: {kind}\b.*: the U-Net takes {channels} input "
                                             r"channels for 4 latent channels; sdexport runs U-Nets that take the "
                                             r"latents \(4\) or inpainting ones \(9\)$"):
        _check_unet_inputs(tmp_path / "m.safetensors", layout, tmp_path / "tiny")


@pytest.mark.parametrize(("keys", "holds"), [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], ("a LoRA, not a model: give it to export or run "
                                                                        "as --lora FILE")),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "a LoRA, not a model"),
    (["control_model.input_hint_block.0.weight"], ("a ControlNet in the original layout, not a model: export takes a "
                                                  "diffusers ControlNet directory as --controlnet")),
    (["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"], "a VAE alone, not a model: give it as --vae FILE beside the model"),
    (["emb_params"], "a textual inversion embedding, not a model: give it to export as --textual-inversion FILE"),
    (["clip_l", "clip_g"], "a textual inversion embedding"),
    (["<cat-toy>"], "a textual inversion embedding"),  # diffusers' {word: vectors}
    (["weight"], r"not an original-layout Stable Diffusion checkpoint \(for a diffusers directory, pass the directory\)"),
])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_file_downloaded_beside_a_model_is_refused_saying_what_it_holds(tmp_path, keys, holds, suffix) -> None:
    """LoRAs, ControlNets, VAEs and embeddings are single files too: each is named, with where it goes."""
    from safetensors.torch import save_file

    from sdexport.errors import ModelLoadError

    path = tmp_path / f"file{suffix}"
    tensors = {key: torch.zeros(2, 2) for key in keys}
    save_file(tensors, path) if suffix == ".safetensors" else torch.save({"state_dict": tensors}, path)
    with pytest.raises(ModelLoadError, match=rf"^{path}: no 'model.diffusion_model.\*' weights; {holds}"):
        load_model(str(path), config="tiny")
    if suffix == ".safetensors":  # (its header says so at once: a LoRA is not asked for a --config first)
        with pytest.raises(ModelLoadError, match=rf"^{path}: no 'model.diffusion_model.\*' weights; {holds}"):
            load_model(str(path))


@pytest.mark.parametrize("block", ["double_blocks.0.img_attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight"])
def test_a_transformer_denoisers_checkpoint_is_named_as_one(tmp_path, block) -> None:
    """Flux's and SD3's single files keep their transformer under the U-Net's prefix: every --config
    was told the file lacked its weights ("is --config the right architecture?"), after torch loaded
    (an audit's finding). Named at once, without a --config."""
    from safetensors.torch import save_file

    from sdexport.errors import ModelLoadError

    path = tmp_path / "flux.safetensors"
    save_file({f"model.diffusion_model.{block}": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match=rf"^{path}: a transformer \(DiT\) denoiser's checkpoint .*Flux, SD3"):
        load_model(str(path))


def test_a_safetensors_file_named_ckpt_is_told_to_be_renamed(tiny_checkpoint, tmp_path) -> None:
    from sdexport.errors import ModelLoadError

    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes(tiny_checkpoint[1].read_bytes())
    with pytest.raises(ModelLoadError, match=rf"^{renamed}: a safetensors file by its content: name it .safetensors$"):
        load_model(str(renamed), config="tiny")


LFS = (b"version https://git-lfs.github.com/spec/v1\noid sha256:4c8b2d5e0f1a3b6c9d7e2f4a8b1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f1a3b5c"
       b"\nsize 4265146304\n")


@pytest.mark.parametrize(("name", "content", "said"), [
    ("model.safetensors", LFS, ("a Git LFS pointer, not the weights: the repository was cloned without git-lfs; run "
                                "`git lfs pull` in it, or download the file itself")),
    ("model.ckpt", LFS, "a Git LFS pointer, not the weights"),
    ("model.safetensors", b"\n<!DOCTYPE html><html><body>Sign in</body></html>",
     "an HTML or XML page, not the weights: a download that saved an error or sign-in page?"),
    ("model.safetensors", b"PK\x03\x04 rest of a zip", "a torch checkpoint by its content: name it .ckpt"),
    # a safetensors file cut short whose header's length starts with 0x80, as one in 32 do: not a pickle
    ("model.safetensors", b"\x80\x02\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\"", "Error while deserializing header"),
    ("unet/diffusion_pytorch_model.safetensors", LFS, "a Git LFS pointer, not the weights"),
    ("unet/diffusion_pytorch_model.bin", LFS, "a Git LFS pointer, not the weights"),
    # empty: safetensors said "header too small", a .ckpt "it starts b''" (an audit)
    ("model.safetensors", b"", "not a readable safetensors file (empty (0 bytes): an interrupted download or copy?)"),
    ("model.ckpt", b"", "(empty (0 bytes): an interrupted download or copy?)"),
])
def test_what_stands_in_for_the_weights_is_named(tiny_diffusers_dir, tmp_path, name, content, said) -> None:
    """A model repository cloned without git-lfs holds pointer files under the weights' names, and a
    download may save a web page or a torch checkpoint under a .safetensors name: safetensors said
    "header too large" for each (an audit's finding), which pointed nowhere."""
    import shutil

    from sdexport.errors import ModelLoadError
    from sdexport.models.outline import check_part_weights, outline_model

    if "/" in name:  # a diffusers directory whose U-Net weights are the pointer
        model = tmp_path / "model"
        shutil.copytree(tiny_diffusers_dir, model)
        for old in (model / "unet").glob("diffusion_pytorch_model.*"):
            old.unlink()
        path, config = model / name, None
    else:
        model = path = tmp_path / name
        config = "tiny"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=rf"^{re.escape(str(path))}: .*{re.escape(said)}"):
        check_part_weights(outline_model(str(model), config=config), ["unet"])


class Callback:
    """What a training run pickles beside the weights (PyTorch Lightning's callbacks, in old .ckpt files)."""


class Command:
    """What a malicious file pickles: a call of os.system (torch words its refusal otherwise than for a class)."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize(("content", "reason"), [
    ("text", r"not a torch checkpoint: it starts b'not ', neither torch.save's zip archive nor a pickle; .+"),
    ("truncated", r"truncated or damaged: torch cannot read its zip archive \(.*central directory\)"),
    ("objects", (r"it pickles Python objects besides tensors \(test_single_file.Callback\), which sdexport does not "
                r"unpickle \(they can run code\); convert it to .safetensors with a tool you trust")),
    ("a blocked module's", r"it pickles Python objects besides tensors \((posix|nt).system\), which sdexport does not .+"),
])
def test_an_unreadable_ckpt_is_one_line_with_its_reason(tmp_path: Path, content: str, reason: str) -> None:
    """diffusers says "Unable to load weights" whatever the reason; torch's own lies below it."""
    from sdexport.errors import ModelLoadError

    path = tmp_path / "broken.ckpt"
    if content == "text":
        path.write_bytes(b"not a pickle")
    else:
        torch.save({"state_dict": {"w": torch.zeros(64)},
                    "callbacks": Command() if content == "a blocked module's" else Callback()}, path)
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ModelLoadError, match=rf"broken\.ckpt: cannot read the checkpoint \({reason}\)$") as caught:
        load_model(str(path), config="tiny")
    assert "\n" not in str(caught.value)


def test_an_unreadable_ckpt_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """diffusers' loader, where torch fails, reads the whole file again as text before its "Unable to
    load weights" (an audit: twice a 600 MB file's size in memory): a truncated SD download would
    cost 8-15 GB before the one line. torch reads a damaged archive's directory, not its contents."""
    import tracemalloc

    from sdexport.errors import ModelLoadError

    path = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(8 * 1024 * 1024)}}, path)  # 32 MiB
    path.write_bytes(path.read_bytes()[:-200])
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match=r"truncated\.ckpt: cannot read the checkpoint \(truncated or damaged"):
            load_model(str(path), config="tiny")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held to refuse a 32 MiB file"


def test_the_file_is_opened_again_as_reads_add_up(tiny_checkpoint, monkeypatch) -> None:
    """Pages read through one mapping stay resident until it closes: the reader opens the file again
    after REOPEN_BYTES, and every tensor still comes out whole."""
    from sdexport.models.single_file import _Reader

    original, path = tiny_checkpoint
    opened: list[int] = []
    open_file = _Reader._open
    monkeypatch.setattr(_Reader, "REOPEN_BYTES", 64 * 1024)
    monkeypatch.setattr(_Reader, "_open", lambda self: opened.append(1) or open_file(self))
    loaded = load_model(str(path), config="tiny")
    assert len(opened) > len(PARTS) + 3
    assert_same_weights(original, loaded)


def _mappings_of(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(path))]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_built_parts_hold_no_view_of_the_file(tmp_path: Path, suffix: str) -> None:
    """Each tensor is copied out of the file's mapping: a part that kept views of it would keep the
    pages it was read from resident, and counted in the process's memory, as long as it lives."""
    original = load_model("tiny")  # float32, as loaded: a cast to float32 alone would copy nothing
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({k: v.detach().clone().contiguous() for k, v in ldm_state_dict(
            original.modules["unet"], original.modules["vae"], original.modules["text_encoder"]).items()}, path)
    else:
        write_single_file_checkpoint(original, path)
    loaded = load_model(str(path), config="tiny", lazy=True)
    for part in PARTS:
        loaded.materialize(part)
    assert _mappings_of(path) == []
    assert_same_weights(original, loaded)


def test_a_checkpoint_replaced_while_a_part_is_read_is_refused(tiny_checkpoint, monkeypatch) -> None:
    """The file is opened again as reads add up: each opening is checked to be the file checked."""
    from sdexport.errors import ModelLoadError
    from sdexport.models.single_file import _Reader

    _, path = tiny_checkpoint
    loaded = load_model(str(path), config="tiny", lazy=True)
    replacement = path.with_name("other.safetensors")
    write_single_file_checkpoint(load_model("tiny", seed=1), replacement)
    opened: list[int] = []
    open_file = _Reader._open

    def open_then_swap(self: _Reader):  # the second opening finds the other file at the path
        opened.append(1)
        if len(opened) == 2:
            replacement.replace(path)
        return open_file(self)

    monkeypatch.setattr(_Reader, "REOPEN_BYTES", 64 * 1024)
    monkeypatch.setattr(_Reader, "_open", open_then_swap)
    with pytest.raises(ModelLoadError, match="changed after sdexport checked it") as caught:
        loaded.materialize("unet")
    assert len(opened) == 2 and str(caught.value).count(str(path)) == 1


def test_a_checkpoint_written_to_while_a_part_is_read_is_refused(tiny_checkpoint, monkeypatch) -> None:
    """A file changed in place (same inode, new times) after it was opened: the part read from it
    may hold tensors of both versions, so it is refused once read, not kept."""
    import os

    from sdexport.errors import ModelLoadError
    from sdexport.models.loader import is_skeleton
    from sdexport.models.single_file import _Reader

    _, path = tiny_checkpoint
    loaded = load_model(str(path), config="tiny", lazy=True)
    read = _Reader.read

    def read_then_write(self: _Reader, key: str) -> torch.Tensor:
        tensor = read(self, key)
        stat = path.stat()  # (as a write to the file would leave it)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        return tensor

    monkeypatch.setattr(_Reader, "read", read_then_write)
    with pytest.raises(ModelLoadError, match="changed after sdexport checked it"):
        loaded.materialize("unet")
    assert is_skeleton(loaded.modules["unet"])


def test_each_text_encoder_tensor_is_read_once(tiny_checkpoint, reads) -> None:
    _, path = tiny_checkpoint
    load_model(str(path), config="tiny", lazy=True).materialize("text_encoder")
    assert reads and len(reads) == len(set(reads))


SINGLE_FILE_SCENARIO = ('height = 64\nwidth = 64\nsteps = [1]\nbatch = [1]\nwarmup = 0\nrepeats = 1\n'
                        'contenders = ["diffusers", "onnxruntime-cpu", "torch"]\n')


def test_a_bench_scenario_names_a_single_files_architecture_with_config_alone(tiny_checkpoint, tmp_path: Path,
                                                                              capsys):
    """A refusal names the scenario's key, not export's flag; nothing is written."""
    from conftest import run_cli

    _, path = tiny_checkpoint
    scenario, common = tmp_path / "single.toml", SINGLE_FILE_SCENARIO
    scenario.write_text(f'model = "{path}"\n{common}')
    assert run_cli("bench", scenario, "-o", tmp_path / "refused") == 2
    assert "a single-file checkpoint needs config:" in capsys.readouterr().err
    scenario.write_text(f'model = "tiny"\nconfig = "tiny"\n{common}')
    assert run_cli("bench", scenario, "-o", tmp_path / "refused") == 2
    assert "config: tiny: only a single-file checkpoint (.safetensors/.ckpt) takes config;" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow  # a single file's export and the bench's Torch contender are each checked by default
def test_a_bench_scenario_states_a_single_files_architecture(tiny_checkpoint, tmp_path: Path):
    """``config`` in a scenario is export's --config: the file is exported, the diffusers baseline and
    the Torch contender read it, and they agree."""
    import json

    from conftest import run_cli

    _, path = tiny_checkpoint
    scenario = tmp_path / "single.toml"
    scenario.write_text(f'model = "{path}"\nconfig = "tiny"\n{SINGLE_FILE_SCENARIO}')
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["scenario"]["config"] == "tiny"
    rows = {r["contender"]: r for r in report["results"]}
    assert rows["onnxruntime-cpu"]["agreement"]["latents_rel_l2"] < 1e-4
    assert rows["torch"]["agreement"]["latents_rel_l2"] < 1e-4


def test_a_single_files_bench_cache_key_reads_its_config_by_content_or_preset_name(tiny_checkpoint, tmp_path: Path,
                                                                                  monkeypatch):
    """A config directory counts by content, however the scenario spells its path; a preset by name."""
    from sdexport.bench.engine_cache import export_key
    from sdexport.bench.scenario import Scenario
    from sdexport.models.outline import outline_model

    _, path = tiny_checkpoint
    write_config_dir(PRESETS["tiny"], tmp_path / "config")
    monkeypatch.chdir(tmp_path)

    def key(config: str) -> str:
        scenario = Scenario(name="s", model=str(path), config=config)
        sources = outline_model(scenario.model, config=config).sources
        return export_key(scenario, sources, PRESETS["tiny"].profile, "fp32", ["unet"])

    assert key(str(tmp_path / "config")) == key("config") == key("./config/")
    assert key("tiny") != key("tiny-v") and key("tiny") != key("config")


def test_a_full_size_preset_reads_prompts_with_clips_own_tokenizer(tmp_path: Path) -> None:
    """A single file read with a full-size preset (`export model.safetensors --config sd15`) has a
    text encoder trained on CLIP's vocabulary: it was given the tiny presets' byte-level tokenizer,
    every prompt silently read as other words. CLIP's ids for "a photo of a cat" are well known;
    OpenCLIP's tokenizers (SD 2.x, SDXL's second) pad with "!" (id 0), OpenAI's with the end token."""
    from transformers import CLIPTokenizer

    from sdexport.models.tokenizer import preset_tokenizer

    cat = [49406, 320, 1125, 539, 320, 2368, 49407]
    write_config_dir(PRESETS["sdxl"], tmp_path / "sdxl")
    for name, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):
        saved = CLIPTokenizer.from_pretrained(tmp_path / "sdxl" / name)
        assert saved("a photo of a cat").input_ids == cat, name
        assert len(saved) == 49408 and saved.pad_token_id == pad, name
    assert preset_tokenizer(PRESETS["sd21"], "tokenizer").pad_token_id == 0
    assert preset_tokenizer(PRESETS["sd15"], "tokenizer")("A Lighthouse, at DUSK!").input_ids == \
        preset_tokenizer(PRESETS["sd15"], "tokenizer")("a lighthouse , at dusk !").input_ids
    # the pooled output at the highest id, CLIP's end token, as the checkpoints' configs have it
    assert {PRESETS[n].text_encoder["eos_token_id"] for n in ("sd15", "sd21", "sdxl")} == {2}
    assert PRESETS["sdxl"].text_encoder_2["eos_token_id"] == 2
    assert len(preset_tokenizer(PRESETS["tiny"], "tokenizer")) == 514  # (the tiny ones' byte-level vocabulary)


def test_sd2_base_models_have_a_config_of_their_own_and_sd21_says_what_it_predicts(monkeypatch, tmp_path, capsys):
    """SD 2.x's base models share the 768-v model's shapes, and sd21 was the only SD 2 preset: a
    base model's file was exported as v-prediction, silently."""
    from sdexport.models import loader

    base, v = PRESETS["sd21-base"], PRESETS["sd21"]
    assert base.scheduler["prediction_type"] == "epsilon" and v.scheduler["prediction_type"] == "v_prediction"
    assert (base.unet["sample_size"], base.vae["sample_size"], base.profile.height[1]) == (64, 512, 512)
    numerics = ("sample_size", "upcast_attention")  # (the weights' shapes are the same)
    assert {k: val for k, val in base.unet.items() if k not in numerics} == {k: val for k, val in v.unet.items()
                                                                             if k not in numerics}
    # the note, as the file is read (everything after the config is written stubbed: no SD 2 weights here)
    monkeypatch.setattr(loader, "check_single_file", lambda path: None)
    monkeypatch.setattr("sdexport.models.single_file.plan_components", lambda *a, **k: ({}, {}))
    monkeypatch.setattr(loader, "load_subfolder", lambda *a: None)
    monkeypatch.setattr(loader, "_assemble", lambda *a, **k: None)
    for config in ("sd21", "sd21-base"):
        loader.load_single_file(tmp_path / "model.safetensors", config=config)
    notes = capsys.readouterr().err
    assert notes.count("is read as SD 2.1 768-v, which predicts v;") == 1 and "--config sd21-base" in notes


def test_an_export_that_gave_a_checkpoint_the_byte_level_tokenizer_is_refused_at_load(engine_copy, capsys) -> None:
    """Before 2026-12-06 a single file read with a full-size preset got the tiny presets' byte-level
    tokenizer: its engines read every prompt as other words. Such a directory is named, not run."""
    from conftest import run_cli

    data = json.loads((engine_copy / "manifest.json").read_text())
    data["model"]["source"] = {"kind": "single_file", "path": "/models/model.safetensors", "config": "sd15"}
    (engine_copy / "manifest.json").write_text(json.dumps(data))
    assert run_cli("run", engine_copy, "-p", "a cat", "--steps", "1", "-o", engine_copy.parent / "x.png") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("a checkpoint exported with --config sd15 by an sdexport that gave it the tiny presets' byte-level "
            "tokenizer (514 ids, not CLIP's)") in err and not (engine_copy.parent / "x.png").exists()


def test_a_single_file_read_with_a_preset_records_its_digest_and_a_changed_one_is_refused() -> None:
    """The Torch backend rebuilds a single file's model from its --config: a preset changed since
    (the full-size text configs' token ids, 2026-12-06) would pool SDXL's text embedding elsewhere
    than the graphs do."""
    from sdexport.errors import EngineDirError
    from sdexport.models.presets import config_digest
    from sdexport.models.source_files import check_unchanged, preset_unchanged

    source = {"kind": "single_file", "path": "/m.safetensors", "config": "sdxl", "config_sha256": config_digest(PRESETS["sdxl"])}
    assert preset_unchanged(source)
    with pytest.raises(EngineDirError, match="the preset sdxl's configs changed since this export"):
        check_unchanged({**source, "config_sha256": "0" * 64}, ["unet"])
    assert preset_unchanged({"kind": "single_file", "path": "/m.safetensors", "config": "sdxl"})  # (older: trusted)
    assert preset_unchanged({"kind": "single_file", "path": "/m.safetensors", "config": "/configs/sdxl"})

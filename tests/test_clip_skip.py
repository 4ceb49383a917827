"""Clip skip: the prompt read from a text encoder layer before the last (diffusers' ``clip_skip``).

SD's export builds it into the text encoder graph (``export --clip-skip``); SDXL's graphs give every
layer, so a request picks one. The references are computed from transformers' hidden states, as
diffusers computes ``clip_skip`` for the prompt: its SD pipelines fail with it on transformers 5.6
and later (they read ``text_model.final_layer_norm``, which moved), and it reads the negatives from
the last layer whatever ``clip_skip``, where sdexport reads them from the same layer as the prompts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bench_refusal, cpu_only, run_cli
from sdexport.errors import SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.export.plan import plan_export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest, check_request
from sdexport.specs import components_for

REQUEST = GenerationRequest(prompt=["a lighthouse", "a harbour"], negative_prompt=["fog", ""], steps=3,
                            seeds=[5, 6], height=64, width=64, scheduler="euler")


def _ids(model, texts: list[str], tokenizer: str = "tokenizer") -> torch.Tensor:
    return model.tokenizers[tokenizer](texts, padding="max_length", max_length=77, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def skipping_dir(tmp_path_factory) -> Path:
    """The tiny SD model (two text encoder layers) exported reading the penultimate one."""
    out = tmp_path_factory.mktemp("clip-skip") / "tiny"
    export("tiny", out, ExportOptions(verify="quick", clip_skip=1))
    return out


def test_the_sd_text_encoder_reads_the_layer_through_the_final_norm():
    """As diffusers' SD pipelines compute clip_skip: hidden_states[-(clip_skip + 1)], then the final
    layer norm that the last layer's output passes through."""
    model = load_model("tiny")
    encoder = model.modules["text_encoder"]
    spec = next(s for s in components_for("sd") if s.name == "text_encoder")
    ids = _ids(model, ["a cat", "x"])
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        skipped = spec.for_model(dataclasses.replace(model.dims, clip_skip=1)).wrapper(encoder)(ids.int())[0]
        plain = spec.for_model(model.dims).wrapper(encoder)(ids.int())[0]
    assert torch.equal(skipped, encoder.final_layer_norm(hidden[-2]))
    assert torch.equal(plain, encoder.final_layer_norm(hidden[-1]))
    assert not torch.equal(skipped, plain)


def test_an_sd_export_builds_it_in_and_every_backend_runs_it(skipping_dir, tiny_engine_dir):
    manifest = load_manifest(skipping_dir)
    assert manifest.model_dims.clip_skip == 1 and manifest.dims["clip_skip"] == 1
    assert "clip_skip" not in load_manifest(tiny_engine_dir).dims  # (older sdexport reads a plain export)
    with cpu_only():
        onnx = load_pipeline(skipping_dir, "onnxruntime-cpu")(REQUEST)
        reloaded = load_pipeline(skipping_dir, "torch")(REQUEST)  # the wrapper with the manifest's clip skip
    plain = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")(REQUEST)
    assert np.abs(onnx.pixels - reloaded.pixels).max() < 1e-4
    assert np.abs(onnx.pixels - plain.pixels).max() > 1e-2  # the layer read changes the image: the test can tell
    assert onnx.request.clip_skip == 1  # what ran, for the saved image


def test_the_text_encoder_graph_gives_the_skipped_reading(skipping_dir):
    import onnxruntime

    model = load_model("tiny")
    encoder = model.modules["text_encoder"]
    ids = _ids(model, ["a cat", "x"])
    session = onnxruntime.InferenceSession(str(skipping_dir / "text_encoder" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    got = session.run(["last_hidden_state"], {"input_ids": ids.int().numpy()})[0]
    with torch.no_grad():
        want = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
    assert np.abs(got - want.numpy()).max() < 1e-5


def test_run_records_it_and_an_sd_export_takes_its_own_only(skipping_dir, tmp_path, capsys):
    out = tmp_path / "skip.png"
    assert run_cli("run", str(skipping_dir), "-p", "a lighthouse", "--steps", "2", "-o", str(out)) == 0
    image = Image.open(out)
    assert json.loads(image.text["sdexport"])["clip_skip"] == 1
    assert image.text["parameters"].endswith(", Clip skip: 2")  # A1111 counts from 1
    assert run_cli("run", str(skipping_dir), "-p", "a lighthouse", "--clip-skip", "1", "-o", str(out)) == 0
    capsys.readouterr()
    assert run_cli("run", str(skipping_dir), "-p", "a lighthouse", "--clip-skip", "0", "-o", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --clip-skip 0: this SD export's text encoder has clip skip 1 built in; "
                          "export the model again without --clip-skip")
    assert "\n" not in err and not (tmp_path / "x.png").exists()


def test_a_plain_image_records_none(tiny_engine_dir, tmp_path):
    out = tmp_path / "plain.png"
    assert run_cli("run", str(tiny_engine_dir), "-p", "a lighthouse", "--steps", "1", "-o", str(out)) == 0
    image = Image.open(out)
    assert "clip_skip" not in json.loads(image.text["sdexport"]) and "Clip skip" not in image.text["parameters"]


def test_sdxl_reads_the_chosen_layer_for_prompts_and_negatives(tiny_sdxl_engine_dir):
    """diffusers' SDXL reads hidden_states[-(clip_skip + 2)] of both encoders for the prompt; the
    negatives here are read from the same layer (diffusers takes hidden_states[-2] for them)."""
    model = load_model("tiny-sdxl")
    pipeline = load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu")
    request = dataclasses.replace(REQUEST, clip_skip=1)
    got = pipeline.encode_prompt(request)["encoder_hidden_states"]
    with torch.no_grad():
        want = []
        for texts in (request.negative_prompt, request.prompt):
            layers = [model.modules[name](_ids(model, texts, tokenizer), output_hidden_states=True).hidden_states[-3]
                      for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))]
            want.append(torch.cat(layers, dim=-1))
    assert torch.allclose(got, torch.cat(want), atol=1e-5)
    plain = pipeline.encode_prompt(REQUEST)["encoder_hidden_states"]
    assert not torch.allclose(got, plain, atol=1e-3)


def test_sdxl_takes_any_layer_its_encoders_have_and_the_export_sets_the_default(tiny_sdxl_engine_dir, tmp_path,
                                                                                   capsys):
    out = tmp_path / "sdxl"
    export("tiny-sdxl", out, ExportOptions(verify="none", clip_skip=1, components=["text_encoder", "text_encoder_2"]))
    dims = load_manifest(out).model_dims
    assert (dims.clip_skip, dims.L1, dims.L2) == (1, 2, 3)
    for value in (0, 1, None):
        check_request(dataclasses.replace(REQUEST, clip_skip=value), family="sdxl", dims=dims,
                      profile=load_manifest(out).shape_profile)
    with pytest.raises(SdexportError, match=r"^clip_skip 2: the text encoders have 2 and 3 layers; skip at most 1$"):
        check_request(dataclasses.replace(REQUEST, clip_skip=2), family="sdxl", dims=dims,
                      profile=load_manifest(out).shape_profile)
    pipeline = load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu")
    assert pipeline(dataclasses.replace(REQUEST, steps=1)).request.clip_skip == 0  # the plain export's


@pytest.mark.parametrize(("value", "message"), [
    (-1, "--clip-skip -1: expected a whole number of layers, 0 or more (diffusers' clip_skip: 1 reads"),
    (True, "--clip-skip True: expected a whole number of layers"),
    (2, "--clip-skip 2: the text encoder has 2 layers; skip at most 1"),
])
def test_export_refuses_what_the_text_encoder_cannot_skip(value, message, tmp_path):
    with pytest.raises(SdexportError, match="^" + message.replace("(", r"\(")):
        plan_export("tiny", tmp_path / "out", ExportOptions(clip_skip=value))
    assert not (tmp_path / "out").exists()


def test_export_refuses_it_without_a_text_encoder(tmp_path):
    with pytest.raises(SdexportError, match="which --components leaves out"):
        plan_export("tiny", tmp_path / "out", ExportOptions(clip_skip=1, components=["unet"]))


def test_the_cli_refuses_a_bad_value_before_loading(tmp_path, capsys):
    assert run_cli("export", "tiny-sdxl", "-o", str(tmp_path / "x"), "--clip-skip", "3") == 2
    assert capsys.readouterr().err.strip() == ("error: --clip-skip 3: the text encoders have 2 and 3 layers; "
                                               "skip at most 1")


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_request_must_give_whole_layers(value, tiny_engine_dir):
    manifest = load_manifest(tiny_engine_dir)
    with pytest.raises(SdexportError, match="expected a whole number of layers"):
        check_request(dataclasses.replace(REQUEST, clip_skip=value), family="sd", dims=manifest.model_dims,
                      profile=manifest.shape_profile)


def test_served_rows_carry_it_and_share_a_call_only_with_equal_ones():
    from sdexport.serving.requests import decode_rows, generation_request, group_rows

    inputs = {"prompt": np.array([[b"a"], [b"b"], [b"c"]], dtype=object),
              "clip_skip": np.array([[1], [1], [0]], dtype=np.int32)}
    rows = decode_rows(inputs, (64, 64))
    assert [r.clip_skip for r in rows] == [1, 1, 0]
    calls = group_rows(list(enumerate(rows)), max_batch=4)
    assert sorted(len(call) for call in calls) == [1, 2]
    assert generation_request([rows[0], rows[1]]).clip_skip == 1
    assert decode_rows({"prompt": inputs["prompt"][:1]}, (64, 64))[0].clip_skip is None  # the directory's


def test_loras_still_find_the_skipped_layers(skipping_dir, tmp_path):
    """The skipped layers stay in the graph (its pooled output reads them): a LoRA made for the
    whole text encoder fits, and ONNX Runtime's result is the Torch backend's."""
    from safetensors.torch import save_file
    from test_lora import TEXT_TARGETS, _random_peft_state

    from sdexport.models.lora import LoraFile

    state = _random_peft_state(load_model("tiny").modules["text_encoder"], TEXT_TARGETS, "text_encoder", 2)
    assert any(".layers.1." in name for name in state)  # the skipped (last) layer's too
    path = tmp_path / "text.safetensors"
    save_file(state, str(path))
    loras = [LoraFile(path)]
    with cpu_only():
        onnx = load_pipeline(skipping_dir, "onnxruntime-cpu", loras=loras)(REQUEST)
        reloaded = load_pipeline(skipping_dir, "torch", loras=loras)(REQUEST)
    assert np.abs(onnx.pixels - reloaded.pixels).max() < 1e-4


def test_bench_refuses_a_directory_that_skips(skipping_dir, tmp_path, capsys):
    """The diffusers baseline reads the last layer (and fails with clip_skip on transformers 5.6+)."""
    assert "reads the prompt with clip skip 1 (export --clip-skip), the diffusers baseline without" in \
        bench_refusal(skipping_dir, tmp_path, capsys)


def test_a_manifest_skipping_past_the_encoders_layers_is_refused(tiny_sdxl_engine_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dims"]["clip_skip"] = 2  # (L1 2, L2 3)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("inspect", copy) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "invalid manifest: dims.clip_skip 2: the text encoders have 2 and 3 layers; skip at most 1" in err
    assert "Traceback" not in err


def test_a_zero_that_overrides_the_default_is_recorded(tmp_path):
    out = tmp_path / "sdxl"
    export("tiny-sdxl", out, ExportOptions(verify="none", clip_skip=1))
    pipeline = load_pipeline(out, "onnxruntime-cpu")
    request = dataclasses.replace(REQUEST, steps=1, prompt=["a"], negative_prompt=None, seeds=[1])
    defaulted, overridden = pipeline(request), pipeline(dataclasses.replace(request, clip_skip=0))
    assert defaulted.request.clip_skip == 1 and defaulted.info["clip_skip"] == 1
    assert overridden.info["clip_skip"] == 0
    overridden.save(tmp_path / "zero.png")
    image = Image.open(tmp_path / "zero.png")
    assert json.loads(image.text["sdexport"])["clip_skip"] == 0 and image.text["parameters"].endswith("Clip skip: 1")


def test_a_hand_edited_sd_clip_skip_past_the_layers_is_refused(skipping_dir, tmp_path, capsys):
    """SD's is bounded by its text encoder's config.json (no dims hold its layers)."""
    import shutil

    copy = tmp_path / "sd"
    shutil.copytree(skipping_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dims"]["clip_skip"] = 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("inspect", copy) == 2
    assert "invalid manifest: dims.clip_skip 5: the text encoder has 2 layers; skip at most 1" in \
        " ".join(capsys.readouterr().err.split())


def test_an_edited_text_encoder_config_is_named_not_the_manifest(skipping_dir, tmp_path, capsys):
    """The config's layers were read before its hash was checked: a config edited after the export
    was blamed on the manifest ("invalid manifest: dims.clip_skip 1 ..."; an audit)."""
    import shutil

    copy = tmp_path / "sd"
    shutil.copytree(skipping_dir, copy)
    config = json.loads((copy / "text_encoder" / "config.json").read_text())
    (copy / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    assert run_cli("inspect", copy) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "text_encoder/config.json" in err and "invalid manifest" not in err, err


def test_adopt_takes_the_clip_skip_an_export_was_made_with(skipping_dir, tmp_path, capsys):
    """An SD graph that reads the penultimate layer: adopted with --model, it failed parity against
    the last layer's reading with no way to say which layer it reads; --clip-skip says it."""
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(skipping_dir, foreign)
    (foreign / "manifest.json").unlink()
    assert run_cli("adopt", foreign, "--model", "tiny") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "text_encoder" in err and "adopt --clip-skip" in err, err
    assert run_cli("adopt", foreign, "--model", "tiny", "--clip-skip", "1") == 0
    manifest = load_manifest(foreign)
    assert manifest.model_dims.clip_skip == 1 and manifest.components["text_encoder"].parity["status"] == "passed"
    assert run_cli("adopt", foreign, "--clip-skip", "2", "--force") == 2
    assert "--clip-skip 2" in capsys.readouterr().err  # past the tiny encoder's two layers

"""Textual inversion embeddings added at export, against diffusers' ``load_textual_inversion``.

The embeddings here are random vectors of the tiny models' widths, in the layouts that circulate:
A1111's one ``emb_params`` tensor (several vectors, so the word spells out as several tokens) for
SD, ``clip_l`` + ``clip_g`` for SDXL.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import bench_refusal, cpu_only, run_cli, token_ids
from sdexport.bench.reference import DiffusersReference
from sdexport.errors import EngineDirError, SdexportError
from sdexport.export.exporter import ExportOptions, export
from sdexport.export.plan import plan_export
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.models.textual_inversion import Embedding
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import GenerationRequest

REQUEST = GenerationRequest(prompt=["a my-style lighthouse", "a harbour"], negative_prompt=["my-style", "fog"],
                            steps=3, seeds=[5, 6], height=64, width=64, scheduler="euler")
LATENT_REL_L2 = 1e-4


def _save(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    return {
        "sd": _save(root / "my-style.safetensors", emb_params=torch.randn(3, 32, generator=g)),
        "sdxl": _save(root / "xl.safetensors", clip_l=torch.randn(2, 32, generator=g), clip_g=torch.randn(2, 48, generator=g)),
        "one": _save(root / "one.safetensors", **{"<cat-toy>": torch.randn(32, generator=g)}),  # diffusers' layout
    }


@pytest.fixture(scope="module")
def sd_dir(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ti") / "tiny"
    export("tiny", out, ExportOptions(verify="quick", embeddings=[Embedding(files["sd"], "my-style"),
                                                                  Embedding(files["one"], "cat-toy")]))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_sd_images_match_diffusers_with_the_same_embeddings(sd_dir, files):
    """Several vectors under one word (spelled out as my-style my-style_1 my-style_2), and a
    diffusers-layout file under a word of its own, in prompts and negatives alike."""
    reference = DiffusersReference(load_model("tiny"))
    reference.pipe.load_textual_inversion(str(files["sd"]), token="my-style")
    reference.pipe.load_textual_inversion(str(files["one"]), token="cat-toy")
    request = dataclasses.replace(REQUEST, prompt=["a my-style lighthouse", "a cat-toy on a my-style shelf"])
    want = reference(request)
    with cpu_only():
        for backend in ("onnxruntime-cpu", "torch"):
            got = load_pipeline(sd_dir, backend)(request)
            assert _rel(got.latents, want.latents) < LATENT_REL_L2, backend
    plain = DiffusersReference(load_model("tiny"))(request)
    assert _rel(plain.latents, want.latents) > 1e-2  # the embeddings change the images: the test can tell


def test_sdxl_images_match_diffusers_with_the_same_embeddings(files, tmp_path):
    out = tmp_path / "sdxl"
    export("tiny-sdxl", out, ExportOptions(verify="quick", embeddings=[Embedding.parse(f"{files['sdxl']}:xl-style")]))
    reference = DiffusersReference(load_model("tiny-sdxl"))
    pipe = reference.pipe
    from safetensors.torch import load_file

    state = load_file(str(files["sdxl"]))
    pipe.load_textual_inversion(state["clip_l"], token="xl-style", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="xl-style", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    request = dataclasses.replace(REQUEST, prompt=["a xl-style lighthouse", "a harbour"], negative_prompt=None)
    want = reference(request)
    got = load_pipeline(out, "onnxruntime-cpu")(request)
    assert _rel(got.latents, want.latents) < LATENT_REL_L2
    manifest = load_manifest(out)
    assert [e["word"] for e in manifest.model["embeddings"]] == ["xl-style"]
    assert "+ embeddings xl-style" in manifest.model["label"]


def test_the_directory_keeps_the_words_and_the_manifest_the_files(sd_dir, files):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(sd_dir / "tokenizer"))
    assert tokenizer.convert_tokens_to_ids(["my-style", "my-style_1", "my-style_2", "cat-toy"]) == [514, 515, 516, 517]
    assert json.loads((sd_dir / "text_encoder" / "config.json").read_text())["vocab_size"] == 518
    records = load_manifest(sd_dir).model["embeddings"]
    assert [(Path(r["path"]).name, r["word"]) for r in records] == [("my-style.safetensors", "my-style"),
                                                                     ("one.safetensors", "cat-toy")]


def test_the_torch_backend_refuses_a_changed_file(sd_dir, files, tmp_path):
    changed = tmp_path / "my-style.safetensors"
    shutil.copy(files["sd"], changed)
    out = tmp_path / "e"
    export("tiny", out, ExportOptions(verify="none", embeddings=[Embedding(changed, "my-style")]))
    _save(changed, emb_params=torch.zeros(3, 32))
    with cpu_only(), pytest.raises(EngineDirError, match="changed since it was added at export"):
        load_pipeline(out, "torch")
    load_pipeline(out, "onnxruntime-cpu")  # the graphs hold the vectors: they need no file


@pytest.mark.parametrize(("name", "tensors", "token", "message"), [
    ("x.pt", None, None, "embeddings are read as .safetensors (a pickled .pt or .bin file can run code"),
    ("gone.safetensors", None, None, "no such file"),
    ("two.safetensors", {"a": torch.ones(32), "b": torch.ones(32)}, None,
     "tensors a, b; an embedding holds one (SD 1.x/2.x) or clip_l and clip_g (SDXL)"),
    ("xl.safetensors", {"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 48)}, None,
     "an SDXL embedding (clip_l and clip_g), but this model has one text encoder"),
    ("cube.safetensors", {"emb_params": torch.ones(2, 2, 32)}, None, "is not a list of embedding vectors"),
    # another kind of file, named (a LoRA's "alpha of shape [] is not a list of embedding vectors" before)
    ("lora.safetensors", {"lora_unet_proj_in.lora_down.weight": torch.ones(4, 32),
                          "lora_unet_proj_in.lora_up.weight": torch.ones(32, 4), "lora_unet_proj_in.alpha": torch.tensor(4.0)},
     None, "a LoRA, not a textual inversion embedding: give it as --lora FILE (export or run)"),
    ("style.safetensors", {"emb_params": torch.ones(32)}, "two words", "the word must be one token of text"),
    # (run --emphasis original read these as a break and as weights: the embedding was silently unused)
    ("style.safetensors", {"emb_params": torch.ones(32)}, "BREAK", "the word reads as A1111's emphasis syntax"),
    ("style.safetensors", {"emb_params": torch.ones(32)}, "(style)", "the word reads as A1111's emphasis syntax"),
    ("style.safetensors", {"emb_params": torch.ones(32)}, "back\\slash", "the word reads as A1111's emphasis syntax"),
    ("nan.safetensors", {"emb_params": torch.full((2, 32), float("nan"))}, None, "emb_params holds NaN or infinite values"),
    ("wide.safetensors", {"emb_params": torch.ones(1, 768)}, None,
     "vectors of width 768, but text_encoder reads 32 (an embedding made for another model)"),
    # refused by its header's names, a few of them named (a model's thousand made a line of 52 KB)
    ("many.safetensors", {f"t{i:02}": torch.ones(32) for i in range(40)}, None,
     "40 tensors (t00, t01, t02, ...); an embedding holds one (SD 1.x/2.x) or clip_l and clip_g (SDXL)"),
    ("model.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4),
                           "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(32)}, None,
     "2 tensors of a whole model, not a textual inversion embedding (give a model as export's MODEL)"),
])
def test_files_and_words_that_cannot_be_added_are_refused_before_loading(name, tensors, token, message, tmp_path):
    path = tmp_path / name
    if tensors is not None:
        _save(path, **tensors)
    elif name.endswith(".pt"):
        path.write_bytes(b"pickle")
    with pytest.raises(SdexportError, match=re.escape(message)):
        plan_export("tiny", tmp_path / "out", ExportOptions(embeddings=[Embedding(path, token or path.stem)]))
    assert not (tmp_path / "out").exists()


def test_a_file_of_many_tensors_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    """A whole model given by mistake was read whole (GBs, then 2.8 times its size) before the refusal."""
    import safetensors.torch

    path = _save(tmp_path / "sd15.safetensors", **{f"model.diffusion_model.input_blocks.{i}.weight": torch.ones(4)
                                                   for i in range(3)})
    monkeypatch.setattr(safetensors.torch, "load", lambda data: pytest.fail("read the weights"))
    with pytest.raises(SdexportError, match="3 tensors of a whole model"):
        Embedding(path, "sd15").tensors()


def test_half_an_sdxl_embedding_is_named_so_and_the_refiner_takes_clip_g_alone(tmp_path):
    """clip_g is what the refiner's one text encoder reads (it was called an SD 1.x/2.x embedding)."""
    only_g = _save(tmp_path / "g.safetensors", clip_g=torch.ones(2, 48))
    assert Embedding(only_g, "g").vectors("sdxl-refiner")["text_encoder_2"].shape == (2, 48)
    with pytest.raises(SdexportError, match=re.escape("only clip_g, half of an SDXL embedding; SDXL's hold clip_l and "
                                                      "clip_g, for both text encoders")):
        Embedding(only_g, "g").vectors("sdxl")
    only_l = _save(tmp_path / "l.safetensors", clip_l=torch.ones(2, 32))
    with pytest.raises(SdexportError, match=re.escape("only clip_l, half of an SDXL embedding")):
        Embedding(only_l, "l").vectors("sdxl-refiner")
    assert Embedding(only_l, "l").named_otherwise() is None  # (no word 'clip_l' to suggest)


def test_an_sdxl_embedding_giving_its_encoders_unlike_counts_is_refused_where_both_read_it(tmp_path):
    """A1111 gives both encoders as many tokens; with 2 and 3 their positions would part after the
    word. The refiner reads clip_g alone: it takes the file, as before."""
    path = _save(tmp_path / "xl.safetensors", clip_l=torch.ones(2, 32), clip_g=torch.ones(3, 48))
    with pytest.raises(SdexportError, match=re.escape("3 vectors for clip_g and 2 vectors for clip_l")) as info:
        Embedding(path, "xl").vectors("sdxl")
    assert "an SDXL embedding gives both text encoders as many vectors" in str(info.value)
    assert Embedding(path, "xl").vectors("sdxl-refiner")["text_encoder_2"].shape == (3, 48)


def test_a_diffusers_layout_file_notes_the_word_its_key_would_give(tmp_path, capsys):
    """diffusers takes ``{"<cat-toy>": vectors}``'s key as the word; sdexport, as A1111, the file's
    name: the export says so, and how to have the key's word."""
    path = _save(tmp_path / "learned_embeds.safetensors", **{"<cat-toy>": torch.randn(1, 32)})
    assert run_cli("export", "tiny", "-o", str(tmp_path / "out"), "--verify", "none",
                   "--textual-inversion", str(path)) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("note: learned_embeds.safetensors holds one tensor named '<cat-toy>', the word diffusers would give it; "
            "here its word is 'learned_embeds', the file's name, as A1111 names embeddings "
            "(learned_embeds.safetensors:<cat-toy> gives '<cat-toy>')") in err
    assert Embedding(path, "<cat-toy>").named_otherwise() is None
    assert Embedding(_save(tmp_path / "a1111.safetensors", emb_params=torch.randn(1, 32)), "a1111").named_otherwise() is None


def test_the_cli_takes_file_and_word_and_refuses_in_one_line(files, tmp_path, capsys):
    assert run_cli("export", "tiny-sdxl", "-o", str(tmp_path / "x"), "--textual-inversion", str(files["sd"])) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --textual-inversion {files['sd']}: one tensor (emb_params), an SD 1.x/2.x embedding; "
                   "SDXL's hold clip_l and clip_g, for both text encoders")
    assert run_cli("export", "tiny", "-o", str(tmp_path / "y"), "--textual-inversion", f"{files['sd']}:s",
                   "--textual-inversion", f"{files['one']}:S") == 2
    assert "the word 'S' is given twice" in capsys.readouterr().err
    assert run_cli("export", "tiny", "-o", str(tmp_path / "z"), "--textual-inversion", str(files["sd"]),
                   "--components", "unet") == 2
    assert "which --components leaves out" in capsys.readouterr().err
    assert Embedding.parse(str(files["sd"])).word == "my-style"  # the file's name, as A1111 names embeddings


@pytest.mark.parametrize("word", ["a", "A"])  # (the tokenizer matches added words in any case)
def test_a_word_the_tokenizer_knows_is_refused(word, files, tmp_path, capsys):
    known = f"'{word}' is a word the tokenizer knows already; give the embedding another (my-style.safetensors:ANOTHER)"
    assert run_cli("export", "tiny", "-o", str(tmp_path / "out"), "--textual-inversion", f"{files['sd']}:{word}") == 2
    err = capsys.readouterr().err.strip().splitlines()  # (after the step that loaded the tokenizer)
    assert known in err[-1] and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()


def test_a_capitalised_word_the_tokenizer_knows_in_lower_case_is_refused(files):
    """CLIP's vocabulary has ``scare`` but not ``Scare``; its tokenizer matches added words in any
    case, so ``Scare`` would take the word's place (the tiny tokenizer has every letter both ways)."""
    from types import SimpleNamespace

    from sdexport.models.textual_inversion import add_tokens
    from sdexport.models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert "scare" in tokenizer.get_vocab() and "Scare" not in tokenizer.get_vocab()
    with pytest.raises(SdexportError, match="'Scare' is a word the tokenizer knows already"):
        add_tokens(SimpleNamespace(family="sd", tokenizers={"tokenizer": tokenizer}), [Embedding(files["one"], "Scare")])


@pytest.mark.parametrize(("first", "second", "refused"), [("style", "style_2", "style_2"), ("style_1", "style", "style_1"),
                                                          ("Neg", "neg_2", "neg_2")])
def test_a_word_named_like_another_words_next_vector_is_refused(first, second, refused, tmp_path):
    """A word's vectors after its first are the tokens WORD_1, WORD_2, ...: an embedding named
    ``style_2`` beside a 2-vector ``style`` was read as style's third vector, and a 1-vector
    ``style`` beside ``style_1`` read that word's first vector as its own second. Names no word's
    chain reaches are left alone."""
    one = _save(tmp_path / "one.safetensors", emb_params=torch.ones(2, 32))
    two = _save(tmp_path / "two.safetensors", emb_params=torch.ones(1, 32))
    with pytest.raises(SdexportError, match=re.escape(f"the word {refused!r} is named like a vector of")) as info:
        plan_export("tiny", tmp_path / "out", ExportOptions(embeddings=[Embedding(one, first), Embedding(two, second)]))
    assert f"name it otherwise ({'two' if refused == second else 'one'}.safetensors:ANOTHER)" in str(info.value)
    for other in ("styles_2", "style_3", "style_v2"):  # (no word's next vector: prompts read them apart)
        plan_export("tiny", tmp_path / "out", ExportOptions(embeddings=[Embedding(one, "style"), Embedding(two, other)]))


def test_a_word_the_tokenizer_holds_with_capitals_is_refused_and_so_are_more_vectors_than_a_chunk_holds(tmp_path):
    """A tokenizer that came with an added ``MyWord`` matches ``myword`` too; an embedding of 76
    vectors had its first 75 read and the rest dropped unsaid."""
    from types import SimpleNamespace

    from sdexport.models.textual_inversion import add_tokens
    from sdexport.models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.add_tokens(["MyWord"])
    model = SimpleNamespace(family="sd", tokenizers={"tokenizer": tokenizer})
    path = _save(tmp_path / "w.safetensors", emb_params=torch.ones(1, 32))
    with pytest.raises(SdexportError, match="'myword' is a word the tokenizer knows already"):
        add_tokens(model, [Embedding(path, "myword")])
    long = _save(tmp_path / "long.safetensors", emb_params=torch.ones(76, 32))
    with pytest.raises(SdexportError, match=re.escape("long.safetensors: 76 vectors, but a prompt's chunk holds 75 "
                                                      "tokens and a word's vectors are read in one chunk")):
        add_tokens(model, [Embedding(long, "long")])
    assert add_tokens(model, [Embedding(_save(tmp_path / "full.safetensors", emb_params=torch.ones(75, 32)), "my-75")])


def test_bench_refuses_a_directory_with_embeddings(sd_dir, tmp_path, capsys):
    assert "has textual inversion embeddings added to its text encoders" in bench_refusal(sd_dir, tmp_path, capsys)


def test_a_long_prompt_counts_the_spelled_out_tokens(sd_dir, capsys):
    """The word takes three of a chunk's 75 places: one that does not fit starts the next chunk
    whole, as A1111 moves an embedding; the truncation warning counts them."""
    pipeline = load_pipeline(sd_dir, "onnxruntime-cpu")
    words = " ".join(["a"] * 73)
    request = GenerationRequest(prompt=[f"{words} my-style {words}"], steps=1, seeds=[0], height=64, width=64)
    cut = pipeline.truncations(request)
    assert cut["prompt"][0] is not None and cut["prompt"][0].count("a") < 2 * 73
    assert np.all(np.isfinite(pipeline(request).pixels))
    tok = pipeline.tokenizer
    spelled, _ = token_ids(request.prompt, tok, 77, limit=2)
    word = [tok.convert_tokens_to_ids(w) for w in ("my-style", "my-style_1", "my-style_2")]
    assert spelled[0, 0, 74:].tolist() == [tok.eos_token_id] * 3 and spelled[0, 1, 1:4].tolist() == word
    assert torch.equal(token_ids(cut["prompt"], tok, 77, limit=2)[0], spelled)  # the record reads the same


def test_a_word_with_capitals_spells_out_in_any_case(files, tmp_path):
    """transformers 5's CLIP tokenizers give an added word's text in lower case, so diffusers'
    maybe_convert_prompt keeps only the first vector of "EasyNegative"; sdexport matches the word
    as the tokenizer does. The same images as diffusers with the word registered in lower case."""
    path = shutil.copy(files["sd"], tmp_path / "EasyNegative.safetensors")
    out = tmp_path / "e"
    export("tiny", out, ExportOptions(verify="none", embeddings=[Embedding.parse(str(path))]))
    pipeline = load_pipeline(out, "onnxruntime-cpu")
    ids, _ = token_ids(["a EasyNegative", "a easynegative", "a EASYNEGATIVE"], pipeline.tokenizer, 77)
    assert ids[0, 0, 2:5].tolist() == [514, 515, 516] and torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
    reference = DiffusersReference(load_model("tiny"))
    reference.pipe.load_textual_inversion(str(path), token="easynegative")
    request = dataclasses.replace(REQUEST, prompt=["a lighthouse", "a harbour"], negative_prompt=["EasyNegative"] * 2)
    want = reference(dataclasses.replace(request, negative_prompt=["easynegative"] * 2))
    assert _rel(pipeline(request).latents, want.latents) < LATENT_REL_L2


def test_added_words_decode_apart_from_the_next():
    from sdexport.runtime.prompt_text import _decoded

    model = load_model("tiny", lazy=True)
    tokenizer = model.tokenizers["tokenizer"]
    tokenizer.add_tokens(["cat-toy"])
    ids = tokenizer("a cat-toy b", add_special_tokens=False).input_ids
    assert _decoded(ids, tokenizer) == "a cat-toy b"
    assert tokenizer(_decoded(ids, tokenizer), add_special_tokens=False).input_ids == ids
    tokenizer.add_tokens(["café"])  # (CLIP's byte-level decoding wrote it "caf\ufffd", a word no tokenizer reads)
    ids = tokenizer("café a", add_special_tokens=False).input_ids
    assert _decoded(ids, tokenizer) == "café a"
    assert tokenizer(_decoded(ids, tokenizer), add_special_tokens=False).input_ids == ids


def test_a_text_encoder_wider_than_its_tokenizer_keeps_its_rows(files, tmp_path):
    """The new words take the tokenizer's next ids, rows the table has already: it is not cut to them."""
    model = load_model("tiny")
    model.modules["text_encoder"].resize_token_embeddings(600)
    model.save_pretrained(tmp_path / "wide")
    out = tmp_path / "e"
    export(str(tmp_path / "wide"), out, ExportOptions(verify="quick", embeddings=[Embedding(files["sd"], "my-style")]))
    assert json.loads((out / "text_encoder" / "config.json").read_text())["vocab_size"] == 600
    assert np.all(np.isfinite(load_pipeline(out, "onnxruntime-cpu")(dataclasses.replace(REQUEST, steps=1)).pixels))


def test_the_format_says_an_older_sdexport_cannot_read_it(sd_dir, tiny_engine_dir, tmp_path, capsys):
    """Format 3: an sdexport before embeddings refuses the directory, rather than read each word as
    its first vector; plain directories stay format 2."""
    assert load_manifest(sd_dir).format_version == 3 and load_manifest(tiny_engine_dir).format_version == 2
    copy = tmp_path / "e"
    shutil.copytree(sd_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("inspect", copy) == 2
    assert "invalid manifest: format 3 goes with model.embeddings (textual inversion), and only with them" in \
        " ".join(capsys.readouterr().err.split())


def test_words_are_found_where_the_tokenizer_finds_them():
    """Not inside another added word (negv2), nor in a follow-up token typed out (neg_1): diffusers'
    text replacement breaks both; case and the text around it do not matter."""
    from sdexport.runtime.prompt_text import units

    tokenizer = load_model("tiny", lazy=True).tokenizers["tokenizer"]
    tokenizer.add_tokens(["neg", "neg_1", "negv2"])
    ids = [token for unit in units(["negv2, neg_1 and NEGx"], tokenizer)[0] for token in unit]
    x = tokenizer("x", add_special_tokens=False).input_ids
    assert ids[:2] == [516, 269] and ids[2] == 515 and ids[-3:] == [514, 515, *x]


def test_a_refiner_without_the_base_models_words_is_said(files, tmp_path, capsys):
    """The check reads the two manifests' words: the text encoders alone are exported (the U-Nets
    and VAEs took 10 of the test's 12 s)."""
    from sdexport.runtime.ensemble import Refiner

    base, refiner = tmp_path / "base", tmp_path / "refiner"
    encoders = ["text_encoder", "text_encoder_2"]
    export("tiny-sdxl", base, ExportOptions(verify="none", components=encoders,
                                            embeddings=[Embedding(files["sdxl"], "XL-style")]))
    export("tiny-sdxl-refiner", refiner, ExportOptions(verify="none", components=encoders[1:]))
    capsys.readouterr()
    Refiner.open(refiner, base, load_manifest(base))
    said = " ".join(capsys.readouterr().err.split())
    assert "lacks the base model's textual inversion word(s) XL-style: it reads them as plain text" in said
    shutil.rmtree(refiner)
    export("tiny-sdxl-refiner", refiner, ExportOptions(verify="none", components=encoders[1:],
                                                       embeddings=[Embedding(files["sdxl"], "xl-STYLE")]))
    capsys.readouterr()
    Refiner.open(refiner, base, load_manifest(base))  # the same word, as the tokenizer matches it
    assert "lacks" not in capsys.readouterr().err


def test_adopt_with_the_model_refuses_an_export_whose_tokenizer_has_words_the_model_lacks(sd_dir, tmp_path, capsys):
    """Its graphs passed parity (verification feeds ids the model knows), and the Torch backend,
    which reloads the model, then indexed past its embedding table in a traceback."""
    import shutil

    from conftest import run_cli

    foreign = tmp_path / "foreign"
    shutil.copytree(sd_dir, foreign)
    (foreign / "manifest.json").unlink()
    assert run_cli("adopt", foreign, "--model", "tiny") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--model tiny: {foreign / 'tokenizer'} has 4 word(s) its tokenizer lacks" in err, err
    assert "textual inversion, which adopt does not carry" in err and err.count("error:") == 1
    assert not (foreign / "manifest.json").exists()


def test_a_colon_in_the_files_folder_is_part_of_its_path(tmp_path: Path):
    """``run:1/style.safetensors`` exists: it is the file, not FILE:WORD."""
    folder = tmp_path / "run:1"
    folder.mkdir()
    save_file({"emb_params": torch.ones(1, 32)}, str(folder / "style.safetensors"))
    embedding = Embedding.parse(str(folder / "style.safetensors"))
    assert embedding.path == folder / "style.safetensors" and embedding.word == "style"


def test_a_word_the_user_gave_gets_no_note(tmp_path: Path):
    """The note on a word other than the file's own is for the file-name default alone."""
    path = tmp_path / "learned.safetensors"
    save_file({"<cat-toy>": torch.ones(1, 32)}, str(path))
    assert Embedding(path, "kitty").named_otherwise() is None

"""A1111's emphasis, ``(word:1.2)``: parsed as A1111 parses it, weighed as A1111 weighs it.

The parser's cases are the examples A1111's ``parse_prompt_attention`` documents. The references
for the hidden states are computed here from transformers' text encoders and token ids built by
hand from the runs (not from ``runtime.emphasis``), with A1111's ``EmphasisOriginal``: each token's
vector times its weight, then scaled back to the mean before weighing (here per prompt).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, token_ids
from sdexport.errors import SdexportError
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.runtime.emphasis import BREAK, parse, written
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.prompt_text import kept_text
from sdexport.runtime.request import GenerationRequest, check_request

REQUEST = GenerationRequest(prompt=["a (red:1.5) fox [tail]"], steps=2, seeds=[3], height=64, width=64,
                            scheduler="euler", guidance=1.0, emphasis="original")
RUNS = [("a ", 1.0), ("red", 1.5), (" fox ", 1.0), ("tail", 1 / 1.1)]
"""REQUEST's prompt as A1111 reads it, written out by hand."""


@pytest.mark.parametrize(("text", "runs"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
])
def test_it_parses_as_a1111_documents(text, runs):
    got = parse(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in runs]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in runs], rel=1e-12)


@pytest.mark.parametrize(("text", "runs"), [
    ("a: 1.2) b", [("a: 1.2) b", 1.0)]),  # a weight with no bracket open is text
    ("(y : 0.5 )", [("y ", 0.5)]),  # spaces around the number, as A1111 takes them
    ("]a)", [("]a)", 1.0)]),  # closing brackets with none open are text
    ("a\\b \\\\", [("ab \\", 1.0)]),  # a lone backslash is an empty run; an escaped one kept
    ("red(\\:1.2)fox", [("red", 1.0), ("", 1.2), ("fox", 1.0)]),  # (so "red" and "fox" are tokenized apart)
    ("(x:-1)", [("x", -1.0)]),
    ("", [("", 1.0)]),
])
def test_text_that_weighs_nothing_stays_text(text, runs):
    assert list(parse(text)) == runs


def test_break_ends_the_window():
    assert list(parse("a cat BREAK (a hat)")) == [("a cat", 1.0), (BREAK, 1.0), ("", 1.0), ("a hat", 1.1)]  # A1111's
    assert list(parse("BREAKFAST")) == [("BREAKFAST", 1.0)]
    # inside brackets A1111 scales its mark, and then reads the word "BREAK" (weighing minus the factor)
    assert list(parse("a (b BREAK c) d")) == [("a ", 1.0), ("b", 1.1), ("BREAK", -1.1), ("c", 1.1), (" d", 1.0)]


@pytest.mark.parametrize("text", ["a (((house:1.3)) [on] \\(x\\) (hill:0.00001)", "x (y:1.23456789012345)",
                                  "\\\\ [[a]] (b:-0.5) c:1.2\\)", "(BRE\\AK) and (b BREAK c)",
                                  "red(\\:1.2)fox"])
def test_written_text_parses_to_the_same_weights(text):
    runs = parse(text)
    again = written([(piece or "", weight) for piece, weight in runs])
    assert "e-" not in again and parse(again) == runs  # exact: the record remakes the image


def _hand_ids(tokenizer, runs: list[tuple[str, float]], length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in runs:
        found = tokenizer(text, add_special_tokens=False).input_ids
        ids += found
        weights += [weight] * len(found)
    ids, weights = ids + [tokenizer.eos_token_id], weights + [1.0]
    pad = length - len(ids)
    return torch.tensor([ids + [tokenizer.pad_token_id] * pad]), torch.tensor([weights + [1.0] * pad])


def _a1111(hidden: torch.Tensor, weights: torch.Tensor, norm: bool = True) -> torch.Tensor:
    weighed = hidden * weights[..., None]
    return weighed * (hidden.mean() / weighed.mean()) if norm else weighed


@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_2"])
def test_text_without_brackets_reads_as_it_does_without_emphasis(tokenizer):
    """The same ids, and no weights (the hidden states untouched): SD's padding and SDXL's second
    tokenizer's ("!", not the end token)."""
    tok = load_model("tiny-sdxl").tokenizers[tokenizer]
    texts = ["a red fox, in snow", "x " * 90]
    plain, none = token_ids(texts, tok, 77)
    weighed, weights = token_ids(texts, tok, 77, "original")
    assert none is None and weights is None and torch.equal(plain, weighed)


def test_runs_are_tokenized_apart_and_weighed_token_by_token():
    tok = load_model("tiny").tokenizers["tokenizer"]
    ids, weights = token_ids(REQUEST.prompt, tok, 77, "original")
    want_ids, want_weights = _hand_ids(tok, RUNS)
    assert torch.equal(ids[:, 0], want_ids) and torch.allclose(weights[:, 0], want_weights)
    ids, _ = token_ids(["(red)fox"], tok, 77, "original")
    apart = sum(tok(["red", "fox"], add_special_tokens=False).input_ids, [])
    assert ids[0, 0, 1:len(apart) + 1].tolist() == apart != tok("redfox", add_special_tokens=False).input_ids


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
def test_sd_weighs_the_hidden_states_as_a1111(tiny_engine_dir, backend):
    """No norm against transformers' hidden states. Original's on the engine's own reading: the
    random tiny model's final layer norm (weight 1, bias 0) centres every vector, so its mean is
    about 0 and A1111's rescale a ratio of rounding errors, which is left out (``CENTRED``; a trained
    encoder's norm has a bias: SDXL's penultimate layer below is rescaled)."""
    model = load_model("tiny")
    ids, weights = _hand_ids(model.tokenizers["tokenizer"], RUNS)
    with torch.no_grad():
        hidden = model.modules["text_encoder"](ids).last_hidden_state
    pipeline = load_pipeline(tiny_engine_dir, backend)
    got = pipeline.encode_prompt(dataclasses.replace(REQUEST, emphasis="no-norm"))["encoder_hidden_states"]
    assert torch.allclose(got.cpu(), _a1111(hidden, weights, norm=False), atol=1e-5)
    assert not torch.allclose(got.cpu(), hidden, atol=1e-3)  # the weights change it: the test can tell
    read = pipeline.engines["text_encoder"]({"input_ids": ids.int().to(pipeline.device)})["last_hidden_state"]
    got = pipeline.encode_prompt(REQUEST)["encoder_hidden_states"]
    assert torch.allclose(got, _a1111(read, weights.to(read.device), norm=False), rtol=1e-5, atol=1e-6)


def test_a_centred_reading_is_weighed_without_a1111s_rescale():
    """The tiny presets' readings have means of about 1e-9: the rescale gave factors of -0.5 on ONNX
    Runtime and 2 or inf on torch (the README's emphasis example differed by 106/255 between the
    backends, and torch refused it as past float32's range). A reading with a mean is rescaled."""
    from sdexport.runtime.emphasis import weigh

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, 32, generator=generator)
    weights = torch.ones(2, 77)
    weights[:, 3:6] = 1.5
    centred = hidden - hidden.mean(dim=-1, keepdim=True)
    assert torch.allclose(weigh(centred, weights, "original"), _a1111(centred, weights, norm=False))
    shifted = hidden + 0.3
    for i in range(2):  # each prompt by its own mean
        assert torch.allclose(weigh(shifted, weights, "original")[i], _a1111(shifted[i:i + 1], weights[i:i + 1])[0])


def test_sdxl_weighs_each_encoder_apart_and_leaves_the_pooled(tiny_sdxl_engine_dir):
    """A1111 weighs each encoder's reading on its own (its own mean); the pooled embedding is the
    second encoder's as it came."""
    model = load_model("tiny-sdxl")
    pipeline = load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu")
    got = pipeline.encode_prompt(REQUEST)
    want = []
    with torch.no_grad():
        for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            ids, weights = _hand_ids(model.tokenizers[tokenizer], RUNS)
            out = model.modules[name](ids, output_hidden_states=True)
            want.append(_a1111(out.hidden_states[-2], weights))
        pooled = out.text_embeds
    assert torch.allclose(got["encoder_hidden_states"], torch.cat(want, dim=-1), atol=1e-5)
    assert torch.allclose(got["text_embeds"], pooled, atol=1e-5)


def test_each_prompt_is_weighed_by_its_own_mean(tiny_engine_dir):
    """An image does not depend on the prompts beside it in a call (A1111 takes one mean per call)."""
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    alone = pipeline.encode_prompt(REQUEST)["encoder_hidden_states"]
    beside = pipeline.encode_prompt(dataclasses.replace(REQUEST, prompt=[*REQUEST.prompt, "((((a dog))))"],
                                                        seeds=[3, 4]))["encoder_hidden_states"]
    assert torch.allclose(beside[:1], alone, atol=1e-6)


def test_images_change_with_weights_only(tiny_engine_dir):
    """Text without brackets makes the image it makes without emphasis; a weight in the negative
    prompt changes it."""
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    plain = dataclasses.replace(REQUEST, prompt=["a red fox"], guidance=7.5, negative_prompt=["blurry"])
    weighed = pipeline(plain).pixels
    assert np.array_equal(weighed, pipeline(dataclasses.replace(plain, emphasis="none")).pixels)
    assert not np.array_equal(weighed, pipeline(dataclasses.replace(plain, negative_prompt=["(blurry:1.3)"])).pixels)


def test_a_long_weighed_prompt_is_cut_and_recorded_in_the_syntax(tiny_engine_dir, capsys):
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    text = "a (" + "a " * 80 + ":1.3) [b " + "a " * 80 + "]"  # (one token each in the tiny vocabulary)
    request = dataclasses.replace(REQUEST, prompt=[text])
    kept = pipeline.truncations(request)["prompt"][0]
    assert "is longer than the 2 chunks of 75 tokens the engines read" in " ".join(capsys.readouterr().err.split())
    assert kept.startswith("a (a a a") and ":1.3)" in kept and kept.endswith(":0.9090909090909091)")
    tok = pipeline.tokenizer
    whole, whole_weights = token_ids([text], tok, 77, "original", limit=2)
    again, again_weights = token_ids([kept], tok, 77, "original", limit=2)
    assert torch.equal(whole, again) and torch.equal(whole_weights, again_weights)  # the record remakes the image
    assert kept_text("a (cat) BREAK a hat", tok, 77, "original", limit=2) is None  # the next chunk reads it
    assert kept_text("a (cat) BREAK", tok, 77, "original") is None  # nothing after it: nothing cut
    assert kept_text("a " * 75 + "(b c)", tok, 77, "original") == "a " * 75  # no empty run where the cut falls
    assert kept_text("a (cat) BREAK a hat", tok, 77, "original") == "a (cat:1.1)"
    assert kept_text("a (cat) BREAK a hat", tok, 77) is None  # as text, BREAK is a word


def test_the_record_and_a1111_text_say_it(tiny_engine_dir, tmp_path):
    out = tmp_path / "fox.png"
    assert run_cli("run", str(tiny_engine_dir), "-p", "a (red:1.5) fox", "--steps", "1", "--emphasis", "original",
                   "-o", str(out)) == 0
    image = Image.open(out)
    assert json.loads(image.text["sdexport"])["emphasis"] == "original"
    assert "Emphasis" not in image.text["parameters"]  # A1111's default: its reader weighs the same
    assert run_cli("run", str(tiny_engine_dir), "-p", "a (red:1.5) fox", "--steps", "1", "-o", str(out)) == 0
    image = Image.open(out)
    assert "emphasis" not in json.loads(image.text["sdexport"])
    assert image.text["parameters"].endswith(", Emphasis: None")  # A1111 would weigh it otherwise
    assert run_cli("run", str(tiny_engine_dir), "-p", "a red fox", "--steps", "1", "--emphasis", "no-norm",
                   "-o", str(out)) == 0
    assert "Emphasis" not in Image.open(out).text["parameters"]  # no bracket: nothing to read otherwise
    assert run_cli("run", str(tiny_engine_dir), "-p", "a fox", "-n", "[blurry]", "--steps", "1",
                   "--emphasis", "no-norm", "-o", str(out)) == 0
    assert Image.open(out).text["parameters"].endswith(", Emphasis: No norm")


def test_run_says_when_brackets_are_read_as_text(tiny_engine_dir, tmp_path, capsys):
    assert run_cli("run", str(tiny_engine_dir), "-p", "a (red:1.5) fox", "-n", "(blurry)", "--steps", "1",
                   "-o", str(tmp_path / "a.png")) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert ("--prompt and --negative-prompt: A1111's emphasis syntax (brackets, escapes, BREAK) read as text, as "
            "diffusers reads it; --emphasis original reads it as A1111 does") in said
    for prompt in ("a red fox (2019)", "a fox BREAK a hat", "a \\(fox\\)"):  # (2019) weighs 1.1 to A1111
        assert run_cli("run", str(tiny_engine_dir), "-p", prompt, "--steps", "1", "-o", str(tmp_path / "b.png")) == 0
        assert "emphasis syntax" in capsys.readouterr().err
    assert run_cli("run", str(tiny_engine_dir), "-p", "a fox", "-n", "(blurry)", "--guidance", "1", "--steps", "1",
                   "-o", str(tmp_path / "b.png")) == 0
    assert "emphasis syntax" not in capsys.readouterr().err  # negatives no call reads
    assert run_cli("run", str(tiny_engine_dir), "-p", "a red fox", "--steps", "1", "-o", str(tmp_path / "c.png")) == 0
    assert "emphasis" not in capsys.readouterr().err


def test_run_says_what_of_a1111_s_syntax_it_does_not_read(tiny_engine_dir, tmp_path, capsys):
    """Prompt editing, alternation and AND change the text per step or add prompts: read as
    emphasis and words here, which is said."""
    assert run_cli("run", str(tiny_engine_dir), "-p", "a [cat:dog:0.5] AND a [red|blue] hat", "-n", "[blur:3]",
                   "--emphasis", "original", "--steps", "1", "-o", str(tmp_path / "a.png")) == 0
    said = " ".join(capsys.readouterr().err.split())
    editing = ("--prompt and --negative-prompt: A1111's prompt editing ([from:to:when]) is not read as A1111 reads "
               "it: sdexport reads its brackets as emphasis and the rest as text")
    for note in (editing, "--prompt: A1111's alternation ([a|b]) is not read",
                 "--prompt: A1111's AND (composable prompts) is not read as A1111 reads it: sdexport reads AND as a word"):
        assert note in said
    assert run_cli("run", str(tiny_engine_dir), "-p", "a (red:1.2) [fox]", "--emphasis", "original", "--steps", "1",
                   "-o", str(tmp_path / "b.png")) == 0
    assert "A1111" not in capsys.readouterr().err
    for emphasis in ("none", "original"):  # an extra-network tag: a file A1111 loads, words here
        assert run_cli("run", str(tiny_engine_dir), "-p", "masterpiece, <lora:add_detail:0.8>, a fox", "-n",
                       "<LyCO:bad:1>", "--emphasis", emphasis, "--steps", "1", "-o", str(tmp_path / "c.png")) == 0
        assert ("--prompt and --negative-prompt: <lora:add_detail:0.8> is A1111's tag for a file it loads, read here "
                "as words: give the file with --lora FILE:SCALE and leave the tag out") in " ".join(
                    capsys.readouterr().err.split())
    assert run_cli("run", str(tiny_engine_dir), "-p", "<hypernet:anime:1> a fox", "--steps", "1",
                   "-o", str(tmp_path / "d.png")) == 0  # (none here: not told to give it with --lora)
    assert "read here as words: sdexport has no hypernetworks" in " ".join(capsys.readouterr().err.split())


def test_a_lycoris_tag_is_told_which_lycoris_files_lora_takes():
    """A1111's ``<lyco:...>`` tag names a LyCORIS file: the note says --lora takes its LoCon and refuses
    its LoHa and LoKr, not the plain LoRA hint (mutation testing round 8: that branch, dropped, failed
    no test)."""
    from sdexport.runtime.request import GenerationRequest, default_notes

    [note] = default_notes(GenerationRequest(prompt=["<LyCO:detail:0.8> a fox"]), "sd")
    assert note == ("prompt: <LyCO:detail:0.8> is A1111's tag for a file it loads, read here as words: give the file "
                    "with --lora FILE:SCALE (LyCORIS' LoCon; its LoHa and LoKr are refused) and leave the tag out")


@pytest.mark.parametrize(("given", "message"), [
    ({"emphasis": "a1111"}, "emphasis 'a1111': choose one of none, original, no-norm"),
    ({"prompt": ["a (cat:1.2.3)"]}, "prompt: ':1.2.3)' is no weight: A1111's is a number, as in (word:1.2)"),
    ({"negative_prompt": ["(x:" + "9" * 40 + ")"], "guidance": 7.5},
     "negative_prompt: its brackets weigh a part 1e+40, beyond float32's range"),
    ({"prompt": ["a", "(b:1.2.3)"], "seeds": [3, 4]},
     "prompt 2: ':1.2.3)' is no weight: A1111's is a number, as in (word:1.2)"),
    ({"negative_prompt": [3], "guidance": 7.5}, "negative_prompt: must be text"),
    ({"prompt": ["a" * 10_001]},
     "prompt: 10,001 characters; a text has at most 10,000 (the engines read a few chunks of 75 tokens)"),
    ({"prompt": ["a" * 10_001], "emphasis": "none"},  # tokenizing a served 30 MB prompt took ten minutes
     "prompt: 10,001 characters; a text has at most 10,000 (the engines read a few chunks of 75 tokens)"),
])
def test_bad_weights_are_refused_in_one_line(tiny_engine_dir, given, message):
    manifest = load_manifest(tiny_engine_dir)
    with pytest.raises(SdexportError) as refused:
        check_request(dataclasses.replace(REQUEST, **given), family="sd", dims=manifest.model_dims,
                      profile=manifest.shape_profile)
    assert str(refused.value) == message


def test_as_text_any_bracket_is_fine(tiny_engine_dir):
    manifest = load_manifest(tiny_engine_dir)
    check_request(dataclasses.replace(REQUEST, prompt=["a (cat:1.2.3)"], emphasis="none"), family="sd",
                  dims=manifest.model_dims, profile=manifest.shape_profile)


class _Counted:
    """An engine that counts its calls."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def __call__(self, feed):
        self.calls += 1
        return self.engine(feed)


def _unet_calls(pipeline) -> _Counted:
    pipeline.engines["unet"] = _Counted(pipeline.engines["unet"])
    return pipeline.engines["unet"]


def test_a_reading_float32_cannot_hold_is_refused_before_the_loop(tiny_engine_dir):
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    calls = _unet_calls(pipeline)
    huge = dataclasses.replace(REQUEST, prompt=["((a:" + "9" * 38 + "):3)"], emphasis="no-norm")  # 3e38: in range
    with pytest.raises(SdexportError, match="^the texts' emphasis weights take text encoding past "
                                            "3.40282e\\+38, the range of the U-Net's float32: give smaller weights"):
        pipeline(huge)
    assert calls.calls == 0
    assert np.isfinite(pipeline(dataclasses.replace(huge, prompt=["(a:100000) lighthouse"])).pixels).all()


def test_the_cli_refuses_an_unknown_mode_before_loading(tiny_engine_dir, tmp_path, capsys):
    assert run_cli("run", str(tiny_engine_dir), "-p", "a", "--emphasis", "compel", "-o", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --emphasis 'compel': choose one of none, original, no-norm"


def test_served_rows_carry_it_and_share_a_call_only_with_equal_ones():
    from sdexport.serving.requests import decode_rows, generation_request, group_rows

    inputs = {"prompt": np.array([[b"(a)"], [b"b"], [b"c"]], dtype=object),
              "emphasis": np.array([[b"original"], [b"original"], [b""]], dtype=object)}
    rows = decode_rows(inputs, (64, 64))
    assert [r.emphasis for r in rows] == ["original", "original", "none"]
    calls = group_rows(list(enumerate(rows)), max_batch=4)
    assert sorted(len(call) for call in calls) == [1, 2]
    assert generation_request([rows[0], rows[1]]).emphasis == "original"


def test_a_server_s_default_reads_rows_that_send_no_mode(tiny_engine_dir, tmp_path):
    """`triton-repo --emphasis original` (and serve's): written to config.pbtxt, read back by the
    served model, which gives it to the rows that send no emphasis; a row's own mode still wins."""
    from sdexport.serving.requests import decode_rows
    from sdexport.serving.triton_model import ServeSettings

    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo", "--emphasis", "original") == 0
    config = (tmp_path / "repo" / "sdexport" / "config.pbtxt").read_text()
    assert 'key: "emphasis"' in config and 'string_value: "original"' in config
    settings = ServeSettings.from_parameters(ServeSettings(str(tiny_engine_dir), emphasis="original").to_parameters())
    assert settings.emphasis == "original"
    assert "emphasis" not in ServeSettings(str(tiny_engine_dir)).to_parameters()  # the default: as before
    inputs = {"prompt": np.array([[b"(a)"], [b"b"]], dtype=object), "emphasis": np.array([[b""], [b"none"]], dtype=object)}
    assert [r.emphasis for r in decode_rows(inputs, (64, 64), emphasis=settings.emphasis)] == ["original", "none"]
    with pytest.raises(SdexportError, match=r"config.pbtxt parameter emphasis 'compel': expected one of none, original"):
        ServeSettings.from_parameters({"engine_dir": str(tiny_engine_dir), "emphasis": "compel"})


def test_textual_inversion_words_take_their_run_s_weight(tmp_path):
    """A word of several vectors inside brackets: every vector takes the run's weight (as A1111's)."""
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    from sdexport.export.exporter import ExportOptions, export
    from sdexport.models.textual_inversion import Embedding

    path = tmp_path / "my-style.safetensors"
    save_file({"emb_params": torch.randn(3, 32)}, str(path))
    out = tmp_path / "e"
    export("tiny", out, ExportOptions(verify="none", components=["text_encoder"],
                                      embeddings=[Embedding.parse(str(path))]))
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    ids, weights = token_ids(["a (my-style:1.4) cat"], tok, 77, "original")
    assert ids[0, 0, 2:5].tolist() == [tok.convert_tokens_to_ids(w) for w in ("my-style", "my-style_1", "my-style_2")]
    assert weights[0, 0, :6].tolist() == pytest.approx([1.0, 1.0, 1.4, 1.4, 1.4, 1.0])


def test_a_u_net_a_build_lowered_to_fp16_is_held_to_fp16_s_range(tiny_engine_dir, monkeypatch):
    """An fp32 export whose U-Net engine computes in fp16 (a TensorRT plan with the fp16 flag, a fused
    graph converted to fp16: ``runtime.loading.runs_lowered``) takes fp16's range."""
    from sdexport.runtime import loading

    monkeypatch.setattr(loading, "runs_lowered", lambda engine_dir, manifest, name, *args: name == "unet")
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    with pytest.raises(SdexportError, match="past 65504, the range of the U-Net's fp16"):
        pipeline(dataclasses.replace(REQUEST, prompt=["(a:100000) lighthouse"], emphasis="no-norm"))


def test_a_reading_fp16_cannot_hold_is_refused_before_the_loop(tiny_fp16_engine_dir):
    """The engines take float32, which an fp16 U-Net casts to fp16: a weighed reading past 65504 is
    refused before the loop, not found as NaN latents after it (as it would be here); the fp32
    export runs the same request (above)."""
    pipeline = load_pipeline(tiny_fp16_engine_dir, "onnxruntime-cpu")
    calls = _unet_calls(pipeline)
    with pytest.raises(SdexportError, match="^the texts' emphasis weights take text encoding past 65504, "
                                            "the range of the U-Net's fp16"):
        pipeline(dataclasses.replace(REQUEST, prompt=["(a:100000) lighthouse"], emphasis="no-norm"))
    assert calls.calls == 0


def test_a_text_is_parsed_once_for_its_check_its_cut_and_its_tokens():
    """``parse`` keeps its recent results (``MAX_TEXT``: nested brackets parse in quadratic time);
    a helper inserted above it once took its cache."""
    from sdexport.runtime import emphasis

    emphasis.parse.cache_clear()
    text = "a ((red)) fox:1.2 [tail]"
    assert emphasis.parse(text) is emphasis.parse(text)
    assert emphasis.parse.cache_info().hits == 1


def test_nested_unclosed_brackets_each_weigh_as_a1111_reads_them():
    ((text, weight),) = parse("((a")
    assert text == "a" and weight == pytest.approx(1.21)


def test_a_weight_inside_square_brackets_is_text():
    """``[a:1.2)``: no round bracket is open, so ``:1.2)`` is words (read as weighted, it raised IndexError)."""
    ((text, weight),) = parse("[a:1.2)")
    assert text == "a:1.2)" and weight == pytest.approx(1 / 1.1)


def test_a_nan_reading_is_refused():
    from sdexport.runtime.emphasis import check_reading

    with pytest.raises(SdexportError):
        check_reading(torch.tensor([[[float("nan")]]]), fp16=False)

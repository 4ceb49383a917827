"""Long prompts: A1111's chunks of 75 tokens, read side by side by a U-Net whose text length is an
axis of the profile (``ShapeProfile.chunks``, ``export --prompt-chunks``)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import run_cli, token_ids
from sdexport.build.profiles import build_profile
from sdexport.errors import ProfileError
from sdexport.manifest import load_manifest
from sdexport.models import load_model
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.prompt_text import COMMA_BACKTRACK, kept_text, text_chunks
from sdexport.runtime.request import GenerationRequest
from sdexport.serving.requests import Row
from sdexport.shapes import ShapeProfile
from sdexport.specs import UNET

LONG = ", ".join(["a red fox"] * 12)
"""Past one chunk (about 130 tokens in the tiny byte-level vocabulary), within two."""
REQUEST = GenerationRequest(prompt=[LONG], steps=2, seeds=[3], height=64, width=64)


def _tokens(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _chunk_sizes(text: str, tokenizer, emphasis: str = "none", limit: int = 9) -> list[int]:
    return [sum(len(unit) for unit, _ in chunk) for chunk in text_chunks([text], tokenizer, 77, emphasis, limit)[0]]


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny", lazy=True).tokenizers["tokenizer"]


def test_a_chunk_holds_75_tokens_and_a_full_one_wraps_after_its_last_comma(tok):
    """A1111's ``tokenize_line``: 75 fit, the 76th starts a chunk; a chunk that fills up gives the
    words after its last comma to the next when there are at most ``COMMA_BACKTRACK`` tokens."""
    assert len(_tokens("a " * 75, tok)) == 75
    assert _chunk_sizes("a " * 75, tok) == [75] and _chunk_sizes("a " * 76, tok) == [75, 1]
    wrapped = "a " * 70 + ", " + "a " * 10  # the comma is the 71st token: 5 words after it move
    assert _chunk_sizes(wrapped, tok) == [71, 10]
    far = "a " * 40 + ", " + "a " * (COMMA_BACKTRACK + 40)  # the comma is too far back: no wrap
    assert _chunk_sizes(far, tok)[0] == 75
    assert _chunk_sizes("", tok) == [0]  # an empty text is one (empty) chunk, as A1111's


def test_a_long_text_is_read_without_transformers_warning_of_indexing_errors(tok):
    """The Python API printed transformers' "Token indices sequence length is longer than the
    specified maximum ... will result in indexing errors" beside sdexport's own note (an audit's
    finding): untrue of texts read in chunks, and no -q quiets libraries there."""
    import copy
    import logging

    from transformers.utils import logging as library

    fresh = copy.deepcopy(tok)  # (the tokenizer warns once: another test's reading may have used it up)
    said: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = said.append  # type: ignore[method-assign]
    before = library.get_verbosity()
    library.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert len(_chunk_sizes("a " * 200, fresh)) == 3
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        library.set_verbosity(before)
    assert not [r for r in said if "Token indices sequence length" in r.getMessage()]


def test_the_last_chunk_read_keeps_the_words_after_its_comma_as_diffusers_reads_them(tok):
    """Read in one chunk (the bench, whose baseline is diffusers; an adopted 77-token export), a
    text is diffusers' first 75 tokens: the wrap would hand up to 20 of them to a chunk that is cut."""
    assert _chunk_sizes(LONG, tok, limit=1) == [75]
    diffusers = tok(LONG, padding="max_length", max_length=77, truncation=True).input_ids
    assert token_ids([LONG], tok, 77)[0][0, 0].tolist() == diffusers
    wrapped = _chunk_sizes(LONG, tok, limit=2)  # (a chunk before the last read still wraps)
    assert wrapped[0] < 75 and wrapped == _chunk_sizes(LONG, tok, limit=9)


def test_a_text_cut_for_an_open_clip_tokenizer_keeps_its_exclamation_marks():
    """OpenCLIP's tokenizers (SD 2.x's, SDXL's second) pad with "!", a special token: the text
    recorded as read dropped every "!", and read again gave other tokens than were read."""
    from sdexport.models.presets import OPEN_CLIP_PAD
    from sdexport.models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer(OPEN_CLIP_PAD)
    text = "wow! a cat! " + "very " * 80 + "end"
    kept = kept_text(text, tokenizer, 77)
    assert kept is not None and kept.startswith("wow ! a cat ! very")
    assert _tokens(kept, tokenizer) == _tokens(text, tokenizer)[:75]


def test_break_starts_a_chunk_where_emphasis_reads_the_syntax(tok):
    assert _chunk_sizes("a cat BREAK a hat", tok, "original") == [len(_tokens("a cat", tok)), len(_tokens("a hat", tok))]
    assert _chunk_sizes("a cat BREAK", tok, "original") == [len(_tokens("a cat", tok))]  # nothing after it
    assert _chunk_sizes("BREAK BREAK a", tok, "original") == [0, 0, 1]  # A1111 pads empty chunks too
    assert len(_chunk_sizes("a cat BREAK a hat", tok)) == 1  # as text, BREAK is a word


def test_texts_of_fewer_chunks_are_padded_with_empty_ones(tok):
    ids, weights = token_ids(["a " * 80, "a cat"], tok, 77, limit=2)
    empty, _ = token_ids([""], tok, 77)
    assert ids.shape == (2, 2, 77) and weights is None
    assert torch.equal(ids[1, 1], empty[0, 0])
    assert ids[0, 0].tolist() == [tok.bos_token_id, *[_tokens("a", tok)[0]] * 75, tok.eos_token_id]


def test_what_the_chunks_cannot_hold_is_cut_and_the_record_reads_the_same(tok):
    text = "a (" + "a " * 100 + ":1.3) [b " + "a " * 100 + "]"
    kept = kept_text(text, tok, 77, "original", limit=2)
    assert kept is not None and kept.endswith(":0.9090909090909091)")
    assert kept_text(kept, tok, 77, "original", limit=2) is None
    whole = token_ids([text], tok, 77, "original", limit=2)
    again = token_ids([kept], tok, 77, "original", limit=2)
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    assert kept_text("a " * 140, tok, 77, limit=2) is None and kept_text("a " * 160, tok, 77, limit=2) == "a " * 149 + "a"


def test_the_profile_records_chunks_only_where_more_than_one_is_read():
    old = {"batch": [1, 1, 4], "height": [256, 512, 1024], "width": [256, 512, 1024]}
    assert ShapeProfile.from_dict(old).chunks == (1, 1, 1) and ShapeProfile.from_dict(old).to_dict() == old
    wide = ShapeProfile(chunks=(1, 1, 3))
    assert ShapeProfile.from_dict(wide.to_dict()) == wide
    dims = load_model("tiny", lazy=True).dims
    ranges = wide.tensor_ranges(UNET.for_model(dims), dims)["encoder_hidden_states"]
    assert [shape[1] for shape in ranges] == [dims.S, dims.S, 3 * dims.S]


def test_a_build_reaching_past_the_exported_chunks_is_refused_naming_the_option():
    dims = load_model("tiny", lazy=True).dims
    exported = ShapeProfile((1, 1, 2), (64, 128, 256), (64, 128, 256), (1, 1, 2))
    with pytest.raises(ProfileError, match=r"chunks \[1, 4\] is not inside \[1, 2\].*--prompt-chunks"):
        build_profile(exported, exported.with_ranges(chunks="1:1:4"), dims)
    assert build_profile(exported, None, dims, static=True).chunks == (1, 1, 1)  # the opt shape


def test_export_refuses_a_bad_range_in_one_line(tmp_path, capsys):
    assert run_cli("export", "tiny", "-o", tmp_path / "out", "--prompt-chunks", "0:1:2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --prompt-chunks '0:1:2': need 0 < min <= opt <= max"] and not (tmp_path / "out").exists()


def _hidden(model, text_chunks_ids: torch.Tensor) -> torch.Tensor:
    """transformers' reading of each chunk, side by side (A1111's ``torch.hstack``)."""
    with torch.no_grad():
        return torch.cat([model.modules["text_encoder"](text_chunks_ids[:, i]).last_hidden_state
                          for i in range(text_chunks_ids.shape[1])], dim=1)


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch"])
def test_a_long_prompt_is_read_whole_and_the_u_net_attends_to_every_chunk(tiny_engine_dir, backend, capsys):
    """The engines' image is diffusers' U-Net's given the chunks' hidden states side by side (the
    negative, one empty chunk, padded with another to the prompt's two)."""
    from diffusers import StableDiffusionPipeline

    from sdexport.runtime.schedulers import make_scheduler

    model = load_model("tiny")
    pipeline = load_pipeline(tiny_engine_dir, backend)
    assert pipeline.prompt_chunks == 2 and pipeline.chunk_count(REQUEST) == 2
    assert pipeline.truncations(REQUEST) == {} and "longer" not in capsys.readouterr().err
    ids, _ = token_ids([LONG, ""], model.tokenizers["tokenizer"], 77, limit=2)
    hidden = _hidden(model, ids)
    got = pipeline.encode_prompt(REQUEST)["encoder_hidden_states"]
    assert got.shape[1] == 2 * 77 and torch.allclose(got.cpu(), torch.cat([hidden[1:], hidden[:1]]), atol=1e-5)
    pipe = StableDiffusionPipeline(**{k: model.modules.get(k) for k in ("unet", "vae", "text_encoder")},
                                   tokenizer=model.tokenizers["tokenizer"],
                                   scheduler=make_scheduler(REQUEST.scheduler, model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = pipe(prompt_embeds=hidden[:1], negative_prompt_embeds=hidden[1:], num_inference_steps=2, height=64,
                width=64, generator=[torch.Generator("cpu").manual_seed(3)], output_type="latent").images
    ours = pipeline(REQUEST).latents.cpu()
    assert float((ours - want).norm() / want.norm()) < 1e-4


def _with_chunks(engine_dir, copy, chunks: list[int] | None):
    """A copy of ``engine_dir`` whose manifest's profile has ``chunks`` (None: none, as before the axis)."""
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["profile"].pop("chunks")
    manifest["profile"].update({"chunks": chunks} if chunks else {})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_directory_written_before_the_axis_reads_one_chunk(tiny_engine_dir, tmp_path, capsys):
    copy = _with_chunks(tiny_engine_dir, tmp_path / "old", None)
    assert load_manifest(copy).shape_profile.chunks == (1, 1, 1)
    pipeline = load_pipeline(copy, "onnxruntime-cpu")
    assert pipeline.prompt_chunks == 1 and pipeline.chunk_count(REQUEST) == 1
    cut = pipeline.truncations(REQUEST)["prompt"][0]
    assert "longer than the 77 tokens the text encoder reads" in " ".join(capsys.readouterr().err.split())
    assert pipeline.encode_prompt(dataclasses.replace(REQUEST, prompt=[cut]))["encoder_hidden_states"].shape[1] == 77


def test_the_benchmark_reads_one_chunk_as_its_baseline_does(tiny_engine_dir, capsys):
    """diffusers' pipelines cut a text at 77 tokens: over engines that read two chunks, the bench's
    runtime contenders read one too (the same work, comparable images), and say why they cut."""
    from sdexport.bench.contenders import BASELINE_READS, RuntimeContender

    contender = RuntimeContender("onnxruntime-cpu", tiny_engine_dir)
    pipeline = contender.pipeline
    # (cut between words, at token 75: a word cut in two is recorded as text that reads otherwise)
    request = dataclasses.replace(REQUEST, prompt=[", ".join(["a"] * 60)])
    assert pipeline.prompt_chunks == 1 and pipeline.chunk_count(request) == 1
    cut = pipeline.truncations(request)["prompt"][0]
    said = " ".join(capsys.readouterr().err.split())
    assert f"longer than the 77 tokens read here ({BASELINE_READS})" in said
    read = contender(request, stages=False).latents
    assert torch.equal(read, contender(dataclasses.replace(request, prompt=[cut]), stages=False).latents)
    contender.close()


def test_sdxl_reads_both_encoders_in_as_many_chunks(tiny_sdxl_engine_dir):
    """A short ``prompt_2`` beside a long prompt: the second encoder's reading is padded with an
    empty chunk, so the two lie side by side; the pooled embedding is the first chunk's."""
    pipeline = load_pipeline(tiny_sdxl_engine_dir, "onnxruntime-cpu")
    request = dataclasses.replace(REQUEST, prompt_2=["a cat"], guidance=1.0)
    got = pipeline.encode_prompt(request)
    assert got["encoder_hidden_states"].shape[1] == 2 * 77
    whole = pipeline.encode_prompt(dataclasses.replace(request, prompt_2=None))
    [[first, _]] = text_chunks([LONG], pipeline.tokenizer_2, 77, limit=2)  # (it ends at a comma: the wrap)
    first_chunk = ", ".join(["a red fox"] * [unit for unit, _ in first].count(tuple(_tokens(",", pipeline.tokenizer_2)))) + ","
    assert [unit for unit, _ in first] == [(token,) for token in _tokens(first_chunk, pipeline.tokenizer_2)]
    alone = pipeline.encode_prompt(dataclasses.replace(request, prompt=[first_chunk], prompt_2=None))
    assert alone["encoder_hidden_states"].shape[1] == 77
    assert torch.allclose(whole["text_embeds"], alone["text_embeds"], atol=1e-5)


def test_served_rows_of_different_chunk_counts_are_generated_apart():
    def row(prompt: str, chunks: int = 1) -> Row:
        return Row(prompt=prompt, seed=0, steps=2, guidance=None, scheduler="pndm", height=64, width=64, chunks=chunks)

    assert row("a cat").batch_key() != row(LONG, 2).batch_key() and row("a dog").batch_key() == row("a cat").batch_key()


class _BufferedEngine:
    """An engine whose outputs live in its own buffers, overwritten by its next call, as a TensorRT
    engine's do (``TensorRTEngine.__call__``)."""

    def __init__(self, engine) -> None:
        self.engine, self.spec, self.device, self.profile = engine, engine.spec, engine.device, engine.profile
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, feed):
        for name, value in self.engine(feed).items():
            self.buffers.setdefault(name, torch.empty_like(value)).copy_(value)
        return dict(self.buffers)


@pytest.mark.parametrize("preset", ["sd", "sdxl"])
def test_each_chunk_is_kept_before_the_encoder_runs_again(tiny_engine_dir, tiny_sdxl_engine_dir, preset):
    """The first chunk's hidden states (and SDXL's pooled embedding) survive the second chunk's call
    on an engine that reuses its output buffers."""
    pipeline = load_pipeline(tiny_engine_dir if preset == "sd" else tiny_sdxl_engine_dir, "onnxruntime-cpu")
    want = pipeline.encode_prompt(REQUEST)
    for name in [n for n in pipeline.engines if n.startswith("text_encoder")]:
        pipeline.engines[name] = _BufferedEngine(pipeline.engines[name])
    got = pipeline.encode_prompt(REQUEST)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_engines_of_two_chunks_at_least_pad_a_short_prompt(tiny_engine_dir, tmp_path):
    """A profile whose fewest chunks are two (a plan built ``--static`` at two): a one-chunk prompt
    is read with an empty chunk after it."""
    pipeline = load_pipeline(_with_chunks(tiny_engine_dir, tmp_path / "two", [2, 2, 2]), "onnxruntime-cpu")
    short = dataclasses.replace(REQUEST, prompt=["a cat"], guidance=1.0)
    assert pipeline.least_chunks == 2 and pipeline.chunk_count(short) == 2
    hidden = pipeline.encode_prompt(short)["encoder_hidden_states"]
    empty = pipeline.encode_prompt(dataclasses.replace(short, prompt=[""]))["encoder_hidden_states"]
    assert hidden.shape[1] == 2 * 77 and torch.equal(hidden[:, 77:], empty[:, 77:])
    assert torch.isfinite(pipeline(short).latents).all()


def test_a_run_split_into_calls_reads_each_image_as_one_call_would(tiny_engine_dir, tmp_path, capsys):
    """Three prompts, two per call (the profile's batch): "a cat", alone in the second call, read one
    chunk where one call would pad it to the long prompt's two, though run said "as in one call"."""
    import numpy as np
    from PIL import Image

    common = ["--steps", "2", "--height", "64", "--width", "64"]
    assert run_cli("run", tiny_engine_dir, "-p", "a fox", "-p", LONG, "-p", "a cat", "--seed", "10", *common,
                   "-o", tmp_path / "split.png") == 0
    assert "2 calls, each image with its own seed (10 to 12) as in one call" in " ".join(capsys.readouterr().err.split())
    assert run_cli("run", tiny_engine_dir, "-p", "a cat", "-p", LONG, "--seed", "12", *common,
                   "-o", tmp_path / "padded.png") == 0  # "a cat" beside the long prompt, seed 12, one call
    assert run_cli("run", tiny_engine_dir, "-p", "a cat", "--seed", "12", *common, "-o", tmp_path / "alone.png") == 0
    split, padded, alone = (np.asarray(Image.open(tmp_path / name)) for name in ("split-2.png", "padded-0.png",
                                                                                  "alone.png"))
    np.testing.assert_array_equal(split, padded)
    assert not np.array_equal(split, alone)  # (the padding matters: the test would pass either way otherwise)
    # the Python API's refusal of the whole request says how to read it as run does
    from sdexport.errors import ProfileError
    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.request import GenerationRequest

    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    request = GenerationRequest(prompt=["a fox", LONG, "a cat"], seeds=[10, 11, 12], steps=2, height=64, width=64)
    with pytest.raises(ProfileError, match=r"request.split\(2\)\) and call the parts inside `with pipeline.padded_to"):
        pipeline(request)
    with pipeline.padded_to(request):
        images = [image for part in request.split(2) for image in pipeline(part).images]
    np.testing.assert_array_equal(np.asarray(images[2]), split)


def test_breaks_that_start_read_chunks_are_recorded(tok):
    """``a BREAK BREAK b`` in two chunks reads ``a`` and an empty chunk: the record keeps the BREAKs
    that make it, and reads as the same two chunks."""
    for limit, want in ((2, "a BREAK BREAK "), (1, "a")):
        kept = kept_text("a BREAK BREAK b", tok, 77, "original", limit=limit)
        assert kept == want
        assert [len(c) for c in text_chunks([kept], tok, 77, "original", limit)[0]] == [1, 0][:limit]


def test_run_loads_engines_for_its_prompts_chunks(tiny_engine_dir, monkeypatch):
    """``load_pipeline(requests=...)`` reads the texts once the tokenizers load, so TensorRT prefers
    a plan that reads them whole (and CUDA-graph sessions capture their length)."""
    from sdexport.runtime import loading

    seen = []
    real = loading._load_engines
    monkeypatch.setattr(loading, "_load_engines", lambda *a, **k: seen.append(k["request_profile"]) or real(*a, **k))
    wanted = ShapeProfile.single(1, 64, 64)
    load_pipeline(tiny_engine_dir, "onnxruntime-cpu", request_profile=wanted, requests=[REQUEST])
    load_pipeline(tiny_engine_dir, "onnxruntime-cpu", request_profile=wanted,
                  requests=[dataclasses.replace(REQUEST, prompt=["a cat"])])
    load_pipeline(tiny_engine_dir, "onnxruntime-cpu", request_profile=wanted, requests=[REQUEST],
                  read_chunks=(1, "asked to read one"))  # (the long prompt, read cut: the engines need one)
    load_pipeline(tiny_engine_dir, "onnxruntime-cpu", request_profile=wanted,  # the longest of several
                  requests=[dataclasses.replace(REQUEST, prompt=["a cat"]), REQUEST])
    assert [p.chunks for p in seen] == [(2, 2, 2), (1, 1, 1), (1, 1, 1), (2, 2, 2)]


# From mutation testing round 6


def test_a_full_chunk_wraps_at_a_comma_exactly_the_backtrack_limit_back(tok):
    """A1111 moves the words after the last comma when the comma and they are at most
    ``COMMA_BACKTRACK`` tokens: at exactly that many they move, one more and they stay."""
    at_limit = "a " * (75 - COMMA_BACKTRACK) + ", " + "a " * (COMMA_BACKTRACK + 1)  # 20 from the comma on
    assert _chunk_sizes(at_limit, tok) == [76 - COMMA_BACKTRACK, COMMA_BACKTRACK + 1]
    beyond = "a " * (74 - COMMA_BACKTRACK) + ", " + "a " * (COMMA_BACKTRACK + 2)  # 21 from the comma on
    assert _chunk_sizes(beyond, tok) == [75, 2]


def test_a_comma_before_break_does_not_wrap_the_chunk_after_it(tok):
    """``BREAK`` starts a chunk with no comma in it: a comma of the chunk before would wrap the
    next one at a place it does not have, moving words to a third chunk."""
    text = "a " * 60 + ", a BREAK " + "a " * 76
    assert _chunk_sizes(text, tok, "original") == [62, 75, 1]


def test_a_word_of_more_vectors_than_a_chunk_holds_is_read_from_its_first_75(tok):
    """A textual inversion word of more vectors than one chunk holds keeps its first 75 there (A1111
    cuts it as well): no chunk holds more than the encoder reads, and none is left empty before it."""
    import copy

    words = copy.deepcopy(tok)
    words.add_tokens(["longword", *(f"longword_{i}" for i in range(1, 80))])
    assert _chunk_sizes("longword", words) == [75]
    assert _chunk_sizes("a longword", words) == [1, 75]


def test_the_engines_read_as_many_chunks_as_the_longest_text_a_call_reads(tok):
    """Engines are loaded for the request's longest text, a negative prompt under guidance included:
    sized for a shorter one, they would cut the longer text. Negatives a call does not read (no
    guidance) do not count."""
    from sdexport.runtime.prompt_text import longest_chunks

    tokenizers = {"prompt": tok, "negative_prompt": tok}
    request = GenerationRequest(prompt=["a cat", "a " * 100], steps=2, seeds=[3, 4], height=64, width=64)
    assert longest_chunks(request, tokenizers, 77, limit=3) == 2
    negative = dataclasses.replace(request, prompt=["a cat"], seeds=[3], negative_prompt=["a " * 160])
    assert longest_chunks(negative, tokenizers, 77, limit=3) == 3
    assert longest_chunks(negative, tokenizers, 77, limit=2) == 2
    assert longest_chunks(dataclasses.replace(negative, guidance=1.0), tokenizers, 77, limit=3) == 1


def test_a_break_between_runs_read_whole_is_kept_in_the_text_recorded(tok):
    """The text recorded as read (``kept_text``) reads the same chunks again: a ``BREAK`` before a
    run kept whole stays in it, else the record would run that run into the chunk before."""
    text = "a BREAK b (" + "c " * 100 + ")"
    kept = kept_text(text, tok, 77, "original", limit=2)
    assert kept is not None and kept.startswith("a BREAK b")
    whole = token_ids([text], tok, 77, "original", limit=2)
    again = token_ids([kept], tok, 77, "original", limit=2)
    assert all(torch.equal(a, b) for a, b in zip(whole, again))

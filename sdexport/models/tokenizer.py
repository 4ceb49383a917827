"""CLIP tokenizers built offline: the real one for the full-size presets, the byte-level one for
the tiny ones, and saving any of them so that transformers 4 and 5 both read it.

Nothing is downloaded. The full-size presets are also the architecture a single-file checkpoint is
read with (``export model.safetensors --config sd15``), whose text encoder was trained on CLIP's
vocabulary: their tokenizer is CLIP's, built from its merges, which sdexport ships
(``data/clip_merges.txt.gz``: the 48,894 merges CLIP uses, from OpenAI's CLIP, MIT licence in
``data/CLIP-LICENSE.txt``). CLIP's vocabulary is made from them as OpenAI's tokenizer makes it
(the 256 byte symbols, the same at a word's end, each merge, then the start and end tokens: 49,408
ids), which is the ``vocab.json`` of the tokenizers diffusers' SD checkpoints ship.

The tiny presets' text encoders have 514 ids: a CLIP tokenizer with the 512 byte-level symbols and
no merges, every word its characters. Both are saved as ordinary ``CLIPTokenizer`` folders, so the
runtime loads them like any checkpoint's tokenizer.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdexport.models.presets import EOS, Preset

BOS = "<|startoftext|>"
MERGES_HEADER = "#version: 0.2"
"""The first line of a CLIP ``merges.txt`` (readers skip it)."""
CLIP_MERGES = Path(__file__).parent / "data" / "clip_merges.txt.gz"
CLIP_VOCAB_SIZE = 49408


@cache
def _clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    merges = tuple(gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").splitlines())
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *(merge.replace(" ", "") for merge in merges),
              BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, merges


def preset_tokenizer(preset: Preset, name: str) -> CLIPTokenizer:
    """The tokenizer ``name`` (``tokenizer``, ``tokenizer_2``) of ``preset``: CLIP's for the
    full-size ones (``Preset.tokenizer_pads``), the byte-level one for the tiny ones."""
    if preset.tokenizer_pads is None:
        return byte_level_clip_tokenizer()
    return clip_tokenizer(preset.tokenizer_pads[name])


def clip_tokenizer(pad: str = EOS, max_length: int = 77) -> CLIPTokenizer:
    """CLIP's tokenizer (BOS 49406, EOS 49407), padding with ``pad``: ``EOS`` as OpenAI's CLIP
    (SD 1.x, SDXL's first encoder), ``presets.OPEN_CLIP_PAD`` as OpenCLIP's (SD 2.x, SDXL's second)."""
    vocab, merges = _clip_bpe()
    pairs: Any = [tuple(merge.split(" ")) for merge in merges]  # (tokenizers' BPE takes pairs; transformers says str)
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=max_length, pad_token=pad)


def byte_level_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """514 ids: BOS=0, EOS=PAD=1, then each byte symbol alone and at a word end."""
    symbols = list(bytes_to_unicode().values())
    vocab = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab.setdefault(symbol + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save as transformers does, then add ``vocab.json`` and ``merges.txt`` where it did not write
    them: transformers 5 saves only ``tokenizer.json``, which transformers 4's ``CLIPTokenizer``
    (optimum's, pinned below 4.58) cannot read. Both are the BPE model inside ``tokenizer.json``."""
    tokenizer.save_pretrained(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    vocab, merges = bpe_files(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")


def bpe_files(tokenizer_json: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merge lines of a BPE ``tokenizer.json`` (tokenizers writes a merge as
    ``"a b"`` or, since 0.20, as ``["a", "b"]``)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"not a BPE tokenizer (model type {model.get('type')!r})")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return dict(model["vocab"]), merges

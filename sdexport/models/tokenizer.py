"""CLIP tokenizers: the byte-level one built offline for presets, and saving any of them so that
transformers 4 and 5 both read it.

Real CLIP merges cannot be downloaded here. Random-weight presets only need token ids inside the
text encoder's vocabulary, and a CLIP tokenizer with the 512 byte-level symbols and no merges gives
exactly that: every word becomes its characters. It is saved as an ordinary ``CLIPTokenizer``, so
the runtime loads it like any checkpoint's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"
"""The first line of a CLIP ``merges.txt`` (readers skip it)."""


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

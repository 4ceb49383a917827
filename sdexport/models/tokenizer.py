"""A byte-level CLIP tokenizer built offline, for presets that have no tokenizer files.

Real CLIP merges cannot be downloaded here. Random-weight presets only need token ids inside the
text encoder's vocabulary, and a CLIP tokenizer with the 512 byte-level symbols and no merges gives
exactly that: every word becomes its characters. It is saved as an ordinary ``CLIPTokenizer``, so
the runtime loads it like any checkpoint's tokenizer.
"""

from __future__ import annotations

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_level_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """514 ids: BOS=0, EOS=PAD=1, then each byte symbol alone and at a word end."""
    symbols = list(bytes_to_unicode().values())
    vocab = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab.setdefault(symbol + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)

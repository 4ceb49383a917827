"""Prompts as the text encoders read them: textual inversion words spelled out, and what fits.

A textual inversion word of several vectors (``models.textual_inversion``) is one added token to
the tokenizer, ``STYLE``, followed by ``STYLE_1``, ``STYLE_2``...; a prompt names the word once
and is read with all of them, as diffusers' ``maybe_convert_prompt`` spells it out. That function
looks the word up by the text the tokenizer gives for it, which transformers 5's CLIP tokenizers
give in lower case, and replaces it wherever it occurs in the prompt, inside other added words
too. Here the word is found where the tokenizer finds it (its token id and the characters it
came from), whatever its case and whatever other words the tokenizer knows.
"""

from __future__ import annotations

from typing import Any

from sdexport.models.textual_inversion import token_name


def follow_ups(tokenizer: Any) -> dict[int, list[str]]:
    """Per token id of a word of several vectors, the tokens that follow it (``STYLE_1``, ...)."""
    added = tokenizer.added_tokens_encoder
    words: dict[int, list[str]] = {}
    for word, token in added.items():
        names: list[str] = []
        while token_name(word, len(names) + 1) in added:
            names.append(token_name(word, len(names) + 1))
        if names:
            words[int(token)] = names
    return words


def spell_out(texts: list[str], tokenizer: Any) -> list[str]:
    """``texts`` with each word of several vectors followed by its other tokens; as given where the
    tokenizer holds no such word (the common case: no second tokenization)."""
    words = follow_ups(tokenizer)
    if not words:
        return list(texts)
    spelled = []
    for text in texts:
        found = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces, last = [], 0
        for token, (_, end) in zip(found.input_ids, found["offset_mapping"]):
            if token in words:
                pieces += [text[last:end], " ", " ".join(words[token]), " "]
                last = end
        spelled.append("".join(pieces) + text[last:])
    return spelled


def kept_text(text: str, tokenizer: Any, length: int) -> str | None:
    """The part of ``text`` a text encoder of ``length`` tokens reads, or None when all of it fits.
    A word of several vectors takes as many places; one the limit cuts is left out of the text (the
    encoder reads its first vectors, which no text spells alone)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    words = follow_ups(tokenizer)
    room = length - 2  # the start and end tokens take two places
    kept: list[int] = []
    for token in ids:
        room -= 1 + len(words.get(token, ()))
        if room < 0:
            break
        kept.append(token)
    if len(kept) == len(ids):
        return None
    used = _decoded(kept, tokenizer)
    if "\ufffd" not in text:  # CLIP's byte-level tokens can cut a character (é, an emoji) in two:
        used = used.rstrip("\ufffd").rstrip()  # its first bytes decode to U+FFFD, no text to record or reuse
    return used


def _decoded(ids: list[int], tokenizer: Any) -> str:
    """``ids`` as text the tokenizer reads as them again. Words added to it (textual inversion) are
    decoded apart, with a space after them: decoded together, CLIP's tokenizers run an added word
    into the next (they end words with ``</w>``, which added words lack)."""
    added = set(tokenizer.added_tokens_decoder)
    runs: list[list[int]] = []
    for token in ids:
        if token in added or not runs or runs[-1][-1] in added:
            runs.append([token])
        else:
            runs[-1].append(token)
    texts = (str(tokenizer.decode(run, skip_special_tokens=True)).strip() for run in runs)
    return " ".join(text for text in texts if text)

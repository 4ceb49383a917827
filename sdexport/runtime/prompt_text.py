"""Prompts as the text encoders read them: textual inversion words spelled out, A1111's emphasis
weighed (``runtime.emphasis``), and what fits.

A textual inversion word of several vectors (``models.textual_inversion``) is one added token to
the tokenizer, ``STYLE``, followed by ``STYLE_1``, ``STYLE_2``...; a prompt names the word once
and is read with all of them, as diffusers' ``maybe_convert_prompt`` spells it out. That function
looks the word up by the text the tokenizer gives for it, which transformers 5's CLIP tokenizers
give in lower case, and replaces it wherever it occurs in the prompt, inside other added words
too. Here the word is found where the tokenizer finds it (its token id and the characters it
came from), whatever its case and whatever other words the tokenizer knows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdexport.models.textual_inversion import token_name
from sdexport.runtime.emphasis import BREAK, parse, written

if TYPE_CHECKING:
    import torch


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


def token_ids(texts: list[str], tokenizer: Any, length: int,
              emphasis: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``texts`` as the text encoder's ``input_ids`` (B × ``length``), and each token's weight where
    ``emphasis`` weighs any (else None: the hidden states are used as they come).

    Weighed, each run of one weight is tokenized apart, as A1111 does (``(red)fox`` is ``red`` and
    ``fox``, not ``redfox``), and the runs' tokens are cut together at ``length``; the start, end
    and padding tokens weigh 1. Text after ``BREAK`` lies beyond the window (``runtime.emphasis``)."""
    import torch

    if emphasis == "none":
        ids = tokenizer(spell_out(texts, tokenizer), padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        return ids, None
    rows, weights = [], []
    for text in texts:
        pieces = _read_pieces(text)
        found = tokenizer(spell_out([piece for piece, _ in pieces], tokenizer), add_special_tokens=False).input_ids
        row = [token for tokens in found for token in tokens][:length - 2]
        row_weights = [weight for tokens, (_, weight) in zip(found, pieces) for _ in tokens][:length - 2]
        padding = length - 2 - len(row)
        rows.append([tokenizer.bos_token_id, *row, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *row_weights, 1.0] + [1.0] * padding)
    multipliers = torch.tensor(weights) if any(w != 1.0 for row_weights in weights for w in row_weights) else None
    return torch.tensor(rows), multipliers


def _read_pieces(text: str) -> list[tuple[str, float]]:
    """The runs of ``text`` the window reads: those before the first ``BREAK``."""
    pieces = []
    for piece, weight in parse(text):
        if piece is BREAK:
            break
        pieces.append((piece, weight))
    return pieces


def kept_text(text: str, tokenizer: Any, length: int, emphasis: str = "none") -> str | None:
    """The part of ``text`` a text encoder of ``length`` tokens reads, or None when all of it fits.
    A word of several vectors takes as many places; one the limit cuts is left out of the text (the
    encoder reads its first vectors, which no text spells alone). Weighed (``emphasis``), the part is
    written back in A1111's syntax with each run's exact weight, and text after ``BREAK`` is cut
    where it has any tokens."""
    if emphasis == "none":
        ids = tokenizer(text, add_special_tokens=False).input_ids
        kept = _fitting(ids, follow_ups(tokenizer), length - 2)
        return None if len(kept) == len(ids) else _cut_text(kept, tokenizer, text)
    pieces, read = parse(text), _read_pieces(text)
    found = tokenizer([piece or "" for piece, _ in pieces], add_special_tokens=False).input_ids
    words = follow_ups(tokenizer)
    room = length - 2  # the start and end tokens take two places
    kept_runs: list[tuple[str, float]] = []
    for (piece, weight), ids in zip(read, found):  # (the runs read are the first of the runs)
        kept = _fitting(ids, words, room)
        if len(kept) < len(ids):
            return written([*kept_runs, *([(_cut_text(kept, tokenizer, piece), weight)] if kept else [])])
        room -= _places(ids, words)
        kept_runs.append((piece, weight))
    return written(kept_runs) if any(found[len(read):]) else None  # (what follows BREAK, where it has tokens)


def _fitting(ids: list[int], words: dict[int, list[str]], room: int) -> list[int]:
    """The first of ``ids`` that take at most ``room`` places (a word of several vectors, as many)."""
    kept: list[int] = []
    for token in ids:
        room -= _places([token], words)
        if room < 0:
            break
        kept.append(token)
    return kept


def _places(ids: list[int], words: dict[int, list[str]]) -> int:
    return sum(1 + len(words.get(token, ())) for token in ids)


def _cut_text(kept: list[int], tokenizer: Any, text: str) -> str:
    """The text of the ``kept`` tokens of ``text``."""
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

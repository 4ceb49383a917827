"""Prompts as the text encoders read them: textual inversion words spelled out, A1111's emphasis
weighed (``runtime.emphasis``), in A1111's chunks of 75 tokens, and what fits.

A long prompt is read as A1111 reads it (``tokenize_line``): in chunks of ``S`` - 2 tokens, each
encoded on its own with its start and end tokens, side by side for the U-Net (its ``X``); the
engines take at most the profile's ``chunks`` of them, and the texts of a call are padded with
empty chunks to its longest.

A textual inversion word of several vectors (``models.textual_inversion``) is one added token to
the tokenizer, ``STYLE``, followed by ``STYLE_1``, ``STYLE_2``...; a prompt names the word once
and is read with all of them, as diffusers' ``maybe_convert_prompt`` spells it out. That function
looks the word up by the text the tokenizer gives for it, which transformers 5's CLIP tokenizers
give in lower case, and replaces it wherever it occurs in the prompt, inside other added words
too. Here the word is found where the tokenizer finds it (its token id), whatever its case and
whatever other words the tokenizer knows, and its vectors stay in one chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdexport.models.textual_inversion import token_name
from sdexport.runtime.emphasis import BREAK, parse, written

if TYPE_CHECKING:
    import torch

    from sdexport.runtime.request import GenerationRequest


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


Unit = tuple[int, ...]
"""A token as the encoder reads it: one id, or a word of several vectors with its follow-ups."""

COMMA_BACKTRACK = 20
"""A1111's "Prompt word wrap length limit" (``comma_padding_backtrack``, 20 by default): a chunk that
fills up moves the words after its last comma, when there are at most this many, to the next."""


def units(texts: list[str], tokenizer: Any) -> list[list[Unit]]:
    """Each text's tokens, a word of several vectors with its follow-ups (``STYLE``, ``STYLE_1``, ...)
    as one unit: they go into one chunk together, as A1111 keeps an embedding's vectors."""
    words = {token: tuple(tokenizer.convert_tokens_to_ids(names)) for token, names in follow_ups(tokenizer).items()}
    # verbose=False: transformers' warning that a text past the encoder's length "will result in indexing
    # errors" (printed by the Python API, where no -q quiets libraries) is untrue of chunks read apart
    found = tokenizer(texts, add_special_tokens=False, verbose=False).input_ids if texts else []
    return [[(token, *words.get(token, ())) for token in ids] for ids in found]


def _runs(text: str, tokenizer: Any, emphasis: str) -> list[tuple[str | None, float, list[Unit]]]:
    """``text``'s runs, as (text, weight, units): one run of weight 1 unread (``none``), A1111's runs
    weighed, each tokenized apart (``(red)fox`` is ``red`` and ``fox``, not ``redfox``), and a
    ``BREAK`` as the run (``BREAK``, -1, no units)."""
    if emphasis == "none":
        return [(text, 1.0, units([text], tokenizer)[0])]
    pieces = parse(text)
    found = iter(units([piece for piece, _ in pieces if piece is not BREAK], tokenizer))
    return [(piece, weight, [] if piece is BREAK else next(found)) for piece, weight in pieces]


Chunk = list[tuple[Unit, float]]


def _chunked(runs: list[tuple[str | None, float, list[Unit]]], room: int, comma: int | None,
             limit: int | None = None) -> list[Chunk]:
    """The runs' units in A1111's chunks of ``room`` tokens (``tokenize_line``): a chunk ends when it
    is full, before a word of several vectors that does not fit, and at ``BREAK``; a full chunk
    gives the words after its last comma (within ``COMMA_BACKTRACK``) to the next, unless it is the
    ``limit``-th, the last one read: its words would move into a chunk that is cut (one chunk read
    is then diffusers' 75 tokens, where the wrap would cut at the comma). Units stay in
    order, so the first chunks read a prefix of the text."""
    chunks: list[Chunk] = []
    chunk: Chunk = []
    last_comma = -1

    def size(part: Chunk) -> int:
        return sum(len(unit) for unit, _ in part)

    for piece, weight, found in runs:
        if piece is BREAK:
            chunks.append(chunk)
            chunk, last_comma = [], -1
            continue
        for unit in found:
            if unit == (comma,):
                last_comma = len(chunk)
            elif (size(chunk) == room and last_comma != -1 and size(chunk[last_comma:]) <= COMMA_BACKTRACK
                  and (limit is None or len(chunks) < limit - 1)):  # the last chunk read keeps its words
                chunks.append(chunk[:last_comma + 1])
                chunk, last_comma = chunk[last_comma + 1:], -1
            if size(chunk) + len(unit) > room and chunk:
                chunks.append(chunk)
                chunk, last_comma = [], -1
            chunk.append((unit[:room], weight))  # (a word of more vectors than a chunk holds: its first)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _comma(tokenizer: Any) -> int | None:
    ids = tokenizer(",", add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def text_chunks(texts: list[str], tokenizer: Any, length: int, emphasis: str = "none",
                limit: int = 1) -> list[list[Chunk]]:
    """Each text's chunks as the encoder reads them, at most ``limit`` (what follows is cut:
    ``kept_text`` says what is read)."""
    comma = _comma(tokenizer)
    return [_chunked(_runs(text, tokenizer, emphasis), length - 2, comma, limit)[:limit] for text in texts]


def chunk_tensors(chunked: list[list[Chunk]], tokenizer: Any, length: int,
                  count: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunked`` (``text_chunks``) as the encoder's ``input_ids``, B × n × ``length`` with n the
    most chunks of a text (or ``count``, if more), and each token's weight (None where all weigh 1).
    Each chunk is the start token, its tokens, the end token and padding, as diffusers tokenizes
    one window; a text of fewer chunks is padded with empty ones, as A1111 pads a batch (the
    start and end tokens and the padding weigh 1)."""
    import torch

    n = max([count, *map(len, chunked)])
    rows, weights = [], []
    for chunks in chunked:
        text_rows, text_weights = [], []
        for chunk in chunks + [[]] * (n - len(chunks)):
            ids = [token for unit, _ in chunk for token in unit]
            padding = length - 2 - len(ids)
            text_rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
            text_weights.append([1.0, *(w for unit, w in chunk for _ in unit), 1.0] + [1.0] * padding)
        rows.append(text_rows)
        weights.append(text_weights)
    weighed = any(w != 1.0 for text in weights for row in text for w in row)
    return torch.tensor(rows), torch.tensor(weights) if weighed else None


def longest_chunks(request: GenerationRequest, tokenizers: Mapping[str, Any], length: int, limit: int,
                   zeroed_negatives: bool = False) -> int:
    """The most chunks (at most ``limit``) any text of ``request`` that a call reads is read in;
    ``tokenizers``: each text's (``txt2img.text_tokenizers``); ``zeroed_negatives``: as
    ``GenerationRequest.texts_read``'s."""
    return max(len(chunks) for name in request.texts_read(zeroed_negatives)
               for chunks in text_chunks(list(getattr(request, name)), tokenizers[name], length, request.emphasis, limit))


def kept_text(text: str, tokenizer: Any, length: int, emphasis: str = "none", limit: int = 1) -> str | None:
    """The part of ``text`` that ``limit`` chunks of ``length`` tokens read, or None when all of it
    fits. A word of several vectors is read whole or not at all. Weighed (``emphasis``), the part
    is written back in A1111's syntax with each run's exact weight (and its ``BREAK``s)."""
    runs, comma = _runs(text, tokenizer, emphasis), _comma(tokenizer)
    read = _chunked(runs, length - 2, comma, limit)[:limit]
    room = sum(map(len, read))
    if room == sum(len(found) for _, _, found in runs):
        return None
    if emphasis == "none":
        return _cut_text([unit[0] for unit in runs[0][2][:room]], tokenizer, text)
    kept: list[tuple[str | None, float]] = []
    waiting: list[tuple[str | None, float]] = []  # BREAKs and empty runs: kept where text follows
    for piece, weight, found in runs:
        if room < len(found):
            if room:
                kept += [*waiting, (_cut_text([unit[0] for unit in found[:room]], tokenizer, piece or ""), weight)]
            else:  # BREAKs at the cut: as many as start the (empty) chunks that are read
                marks = [mark for mark in waiting if mark[0] is BREAK]
                while marks and len(_chunked(_runs(written(kept), tokenizer, emphasis), length - 2, comma, limit)) < len(read):
                    kept.append(marks.pop(0))
            break
        if found:
            kept += [*waiting, (piece, weight)]
            waiting = []
        else:
            waiting.append((piece, weight))
        room -= len(found)
    return written(kept)


def _cut_text(kept: list[int], tokenizer: Any, text: str) -> str:
    """The text of the ``kept`` tokens of ``text``."""
    used = _decoded(kept, tokenizer)
    if "\ufffd" not in text:  # CLIP's byte-level tokens can cut a character (é, an emoji) in two:
        used = used.rstrip("\ufffd").rstrip()  # its first bytes decode to U+FFFD, no text to record or reuse
    return used


def _decoded(ids: list[int], tokenizer: Any) -> str:
    """``ids`` as text the tokenizer reads as them again. Words added to it (textual inversion) are
    decoded apart, with a space after them: decoded together, CLIP's tokenizers run an added word
    into the next (they end words with ``</w>``, which added words lack). Its special tokens are
    added words too, kept: OpenCLIP's tokenizers (SD 2.x's, SDXL's second) pad with "!", which a
    text holds as any other word (``ids`` hold no start or end token). An added word is written as
    it was added: CLIP's byte-level decoding took its letters beyond ASCII ("café") for bytes and
    wrote U+FFFD, a word no tokenizer reads as the embedding again (an audit)."""
    added = tokenizer.added_tokens_decoder
    runs: list[list[int]] = []
    for token in ids:
        if token in added or not runs or runs[-1][-1] in added:
            runs.append([token])
        else:
            runs[-1].append(token)
    texts = (str(added[run[0]].content if run[0] in added else tokenizer.decode(run, skip_special_tokens=False)).strip()
             for run in runs)
    return " ".join(text for text in texts if text)

"""A1111's emphasis: ``(word)``, ``[word]`` and ``(word:1.3)`` weigh parts of a prompt.

Prompts shared for Stable Diffusion checkpoints are mostly written for AUTOMATIC1111's web UI, which
reads brackets as weights: ``(word)`` multiplies the text encoder's output for those tokens by 1.1,
``[word]`` divides it by 1.1, ``(word:1.3)`` multiplies it by 1.3, brackets nest (their factors
multiply), a bracket left open closes at the end, and ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the
characters themselves. ``BREAK`` ends A1111's 75-token chunk: the text after it is in the next one.

diffusers reads such a prompt as plain text (the brackets are tokens), and so does sdexport by
default (``none``, A1111's "None"): the images match diffusers'. ``original`` weighs as A1111 does by
default: the hidden states are multiplied token by token, then scaled back to their mean before
weighing; ``no-norm`` (A1111's "No norm") leaves out the rescaling. A1111 takes the mean over every
prompt encoded in one call; here it is each prompt's own, so that an image does not depend on the
others beside it in a call (for one prompt, or a batch of the same, the two agree), as long as they
are read in as many chunks (a call pads its texts to its longest's: ``prompt_text``).

``BREAK`` starts a new chunk of the ones a long prompt is read in (``prompt_text``, which tokenizes;
this module parses and writes the syntax and weighs hidden states, a chunk at a time).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from sdexport.errors import SdexportError

if TYPE_CHECKING:
    import torch

EMPHASIS = ("none", "original", "no-norm")
"""``GenerationRequest.emphasis`` values: brackets read as text (diffusers, the default), weighed as
A1111 does by default, weighed without the rescaling."""

A1111_NAMES = {"none": "None", "original": "Original", "no-norm": "No norm"}
"""A1111's names of the modes, as its "Emphasis" parameter writes them."""

UP = 1.1
"""The factor of a pair of round brackets (its inverse: square ones)."""

BREAK = None
"""The piece ``parse`` gives for ``BREAK``: where a new chunk starts."""

_BREAK_WEIGHT = -1.0
"""A1111 marks a ``BREAK`` as the text "BREAK" weighing -1, and breaks where that holds after the
brackets' factors: inside brackets the mark is scaled, and so read as the word "BREAK" (weighing
minus the brackets' factor, as A1111 reads it)."""

MAX_TEXT = 10_000
"""The longest text read, in characters (with emphasis or without): the engines read a few chunks of
75 tokens (a few hundred characters each); tokenizing takes time that grows with the length, and parsing nested brackets time that grows as the square of their count (as
A1111's; a quarter of a second at this length): a served request must not hold a worker for long.
A text is parsed once (``parse`` keeps its recent results) for its check, its cut and its tokens."""

_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPED = "()[]\\"
_SPECIAL = re.compile(r"[\\()\[\]:]")
_BREAK_WORD = re.compile(r"\bBREAK\b")

Piece = tuple[str | None, float]
"""A run of text and its weight; the text is ``BREAK`` (None) where A1111 starts a new chunk."""


class EmphasisError(ValueError):
    """A weight A1111 cannot read either: ``(word:1.2.3)``."""


def check_mode(mode: str, named: str) -> None:
    """``mode`` is one of ``EMPHASIS``; else one line, the setting ``named`` as the caller names it."""
    if mode not in EMPHASIS:
        raise SdexportError(f"{named} {mode!r}: choose one of {', '.join(EMPHASIS)}")


@lru_cache(maxsize=256)
def parse(text: str) -> tuple[Piece, ...]:
    """``text``'s runs of equal weight, in order, as A1111's ``parse_prompt_attention`` reads them
    (its docstring's examples are this module's tests). Raises ``EmphasisError`` for a weight that
    A1111 fails on too (``(word:1.2.3)``)."""
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def literal(run: str) -> None:
        for n, part in enumerate(_BREAK.split(run)):
            if n:
                pieces.append(["BREAK", _BREAK_WEIGHT])
            pieces.append([part, 1.0])

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":  # an escaped bracket or backslash is itself; a lone backslash an empty run
            escaped = text[i + 1:i + 2] in tuple(_ESCAPED)
            pieces.append([text[i + 1] if escaped else "", 1.0])
            i += escaped
        elif char == "(":
            rounds.append(len(pieces))
        elif char == "[":
            squares.append(len(pieces))
        elif char == ")" and rounds:
            scale(rounds.pop(), UP)
        elif char == "]" and squares:
            scale(squares.pop(), 1 / UP)
        elif char == ":" and (found := _WEIGHT.match(text, i)):
            if rounds:
                scale(rounds.pop(), _weight(found[1], found[0]))
            else:  # no bracket open: text
                literal(found[0])
            i = found.end()
            continue
        else:
            end = _SPECIAL.search(text, i + 1)
            stop = end.start() if end else len(text)
            literal(text[i:stop])
            i = stop
            continue
        i += 1
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, 1 / UP)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return tuple((BREAK, 1.0) if (piece, weight) == ("BREAK", _BREAK_WEIGHT) else (piece, weight)
                 for piece, weight in merged)


def _weight(number: str, written: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise EmphasisError(f"{written!r} is no weight: A1111's is a number, as in (word:1.2)") from None


def uses_syntax(text: str) -> bool:
    """Whether A1111 reads ``text`` otherwise than as plain text: a bracket that weighs, an escape,
    a ``BREAK``, or a weight it fails on (in its first ``MAX_TEXT`` characters)."""
    head = text[:MAX_TEXT]
    try:
        return parse(head) != ((head, 1.0),)
    except EmphasisError:
        return True


_AS_EMPHASIS = "its brackets as emphasis and the rest as text"
_UNREAD = {
    "prompt editing ([from:to:when])": (re.compile(r"\[[^\[\]]*:\s*[\d.]+\s*\]"), _AS_EMPHASIS),
    "alternation ([a|b])": (re.compile(r"\[[^\[\]]*\|[^\[\]]*\]"), _AS_EMPHASIS),
    "AND (composable prompts)": (re.compile(r"\bAND\b"), "AND as a word"),
}
"""A1111's syntax beyond emphasis, which changes the text per step or adds prompts, and how
sdexport reads it instead (``request.default_notes`` says so)."""


_EXTRA_NETWORK = re.compile(r"<(?:lora|lyco|hypernet):[^<>]+>", re.IGNORECASE)
"""A1111's extra-network tags (``<lora:NAME:0.8>``), which load a file rather than weigh words."""


def extra_network_tags(text: str) -> list[str]:
    """The ``<lora:...>`` (``lyco``, ``hypernet``) tags in ``text``, which every mode reads as words:
    an image's A1111 parameters that carry one name a file the run never loaded."""
    return _EXTRA_NETWORK.findall(text)


def unread_syntax(text: str) -> dict[str, str]:
    """A1111's features beyond emphasis that ``text`` seems to use (a bracket holding ``:NUMBER`` or
    ``|``, the word ``AND``), each with how sdexport reads it instead."""
    return {name: how for name, (found, how) in _UNREAD.items() if found.search(text)}


def has_brackets(texts: Iterable[str | None]) -> bool:
    """A1111's test for writing its "Emphasis" parameter: a round or square bracket in any text."""
    return any(text and ("(" in text or "[" in text) for text in texts)


def written(pieces: Iterable[tuple[str | None, float]]) -> str:
    """Text that ``parse`` reads as ``pieces``: a ``BREAK`` as itself, brackets and backslashes escaped,
    the word "BREAK" split by a lone backslash (A1111's empty run: no break, the same text), each weight other
    than 1 written out exactly (the shortest decimals that read back as the same float, never an
    exponent, which A1111's syntax lacks). An empty run weighing other than 1 is a lone backslash
    in brackets: it parts runs of one weight, which are then tokenized apart."""
    import numpy as np

    out: list[str] = []
    for text, weight in pieces:
        if text is BREAK:
            out.append("BREAK " if out and out[-1].endswith(" ") else " BREAK ")
            continue
        if not text and weight == 1.0:
            continue
        escaped = _BREAK_WORD.sub("BRE\\\\AK", "".join("\\" + c if c in _ESCAPED else c for c in text)) or "\\"
        out.append(escaped if weight == 1.0 else f"({escaped}:{np.format_float_positional(weight, trim='-')})")
    return "".join(out)


CENTRED = 1e-3
"""A prompt's mean under this fraction of its mean magnitude is taken for zero: a text encoder whose
last layer norm has no bias (the tiny presets' random ones) centres every vector, and A1111's
rescale of such a reading divides rounding errors by rounding errors (factors of -0.5 on one
backend, 2 or inf on another). A trained encoder's means are a tenth of their magnitudes or so."""


def weigh(hidden: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """``hidden`` (B, S, C: one chunk, float32 as every engine gives it) with each token's vector
    multiplied by its weight (``multipliers``, B × S); ``original`` then scales each prompt's back to
    its mean before weighing (A1111 weighs each chunk on its own too), where that mean is not zero
    (``CENTRED``). No wait for the device."""
    import torch

    out = hidden * multipliers.to(hidden.device, hidden.dtype)[..., None]
    if emphasis == "original":
        before, after = hidden.mean(dim=(1, 2), keepdim=True), out.mean(dim=(1, 2), keepdim=True)
        size = CENTRED * hidden.abs().mean(dim=(1, 2), keepdim=True)
        meant = (before.abs() > size) & (after.abs() > size)
        out = torch.where(meant, out * (before / torch.where(meant, after, torch.ones_like(after))), out)
    return out


def check_reading(hidden: torch.Tensor, fp16: bool, whose: str = "") -> None:
    """Refuse a weighed reading the U-Net cannot hold: past fp16's range where it computes in fp16
    (it takes float32 and casts: an inf there gives NaN latents after the whole loop), past
    float32's otherwise. One wait for the device, before the loop."""
    import torch

    limit = torch.finfo(torch.float16 if fp16 else torch.float32).max
    if not bool((hidden.abs() <= limit).all()):  # (NaN too)
        raise SdexportError(f"the texts' emphasis weights take {whose}text encoding past {limit:g}, the "
                            f"range of the U-Net's {'fp16' if fp16 else 'float32'}: give smaller weights (A1111's "
                            "are mostly 0.5 to 1.5)")

"""Textual inversion embeddings: new words for the text encoders, added at export.

An embedding file holds one or more vectors that stand for a word the tokenizer did not know (a
style, a character, "EasyNegative"). As diffusers' ``load_textual_inversion`` does, each vector
becomes a token of its own (``WORD``, ``WORD_1``, ``WORD_2``, ... for several), added to the
tokenizer, and the text encoder's token embedding matrix grows by those rows. The exported graph
then holds them and the engine directory's tokenizer knows the tokens; at run time a prompt's
``WORD`` is spelled out as ``WORD WORD_1 ...`` (``runtime.prompt_text``).

Files are read as ``.safetensors`` only (pickled ``.pt`` files can run code), in the layouts that
circulate: one tensor (diffusers' ``{token: vectors}``, A1111's ``emb_params``) for SD's one text
encoder, and ``clip_l`` + ``clip_g`` for SDXL's two (the refiner's one encoder takes ``clip_g``).
The word is the file's name, as A1111 names embeddings (``EasyNegative.safetensors`` is
``EasyNegative``), unless ``FILE:WORD`` gives another.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.errors import ModelLoadError, SdexportError
from sdexport.manifest_schema import WORD
from sdexport.specs import SDXL_REFINER, is_sdxl, text_encoders

if TYPE_CHECKING:
    import torch

FLAG = "--textual-inversion"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
"""The tensors of an SDXL embedding file, by the text encoder that reads them."""
A1111_KEYS = frozenset({"emb_params", "string_to_param.*", "*"})
"""Names of an SD embedding's one tensor that are no word: A1111's, as converters to safetensors
keep them."""


@dataclass(frozen=True)
class Embedding:
    """One ``--textual-inversion FILE[:WORD]``. The file is read once (``_content``): its tensors
    and the sha256 the manifest records are of the same bytes."""

    path: Path
    word: str

    @classmethod
    def parse(cls, text: str) -> Embedding:
        """``FILE`` (the word is the file's name) or ``FILE:WORD``; a ':' that belongs to an
        existing path stays in it."""
        path, sep, word = text.rpartition(":")
        if not sep or not path or Path(text).exists():
            path, word = text, Path(text).stem
        embedding = cls(Path(path), word)
        embedding.check()
        return embedding

    def check(self) -> None:
        """Refuse, in one line, a file that is not a safetensors embedding or a word that is none."""
        if not re.fullmatch(WORD, self.word):
            raise SdexportError(f"{FLAG} {self.path}:{self.word}: the word must be one token of text, no spaces or "
                                "':' (e.g. FILE:my-style)")
        from sdexport.runtime.emphasis import uses_syntax

        if uses_syntax(self.word):  # (else run --emphasis original reads weights or a break, never the word)
            raise SdexportError(f"{FLAG} {self.path}:{self.word}: the word reads as A1111's emphasis syntax (a bracket, "
                                "a backslash or BREAK), which run --emphasis original takes as weights, not as the "
                                "word; choose another (e.g. FILE:my-style)")
        if self.path.is_dir():
            raise SdexportError(f"{FLAG} {self.path}: a directory; pass the embedding file in it")
        if not self.path.is_file():
            raise SdexportError(f"{FLAG} {self.path}: no such file")
        if self.path.suffix.lower() != ".safetensors":
            raise SdexportError(f"{FLAG} {self.path}: embeddings are read as .safetensors (a pickled .pt or .bin "
                                "file can run code; convert it first)")
        self.tensors()

    @functools.cached_property
    def _content(self) -> tuple[str, dict[str, torch.Tensor]]:
        """The file's sha256 and its tensors, read and checked once."""
        import hashlib

        from safetensors.torch import load

        from sdexport.models.outline import safetensors_keys

        try:  # the header first: a whole model given here was read whole (GBs) before being refused
            names = safetensors_keys(self.path)
        except ModelLoadError as exc:
            raise SdexportError(f"{FLAG} {exc}") from None
        _refuse_by_names(self.path, names)
        try:
            data = self.path.read_bytes()
            tensors = load(data)
        except OSError as exc:
            raise SdexportError(f"{FLAG} {self.path}: cannot read it ({exc.strerror})") from None
        except Exception as exc:  # safetensors raises its own error types
            raise SdexportError(f"{FLAG} {self.path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
        for name, tensor in tensors.items():
            if tensor.dim() not in (1, 2) or not tensor.numel() or not tensor.is_floating_point():
                raise SdexportError(f"{FLAG} {self.path}: {name} of shape {list(tensor.shape)} is not a list of "
                                    "embedding vectors")
            if not tensor.float().isfinite().all():  # (the graphs' checks never reach the rows it adds)
                raise SdexportError(f"{FLAG} {self.path}: {name} holds NaN or infinite values")
        return hashlib.sha256(data).hexdigest(), tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        return self._content[1]

    def vectors(self, family: str) -> dict[str, torch.Tensor]:
        """Per text encoder of ``family``, the (count, width) vectors the file gives it."""
        tensors = self.tensors()
        encoders = text_encoders(family)
        if set(tensors) == set(SDXL_KEYS.values()):
            if not is_sdxl(family):
                raise SdexportError(f"{FLAG} {self.path}: an SDXL embedding (clip_l and clip_g), but this model has "
                                    "one text encoder (SD 1.x/2.x); use an embedding made for it")
            chosen = {name: tensors[SDXL_KEYS[name]] for name in encoders}
            counts = {SDXL_KEYS[name]: len(v) if v.dim() == 2 else 1 for name, v in chosen.items()}
            if len(set(counts.values())) > 1:  # (base only) the encoders' token positions would part after the word
                raise SdexportError(f"{FLAG} {self.path}: " + " and ".join(f"{n} vectors for {key}" for key, n
                                                                          in sorted(counts.items()))
                                    + "; an SDXL embedding gives both text encoders as many vectors")
        elif family == SDXL_REFINER and set(tensors) == {SDXL_KEYS["text_encoder_2"]}:  # what it reads, alone
            chosen = {encoders[0]: tensors[SDXL_KEYS["text_encoder_2"]]}
        elif len(tensors) == 1:
            (key,) = tensors
            if is_sdxl(family):
                which = "its one text encoder (clip_g)" if family == SDXL_REFINER else "both text encoders"
                what = (f"only {key}, half of an SDXL embedding" if key in SDXL_KEYS.values()
                        else f"one tensor ({key}), an SD 1.x/2.x embedding")
                raise SdexportError(f"{FLAG} {self.path}: {what}; SDXL's hold clip_l and clip_g, for {which}")
            chosen = {encoders[0]: tensors[key]}
        else:
            raise SdexportError(f"{FLAG} {self.path}: tensors {', '.join(sorted(tensors))}; an embedding holds one "
                                "(SD 1.x/2.x) or clip_l and clip_g (SDXL)")
        return {name: (v if v.dim() == 2 else v[None]).float() for name, v in chosen.items()}

    def named_otherwise(self) -> str | None:
        """A note where the file's one tensor is named like a word other than the one it gets here
        (diffusers' ``{"<cat-toy>": vectors}``, whose key diffusers would take as the word); None
        for A1111's ``emb_params`` and the like, and where the word was given."""
        tensors = self.tensors()
        key = next(iter(tensors)) if len(tensors) == 1 else ""
        if (not re.fullmatch(WORD, key) or key == self.word or key in A1111_KEYS or key in SDXL_KEYS.values()
                or self.word != self.path.stem):
            return None
        return (f"{self.path.name} holds one tensor named {key!r}, the word diffusers would give it; here its word "
                f"is {self.word!r}, the file's name, as A1111 names embeddings ({self.path.name}:{key} gives {key!r})")

    def record(self) -> dict[str, Any]:
        """What a manifest keeps: where the file was, its sha256 and its word."""
        return {"path": str(self.path.resolve()), "sha256": self._content[0], "word": self.word}


def _refuse_by_names(path: Path, names: list[str]) -> None:
    """Refuse, by its header's names before a weight is read, a file that is no embedding: none, a
    LoRA, ControlNet, VAE or whole model, or more tensors than an embedding's one (SD 1.x/2.x) or
    two (SDXL), named a few at most (a model's thousand made a line of 52 KB, an audit)."""
    from sdexport.models.lora import MAX_NAMED
    from sdexport.models.outline import UNET_BLOCKS, weights_kind

    if not names:
        raise SdexportError(f"{FLAG} {path}: holds no tensors")
    kind = weights_kind(names)
    if kind == "lora":
        raise SdexportError(f"{FLAG} {path}: a LoRA, not a textual inversion embedding: give it as --lora "
                            "FILE (export or run)")
    if kind is None and any(name.startswith(UNET_BLOCKS) for name in names):
        raise SdexportError(f"{FLAG} {path}: {len(names)} tensors of a whole model, not a textual inversion "
                            "embedding (give a model as export's MODEL)")
    if kind is not None and kind != "embedding":
        what = {"controlnet": "ControlNet", "vae": "VAE"}.get(kind, kind)
        raise SdexportError(f"{FLAG} {path}: {len(names)} tensors of a {what}, not a textual inversion "
                            "embedding (a tensor of vectors per word)")
    if len(names) > len(SDXL_KEYS):
        listed = ", ".join(sorted(names)[:MAX_NAMED])
        raise SdexportError(f"{FLAG} {path}: {len(names)} tensors ({listed}, ...); an embedding holds one "
                            "(SD 1.x/2.x) or clip_l and clip_g (SDXL)")


def token_name(word: str, index: int) -> str:
    """The token of a word's vector ``index``, as diffusers names them: ``WORD``, ``WORD_1``, ...
    (what the runtime's ``prompt_text`` looks for)."""
    return f"{word}_{index}" if index else word


def token_names(word: str, count: int) -> list[str]:
    """The tokens of a word's ``count`` vectors."""
    return [token_name(word, i) for i in range(count)]


Rows = dict[str, list[tuple[int, "torch.Tensor"]]]
"""Per text encoder, the token ids added and the vector each stands for."""


def check_widths(embedding: Embedding, family: str, widths: Mapping[str, int]) -> None:
    """Vectors as wide as each text encoder's (``widths``, by encoder) embeddings."""
    for encoder, vectors in embedding.vectors(family).items():
        if encoder in widths and vectors.shape[1] != widths[encoder]:
            raise SdexportError(f"{FLAG} {embedding.path}: vectors of width {vectors.shape[1]}, but {encoder} reads "
                                f"{widths[encoder]} (an embedding made for another model)")


def add_tokens(model: Any, embeddings: list[Embedding]) -> Rows:
    """Add each embedding's tokens to ``model``'s tokenizers, in order, and return the rows the text
    encoders' token embedding matrices gain (``grow``; the export checked their widths). Refuses a
    token the tokenizer knows already, as diffusers does, in any case: the tokenizer matches added
    words whatever their case (an earlier embedding's ``Caps_1`` made a later ``caps_1``
    unreachable); and more vectors than a prompt's chunk holds (its first 75 were read, the rest
    dropped unsaid). (A whole word, ``anime``, is CLIP's ``anime</w>``: naming an embedding after
    one takes its place in prompts, as A1111 and diffusers let it.)"""
    rows: Rows = {}
    for embedding in embeddings:
        for encoder, vectors in embedding.vectors(model.family).items():
            tokenizer = model.tokenizers[encoder.replace("text_encoder", "tokenizer")]
            names = token_names(embedding.word, vectors.shape[0])
            room = tokenizer.model_max_length - 2  # (a prompt's chunk, without its start and end tokens)
            if len(names) > room:
                raise SdexportError(f"{FLAG} {embedding.path}: {len(names)} vectors, but a prompt's chunk holds "
                                    f"{room} tokens and a word's vectors are read in one chunk; use an embedding of "
                                    f"at most {room} vectors")
            vocab = {token.lower() for token in tokenizer.get_vocab()}  # (added words with capitals too)
            known = [name for name in names if name.lower() in vocab]
            if known:
                raise SdexportError(f"{FLAG} {embedding.path}: {known[0]!r} is a word the tokenizer knows already; "
                                    f"give the embedding another ({embedding.path.name}:ANOTHER)")
            tokenizer.add_tokens(names)
            ids = tokenizer.convert_tokens_to_ids(names)
            rows.setdefault(encoder, []).extend(zip(ids, vectors))
    return rows


def grow(rows: Rows) -> Callable[[str, Any], None]:
    """A hook that writes ``rows`` into a text encoder as its weights are built (``LoadedModel.on_materialize``)."""
    def write(name: str, module: Any) -> None:
        added = rows.get(name)
        if not added:
            return
        import torch

        rows_now = module.get_input_embeddings().num_embeddings  # (a table wider than the tokenizer stays so)
        module.resize_token_embeddings(max(rows_now, max(i for i, _ in added) + 1), mean_resizing=False)
        with torch.no_grad():
            table = module.get_input_embeddings().weight
            for token_id, vector in added:
                table[token_id] = vector.to(dtype=table.dtype, device=table.device)

    return write


def apply(model: Any, embeddings: list[Embedding]) -> None:
    """Add ``embeddings`` to ``model``: its tokenizers now, each text encoder's rows now if its
    weights are built, else when they are (an export's lazy parts)."""
    if not embeddings:
        return
    from sdexport.models.loader import is_skeleton

    write = grow(add_tokens(model, embeddings))
    for name, module in model.modules.items():
        if not is_skeleton(module):
            write(name, module)
    model.on_materialize.append(write)

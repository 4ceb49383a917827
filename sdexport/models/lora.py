"""LoRA files as per-weight updates: read with diffusers, applied by sdexport.

diffusers reads the file (``lora_state_dict`` knows the diffusers/PEFT, older diffusers and
kohya/A1111 layouts and converts them) and its state-dict converters give every update PEFT's
names (``<module>.lora_A/lora_B``). From there one rule serves both ways of using a LoRA:

    W' = W + scale * (alpha / rank) * B @ A          (for a convolution: A then B, as PEFT composes them)

- at export (``sdexport export --lora``) the updates are added to the PyTorch weights before the
  graphs are traced, as ``fuse_lora`` would;
- at run time (``sdexport run --lora``) the same updates are added to the exported weights where
  the engines are made (ONNX Runtime: initializers replaced at session creation; the Torch backend:
  its modules), so a LoRA is switched without re-exporting.

Applying the update ourselves, rather than through diffusers' ``load_lora_weights`` + ``fuse_lora``,
keeps the two ways identical, needs no PEFT layers in the modules, and works for the text encoders
too (diffusers loads those through transformers' PEFT integration, which the pinned transformers
refuses with every PEFT release on PyPI). The tests check the result against ``fuse_lora``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.errors import SdexportError, looks_like_a_url, one_line
from sdexport.specs import LORA_COMPONENTS, is_sdxl

if TYPE_CHECKING:
    import torch


MAX_NAMED = 3
"""Names an error lists at most (mismatches, tensors); the count says how many there were."""
UPSTREAM_LIMIT = 400
"""Characters of an upstream refusal kept (diffusers lists every key it could not rename:
thousands of characters for a whole model's file)."""


@dataclass(frozen=True)
class LoraFile:
    """One ``--lora FILE[:SCALE]``. Made in Python, its path may be text; a scale that is not a number
    the engines can take (finite in float32) is refused here, before anything loads, as the CLI
    refuses it (a NaN would show only as NaN latents after the whole run)."""

    path: Path
    scale: float = 1.0

    if TYPE_CHECKING:  # (the field holds a Path; a caller may give text)
        def __init__(self, path: Path | str, scale: float = 1.0) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if problem := _scale_problem(self.scale):
            raise SdexportError(f"LoRA {self.path}: scale {self.scale!r} {problem}")
        object.__setattr__(self, "scale", float(self.scale))  # (a numpy number too: the manifest is JSON)

    @classmethod
    def parse(cls, text: str, flag: str = "--lora") -> LoraFile:
        import re

        if looks_like_a_url(text) and not Path(text).exists():
            raise SdexportError(f"{flag} {text}: a URL? sdexport reads local files: download it first")
        path, sep, tail = text.rpartition(":")
        scale = 1.0
        if sep and path and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf)", tail.strip(), re.I):
            scale = float(tail)
        elif sep and path and not tail and not Path(text).exists():
            raise SdexportError(f"{flag} {text}: a ':' but no scale after it (e.g. file.safetensors:0.8)")
        elif sep and path and Path(path).is_file() and not Path(text).exists():  # FILE:what is not a number
            raise SdexportError(f"{flag} {text}: {tail!r} after ':' is not a scale (a number, e.g. "
                                f"{Path(path).name}:0.8)")
        else:
            path = text  # no scale, or a ':' that belongs to the path
        if problem := _scale_problem(scale):
            raise SdexportError(f"{flag} {text}: the scale after ':' {problem}")
        lora = cls(Path(path), scale)
        lora.check(flag)
        return lora

    def check(self, flag: str = "--lora") -> None:
        """Refuse, in one line, a file that is not there or not a safetensors LoRA."""
        if self.path.is_dir():  # a diffusers LoRA folder (pytorch_lora_weights.safetensors inside)
            inside = sorted(p.name for p in self.path.glob("*") if p.suffix.lower() == ".safetensors")
            raise SdexportError(f"{flag} {self.path}: a directory; pass the LoRA file in it"
                                + (f" ({self.path / inside[0]})" if len(inside) == 1 else ""))
        if not self.path.is_file():
            raise SdexportError(f"{flag} {self.path}: no such file")
        if self.path.suffix.lower() != ".safetensors":
            raise SdexportError(f"{flag} {self.path}: LoRA files are read as .safetensors (convert .ckpt/.pt files first)")
        from sdexport.errors import ModelLoadError
        from sdexport.models.outline import PICKLED_SAFETENSORS, safetensors_keys

        try:  # (its header: an empty file, a Git LFS pointer or a web page said as such, not in safetensors' words)
            empty = not safetensors_keys(self.path)
        except ModelLoadError as exc:  # (a pickle is not to be renamed .ckpt here: LoRA files are read as .safetensors)
            said = str(exc).replace(PICKLED_SAFETENSORS, "a torch checkpoint by its content: convert it to .safetensors")
            raise SdexportError(f"{flag} {said}") from None
        if empty:
            raise SdexportError(f"{flag} {self.path}: holds no tensors")

    def record(self) -> dict[str, Any]:
        """What a manifest keeps: where it was, its sha256, its scale."""
        from sdexport.manifest import sha256_file

        return {"path": str(self.path.resolve()), "sha256": sha256_file(self.path), "scale": self.scale}


def _scale_problem(scale: object) -> str | None:
    """Why ``scale`` is not a LoRA scale (None: it is one): a real number (numpy's too, not a bool)
    that float32 holds."""
    import numbers

    from sdexport.runtime.request import finite32

    try:
        if not isinstance(scale, bool) and isinstance(scale, numbers.Real) and finite32(float(scale)):
            return None
    except OverflowError:  # an int beyond any float
        pass
    return "is not a finite number within float32's range, as the engines read it (e.g. 0.8)"


@dataclass
class LoraUpdate:
    """One weight's low-rank update: ``delta() = scale * B @ A`` in the weight's shape."""

    component: str
    module: str
    """The module's name inside the component (diffusers/transformers names)."""
    down: torch.Tensor
    """A: (rank, in) or (rank, in, kh, kw)."""
    up: torch.Tensor
    """B: (out, rank) or (out, rank, 1, 1)."""
    scale: float
    """The user's scale times alpha / rank."""

    @property
    def parameter(self) -> str:
        return f"{self.module}.weight"

    def delta(self) -> torch.Tensor:
        import torch

        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return self.scale * (up @ down)
        if down.shape[-2:] == (1, 1):
            return self.scale * (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        # A kxk convolution then a 1x1 one, composed into one kxk kernel (PEFT's rule).
        return self.scale * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


@contextmanager
def _lower_case_name(path: Path) -> Iterator[Path]:
    """``path``, or a link to it named ``*.safetensors`` where its suffix is another case: diffusers
    picks its reader by ``weight_name``'s suffix as written, and took ``.SAFETENSORS`` for a pickle."""
    if path.suffix == ".safetensors":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sdexport-lora-") as folder:
        link = Path(folder) / f"{path.stem}.safetensors"
        link.symlink_to(path.resolve())
        yield link


def read_updates(lora: LoraFile, family: str, unet_config: Any = None) -> list[LoraUpdate]:
    """The file's updates under PEFT's module names, per component (not yet matched to a model).

    ``unet_config`` (attribute access: ``layers_per_block``) lets diffusers map the SDXL kohya files
    named after the original blocks (``input_blocks_4_1``) to its own. Each update's alpha comes, in
    this order, from the file's PEFT metadata (``lora_alpha``, ``alpha_pattern``, as diffusers saves
    them), the file's per-module alphas (kohya's, or ``<module>.alpha`` beside diffusers or PEFT
    names, which diffusers itself refuses), or the rank (a scale of 1, the diffusers/PEFT
    convention). An alpha of 0 zeroes the update, as A1111, ComfyUI and diffusers apply it.

    Every tensor the file holds becomes part of an update or is refused: one the converters leave
    in no LoRA layout would otherwise be dropped without a word."""
    import diffusers

    downs = _refuse_variants(lora)
    loader: Any = diffusers.StableDiffusionXLPipeline if is_sdxl(family) else diffusers.StableDiffusionPipeline
    try:
        with _lower_case_name(lora.path) as path:
            # its folder and name, not the path: diffusers 0.39 (the floor) refuses a file path
            # while HF_HUB_OFFLINE is set (sdexport sets it) unless weight_name is given
            state, alphas, metadata = loader.lora_state_dict(str(path.parent), weight_name=path.name,
                                                             unet_config=unet_config, return_lora_metadata=True)
    except Exception as exc:  # diffusers raises ValueError/KeyError/... for layouts it does not know
        raise SdexportError(f"--lora {lora.path}: diffusers cannot read it as a LoRA ({one_line(exc, UPSTREAM_LIMIT)})") from None
    alphas, metadata = alphas or {}, metadata or {}
    # (LyCORIS's kinds were refused by their raw keys: _refuse_variants)
    if any("lora_magnitude_vector" in k or k.endswith(".bias") and "lora_B" in k for k in state) \
            or _metadata(metadata, "unet").get("use_dora"):
        raise SdexportError(f"--lora {lora.path}: a DoRA or biased LoRA, which sdexport does not apply "
                            "(plain low-rank LoRAs only)")
    updates: list[LoraUpdate] = []
    unknown = [k for k in state if k.split(".", 1)[0] not in LORA_COMPONENTS]
    from sdexport.models.outline import weights_kind

    if unknown and weights_kind(list(state)) == "embedding":
        raise SdexportError(f"--lora {lora.path}: a textual inversion embedding, not a LoRA: give it to export as "
                            "--textual-inversion FILE")
    if unknown:
        raise SdexportError(f"--lora {lora.path}: {len(unknown)} tensors for no part of an SD pipeline, e.g. "
                            f"{', '.join(unknown[:MAX_NAMED])}")
    for prefix in LORA_COMPONENTS:
        part = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
        if not part:
            continue
        # diffusers/PEFT names with kohya's alpha beside them: each "<module>.alpha" is the module's
        alphas = {**alphas, **{f"{prefix}.{k}": _alpha(lora, f"{prefix}.{k}", part.pop(k))
                               for k in [k for k in part if k.endswith(".alpha")]}}
        try:
            peft = _to_peft(prefix, part)
            module_alphas = _alphas_by_module(prefix, alphas)
        except (ValueError, KeyError) as exc:
            raise SdexportError(f"--lora {lora.path}: diffusers cannot convert its {prefix} part "
                                f"({one_line(exc, UPSTREAM_LIMIT)})") from None
        _refuse_leftovers(lora, prefix, peft)
        config = _metadata(metadata, prefix)
        used: set[str] = set()
        for key, down in peft.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            up = peft[f"{module}.lora_B.weight"]
            if down.dim() < 2 or up.dim() < 2:  # (a 0-d lora_A was an IndexError traceback, an audit)
                raise SdexportError(f"--lora {lora.path}: {prefix}.{module}'s lora_A and lora_B are not matrices "
                                    f"(shapes {list(down.shape)} and {list(up.shape)}): a damaged file")
            rank = down.shape[0]
            known = resolve_name(module_alphas, module)
            alpha = module_alphas[known] if known is not None else None
            if known is not None:
                used.add(known)
            if config:  # PEFT's LoraConfig, as diffusers saved it: it decides, as it would for PEFT
                try:
                    rank = _pattern(module, config.get("rank_pattern"), config.get("r", rank))
                    alpha = _pattern(module, config.get("alpha_pattern"), config.get("lora_alpha", rank))
                except ValueError as exc:
                    raise SdexportError(f"--lora {lora.path}: {exc}") from None
            alpha = rank if alpha is None else alpha
            if not (_number(rank) and rank > 0 and _number(alpha)):  # (a rank of 0 divided by zero)
                raise SdexportError(f"--lora {lora.path}: {prefix}.{module} has rank {rank!r} and alpha {alpha!r}; "
                                    "a LoRA's rank is a positive number, its alpha a number")
            if rank != down.shape[0]:  # (diffusers' load fails on the shapes; read, alpha / r would scale it wrong)
                raise SdexportError(f"--lora {lora.path}: {prefix}.{module} has rank {down.shape[0]}, and the file's "
                                    f"LoRA config (metadata) says {rank!r}: a damaged or hand-edited file, which "
                                    "diffusers refuses too")
            scaling = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
            # (checked here, as float32: torch has no isfinite for float8 files; NaN images came after the whole run)
            if not (math.isfinite(scaling) and bool(down.float().isfinite().all()) and bool(up.float().isfinite().all())):
                raise SdexportError(f"--lora {lora.path}: {prefix}.{module} holds NaN or infinite values (a damaged "
                                    "file, or a training that diverged)")
            updates.append(LoraUpdate(prefix, module, down, up, lora.scale * scaling))
        unread = list(module_alphas) if config else [name for name in module_alphas if name not in used]
        _refuse_unused_alphas(lora, prefix, unread, bool(config))
    if not updates:
        raise SdexportError(f"--lora {lora.path}: no LoRA updates for a U-Net or text encoder in it")
    if len(updates) < downs:  # (diffusers' converters collect into dicts: a second name overwrites the first)
        given = f"{len(updates)} update{'s' if len(updates) != 1 else ''}"
        raise SdexportError(f"--lora {lora.path}: its {downs} LoRA down matrices give only {given} once diffusers "
                            "has read it: some name one layer twice, and diffusers keeps one of them without a word. "
                            "Apply the files it was merged from, each its own --lora")
    return updates


def _refuse_unused_alphas(lora: LoraFile, prefix: str, unused: list[str], configured: bool) -> None:
    """Refuse per-module alphas of a part that no update reads (``<module>.alpha`` of a module the
    file updates nowhere: a misspelt name, whose update then took the strength alpha = rank), as
    kohya's are refused by diffusers' converter. Where PEFT metadata gives the alphas (``configured``:
    it decides, as for PEFT), every per-module alpha goes unread: said in a note."""
    if not unused:
        return
    if configured:
        from rich.markup import escape

        from sdexport.console import console

        console.print(f"[yellow]note:[/] --lora {escape(str(lora.path))}: its PEFT metadata gives the {prefix} "
                      f"part's alphas (lora_alpha), as diffusers reads it; its {len(unused)} per-module alpha "
                      f"tensors (e.g. {escape(f'{prefix}.{unused[0]}.alpha')}) are not read")
        return
    raise SdexportError(f"--lora {lora.path}: {len(unused)} alphas for modules it has no update for (e.g. "
                        f"{prefix}.{unused[0]}.alpha): a misspelt module name would leave that update at another "
                        "strength")


def _refuse_leftovers(lora: LoraFile, prefix: str, peft: dict[str, Any]) -> None:
    """Refuse, in one line, the tensors of a converted part that are not a ``lora_A``/``lora_B`` pair
    (applying the rest would change the model less than the file says)."""
    odd = [key for key in peft if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise SdexportError(f"--lora {lora.path}: {len(odd)} tensors of its {prefix} part are in no LoRA layout "
                            f"sdexport reads (e.g. {', '.join(f'{prefix}.{key}' for key in odd[:MAX_NAMED])})")
    for module in dict.fromkeys(key.rsplit(".lora_", 1)[0] for key in peft):
        halves = [half for half in ("A", "B") if f"{module}.lora_{half}.weight" not in peft]
        if halves:
            have = "B" if halves == ["A"] else "A"
            raise SdexportError(f"--lora {lora.path}: {prefix}.{module} has lora_{have} but no lora_{halves[0]}")


LYCORIS_KINDS = {
    "dora_scale": "a DoRA (dora_scale)",
    "hada_w1_a": "a LyCORIS LoHa (hada_w1_a, ...)",
    "lokr_w1": "a LyCORIS LoKr (lokr_w1, ...)",
    "lokr_w1_a": "a LyCORIS LoKr (lokr_w1_a, ...)",
    "lora_mid.weight": "a LyCORIS LoCon with Tucker decomposition (lora_mid)",
    "diff": "a LyCORIS full-weight difference (diff)",
    "on_input": "a LyCORIS (IA)^3 (on_input)",
    "w_norm": "a LyCORIS norm-layer update (w_norm)",
    "oft_blocks": "an OFT (oft_blocks)",
    "oft_diag": "a LyCORIS OFT (oft_diag)",
    "a1.weight": "a LyCORIS GLoRA (a1.weight, ...)",
}
"""The tensor names (their last parts) of the variants sdexport does not apply, with what to call
them: the raw keys tell, before diffusers either drops them (DoRA's ``dora_scale``, with a log
line) or refuses them in a line listing every key it could not rename."""


ORIGINAL_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
DIFFUSERS_BLOCKS = ("down_blocks", "mid_block", "up_blocks")

LORA_DOWNS = ("lora_down.weight", ".lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight")
"""How the layouts diffusers reads name a LoRA's down (A) matrix: kohya's, PEFT's, and diffusers'
older ones (``.lora.down``, ``to_q_lora.down``, ``lora_linear_layer.down``). One per update: a
file that gives fewer updates than it has of them had two names for one layer (``read_updates``)."""


def _refuse_variants(lora: LoraFile) -> int:
    """Refuse, in one line that names it, a file holding a variant of LoRA (``LYCORIS_KINDS``), or
    one whose U-Net keys name blocks in both layouts (``ORIGINAL_BLOCKS``, ``DIFFUSERS_BLOCKS``: a
    merge of two files), of which diffusers' converter drops the original ones without a word, or
    a text encoder layer both as ``lora_te_`` and ``lora_te1_`` (the same). Returns how many
    down matrices the file holds (``LORA_DOWNS``)."""
    from safetensors import safe_open

    with safe_open(str(lora.path), "pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118 - a safetensors handle
    kinds = dict.fromkeys(kind for key in keys for tail, kind in LYCORIS_KINDS.items()
                          if key == tail or key.endswith(f".{tail}"))
    if kinds:
        raise SdexportError(f"--lora {lora.path}: {' and '.join(kinds)}, which sdexport does not apply "
                            "(plain low-rank LoRAs only, LoCon's convolutions included)")
    bundled = sorted({key.split(".")[1] for key in keys if key.startswith("bundle_emb.") and key.count(".") > 1})
    if bundled:  # (diffusers' refusal called the file's every key foreign)
        raise SdexportError(f"--lora {lora.path}: it bundles textual inversion embeddings ({', '.join(bundled[:MAX_NAMED])}: "
                            "bundle_emb.*, as A1111 saves them), which sdexport does not read from a LoRA file: give "
                            "each with --textual-inversion as a file of its own, and the LoRA without them")
    original = next((k for k in keys if any(block in k for block in ORIGINAL_BLOCKS)), None)
    renamed = next((k for k in keys if not any(block in k for block in ORIGINAL_BLOCKS)
                    and any(block in k for block in DIFFUSERS_BLOCKS)), None)
    if original is not None and renamed is not None:
        raise SdexportError(f"--lora {lora.path}: its U-Net keys name blocks both as the original layout does "
                            f"({original}) and as diffusers does ({renamed}), as a merge of two files can; diffusers "
                            "would drop the first kind without a word. Apply the files it was merged from, each "
                            "its own --lora")
    downs = [key for key in keys if key.endswith(LORA_DOWNS)]
    seen: set[str] = set()
    for key in (k for k in downs if k.startswith(("lora_te_", "lora_te1_"))):
        same = key.replace("lora_te1_", "lora_te_", 1)
        if same in seen:
            raise SdexportError(f"--lora {lora.path}: it names one text encoder layer both as lora_te_ and as "
                                f"lora_te1_ ({same.removeprefix('lora_te_').split('.')[0]}), as a merge of an SD and "
                                "an SDXL file can; diffusers would keep one of the two without a word. Apply the "
                                "files it was merged from, each its own --lora")
        seen.add(same)
    return len(downs)


def _metadata(metadata: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}


def _pattern(module: str, patterns: dict[str, Any] | None, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: a key matches a module name that ends with it.
    A key that is no regular expression: ValueError."""
    import re

    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise ValueError(f"its metadata's pattern {key!r} is not a regular expression ({exc})") from None
    return default


def _number(value: Any) -> bool:
    """An int or float (not a bool, not text): what a rank or an alpha must be (NaN is refused with
    the weights' NaN, as the scale it makes)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _alpha(lora: LoraFile, key: str, tensor: Any) -> float:
    """A kohya ``<module>.alpha``: one number."""
    if tensor.numel() != 1:
        raise SdexportError(f"--lora {lora.path}: {key} holds {tensor.numel()} values where an alpha is one number")
    return float(tensor.float())


def _to_peft(prefix: str, part: dict[str, Any]) -> dict[str, Any]:
    """One component's keys under PEFT's names, from any layout ``lora_state_dict`` returns: PEFT's
    already, diffusers' (``lora_linear_layer``), or its older attention-processor one (``to_q_lora``,
    which kohya files are converted to)."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if prefix == "unet":
        return dict(convert_unet_state_dict_to_peft(part))
    # Each key by its own layout, not the part's guessed one: kohya's text encoder files come out of
    # lora_state_dict with attention in the older names and the MLPs in the newer (a guess by the
    # part dropped one of them). Either conversion passes the keys it has no rule for through.
    part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
    return dict(convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS))


def _alphas_by_module(prefix: str, alphas: dict[str, float]) -> dict[str, float]:
    """kohya's per-module alphas under the same module names: each alpha's key is converted as the
    down weight it belongs to would be."""
    found: dict[str, float] = {}
    for key, value in alphas.items():
        if not key.startswith(f"{prefix}."):
            continue
        weight_key = key.removeprefix(f"{prefix}.").removesuffix(".alpha")
        if "lora" not in weight_key:  # diffusers names the module itself: "<module>.alpha"
            found[weight_key] = float(value)
            continue
        if not weight_key.endswith(".weight"):
            weight_key += ".weight"
        for name in _to_peft(prefix, {weight_key: 0}):
            if ".lora_A." in name:
                found[name.split(".lora_A.")[0]] = float(value)
    return found


def torch_layers(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per component, its linear and convolution layers' weight shapes: what LoRA can update."""
    import torch

    return {
        component: {name: tuple(layer.weight.shape) for name, layer in root.named_modules()
                    if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)}
        for component, root in modules.items() if component in LORA_COMPONENTS
    }


def resolve_name(layers: Mapping[str, Any], name: str) -> str | None:
    """``name`` as the model calls it: CLIP text encoders lost their ``text_model.`` level in
    transformers 5, while LoRA files made with transformers 4 still name it."""
    for candidate in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        if candidate in layers:
            return candidate
    return None


def match_updates(updates: list[LoraUpdate], layers: dict[str, dict[str, tuple[int, ...]]], label: str,
                  missing: str = "") -> list[LoraUpdate]:
    """The updates with module names as the model has them (``layers``: per component, each linear
    or convolution layer's weight shape). A LoRA that does not fit the model (a layer it lacks,
    another shape) is refused, naming the first mismatches; ``missing``, said once after them where
    a layer was not found beside others of its module (so the model may have it), is what else
    leaves a layer out of ``layers``: said for a layer of a block the model lacks altogether (an
    SDXL LoRA given to SD), it sent the user to an export that failed alike (an audit)."""
    problems: list[str] = []
    unfound = False
    matched: list[LoraUpdate] = []
    for update in updates:
        known = layers.get(update.component)
        where = f"{update.component}.{update.module}"
        if known is None:
            problems.append(f"{where} (the model has no {update.component} LoRA can change)")
            continue
        name = resolve_name(known, update.module)
        if name is None:
            problems.append(f"{where} (no such linear or convolution layer)")
            name = update.module  # (to_out.0: the layer is to_out, held by attn1; downsamplers.0.conv's module is
            while name.rpartition(".")[2].isdigit():  # the down block: numbered places are no module of their own)
                name = name.rpartition(".")[0]
            parent = name.rpartition(".")[0]
            while parent.rpartition(".")[2].isdigit():
                parent = parent.rpartition(".")[0]
            unfound = unfound or not parent or any(  # (a top-level layer, conv_in: the model may have it)
                layer.startswith(f"{candidate}.") for candidate in (parent, parent.removeprefix("text_model."),
                                                                     f"text_model.{parent}") for layer in known)
            continue
        try:
            shape: tuple[int, ...] | None = tuple(update.delta().shape)
        except RuntimeError:
            shape = None
        if shape is not None and shape != known[name] and _as_pointwise(update, known[name]):
            shape = known[name]
        if shape != known[name]:
            problems.append(f"{where} (LoRA makes {list(shape) if shape else 'mismatched A/B'}, the layer has "
                            f"{list(known[name])})")
            continue
        update.module = name
        matched.append(update)
    if problems:
        raise SdexportError(f"{label} does not fit this model: {len(problems)} mismatches, first "
                            + "; ".join(problems[:MAX_NAMED]) + (f" ({missing})" if missing and unfound else ""))
    return matched


def _as_pointwise(update: LoraUpdate, layer: tuple[int, ...]) -> bool:
    """Reshape ``update`` in place where it and its layer differ only as a linear layer and a 1x1
    convolution do (the same product): SD 1.x's transformer projections are 1x1 convolutions and
    SD 2.x's/SDXL's linear layers, and LoRAs trained or converted for one reach the other (A1111
    and ComfyUI reshape the update to the weight's shape). True when it did."""
    down, up = update.down, update.up
    if len(layer) == 4 and layer[2:] == (1, 1) and down.dim() == up.dim() == 2:
        update.down, update.up = down[:, :, None, None], up[:, :, None, None]
    elif len(layer) == 2 and down.dim() == up.dim() == 4 and down.shape[2:] == up.shape[2:] == (1, 1):
        update.down, update.up = down.flatten(1), up.flatten(1)
    else:
        return False
    if tuple(update.delta().shape) == layer:
        return True
    update.down, update.up = down, up
    return False


def fuse_into(modules: dict[str, torch.nn.Module], loras: list[LoraFile], family: str) -> None:
    """Add every LoRA's updates to the PyTorch weights, in place (what export does with --lora)."""
    add_updates(modules, match_all(modules, loras, family))


def match_all(modules: dict[str, torch.nn.Module], loras: list[LoraFile], family: str,
              exported: set[str] | None = None) -> list[LoraUpdate]:
    """Every LoRA's updates, matched to the modules' layers in order (refusing any that does not
    fit). Needs only names and shapes: the modules may be weightless skeletons (an export adds
    each part's updates when it builds that part). ``exported``: the components an export writes;
    a LoRA that changes none of them is refused (it would be recorded as fused and change nothing)."""
    layers = torch_layers(modules)
    unet_config = getattr(modules.get("unet"), "config", None)
    updates: list[LoraUpdate] = []
    for lora in loras:
        matched = match_updates(read_updates(lora, family, unet_config), layers, f"--lora {lora.path}")
        changed = sorted({u.component for u in matched})
        if exported is not None and changed and not set(changed) & exported:
            raise SdexportError(f"--lora {lora.path}: it changes only {' and '.join(changed)}, which this export "
                                 "leaves out (--components); export that too, or leave the LoRA out")
        if exported is not None and (left := [c for c in changed if c not in exported]):
            from rich.markup import escape

            from sdexport.console import console

            one = len(left) == 1
            console.print(f"[yellow]note:[/] --lora {escape(str(lora.path))}: its {' and '.join(left)} "
                          f"{'part is' if one else 'parts are'} not fused: this export leaves {'it' if one else 'them'} "
                          "out (--components); "
                          f"{' and '.join(c for c in changed if c in exported)} get{'s' if len(changed) - len(left) == 1 else ''} "
                          "the rest")
        updates += matched
    return updates


def add_updates(modules: dict[str, torch.nn.Module], updates: list[LoraUpdate]) -> None:
    """Add matched updates to the modules' weights, in place (export's fusing, the Torch backend's
    run-time LoRA); a weight the updates make infinite is refused before it is written."""
    import torch

    with torch.no_grad():
        for update in updates:
            weight = modules[update.component].get_submodule(update.module).weight
            assert isinstance(weight, torch.Tensor)  # a linear or convolution layer's (match_updates)
            added = weight + update.delta().to(device=weight.device, dtype=weight.dtype)
            if not bool(torch.isfinite(added).all()):
                raise not_finite(update.component, update.module, str(weight.dtype).removeprefix("torch."))
            weight.copy_(added)


def not_finite(component: str, module: str, dtype: str) -> SdexportError:
    """The refusal of a LoRA whose update leaves a weight infinite or NaN in its engine's precision:
    each factor and the scale were checked finite, but their product (a scale of 1e38, factors of
    1e30) was not, and showed only as NaN latents after the whole loop (an audit)."""
    return SdexportError(f"--lora: {component}.{module}'s weight with the LoRA update added is not finite in "
                         f"{dtype} (the scale, or the LoRA's weights, too large for it); lower the scale")

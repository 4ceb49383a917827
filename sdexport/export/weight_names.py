"""Which ONNX initializer holds which PyTorch weight, for the weights a LoRA can change.

The exporter names convolution weights after their modules, but a linear layer's weight reaches the
graph transposed for MatMul and renamed (``onnx::MatMul_1639``). Run-time LoRA (``sdexport run
--lora``) must find those tensors again, so the export records the correspondence in
``<component>/weights.json``, found by content on the fp32 graph just traced: each linear and
convolution weight is looked for as it is, and transposed. A weight found under two names (equal
contents) is left out rather than guessed; run-time LoRA then refuses to change it. Two layers
whose equal weights the exporter stored once both name that one initializer; run-time LoRA refuses
to change either (``lora_runtime.refuse_shared_weights``): it would change both. A weight is also
left out where the graph reads its initializer otherwise than as that one layer's weight
(``layer_reads``: an embedding table equal to it, or the layer called twice, would change with it)
or also holds it transposed (a layer called on 2-D and 3-D inputs: a change would miss one call).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import torch

WEIGHTS_FILE = "weights.json"


def weight_map_file(graph: str) -> str:
    """The manifest's key of the weight map beside the graph at ``graph`` (a manifest's relative path)."""
    return f"{Path(graph).parent.as_posix()}/{WEIGHTS_FILE}"


def _key(array: Any) -> tuple[tuple[int, ...], str, str]:
    return tuple(array.shape), str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()


def layer_reads(model: onnx.ModelProto) -> dict[str, list[str]]:
    """How the nodes of ``model`` read each tensor, one entry per reading: ``"linear"`` (a Gemm's B
    with ``transB``: a linear weight as PyTorch holds it), ``"linear.T"`` (a MatMul's B, or a Gemm's
    without ``transB``: transposed), ``"conv"`` (a Conv's weight), else the operator's name."""
    reads: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        attributes = {a.name: a.i for a in node.attribute if a.type == a.INT}
        for index, name in enumerate(node.input):
            kind = node.op_type
            if index == 1 and node.op_type == "MatMul":
                kind = "linear.T"
            elif index == 1 and node.op_type == "Gemm" and not attributes.get("transA"):
                kind = "linear" if attributes.get("transB") else "linear.T"
            elif index == 1 and node.op_type == "Conv":
                kind = "conv"
            if name:
                reads[name].append(kind)
    return reads


def weight_map(module: torch.nn.Module, initializers: Iterable[tuple[str, Any]],
               reads: Mapping[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """``{"<module>.weight": {"initializer": name, "transposed": bool, "shape": [...]}}`` (the
    PyTorch shape, so run-time LoRA matches files without reading the graph) for every linear and
    convolution weight of ``module`` found among ``initializers`` (name and values of each float
    initializer of the fp32 graph, read one at a time: ``WeightStore.arrays``).

    ``reads``: that graph's ``layer_reads``. A weight is then found only in an initializer that
    every reading takes as such a layer's weight, read once per layer naming it: equal contents
    alone would hand a LoRA an embedding table stored as one tensor with the layer's weight (torch
    stores equal parameters once), or a layer the graph calls twice, or one whose weight it holds
    both as it is and transposed (called on 2-D and on 3-D inputs): a change to one copy would miss
    the other call."""
    import numpy as np
    import torch

    found: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for name, array in initializers:
        if array.ndim in (2, 4):
            found[_key(array)].append(name)
    names: dict[str, dict[str, Any]] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            continue
        weight = layer.weight.detach().to(torch.float32).cpu().numpy()
        candidates = [(False, weight)] + ([(True, np.ascontiguousarray(weight.T))] if weight.ndim == 2 else [])
        matches = [(transposed, found.get(_key(value), [])) for transposed, value in candidates]  # (hashed once)
        if reads is not None and len({m for _, match in matches for m in match}) > 1:
            continue  # as itself and transposed (a layer called on 2-D and 3-D inputs): one change would miss a call
        for transposed, match in matches:
            kind = "conv" if isinstance(layer, torch.nn.Conv2d) else "linear.T" if transposed else "linear"
            if len(match) == 1 and (reads is None or set(reads.get(match[0], [])) == {kind}):
                names[f"{name}.weight"] = {"initializer": match[0], "transposed": transposed,
                                           "shape": list(weight.shape)}
                break
    if reads is not None:  # as many readings as layers naming it: none of them is read twice
        holders = Counter(where["initializer"] for where in names.values())
        names = {p: where for p, where in names.items() if len(reads[where["initializer"]]) == holders[where["initializer"]]}
    return names


def write_weight_map(module: torch.nn.Module, initializers: Iterable[tuple[str, Any]], folder: Path,
                     reads: Mapping[str, list[str]] | None = None) -> Path:
    path = folder / WEIGHTS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(weight_map(module, initializers, reads), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_weight_map(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The weight map ``write_weight_map`` wrote (None without one); a damaged one in one line."""
    from sdexport.errors import EngineDirError

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineDirError(f"{path}: damaged, not valid JSON ({exc}); export again") from None
    if not isinstance(names, dict) or not all(
            isinstance(where, dict) and isinstance(where.get("initializer"), str)
            and isinstance(where.get("transposed"), bool) for where in names.values()):
        raise EngineDirError(f"{path}: not a weight map sdexport wrote (each weight's initializer and transposed); "
                             "export again")
    return names

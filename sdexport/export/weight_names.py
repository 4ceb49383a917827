"""Which ONNX initializer holds which PyTorch weight, for the weights a LoRA can change.

The exporter names convolution weights after their modules, but a linear layer's weight reaches the
graph transposed for MatMul and renamed (``onnx::MatMul_1639``). Run-time LoRA (``sdexport run
--lora``) must find those tensors again, so the export records the correspondence in
``<component>/weights.json``, found by content on the fp32 graph just traced: each linear and
convolution weight is looked for as it is, and transposed. A weight found under two names (equal
contents) is left out rather than guessed; run-time LoRA then refuses to change it. Two layers
whose equal weights the exporter stored once both name that one initializer; run-time LoRA refuses
to change either (``lora_runtime.refuse_shared_weights``): it would change both.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "weights.json"


def weight_map_file(graph: str) -> str:
    """The manifest's key of the weight map beside the graph at ``graph`` (a manifest's relative path)."""
    return f"{Path(graph).parent.as_posix()}/{WEIGHTS_FILE}"


def _key(array: Any) -> tuple[tuple[int, ...], str, str]:
    return tuple(array.shape), str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()


def weight_map(module: torch.nn.Module, initializers: Iterable[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"<module>.weight": {"initializer": name, "transposed": bool, "shape": [...]}}`` (the
    PyTorch shape, so run-time LoRA matches files without reading the graph) for every linear and
    convolution weight of ``module`` found among ``initializers`` (name and values of each float
    initializer of the fp32 graph, read one at a time: ``WeightStore.arrays``)."""
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
        for transposed, value in candidates:
            match = found.get(_key(value), [])
            if len(match) == 1:
                names[f"{name}.weight"] = {"initializer": match[0], "transposed": transposed,
                                           "shape": list(weight.shape)}
                break
    return names


def write_weight_map(module: torch.nn.Module, initializers: Iterable[tuple[str, Any]], folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(weight_map(module, initializers), indent=1, sort_keys=True) + "\n", encoding="utf-8")
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

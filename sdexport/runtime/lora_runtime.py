"""LoRA at run time: the updates of ``--lora`` files added to an engine directory's exported
weights where the engines are made, so switching a LoRA needs no re-export.

Each LoRA-able component's ``weights.json`` (written at export, ``sdexport.export.weight_names``)
says which ONNX initializer holds which weight, and whether transposed. ONNX Runtime gets the changed
tensors as session initializers that replace the graph's own (the files on disk are never touched);
the Torch backend adds the updates to its modules; TensorRT refits a ``--refittable`` engine with
the same tensors. The rule is ``sdexport.models.lora``'s, so a LoRA given at run time gives what
the same LoRA fused at export gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.errors import EngineDirError, SdexportError
from sdexport.export.weight_names import WEIGHTS_FILE, read_weight_map, weight_map_file
from sdexport.models.lora import LoraFile, LoraUpdate, match_updates, read_updates
from sdexport.specs import LORA_COMPONENTS

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from sdexport.manifest import Manifest


def updates_for(manifest: Manifest, loras: list[LoraFile], layers: dict[str, dict[str, tuple[int, ...]]],
                unet_config: Any = None, *, missing: str = "") -> list[LoraUpdate]:
    """Every LoRA's updates, matched to ``layers`` (refused, naming mismatches, where they do not fit).
    ``unet_config``: the U-Net's config (attributes), for SDXL kohya files named after the original blocks.
    ``missing``: what else leaves a layer out of ``layers`` (``WEIGHT_MAP_MISSING`` for ``onnx_layers``)."""
    updates: list[LoraUpdate] = []
    for lora in loras:
        matched = match_updates(read_updates(lora, manifest.family, unet_config), layers, f"--lora {lora.path}",
                                missing)
        if lora.scale != 0:  # checked all the same; at 0 it changes no weight, so no engine is made otherwise
            updates += matched  # (ONNX Runtime's sessions whose weights change run at another optimisation
            # level: a LoRA slider at 0 gave other pixels than none, 1/255, an audit)
    return updates


WEIGHT_MAP_MISSING = ("the export's weights.json also leaves out any layer whose weight the exported graph reads as "
                      "another tensor as well: fuse a LoRA for such a layer at export, sdexport export --lora")
"""Why a layer is missing from an export's weights.json besides not being in the model: a weight the
map could not give to one layer alone (``weight_names.weight_map``) is left out, and only the fused
export can change it. (The Torch backend reads the modules themselves: not said there.)"""


def refuse_shared_weights(engine_dir: Path, manifest: Manifest, updates: list[LoraUpdate]) -> None:
    """Refuse an update of a weight the exported graph stores once for two layers: the exporter
    keeps one initializer for equal weights, so both layers' ``weights.json`` entries name it, and
    changing it would change the other layer too (silently, as another LoRA). Fusing the LoRA at
    export changes the PyTorch layer alone."""
    for component in sorted({u.component for u in updates}):
        names = read_weight_map((engine_dir / manifest.components[component].onnx).parent) or {}
        holders: dict[str, list[str]] = {}
        for parameter, where in names.items():
            holders.setdefault(where["initializer"], []).append(parameter)
        for update in updates:
            if update.component != component or update.parameter not in names:
                continue
            others = [p for p in holders[names[update.parameter]["initializer"]] if p != update.parameter]
            if others:
                raise SdexportError(
                    f"--lora changes {component}.{update.module}, whose weight equals {component}."
                    f"{others[0].removesuffix('.weight')}'s and is stored once in the exported graph: a run-time "
                    "LoRA would change both; fuse the LoRA at export (sdexport export --lora)"
                )


def unet_config(engine_dir: Path, manifest: Manifest) -> Any:
    """The exported U-Net's ``config.json`` as attributes (what diffusers' block mapping reads)."""
    import json
    from types import SimpleNamespace

    path = engine_dir / manifest.components["unet"].config_file if "unet" in manifest.components else None
    if path is None or not path.is_file():
        return None
    return SimpleNamespace(**json.loads(path.read_text(encoding="utf-8")))


def _initializers(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {t.name: t for t in model.graph.initializer}


def initializer_reader(onnx_path: Path) -> Callable[[str], np.ndarray | None]:
    """A lookup of the graph's initializers by name, as exported (None: no such initializer),
    reading the graph's structure once, at the first call, and each tensor's data when asked: the
    unchanged weights TensorRT asks for beside the ones a LoRA changes (``tensorrt_backend.refit``)."""
    tensors: dict[str, Any] = {}

    def read(name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if not tensors:
            tensors.update(_initializers(onnx_path))
        tensor = tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor, base_dir=str(onnx_path.parent))

    return read


def onnx_layers(engine_dir: Path, manifest: Manifest) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per LoRA-able component, the weights ``weights.json`` found, with their PyTorch shapes."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in LORA_COMPONENTS:
        if component not in manifest.components:
            continue
        onnx_path = engine_dir / manifest.components[component].onnx
        # Read only where the manifest hashes it (verify_for_backend checked it then): an unlisted map
        # would say where to add each update with nothing to show it is the graph's.
        listed = weight_map_file(manifest.components[component].onnx) in manifest.files
        if not listed and (onnx_path.parent / WEIGHTS_FILE).is_file():
            fix = ("if it is the adopted export's own (an adopt before 2026-12-05 left it out), adopt again with "
                   "--force and the options you adopted with (built engines are removed); otherwise remove it"
                   if manifest.adopted else "an export lists every file it writes, so this one is not the export's: "
                   "remove it, or export again")
            raise EngineDirError(f"{onnx_path.parent / WEIGHTS_FILE}: not in the manifest's files, so nothing checks "
                                 f"what run-time LoRA would read from it; {fix}")
        names = read_weight_map(onnx_path.parent)
        if names is None:
            raise EngineDirError(
                f"{onnx_path.parent}: no weights.json, which run-time LoRA needs to find the weights (an export "
                "by an older sdexport, or adopted): re-export, or fuse the LoRA at export (sdexport export --lora)"
            )
        shapes: dict[str, tuple[int, ...]] = {}
        if all("shape" in where for where in names.values()):  # no need to read the graph's weights
            shapes = {p.removesuffix(".weight"): tuple(int(d) for d in where["shape"]) for p, where in names.items()}
        else:
            tensors = _initializers(onnx_path)
            for parameter, where in names.items():
                tensor = tensors.get(where["initializer"])
                if tensor is None:
                    continue
                dims = tuple(int(d) for d in tensor.dims)
                shapes[parameter.removesuffix(".weight")] = dims[::-1] if where["transposed"] else dims
        layers[component] = shapes
    return layers


def onnx_initializers(engine_dir: Path, manifest: Manifest, component: str, updates: list[LoraUpdate],
                      graph: str) -> dict[str, np.ndarray]:
    """The changed initializers of one component's portable graph ``graph`` (relative path): the
    exported tensor plus the updates, in the tensor's own dtype. (``load_pipeline`` refuses run-time
    LoRA on the fused ONNX Runtime CUDA graphs before it gets here.)"""
    import numpy as np
    from onnx import numpy_helper

    mine = [u for u in updates if u.component == component]
    if not mine:
        return {}
    onnx_path = engine_dir / graph
    names = read_weight_map(onnx_path.parent) or {}
    tensors = _initializers(onnx_path)
    changed: dict[str, np.ndarray] = {}
    for update in mine:
        where = names[update.parameter]
        name = where["initializer"]
        if name not in tensors:
            raise EngineDirError(f"{onnx_path.parent / WEIGHTS_FILE}: names {name!r} for {update.parameter}, which "
                                 f"{graph} does not hold; export again")
        if name not in changed:
            changed[name] = numpy_helper.to_array(tensors[name], base_dir=str(onnx_path.parent)).astype(np.float32)
        delta = update.delta().numpy()
        changed[name] += delta.T if where["transposed"] else delta
    from onnx.helper import tensor_dtype_to_np_dtype

    from sdexport.models.lora import not_finite

    stored = {name: value.astype(tensor_dtype_to_np_dtype(tensors[name].data_type)) for name, value in changed.items()}
    for update in mine:  # (in the graph's precision: fp16 ends at 65504)
        value = stored[names[update.parameter]["initializer"]]
        if not np.isfinite(value).all():
            raise not_finite(component, update.module, str(value.dtype))
    return stored

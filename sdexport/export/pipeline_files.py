"""The files around the graphs that other tools read: ``model_index.json``, each component's
``config.json`` and tokenizers every transformers version loads.

An engine directory is laid out as optimum's ONNX export of a diffusers pipeline is, so optimum's
``ORTDiffusionPipeline`` and ONNX Runtime's ``optimize_pipeline`` tool read it as they read their own
(and ``sdexport adopt`` reads theirs). Those tools find the pipeline class in ``model_index.json`` and
configure each ONNX component from the diffusers or transformers ``config.json`` in its folder (the
U-Net's ``in_channels``, the VAE's ``scaling_factor``, a text encoder's ``num_hidden_layers``), so
these files are written by the same libraries that write them for a diffusers checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdexport.specs import ComponentSpec

if TYPE_CHECKING:
    from sdexport.models import LoadedModel

MODEL_INDEX = "model_index.json"


def write_pipeline_files(directory: Path, model: LoadedModel, specs: list[ComponentSpec]) -> None:
    """``model_index.json``, a ``config.json`` beside each component's graph, the tokenizers and
    the scheduler config, into ``directory`` (an export's staging folder)."""
    for spec in specs:
        _save_config(model.module(spec.module), directory / spec.name)
    from sdexport.models.tokenizer import save_tokenizer  # transformers: imported only to write them

    for name, tokenizer in model.tokenizers.items():
        save_tokenizer(tokenizer, directory / name)
    scheduler_dir = directory / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2), encoding="utf-8")
    (directory / MODEL_INDEX).write_text(json.dumps(model.pipeline_index(), indent=2) + "\n", encoding="utf-8")


def _save_config(module: Any, folder: Path) -> None:
    """A diffusers model's config (``save_config``) or a transformers model's (``config.save_pretrained``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)

"""Checkpoint → PyTorch modules: the first stage of the pipeline.

``load_model`` and ``LoadedModel`` import torch; they are resolved on first use, so that the
torch-free parts (``presets``, ``outline``) can be imported on their own by fast checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdexport.models.presets import PRESETS

if TYPE_CHECKING:
    from sdexport.models.loader import LoadedModel, load_model

__all__ = ["PRESETS", "LoadedModel", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("LoadedModel", "load_model"):
        from sdexport.models import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'sdexport.models' has no attribute {name!r}")

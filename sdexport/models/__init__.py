"""Checkpoint → PyTorch modules: the first stage of the pipeline."""

from sdexport.models.loader import LoadedModel, load_model
from sdexport.models.presets import PRESETS

__all__ = ["PRESETS", "LoadedModel", "load_model"]

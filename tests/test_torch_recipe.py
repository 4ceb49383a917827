"""``--backend torch-compile-max``: diffusers' fast recipe, applied before compiling (checked on the CPU;
the compiled run itself is tests/test_gpu_runtime.py's, on a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from sdexport.runtime.torch_backend import COMPILE_RECIPES, TorchEngine, prepare_for_max_compile

pytestmark = pytest.mark.usefixtures("without_gpu")


def test_the_max_recipe_fuses_qkv_and_stores_channels_last(tiny_model):
    from diffusers.models.attention_processor import Attention

    unet = prepare_for_max_compile(copy.deepcopy(tiny_model.module("unet")))
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attention and all(m.fused_projections for m in attention)
    conv = next(p for p in unet.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_the_recipe_keeps_the_unets_output(tiny_model):
    from sdexport.specs import component

    spec = component("sd", "unet")
    eager = spec.wrapper(tiny_model.module("unet")).eval()
    fast = spec.wrapper(prepare_for_max_compile(copy.deepcopy(tiny_model.module("unet")))).eval()
    args = (torch.randn(2, 4, 16, 16), torch.tensor([500.0]), torch.randn(2, 77, 32))
    with torch.no_grad():
        assert torch.allclose(fast(*args), eager(*args), atol=1e-4)


def test_an_unknown_recipe_is_refused(tiny_model):
    from sdexport.shapes import ShapeProfile
    from sdexport.specs import component

    with pytest.raises(ValueError, match="compile recipe"):
        TorchEngine(component("sd", "unet"), tiny_model.module("unet"), profile=ShapeProfile.single(1, 64, 64),
                    device=torch.device("cpu"), compile=True, recipe="fastest")
    assert COMPILE_RECIPES == ("default", "max")

"""Test images made from seeds: the same seed, the same pixels, in every test file."""

from __future__ import annotations

import numpy as np
from PIL import Image


def picture(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Random pixels: nothing a wrong crop or channel order could still match (in ``mode``:
    greyscale for an adapter that reads one channel)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).convert(mode)


def box_mask(height: int, width: int) -> Image.Image:
    """Inpainting's mask: white (repaint) over the middle half of each side, black (keep) around it."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return Image.fromarray(mask)

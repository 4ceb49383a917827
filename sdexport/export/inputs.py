"""Sample inputs drawn from a ComponentSpec: the shapes come from the spec, the values from its hints."""

from __future__ import annotations

import numpy as np

from sdexport.specs import ComponentSpec, TensorSpec


def sample_value(tensor: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, vocab_size: int,
                 modes: int = 1) -> np.ndarray:
    """``modes``: how many control modes a ``modes`` or ``one_hot`` tensor ranges over (``N``)."""
    if tensor.values == "tokens":
        return rng.integers(0, vocab_size, size=shape, dtype=np.int32)
    if tensor.values == "timestep":
        return rng.uniform(1.0, 999.0, size=shape).astype(np.float32)
    if tensor.values == "pixels":
        return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    if tensor.values == "unit":
        return rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    if tensor.values == "scale":
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    if tensor.values == "modes":
        return rng.integers(0, modes, size=shape, dtype=np.int32)
    if tensor.values == "one_hot":
        return np.eye(shape[-1], dtype=np.float32)[rng.integers(0, shape[-1], size=shape[:-1])]
    if tensor.values == "time_ids":
        return rng.integers(0, 1024, size=shape).astype(np.float32)
    return rng.standard_normal(size=shape, dtype=np.float32)


def sample_inputs(
    spec: ComponentSpec, sizes: dict[str, int], *, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: sample_value(t, t.shape(sizes), rng, vocab_size, sizes.get("N") or 1) for t in spec.inputs}

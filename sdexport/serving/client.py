"""Calling a served model with ``tritonclient``: what the README's example, the tests and the load
test use. The tensors' names and types come from ``protocol``; nothing else here knows them.

    from sdexport.serving.client import generate
    pngs = generate("localhost:8000", ["a lighthouse at dusk"], steps=20, seed=7)
"""

from __future__ import annotations

import math
import os
from typing import Any

from sdexport.serving.protocol import INPUTS, MODEL_NAME

_NUMPY = {"BYTES": "object", "BOOL": "bool", "INT32": "int32", "UINT64": "uint64", "FP32": "float32", "UINT8": "uint8"}
_SPECS = {spec.name: spec for spec in INPUTS}


SENT_ALWAYS = ("seed", "steps", "scheduler")
"""Sent with their defaults when not given: Triton batches only requests that carry the same inputs,
so every request from this client carries at least these. Not ``guidance``: its default is the
model family's, which the server knows and a client need not."""


def infer_inputs(prompts: list[str] | str, module: Any = None, **params: Any) -> list[Any]:
    """``tritonclient`` inputs for ``prompts`` (one image each; a string is one prompt). ``params``: any other input of the
    model by name, one value for every image or a list of one per image (for the per-ControlNet and
    per-adapter inputs, a list is one value: their values for every image, and a list of lists
    gives each image its own, as for ``control_image``); bytes for the image inputs.
    ``control_image``: bytes, or a list of bytes (one per ControlNet), for every image, or a list
    of lists (or tuples), one per image, as the rows go over the wire (the transpose of
    ``GenerationRequest.control_image``'s list per ControlNet). The settings likewise:
    ``control_scale=[[0.5, 1.0], [0.7, 1.0]]`` gives the first image 0.5 and 1.0 (one per
    ControlNet), the second 0.7 and 1.0, where ``GenerationRequest`` would read a list per
    ControlNet. ``adapter_image``: bytes, or a
    tuple of bytes with several adapters (one each), for every image, or a list of those, one per
    image. ``seed``: one per prompt, or one number for the first image and +1 for each next (as
    ``sdexport run --seed``). ``original_size``, ``crops_coords_top_left``, ``target_size``: a pair
    (height, width; top, left) for every image, or a list of pairs, one per image. ``module``: ``tritonclient.http``
    (default) or ``tritonclient.grpc``."""
    import numpy as np

    from sdexport.serving.requests import DEFAULTS

    if module is None:
        import tritonclient.http

        module = tritonclient.http
    unknown = sorted(set(params) - set(_SPECS))
    if unknown:
        raise ValueError(f"unknown inputs {unknown}; the model takes {sorted(_SPECS)}")
    prompts = _prompt_list(prompts)
    rows = len(prompts)
    if not rows:
        raise ValueError("no prompts: give one per image")
    values: dict[str, Any] = {"prompt": [p.encode() for p in prompts]}
    params = {**{"seed": 0, **{name: DEFAULTS[name] for name in SENT_ALWAYS if name in DEFAULTS}},
              **{k: v for k, v in params.items() if v is not None}}
    for name, value in params.items():
        if isinstance(value, range | np.ndarray):  # (as GenerationRequest takes seeds=range(4))
            value = list(value) if isinstance(value, range) else value.tolist()
        if name == "seed":
            if isinstance(value, list | tuple) and len(value) != rows:
                raise ValueError(f"seed: {len(value)} values for {rows} prompts; give one (the first image's, "
                                 "+1 for each next) or one per prompt")
            if isinstance(value, list | tuple):
                values[name] = list(value)
            else:  # (as a Python int: numpy 1's uint64 + int is a float64, which rounds seeds past 2^53)
                first = _held(name, value, _SPECS[name].dtype)
                values[name] = [first + i for i in range(rows)]
        elif name == "adapter_image":  # per image, each one image per adapter
            values[name] = _adapter_images(value, rows)
        elif _SPECS[name].dims == (2,):  # SDXL's sizes and crop: a pair for every image, or one per image
            values[name] = _pairs(value, rows, name)
        elif _SPECS[name].dims == (-1,) and isinstance(value, list | tuple) \
                and any(isinstance(v, list | tuple) for v in value):  # one list per image
            values[name] = _per_image_lists(value, rows, name)
        elif _SPECS[name].dims == (-1,):
            values[name] = [list(value) if isinstance(value, list | tuple) else [value]] * rows
        elif isinstance(value, list | tuple):
            if len(value) != rows:
                raise ValueError(f"{name}: {len(value)} values for {rows} prompts; give one, or one per prompt")
            values[name] = list(value)
        else:
            values[name] = [value] * rows
    inputs = []
    for name, column in values.items():
        spec = _SPECS[name]
        if name in IMAGE_INPUTS:
            _require_files(name, [v for c in column for v in (c if isinstance(c, list | tuple) else [c])])
        encoded = [[v.encode() if isinstance(v, str) and spec.dtype == "BYTES" else _held(name, v, spec.dtype)
                    for v in (c if isinstance(c, list) else [c])] for c in column]
        array = np.array(encoded, dtype=_NUMPY[spec.dtype])
        tensor = module.InferInput(name, list(array.shape), spec.dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


_WHOLE = {"INT32": (-2**31, 2**31 - 1), "UINT64": (0, 2**64 - 1)}
_FLOAT32_OVERFLOW = (2 - 2**-24) * 2.0**127
"""Where rounding to float32 gives inf: its largest value plus half a unit in the last place (the
largest as numpy prints it, 3.4028235e+38, is just under and is held)."""


def _held(name: str, value: Any, dtype: str) -> Any:
    """``value`` as the input's tensor holds it exactly, else ValueError: numpy would cast 4.7 steps to
    4, wrap a seed of -1 to 2^64-1 and a height of 2^32 + 128 to 128, and the server would make an
    image of values never asked for (a whole float, 20.0, is its int)."""
    import numpy as np

    if value is None:  # (left out altogether it means "not given"; for one image of several, tritonclient sent
        # the text "None" as its negative prompt, and a guidance NaN refused in words never sent, an audit)
        raise ValueError(f"{name}: None for one image; give every image a value" + ("" if dtype != "BYTES" else
                                                                                     " ('' for no text)"))
    if isinstance(value, str | bytes) and dtype != "BYTES":  # (numpy would parse "4294967424" and wrap it)
        raise ValueError(f"{name}: {_shown(value)} is text; give a number")
    number = not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
    if dtype in _WHOLE:
        low, high = _WHOLE[dtype]
        whole = number and (isinstance(value, int | np.integer) or float(value).is_integer())
        if not whole or not low <= int(value) <= high:  # (int() of a huge int is exact; float() overflows)
            raise ValueError(f"{name}: {_shown(value)} is not a whole number {dtype} holds ({low} to {high})")
        return int(value)
    if dtype == "FP32" and number and (isinstance(value, int | np.integer) or math.isfinite(value)):
        try:
            magnitude = abs(float(value))
        except OverflowError:  # an int past any float
            magnitude = math.inf
        if magnitude >= _FLOAT32_OVERFLOW:  # (nan and inf as given: the server's to refuse)
            raise ValueError(f"{name}: {_shown(value)} is beyond float32's range, which the FP32 input holds")
    return value


IMAGE_INPUTS = ("init_image", "mask", "control_image", "adapter_image")
"""The inputs that take an image file's bytes, as the server decodes them."""


def _require_files(name: str, values: list[Any]) -> None:
    """ValueError for an image input given as anything but a file's bytes: a path went as its text,
    and a PIL image or an array as its pixels, which the server refused as "not a readable image"."""
    from sdexport.errors import a_class
    from sdexport.runtime.request import MASKED_INIT

    for value in values:
        if isinstance(value, bytes | bytearray) or (name == "control_image" and value == MASKED_INIT):
            continue
        what = "a path" if isinstance(value, str | os.PathLike) else a_class(type(value).__name__)
        raise ValueError(f"{name}: give the image file's bytes (Path('x.png').read_bytes(), or a PIL image saved "
                         f"into io.BytesIO), not {what}")


def _shown(value: Any) -> str:
    """``value`` as a message shows it: a number of hundreds of digits cut short."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"


def check_numbers(params: dict[str, Any], named: Any = str) -> None:
    """ValueError for a number among ``params`` (one value each) that its input's tensor cannot hold
    (``_held``), naming the input by ``named(name)``."""
    for name, value in params.items():
        if name in _SPECS and not isinstance(value, str | bytes | list | tuple):
            _held(named(name), value, _SPECS[name].dtype)


def _adapter_images(value: Any, rows: int) -> list[list[bytes]]:
    """``adapter_image`` as rows of one image per adapter (``infer_inputs``)."""
    entries = list(value) if isinstance(value, list) else [value] * rows
    if len(entries) != rows:
        raise ValueError(f"adapter_image: {len(entries)} values for {rows} prompts; give one, or one per prompt "
                         "(several adapters: a tuple, one image per adapter, for each)")
    images = [list(e) if isinstance(e, tuple | list) else [e] for e in entries]
    if len({len(i) for i in images}) > 1:
        raise ValueError("adapter_image: every image needs as many adapter images (one per adapter)")
    return images


def _pairs(value: Any, rows: int, name: str) -> list[list[Any]]:
    """A two-number input (``infer_inputs``): one pair for every image, or a list of pairs, one per
    image, each number whole and within INT32 (``_held``)."""
    import numpy as np

    value = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name}: give a pair, e.g. (1024, 1024), or a list of pairs, one per prompt")
    nested = [isinstance(v, list | tuple) for v in value]
    if any(nested) and not all(nested):
        raise ValueError(f"{name}: give one pair for every prompt, or a list of pairs, not a mix of both")
    pairs = [list(v) for v in value] if any(nested) else [list(value)] * rows
    if len(pairs) != rows:
        raise ValueError(f"{name}: {len(pairs)} pairs for {rows} prompts; give one pair for every prompt, or "
                         "a list of one per prompt")
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{name}: each is a pair of numbers, e.g. (1024, 1024)")
    return [[_held(name, n, "INT32") for n in pair] for pair in pairs]


def _per_image_lists(value: Any, rows: int, name: str) -> list[list[Any]]:
    """A per-ControlNet input given one list per image (``infer_inputs``)."""
    if not all(isinstance(v, list | tuple) for v in value):
        raise ValueError(f"{name}: give one list per image (each its values, one per ControlNet or adapter), or "
                         "the values for every image, not a mix of both")
    if len(value) != rows:
        raise ValueError(f"{name}: {len(value)} lists for {rows} prompts; give one per prompt, or one list (or "
                         "value) for every prompt")
    if len({len(v) for v in value}) > 1:
        raise ValueError(f"{name}: every image needs as many values (one per ControlNet or adapter)")
    return [list(v) for v in value]


def _prompt_list(prompts: Any) -> list[str]:
    """``prompts`` as the list of texts sent, one per image: a string is one prompt (iterated, it
    would be one per character), a tuple is held as a list; anything else is refused by its type."""
    many = isinstance(prompts, list | tuple) or type(prompts).__name__ == "ndarray"  # (numpy's str_ are str)
    listed = [prompts] if isinstance(prompts, str) else list(prompts) if many else None
    if listed is None or not all(isinstance(p, str) for p in listed):
        wrong = type(prompts).__name__ if listed is None else next(type(p).__name__ for p in listed if not isinstance(p, str))
        raise ValueError(f"prompts: give a text or a list of texts (str, not {wrong})")
    return listed


def generate(url: str, prompts: list[str] | str, *, model: str = MODEL_NAME, timeout_s: float = 600.0,
             pixels: bool = False, **params: Any) -> list[Any]:
    """The PNG bytes of each prompt's image (``pixels=True``: the uint8 arrays instead), over HTTP."""
    import tritonclient.http as http

    output = "pixels" if pixels else "image"
    prompts = _prompt_list(prompts)
    with http.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s) as client:
        result = client.infer(model, infer_inputs(prompts, http, **params),
                              outputs=[http.InferRequestedOutput(output, binary_data=True)])
    array = result.as_numpy(output)
    if why := missing_images(array, len(prompts), pixels):
        raise RuntimeError(f"{url}: the server {why}")
    return list(array) if pixels else [row[0] for row in array]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def missing_images(images: Any, wanted: int, pixels: bool = False) -> str | None:
    """Why an answer is not the request's images (None where it is): a server or proxy answering 200
    without them, or with another text than a PNG file (a proxy's error page), was counted a success
    by loadtest, and its throughput reported; ``generate`` failed on it with a bare TypeError, or
    returned that text as the image. ``pixels``: the uint8 arrays, one per image, asked for instead."""
    if images is None:
        return "answered without an image output"
    if len(images) != wanted:
        return f"answered {len(images)} image(s) for {wanted} prompt(s)"
    shape = getattr(images, "shape", ())
    if len(shape) != (4 if pixels else 2):
        return f"answered images of shape {list(shape)}, not " + ("[N, H, W, 3]" if pixels else "[N, 1]")
    if pixels:
        return None
    if not all(len(row) and (not isinstance(row[0], bytes | str) or len(row[0])) for row in images):  # (a row of
        # no column too; another type than text is said below: len() of a number was a TypeError, an audit)
        return "answered an empty image"
    other = next((row[0] for row in images if not (isinstance(row[0], bytes) and row[0].startswith(PNG_SIGNATURE))),
                 None)
    if other is not None:
        begins = other[:24] if isinstance(other, bytes | str) else type(other).__name__
        return f"answered an image that is not a PNG file (it begins {begins!r})"
    return None

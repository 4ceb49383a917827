"""Serving behind Triton: the served model's decoding, batching and errors (in-process), and real
servers on 127.0.0.1 over the tiny model (``sdexport serve`` under PyTriton's tritonserver, and the
repository of ``sdexport triton-repo`` under the bare tritonserver binary).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from sdexport.errors import SdexportError
from sdexport.runtime.images import read_parameters
from sdexport.serving.protocol import INPUTS, OUTPUTS

pytestmark = pytest.mark.usefixtures("without_gpu")

BACKEND = "onnxruntime-cpu"
PNG = b"\x89PNG\r\n\x1a\n"  # (what the fake servers answer as an image: a PNG file's signature)


def _png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _png_of(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _inputs(prompts: list[str], **params: object) -> dict[str, np.ndarray]:
    """A request's tensors as Triton hands them to the model (batch first, BYTES as object arrays)."""
    arrays = {"prompt": np.array([[p.encode()] for p in prompts], dtype=object)}
    for name, value in params.items():
        dtype = {"steps": np.int32, "height": np.int32, "width": np.int32, "seed": np.uint64,
                 "guess_mode": np.bool_}.get(name, np.float32)
        if isinstance(value, str | bytes):
            arrays[name] = np.array([[value.encode() if isinstance(value, str) else value]] * len(prompts), dtype=object)
        elif isinstance(value, list):
            arrays[name] = np.array([[v] for v in value], dtype=dtype)
        else:
            arrays[name] = np.array([[value]] * len(prompts), dtype=dtype)
    return arrays


# -- the tensors, the config, the rows ---------------------------------------------------------


def _png(height: int, width: int) -> bytes:
    from pictures import box_mask

    buffer = io.BytesIO()
    box_mask(height, width).save(buffer, format="PNG")
    return buffer.getvalue()


def test_config_pbtxt_is_a_valid_triton_model_config():
    """Parsed with Triton's own schema (tritonclient ships model_config.proto), every tensor as declared."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from sdexport.serving.repository import Batching, config_pbtxt
    from sdexport.serving.triton_model import ServeSettings

    text = config_pbtxt(ServeSettings('/x/"quoted" dir'), 4, Batching(max_queue_delay_us=5000, max_queue_size=8))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 8
    assert [i.name for i in config.input] == [s.name for s in INPUTS]
    assert [o.name for o in config.output] == [s.name for s in OUTPUTS]
    assert [i.optional for i in config.input] == [s.optional for s in INPUTS]
    assert config.parameters["engine_dir"].string_value == '/x/"quoted" dir'


def test_rows_take_the_cli_defaults_and_read_float32_as_typed():
    from sdexport.serving.requests import decode_rows

    rows = decode_rows(_inputs(["a", "b"]), (128, 96))  # guidance None: the family's, filled in as by `run`
    assert [(r.prompt, r.seed, r.steps, r.guidance, r.scheduler, r.height, r.width) for r in rows] == [
        ("a", 0, 30, None, "default", 128, 96), ("b", 1, 30, None, "default", 128, 96)]
    row = decode_rows(_inputs(["a"], guidance=7.3, steps=4, seed=[2**64 - 1]), (128, 128))[0]
    assert (row.guidance, row.steps, row.seed) == (7.3, 4, 2**64 - 1)
    # one side given, no image: the other the default's, as `run --width 96` takes the profile's height
    # (it was refused: "give both height and width, or neither")
    assert [(r.height, r.width) for r in decode_rows(_inputs(["a"], width=96), (128, 64))] == [(128, 96)]
    assert [(r.height, r.width) for r in decode_rows(_inputs(["a"], height=64), (128, 96))] == [(64, 96)]


@pytest.mark.parametrize(("params", "message"), [
    ({"prompt": np.array([[b"\xff"]], dtype=object)}, "prompt: not UTF-8 text"),
    ({"height": 64, "init_image": _png(64, 64)}, "with an image input, give both height and width, or neither"),
    ({"init_image": b"not an image"}, "init_image: not a readable image"),
    ({"init_image": b""}, "init_image: empty"),
    ({"fit": "resize"}, "fit needs init_image"),
    ({"colour": 1.0}, "unknown inputs colour"),
    ({"prompt": np.array([[b"  "]], dtype=object)}, "prompt: empty"),
    ({"guess_mode": np.array([[0.5]], dtype=np.float32)}, "guess_mode 0.5: expected true or false"),
    ({"mask": _png(64, 64)}, "^mask needs init_image: inpainting repaints part of a given image"),  # not its size first
    # a name of a megabyte is not echoed whole (it came back in the error)
    ({"scheduler": "x" * 1_000_000}, (r"^scheduler: 1000000 characters \('x{20}'\.\.\.\), no name it takes; send "
                                      r"one of the names `sdexport run --help` lists for --scheduler$")),
    ({"emphasis": "é" * 101}, r"^emphasis: 101 characters \('é{20}'\.\.\.\), no name it takes"),
])
def test_malformed_rows_are_refused_in_one_line(params, message):
    from sdexport.serving.requests import decode_rows

    inputs = _inputs(["a"], **{k: v for k, v in params.items() if not isinstance(v, np.ndarray)})
    inputs.update({k: v for k, v in params.items() if isinstance(v, np.ndarray)})
    with pytest.raises(SdexportError, match=message):
        decode_rows(inputs, (128, 128))


def test_a_blank_prompt_is_refused_as_run_refuses_it_unless_sdxls_second_prompt_has_the_text():
    from sdexport.runtime.request import check_prompt_text
    from sdexport.serving.requests import decode_rows

    [row] = decode_rows(_inputs([" "], prompt_2="a lighthouse"), (128, 128))  # one rule with `run`'s
    assert (row.prompt, row.prompt_2) == (" ", "a lighthouse")
    check_prompt_text([" "], ["a lighthouse"])
    with pytest.raises(SdexportError, match=r"prompt: empty; send the text .*prompt_2"):
        decode_rows(_inputs([" "], prompt_2=" "), (128, 128))
    with pytest.raises(SdexportError, match="the prompt is empty"):
        check_prompt_text([" "], [" "])


def test_rows_with_the_same_settings_share_a_call_up_to_the_batch_limit():
    from sdexport.serving.requests import decode_rows, group_rows

    same = decode_rows(_inputs(["a", "b", "c"], steps=4), (128, 128))
    other = decode_rows(_inputs(["d"], steps=5), (128, 128))
    calls = group_rows([(0, same[0]), (1, other[0]), (2, same[1]), (3, same[2])], max_batch=2)
    assert [[owner for owner, _ in call] for call in calls] == [[0, 2], [3], [1]]
    guessing = decode_rows(_inputs(["e"], steps=4, guess_mode=True), (128, 128))  # ControlNet guess mode
    assert guessing[0].guess_mode and not same[0].guess_mode
    assert len(group_rows([(0, same[0]), (1, guessing[0])], max_batch=2)) == 2


SHARING = {
    # field: (a value other than the base row's, whether rows that differ so still share a call)
    "prompt": ("b", True), "seed": (2, True), "guidance": (3.0, True), "steps": (20, False),
    "scheduler": ("euler", False), "height": (256, False), "width": (256, False),
    "negative_prompt": ("fog", False), "guidance_rescale": (0.7, False), "prompt_2": ("b", False),
    "negative_prompt_2": ("fog", False), "original_size": ((1024, 1024), False),
    "crops_coords_top_left": ((8, 8), False), "target_size": ((1024, 1024), False),
    "aesthetic_score": (6.0, False), "negative_aesthetic_score": (2.5, False), "denoising_end": (0.8, False),
    "clip_skip": (2, False), "emphasis": ("original", False), "chunks": ((2, 0), False), "image": ("init", False),
    "mask": ("mask", False), "strength": (0.5, False), "control_image": (["edges"], False),
    "control_mode": ([3], False), "control_scale": (0.5, False), "control_start": (0.2, True),
    "control_end": (0.8, True), "guess_mode": (True, False), "control_digests": (("d1",), True),
    "adapter_image": ("sketch", False), "adapter_scale": (0.5, True), "adapter_factor": (0.5, True),
    "guidance_embedded": (True, False), "notes": (["resized"], True),
    # rows sharing their request's init image are passed it once (and held with their request: apart)
    "inpaint_digest": ("d2", True), "shares_init": (True, False),
}


def test_every_row_field_is_either_in_the_batch_key_or_taken_per_image():
    """A parameter added to ``Row`` but left out of ``batch_key`` would put rows that must run apart
    into one call, silently: each field is listed here with whether rows that differ in it share a
    call, so a new one fails here until it is decided."""
    import dataclasses

    from sdexport.serving.requests import Row

    assert sorted(f.name for f in dataclasses.fields(Row)) == sorted(SHARING)
    base = Row(prompt="a", seed=1, steps=30, guidance=7.5, scheduler="default", height=512, width=512)
    for name, (value, shared) in SHARING.items():
        assert (dataclasses.replace(base, **{name: value}).batch_key() == base.batch_key()) is shared, name


def test_served_defaults_are_runs():
    """The served model fills in what a request leaves out as ``sdexport run`` does: the same
    defaults, written once (``GenerationRequest``'s), and the same step limit as ``serve``'s."""
    import dataclasses
    import inspect

    from sdexport import cli
    from sdexport.runtime.request import GenerationRequest
    from sdexport.serving.requests import DEFAULTS, Row
    from sdexport.serving.triton_model import MAX_STEPS

    run = inspect.signature(cli.run).parameters
    request = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}
    for name in ("steps", "scheduler", "emphasis", "fit"):
        assert DEFAULTS[name] == run[name].default, name
    for name, default in DEFAULTS.items():
        assert name == "fit" or default == request[name], name
    for f in dataclasses.fields(Row):  # a row's defaults are the request's where it has the field
        if f.name in request and f.default is not dataclasses.MISSING:
            assert f.default == request[f.name], f.name
    assert run["guidance_rescale"].default == request["guidance_rescale"]
    for command in (cli.serve, cli.triton_repo):
        assert inspect.signature(command).parameters["max_steps"].default == MAX_STEPS


def test_rows_of_different_guidance_share_a_call_unless_one_side_skips_the_unconditional_half():
    from sdexport.serving.requests import decode_rows, generation_request, group_rows

    rows = decode_rows(_inputs(["a", "b", "c", "d", "e"], steps=4, guidance=[7.5, 3.0, 1.0, 0.5, 7.5]), (128, 128))
    calls = group_rows(list(enumerate(rows)), max_batch=4)
    assert [[owner for owner, _ in call] for call in calls] == [[0, 1, 4], [2, 3]]
    assert [generation_request([row for _, row in call]).guidance for call in calls] == [[7.5, 3.0, 7.5], [1.0, 0.5]]
    assert generation_request([rows[0], rows[4]]).guidance == 7.5  # one value where the rows agree


def test_rows_of_different_strength_scheduler_or_steps_are_generated_apart():
    """A call takes one of each (the loop's schedule): rows asking for others share no call, which
    would run them at the first row's."""
    from sdexport.serving.requests import decode_rows, generation_request, group_rows

    for name, values in (("strength", [0.3, 0.8, 0.3]), ("scheduler", ["euler", "ddim", "euler"]),
                         ("steps", [4, 5, 4])):
        inputs = _inputs(["a", "b", "c"], **({} if name == "scheduler" else {name: values}))
        if name == "scheduler":  # (BYTES, one per row)
            inputs[name] = np.array([[v.encode()] for v in values], dtype=object)
        rows = decode_rows(inputs, (128, 128))
        calls = group_rows(list(enumerate(rows)), max_batch=4)
        assert [[owner for owner, _ in call] for call in calls] == [[0, 2], [1]], name
        assert [getattr(generation_request([row for _, row in call]), name) for call in calls] == [
            pytest.approx(values[0]), values[1]], name


def test_rows_of_different_guidance_rescale_are_generated_apart():
    from sdexport.serving.requests import decode_rows, generation_request, group_rows

    rows = decode_rows(_inputs(["a", "b", "c"], steps=4, guidance_rescale=[0.7, 0.0, 0.7]), (128, 128))
    calls = group_rows(list(enumerate(rows)), max_batch=4)
    assert [[owner for owner, _ in call] for call in calls] == [[0, 2], [1]]
    assert [generation_request([row for _, row in call]).guidance_rescale for call in calls] == [
        pytest.approx(0.7), 0.0]
    assert decode_rows(_inputs(["d"]), (128, 128))[0].guidance_rescale == 0.0


def test_sdxl_conditioning_rows_are_decoded_as_run_reads_its_flags_and_kept_apart_by_value():
    """SDXL's sizes and crop and the refiner's scores: a pair (or a number) per row, passed to the
    call as ``run`` passes its flags; a call takes one of each (the U-Net's time ids), so rows that
    differ in them are generated apart. Their ranges are checked with the request, in run's words."""
    from sdexport.serving.requests import decode_rows, generation_request, group_rows

    def pairs(*values: tuple[int, ...]) -> np.ndarray:
        return np.array(values, dtype=np.int32)

    inputs = _inputs(["a", "b", "c"], aesthetic_score=[7.3, 7.3, 7.3], negative_aesthetic_score=[2.0, 2.0, 1.5])
    inputs.update(original_size=pairs((96, 80), (96, 80), (96, 80)), crops_coords_top_left=pairs((8, 4), (8, 4), (8, 4)))
    rows = decode_rows(inputs, (64, 64))
    calls = group_rows(list(enumerate(rows)), max_batch=4)
    assert [[owner for owner, _ in call] for call in calls] == [[0, 1], [2]]
    request = generation_request([row for _, row in calls[0]])
    assert (request.original_size, request.crops_coords_top_left, request.target_size) == ((96, 80), (8, 4), None)
    assert (request.aesthetic_score, request.negative_aesthetic_score) == (7.3, 2.0)  # float32 read as typed
    [row] = decode_rows({**_inputs(["d"]), "target_size": pairs((128, 96))}, (64, 64))
    assert generation_request([row]).target_size == (128, 96) and row.crops_coords_top_left == (0, 0)
    assert len(group_rows([(0, row), (1, decode_rows(_inputs(["e"]), (64, 64))[0])], max_batch=4)) == 2
    with pytest.raises(SdexportError, match=r"crops_coords_top_left: expected two values \(top, left\), got 3"):
        decode_rows({**_inputs(["a"]), "crops_coords_top_left": pairs((1, 2, 3))}, (64, 64))
    with pytest.raises(SdexportError, match="original_size 1.5: expected a whole number"):
        decode_rows({**_inputs(["a"]), "original_size": np.array([[1.5, 2]], dtype=np.float32)}, (64, 64))


def test_rows_of_different_controlnet_settings_share_a_call():
    """Scales and windows are per image: rows share a call whatever they are, and the call takes a
    list per place where its rows differ (one ControlNet here, so one place); a row that leaves the
    scale to the task's default is kept apart here (the served model fills it in first)."""
    from sdexport.serving.requests import Row, generation_request, group_rows

    def row(**settings: object) -> Row:
        return Row(prompt="x", seed=0, steps=2, guidance=7.5, scheduler="default", height=64, width=64,
                   control_image=["edges"], control_digests=("edges",), **settings)  # type: ignore[arg-type]

    rows = [row(control_scale=0.5), row(control_scale=[1.2], control_end=0.5), row(control_scale=0.5),
            row(control_scale=None)]
    calls = group_rows(list(enumerate(rows)), max_batch=4)
    assert [[owner for owner, _ in call] for call in calls] == [[0, 1, 2], [3]]
    request = generation_request([r for _, r in calls[0]])
    assert (request.control_scale, request.control_start, request.control_end) == ([[0.5, 1.2, 0.5]], 0.0,
                                                                                    [[1.0, 0.5, 1.0]])
    assert generation_request([rows[0], rows[2]]).control_scale == 0.5  # one value where the rows agree
    two = [Row(prompt="x", seed=0, steps=2, guidance=7.5, scheduler="default", height=64, width=64,
               control_image=["a", "b"], control_digests=("a", "b"), control_scale=scale) for scale in (0.5, [0.5, 0.9])]
    assert generation_request(two).control_scale == [0.5, [0.5, 0.9]]  # the second place differs


# -- the served model in-process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_engine_dir):
    from sdexport.serving.triton_model import ServedModel, ServeSettings

    logs: list[str] = []
    model = ServedModel(ServeSettings(str(tiny_engine_dir), backend=BACKEND, max_steps=50), log=logs.append)
    model.logs = logs  # type: ignore[attr-defined]
    yield model
    model.close()


def test_a_served_image_is_the_image_sdexport_run_writes(served, tiny_engine_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "cli.png"
    assert run_cli("run", tiny_engine_dir, "-p", "a red boat", "-n", "fog", "--steps", "3", "--seed", "5",
                   "--scheduler", "euler_a", "--guidance", "6", "--backend", BACKEND, "-o", out) == 0
    [generated] = served.generate([_inputs(["a red boat"], negative_prompt="fog", steps=3, seed=[5],
                                           scheduler="euler_a", guidance=6.0)])
    assert not isinstance(generated, str)
    np.testing.assert_array_equal(_png_pixels(generated[0].png), np.asarray(Image.open(out).convert("RGB")))
    np.testing.assert_array_equal(generated[0].pixels, np.asarray(Image.open(out).convert("RGB")))
    assert json.loads(Image.open(io.BytesIO(generated[0].png)).text["sdexport"])["seed"] == 5


def test_a_bad_request_gets_its_own_error_and_the_others_their_images(served):
    served.logs.clear()
    results = served.generate([
        _inputs(["fine"], steps=2),
        _inputs(["bad"], steps=2, scheduler="warp"),
        _inputs(["also fine", "and this"], steps=2, seed=[1, 2]),
        _inputs(["too long"], steps=51),
        _inputs(["too wide"], steps=2, height=128, width=4096),
    ])
    assert [len(r) if not isinstance(r, str) else r.split(";")[0] for r in results[:2]] == [1, "unknown scheduler 'warp'"]
    assert len(results[2]) == 2
    assert results[3] == "steps 51: this server allows at most 50 steps (config.pbtxt parameter max_steps)"
    assert "width 4096 is outside the engines' profile" in results[4]
    # the three good images (same settings) went through one call of two and one of one (batch limit 2)
    assert served.logs[-1].endswith("3 image(s) in 2 call(s) of 2, 1")


def test_a_failure_of_the_server_is_answered_as_an_internal_error_not_a_bad_request(served, monkeypatch):
    """A generation that raises what no check foresaw (out of device memory, a broken engine) is
    the server's fault: Triton's INTERNAL (HTTP 500), so clients retry and alerts fire; a refused
    request stays INVALID_ARG (400), and a request its client gave up on CANCELLED."""
    from sdexport.errors import EngineRunError
    from sdexport.serving.triton_model import Cancelled, ServerFault, TritonAdapter

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(served, "_call", out_of_memory)
    [failed, refused] = served.generate([_inputs(["fine"], steps=2), _inputs(["bad"], steps=2, scheduler="warp")])
    assert isinstance(failed, ServerFault) and failed == "generation failed: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert isinstance(refused, str) and not isinstance(refused, ServerFault)

    def engine_failed(*args, **kwargs):  # (the engine's file is the server's business: its log has it)
        raise EngineRunError("/srv/engines/sd15/unet/model.onnx", "onnxruntime", "a node failed")

    monkeypatch.setattr(served, "_call", engine_failed)
    [failed] = served.generate([_inputs(["fine"], steps=2)])
    assert isinstance(failed, ServerFault) and failed == "generation failed: onnxruntime failed while it ran (a node failed)"

    class TritonError:  # triton_python_backend_utils' error, as far as the adapter reads it
        INVALID_ARG, INTERNAL, CANCELLED = "INVALID_ARG", "INTERNAL", "CANCELLED"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class Response:
        def __init__(self, output_tensors, error=None):
            self.error = error

    pb = type("pb_utils", (), {"TritonError": TritonError, "InferenceResponse": Response})
    adapter = TritonAdapter(pb)
    codes = [adapter._response(result, {"image"}).error.code
             for result in (failed, refused, Cancelled("cancelled by the client"))]
    assert codes == ["INTERNAL", "INVALID_ARG", "CANCELLED"]


def test_a_kind_gpu_instance_loads_on_the_gpu_triton_gave_it(monkeypatch):
    """With instance_group KIND_GPU Triton starts one instance per GPU and tells each its device;
    the backends take the current device, so each loaded its whole pipeline onto GPU 0."""
    import torch

    from sdexport.serving import triton_model

    devices, loaded = [], []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(triton_model, "ServedModel", lambda settings, log: loaded.append(settings))
    config = json.dumps({"parameters": {"engine_dir": {"string_value": "/engines/sd15"}}})
    adapter = triton_model.TritonAdapter(type("pb_utils", (), {}))
    adapter.initialize({"model_config": config, "model_instance_kind": "GPU", "model_instance_device_id": "3"})
    adapter.initialize({"model_config": config, "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    assert devices == [3] and len(loaded) == 2


def test_the_model_process_says_what_it_says_in_tritons_log(monkeypatch):
    """The runtime's warnings (a prompt cut at the engines' chunks, a decoder's fp32 rerun) went to
    the model process's stderr, which Triton passes on: onto serve's terminal even with -q, and not
    into the log. They are lines of Triton's log, as warnings, whole lines only."""
    from sdexport.console import console
    from sdexport.serving import triton_model

    said: dict[str, list[str]] = {"info": [], "warn": []}

    class Logger:
        log_info, log_warn = staticmethod(said["info"].append), staticmethod(said["warn"].append)

    monkeypatch.setattr(triton_model, "ServedModel", lambda settings, log: None)
    monkeypatch.setattr(console, "_file", console._file)  # (put back after the test: None, sys.stderr as it is then)
    config = json.dumps({"parameters": {"engine_dir": {"string_value": "/engines/sd15"}}})
    triton_model.TritonAdapter(type("pb_utils", (), {"Logger": Logger})).initialize({"model_config": config})
    console.print("[yellow]warning:[/] prompt 1 is longer than 2 chunks; it reads only: 'z , z'")
    console.file.write("half a ")
    assert said["warn"] == ["sdexport: warning: prompt 1 is longer than 2 chunks; it reads only: 'z , z'"]
    console.file.write("line\n\n")
    assert said["warn"][1:] == ["sdexport: half a line"] and said["info"] == []


def test_a_long_prompt_is_generated_apart_from_short_ones_and_as_run_makes_it(served, tiny_engine_dir, tmp_path):
    """A call pads its texts to its longest's chunks: rows of two chunks and of one never share one,
    so a short prompt's image is the same whoever else sent a long one."""
    from PIL import Image

    long = ", ".join(["a red boat"] * 12)  # two chunks in the tiny vocabulary
    served.logs.clear()
    [alone] = served.generate([_inputs(["a cat"], steps=2)])
    results = served.generate([_inputs(["a cat"], steps=2), _inputs([long], steps=2), _inputs(["a dog"], steps=2)])
    assert served.logs[-1].endswith("3 image(s) in 2 call(s) of 2, 1")
    assert not isinstance(alone, str) and not isinstance(results[0], str) and not isinstance(results[1], str)
    np.testing.assert_array_equal(results[0][0].pixels, alone[0].pixels)
    out = tmp_path / "long.png"
    assert run_cli("run", tiny_engine_dir, "-p", long, "--steps", "2", "--backend", BACKEND, "-o", out) == 0
    np.testing.assert_array_equal(results[1][0].pixels, np.asarray(Image.open(out).convert("RGB")))


def test_img2img_and_the_cli_agree_on_an_init_image_served_as_bytes(served, tiny_engine_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    init = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    (tmp_path / "init.png").write_bytes(_png_of(init))
    out = tmp_path / "cli.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "4", "--init-image", tmp_path / "init.png",
                   "--backend", BACKEND, "-o", out) == 0
    [generated] = served.generate([_inputs(["x"], steps=4, init_image=_png_of(init))])
    assert not isinstance(generated, str) and generated[0].pixels.shape == (96, 128, 3)  # the image's own size
    np.testing.assert_array_equal(generated[0].pixels, np.asarray(Image.open(out).convert("RGB")))


def test_inpainting_several_images_of_one_init_image_is_runs_beside_another_request(served, tiny_engine_dir, tmp_path):
    """run samples one init image once, with the first image's seed, and shares it, as diffusers'
    inpaint pipelines do; the server gave each row its own copy, so image 2 on was sampled with its
    own seed and differed from run's in 98% of its pixels (an audit). Another request's rows, here
    one sending the same bytes, must not join the call and change that."""
    from PIL import Image

    rng = np.random.default_rng(1)
    init = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (tmp_path / "init.png").write_bytes(_png_of(init))
    (tmp_path / "mask.png").write_bytes(_png(64, 64))
    flags = ["--steps", "3", "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--backend", BACKEND]
    assert run_cli("run", tiny_engine_dir, "-p", "a", "-p", "b", "--seed", "5", *flags, "-o", tmp_path / "two.png") == 0
    long = ", ".join(["a red boat"] * 12)  # two chunks: run pads the other prompt to them, in one call
    assert run_cli("run", tiny_engine_dir, "-p", "c", "-p", long, "--seed", "9", *flags, "-o", tmp_path / "other.png") == 0
    # (a second request of two rows too: without the apart key, the four rows shared one call)
    both, other = served.generate([_inputs(["a", "b"], steps=3, seed=[5, 6], init_image=_png_of(init), mask=_png(64, 64)),
                                   _inputs(["c", long], steps=3, seed=[9, 10], init_image=_png_of(init),
                                           mask=_png(64, 64))])
    assert not isinstance(both, str) and not isinstance(other, str)
    for generated, name in ((both[0], "two-0.png"), (both[1], "two-1.png"), (other[0], "other-0.png"),
                            (other[1], "other-1.png")):
        np.testing.assert_array_equal(generated.pixels, np.asarray(Image.open(tmp_path / name).convert("RGB")))
    # the same bytes fitted otherwise are two images: each row keeps its own (one image was passed)
    rows = {**_inputs(["a", "b"], steps=3, seed=[5, 6], init_image=_png_of(rng.integers(0, 255, (64, 128, 3),
                                                                                           dtype=np.uint8)),
                      mask=_png(64, 128), height=64, width=64), "fit": np.array([[b"resize"], [b"crop"]], dtype=object)}
    from sdexport.serving.requests import decode_rows

    assert not any(row.shares_init for row in decode_rows(rows, (64, 64)))


@pytest.mark.parametrize("side", [0, -64, 50_000])
def test_a_size_is_checked_before_an_init_image_is_resized_to_it(served, side):
    """A resize to 0 would raise inside Pillow, one to 50000² would allocate gigabytes first."""
    [result] = served.generate([_inputs(["x"], steps=2, init_image=_png_of(np.zeros((64, 64, 3), np.uint8)),
                                        fit="resize", height=side, width=side)])
    assert isinstance(result, str) and "outside the engines' profile" in result


def test_served_shapes_round_trip_through_config_pbtxt_and_a_bad_one_is_refused_in_one_line():
    from sdexport.serving.triton_model import ServeSettings

    settings = ServeSettings("/e", shapes=(("height", (64, 64, 128)), ("batch", (1, 1, 1))))
    parameters = settings.to_parameters()
    assert (parameters["height"], parameters["batch"]) == ("64:64:128", "1:1:1") and "width" not in parameters
    assert ServeSettings.from_parameters(parameters).shapes == (("batch", (1, 1, 1)), ("height", (64, 64, 128)))
    assert "height" not in ServeSettings("/e").to_parameters()
    with pytest.raises(SdexportError, match=r"^config.pbtxt parameter height '64:x': expected integers as min:opt:max"):
        ServeSettings.from_parameters({**parameters, "height": "64:x"})
    every = ServeSettings("/e", backend="tensorrt", cuda_graph=True, graphs="portable", max_steps=9, verify=False,
                          refiner="/r", denoising_end=0.7, engine_name="e", refiner_name="r", emphasis="original",
                          shapes=(("batch", (1, 1, 1)), ("height", (64, 64, 128))), hashed="ab" * 32)
    assert ServeSettings.unread(every.to_parameters()) == []  # (every key sdexport writes, it reads)
    assert ServeSettings.from_parameters(every.to_parameters()) == every
    assert ServeSettings.unread({**parameters, "Height": "64", "EXECUTION_ENV_PATH": "/env.tar.gz"}) == ["Height"]


def test_the_served_model_refuses_a_directory_replaced_after_serve_checked_it(engine_copy, tiny_fp16_engine_dir):
    """serve hashes the files, then Triton starts and the model loads them seconds later without
    hashing again: an `export --force` meanwhile was loaded unhashed (an audit's race)."""
    import shutil

    from sdexport.errors import EngineDirError
    from sdexport.manifest import load_manifest
    from sdexport.serving.triton_model import ServedModel, ServeSettings

    checked = ServeSettings.checked_digest(load_manifest(engine_copy, verify_files=False))
    settings = ServeSettings(str(engine_copy), backend="onnxruntime-cpu", verify=False, hashed=checked)
    ServedModel(settings, log=lambda line: None).close()
    shutil.rmtree(engine_copy)
    shutil.copytree(tiny_fp16_engine_dir, engine_copy)
    with pytest.raises(EngineDirError, match="the directory changed after serve checked its files"):
        ServedModel(settings, log=lambda line: None)


def test_a_tensorrt_repository_of_a_directory_without_plans_says_so(tiny_engine_dir, tmp_path, capsys):
    """Written all the same (building after writing the repository is a way to work), but noted: the
    server failed at load, in its log, with nothing said here."""
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo", "--backend", "tensorrt") == 0
    said = " ".join(capsys.readouterr().err.split())
    assert (f"note: {tiny_engine_dir} has no TensorRT plan for text_encoder, unet, vae_decoder, vae_encoder yet: the server "
            f"will fail to load the model until `sdexport build {tiny_engine_dir}` has run on its GPU") in said, said
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "other", "--backend", "onnxruntime") == 0
    assert "no TensorRT plan" not in capsys.readouterr().err


def test_a_servers_refusals_name_the_lever_its_operator_has():
    """``serve`` writes a temporary repository: its options. ``triton-repo`` writes one for the
    stock server, whose operator edits config.pbtxt: its options while it writes, the parameters
    once the server reads them."""
    from sdexport.serving.triton_model import ServeSettings

    served = ServeSettings("/e", set_by="serve")
    assert ServeSettings.from_parameters(served.to_parameters()).option("max_steps") == "sdexport serve --max-steps"
    written = ServeSettings("/e", set_by="triton-repo")
    assert written.option("width") == "sdexport triton-repo --width"
    assert "set_by" not in written.to_parameters()
    assert ServeSettings.from_parameters(written.to_parameters()).option("max_steps") == "config.pbtxt parameter max_steps"
    with pytest.raises(SdexportError, match=r"^config.pbtxt parameter set_by 'triton-repo': expected serve or config.pbtxt$"):
        ServeSettings.from_parameters({"engine_dir": "/e", "set_by": "triton-repo"})
    for steps in ("0", "-3", "many"):  # every request would be refused: refused as the server loads
        with pytest.raises(SdexportError, match=rf"^config.pbtxt parameter max_steps '{steps}': expected a whole number, "
                                                r"1 or more$"):
            ServeSettings.from_parameters({"engine_dir": "/e", "max_steps": steps})
    # the parameter named, not the whole dict; an operator's "True" is true
    with pytest.raises(SdexportError, match=r"^config.pbtxt parameter verify 'yes': expected true or false$"):
        ServeSettings.from_parameters({"engine_dir": "/e", "verify": "yes"})
    assert ServeSettings.from_parameters({"engine_dir": "/e", "verify": "True", "cuda_graph": "TRUE"}).cuda_graph


@pytest.mark.parametrize(("shapes", "message"), [
    ({"height": "64:64:512"}, ("the served shapes reach outside the engine directory's profile: height [64, 512] is "
                              "not inside [64, 256] (serve inside it, or re-export with a wider --height)")),
    ({"batch": "2:2:2"}, "served batch min 2: a served call may hold a single image, so the batch starts at 1 (e.g. 1:2:2)"),
    ({"width": "60:64:64"}, "width min 60 is not a multiple of"),
])
def test_served_shapes_outside_the_engines_are_refused_before_a_server_starts(shapes, message, tiny_engine_dir,
                                                                             tmp_path, capsys):
    flags = [text for axis, value in shapes.items() for text in (f"--{axis}", value)]
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo", *flags) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and not (tmp_path / "repo").exists(), err


def test_served_shapes_must_lie_inside_the_refiners_profile_too():
    from dataclasses import replace
    from types import SimpleNamespace

    from sdexport.errors import ProfileError
    from sdexport.serving.triton_model import ServeSettings
    from sdexport.shapes import ShapeProfile

    dims = SimpleNamespace(image_multiple=8)  # (what the profile's check reads of the model)
    base = SimpleNamespace(shape_profile=ShapeProfile((1, 1, 4), (512, 1024, 1536), (512, 1024, 1536)), model_dims=dims)
    refiner = SimpleNamespace(shape_profile=ShapeProfile((1, 1, 2), (512, 1024, 1024), (512, 1024, 1024)), model_dims=dims)
    settings = ServeSettings("/e", shapes=(("height", (1024, 1024, 1536)),))
    assert settings.served_profile(base) == replace(base.shape_profile, height=(1024, 1024, 1536))
    narrowed = ServeSettings("/e", shapes=(("height", (512, 768, 1024)),)).served_profile(base, refiner)
    assert narrowed == ShapeProfile((1, 1, 2), (512, 768, 1024), (512, 1024, 1024))  # the rest as both take them
    with pytest.raises(ProfileError, match=r"reach outside the refiner's profile: height \[1024, 1536\] is not "
                                           r"inside \[512, 1024\] \(serve inside it, or re-export with a wider "
                                           r"--height\)$"):
        settings.served_profile(base, refiner)
    both = ShapeProfile((1, 1, 2), (512, 1024, 1024), (512, 1024, 1024))
    assert ServeSettings("/e").served_profile(base, refiner) == both  # (nothing narrowed: a request fits both)
    assert ServeSettings("/e").served_profile(base) is base.shape_profile
    # the texts' chunks are each model's own: a refiner that reads fewer takes the same served sizes
    longer = SimpleNamespace(shape_profile=replace(base.shape_profile, chunks=(1, 1, 3)), model_dims=dims)
    assert narrowed == ServeSettings("/e", shapes=(("height", (512, 768, 1024)),)).served_profile(
        longer, refiner).with_ranges(chunks="1")


def test_a_server_takes_the_sizes_every_loaded_engine_takes():
    """Without shapes, the newest TensorRT plans may take less than the directory's profile (a
    static U-Net built last): the default size and the refusals follow what all of them take."""
    from dataclasses import replace
    from types import SimpleNamespace

    from sdexport.errors import ProfileError
    from sdexport.serving.triton_model import ServeSettings, loaded_profiles, taken_by_all
    from sdexport.shapes import ShapeProfile

    exported = ShapeProfile((1, 1, 4), (256, 512, 1024), (256, 512, 1024))
    static = ShapeProfile((1, 1, 1), (768, 768, 768), (768, 768, 768))
    engines = {"text_encoder": SimpleNamespace(profile=exported), "unet": SimpleNamespace(profile=static)}
    base = loaded_profiles([SimpleNamespace(engines=engines)])
    named = ServeSettings("/e", set_by="serve").option
    assert taken_by_all(exported, base, named) == replace(static, chunks=exported.chunks)
    other = {"vae_decoder": SimpleNamespace(profile=ShapeProfile((1, 1, 1), (512, 512, 512), (512, 512, 512)))}
    with pytest.raises(ProfileError, match=r"^the engines share no height: vae_decoder takes 512-512, the rest "
                                           r"768-768; build every part for one profile.*\(sdexport serve --height\)$"):
        taken_by_all(exported, loaded_profiles([SimpleNamespace(engines=engines), SimpleNamespace(engines=other)]), named)


def test_a_server_told_its_shapes_takes_those_alone_and_sizes_a_request_by_them(tiny_engine_dir, tmp_path, monkeypatch):
    """``serve --height``: the opt is a request's size where it sends none (nor an image), a size
    the server was not told is refused naming serve's option, one taken from an image says so, a
    call holds at most the served batch (a request, the engines'), and the pipeline is loaded for
    those shapes at the fewest prompt chunks (TensorRT: the newest plan that covers them)."""
    from sdexport.runtime import loading
    from sdexport.serving.triton_model import ServedModel, ServeSettings
    from sdexport.shapes import ShapeProfile

    asked: list[object] = []
    real = loading.load_pipeline
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: asked.append(k["request_profile"]) or real(*a, **k))
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo", "--batch", "1", "--height", "64:64:128",
                   "--width", "96") == 0
    config = (tmp_path / "repo" / "sdexport" / "config.pbtxt").read_text()
    assert "\nmax_batch_size: 2\n" in config  # (the engines' batch: a request's images, served in calls of one)
    assert '"height" value: { string_value: "64:64:128" }' in config and '"width" value: { string_value: "96:96:96" }' in config
    logs: list[str] = []
    shapes = (("batch", (1, 1, 1)), ("height", (64, 64, 128)), ("width", (96, 96, 96)))
    model = ServedModel(ServeSettings(str(tiny_engine_dir), backend=BACKEND, shapes=shapes, set_by="serve"),
                        log=logs.append)
    try:
        exported = model.pipeline.profile
        fewest = (exported.chunks[0],) * 3
        assert asked == [ShapeProfile((1, 1, 1), (64, 64, 128), (96, 96, 96), fewest)]
        assert model.max_batch == 1 and "batch up to 1, sizes 64-128 x 96-96" in logs[-1]
        results = model.generate([_inputs(["a"], steps=2), _inputs(["b"], steps=2, height=128, width=128),
                                  _inputs(["c", "d"], steps=2, height=128, width=96),
                                  _inputs(["e"], steps=2, height=512, width=96),
                                  _inputs(["f"], steps=2, init_image=_png_of(np.zeros((128, 128, 3), np.uint8)))])
        assert not isinstance(results[0], str) and results[0][0].pixels.shape == (64, 96, 3)  # the served opt
        assert results[1] == ("width 128 is outside this server's profile: width must be in [96, 96] "
                              "(sdexport serve --width)")
        assert results[3].startswith("height 512 is outside this server's profile: height must be in [64, 128]")
        assert results[4] == ("width 128 is outside this server's profile: width must be in [96, 96] (sdexport serve "
                              "--width) (the size of init_image; give height and width with fit=resize or fit=crop)")
        assert not isinstance(results[2], str) and len(results[2]) == 2  # in two calls of one
        assert logs[-1].endswith("3 image(s) in 3 call(s) of 1, 1, 1")
    finally:
        model.close()


def test_a_size_taken_from_an_image_says_so_when_refused(served):
    big = _png_of(np.zeros((512, 512, 3), np.uint8))  # above the tiny engines' largest side
    [init] = served.generate([_inputs(["x"], steps=2, init_image=big, fit="resize")])
    assert isinstance(init, str) and init.endswith(
        "(the size of init_image; give height and width: fit=resize fits the image to them)"), init


def _declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, its data a few bytes: all a
    client needs to send to make a server that decodes first allocate gigabytes."""
    import struct
    import zlib

    png = bytearray(_png_of(np.zeros((8, 8), np.uint8)))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(png[24:29])  # (depth, colour, ...: as they were)
    png[12:29] = header
    png[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(png)


def test_images_are_checked_before_any_is_decoded(served, monkeypatch):
    """Images the model does not read, and images that declare more pixels than the server reads,
    are refused from their headers: nothing is decoded (a request of a few kilobytes declared
    81 million pixels six times over, and the server decoded them all before it refused them)."""
    from sdexport.runtime import image_inputs

    decoded: list[str] = []
    real = image_inputs._decode
    monkeypatch.setattr(image_inputs, "_decode",
                        lambda source, what, mode, made: decoded.append(what) or real(source, what, mode, made))
    huge = _declaring(9000, 9000)
    controls = {**_inputs(["x"], steps=2), "control_image": np.array([[huge] * 6], dtype=object)}
    largest = served.pipeline.profile.height[2] * served.pipeline.profile.width[2]
    results = served.generate([controls, _inputs(["x"], steps=2, init_image=huge),
                               _inputs(["x"], steps=2, adapter_image=huge)])
    assert results[0].startswith("control_image and its settings") and "exported with --controlnet" in results[0]
    assert results[1] == (f"init_image: 9000x9000 pixels, more than this server reads in one image "
                          f"({16 * largest / 1e6:.1f} megapixels, 16 times its engines' largest); send it smaller")
    assert results[2].startswith("adapter_image and its settings") and "exported with --adapter" in results[2]
    assert decoded == []
    fits = _png_of(np.zeros((64, 64, 3), np.uint8))  # within the limit: decoded as before
    assert not isinstance(served.generate([_inputs(["x"], steps=2, init_image=fits)])[0], str)
    assert decoded == ["init_image"]


def test_image_limits_count_what_a_row_sends_against_what_the_model_reads():
    from sdexport.runtime.request import MASKED_INIT
    from sdexport.serving.requests import ImageLimits

    one = _png_of(np.zeros((8, 8, 3), np.uint8))
    limits = ImageLimits(init=False, controls=2, adapters=0, pixels=64)
    limits.check({"control_image": [one, MASKED_INIT.encode()]})  # the marker is counted, not read
    for images, message in (({"control_image": [one] * 3}, "control_image: 3 sent for one image; this model reads at most 2"),
                            ({"init_image": [one]}, "init_image: this engine directory has no vae_encoder"),
                            ({"mask": [one]}, "mask: this engine directory has no vae_encoder"),
                            ({"adapter_image": [one]}, "need an engine directory exported with --adapter")):
        with pytest.raises(SdexportError, match=re.escape(message)):
            limits.check(images)
    with pytest.raises(SdexportError, match=re.escape("control_image: 9x8 pixels, more than this server reads")):
        limits.check({"control_image": [_png_of(np.zeros((8, 9, 3), np.uint8))]})
    with pytest.raises(SdexportError, match="control_image: not a readable image"):
        limits.check({"control_image": [b"not a png"]})


def test_sdxl_conditioning_is_refused_by_another_family_in_runs_words(served):
    """The served SD model refuses SDXL's and the refiner's inputs as ``run`` refuses their flags;
    a size out of range likewise."""
    sizes = {"original_size": np.array([[96, 80]], dtype=np.int32)}
    refused = served.generate([{**_inputs(["a"], steps=2), **sizes}, _inputs(["b"], steps=2, aesthetic_score=7.0)])
    assert refused == ["original_size: SDXL conditioning, but this is an SD model",
                       "aesthetic_score: the SDXL refiner's conditioning, but this is an SD model"]


def _in_input_names(cli_message: str) -> str:
    """``run``'s refusal as a served request should read it: each of ``run``'s options that is a
    served input named as that input (``--init-image``: ``init_image``); other commands' options
    (``exported with --controlnet``) as they are."""
    import re

    from sdexport.setting_names import run_option

    inputs = {run_option(spec.name): spec.name for spec in INPUTS}
    return re.sub(r"--[a-z0-9-]+", lambda flag: inputs.get(flag.group(0), flag.group(0)), cli_message)


@pytest.mark.parametrize("flags, inputs", [
    (["--strength", "0.5"], {"strength": 0.5}),
    (["--guidance", "-1"], {"guidance": -1.0}),
    (["--control-scale", "0.5"], {"control_scale": [0.5]}),
    (["--adapter-factor", "0.5"], {"adapter_factor": 0.5}),
    (["--init-image", "{init}", "--strength", "0.2"], {"init_image": "init", "strength": 0.2}),
    (["--negative-aesthetic-score", "2"], {"negative_aesthetic_score": 2.0}),
])
def test_a_served_refusal_is_runs_in_the_names_of_the_inputs(served, tiny_engine_dir, tmp_path, capsys, flags,
                                                            inputs):
    """A Triton client never ran ``sdexport run``: what it is told to change is named as the input it
    sends (``strength needs an init image (init_image)``), in the same sentence ``run`` says."""
    init = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    (tmp_path / "init.png").write_bytes(_png_of(init))
    args = [flag.format(init=tmp_path / "init.png") for flag in flags]
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "3", *args, "--backend", BACKEND,
                   "-o", tmp_path / "out.png") == 2
    # (run names the file it read, a request the input alone)
    said = capsys.readouterr().err.strip().removeprefix("error: ").replace(f" {tmp_path / 'init.png'}", "")
    sent = {name: _png_of(init) if value == "init" else value for name, value in {"steps": 3, **inputs}.items()}
    [refused] = served.generate([_inputs(["x"], **sent)])
    assert refused == _in_input_names(said) != said


def test_a_row_refused_by_the_checks_is_named_in_a_request_of_several(served):
    """Rows are checked one by one; a request of several says which image, as decoding does."""
    [refused] = served.generate([_inputs(["fine", "a (cat:1.2.3)"], steps=2, emphasis="original")])
    assert refused == "prompt: ':1.2.3)' is no weight: A1111's is a number, as in (word:1.2) (image 2 of the request)"
    [alone] = served.generate([_inputs(["a (cat:1.2.3)"], steps=2, emphasis="original")])
    assert alone == "prompt: ':1.2.3)' is no weight: A1111's is a number, as in (word:1.2)"


def test_a_served_refusal_gives_a_value_as_an_input_takes_it(served):
    """``run`` says ``pass --height 96 --width 128``; a client sets inputs, ``height=96``."""
    init = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    [refused] = served.generate([_inputs(["x"], steps=3, init_image=_png_of(init), height=64, width=64)])
    assert refused == ("init_image is 96x128 (HxW), the request 64x64: pass height=96 width=128 (within the engines' "
                       "profile), or fit=resize / fit=crop to make it fit")


def test_generate_counts_a_tuple_of_prompts_as_its_images(monkeypatch):
    """Two prompts in a tuple made two images, then 'the server answered 2 image(s) for 1 prompt(s)'."""
    import numpy as np
    import tritonclient.http as http

    from sdexport.serving import client

    class Answer:
        def as_numpy(self, name: str) -> np.ndarray:
            return np.array([[PNG + b"a"], [PNG + b"b"]], dtype=object)

    class Client:
        def __init__(self, url: str, **timeouts: float) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def infer(self, model: str, inputs: list, outputs: list) -> Answer:
            return Answer()

    monkeypatch.setattr(http, "InferenceServerClient", Client)
    assert client.generate("127.0.0.1:1", ("a", "b")) == [PNG + b"a", PNG + b"b"]


def test_the_client_numbers_seeds_as_run_does_and_always_sends_the_batching_inputs():
    import tritonclient.http as http

    from sdexport.serving.client import infer_inputs

    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, seed=7)}
    assert sorted(inputs) == ["prompt", "scheduler", "seed", "steps"]  # guidance: the family's, by the server
    assert inputs["seed"].shape() == [2, 1]
    assert "guidance" in {i.name() for i in infer_inputs(["a"], http, guidance=3.0)}
    # a string is one prompt, not one per character; seeds per prompt are as many as the prompts
    assert {i.name(): i for i in infer_inputs("ab", http)}["prompt"].shape() == [1, 1]
    with pytest.raises(ValueError, match="seed: 1 values for 2 prompts"):
        infer_inputs(["a", "b"], http, seed=[1])
    assert {i.name(): i for i in infer_inputs(("a", "b"), http)}["prompt"].shape() == [2, 1]  # a tuple of prompts
    assert {i.name(): i for i in infer_inputs(np.array(["a", "b"]), http)}["prompt"].shape() == [2, 1]  # numpy's str_
    for wrong, kind in (([b"a"], "bytes"), (3, "int")):  # (an AttributeError on .encode, a TypeError on len)
        with pytest.raises(ValueError, match=rf"^prompts: give a text or a list of texts \(str, not {kind}\)$"):
            infer_inputs(wrong, http)
    # one value for every image, or one per image (as the adapter images of a batch are)
    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, adapter_image=[b"png-a", b"png-b"], steps=[2, 3])}
    assert inputs["adapter_image"].shape() == inputs["steps"].shape() == [2, 1]
    with pytest.raises(ValueError, match="adapter_image: 3 values for 2 prompts"):
        infer_inputs(["a", "b"], http, adapter_image=[b"1", b"2", b"3"])
    # with several adapters: a tuple, one image per adapter, for every image or in a list per image
    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, adapter_image=(b"depth", b"sketch"),
                                                 adapter_scale=[0.8, 0.5])}
    assert inputs["adapter_image"].shape() == inputs["adapter_scale"].shape() == [2, 2]
    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, adapter_image=[(b"1", b"2"), (b"3", b"4")])}
    assert inputs["adapter_image"].shape() == [2, 2]
    with pytest.raises(ValueError, match="every image needs as many adapter images"):
        infer_inputs(["a", "b"], http, adapter_image=[(b"1", b"2"), b"3"])
    # control images: a list is one per ControlNet for every image; a list of lists, one per image
    assert infer_inputs(["a", "b"], http, control_image=[b"edges", b"depth"])[-1].shape() == [2, 2]
    assert infer_inputs(["a", "b"], http, control_image=[[b"1"], [b"2"]])[-1].shape() == [2, 1]
    # masked-init, a name and no file, goes as it is (mutation testing round 8: its exception to the
    # check that images are files' bytes, dropped, failed no test; the client refused serve's own input)
    assert infer_inputs(["a"], http, control_image=[b"edges", "masked-init"])[-1].shape() == [1, 2]
    with pytest.raises(ValueError, match="control_image: 3 lists for 2 prompts"):
        infer_inputs(["a", "b"], http, control_image=[[b"1"], [b"2"], [b"3"]])
    with pytest.raises(ValueError, match="control_image: give one list per image .*, not a mix of both"):
        infer_inputs(["a", "b"], http, control_image=[[b"1", b"2"], b"depth"])  # GenerationRequest's layout
    # ControlNet settings alike: a list of lists gives each image its own
    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, control_scale=[[0.5, 1.0], [0.7, 1.0]],
                                                 control_end=[0.8, 1.0])}
    assert inputs["control_scale"].shape() == inputs["control_end"].shape() == [2, 2]
    with pytest.raises(ValueError, match="control_scale: every image needs as many values"):
        infer_inputs(["a", "b"], http, control_scale=[[0.5, 1.0], [0.7]])
    # SDXL's sizes and crop: a pair for every image, or one per image
    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, original_size=(1024, 768),
                                                 crops_coords_top_left=[(0, 0), (64, 32)], aesthetic_score=7.0)}
    assert inputs["original_size"].shape() == inputs["crops_coords_top_left"].shape() == [2, 2]
    assert inputs["aesthetic_score"].shape() == [2, 1]
    with pytest.raises(ValueError, match="target_size: 3 pairs for 2 prompts"):
        infer_inputs(["a", "b"], http, target_size=[(1, 2), (3, 4), (5, 6)])
    with pytest.raises(ValueError, match="target_size: each is a pair"):
        infer_inputs(["a"], http, target_size=(1, 2, 3))
    with pytest.raises(ValueError, match="not a mix of both"):
        infer_inputs(["a", "b"], http, target_size=[(1, 2), 3])
    for value in ((1024.7, 1024), (2**32 + 512, 512)):  # numpy would send 1024, or wrap to 512
        with pytest.raises(ValueError, match="is not a whole number INT32 holds"):
            infer_inputs(["a"], http, original_size=value)
    # every number input alike: what numpy would cast, wrap or overflow is refused, not sent
    for given, message in ((dict(seed=-1), "seed: -1 is not a whole number UINT64 holds"),
                           (dict(steps=4.7), "steps: 4.7 is not a whole number INT32 holds"),
                           (dict(height=2**32 + 128, width=128), "height: 4294967424 is not a whole number INT32"),
                           (dict(guidance=1e300), r"guidance: 1e\+300 is beyond float32's range")):
        with pytest.raises(ValueError, match=message):
            infer_inputs(["a"], http, **given)
    assert {i.name(): i for i in infer_inputs(["a"], http, steps=20.0)}["steps"].shape() == [1, 1]  # a whole float
    assert infer_inputs(["a", "b"], http, original_size=np.array([1024, 768]))[-1].shape() == [2, 2]
    # numbers as text went to numpy, which parsed and wrapped them past the checks above (a height of
    # '4294967424' made a 128-pixel image); a range of seeds and an array of scales, as
    # GenerationRequest takes them, were a TypeError and a [2, 1, 2] tensor
    for given in (dict(height="4294967424", width=128), dict(seed=["-1"]), dict(guidance="5")):
        with pytest.raises(ValueError, match=r"is text; give a number$"):
            infer_inputs(["a"], http, **given)
    # None for one image of several: "not given" where the whole input is None, it went as the text
    # "None" (a negative prompt) or NaN (a guidance the server refused in words never sent), an audit
    for given, message in ((dict(negative_prompt=["x", None]), (r"^negative_prompt: None for one image; give every "
                                                                r"image a value \('' for no text\)$")),
                           (dict(guidance=[7.5, None]), r"^guidance: None for one image; give every image a value$")):
        with pytest.raises(ValueError, match=message):
            infer_inputs(["a", "b"], http, **given)
    inputs = {i.name(): i for i in infer_inputs(["a", "b"], http, seed=range(3, 5), guidance=np.array([5.0, 6.0]))}
    assert inputs["seed"].shape() == inputs["guidance"].shape() == [2, 1]
    # an image given as a path went as its text, a PIL image as its pixels: the server's "not a
    # readable image"; said here, with what to give (masked-init stays a control image's word)
    from PIL import Image

    for given, what in ((dict(init_image="x.png"), "a path"), (dict(init_image=Path("x.png")), "a path"),
                        (dict(mask=Image.new("L", (8, 8))), "an Image"), (dict(adapter_image=["x.png"]), "a path")):
        with pytest.raises(ValueError, match=rf"give the image file's bytes .*, not {what}$"):
            infer_inputs(["a"], http, **given)
    assert infer_inputs(["a"], http, control_image=[b"\x89PNG", "masked-init"])
    # one numpy seed for several prompts: numpy 1's uint64 + int is a float64, and seeds past 2^53
    # went rounded, two prompts on one seed
    seeds = {i.name(): i for i in infer_inputs(["a", "b"], http, seed=np.uint64(2**63 + 1))}["seed"]
    assert np.frombuffer(seeds._get_binary_data(), dtype=np.uint64).tolist() == [2**63 + 1, 2**63 + 2]


def test_requests_of_different_guidance_share_a_call_and_get_the_images_of_their_own(served, monkeypatch):
    """The server fills in the family's guidance (tiny: SD, 7.5) before it groups rows, and a call
    takes one scale per image: a request's image does not depend on the guidance of the requests
    it shares a call with."""
    from PIL import Image

    from sdexport.runtime.txt2img import Txt2ImgPipeline

    calls: list[float | list[float] | None] = []
    real = Txt2ImgPipeline.__call__

    def counting(self, request, **kwargs):
        calls.append(request.guidance)
        return real(self, request, **kwargs)

    monkeypatch.setattr(Txt2ImgPipeline, "__call__", counting)
    results = served.generate([_inputs(["a"], steps=2), _inputs(["b"], steps=2, guidance=7.5)])
    assert all(not isinstance(r, str) for r in results), results
    assert calls == [7.5]
    calls.clear()
    together = served.generate([_inputs(["a"], steps=2, seed=[4]), _inputs(["b"], steps=2, seed=[4], guidance=3.0)])
    same = served.generate([_inputs(["a"], steps=2, seed=[4], guidance=3.0), _inputs(["b"], steps=2, seed=[4], guidance=3.0)])
    assert calls == [[7.5, 3.0], 3.0]
    assert not isinstance(together[1], str) and not isinstance(same[1], str)
    np.testing.assert_array_equal(together[1][0].pixels, same[1][0].pixels)
    assert json.loads(Image.open(io.BytesIO(together[1][0].png)).text["sdexport"])["guidance"] == 3.0


def test_a_request_that_fails_a_shared_call_fails_alone(served):
    """A guidance far too high makes NaN/Inf; the request it shared a call with is generated again on
    its own and gets its image."""
    served.logs.clear()
    results = served.generate([_inputs(["a"], steps=2, seed=[4]), _inputs(["b"], steps=2, seed=[4], guidance=3e38)])
    assert not isinstance(results[0], str) and isinstance(results[1], str), results
    # (where the overflow shows, the loop or the VAE, depends on the model's weights)
    assert "produced NaN/Inf" in results[1] and "at guidance 3e+38" in results[1], results[1]
    [alone] = served.generate([_inputs(["a"], steps=2, seed=[4])])
    assert not isinstance(alone, str)
    np.testing.assert_array_equal(results[0][0].pixels, alone[0].pixels)
    assert any("a call of requests 1, 2 failed" in line and "each again on its own" in line for line in served.logs)
    # the calls that ran, the retries too: the shared one and each request's own (the second failed again)
    assert served.logs[-2].endswith("2 request(s), 2 image(s) in 3 call(s) of 2, 1, 1, 2 of them failed"), served.logs


def test_rows_of_one_request_must_share_a_size(served):
    [result] = served.generate([{**_inputs(["a", "b"], steps=2),
                                 "height": np.array([[64], [128]], np.int32), "width": np.array([[64], [128]], np.int32)}])
    assert isinstance(result, str) and "must share height and width" in result


# -- real servers ----------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """``count`` ports free now, outside the kernel's ephemeral range where it leaves room (below it,
    else above it). A port the kernel picks itself (binding to 0, an outgoing connection, the
    sockets PyTriton opens inside a server) comes from that range, so such a port could be taken by
    the time the server binds it; one outside it is taken only by a process that names it, as only
    these tests do, at random among thousands. Where the range leaves no such room, binding to 0 it
    is, with that window."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    pools = [range(10000, low), range(high + 1, 65536)]
    pool = next((p for p in pools if len(p) >= 64 * count), None)
    if pool is None:
        return _ports_from_the_kernel(count)
    chosen: list[int] = []
    for port in random.Random().sample(pool, 64 * count):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"no {count} free ports among {pool}")


def _ports_from_the_kernel(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import tritonclient.http as http

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with http.InferenceServerClient(url, connection_timeout=2) as client:
                if client.is_server_ready():
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no ready server at {url} after {timeout} s:\n{log.read_text()[-4000:]}")


class Server:
    def __init__(self, command: list[str], ports: list[int], log: Path, env: dict[str, str] | None = None) -> None:
        self.url, self.grpc_url, self.metrics = (f"127.0.0.1:{p}" for p in ports)
        self.log = log
        self.ended_on_purpose = False
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        try:
            _wait_ready(self.url, self.process, log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _serve(engine_dir: Path, log: Path, *extra: str) -> Server:
    ports = _free_ports(3)
    command = [sys.executable, "-m", "sdexport", "serve", str(engine_dir), "--backend", BACKEND, "--address", "127.0.0.1",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--max-queue-delay-ms", "1000", "--verbose", *extra]
    return Server(command, ports, log)


@pytest.fixture(scope="module")
def _servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for running in started:
        running.stop()


@pytest.fixture
def server(_servers: list[Server], tiny_engine_dir, tmp_path_factory) -> Server:
    """The module's server (a start costs a quarter of a minute here), started again after a test
    that ended it on purpose (the SIGTERM test); one that exited otherwise fails the next test.
    --max-steps 1000 lets the SIGTERM test keep a request in flight."""
    if _servers and _servers[-1].process.poll() is not None and not _servers[-1].ended_on_purpose:
        pytest.fail(f"the module's server exited with status {_servers[-1].process.returncode}:\n"
                    f"{_servers[-1].log.read_text()[-3000:]}")
    if not _servers or _servers[-1].ended_on_purpose:
        folder = tmp_path_factory.mktemp("serve")
        shutil.copytree(tiny_engine_dir, folder / SERVED_NAME)  # a path Triton's Python model reads only through a link
        _servers.append(_serve(folder / SERVED_NAME, folder / "serve.log", "--max-steps", "1000"))
    return _servers[-1]


SERVED_NAME = "modèles ü"
"""The module's server serves the tiny engines under this name: not ASCII (``serving.names``)."""


def test_triton_runs_with_sighup_ignored_and_serve_without(server):
    """A closed terminal's SIGHUP reaches serve's process group, where PyTriton starts Triton, which
    does not handle SIGHUP (run by hand, it ends at once): sh starts it in the background with SIGHUP
    ignored (held here, should either change), and serve stops on it and stops Triton with its drain."""
    def ignored(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status").read_text()
        return bool(int(status.split("SigIgn:")[1].split()[0], 16) & (1 << (signal.SIGHUP - 1)))

    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and b"tritonserver" in _cmdline(p)
                and f"PPid:\t{server.process.pid}\n" in (p / "status").read_text()]
    assert children and all(ignored(pid) for pid in children)
    assert not ignored(server.process.pid)


def test_a_request_to_the_server_returns_the_image_sdexport_run_writes(server, tiny_engine_dir, tmp_path):
    from PIL import Image

    from sdexport.serving.client import generate

    out = tmp_path / "cli.png"
    assert run_cli("run", tiny_engine_dir, "-p", "a lighthouse", "--steps", "3", "--seed", "9", "--backend", BACKEND,
                   "-o", out) == 0
    [png] = generate(server.url, ["a lighthouse"], steps=3, seed=[9])
    np.testing.assert_array_equal(_png_pixels(png), np.asarray(Image.open(out).convert("RGB")))
    (tmp_path / "served.png").write_bytes(png)  # the directory as served, not the link the server reads it by
    assert Path(read_parameters(tmp_path / "served.png")["engine_dir"]).name == SERVED_NAME
    [pixels] = generate(server.url, ["a lighthouse"], steps=3, seed=[9], pixels=True)
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(out).convert("RGB")))
    # a pair input (SDXL's sizes) goes through Triton to the model's own checks, which refuse it here
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="original_size: SDXL conditioning, but this is an SD model"):
        generate(server.url, ["a lighthouse"], steps=3, original_size=(96, 80))


def test_a_served_prompts_cut_is_said_in_tritons_log(server):
    """Not on the model process's stderr, which went to serve's terminal whatever its verbosity (the
    module's server runs with -v, its log shown there: a line of Triton's log is told by its words)."""
    from sdexport.serving.client import generate

    generate(server.url, ["z, " * 200], steps=1)
    for _ in range(50):
        lines = [line for line in server.log.read_text().splitlines() if "is longer than" in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines and all("sdexport: warning: prompt 1 is longer than" in line for line in lines), lines


def test_concurrent_requests_are_batched_and_bad_ones_refused_while_good_ones_succeed(server):
    import tritonclient.http as http

    from sdexport.serving.client import generate, infer_inputs

    def stats(client: http.InferenceServerClient) -> tuple[int, int]:
        [model] = client.get_inference_statistics("sdexport")["model_stats"]
        return int(model["execution_count"]), int(model["inference_count"])

    def settled(client: http.InferenceServerClient) -> tuple[int, int]:
        """The counts once the earlier tests' requests are all in them: Triton counts a request after
        its response has gone out, so the last one before this test may not be yet (seen once: one
        more image counted after the test had read them). A heuristic: the counts must stay the same
        for a second, and nothing bounds Triton's lag."""
        counts, deadline = stats(client), time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if (again := stats(client)) == counts:
                break
            counts = again
        return counts

    with http.InferenceServerClient(server.url, concurrency=3) as client:
        executions, inferences = settled(client)
        # The same inputs (Triton batches only requests that carry the same ones), one with a bad value.
        requests = {name: infer_inputs([name], http, steps=steps) for name, steps in
                    (("good-1", 2), ("bad", 1001), ("good-2", 2))}
        pending = {name: client.async_infer("sdexport", inputs) for name, inputs in requests.items()}  # sent at once
        results: dict[str, object] = {}
        for name, call in pending.items():
            try:
                results[name] = call.get_result().as_numpy("image")
            except Exception as exc:
                results[name] = exc
        assert results["good-1"].shape == results["good-2"].shape == (1, 1)  # type: ignore[union-attr]
        assert "steps 1001: this server allows at most 1000 steps (sdexport serve --max-steps)" in str(results["bad"])
        # Triton counts a request after its response has gone out, so the last one may still be on its way.
        deadline = time.monotonic() + 10
        while (after := stats(client))[1] - inferences < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        after_executions, after_inferences = after
    assert after_inferences - inferences == 3  # images asked for, the refused one included
    assert after_executions - executions < 3, "the concurrent requests should have shared a batch"
    assert generate(server.url, ["still serving"], steps=2)  # and the server goes on


def test_a_client_that_hangs_up_does_not_wedge_the_queue(server):
    import tritonclient.http as http

    from sdexport.serving.client import generate, infer_inputs

    with http.InferenceServerClient(server.url, network_timeout=0.2, connection_timeout=0.2) as client:
        with pytest.raises(Exception):  # noqa: B017 - a timeout of whichever kind the client raises
            client.infer("sdexport", infer_inputs(["slow"], http, steps=150))
    assert generate(server.url, ["after the hang-up"], steps=2)


def test_grpc_health_and_metrics_answer(server):
    import urllib.request

    import tritonclient.grpc as grpc

    with grpc.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready("sdexport")
        from sdexport.serving.client import infer_inputs

        result = client.infer("sdexport", infer_inputs(["over grpc"], grpc, steps=2),
                              outputs=[grpc.InferRequestedOutput("image")])
        assert _png_pixels(result.as_numpy("image")[0][0]).shape == (128, 128, 3)
    metrics = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10).read().decode()
    assert 'nv_inference_count{model="sdexport"' in metrics
    # GPU metrics are asked for only where NVML starts: elsewhere DCGM's complaint reached the console
    assert "Failed to initialize NVML" not in server.log.read_text()


def test_loadtest_reports_throughput_latency_and_batching(server, tmp_path):
    assert run_cli("loadtest", "--url", server.url, "-c", "3", "-n", "6", "--steps", "2", "-o", tmp_path / "load") == 0
    report = json.loads((tmp_path / "load" / "loadtest.json").read_text())
    assert report["succeeded"] == 6 and report["errors"] == {}
    assert 0 < report["latency_s"]["p50"] <= report["latency_s"]["p95"] <= report["latency_s"]["p99"]
    assert report["server"]["inferences"] == 6
    assert "| succeeded |" in (tmp_path / "load" / "loadtest.md").read_text()
    assert (report["concurrency"], report["clients"]) == (3, 3)
    # more clients asked than requests (a duration too): as many as the requests start, both recorded
    assert run_cli("loadtest", "--url", server.url, "-c", "8", "-n", "2", "--duration", "60", "--steps", "2",
                   "-o", tmp_path / "few") == 0
    few = json.loads((tmp_path / "few" / "loadtest.json").read_text())
    assert (few["concurrency"], few["clients"], few["succeeded"]) == (8, 2, 2)
    assert "2 concurrent clients (8 asked: no more than the requests)" in (tmp_path / "few" / "loadtest.md").read_text()


def test_loadtest_given_a_duration_alone_runs_until_it_ends(monkeypatch, tmp_path):
    """Not until the request count's default (16) either: `--duration 20` stopped after 16 requests.
    A client needs tritonclient alone: not PyTriton, nor numpy 1.x (a client machine of a stock server)."""
    import importlib.metadata
    import importlib.util

    from sdexport.serving import loadtest

    real_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.4.6" if name == "numpy" else real_version(name))

    plans: list[object] = []

    def planned(plan, prompt, files):
        plans.append(plan)
        raise SdexportError("planned")

    monkeypatch.setattr(loadtest, "run_load", planned)
    for extra in (["--duration", "20"], [], ["--duration", "20", "-n", "5"], ["-n", "0", "--duration", "3"]):
        assert run_cli("loadtest", *extra, "-o", tmp_path / "out") == 2
    assert [(p.requests, p.duration_s) for p in plans] == [(0, 20.0), (16, 0.0), (5, 20.0), (0, 3.0)]


def test_loadtest_sends_one_side_alone_as_serve_takes_it(monkeypatch, tmp_path):
    """--height alone was refused ("give both, or neither"); serve takes the other side's default."""
    from sdexport.serving import loadtest

    plans: list[object] = []

    def planned(plan, prompt, files):
        plans.append(plan)
        raise SdexportError("planned")

    monkeypatch.setattr(loadtest, "run_load", planned)
    assert run_cli("loadtest", "--url", "127.0.0.1:1", "--height", "128", "-o", tmp_path / "out") == 2
    [plan] = plans
    assert plan.params["height"] == 128 and "width" not in plan.params


def test_loadtest_refuses_what_no_model_takes_before_it_asks_a_server(monkeypatch, tmp_path, tiny_engine_dir, capsys):
    """With no server there, these were "no Triton server answers there"; against one, a load of
    failed requests (or 100000 client threads for 16 requests). An engine directory as -o took the
    report into it (files its manifest does not list)."""
    from sdexport.serving import loadtest

    monkeypatch.setattr(loadtest, "run_load", lambda *a, **k: pytest.fail("a server was asked"))
    for extra, message in ((["-c", "100000"], "--concurrency 100000: at most 1024 clients"),
                           (["--steps", "0"], "--steps 0: need at least 1 step"),
                           (["--guidance", "nan"], "--guidance nan: need a finite number, 0 or more"),
                           (["--guidance", "-1"], "--guidance -1.0: need a finite number, 0 or more"),
                           # (the clients' wait was an OverflowError traceback after the run, no report)
                           (["--duration", "1e10"], "--duration 1e+10: at most 2592000 seconds (30 days)"),
                           (["-o", tiny_engine_dir], f"inside the engine directory {tiny_engine_dir}")):
        args = ["-o", tmp_path / "out", *extra] if "-o" not in extra else extra
        assert run_cli("loadtest", "--url", "localhost:9", *args) == 2
        assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists() and not (tiny_engine_dir / "loadtest.json").exists()


def test_loadtest_sends_an_init_image_and_mask(server, tmp_path):
    """img2img and inpainting load (and the SDXL refiner's, which takes nothing else): every request
    carries the files' bytes; the report names them."""
    from pictures import box_mask, picture

    picture(128, 128, 1).save(tmp_path / "init.png")
    box_mask(128, 128).save(tmp_path / "mask.png")
    assert run_cli("loadtest", "--url", server.url, "-c", "2", "-n", "2", "--steps", "4", "--init-image",
                   tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--strength", "0.5",
                   "-o", tmp_path / "load") == 0
    report = json.loads((tmp_path / "load" / "loadtest.json").read_text())
    assert report["succeeded"] == 2 and report["errors"] == {}, report["errors"]
    assert report["params"]["init_image"] == str(tmp_path / "init.png") and report["params"]["strength"] == 0.5


def test_loadtest_refuses_images_every_request_would_fail_on_and_says_when_none_succeeded(server, tmp_path, capsys):
    """Images of another size than each other or the request's, and a strength out of range, are
    refused before the first request (nothing is written); a run whose every request is refused
    writes its report and exits non-zero, naming the server's reason."""
    from pictures import box_mask, picture

    picture(128, 128, 1).save(tmp_path / "init.png")
    box_mask(64, 64).save(tmp_path / "small-mask.png")
    image = ["--url", server.url, "-n", "2", "--init-image", tmp_path / "init.png"]
    for extra, message in ((["--mask", tmp_path / "small-mask.png"], "--mask is 64x64 (HxW), --init-image 128x128"),
                           (["--height", "64", "--width", "64"], "--height/--width 64x64, but --init-image is 128x128"),
                           (["--strength", "5"], "--strength 5.0: need a number above 0 and at most 1")):
        assert run_cli("loadtest", *image, *extra, "-o", tmp_path / "never") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "never").exists()
    assert run_cli("loadtest", "--url", server.url, "-c", "1", "-n", "2", "--steps", "1001", "-o", tmp_path / "load") == 2
    err = capsys.readouterr().err.strip()
    assert "no request succeeded (2 failed), e.g.: steps 1001: this server allows at most" in err, err
    assert json.loads((tmp_path / "load" / "loadtest.json").read_text())["errors"]


def test_the_readme_requests_work_when_pasted(server, tiny_engine_dir, tmp_path):
    """The README's blocks that talk to a server (``docs-check: serve``: curl, tritonclient and
    loadtest), pasted against this one at its address: the curl and tritonclient recipes write the
    image ``sdexport run`` writes with the same prompt and steps (seed 0 both), and loadtest
    answers every request it sends."""
    from PIL import Image
    from readme_blocks import blocks, paste, reader_environment, sdexport_commands

    expected = tmp_path / "run.png"
    assert run_cli("run", tiny_engine_dir, "-p", "a lighthouse at dusk", "--steps", "20", "--backend", BACKEND,
                   "-o", expected) == 0
    env = reader_environment(tmp_path / "bin")
    pasted = [b for b in blocks() if b.check == "serve"]
    assert len(pasted) >= 3
    for block in pasted:
        folder = tmp_path / f"block-{block.line}"
        folder.mkdir()
        done = paste(block, folder, env, block.text.replace("localhost:8000", server.url), timeout=600)
        assert done.returncode == 0, f"README block at line {block.line}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if "served.png" in block.text:
            np.testing.assert_array_equal(np.asarray(Image.open(folder / "served.png").convert("RGB")),
                                          np.asarray(Image.open(expected).convert("RGB")))
        else:  # a new serve block needs its own check here
            assert "sdexport loadtest" in block.text, f"README block at line {block.line}: what should it give?"
            [args] = sdexport_commands(block.text)
            report = json.loads((folder / args[args.index("-o") + 1] / "loadtest.json").read_text())
            assert report["errors"] == {} and report["succeeded"] == int(args[args.index("-n") + 1])


def _fake_triton(monkeypatch, answers: list, held: threading.Event | None = None) -> list:
    """tritonclient's HTTP client answering each request with the next of ``answers`` (its image
    output, or None for none), once ``held`` is set where given; returns the request timeouts its
    clients were given."""
    import tritonclient.http

    from sdexport.serving import loadtest

    pending, timeouts = iter(answers), []

    class Answer:
        def __init__(self, images):
            self.images = images

        def as_numpy(self, name):
            return self.images if name == "image" else None

    class Server:
        def __init__(self, *args, **kwargs):
            timeouts.append(kwargs.get("network_timeout"))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def is_model_ready(self, model):
            return True

        def get_inference_statistics(self, model):
            return {"model_stats": [{"execution_count": 0, "inference_count": 0}]}

        def infer(self, model, inputs, outputs):
            if held is not None:
                held.wait(60)
            return Answer(next(pending))

    monkeypatch.setattr(tritonclient.http, "InferenceServerClient", Server)
    monkeypatch.setattr(loadtest, "STATS_SETTLE_S", 0.0)
    return timeouts


def test_the_client_refuses_an_answer_without_the_images(monkeypatch):
    """A server or proxy answering 200 without the image output gave ``generate`` a bare TypeError
    (an audit's fake server); it says what the answer lacked, as loadtest counts it."""
    import numpy as np

    from sdexport.serving.client import generate

    _fake_triton(monkeypatch, [None, np.array([[PNG]], dtype=object), np.array([[b""]], dtype=object),
                               np.array([[b"<html>502 Bad Gateway</html>"]], dtype=object),
                               np.array([PNG], dtype=object), np.array([[5]], dtype=np.int32),
                               np.array([[PNG + b"..."]], dtype=object)])
    with pytest.raises(RuntimeError, match=r"^localhost:1: the server answered without an image output$"):
        generate("localhost:1", "a cat")
    with pytest.raises(RuntimeError, match=r"answered 1 image\(s\) for 2 prompt\(s\)$"):
        generate("localhost:1", ["a cat", "a dog"])
    with pytest.raises(RuntimeError, match=r"answered an empty image$"):
        generate("localhost:1", "a cat")
    # a proxy's error page, or a model answering a column of images (no batch axis): not a success
    with pytest.raises(RuntimeError, match=r"answered an image that is not a PNG file \(it begins b'<html>502 Bad Gat"):
        generate("localhost:1", "a cat")
    with pytest.raises(RuntimeError, match=r"answered images of shape \[1\], not \[N, 1\]$"):
        generate("localhost:1", "a cat")
    with pytest.raises(RuntimeError, match=r"answered an image that is not a PNG file \(it begins 'int32'\)$"):
        generate("localhost:1", "a cat")  # (len() of a number was a TypeError, an audit)
    assert generate("localhost:1", "a cat") == [PNG + b"..."]


def test_loadtest_replaces_its_own_report_but_not_a_table_edited_since(monkeypatch, tmp_path, capsys):
    """A loadtest.md annotated by hand beside the run's loadtest.json was replaced by the next run
    (an audit's finding): the report records the table's hash, and an edited table is refused."""
    import numpy as np

    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)] * 8)
    out = tmp_path / "load"
    for _ in range(2):  # the second run replaces the first's report
        assert run_cli("loadtest", "--url", "localhost:1", "-n", "2", "-c", "1", "-o", out) == 0
    table = out / "loadtest.md"
    table.write_text(table.read_text() + "\nmy analysis\n")
    capsys.readouterr()
    assert run_cli("loadtest", "--url", "localhost:1", "-n", "2", "-c", "1", "-o", out) == 2
    assert f"{table} exists and is not as sdexport loadtest wrote it" in capsys.readouterr().err
    assert table.read_text().endswith("my analysis\n")
    table.unlink()  # (a report whose table is gone is replaced; one given a note is not)
    report = out / "loadtest.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "note": "before the kernel update"}))
    assert run_cli("loadtest", "--url", "localhost:1", "-n", "2", "-c", "1", "-o", out) == 2
    assert f"{report} exists and is not as sdexport loadtest wrote it" in capsys.readouterr().err
    # edited while the load runs (an audit's race): kept, and the results still shown
    from sdexport.serving import loadtest

    report.unlink()
    assert run_cli("loadtest", "--url", "localhost:1", "-n", "2", "-c", "1", "-o", out) == 0, capsys.readouterr().err
    real = loadtest.run_load

    def annotated_meanwhile(*args, **kwargs):
        table.write_text(table.read_text() + "\nnoted during the run\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(loadtest, "run_load", annotated_meanwhile)
    capsys.readouterr()
    assert run_cli("loadtest", "--url", "localhost:1", "-n", "2", "-c", "1", "-o", out) == 2
    captured = capsys.readouterr()
    assert f"{table} was changed while the load test ran, so it is not replaced" in captured.err
    assert table.read_text().endswith("noted during the run\n") and "| " in captured.out


def test_loadtest_counts_an_answer_without_the_images_as_an_error(monkeypatch):
    """A server (or a proxy before it) answering 200 with no image output, or too few images, was
    counted a success, and its throughput reported. With --duration the run waits at most a minute
    past its end (a server that never answered held `--duration 3` for 600 s), and counts the requests
    still out apart; each request keeps the whole timeout (a slow answer is latency, not an error)."""
    import numpy as np

    from sdexport.serving import loadtest

    timeouts = _fake_triton(monkeypatch, [None, np.array([[PNG]], dtype=object),
                                          np.array([[b""], [PNG]], dtype=object),
                                          np.array([[PNG], [PNG]], dtype=object), np.array([[PNG]], dtype=object)])
    plan = loadtest.LoadPlan(url="localhost:1", concurrency=1, requests=4, prompts_per_request=2)
    report = loadtest.run_load(plan, "a lighthouse")
    assert report["succeeded"] == 1 and report["requests"] == 4
    assert report["errors"] == {"answered without an image output": 1, "answered 1 image(s) for 2 prompt(s)": 1,
                                "answered an empty image": 1}
    assert 600.0 in timeouts
    held = threading.Event()
    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)], held)
    monkeypatch.setattr(loadtest, "LATE_S", 0.5)
    report = loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=2, requests=0, duration_s=0.2),
                               "a lighthouse")  # (made while the server still holds both requests)
    held.set()  # (the clients left behind answer now, and record nothing)
    assert report["succeeded"] == 0 and report["errors"] == {"unanswered 0.5 s after --duration ended": 2}


def _server_gone_after(monkeypatch, answered: int) -> None:
    """A fake Triton that answers ``answered`` requests, then refuses connections (stopped)."""
    import numpy as np

    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)] * answered)
    import tritonclient.http

    served, left = tritonclient.http.InferenceServerClient.infer, [answered]

    def infer(self, model, inputs, outputs):
        if not left[0]:
            raise ConnectionRefusedError(111, "Connection refused")
        left[0] -= 1
        return served(self, model, inputs, outputs)

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "infer", infer)


def test_loadtest_ends_when_the_server_refuses_connections(monkeypatch):
    """A server gone mid-run: each client tried again at once for the rest of --duration ("41695
    requests in 40 s", 41653 of them refused). The run now ends at the first refusal of each client."""
    from sdexport.serving import loadtest

    _server_gone_after(monkeypatch, 3)
    started = time.perf_counter()
    report = loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=2, requests=0, duration_s=30),
                               "a lighthouse")
    assert time.perf_counter() - started < 10
    assert report["succeeded"] == 3 and list(report["errors"]) == ["[Errno 111] Connection refused"]
    assert report["errors"]["[Errno 111] Connection refused"] <= 2  # (a client each at most: the other may stop first)
    assert report["ended_early_s"] < 10 and "**Ended early**: the server refused connections" in loadtest.markdown(report)


def test_loadtest_exits_non_zero_when_the_server_went_away(monkeypatch, tmp_path, capsys):
    """Its report said so, but the exit was 0: a CI gate read a run the server died in as a pass."""
    _server_gone_after(monkeypatch, 3)
    assert run_cli("loadtest", "--url", "localhost:1", "-c", "2", "--duration", "30", "-o", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: the server refused connections (stopped, or restarting) " in err
    assert f"s into the run, which then ended; the report of what it answered: {tmp_path / 'out' / 'loadtest.json'}" in err
    assert json.loads((tmp_path / "out" / "loadtest.json").read_text())["succeeded"] == 3


def test_loadtest_runs_where_the_statistics_are_restricted_and_ends_where_every_request_is_refused(monkeypatch):
    """PyTriton restricts the statistics endpoint by default: the load test refused such a server as
    "no Triton server answers there"; it runs, without the batching figures. A setting the server's
    limits refuse (--steps past serve --max-steps) was sent hundreds of times a second for the whole
    --duration: the run ends once every client's first answers were that one refusal."""
    import tritonclient.http
    from tritonclient.utils import InferenceServerException

    from sdexport.serving import loadtest

    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)] * 2)

    def restricted(self, model):
        raise InferenceServerException("This API is restricted, expecting header 'triton-access-token'", "403")

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "get_inference_statistics", restricted)
    report = loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=1, requests=2), "a lighthouse")
    assert report["succeeded"] == 2 and report["server"] is None and report["ended_early_s"] is None
    assert "| 2 | 0 |" in loadtest.markdown(report)

    def refused(self, model, inputs, outputs):
        raise InferenceServerException("steps 60: this server allows at most 50 steps", "400")

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "infer", refused)
    started = time.perf_counter()
    report = loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=2, requests=0, duration_s=30),
                               "a lighthouse")
    assert time.perf_counter() - started < 10 and report["succeeded"] == 0
    assert list(report["errors"]) == ["steps 60: this server allows at most 50 steps"]
    assert report["errors"]["steps 60: this server allows at most 50 steps"] <= 2 * loadtest.REFUSED_RUN + 2
    assert "**Ended early**: the server refused every request, with the same answer" in loadtest.markdown(report)
    report = loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=2, requests=4), "a lighthouse")
    assert report["requests"] == 4 and report["ended_early_s"] is None  # (every one sent: nothing ended early)


def test_loadtest_ends_early_only_on_one_refusal_repeated(monkeypatch):
    """Only answers that are all the same HTTP 400 refusal end the run early: server errors (500, the
    server's own failure, which the run is there to count) and refusals that differ run the whole
    --duration, counted (mutation testing round 8: the 400 and the one-message conditions, each
    dropped, failed no test; the run ended saying "refused every request, with the same answer")."""
    import itertools

    import tritonclient.http
    from tritonclient.utils import InferenceServerException

    from sdexport.serving import loadtest

    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)])
    sent = itertools.count()

    def failing(self, model, inputs, outputs):
        raise InferenceServerException("the U-Net failed: out of memory", "500")

    def two_refusals(self, model, inputs, outputs):
        raise InferenceServerException(f"steps {60 + next(sent) % 2}: this server allows at most 50 steps", "400")

    for infer in (failing, two_refusals):
        monkeypatch.setattr(tritonclient.http.InferenceServerClient, "infer", infer)
        report = loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=1, requests=0, duration_s=0.5),
                                   "a lighthouse")
        assert report["succeeded"] == 0 and report["ended_early_s"] is None, report
        assert sum(report["errors"].values()) > 2 * loadtest.REFUSED_RUN


def test_an_interrupted_loadtest_writes_what_it_measured_before(monkeypatch, tmp_path, capsys):
    """Ctrl-C ten minutes into a load test kept nothing of it: the report of the time before is
    written (marked interrupted), and the command still ends as stopped (130), without waiting for
    Triton's counters to settle (up to 5 s: mutation testing round 8's one gap left open)."""
    import tritonclient.http

    from sdexport.serving import loadtest

    settled = []
    monkeypatch.setattr(loadtest, "_settled_stats", lambda *args: settled.append(args))
    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)] * 1000)
    served = tritonclient.http.InferenceServerClient.infer

    first, timers = threading.Lock(), []

    def slow(self, model, inputs, outputs):
        # the Ctrl-C comes 1.5 s after the first request, not 2 s after the command began: the CLI's
        # start (its imports, the plan's checks) took over a second on a busy machine, and the run
        # was then stopped 0.5 s into the load
        if first.acquire(blocking=False):
            timers.append(threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)))
            timers[0].start()
        time.sleep(0.1)
        return served(self, model, inputs, outputs)

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "infer", slow)
    out = tmp_path / "load"
    try:
        assert run_cli("loadtest", "--url", "localhost:1", "--duration", "60", "-c", "2", "-o", out) == 130
    finally:  # (a load that ended before it must not stop the tests after this one)
        for timer in timers:
            timer.cancel()
    report = json.loads((out / "loadtest.json").read_text())
    assert report["succeeded"] >= 2 and 1 < report["interrupted_s"] < 30
    assert "**Interrupted**" in (out / "loadtest.md").read_text()
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(rf"interrupted; the report of the \d+ s before: {re.escape(str(out / 'loadtest.json'))}", err)
    assert settled == []


def test_a_loadtest_stopped_while_the_counters_settle_keeps_its_report(monkeypatch):
    """A stop after the last answer, while Triton's counters are read again (up to 5 s), lost the
    whole report: LoadStopped carries it, the figures whole, the batching ones left out."""
    import tritonclient.http

    from sdexport.serving import loadtest

    _fake_triton(monkeypatch, [np.array([[PNG]], dtype=object)] * 2)
    reads = []

    def statistics(self, model):
        reads.append(model)
        if len(reads) > 1:  # (the read after the load)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        return {"model_stats": [{"execution_count": 0, "inference_count": 0}]}

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "get_inference_statistics", statistics)
    with pytest.raises(loadtest.LoadStopped) as stopped:
        loadtest.run_load(loadtest.LoadPlan(url="localhost:1", concurrency=1, requests=2), "a lighthouse")
    report = stopped.value.report
    assert report["succeeded"] == 2 and report["interrupted_s"] is not None and report["server"] is None


def test_loadtest_says_why_a_model_is_not_ready(monkeypatch):
    """An unknown --model was told "not ready" as a loading one is."""
    from sdexport.serving import loadtest

    _fake_triton(monkeypatch, [])
    import tritonclient.http

    class Unknown(Exception):
        def message(self) -> str:
            return "Request for unknown model: 'sdxl' is not found"

    def metadata(self, model):
        raise Unknown()

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "is_model_ready", lambda self, model: False)
    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "get_model_metadata", metadata, raising=False)
    with pytest.raises(SdexportError, match=r"^localhost:1: model 'sdxl' is not ready \(Request for unknown model: "
                                            r"'sdxl' is not found\)$"):
        loadtest.run_load(loadtest.LoadPlan(url="localhost:1", model="sdxl"), "a lighthouse")


def test_loadtest_waits_for_triton_to_count_the_last_batch(monkeypatch):
    """Triton answers a batch before it counts it: the counters are read again until they cover
    every image answered, and taken as they are once the moment allowed has passed."""
    from sdexport.serving import loadtest

    class Lagging:
        def __init__(self, counts):
            self.counts, self.reads = list(counts), 0

        def get_inference_statistics(self, model):
            self.reads += 1
            count = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
            return {"model_stats": [{"execution_count": count, "inference_count": count}]}

    client = Lagging([4, 4, 6])
    assert loadtest._settled_stats(client, "sdexport", served=6) == {"executions": 6, "inferences": 6}
    assert client.reads == 3
    monkeypatch.setattr(loadtest, "STATS_SETTLE_S", 0.2)
    short = Lagging([4])
    assert loadtest._settled_stats(short, "sdexport", served=6)["inferences"] == 4  # never there: as it is
    assert 2 <= short.reads


def _sigterm_with_a_request_in_flight(running: Server, steps: int) -> dict[str, object]:
    """SIGTERM to the sdexport process alone (as `kill` or a container stop) a second into a request
    of ``steps`` steps; what the request got: its "images", or an "error"."""
    from sdexport.serving.client import generate

    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["images"] = generate(running.url, ["in flight"], steps=steps)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), "the request should still be generating"
    running.process.send_signal(signal.SIGTERM)
    thread.join(120)
    return result


def test_sigterm_lets_the_request_in_flight_finish(server: Server):
    running = server
    running.ended_on_purpose = True  # a later test gets a new one
    try:
        result = _sigterm_with_a_request_in_flight(running, 400)
        assert "images" in result, result
        assert running.process.wait(90) in (0, 130)
        assert "Waiting for in-flight requests to complete" in running.log.read_text()
    finally:
        running.stop()


def test_the_server_started_by_a_background_serve_stops_on_sigint():
    """A script's background job ignores SIGINT, and tritonserver inherited that until its handler
    went in after the load: PyTriton's stop (SIGINT) did nothing, and a SIGTERM 1 s into the load
    ended serve a drain and a minute later (an audit's finding). Started inside stoppable_children,
    a child takes SIGINT's default; this process still ignores it."""
    from sdexport.serving.server import stoppable_children

    ask = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert subprocess.run(ask, capture_output=True, text=True).stdout.strip() == "True"
        with stoppable_children():
            assert subprocess.run(ask, capture_output=True, text=True).stdout.strip() == "False"
            os.kill(os.getpid(), signal.SIGINT)  # (ignored here still: no KeyboardInterrupt)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_pytriton_waits_for_the_drain_before_it_kills_the_server(monkeypatch):
    """PyTriton's stop sends SIGINT, waits its SERVER_OUTPUT_TIMEOUT_SECS (30 s), then kills the
    server: a --drain-timeout over about 30 s was cut short, its requests dropped."""
    import pytriton.server.triton_server as triton_server
    import pytriton.triton

    from sdexport.serving.server import EXIT_MARGIN_S, pytriton_waits

    monkeypatch.setattr(triton_server, "SERVER_OUTPUT_TIMEOUT_SECS", triton_server.SERVER_OUTPUT_TIMEOUT_SECS)
    monkeypatch.setattr(pytriton.triton, "DEFAULT_TRITON_STARTUP_TIMEOUT_S", pytriton.triton.DEFAULT_TRITON_STARTUP_TIMEOUT_S)
    pytriton_waits(900, 300)
    assert triton_server.SERVER_OUTPUT_TIMEOUT_SECS == 300 + EXIT_MARGIN_S
    assert pytriton.triton.DEFAULT_TRITON_STARTUP_TIMEOUT_S == 900


def test_a_stop_whose_drain_timeout_drops_a_request_says_so_and_exits_non_zero(tiny_engine_dir, tmp_path):
    """Triton exits with a failure when its exit timeout runs out with a request in flight; PyTriton
    only logs a warning, and `serve` used to exit 0 as after a clean stop."""
    running = _serve(tiny_engine_dir, tmp_path / "serve.log", "--drain-timeout", "1", "--max-steps", "1000")
    try:
        # 999: what the model takes at most (1000 reach timestep 1000 with its steps_offset, refused
        # at once); seconds here
        result = _sigterm_with_a_request_in_flight(running, 999)
        assert "error" in result and "steps 999" not in str(result["error"]), result  # dropped: no image
        assert running.process.wait(90) not in (0, 130)
        errors = [line for line in running.log.read_text().splitlines() if line.startswith("error:")]
        # (the request's own connection, open while it runs, is the one Triton waited for)
        assert len(errors) == 1 and "still waiting for 1 client connection(s) to close" in errors[0], errors
        assert "the --drain-timeout of 1 s ran out" in errors[0] and "were dropped" in errors[0]
        assert not _stubs_of(running.process.pid)  # none left holding the model
    finally:
        running.stop()


class _FakeTritonProcess:
    """What the model watch reads of PyTriton's Triton: its stubs' prefix, the server's process."""

    def __init__(self, prefix: str) -> None:
        from types import SimpleNamespace

        self.killed = False
        self.exit_code = None
        self._python_backend_config = SimpleNamespace(_backend_args={"shm-region-prefix-name": prefix})
        self._triton_server = SimpleNamespace(_tritonserver_running_cmd=SimpleNamespace(process=self),
                                              _tritonserver_logs="")
        self._stopped = False

    def kill(self) -> None:
        self.killed = True


def _fake_stub(prefix: str) -> subprocess.Popen:
    """A process whose command line reads as a Python backend stub of the server with ``prefix``."""
    command = (f'exec -a /opt/tritonserver/backends/python/triton_python_backend_stub {sys.executable} '
               f'-c "import time; time.sleep(60)" {prefix}-sdexport_0_0')
    return subprocess.Popen(["bash", "-c", command])


@pytest.mark.parametrize("stopped", [None, "serve asked", "pytriton stopping", "triton signalled"])
def test_a_model_process_that_dies_while_serving_ends_the_server(monkeypatch, stopped):
    """A stub killed (the OOM killer, kill -9) or crashed left Triton saying it was ready and failing
    every request, and serve silent; a stop then waited the drain and blamed it (an audit). The
    server is killed and serve says why. Stubs also end as a stop unloads the model: then nothing."""
    from sdexport import stopping
    from sdexport.serving import server as serving

    monkeypatch.setattr(serving, "MODEL_WATCH_PERIOD_S", 0.05)
    monkeypatch.setattr(serving, "MODEL_WATCH_GRACE_S", 0.2)
    monkeypatch.setattr(serving, "_server_exited", lambda triton: triton.exit_code is not None)
    prefix = f"pytrtion{os.getpid()}-{random.randrange(16**8):08x}"
    stub = _fake_stub(prefix)
    triton = _FakeTritonProcess(prefix)
    try:
        for _ in range(100):  # (bash has exec'd into it)
            if serving._stub_pids(prefix):
                break
            time.sleep(0.05)
        assert serving._stub_pids(prefix) == [stub.pid]
        watch = serving._ModelWatch(triton)
        time.sleep(0.2)
        assert watch.ended is None and not triton.killed  # (running)
        if stopped == "serve asked":
            monkeypatch.setattr(stopping, "_requested", signal.SIGTERM)
        elif stopped == "pytriton stopping":
            triton._stopped = True
        elif stopped == "triton signalled":  # (Ctrl-C where serve ignores SIGINT: Triton's own stop)
            triton._triton_server._tritonserver_logs = "I1207 12:00:00.000 1 server.cc:1] ready\nSignal (2) received.\n"
        stub.kill()
        stub.wait()
        for _ in range(200 if stopped is None else 15):  # (a look and the grace: 0.25 s; room for a busy machine)
            if triton.killed:
                break
            time.sleep(0.05)
        watch.done()
        assert (watch.ended, triton.killed) == ((stub.pid, True) if stopped is None else (None, False))
    finally:
        stub.kill()
        stub.wait()


@pytest.mark.slow
def test_a_served_model_whose_process_is_killed_ends_serve_saying_why(tiny_engine_dir, tmp_path):
    """The audit's case, whole: the stub SIGKILLed while the server is idle."""
    running = _serve(tiny_engine_dir, tmp_path / "serve.log", "--drain-timeout", "30")
    try:
        for _ in range(100):  # (ready to Triton's clients a moment before serve watches and says so)
            if "\nhttp://" in running.log.read_text():
                break
            time.sleep(0.1)
        [stub] = _stubs_of(running.process.pid)
        os.kill(stub, signal.SIGKILL)
        began = time.monotonic()
        assert running.process.wait(60) == 2
        assert time.monotonic() - began < 20  # (not the drain: nothing could have finished)
        errors = [line for line in running.log.read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"the model's process (pid {stub}) ended while serving" in errors[0], errors
        assert not _stubs_of(running.process.pid)
    finally:
        running.stop()


def _stubs_of(pid: int) -> list[int]:
    """The Python backend stubs of the server that process ``pid`` started (PyTriton's prefix)."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and f"pytrtion{pid}-".encode() in (_cmdline(p) or b"") and b"triton_python_backend_stub" in _cmdline(p)]


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


def test_the_connections_named_are_those_triton_still_waited_for_at_the_end():
    """Connections that closed before the timeout's last second left the models' wait to run out:
    not blamed (Triton logs a line a second while some are open)."""
    from sdexport.serving.server import _connections_held

    def waited(*counts: tuple[int, int]) -> list[str]:
        return [f'I1207 http_server.cc:248] "Timeout {t}: Found {n} HTTP service connections"' for t, n in counts]

    assert _connections_held(waited((3, 2), (2, 2), (1, 2))) == 2
    assert _connections_held(waited((8, 1), (7, 1))) is None  # (closed at 6 s: the models' wait ran out)
    assert _connections_held([]) is None


def test_a_stub_left_after_triton_exited_is_ended_and_its_memory_removed(tmp_path):
    """Triton killed at its exit timeout (or crashed) left its Python backend stub running, adopted by
    init, deaf to SIGTERM, holding the model (and on a GPU its memory), and its shared memory in
    /dev/shm. Both are found by PyTriton's prefix, unique to the server; others are left alone."""
    import subprocess
    import types

    from sdexport.serving.server import _reap_stubs

    prefix = f"pytrtion{os.getpid()}-0a1b2c3d"
    stub = tmp_path / "triton_python_backend_stub"
    shutil.copy(shutil.which("cat"), stub)  # (reading its open stdin first, it waits, whatever the next argument)
    ours = subprocess.Popen([str(stub), "-", f"{prefix}5e6f-region"], stdin=subprocess.PIPE)
    other = subprocess.Popen([str(stub), "-", "pytrtion1-ffffffff-region"], stdin=subprocess.PIPE)
    region, others = Path("/dev/shm") / f"{prefix}5e6f-region", Path("/dev/shm") / f"pytrtion1-ffffffff-{os.getpid()}"
    region.write_bytes(b"")
    others.write_bytes(b"")
    try:
        triton = types.SimpleNamespace(_python_backend_config=types.SimpleNamespace(
            _backend_args={"shm-region-prefix-name": prefix}))
        _reap_stubs(triton)
        assert ours.wait(10) == -signal.SIGKILL and not region.exists()
        assert other.poll() is None and others.exists()
    finally:
        for process in (ours, other):
            process.kill()
            process.wait()
        others.unlink(missing_ok=True)
        region.unlink(missing_ok=True)


def _bare_tritonserver(repository: Path, ports: list[int], work: Path) -> tuple[list[str], dict[str, str]]:
    """The tritonserver binary PyTriton ships, run by hand with this Python's backend stub (what the
    stock server does with its own Python), with none of sdexport's or PyTriton's Python around it."""
    import sysconfig

    import pytriton

    dist = Path(pytriton.__file__).parent / "tritonserver"
    server = work / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                server / "backends" / "python" / "triton_python_backend_stub")
    return [str(server / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={server / 'backends'}", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
            f"--metrics-port={ports[2]}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
            f"--backend-config=python,shm-region-prefix-name=sdexport-test-{os.getpid()}",
            "--log-info=true"], {
        **os.environ,
        "LD_LIBRARY_PATH": ":".join(filter(None, [sysconfig.get_config_var("LIBDIR"),
                                                  str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"),
                                                  os.environ.get("LD_LIBRARY_PATH")])),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def test_the_generated_repository_loads_in_tritonserver_and_answers(tiny_engine_dir, tmp_path):
    """The stock server hands the model the shapes triton-repo wrote: its default size is their opt,
    and a size outside them is refused in the model's words."""
    from tritonclient.utils import InferenceServerException

    from sdexport.serving.client import generate

    repository = tmp_path / "repo"
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository, "--backend", BACKEND, "--height", "64:64:128",
                   "--width", "96") == 0
    assert sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*") if p.is_file()) == [
        "sdexport-repository.json", "sdexport/1/model.py", "sdexport/config.pbtxt"]
    ports = _free_ports(3)
    command, env = _bare_tritonserver(repository, ports, tmp_path)
    running = Server(command, ports, tmp_path / "tritonserver.log", env=env)
    try:
        [png] = generate(running.url, ["from the repository"], steps=2)
        assert _png_pixels(png).shape == (64, 96, 3)
        with pytest.raises(InferenceServerException, match=r"width 128 is outside this server's profile: width must "
                           r"be in \[96, 96\] \(config.pbtxt parameter width\)"):
            generate(running.url, ["too wide"], steps=2, height=64, width=128)
    finally:
        running.stop()


# -- the command line -----------------------------------------------------------------------------


def _max_steps(config: Path) -> int:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return int(text_format.Parse(config.read_text(), model_config_pb2.ModelConfig()).parameters["max_steps"].string_value)


def test_serve_and_triton_repo_allow_200_steps_unless_told(tiny_engine_dir, tmp_path, monkeypatch):
    """The module's server runs with --max-steps 1000; the default is checked here, in the
    repository each command writes (serve's, as Triton would be handed it)."""
    from sdexport.serving import server as serving

    handed: list[int] = []
    monkeypatch.setattr(serving, "run_server", lambda repository, *a, **k: handed.append(
        _max_steps(repository / "sdexport" / "config.pbtxt")))
    ports = [str(p) for p in _free_ports(3)]
    assert run_cli("serve", tiny_engine_dir, "--backend", BACKEND, "--http-port", ports[0], "--grpc-port", ports[1],
                   "--metrics-port", ports[2]) == 0
    assert handed == [200]
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo") == 0
    assert _max_steps(tmp_path / "repo" / "sdexport" / "config.pbtxt") == 200


@pytest.mark.parametrize(("change", "message"), [
    ({"duration_s": float("nan"), "requests": 0}, "--duration nan: need a finite number of seconds"),
    ({"duration_s": float("inf"), "requests": 0}, "--duration inf: need a finite number of seconds"),
    ({"requests": -1}, "--requests -1: cannot be negative"),
    ({"url": "::1:8000"}, "--url ::1:8000: write an IPv6 address in brackets, e.g. [::1]:8000"),
    ({"url": "localhost:http"}, "--url localhost:http: need host:port"),
    ({"url": "localhost"}, "--url localhost: need host:port"),
    ({"url": ":8000"}, "--url :8000: need host:port"),
    # serve's printed URL without its scheme: "model 'sdexport' is not ready" while it served
    ({"url": "127.0.0.1:8000/v2/models/sdexport"}, ("--url 127.0.0.1:8000/v2/models/sdexport: host:port only, "
                                                     "without a path (e.g. 127.0.0.1:8000; the model is --model)")),
    ({"url": "127.0.0.1:8000?x"}, "host:port only, without a path"),
    ({"url": "[::1]:8000/v2"}, "without a path (e.g. [::1]:8000;"),  # (its own IPv6 form, not ::1:8000)
    ({"url": "http://localhost:8000"}, "without the scheme"),
])
def test_a_load_test_that_could_never_end_or_connect_is_refused_before_any_request(change, message):
    from sdexport.serving.loadtest import LoadPlan

    with pytest.raises(SdexportError, match=re.escape(message)):
        LoadPlan(**change).check()
    LoadPlan(url="[::1]:8000").check()  # tritonclient's form of an IPv6 address


def test_loadtest_plan_returns_the_bytes_it_checked(tmp_path):
    """The requests send the bytes the check decoded, read once (a file replaced after the check
    cannot go out unchecked); a plan without images has none."""
    from pictures import box_mask, picture

    from sdexport.serving.loadtest import LoadPlan

    picture(64, 64, 1).save(tmp_path / "init.png")
    box_mask(64, 64).save(tmp_path / "mask.png")
    plan = LoadPlan(images={"init_image": str(tmp_path / "init.png"), "mask": str(tmp_path / "mask.png")})
    assert plan.check() == {"init_image": (tmp_path / "init.png").read_bytes(),
                            "mask": (tmp_path / "mask.png").read_bytes()}
    assert LoadPlan().check() == {}


def test_triton_repo_refuses_its_output_before_the_engines_are_checked(tiny_engine_dir, tmp_path, capsys, monkeypatch):
    """An -o that is a file, or a folder of the user's, is refused at once: the engine directory's
    checks import diffusers and hash the graphs (seconds) before the repository is written."""
    from sdexport import cli

    monkeypatch.setattr(cli, "_serve_settings", lambda *a, **k: pytest.fail("the engines were checked first"))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("mine")
    for output in ("notes.txt", "mine"):
        assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / output) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == (tmp_path / "mine" / "a.txt").read_text() == "mine"


def test_a_step_limit_past_what_the_model_takes_is_refused(tiny_engine_dir, tmp_path, capsys, monkeypatch):
    """The model refuses more steps than its training timesteps (the tiny one's 1000) whatever the
    server allows: a larger --max-steps is a limit no request can reach (a typo), said before serving."""
    for command in (["serve"], ["triton-repo", "-o", tmp_path / "repo"]):
        assert run_cli(command[0], tiny_engine_dir, *command[1:], "--max-steps", "1001") == 2
        assert capsys.readouterr().err.strip() == (
            "error: --max-steps 1001: the model was trained on 1000 timesteps, so no request can take more steps "
            "than that; pass --max-steps 1000 or less")
    assert not (tmp_path / "repo").exists()
    # the default (200), for a model trained on fewer timesteps, is theirs rather than refused
    from sdexport import manifest

    real = manifest.read_scheduler_config
    monkeypatch.setattr(manifest, "read_scheduler_config", lambda *a: {**real(*a), "num_train_timesteps": 100})
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo") == 0
    assert 'key: "max_steps" value: { string_value: "100" }' in (tmp_path / "repo" / "sdexport" / "config.pbtxt").read_text()


def test_values_past_what_triton_reads_are_refused_before_it_starts(tiny_engine_dir, tmp_path, capsys):
    """config.pbtxt's max_queue_size is a uint32 and Triton's --exit-timeout-secs an int32:
    triton-repo wrote a repository the server could not parse and said it was done; serve
    failed after loading with no reason given, or printed Triton's 400-line usage."""
    for command in (["serve"], ["triton-repo", "-o", tmp_path / "repo"]):
        assert run_cli(command[0], tiny_engine_dir, *command[1:], "--max-queue-size", str(2**32)) == 2
        assert capsys.readouterr().err.strip() == "error: --max-queue-size 4294967296: 0 (no bound) to 4294967295"
    assert run_cli("serve", tiny_engine_dir, "--drain-timeout", str(2**31)) == 2
    assert "--drain-timeout must be 0 to 2147483647" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
    assert run_cli("triton-repo", tiny_engine_dir, "-o", tmp_path / "repo", "--max-queue-size", str(2**32 - 1)) == 0
    assert "max_queue_size: 4294967295" in (tmp_path / "repo" / "sdexport" / "config.pbtxt").read_text()


def test_triton_repo_replaces_only_its_own_repository(tiny_engine_dir, tmp_path, capsys):
    repository = tmp_path / "repo"
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository) == 0
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository) == 2
    assert "pass --force" in capsys.readouterr().err
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository, "--force", "--engine-path", "/engines/tiny") == 0
    assert '"/engines/tiny"' in (repository / "sdexport" / "config.pbtxt").read_text()
    (repository / "notes.txt").write_text("mine")
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository, "--force") == 2
    assert "notes.txt" in capsys.readouterr().err and (repository / "notes.txt").read_text() == "mine"
    (repository / "notes.txt").unlink()
    (repository / "sdexport" / "1" / "__pycache__").mkdir()  # what Triton's Python backend writes: ours
    (repository / "sdexport" / "1" / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"bytecode")
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository, "--force") == 0
    capsys.readouterr()
    for mine in ("old__pycache__backup.txt", "sdexport/1/__pycache__/NOTES.txt"):  # not Triton's bytecode
        (repository / mine).parent.mkdir(exist_ok=True)
        (repository / mine).write_text("mine")
        assert run_cli("triton-repo", tiny_engine_dir, "-o", repository, "--force") == 2, mine
        assert mine in capsys.readouterr().err and (repository / mine).read_text() == "mine"
        (repository / mine).unlink()
    (repository / "drafts").mkdir()  # an empty folder is the user's too
    assert run_cli("triton-repo", tiny_engine_dir, "-o", repository, "--force") == 2
    assert "drafts" in capsys.readouterr().err and (repository / "drafts").is_dir()
    spaced = tmp_path / "repo 2"
    assert run_cli("triton-repo", tiny_engine_dir, "-o", spaced) == 0
    said = " ".join(capsys.readouterr().err.split())  # (the console wraps long lines)
    assert f"start it with: tritonserver --model-repository '{spaced}'" in said  # as it pastes
    damaged = shutil.copytree(tiny_engine_dir, tmp_path / "damaged")  # refused here, not when the server loads it
    (damaged / "unet" / "model.onnx").write_bytes(b"not a graph")
    assert run_cli("triton-repo", damaged, "-o", tmp_path / "repo 3") == 2
    assert "unet/model.onnx" in capsys.readouterr().err and not (tmp_path / "repo 3").exists()


def test_a_directory_whose_name_is_not_utf8_is_served_through_its_link_and_named_escaped(tmp_path):
    """The name went into config.pbtxt as it was (a surrogate for the byte): `serve` crashed writing
    it, with a traceback, where the link alone would have served."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from sdexport.serving.names import ascii_links
    from sdexport.serving.repository import Batching, config_pbtxt
    from sdexport.serving.triton_model import ServeSettings

    named = os.fsdecode(os.fsencode(str(tmp_path)) + b"/eng\xff")
    settings = ascii_links(ServeSettings(named), tmp_path / "links")
    assert settings.engine_dir == str(tmp_path / "links" / "engines")
    assert settings.engine_name == f"{tmp_path}/eng\\xff"
    config = text_format.Parse(config_pbtxt(settings, 1, Batching()), model_config_pb2.ModelConfig())
    assert config.parameters["engine_name"].string_value == settings.engine_name


def test_serve_refuses_server_paths_that_are_not_ascii_before_anything_loads(tiny_engine_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """Triton's stub failed in its imports (a UnicodeEncodeError logged as a stack) where the temporary
    folder or PYTRITON_HOME had an 'é'; a HOME with one (PyTriton's default home) is left for a
    temporary home."""
    import tempfile

    from sdexport.serving.server import _usable

    ports = [str(p) for p in _free_ports(3)]
    serve = ["serve", tiny_engine_dir, "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpé"))
    assert run_cli(*serve) == 2
    assert f"the temporary folder {tmp_path / 'tmpé'} is not an ASCII path" in " ".join(capsys.readouterr().err.split())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PYTRITON_HOME", str(tmp_path / "homé"))
    assert run_cli(*serve) == 2
    assert f"PYTRITON_HOME {tmp_path / 'homé'}: not an ASCII path" in " ".join(capsys.readouterr().err.split())
    assert not _usable(tmp_path / "homé" / ".cache" / "pytriton") and _usable(tmp_path / "home" / ".cache" / "pytriton")
    monkeypatch.delenv("PYTRITON_HOME")
    import sdexport

    monkeypatch.setattr(sdexport, "__file__", str(tmp_path / "checkoutë" / "sdexport" / "__init__.py"))
    assert run_cli(*serve) == 2
    assert f"sdexport is imported from {tmp_path / 'checkoutë' / 'sdexport'}, not an ASCII path" in " ".join(
        capsys.readouterr().err.split())


def test_a_port_taken_while_triton_started_is_named(tmp_path, monkeypatch):
    """A second serve on the same ports, started while the first loaded (its ports open only then),
    was told "[403] This API is restricted, expecting header 'triton-access-token'": PyTriton had
    polled the first server."""
    import socket

    from sdexport.serving import server

    def refused(triton, log_file, on_ready, drain_timeout_s):
        raise SdexportError(f"{server.NOT_STARTED}: [403] This API is restricted, expecting header "
                            "'triton-access-token'")

    monkeypatch.setattr(server, "_serve", refused)
    for setting in ("stub_environment", "server_output_to_stderr", "pytriton_waits"):  # (process-wide settings)
        monkeypatch.setattr(server, setting, lambda *args: None)
    numbers = _free_ports(3)
    ports = server.Ports(http=numbers[0], grpc=numbers[1], metrics=numbers[2], address="127.0.0.1")
    with socket.socket() as other:  # the first server's HTTP port
        other.bind(("127.0.0.1", numbers[0]))
        other.listen()
        with pytest.raises(SdexportError, match=rf"^--http-port {numbers[0]}: cannot listen there .*; is another "
                                                r"server running\? choose another port \(taken while Triton started\)$"):
            server.run_server(tmp_path, ports, startup_timeout_s=5, drain_timeout_s=1, log_file=None, on_ready=lambda: None)
    with pytest.raises(SdexportError, match=r"^Triton did not start: \[403\]"):  # free again: its own words
        server.run_server(tmp_path, ports, startup_timeout_s=5, drain_timeout_s=1, log_file=None, on_ready=lambda: None)

    def slow(triton, log_file, on_ready, drain_timeout_s):  # PyTriton's words alone did not name the option
        raise SdexportError(f"{server.NOT_STARTED}: Waiting for server to be ready timed out.")

    monkeypatch.setattr(server, "_serve", slow)
    with pytest.raises(SdexportError, match=r"^Triton did not start: Waiting for server to be ready timed out within "
                                            r"--startup-timeout 5 s: give it more where the model takes longer to load$"):
        server.run_server(tmp_path, ports, startup_timeout_s=5, drain_timeout_s=1, log_file=None, on_ready=lambda: None)


def test_triton_repo_names_a_directory_through_the_ascii_link_it_is_given(tiny_engine_dir, tmp_path, capsys):
    named = shutil.copytree(tiny_engine_dir, tmp_path / "modèles")
    assert run_cli("triton-repo", named, "-o", tmp_path / "r1") == 2
    assert "the engine directory's path " in capsys.readouterr().err
    (tmp_path / "models").symlink_to(named)  # what the refusal asks for: the link is named, not resolved
    assert run_cli("triton-repo", tmp_path / "models", "-o", tmp_path / "r2") == 0
    assert f'"{tmp_path / "models"}"' in (tmp_path / "r2" / "sdexport" / "config.pbtxt").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "{missing}"], "no such engine directory"),
    (["serve", "{engines}", "--backend", "warp"], "unknown backend 'warp'"),
    (["serve", "{engines}", "--http-port", "8000", "--grpc-port", "8000"], "must differ"),
    (["serve", "{engines}", "--address", "a" * 64 + ".b"], ": not an address to listen on"),  # (no DNS asked)
    (["serve", "{engines}", "--address", "192.0.2.1"], "--address 192.0.2.1: no network interface of this machine"),
    (["serve", "{engines}", "--address", "::1"], "--address ::1: an IPv6 address, which PyTriton cannot wait on"),
    (["serve", "{engines}", "--address", "::"], "--address ::: an IPv6 address"),
    (["serve", "{engines}", "--max-queue-delay-ms", "-1"], "--max-queue-delay-ms -1"),
    (["serve", "{engines}", "--cuda-graph"], "--cuda-graph: for --backend tensorrt or onnxruntime-cuda"),
    (["triton-repo", "{engines}", "-o", "{engines}"], "would replace"),
    (["triton-repo", "{engines}", "-o", "{tmp}/r", "--emphasis", "compel"],
     "--emphasis 'compel': choose one of none, original, no-norm"),
    (["serve", "{engines}", "--emphasis", "Original"], "--emphasis 'Original': choose one of none, original, no-norm"),
    (["triton-repo", "{engines}", "-o", "{tmp}/r", "--engine-path", "relative/path"], "an absolute path"),
    (["loadtest", "--url", "127.0.0.1:1", "-n", "0"], "give --requests or --duration"),
    (["loadtest", "--url", "127.0.0.1:1", "-n", "1"], "no Triton server answers there"),
    (["loadtest", "--url", "http://127.0.0.1:1"], "without the scheme"),
    (["loadtest", "--url", "127.0.0.1:1", "--height", "128", "--init-image", "{tmp}/init.png"],
     "--height and --width: with --init-image, give both, or neither"),  # (one alone: the server's default for the other)
    (["loadtest", "--url", "127.0.0.1:1", "--height", "4294967424", "--width", "128"],
     "--height: 4294967424 is not a whole number INT32 holds"),
    (["loadtest", "--url", "127.0.0.1:1", "--steps", "1" + "0" * 400], "(401 digits) is not a whole number INT32"),
    (["loadtest", "--url", "127.0.0.1:1", "--mask", "{engines}/manifest.json"], "--mask needs --init-image"),
    (["loadtest", "--url", "127.0.0.1:1", "--strength", "0.5"], "--strength needs --init-image"),
    (["loadtest", "--url", "127.0.0.1:1", "--init-image", "{missing}"], "no such file"),
    (["loadtest", "--url", "127.0.0.1:1", "--init-image", "{engines}"], "a directory; give an image file"),
    (["loadtest", "--url", "127.0.0.1:1", "--denoising-end", "1.5"], "--denoising-end 1.5: need the base model's"),
    (["loadtest", "--url", "127.0.0.1:1", "--init-image", "{engines}/manifest.json"], "not a readable image"),
    (["serve", "{engines}", "--log-file", "{engines}/manifest.json/log.txt"], "no log can be written"),
    (["serve", "{engines}", "--log-file", "{engines}/manifest.json"], "whose manifest lists every file in it; give a path outside it"),
    (["serve", "{engines}", "--log-file", "{engines}/triton.log"], "whose manifest lists every file in it; give a path outside it"),
    (["triton-repo", "{engines}", "-o", "{tmp}/r", "--engine-path", "/engines/modèles"],
     "--engine-path /engines/modèles: Triton's Python model reads only ASCII file names"),
])
def test_bad_serving_input_gets_one_line_and_exit_2(args, message, tiny_engine_dir, tmp_path, capsys):
    filled = [a.format(missing=tmp_path / "nothing", engines=tiny_engine_dir, tmp=tmp_path) for a in args]
    assert run_cli(*filled) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_serve_adds_to_a_triton_log_and_refuses_any_other_file(tiny_engine_dir, tmp_path, monkeypatch, capsys):
    """Triton adds its log to an existing --log-file: an earlier serve's log is taken (restarts keep
    one log), anything else (an image, say) is refused before it is written to, and a start that
    fails reads only this run's part of the log for its reason."""
    from sdexport.serving import server as serving

    picture = tmp_path / "cat.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    ports = [str(p) for p in _free_ports(3)]
    options = ["--backend", BACKEND, "--address", "127.0.0.1", "--http-port", ports[0], "--grpc-port", ports[1],
               "--metrics-port", ports[2]]
    assert run_cli("serve", tiny_engine_dir, *options, "--log-file", picture) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --log-file {picture}: exists and is not a Triton log (Triton would add its log to the end "
                   "of it); give a new file name, or the log of an earlier serve")
    assert picture.read_bytes() == b"\x89PNG\r\n\x1a\n" + bytes(64)
    log = tmp_path / "triton.log"
    log.write_text("E1206 02:06:25.123456 77 model.py:1] failed to load 'sdexport': an earlier run's failure\n")
    seen = []
    monkeypatch.setattr(serving, "run_server", lambda repository, ports, *, log_file, on_ready, **_: seen.append(log_file))
    assert run_cli("serve", tiny_engine_dir, *options, "--log-file", log) == 0 and seen == [log]
    earlier = log.stat().st_size
    with log.open("a") as handle:
        handle.write("I1206 02:10:00.000001 78 server.cc:1] failed to load 'sdexport': this run's\n")
    assert "this run's" in serving._reason(object(), RuntimeError("x"), log, earlier)
    # a port taken after serve's check: the model's progress line is not the reason
    log.write_text('I1206 12:00:00.000001 78 model_lifecycle.cc:472] "loading: sdexport:1"\n'
                   "E1206 12:00:01.000001 78 main.cc:1] failed to start GRPC service: Unavailable - Socket "
                   "'127.0.0.1:18061' already in use\n")
    assert serving._reason(object(), RuntimeError("x"), log).endswith(
        "failed to start GRPC service: Unavailable - Socket '127.0.0.1:18061' already in use")
    # a load failure that is not sdexport's own (an import in the stub): its message, not its stack
    stack = "".join(f"\\n <frozen importlib._bootstrap>({i}): _find_and_load" for i in range(40))
    log.write_text("E1206 12:00:01.000001 78 model_lifecycle.cc:1] failed to load 'sdexport' version 1: Internal: "
                   f"UnicodeEncodeError: 'ascii' codec can't encode character\\n\\nAt:{stack}\n")
    assert serving._reason(object(), RuntimeError("x"), log).endswith(
        "Internal: UnicodeEncodeError: 'ascii' codec can't encode character")


def test_a_log_file_that_is_not_a_regular_file_is_not_opened_to_look(tmp_path):
    """A FIFO (a log collector's) or /dev/stdout under a pipe: opening one to read its head waited
    for a writer forever; Triton writes to it as given."""
    import os
    import threading

    from sdexport.serving.server import check_log_file

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    checked = threading.Thread(target=check_log_file, args=(fifo,), daemon=True)
    checked.start()
    checked.join(5)
    assert not checked.is_alive()


def test_serve_makes_the_folder_of_its_log_file(tiny_engine_dir, tmp_path, monkeypatch, capsys):
    """A --log-file in a folder not made yet was accepted, and Triton then wrote no log there: the
    ready line named a file that never appeared."""
    from sdexport.serving import server as serving

    seen = []

    def started(repository, ports, *, log_file, on_ready, **settings):
        seen.append(log_file.parent.is_dir())
        on_ready()

    monkeypatch.setattr(serving, "run_server", started)
    log = tmp_path / "logs" / "today" / "triton.log"
    ports = [str(p) for p in _free_ports(3)]
    assert run_cli("serve", tiny_engine_dir, "--backend", BACKEND, "--address", "127.0.0.1", "--http-port", ports[0],
                   "--grpc-port", ports[1], "--metrics-port", ports[2], "--log-file", log) == 0
    assert seen == [True] and f"Triton's log: {log}" in " ".join(capsys.readouterr().err.split())


def test_a_server_that_failed_names_its_log_and_keeps_it(tiny_engine_dir, tmp_path, monkeypatch, capsys):
    """The error said "its log says which" of a log in the temporary folder it had just removed (a
    --drain-timeout that ran out): the log is now kept beside that folder, and named."""
    from sdexport.serving import server as serving

    def failed(repository, ports, *, log_file, on_ready, **settings):
        on_ready()
        log_file.write_text("E1206 Timeout 2: Found 1 live models and 1 in-flight non-inference requests\n")
        raise SdexportError("Triton exited with status 1, so requests still in flight when it stopped were dropped")

    monkeypatch.setattr(serving, "run_server", failed)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    ports = [str(p) for p in _free_ports(3)]
    assert run_cli("serve", tiny_engine_dir, "--backend", BACKEND, "--address", "127.0.0.1", "--http-port", ports[0],
                   "--grpc-port", ports[1], "--metrics-port", ports[2]) == 2
    said = " ".join(capsys.readouterr().err.split())
    [kept] = tmp_path.glob("sdexport-serve-*-triton.log")
    assert f"were dropped; Triton's log: {kept}" in said and "Found 1 live models" in kept.read_text()
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]  # the temporary folder itself is gone


def test_a_host_name_is_given_to_triton_as_its_ipv4_address():
    """Triton's HTTP server reads its address as inet_addr does: given ``localhost`` it listened on
    255.255.255.255, and the start ran into its timeout."""
    from sdexport.serving.server import listen_address

    assert listen_address("localhost") == "127.0.0.1"
    assert listen_address("0.0.0.0") == "0.0.0.0" and listen_address("127.0.0.1") == "127.0.0.1"


def test_serve_names_a_damaged_engine_file_before_starting_triton(engine_copy, capsys):
    path = engine_copy / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    assert run_cli("serve", engine_copy, "--backend", BACKEND) == 2
    assert "unet/model.onnx does not match its sha256" in capsys.readouterr().err


_FAILED_LOAD = """
import sys
from pathlib import Path
from sdexport.errors import SdexportError
import signal
import time
import sh
from sdexport.serving import server
from sdexport.serving.server import Ports, run_server
repo, log, *ports = sys.argv[1:]
# sh's output and input threads, which also reap the process, start late (as when a process still
# holds Triton's output open, or the machine is busy), and the watcher polls often: the watcher sees
# the exit first (sh's last reaper polls once a second), the case that deadlocked.
_sh = vars(sh)["_SelfWrapper__self_module"]
def _late(thread):
    return lambda *args: (time.sleep(30), thread(*args))
_sh.output_thread, _sh.input_thread = _late(_sh.output_thread), _late(_sh.input_thread)
server.WATCH_PERIOD_S = 0.005
# SIGINT ignored, as in a script's background job (`sdexport serve ... &`): the wake-up used to be a simulated SIGINT
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    run_server(Path(repo), Ports(*map(int, ports), address="127.0.0.1"), startup_timeout_s=300,
               drain_timeout_s=5, log_file=Path(log), on_ready=lambda: None)
except SdexportError as exc:
    print(exc)
"""


def test_a_model_that_fails_to_load_is_reported_at_once_in_its_own_words(tmp_path):
    """Triton exits within seconds; PyTriton alone would poll for the whole start-up timeout.

    In a process of its own, as `sdexport serve` runs, with SIGINT ignored and the watcher the first
    to see the exit (`_FAILED_LOAD`). Each waited the start-up timeout before: the watcher woke the
    main thread with a simulated SIGINT, and it deadlocked when it reaped the process itself. Every
    full test run started in the background hung here (docs/design-notes.md)."""
    from sdexport.serving.repository import Batching, write_repository
    from sdexport.serving.triton_model import ServeSettings

    write_repository(tmp_path / "repo", ServeSettings(str(tmp_path / "gone"), backend=BACKEND), 2, Batching())
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _FAILED_LOAD, str(tmp_path / "repo"), str(tmp_path / "triton.log"),
                           *map(str, _free_ports(3))], capture_output=True, text=True, timeout=150)
    assert "the model did not load: " in done.stdout and "gone: no such engine directory" in done.stdout, done.stderr
    assert time.monotonic() - started < 120  # the start-up timeout is 300 s


@pytest.mark.parametrize(("exit_codes", "error"), [
    ([None, None, 0], None),
    ([None, 1], "Triton exited with status 1, so requests still in flight when it stopped were dropped"),
    ([None] * 1000, "Triton did not stop within 0.2 s of the stop, so requests still in flight were dropped"),
])
def test_a_stop_that_lands_after_pytritons_own_catch_ends_serving_as_one_it_caught(monkeypatch, tmp_path,
                                                                                 exit_codes, error):
    """PyTriton's serve catches the KeyboardInterrupt a stop raises (``stopping``) while it waits, then
    stops the server; one that lands after that wait (in its stop, as it waits for Triton's drain)
    went on to exit 130, "interrupted", where the same stop ended with 0 a moment earlier (two
    SIGTERMs here: 130, then 0). The drain it cut short is waited for, and its outcome told as after
    PyTriton's own wait (a review: a lost request would otherwise have ended with 0)."""
    from types import SimpleNamespace

    import pytriton.constants
    import pytriton.triton

    from sdexport.serving import server

    codes = iter(exit_codes)

    killed = []

    class Process:
        @property
        def exit_code(self):  # (None while it drains; sh reaps it once it has ended)
            return next(codes, exit_codes[-1])

        def kill(self):
            killed.append(True)

    workspaces = []

    class Triton:
        def __init__(self, config, security_config, workspace):
            self._triton_server = SimpleNamespace(_tritonserver_running_cmd=SimpleNamespace(process=Process()))
            workspaces.append(workspace)
            workspace.mkdir()  # (as PyTriton's Workspace: one that exists is refused)

        def run(self):
            pass

        def serve(self):
            raise KeyboardInterrupt

        def stop(self):
            pass

    for name in ("stub_environment", "server_output_to_stderr", "pytriton_waits"):
        monkeypatch.setattr(server, name, lambda *args: None)
    monkeypatch.setattr(pytriton.triton, "Triton", Triton)
    monkeypatch.setattr(server, "_StartWatch", lambda triton: SimpleNamespace(done=lambda: None, exited=False))
    monkeypatch.delenv("PYTRITON_HOME", raising=False)
    (tmp_path / "home").write_text("")  # PyTriton's home cannot be made: a temporary workspace
    monkeypatch.setattr(pytriton.constants, "PYTRITON_HOME", tmp_path / "home" / "pytriton")
    monkeypatch.setattr(server, "WATCH_PERIOD_S", 0.01)
    # (0.2 s in all where the stop is to run out; a wide one where Triton exits at the 2nd or 3rd look,
    # which the loop reaches at once, so that a busy machine's pause between looks fails nothing)
    monkeypatch.setattr(server, "EXIT_MARGIN_S", 0.1 if "did not stop" in (error or "") else 60)
    ready = []
    try:
        if error is None:
            server.run_server(tmp_path, server.Ports(18096, 18097, 18098, address="127.0.0.1"), startup_timeout_s=5,
                              drain_timeout_s=0.1, log_file=None, on_ready=lambda: ready.append(True))
        else:
            with pytest.raises(SdexportError, match=error):
                server.run_server(tmp_path, server.Ports(18096, 18097, 18098, address="127.0.0.1"),
                                  startup_timeout_s=5, drain_timeout_s=0.1, log_file=None,
                                  on_ready=lambda: ready.append(True))
    except KeyboardInterrupt:  # (not raised on: it would end the test run)
        pytest.fail("the stop went on as an interrupt")
    assert ready == [True]
    assert killed == ([True] if "did not stop" in (error or "") else [])  # (a hung server would hold the GPU)
    # PyTriton's files went to a temporary folder, removed after (an unwritable or unset home failed
    # or hung: an audit)
    [workspace] = workspaces
    assert workspace.parent.name.startswith("sdexport-pytriton-") and not workspace.parent.exists()


def test_pytritons_home_is_used_where_it_can_be_and_one_the_user_set_is_kept(monkeypatch, tmp_path):
    """Not always the temporary folder: many hosts mount it noexec, where Triton (copied into the
    workspace and run from there) cannot run (a review)."""
    import pytriton.constants

    from sdexport.serving.server import pytriton_workspace

    monkeypatch.delenv("PYTRITON_HOME", raising=False)
    for home, usable in ((tmp_path / "cache" / "pytriton", True), (Path("$HOME/.cache/pytriton").absolute(), False)):
        monkeypatch.setattr(pytriton.constants, "PYTRITON_HOME", home)
        with pytriton_workspace() as workspace:
            assert (workspace is None) == usable  # (None: PyTriton's own default)
    assert (tmp_path / "cache" / "pytriton").is_dir()
    monkeypatch.setenv("PYTRITON_HOME", str(tmp_path / "chosen"))
    with pytriton_workspace() as workspace:
        assert workspace is None


def test_the_start_up_watcher_sees_an_exit_without_reaping_the_process():
    """Reaping is left to sh, whose exit callback (PyTriton's stop) must not run on the watcher's thread."""
    from types import SimpleNamespace

    from sdexport.serving.server import _server_exited

    def triton(process: object) -> object:
        return SimpleNamespace(_triton_server=SimpleNamespace(_tritonserver_running_cmd=SimpleNamespace(process=process)))

    assert not _server_exited(SimpleNamespace(_triton_server=None))  # not started yet
    assert _server_exited(triton(SimpleNamespace(exit_code=1, pid=-1)))  # sh has reaped it
    # (running until told: one that slept 0.3 s could have ended before the first look on a busy machine)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    running = triton(SimpleNamespace(exit_code=None, pid=child.pid))
    assert not _server_exited(running)
    assert child.stdin is not None
    child.stdin.close()  # now it ends
    deadline = time.monotonic() + 30
    while not _server_exited(running):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert os.waitpid(child.pid, 0)[0] == child.pid  # still there to be reaped by its owner
    child.returncode = 0  # reaped above; Popen must not wait again
    assert _server_exited(running)  # reaped by its owner before sh set exit_code


def test_a_client_without_tritonclients_http_part_is_told_what_to_install(monkeypatch, tmp_path, capsys):
    """`pip install tritonclient` without its [http] extra installs the package, whose http module
    then raises on import: the check imports what loadtest uses."""
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)
    assert run_cli("loadtest", "-o", tmp_path / "out") == 2
    assert "tritonclient's HTTP client is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_numpy_2_is_refused_before_serving(monkeypatch):
    import importlib.metadata

    from sdexport.serving import server

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.4.6" if name == "numpy" else real(name))
    with pytest.raises(SdexportError, match="numpy 2.4.6 is installed, but PyTriton's Triton stub"):
        server.check_serving_installed()


def test_the_readme_lists_every_input_of_the_served_model():
    """The README's table of inputs is written by hand: it must name each input, and nothing else."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Serve: Triton Inference Server"):readme.index("### A model repository")]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    named = [name for line in table for name in re.findall(r"`(\w+)`", line.split("|")[1])]
    assert sorted(named) == sorted(spec.name for spec in INPUTS)


def test_the_triton_processs_output_goes_to_stderr(capsys):
    """Under -v (no log file) Triton's log is its output, which PyTriton prints line by line: onto
    stderr here, as every log, never onto stdout, which holds results."""
    from pytriton.server.triton_server import TritonServer

    from sdexport.serving.server import server_output_to_stderr

    server_output_to_stderr()
    server = TritonServer.__new__(TritonServer)  # only what _record_logs reads
    server._verbose, server._tritonserver_logs = True, ""
    server._record_logs(b"I1205 started GRPCInferenceService\n")
    out, err = capsys.readouterr()
    assert out == "" and err == "I1205 started GRPCInferenceService\n"
    # the console's line as Triton stops, outside its log: it reached the terminal without -v
    for character in "Signal (15) received.\nW1207 kept\nE1207 unended":  # (PyTriton hands it over so)
        server._record_logs(character)
    assert capsys.readouterr() == ("", "W1207 kept\n")
    from sdexport.serving.server import _flush_console_line

    _flush_console_line()  # (run_server's end: a last line without its newline is shown, not held)
    assert capsys.readouterr() == ("", "E1207 unended\n")


def test_rows_without_a_size_take_the_first_rows_as_run_takes_the_first_image_s():
    """``run`` makes every image the first one's size; so does a served request: its second init
    image, of another size, is fitted to the first's (here resized), not generated apart at its own."""
    from sdexport.serving.requests import decode_rows

    inputs = {**_inputs(["a", "b"], steps=2, fit="resize"),
              "init_image": np.array([[_png_of(np.zeros((64, 128, 3), np.uint8))],
                                      [_png_of(np.zeros((128, 64, 3), np.uint8))]], dtype=object)}
    rows = decode_rows(inputs, (128, 128))
    assert [(row.height, row.width) for row in rows] == [(64, 128), (64, 128)]
    assert rows[1].image.size == (128, 64) and rows[1].notes == ["init_image resized from 128x64 to 64x128"]


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_a_row_without_a_size_takes_its_init_images_before_its_control_images():
    """As ``run``, the init image gives the size, then the first control image (which is resized
    to it), whichever comes first in the request."""
    from sdexport.serving.requests import decode_rows

    init, control = _png_of(np.zeros((64, 96, 3), np.uint8)), _png_of(np.zeros((128, 128, 3), np.uint8))
    inputs = {**_inputs(["x"]), "init_image": np.array([[init]], dtype=object),
              "control_image": np.array([[control]], dtype=object)}
    [row] = decode_rows(inputs, (256, 256))
    assert (row.height, row.width) == (64, 96)


def test_a_flag_sent_as_a_number_other_than_0_or_1_is_refused():
    """A client sending guess_mode as a number: 0 and 1 are read as false and true, 2 is refused."""
    from sdexport.serving.requests import decode_rows

    for sent, read in ((0, False), (1, True)):
        [row] = decode_rows({**_inputs(["x"]), "guess_mode": np.array([[sent]], dtype=np.int32)}, (64, 64))
        assert row.guess_mode is read
    with pytest.raises(SdexportError, match=r"^guess_mode 2: expected true or false"):
        decode_rows({**_inputs(["x"]), "guess_mode": np.array([[2]], dtype=np.int32)}, (64, 64))


def test_a_row_sending_two_values_for_one_setting_is_refused():
    """One value per image: a row of two steps is refused, not read as its first."""
    from sdexport.serving.requests import decode_rows

    with pytest.raises(SdexportError, match=r"^steps: expected one value per image, got 2"):
        decode_rows({**_inputs(["x"]), "steps": np.array([[20, 30]], dtype=np.int32)}, (64, 64))

"""A new user's first minutes: version, verbosity, quiet libraries, words that match what happened.

Startup times are a benchmark (benchmarks/startup.py), not asserted here; what is pinned is what
loads: a command that needs no torch must not import it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from sdexport import __version__


def _sdexport(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdexport", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_version_is_printed_on_stdout(capsys):
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"sdexport {__version__}"


def test_conflicting_and_unknown_verbosity_is_one_line(capsys):
    assert run_cli("-q", "-v", "inspect", "x") == 2
    assert run_cli("inspect", "x", "--verbosity", "loud") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: -q and -v: give one of -q, -v, --verbosity",
                     "error: --verbosity 'loud': choose quiet, normal, verbose"]


def test_onnxruntime_warnings_only_with_verbose(tmp_path):
    """ONNX Runtime's optimiser warns (raw ANSI, on the C++ side) while onnx-graphsurgeon folds the
    tiny text encoder's constants: hidden by default, shown with -v, and -q leaves stderr empty."""
    args = ["export", "tiny", "--components", "text_encoder", "--verify", "none"]
    normal = _sdexport(*args, "-o", str(tmp_path / "a"))
    verbose = _sdexport(*args, "-o", str(tmp_path / "b"), "-v")
    quiet = _sdexport("-q", *args, "-o", str(tmp_path / "c"))
    assert normal.returncode == verbose.returncode == quiet.returncode == 0, normal.stderr + verbose.stderr
    assert "onnxruntime" not in normal.stderr and "\x1b[" not in normal.stderr
    assert "W:onnxruntime" in verbose.stderr
    assert quiet.stderr == ""
    assert "text_encoder" in quiet.stdout  # results still on stdout


def test_run_names_the_scheduler_that_ran_and_leaves_out_empty_fields(tiny_engine_dir, tmp_path, capsys):
    """The tiny model's default is PNDM: its extra U-Net call is explained, and the image says pndm."""
    from PIL import Image

    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "a fox", "--steps", "3", "-o", out) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "4 U-Net calls for 3 steps: PNDM's first step takes two (its multistep warm-up)" in err
    assert err.count("random weights") == 1
    image = Image.open(out)
    record = json.loads(image.text["sdexport"])
    assert record["scheduler"] == "pndm" and "negative_prompt" not in record
    assert image.text["parameters"] == "a fox\nSteps: 3, Sampler: PLMS, CFG scale: 7.5, Seed: 0, Size: 128x128"


@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".webp", "WEBP")])
def test_jpeg_and_webp_carry_the_same_parameters(tiny_engine_dir, tmp_path, suffix, fmt, capsys):
    from PIL import Image

    from sdexport.runtime.images import read_parameters

    png, other = tmp_path / "x.png", tmp_path / f"x{suffix}"
    for path in (png, other, other):  # the second write replaces sdexport's own image
        assert run_cli("run", tiny_engine_dir, "-p", "a fox", "-n", "blur", "--steps", "1", "--scheduler", "euler_a",
                       "-o", path) == 0
    with Image.open(other) as image:
        assert image.format == fmt
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\0" + Image.open(png).text["parameters"].encode("utf-16-be")  # A1111's layout
    assert read_parameters(other) == read_parameters(png) and read_parameters(png)["scheduler"] == "euler_a"
    foreign = tmp_path / f"holiday{suffix}"
    Image.new("RGB", (8, 8)).save(foreign)
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "-o", foreign) == 2
    assert "exists and was not written by sdexport" in capsys.readouterr().err


def test_an_unknown_image_format_is_refused_before_anything_loads(tiny_engine_dir, tmp_path, capsys, monkeypatch):
    from sdexport.runtime import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("engines were loaded"))
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tmp_path / "x.gif") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: -o {tmp_path / 'x.gif'}: sdexport writes .png, .jpg/.jpeg or .webp images, not .gif")


def test_more_prompts_than_the_profile_takes_are_split_into_calls(tiny_engine_dir, tmp_path, capsys):
    """The tiny profile takes 2 images per call: 3 prompts make 2 calls, numbered and seeded as one."""
    import numpy as np
    from PIL import Image

    from sdexport.runtime.images import read_parameters

    out = tmp_path / "many.png"
    assert run_cli("run", tiny_engine_dir, "-p", "a", "-p", "b", "-p", "c", "--steps", "2", "--seed", "5", "-o", out) == 0
    captured = capsys.readouterr()
    assert "3 images, 2 at most per call" in " ".join(captured.err.split()) and "call 2/2:" in captured.err
    paths = [tmp_path / f"many-{i}.png" for i in range(3)]
    assert captured.out.split() == [str(p) for p in paths]
    assert [(read_parameters(p)["prompt"], read_parameters(p)["seed"]) for p in paths] == [("a", 5), ("b", 6), ("c", 7)]
    alone = tmp_path / "alone.png"
    assert run_cli("run", tiny_engine_dir, "-p", "c", "--steps", "2", "--seed", "7", "-o", alone) == 0
    difference = np.abs(np.asarray(Image.open(alone), np.int16) - np.asarray(Image.open(paths[2]), np.int16))
    assert difference.max() <= 1  # the same image, whichever call made it


def test_the_python_api_saves_what_the_cli_saves(tiny_engine_dir, tmp_path):
    from sdexport.runtime.images import read_parameters
    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.request import GenerationRequest

    cli = tmp_path / "cli.webp"
    assert run_cli("run", tiny_engine_dir, "-p", "a fox", "--steps", "2", "--backend", "onnxruntime-cpu", "-o", cli) == 0
    pipeline = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    result = pipeline(GenerationRequest(prompt=["a fox"], steps=2, height=128, width=128))
    assert result.save(tmp_path / "api.webp") == [tmp_path / "api.webp"]
    api = read_parameters(tmp_path / "api.webp")
    assert api == {**read_parameters(cli), "engine_dir": api["engine_dir"]}
    assert api["scheduler"] == "pndm" and api["backend"] == "onnxruntime-cpu"


def test_quick_verification_is_counted_in_words(tmp_path, capsys):
    assert run_cli("export", "tiny", "-o", tmp_path / "e", "--verify", "quick", "--components", "unet") == 0
    captured = capsys.readouterr()
    assert "verification, each component: 1 point checked, 3 skipped by request" in " ".join(captured.out.split())
    assert "1/4" not in captured.out
    assert "skipped: opt, max, odd (quick verification)" in captured.err

"""A new user's first minutes: version, verbosity, quiet libraries, words that match what happened.

Startup times are a benchmark (benchmarks/startup.py), not asserted here; what is pinned is what
loads: a command that needs no torch must not import it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, synthetic_bench_report
from sdexport import __version__


def _sdexport(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdexport", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_version_is_printed_on_stdout(capsys):
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"sdexport {__version__}"


def test_help_reflows_docstrings_and_bench_alone_says_what_it_needs():
    """Help paragraphs are reflowed (a docstring's line breaks are the source's, not the reader's),
    and ``sdexport bench`` without a scenario says what to give rather than "Missing command"."""
    import os

    env = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    top = subprocess.run([sys.executable, "-m", "sdexport", "--help"], capture_output=True, text=True, env=env).stdout
    assert "adopt        Check another tool's ONNX export (optimum's) against..." in top
    inspect_help = subprocess.run([sys.executable, "-m", "sdexport", "inspect", "--help"], capture_output=True,
                                  text=True, env=env).stdout
    assert "and also when a graph is not what the manifest says" in inspect_help
    adopt_help = subprocess.run([sys.executable, "-m", "sdexport", "adopt", "--help"], capture_output=True,
                                text=True, env=env).stdout
    assert "COMPONENT/model.onnx" in adopt_help
    assert "and write its manifest, so that `sdexport run`, `build` and `bench` use it" in " ".join(adopt_help.split())
    # click's plain help at 80 columns, a pipe's width too: every option named whole (rich's tables
    # cut them, "--negative-prom…", and a help column 16 characters wide: an audit); -h as --help
    narrow = subprocess.run([sys.executable, "-m", "sdexport", "run", "-h"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "80"}).stdout
    assert "-n, --negative-prompt <list[str]>" in narrow and "…" not in narrow
    assert max(map(len, narrow.splitlines())) <= 80
    misspelt = _sdexport("bench", "comprae", "a", "b")  # (run as a scenario named 'comprae' before)
    assert misspelt.returncode == 2 and misspelt.stderr.strip() == (
        "error: bench: no command or scenario file 'comprae'; did you mean 'compare'?")
    bare = _sdexport("bench")
    assert bare.returncode == 2 and bare.stderr.strip() == (
        "error: bench: give a scenario file (sdexport bench SCENARIO, e.g. benchmarks/scenarios/tiny-cpu.toml), "
        "or compare or cache-key")


def test_no_progress_bar_on_a_dumb_terminal(monkeypatch):
    """``TERM=dumb`` (an editor's shell buffer) draws no spinner, but the denoising bar was drawn
    disabled only off a terminal: each call left a blank line before its images' paths."""
    import rich.progress

    from sdexport import cli
    from sdexport.console import console

    monkeypatch.setattr(console, "_force_terminal", True)
    monkeypatch.setenv("TERM", "dumb")
    assert console.is_terminal and console.is_dumb_terminal
    made = []

    class Recorded(rich.progress.Progress):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("disable"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rich.progress, "Progress", Recorded)

    class Pipeline:
        family = "sd"

        def __call__(self, part, on_step):
            on_step(1, 1)
            return "result"

    from sdexport.runtime.request import GenerationRequest

    assert cli._denoise(Pipeline(), GenerationRequest(prompt=["x"], steps=1), "Denoising") == "result"
    assert made == [True]


def test_conflicting_and_unknown_verbosity_is_one_line(capsys):
    assert run_cli("-q", "-v", "inspect", "x") == 2
    assert run_cli("inspect", "x", "--verbosity", "loud") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: -q and -v: give one of -q, -v, --verbosity",
                     "error: --verbosity 'loud': choose quiet, normal, verbose"]


def test_options_named_in_sdexport_source_exist():
    """Errors and help name options (``give --mask``, ``pass --seed N``): each ``--name`` written in
    sdexport's source is an option of some sdexport command, so a renamed option leaves no message
    pointing at the old name. The exceptions are other programs' options, listed here."""
    import re

    import typer

    from sdexport.cli import app

    others = {"--help", "--serve",  # click's own; scripts/setup.sh's
              "--model-repository", "--model-name", "--http-restricted-api",  # tritonserver's
              "--porcelain", "--short", "--untracked-files", "--error-unmatch",  # git's
              "--optimize"}  # optimum-cli's (its ONNX Runtime fusions, which adopt refuses)
    options: set[str] = set()
    commands = [typer.main.get_command(app)]
    while commands:
        command = commands.pop()
        options.update(o for p in command.params for o in (*p.opts, *p.secondary_opts))
        commands.extend(getattr(command, "commands", {}).values())
    named = {(m.group(), path.name) for path in (Path(__file__).parent.parent / "sdexport").rglob("*.py")
             for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", path.read_text())}
    assert len(named) > 50
    unknown = sorted(f"{option} ({where})" for option, where in named if option not in options | others)
    assert not unknown, f"not an option of any sdexport command: {unknown}"


def test_onnxruntime_warnings_only_with_verbose(tmp_path, capfd):
    """ONNX Runtime's optimiser warns (raw ANSI, from C++ straight to the stderr file descriptor)
    while onnx-graphsurgeon folds the tiny text encoder's constants: hidden by default, shown with -v,
    and -q leaves stderr empty."""
    args = ["export", "tiny", "--components", "text_encoder", "--verify", "none"]
    outputs = {}
    for name, flags in (("normal", []), ("verbose", ["-v"]), ("quiet", ["-q"])):
        assert run_cli(*flags, *args, "-o", tmp_path / name) == 0
        outputs[name] = capfd.readouterr()
    assert "onnxruntime" not in outputs["normal"].err and "\x1b[" not in outputs["normal"].err
    assert "W:onnxruntime" in outputs["verbose"].err
    assert outputs["quiet"].err == ""
    assert "text_encoder" in outputs["quiet"].out  # results still on stdout


def test_sdexports_version_is_the_running_codes(monkeypatch):
    """Exports, images and benchmarks record sdexport's version: the code's own, also where it runs
    from a checkout with no installed metadata (the GPU lease puts it on PYTHONPATH)."""
    import importlib.metadata

    from sdexport import __version__, versions

    def not_installed(package):
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(versions, "version", not_installed)
    assert versions.installed_versions(["sdexport", "torch"]) == {"sdexport": __version__, "torch": None}


def test_graphsurgeon_logs_at_the_verbosity():
    """onnx-graphsurgeon's own logger (not ``logging``) follows -v: its warnings show only then."""
    import onnx
    import onnx_graphsurgeon as gs

    from sdexport import console
    from sdexport.export.graph import cleanup

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [onnx.helper.make_tensor_value_info(
            "y", onnx.TensorProto.FLOAT, [1])]))
    for level, severity in ((console.VERBOSE, gs.logger.G_LOGGER.INFO), (console.NORMAL, gs.logger.G_LOGGER.ERROR)):
        console.set_verbosity(level)
        cleanup(model)
        assert gs.logger.G_LOGGER.severity == severity


def test_the_commands_quiet_pillows_warnings_on_an_input_file():
    """``run -q`` printed Pillow's UserWarning on a palette image's transparency, and its
    DecompressionBombWarning on a large init image, with their source paths; a library user's
    Pillow warnings stay theirs."""
    script = (
        "import sys, warnings\n"
        "from sdexport import console\n"
        "if sys.argv[1] == 'command':\n"
        "    console.own_process()\n"
        "console.set_verbosity('quiet')\n"
        "warnings.warn_explicit('Palette images with Transparency', UserWarning, 'Image.py', 1, module='PIL.Image')\n"
        "warnings.warn_explicit('Image size exceeds limit', RuntimeWarning, 'Image.py', 2, module='PIL.Image')\n"
    )
    for caller, heard in (("command", ""), ("library", "Palette images")):
        done = subprocess.run([sys.executable, "-c", script, caller], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and (heard in done.stderr if heard else done.stderr == ""), done.stderr


def test_quieting_the_library_leaves_the_programs_hub_access_and_warnings_alone():
    """The README's ``set_verbosity(QUIET)`` for library users set HF_HUB_OFFLINE (the program's own
    downloads then failed) and dropped every FutureWarning of the program's; a name for the level
    was a bare TypeError. The commands still quiet the whole process."""
    script = (
        "import os, warnings\n"
        "from sdexport import console\n"
        "console.set_verbosity('quiet')\n"
        "print(os.environ.get('HF_HUB_OFFLINE'))\n"
        "warnings.warn('the program', FutureWarning)\n"
        "warnings.warn_explicit('a package of its own', UserWarning, 'app.py', 1, module='transformers_app')\n"
        "print(sorted(k for k in ('TQDM_DISABLE', 'HF_HUB_DISABLE_PROGRESS_BARS', 'TRANSFORMERS_VERBOSITY') if k in os.environ))\n"
        "try:\n"
        "    console.set_verbosity(None)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    quieting = ("HF_HUB_OFFLINE", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                "DIFFUSERS_VERBOSITY")
    environment = {k: v for k, v in os.environ.items() if k not in quieting}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120)
    assert done.stdout.splitlines() == ["None", "[]", ("SdexportError level: None; give sdexport.console.QUIET, NORMAL "
                                                      "or VERBOSE (or 'quiet', 'normal', 'verbose')")], done.stdout + done.stderr
    # (the program's progress bars and its children's: TQDM_DISABLE was set in its environment too)
    assert "FutureWarning: the program" in done.stderr and "UserWarning: a package of its own" in done.stderr
    command = subprocess.run([sys.executable, "-c", ("import os, sys; from sdexport import cli; sys.argv = ['sdexport', "
                              "'--version']\ntry:\n    cli.main()\nexcept SystemExit:\n    print(os.environ.get("
                              "'HF_HUB_OFFLINE'))")], capture_output=True, text=True, env=environment, timeout=120)
    assert command.stdout.splitlines()[-1] == "1", command.stdout + command.stderr


def test_a_library_user_keeps_its_warnings_loggers_onnx_runtime_level_and_torch_seed(monkeypatch):
    """Quieting sdexport as a library also dropped the program's torch UserWarnings and set its
    torch.onnx, graphsurgeon and polygraphy loggers' levels; every session sdexport made set ONNX
    Runtime's process-wide logger to errors, quieting the program's own sessions; a preset's
    weights reseeded torch's global generator, discarding the program's seed (an audit)."""
    script = (
        "import logging, warnings\n"
        "from sdexport import console\n"
        "logging.getLogger('torch.onnx').setLevel(logging.DEBUG)\n"
        "console.set_verbosity('quiet')\n"
        "print(logging.getLogger('torch.onnx').level, logging.getLogger('polygraphy').level)\n"
        "warnings.warn_explicit('the program uses torch', UserWarning, 'dataloader.py', 1, module='torch.utils.data')\n"
        "class Ort:\n"
        "    def set_default_logger_severity(self, level):\n"
        "        print('set', level)\n"
        "print(console.onnxruntime_logging(Ort()))\n"
        "import torch\n"
        "from sdexport.models.loader import load_model\n"
        "torch.manual_seed(1)\n"
        "expected = torch.rand(1).item()\n"
        "torch.manual_seed(1)\n"
        "load_model('tiny').modules['unet']\n"
        "print(torch.rand(1).item() == expected)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["10 0", "3", "True"], done.stdout  # (no "set": the logger is the program's)
    assert "UserWarning: the program uses torch" in done.stderr, done.stderr


def test_run_names_the_scheduler_that_ran_and_leaves_out_empty_fields(tiny_engine_dir, tmp_path, capsys):
    """The tiny model's default is PNDM: its extra U-Net call is explained, and the image says pndm."""
    from PIL import Image

    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "a fox", "--steps", "3", "-o", out) == 0
    raw = capsys.readouterr().err
    err = " ".join(raw.split())
    assert "4 U-Net calls for 3 steps: PNDM's first step takes two (its multistep warm-up)" in err
    assert err.count("random weights") == 1
    # where the seconds before the first step go, a line each even without a terminal (a log)
    assert [line.split(" (")[0] for line in raw.splitlines() if line.startswith("✓")] == [
        "✓ Checking the engine files and the scheduler", "✓ Loading engines"]
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


@pytest.mark.parametrize("how", ["interrupted", "failed"])
def test_a_run_stopped_between_calls_names_the_images_it_had_written(tiny_engine_dir, tmp_path, capsys, monkeypatch,
                                                                     how):
    """Ctrl-C, or an error, in the second call of three images: the first two are whole on disk, the
    line that says "interrupted" or "error" names them, so that a user knows what they have (and that
    the third is not), and stdout has listed them as they were written."""
    from sdexport import cli
    from sdexport.errors import SdexportError

    real, calls = cli._denoise, []

    def stopped_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt if how == "interrupted" else SdexportError("the loop produced NaN/Inf latents")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "_denoise", stopped_in_the_second)
    out = tmp_path / "many.png"
    code = run_cli("run", tiny_engine_dir, "-p", "a", "-p", "b", "-p", "c", "--steps", "1", "-o", out)
    assert code == (130 if how == "interrupted" else 2)
    written = [tmp_path / f"many-{i}.png" for i in range(2)]
    captured = capsys.readouterr()
    said = "interrupted" if how == "interrupted" else "error: the loop produced NaN/Inf latents"
    assert captured.err.strip().endswith(f"{said}; already written: {written[0]}, {written[1]} (2 of 3 images)")
    assert captured.out.split() == [str(p) for p in written]
    assert sorted(tmp_path.iterdir()) == written


def test_a_full_disk_in_the_middle_of_a_calls_images_names_those_written(tiny_engine_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """One call of two images, the disk full at the second: the first was whole on disk but neither
    listed on stdout nor named by the error (an audit's tmpfs). Each image is listed as it goes in."""
    import errno

    from sdexport.runtime import images

    real, saves = images._save, []

    def full_at_the_second(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "_save", full_at_the_second)
    out = tmp_path / "b.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--batch", "2", "--steps", "1", "-o", out) == 1
    captured = capsys.readouterr()
    first = tmp_path / "b-0.png"
    assert captured.out.split() == [str(first)]
    assert captured.err.strip().endswith(f"No space left on device; free some space or write elsewhere; already "
                                         f"written: {first} (1 of 2 images)")
    assert sorted(tmp_path.iterdir()) == [first]


def test_a_path_with_colons_is_printed_as_written_not_as_an_emoji(tiny_engine_dir, tmp_path, capsys):
    """rich read ``:fire:`` in a file name as an emoji: stdout named a file that does not exist."""
    out = tmp_path / "a:fire:b.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "-o", out) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert run_cli("export", "a:smile:b", "-o", tmp_path / "x") == 2
    assert "a:smile:b" in capsys.readouterr().err


def test_what_a_stopped_run_wrote_is_named_first_and_last_when_long():
    from sdexport.cli import _written

    paths = [Path(f"o-{i}.png") for i in range(5)]
    assert _written(paths[:1], 1) == "already written: o-0.png"
    assert _written(paths, 9) == "already written: o-0.png … o-4.png (5 of 9 images)"


def test_paths_on_stdout_are_whole_lines_whatever_their_length_or_brackets(tiny_engine_dir, tmp_path, capsys):
    """A script reads them: rich broke them at 80 columns without a terminal and read `[draft]` as markup."""
    folder = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2) / "[draft]"
    assert run_cli("run", tiny_engine_dir, "-p", "a", "-p", "b", "--steps", "2", "-o", folder / "boat.png") == 0
    assert capsys.readouterr().out.splitlines() == [str(folder / f"boat-{i}.png") for i in range(2)]
    assert all((folder / f"boat-{i}.png").is_file() for i in range(2))


def test_a_models_path_in_progress_lines_is_printed_as_written(tiny_diffusers_dir, tmp_path, capsys):
    """`export ./[draft]` printed "✓ Loading ./" (the step's words read as markup: an audit's finding)."""
    model = tmp_path / "[draft]"
    shutil.copytree(tiny_diffusers_dir, model)
    assert run_cli("export", model, "-o", tmp_path / "e", "--components", "unet", "--verify", "none") == 0
    assert f"✓ Loading {model} (" in capsys.readouterr().err


def test_the_python_api_saves_what_the_cli_saves(tiny_engine_dir, tmp_path):
    from sdexport.errors import SdexportError
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
    # and refuses what run -o refuses: a file inside an engine directory (which export --force then
    # refused as not sdexport's), a folder's name (written beside it as results-0.png...), an audit's finding
    with pytest.raises(SdexportError, match=rf"^{tiny_engine_dir / 'x.png'}: inside the engine directory "):
        result.save(tiny_engine_dir / "x.png")
    with pytest.raises(SdexportError, match=r"results/: a folder \(it ends in a separator\); give a file name such "
                                            r"as .*results/image.png$"):
        result.save(f"{tmp_path}/results/")
    assert not (tiny_engine_dir / "x.png").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "api.webp", "cli.webp"]


def test_quick_verification_is_counted_in_words(tmp_path, capsys):
    assert run_cli("export", "tiny", "-o", tmp_path / "e", "--verify", "quick", "--components", "unet") == 0
    captured = capsys.readouterr()
    assert "verification, each component: 1 point checked, 3 skipped by request" in " ".join(captured.out.split())
    assert "1/4" not in captured.out
    assert "skipped: opt, max, odd (quick verification)" in captured.err


def test_verification_turned_off_is_said_so_not_counted():
    """An export with ``--verify none`` skipped every point: the summary says verification was off,
    not "0 points checked, 4 skipped by request"; a record without points says nothing."""
    from sdexport.inspect_dir import points_words

    assert points_words({"status": "skipped", "points": [{"label": n, "status": "skipped"} for n in "abcd"]}) == \
        "off by request"
    assert points_words({"status": "skipped"}) == ""
    # another reason is said as it is, as text: a hand-edited one in rich's markup was a MarkupError (a review)
    said = points_words({"points": [{"label": "min", "status": "passed"},
                                    {"label": "opt", "status": "skipped", "reason": "see [/verify]"}]})
    assert said == "1 point checked, 1 skipped (see \\[/verify])"
    from rich.text import Text

    assert Text.from_markup(said).plain == "1 point checked, 1 skipped (see [/verify])"


def _bench_entry(name: str, e2e: list[float], stage_runs: list[tuple[float, list[float], float]]) -> dict:
    """A measured report entry: unmarked end-to-end samples, and marked runs (text, U-Net calls, VAE)
    whose overhead is the remainder of a total of 1.1 x their stages, as the harness records them."""
    def stats(samples: list[float]) -> dict:
        ordered = sorted(samples)
        return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "n": len(samples),
                "samples": samples}

    totals = [1.1 * (t + sum(u) + v) for t, u, v in stage_runs]
    return {
        "contender": name, "status": "measured", "case": {"batch": 1, "steps": 3, "height": 64, "width": 64},
        "e2e_s": stats(e2e), "images_per_s": 1 / stats(e2e)["median"], "speedup_vs_baseline": None,
        "text_encoder_s": stats([t for t, _, _ in stage_runs]),
        "unet_step_s": stats([s for _, u, _ in stage_runs for s in u]), "unet_calls": 3,
        "vae_decoder_s": stats([v for _, _, v in stage_runs]),
        "loop_overhead_s": stats([total - (t + sum(u) + v) for total, (t, u, v) in zip(totals, stage_runs)]),
        "marked_e2e_s": stats(totals), "stage_runs": len(stage_runs), "it_per_s": 10.0,
        "memory": {"host_rss_peak_mb": 100.0}, "gpu_busy": None,
    }


MARKED = [(0.01, [0.1, 0.12, 0.1], 0.05), (0.02, [0.1, 0.1, 0.3], 0.06), (0.01, [0.1, 0.1, 0.1], 0.05)]


def test_stage_columns_add_up_to_the_marked_runs_and_gaps_are_explained():
    from sdexport.bench.report import case_warnings, stages_sum

    entry = _bench_entry("torch", [0.5, 0.51, 0.49, 0.5, 0.5], MARKED)
    marked_mean = sum(entry["marked_e2e_s"]["samples"]) / 3
    assert stages_sum(entry) == pytest.approx(marked_mean)  # means add up; medians would not here
    assert stages_sum(entry) != pytest.approx(sum(entry[k]["median"] for k in ("text_encoder_s", "vae_decoder_s",
                                                                               "loop_overhead_s"))
                                              + 3 * entry["unet_step_s"]["median"])
    close = _bench_entry("torch", [marked_mean] * 5, MARKED)
    assert case_warnings([close], "torch") == []
    apart = _bench_entry("torch", [0.8] * 5, MARKED)
    [note] = case_warnings([apart], "torch")
    assert f"the stages add up to {marked_mean * 1000:.1f} ms, end-to-end is 800.0 ms" in note
    assert "means over 3 separate marked runs" in note


def test_few_repeats_and_a_wide_spread_are_flagged(capsys):
    from sdexport.bench.report import markdown

    base = _bench_entry("diffusers", [0.5, 0.5, 0.51, 0.5, 0.49], MARKED)
    noisy = _bench_entry("torch", [0.3, 0.5, 0.4, 0.45, 0.6], MARKED)
    noisy["speedup_vs_baseline"] = 0.5 / 0.45
    few = _bench_entry("onnxruntime-cpu", [0.4, 0.41, 0.4], MARKED)
    few["speedup_vs_baseline"] = 1.25
    report = synthetic_bench_report([base, noisy, few], "diffusers")
    text = markdown(report)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "1.11× ⚠" in rows["torch"] and "±24.8%" in rows["torch"]
    assert "1.25×" in rows["onnxruntime-cpu"] and "⚠" not in rows["onnxruntime-cpu"].split(" | ")[3]
    assert "**Too few repeats**: 3 timed runs per contender; at least 5" in text
    assert "**Too few repeats**: 1 timed run per contender" in markdown(
        {**report, "results": [_bench_entry("diffusers", [0.5], MARKED)]})
    assert "(raise `repeats` in the scenario, or pass `--repeats`)" in text and "- Command line:" not in text
    assert "**Spread too wide to trust the ratio** (variation over 10% of the mean): torch ±25%" in text
    assert text.lower().count("random weights") == 1
    assert "GPU busy" not in text  # no GPU measured: no column of dashes, no paragraph about it
    # flags that replaced the scenario's values are named, and the advice follows them
    flagged = markdown({**report, "command_line": {"--repeats": 3, "--contenders": "diffusers,torch"}})
    assert "- Command line: --repeats 3, --contenders diffusers,torch (in place of the scenario's values)" in flagged
    assert "(raise `--repeats` on the command line)" in flagged
    from sdexport.bench.harness import command_line
    from sdexport.bench.plan import Options

    assert command_line(Options()) == {}
    assert command_line(Options(repeats=3, contenders=["diffusers", "torch"], warmup=0)) == {
        "--contenders": "diffusers,torch", "--repeats": 3, "--warmup": 0}
    on_gpu = markdown({**report, "results": [{**base, "gpu_busy": {"fraction": 0.9}}, noisy, few]})
    assert "| GPU busy |" in on_gpu and "| 90% |" in on_gpu and "GPU busy is the share" in on_gpu
    # printed as written: a table row is one line however narrow the terminal
    from sdexport.cli import _print_markdown

    _print_markdown(text)
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("| ")] == list(rows.values())


HEAVY = ("torch", "diffusers", "transformers", "onnxruntime")
_PROBE = f"""
import json, sys
from sdexport.cli import main
for args in json.loads(sys.argv[1]):
    sys.argv = ["sdexport", *args]
    try:
        main()
    except SystemExit:
        pass
    print("LOADED", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr, flush=True)
"""


def _loaded(*commands: list[str]) -> list[list[str]]:
    """The heavy libraries loaded after each command, run one after the other in one new process.
    Imports only accumulate, so a command that imports one is the first whose line names it; one
    process for all saves a Python start-up and sdexport's import per command."""
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)
    lines = [line.split()[1:] for line in done.stderr.splitlines() if line.startswith("LOADED")]
    assert len(lines) == len(commands), done.stderr[-2000:]
    return lines


def test_tables_to_a_pipe_are_drawn_whole_even_where_ci_forces_colour(monkeypatch):
    """rich draws 80 columns without a terminal, cutting cells; the stream itself decides, not rich's
    is_terminal, which CI's FORCE_COLOR turns on."""
    import io
    import sys

    from sdexport.console import _width

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert _width(stderr=False) == 1000
    monkeypatch.setattr(sys, "stdout", Tty())
    assert _width(stderr=False) is None  # a terminal wraps as it is wide
    monkeypatch.setattr(sys, "stderr", None)
    assert _width(stderr=True) == 1000
    # COLUMNS=0, which some shells set, is no width: rich drew every line, errors too, 0 columns wide
    monkeypatch.setenv("COLUMNS", "0")
    assert _width(stderr=False) == 80  # (a terminal that cannot say its size: this fake)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert _width(stderr=False) == 1000
    done = subprocess.run([sys.executable, "-m", "sdexport", "inspect", "/nonexistent/engines"], capture_output=True,
                          text=True, env={**{k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}, "COLUMNS": "0"})
    assert (done.returncode, done.stderr) == (2, "error: /nonexistent/engines: no such engine directory\n")


_READER_LEAVES = """
import sys
from pathlib import Path
from sdexport.console import console, print_result
for i in range(3):
    print_result(f"{sys.argv[1]}-{i}.png")
    console.print("progress")
    sys.stdin.readline()  # (the test has read the first line and closed the pipe)
    Path(f"{sys.argv[1]}-{i}.png").write_text("an image")
"""


def test_a_reader_leaving_stdout_or_stderr_does_not_stop_the_work(tmp_path):
    """`sdexport run ... | head -1` ended the run with status 1 and no word as the second path was
    printed (rich's way with a broken pipe), leaving images of the same call unsaved (an audit's
    finding); `2>&1 | head -1` likewise. What is printed after the reader left is dropped now."""
    for both in (False, True):
        base = tmp_path / f"image{int(both)}"
        process = subprocess.Popen([sys.executable, "-c", _READER_LEAVES, str(base)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT if both else subprocess.PIPE)
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == f"{base}-0.png\n".encode()
        process.stdout.close()  # as `head -1` leaves
        process.stdin.write(b"\n" * 3)
        process.stdin.close()
        process.wait(120)
        errors = b"" if both or process.stderr is None else process.stderr.read()
        assert process.returncode == 0 and sorted(p.name for p in tmp_path.glob(f"{base.name}-*")) == [
            f"{base.name}-{i}.png" for i in range(3)], errors


def test_an_export_to_a_target_another_process_holds_is_refused_before_torch_loads(tmp_path):
    from sdexport.export.plan import ENGINE_DIR
    from sdexport.output_dir import updating

    with updating(tmp_path / "held", ENGINE_DIR):  # as a running export or build holds it
        assert _loaded(["export", "tiny", "-o", str(tmp_path / "held")]) == [[]]


def test_quick_answers_import_no_heavy_library(engine_copy, tmp_path):
    """What makes --help, --version, inspect and every argument error answer at once: none of them
    imports torch, diffusers, transformers or onnxruntime (timings: benchmarks/startup.py)."""
    import time

    from sdexport import hash_records

    assert _loaded(["inspect", str(engine_copy)]) != [[]]  # the first inspect loads the tokenizers and scheduler...
    time.sleep(hash_records.RACY_SECONDS + 0.1)  # (files hashed while fresh are hashed again)
    _loaded(["inspect", str(engine_copy)])
    foreign = tmp_path / "optimum-export"  # an export to adopt: ours less its manifest
    shutil.copytree(engine_copy, foreign)
    (foreign / "manifest.json").unlink()
    damaged = tmp_path / "damaged"  # a download cut short: run hashes the files before loading diffusers
    shutil.copytree(engine_copy, damaged)
    with (damaged / "unet" / "model.onnx").open("r+b") as graph:
        graph.truncate(100)
    quick = [
        ["--help"], ["--version"], ["run", "--help"], ["bench", "--help"],
        ["inspect", str(engine_copy)],  # ...later ones trust what it recorded
        ["export", "nope", "-o", str(tmp_path / "x")],
        ["export", "tiny", "-o", str(tmp_path / "x"), "--dtype", "fp64"],
        ["run", str(engine_copy), "-p", "x", "--steps", "0"],
        ["run", str(engine_copy), "-p", "x", "-o", str(tmp_path / "x.gif")],
        ["run", str(engine_copy), "-p", "x", "--height", "1000"],
        ["build", str(engine_copy), "--target", "nope"],
        ["build", str(tmp_path / "nope")],
        ["adopt", str(tmp_path / "nope")],
        ["adopt", str(foreign), "--batch", "0"],  # (its sizes read from its configs)
        ["adopt", str(foreign), "--model", "nope"],
        ["bench", "benchmarks/scenarios/tiny-cpu.toml", "--repeats", "0"],
        ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
        ["serve", str(engine_copy), "--http-port", "0"],
        ["triton-repo", str(engine_copy), "-o", str(tmp_path / "repo"), "--max-steps", "0"],
        ["triton-repo", str(engine_copy), "-o", str(tmp_path / "repo"), "--max-steps", "100000"],  # (1000 trained)
        ["triton-repo", str(engine_copy), "-o", str(tmp_path / "repo"), "--height", "100"],  # (not a multiple)
        ["triton-repo", str(engine_copy), "-o", str(tmp_path / "repo"), "--engine-path", "/srv/modèles"],
        ["serve", str(engine_copy), "--width", "4096"],
    ]
    loaded = dict(zip((" ".join(args) for args in quick), _loaded(*quick), strict=True))
    assert loaded == {" ".join(args): [] for args in quick}
    # run reads onnxruntime to resolve its backend (which provider), not torch or diffusers
    assert _loaded(["run", str(damaged), "-p", "x", "-o", str(tmp_path / "y.png")]) == [["onnxruntime"]]


@pytest.mark.parametrize(("value", "traceback"), [("0", False), ("off", False), ("", False), ("1", True), ("yes", True)])
def test_sdexport_traceback_reads_0_and_off_as_off(value, traceback, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDEXPORT_TRACEBACK", value)
    if traceback:
        from sdexport.errors import SdexportError

        with pytest.raises(SdexportError):
            run_cli("export", "nope", "-o", tmp_path / "x")
    else:
        assert run_cli("export", "nope", "-o", tmp_path / "x") == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_a_damaged_tokenizer_file_or_a_foreign_ckpt_is_refused_before_torch_loads(tiny_diffusers_dir, tmp_path,
                                                                                  capsys):
    """Both were found only as transformers or torch read them, after the heavy imports."""
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    (model / "tokenizer" / "tokenizer_config.json").write_text("{bad")
    page = tmp_path / "model.ckpt"
    page.write_text("<html>Not Found</html>")  # a download that saved the server's error page
    commands = [["export", str(model), "-o", str(tmp_path / "a")],
                ["export", str(page), "--config", "tiny", "-o", str(tmp_path / "b")]]
    assert _loaded(*commands) == [[], []]
    for command, said in zip(commands, ("tokenizer_config.json: not valid JSON", "an HTML or XML page, not the weights")):
        assert run_cli(*command) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def test_a_tokenizer_without_its_length_is_refused_before_torch_loads(tiny_diffusers_dir, tmp_path, capsys):
    """Without tokenizer_config.json (or its model_max_length) transformers' tokenizer gives 10^30
    tokens, which the export took for the text encoder's length: a ValueError after every weight
    was loaded."""
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    config = model / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    config.unlink()
    command = ["export", str(model), "-o", str(tmp_path / "out")]
    assert _loaded(command) == [[]]
    assert run_cli(*command) == 2
    assert (f"error: {model / 'tokenizer'}: no tokenizer_config.json, whose model_max_length gives the prompt's length "
            "in tokens (77 for CLIP)" in capsys.readouterr().err)
    del settings["model_max_length"]
    config.write_text(json.dumps(settings))
    assert run_cli(*command) == 2
    assert f"error: {config}: model_max_length None is not a sequence length" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_build_names_a_missing_directory_before_a_missing_tensorrt(tmp_path, capsys):
    """What the user typed first; on a machine without TensorRT, then, that it is missing."""
    for target in ("tensorrt", "onnxruntime-cuda"):
        assert run_cli("build", tmp_path / "nope", "--target", target) == 2
        assert "no such engine directory" in capsys.readouterr().err


def test_build_refuses_an_optimization_level_tensorrt_has_not_before_asking_for_it(engine_copy, capsys):
    """Levels above 5 act as 5 but keyed apart (a second plan for the same build); below 0 TensorRT refuses."""
    for level in ("6", "-1"):
        assert run_cli("build", engine_copy, "--optimization-level", level) == 2
        assert f"--optimization-level {level}: TensorRT's levels are 0 to 5" in capsys.readouterr().err


def test_verbosity_flags_anywhere_conflicts_refused_and_reset_per_call(tmp_path, capsys, monkeypatch):
    from sdexport import console

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # as on a machine where the user set nothing

    assert run_cli("-q", "inspect", tmp_path / "nope") == 2  # errors show whatever the verbosity
    assert capsys.readouterr().err.startswith("error: ") and console.verbosity() == console.QUIET
    assert run_cli("--version") == 0 and console.verbosity() == console.NORMAL  # each call starts afresh
    assert os.environ.get("TQDM_DISABLE") == "1"  # diffusers' and transformers' bars: off by default
    assert run_cli("bench", "-v", "compare", tmp_path / "a", tmp_path / "b") == 2  # -v before bench's command
    assert "BASELINE" in capsys.readouterr().err and console.verbosity() == console.VERBOSE
    assert "TQDM_DISABLE" not in os.environ  # -v: the libraries' own bars and logs are back
    assert run_cli("-q", "inspect", tmp_path / "nope", "-v") == 2
    assert capsys.readouterr().err.strip() == "error: -q and -v: give one of -q, -v, --verbosity"


def test_foreign_images_with_look_alike_metadata_and_huge_jpeg_records(tiny_engine_dir, tmp_path, capsys):
    from PIL import Image

    from sdexport.runtime.images import read_parameters

    lookalike = tmp_path / "holiday.jpg"
    exif = Image.Exif()
    exif[0x0131] = "sdexport-viewer 2.0"
    exif[0x010E] = "my holiday photo"
    Image.new("RGB", (8, 8), "red").save(lookalike, exif=exif)
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "-o", lookalike) == 2
    assert "was not written by sdexport" in capsys.readouterr().err
    long = "雪の中の狐 " * 1650  # far past CLIP's 77 tokens, within 10,000 characters; with its negative, over a
    out = tmp_path / "long.jpg"  # JPEG's 64 KB of EXIF (json writes each of these characters in six bytes)
    assert run_cli("run", tiny_engine_dir, "-p", long, "-n", long, "--steps", "1", "-o", out) == 0
    record = read_parameters(out)
    assert record["truncated_from"] == "left out: longer than a JPEG's EXIF holds" and long.startswith(record["prompt"])


def test_a_whitespace_padded_prompt_fits_a_jpeg_as_the_tokenizer_reads_it(tiny_engine_dir, tmp_path):
    """Whitespace fits in 77 tokens but not in a JPEG's 64 KB of EXIF (tabs and newlines: two bytes
    each in its JSON and two in A1111's text; a text has at most 10,000 characters): the record keeps
    the text with its whitespace runs collapsed (the same tokens), not an error after the run, and
    still remakes the image."""
    import numpy as np
    from PIL import Image

    from sdexport.runtime.images import _texts_read, read_parameters

    padded = "a fox" + "\t\n" * 4_950 + " in the snow "
    out, again = tmp_path / "padded.jpg", tmp_path / "again.jpg"
    assert run_cli("run", tiny_engine_dir, "-p", padded, "-n", padded, "--steps", "1", "-o", out) == 0
    record = read_parameters(out)
    assert record["prompt"] == record["negative_prompt"] == "a fox in the snow" and "collapsed" in record["whitespace"]
    assert run_cli("run", tiny_engine_dir, "-p", record["prompt"], "-n", record["negative_prompt"], "--steps", "1",
                   "-o", again) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert "whitespace" not in read_parameters(again)
    # an ensemble's image holds the base model's record too; a short record is left as it is
    nested = _texts_read({"prompt": "a  b", "base": {"prompt_2": "c\n\nd", "truncated_from": {"prompt": "x"}}}, True)
    assert nested["prompt"] == "a b" and nested["base"]["prompt_2"] == "c d"
    assert nested["base"]["truncated_from"] == "left out: longer than a JPEG's EXIF holds"
    assert _texts_read({"prompt": "a b"}, True) == {"prompt": "a b"}


def test_split_inpainting_from_one_image_says_the_images_differ(tiny_engine_dir, tmp_path, capsys):
    from PIL import Image

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (128, 128), "gray").save(init)
    Image.new("L", (128, 128), 255).save(mask)
    assert run_cli("run", tiny_engine_dir, "-p", "a", "-p", "b", "-p", "c", "--steps", "2", "--init-image", init,
                   "--mask", mask, "--strength", "0.75", "-o", tmp_path / "inpaint.png") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "inpainting samples the one init image with each call's first seed" in err


def test_the_chart_puts_speedups_above_the_error_bars(tmp_path, monkeypatch):
    import matplotlib.axes

    from sdexport.bench.report import plot

    base = _bench_entry("diffusers", [0.5, 0.5, 0.51, 0.5, 0.49], MARKED)
    other = _bench_entry("torch", [0.3, 0.5, 0.4, 0.45, 0.6], MARKED)
    other["speedup_vs_baseline"] = 1.1
    steady = _bench_entry("onnxruntime-cpu", [0.4, 0.41, 0.4, 0.4, 0.39], MARKED)
    steady["speedup_vs_baseline"] = 1.25
    labels: list[tuple[str, float]] = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda ax, text, xy, *a, **k: labels.append((text, xy[1], k.get("xytext"))) or real(ax, text, xy, *a, **k))
    plot({"results": [base, other, steady], "environment": {"gpu": None, "host": {"cores": 2}, "date": "2026-12-01"},
          "random_weights": True, "model": "preset tiny (random weights)", "scenario": {"name": "synthetic"},
          "baseline": "diffusers"}, tmp_path / "chart.png")
    # at the top of the error bar (max), lifted 4 points; a ratio the table marks ⚠ says so here too
    assert labels == [("1.10×\n(noisy)", 0.6, (0, 4)), ("1.25×", 0.41, (0, 4))]


def test_the_command_lines_defaults_are_the_libraries():
    """The CLI writes its defaults as literals (importing the modules that hold them would load numpy
    on every `--help`); they must stay the values the Python API and the served model default to."""
    import typer.main

    from sdexport.cli import app
    from sdexport.export.plan import DEFAULT_OPSET
    from sdexport.serving.protocol import MODEL_NAME
    from sdexport.serving.repository import Batching
    from sdexport.serving.triton_model import MAX_STEPS

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]

    def default(command: str, name: str):
        return next(p.default for p in commands[command].params if p.name == name)

    assert default("export", "opset") == DEFAULT_OPSET
    for command in ("serve", "triton-repo"):
        assert default(command, "max_steps") == MAX_STEPS
        assert round(default(command, "max_queue_delay_ms") * 1000) == Batching().max_queue_delay_us
    assert default("loadtest", "model") == MODEL_NAME


def test_every_text_file_is_read_and_written_as_utf8():
    """sdexport writes its text files as UTF-8 (results.md holds a "×"), and reads those and the
    configs it is given as UTF-8: a read in the locale's encoding failed under an ASCII locale
    (``LC_ALL=C`` without UTF-8 mode) after the whole benchmark had run. So every ``open``,
    ``read_text`` and ``write_text`` in text mode in sdexport and its scripts names its encoding."""
    import ast

    root = Path(__file__).parent.parent
    unnamed = []
    for path in sorted([*(root / "sdexport").rglob("*.py"), *(root / "scripts").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
                continue
            call = node.func
            if isinstance(call, ast.Name) and call.id == "open":
                mode = node.args[1] if len(node.args) > 1 else None
            elif (isinstance(call, ast.Attribute) and call.attr in ("open", "read_text", "write_text")
                  and not (isinstance(call.value, ast.Name)  # a class's or a module's own open
                           and (call.value.id[0].isupper() or call.value.id in ("self", "os", "tarfile")))):
                mode = node.args[0] if call.attr == "open" and node.args else None
            else:
                continue
            mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                unnamed.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not unnamed, f"text opened without an encoding (the locale's, then): {unnamed}"


def test_the_summary_prints_the_directory_alone_on_its_first_line(tiny_engine_dir, capsys):
    """README: paths of what was written, one per line, whole: ``export ... | head -1`` read the
    directory and its label as one line (a path with a space could not be cut from it)."""
    assert run_cli("inspect", tiny_engine_dir, "--no-check") == 0  # (export's summary, printed alike)
    assert capsys.readouterr().out.splitlines()[0] == str(tiny_engine_dir)

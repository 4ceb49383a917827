"""Shared fixtures: the tiny model and one exported tiny engine directory per test session; and
how the run is spread over the machine's cores.

Exporting is the slow part of most tests, so it happens once per test process; tests that damage
an engine directory work on a copy.

Where pytest-xdist is installed (the dev extra), the default selection runs in one worker process
per core (at most four), a test module at a time per worker so that its module fixtures are made
once, and each worker's torch gets its share of the cores: the tiny models' operators are too
small for torch's thread pool, whose threads only spin against the other worker's. On 2 cores
that halves the run. ``-n 0`` runs in this process, ``-n N`` with N workers; selections that can
take ``slow`` or ``gpu`` tests (real SD architectures, one GPU and its timings) stay serial.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

MAX_WORKERS = 4
"""Each worker holds its own exports and models; four keep a run within a few GB on a large host."""

SERIAL_MARKERS = ("slow", "gpu")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_the_cores_in_a_worker() -> int | None:
    """Give torch (here and in the processes tests start) this worker's share of the cores, before
    torch is imported; a thread count the user set is kept. Returns the count it set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, _cores() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


WORKER_THREADS = _share_the_cores_in_a_worker()

from sdexport.console import quiet_libraries  # noqa: E402  (after the thread count is set)

quiet_libraries()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Spread the run over the cores when pytest-xdist is loaded and no ``-n`` was given (before
    xdist reads its options)."""
    if not config.pluginmanager.has_plugin("xdist") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    expression = config.option.markexpr or ""
    if any(m in expression and f"not {m}" not in expression for m in SERIAL_MARKERS):
        return
    if config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if config.option.dist == "no":
        config.option.dist = "loadfile"  # a module's fixtures are made once, in one worker


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown where xdist is not installed
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """One worker per core, at most MAX_WORKERS; none (this process) on one core.
    PYTEST_XDIST_AUTO_NUM_WORKERS, xdist's own setting, still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = _cores()
    return min(cores, MAX_WORKERS) if cores > 1 else 0


def run_cli(*args: str) -> int:
    """Run the CLI in-process (the same ``main`` as the console script) and return its exit code."""
    from sdexport.cli import main

    argv = sys.argv
    sys.argv = ["sdexport", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
    return 0


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """Run as on a machine without a GPU, whatever this one has (no CUDA for torch, no CUDA provider
    for onnxruntime, no TensorRT): tests of the CPU paths keep their meaning on a GPU host."""
    import torch

    from sdexport.runtime import providers

    real = providers.available_providers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(providers, "available_providers",
                      lambda: [p for p in real() if p != providers.PROVIDERS["cuda"]])
        patch.setitem(sys.modules, "tensorrt", None)
        yield


@pytest.fixture
def without_gpu() -> Iterator[None]:
    """``cpu_only()`` for a whole test: ``pytestmark = pytest.mark.usefixtures("without_gpu")``."""
    with cpu_only():
        yield


@pytest.fixture(scope="session", autouse=True)
def user_cache_of_this_session(tmp_path_factory) -> Iterator[None]:
    """sdexport's user cache (hash records, timing caches) in a folder of the test session, for this
    process and the sdexport processes tests start, not in the user's ~/.cache."""
    from sdexport.user_cache import ENVIRONMENT

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT, str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model():
    from sdexport.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_engine_dir(tmp_path_factory) -> Path:
    from sdexport.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export("tiny", out, ExportOptions())
    return out


@pytest.fixture(scope="session")
def tiny_fp16_engine_dir(tmp_path_factory) -> Path:
    """An fp16 export of the tiny model, shared: tests that build into it work on a copy."""
    from sdexport.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("engines-fp16") / "tiny"
    export("tiny", out, ExportOptions(dtype="fp16", verify="quick"))
    return out


@pytest.fixture
def engine_copy(tiny_engine_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    tiny_model.save_pretrained(path)
    return path

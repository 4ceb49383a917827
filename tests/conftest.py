"""Shared fixtures: the tiny model and one exported tiny engine directory per test session.

Exporting is the slow part of most tests, so it happens once; tests that damage an engine
directory work on a copy.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdexport.console import quiet_libraries

quiet_libraries()


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

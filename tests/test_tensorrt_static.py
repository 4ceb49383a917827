"""The TensorRT code is type-checked against tensorrt-stubs, so API misuse shows up without a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _stubs_version() -> str | None:
    try:
        return version("tensorrt-stubs")
    except PackageNotFoundError:
        return None


@pytest.mark.skipif(_stubs_version() is None, reason='tensorrt-stubs is not installed (bash scripts/setup.sh --dev)')
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)")
def test_tensorrt_modules_pass_mypy_against_the_stubs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mypy_tensorrt.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "no issues found in 3 source files" in report  # (tensorrt_build, tensorrt_progress, tensorrt_backend)


@pytest.mark.skipif(_stubs_version() is None, reason="tensorrt-stubs is not installed")
def test_stub_repair_yields_valid_python(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import mypy_tensorrt
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = mypy_tensorrt.prepare_stubs(tmp_path)
    runtime = (out / "tensorrt_bindings" / "tensorrt.pyi").read_text()
    assert "def execute_async_v3" in runtime and "def deserialize_cuda_engine" in runtime
    assert (out / "tensorrt" / "__init__.pyi").is_file()

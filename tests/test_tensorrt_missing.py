"""Without TensorRT (here: only tensorrt-stubs), every TensorRT entry point says what to install."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

from sdexport.errors import MissingDependencyError, SdexportError


def _real_tensorrt() -> bool:
    try:
        import tensorrt
    except (ImportError, OSError):
        return False
    return hasattr(tensorrt, "Builder")


needs_no_tensorrt = pytest.mark.skipif(_real_tensorrt(), reason="a real TensorRT is installed here")


def _assert_install_hint(exc: MissingDependencyError) -> None:
    message = str(exc)
    assert exc.package == "TensorRT"
    assert 'pip install "sdexport[tensorrt]"' in message and "NVIDIA GPU" in message
    assert "\n" not in message


def test_modules_import_without_tensorrt():
    for name in ("sdexport.build", "sdexport.build.profiles", "sdexport.build.cache_key",
                 "sdexport.build.tensorrt_build", "sdexport.runtime.tensorrt_backend"):
        importlib.import_module(name)


@needs_no_tensorrt
def test_stubs_namespace_is_not_taken_for_tensorrt():
    from sdexport.build.tensorrt_build import require_tensorrt

    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt()
    _assert_install_hint(info.value)


def test_missing_module_is_reported(monkeypatch):
    from sdexport.build.tensorrt_build import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt()
    _assert_install_hint(info.value)


def test_stub_only_module_is_reported(monkeypatch):
    from sdexport.build.tensorrt_build import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(MissingDependencyError, match="only its type stubs"):
        require_tensorrt()


def test_a_tensorrt_whose_libraries_do_not_load_is_reported(monkeypatch, tmp_path: Path):
    """A wheel whose import raises OSError (libnvinfer not loadable): one line from the builder, and
    the bench records TensorRT as unavailable rather than stopping with the OSError."""
    from sdexport.bench.environment import _tensorrt_status, tensorrt_version
    from sdexport.build.tensorrt_build import require_tensorrt

    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(MissingDependencyError, match="libnvinfer.so.10"):
        require_tensorrt()
    assert tensorrt_version() is None
    assert "libnvinfer.so.10" in _tensorrt_status()["status"]


def test_a_real_looking_module_is_accepted(monkeypatch):
    from sdexport.build.tensorrt_build import require_tensorrt

    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.__version__ = "10.13.3.9"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert require_tensorrt() is fake


@needs_no_tensorrt
def test_build_says_what_to_install(tiny_engine_dir: Path):
    from sdexport.build.tensorrt_build import build_engines

    with pytest.raises(MissingDependencyError) as info:
        build_engines(tiny_engine_dir)
    _assert_install_hint(info.value)


@needs_no_tensorrt
def test_tensorrt_backend_says_what_to_install(tiny_engine_dir: Path):
    from sdexport.manifest import load_manifest
    from sdexport.runtime.tensorrt_backend import TensorRTEngine, deserialize_plan, load_tensorrt_engines

    manifest = load_manifest(tiny_engine_dir)
    with pytest.raises(MissingDependencyError) as info:
        load_tensorrt_engines(tiny_engine_dir, manifest, ["unet"], cuda_graph=False)
    _assert_install_hint(info.value)
    plan = tiny_engine_dir / "unet" / "missing.plan"
    with pytest.raises(MissingDependencyError):
        deserialize_plan(plan)
    with pytest.raises(MissingDependencyError):
        TensorRTEngine.load(manifest.spec("unet"), plan, profile=manifest.shape_profile)


def test_backend_without_any_tensorrt_module(monkeypatch, tmp_path: Path):
    from sdexport.runtime.tensorrt_backend import deserialize_plan

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as info:
        deserialize_plan(tmp_path / "x.plan")
    _assert_install_hint(info.value)


def test_missing_error_is_a_user_error():
    assert issubclass(MissingDependencyError, SdexportError)  # the CLI prints it as one line, exit 2


def test_cli_build_without_tensorrt_says_what_to_install(tiny_engine_dir, capsys):
    from conftest import cpu_only, run_cli

    with cpu_only():
        assert run_cli("build", tiny_engine_dir) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")]
    assert 'pip install "sdexport[tensorrt]"' in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--batch", "abc"], "--batch 'abc': expected integers as min:opt:max"),
    (["--batch", "4:1:2"], "--batch"),
    (["--components", ""], "--components '': expected comma-separated names"),
    (["--components", "unett"], "unknown or unexported component(s) unett"),
])
def test_cli_build_says_what_the_user_typed_wrong_before_what_the_machine_lacks(tiny_engine_dir, capsys, flags,
                                                                               message):
    from conftest import cpu_only, run_cli

    with cpu_only():
        assert run_cli("build", tiny_engine_dir, *flags) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "sdexport[tensorrt]" not in err, err


def test_cli_run_tensorrt_backend_without_tensorrt_says_what_to_install(tiny_engine_dir, capsys):
    from conftest import cpu_only, run_cli

    with cpu_only():
        assert run_cli("run", tiny_engine_dir, "-p", "x", "--backend", "tensorrt") == 2
    assert 'sdexport[tensorrt]' in capsys.readouterr().err

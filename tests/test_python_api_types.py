"""The Python API's types, as a user's type checker reads them: sdexport ships ``py.typed``, and the
README's forms pass ``mypy --strict`` (tests/typed_usage.py)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)")
def test_the_readmes_python_forms_pass_a_strict_type_check(tmp_path):
    """One text for a list, a range of seeds, one image, a LoRA path as text, a typed list of scales,
    an on_step that returns something: each refused by the fields' own (normalised) types before."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "tests" / "mypy-typed-usage.ini"),
         "--cache-dir", str(tmp_path / "cache"), str(ROOT / "tests" / "typed_usage.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0 and "no issues found in 1 source file" in result.stdout, result.stdout + result.stderr
    # the package read for its types, not found missing and taken as Any (ignore_missing_imports
    # would then pass anything: a setuptools editable install's import hook is not followed)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from sdexport.runtime.loading import load_pipeline\nx: int = load_pipeline('d')\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "tests" / "mypy-typed-usage.ini"),
         "--cache-dir", str(tmp_path / "cache"), str(wrong)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert 'has type "Txt2ImgPipeline", variable has type "int"' in result.stdout, result.stdout + result.stderr


def _typed_init(path: Path, name: str) -> ast.FunctionDef:
    """The ``__init__`` class ``name`` declares for type checkers alone (under ``if TYPE_CHECKING``)."""
    module = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(node for node in module.body if isinstance(node, ast.ClassDef) and node.name == name)
    guard = next(node for node in cls.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return next(node for node in guard.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")


@pytest.mark.parametrize(("module", "name"), [("sdexport/runtime/request.py", "GenerationRequest"),
                                              ("sdexport/models/lora.py", "LoraFile")])
def test_the_typed_constructors_take_every_field_in_order_with_its_default(module, name):
    """The type checker's constructor is written beside the dataclass's: its parameters are the
    fields, in order, with the same defaults (a tuple standing for a list), so neither drifts."""
    import importlib

    cls = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
    init = _typed_init(ROOT / module, name)
    parameters = [a.arg for a in init.args.args[1:]]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    assert parameters == [f.name for f in fields]

    def plain(value: object) -> object:
        return list(value) if isinstance(value, tuple) else value

    defaults = dict(zip(parameters[len(parameters) - len(init.args.defaults):],
                        (ast.literal_eval(d) for d in init.args.defaults), strict=True))
    for f in fields:
        declared = (f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        assert plain(defaults.get(f.name, "required")) == plain(declared), f.name


def test_the_package_says_it_is_typed():
    """PEP 561: the marker beside the package, and in the wheel (setuptools' package data)."""
    import tomllib

    import sdexport

    assert (Path(sdexport.__file__).parent / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["sdexport"]

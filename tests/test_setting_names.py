"""Refusals name a request setting as the caller does: ``run``'s option, or the served input."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import sdexport
from sdexport.errors import SdexportError
from sdexport.serving.protocol import INPUT_NAMES
from sdexport.setting_names import (
    SCENARIO_KEYS,
    api_field,
    assigned,
    input_name,
    option,
    option_given,
    run_option,
    scenario_key,
    setting,
    settings_named,
)

SHARED_CHECKS = ("runtime/request.py", "runtime/schedulers.py", "runtime/image_inputs.py", "runtime/ensemble.py")
"""The checks the Python API, ``run``, ``serve`` and the bench share."""

OPERATOR_ADVICE = {"export the refiner with the base model's --height and --width ranges",
                   "with --clip-skip", "without --clip-skip"}
"""Literals of the shared checks that name another command's options (``export --height``), which
share a name with ``run``'s."""


def _run_options() -> set[str]:
    import typer.main

    from sdexport.cli import app

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    return {option for param in run.params for option in param.opts if option.startswith("--")}


def test_every_served_input_is_an_option_of_run_under_the_name_run_option_gives():
    options = _run_options()
    assert [name for name in INPUT_NAMES if run_option(name) not in options] == []
    assert run_option("crops_coords_top_left") == "--crop-top-left"  # the one whose name differs


def test_every_served_input_is_a_field_of_the_request_under_the_name_api_field_gives():
    from dataclasses import fields

    from sdexport.runtime.request import GenerationRequest

    names = {field.name for field in fields(GenerationRequest)}
    # (fit is image_inputs.fit_image's parameter: the API fits its images before the request)
    assert [name for name in INPUT_NAMES if api_field(name) not in names] == ["fit"]


def test_a_setting_is_named_as_the_apis_field_unless_the_caller_says_otherwise():
    assert setting("init_image") == "image"
    with settings_named(run_option):
        assert setting("init_image") == "--init-image"
        with pytest.raises(SdexportError):
            with settings_named(input_name):
                raise SdexportError(setting("init_image"))
        assert setting("steps") == "--steps"  # restored after the inner one raised
    assert setting("seed") == "seeds"


def test_a_value_is_given_as_the_caller_writes_it():
    assert assigned("height", 96) == "height=96"
    with settings_named(run_option):
        assert assigned("height", 96) == "--height 96"
        assert assigned("crops_coords_top_left", "0 0") == "--crop-top-left 0 0"
    with settings_named(input_name):
        assert assigned("init_image", "x.png") == "init_image=x.png"


def test_export_options_a_scenario_states_are_named_as_its_keys_there():
    from dataclasses import fields

    from sdexport.bench.scenario import SCHEMA, Scenario

    keys = {field.name for field in fields(Scenario)} | {f"export.{k}" for k in SCHEMA["properties"]["export"]["properties"]}
    assert set(SCENARIO_KEYS.values()) <= keys
    assert option_given("--controlnet", "x") == "--controlnet x"  # export, and run's checks of a manifest
    with settings_named(scenario_key):
        assert option_given("--controlnet", "x") == "controlnets: x" and option("--batch") == "export.batch"
        assert option_given("--union-images", 2) == "--union-images 2"  # no scenario key: the option
    with settings_named(input_name):  # a served request: the operator's export options stay flags
        assert option("--batch") == "--batch"


def _message_texts(path: Path) -> list[tuple[int, str]]:
    """The string literals of ``path`` (the pieces of f-strings too), docstrings and other bare
    string statements left out."""
    tree = ast.parse(path.read_text())
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare]


@pytest.mark.parametrize("module", SHARED_CHECKS)
def test_the_shared_checks_spell_no_run_option_of_a_served_input(module):
    """Written as ``--steps``, a refusal would read as ``run``'s in a served reply too: the shared
    checks name such settings through ``setting``. Other commands' options (``exported with
    --controlnet``) are the operator's and stay."""
    served = {run_option(name) for name in INPUT_NAMES}
    spelled = [(line, flag) for line, text in _message_texts(Path(sdexport.__file__).parent / module)
               if not any(advice in text for advice in OPERATOR_ADVICE) for flag in re.findall(r"--[a-z0-9-]+", text) if flag in served]
    assert spelled == []

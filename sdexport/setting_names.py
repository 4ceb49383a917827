"""How a refusal names a request setting: as the Python API's field, ``run``'s option or the served input.

The checks in ``runtime.request`` (and the scheduler and image checks they call) answer the
Python API, ``run``, ``serve`` and ``bench`` alike. A message that tells the user which
setting to change names it through ``setting(name)``, ``name`` being the served input's name
(``init_image``). By default that gives the ``GenerationRequest`` field (``image``); the CLI runs
inside ``settings_named(run_option)`` (``--init-image``), and ``serve`` answers each request inside
``settings_named(input_name)``, so a Triton client reads the names of the inputs it sent, not flags
of a command it never ran (``bench`` likewise: its scenarios' keys share those names).

Options of other commands (``export --controlnet``, ``serve --max-steps``) are the operator's to
change and stay spelled as flags, except where a bench scenario states the same thing as a key
(its ``controlnets``, ``adapter``, ``[export]`` ranges): ``option`` names those as the scenario's
keys inside ``settings_named(scenario_key)``, which the bench plans and runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

RUN_OPTION_EXCEPTIONS = {"crops_coords_top_left": "--crop-top-left"}
"""Served inputs whose ``run`` option is not their name with dashes (diffusers' argument name is
long for a flag); ``tests/test_setting_names.py`` checks every served input against ``run``."""

API_FIELD_EXCEPTIONS = {"init_image": "image", "seed": "seeds"}
"""Served inputs whose ``GenerationRequest`` field has another name (diffusers' ``image``; a list of
seeds), checked against the dataclass likewise."""


def api_field(name: str) -> str:
    """The ``GenerationRequest`` field of the served input ``name`` (``init_image``: ``image``)."""
    return API_FIELD_EXCEPTIONS.get(name, name)


def run_option(name: str) -> str:
    """``run``'s option for the served input ``name`` (``init_image``: ``--init-image``)."""
    return RUN_OPTION_EXCEPTIONS.get(name) or "--" + name.replace("_", "-")


def input_name(name: str) -> str:
    """The served input itself."""
    return name


def scenario_key(name: str) -> str:
    """A bench scenario's key: the served input's name, where a scenario has the setting (``steps``).
    A naming of its own, so that ``option`` names export options as the scenario's keys here only."""
    return name


SCENARIO_KEYS = {"--config": "config", "--controlnet": "controlnets", "--adapter": "adapter", "--batch": "export.batch",
                 "--height": "export.height", "--width": "export.width"}
"""Export options that a bench scenario states as keys of its own (``Scenario`` fields and its
``[export]`` table, checked in ``tests/test_setting_names.py``)."""


_NAMING: ContextVar[Callable[[str], str]] = ContextVar("sdexport_setting_naming", default=api_field)


def setting(name: str) -> str:
    """How the caller being answered names the setting ``name`` (a served input's name): the API's
    field unless ``settings_named`` says otherwise."""
    return _NAMING.get()(name)


def assigned(name: str, value: object) -> str:
    """The setting ``name`` given ``value`` as the caller writes it: ``--height 64`` to ``run``,
    ``height=64`` to the API or a served request (where a flag's spacing reads as two words)."""
    naming = _NAMING.get()
    return f"{naming(name)} {value}" if naming is run_option else f"{naming(name)}={value}"


def option(flag: str) -> str:
    """The export option ``flag`` as the caller names it: the flag, or a bench scenario's key
    (``controlnets`` for ``--controlnet``) while refusals name the scenario's keys."""
    return SCENARIO_KEYS.get(flag, flag) if _NAMING.get() is scenario_key else flag


def option_given(flag: str, argument: object) -> str:
    """The export option ``flag`` given ``argument``: ``--controlnet x``, or a scenario's ``controlnets: x``."""
    named = option(flag)
    return f"{named} {argument}" if named == flag else f"{named}: {argument}"


@contextmanager
def settings_named(naming: Callable[[str], str]) -> Iterator[None]:
    """Refusals raised inside name settings by ``naming`` (``input_name``: as a served request does)."""
    token = _NAMING.set(naming)
    try:
        yield
    finally:
        _NAMING.reset(token)

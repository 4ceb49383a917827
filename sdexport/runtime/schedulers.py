"""Scheduler names users type → diffusers scheduler classes built from the saved scheduler config.

The runtime uses diffusers' schedulers as they are: they are small, readable and what every SD user
compares against. Only the naming (and the Karras variant) is ours.
"""

from __future__ import annotations

from typing import Any

from sdexport.errors import SdexportError

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT = "default"
"""The scheduler class saved with the model."""


def scheduler_names() -> list[str]:
    return [DEFAULT, *SCHEDULERS]


def check_scheduler_name(name: str) -> None:
    if name != DEFAULT and name not in SCHEDULERS:
        raise SdexportError(f"unknown scheduler {name!r}; choose one of {', '.join(scheduler_names())}")


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A fresh scheduler (they hold per-run state) of ``name``, configured like the model's own."""
    import diffusers

    check_scheduler_name(name)
    class_name, overrides = SCHEDULERS.get(name, (config["_class_name"], {}))
    return getattr(diffusers, class_name).from_config(config, **overrides)

"""Benchmark scenarios: TOML files under benchmarks/scenarios/ naming model, shapes and contenders.

A scenario fixes everything that must be equal across contenders (weights, prompt, seed, scheduler,
steps, size, batch), so that a difference in the results is a difference between the contenders.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError

BASELINES = ("diffusers", "diffusers-compile")
RUNTIME_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "torch", "torch-compile", "tensorrt")
CONTENDERS = BASELINES + RUNTIME_BACKENDS


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    batch: int
    steps: int

    @property
    def label(self) -> str:
        return f"batch {self.batch}, {self.steps} steps"


@dataclass
class Scenario:
    name: str
    model: str
    description: str = ""
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = ""
    scheduler: str = "euler"
    guidance: float = 7.5
    seed: int = 0
    height: int = 512
    width: int = 512
    batch: list[int] = field(default_factory=lambda: [1])
    steps: list[int] = field(default_factory=lambda: [30])
    warmup: int = 1
    repeats: int = 5
    contenders: list[str] = field(default_factory=lambda: ["diffusers", "onnxruntime-cpu"])
    dtype: str = "auto"
    """Export / baseline precision: fp16 on a GPU and fp32 on a CPU when "auto"."""
    export: dict[str, Any] = field(default_factory=dict)
    """Extra export settings: verify, batch/height/width ranges."""
    build: dict[str, Any] = field(default_factory=dict)
    """TensorRT build settings: static, optimization_level, cuda_graph."""

    @property
    def cases(self) -> list[Case]:
        return [Case(b, s) for b, s in itertools.product(self.batch, self.steps)]


def load_scenario(path: Path) -> Scenario:
    if not path.is_file():
        raise SdexportError(f"{path}: no such scenario file (see benchmarks/scenarios/)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SdexportError(f"{path}: not valid TOML ({exc})") from None
    data.setdefault("name", path.stem)
    for key in ("batch", "steps"):
        if isinstance(data.get(key), int):
            data[key] = [data[key]]
    known = set(Scenario.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SdexportError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "model" not in data:
        raise SdexportError(f"{path}: a scenario needs a model (preset, diffusers directory or checkpoint)")
    scenario = Scenario(**data)
    bad = [c for c in scenario.contenders if c not in CONTENDERS]
    if bad:
        raise SdexportError(f"{path}: unknown contender(s) {', '.join(bad)}; choose from {', '.join(CONTENDERS)}")
    if scenario.repeats < 1 or scenario.warmup < 0:
        raise SdexportError(f"{path}: need repeats >= 1 and warmup >= 0")
    return scenario

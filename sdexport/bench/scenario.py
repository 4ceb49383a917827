"""Benchmark scenarios: TOML files under benchmarks/scenarios/ naming model, shapes and contenders.

A scenario fixes everything that must be equal across contenders (weights, prompt, seed, scheduler,
steps, size, batch), so that a difference in the results is a difference between the contenders.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError
from sdexport.export.plan import VERIFY_MODES

BASELINES = ("diffusers", "diffusers-compile")
RUNTIME_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-cuda-fused", "torch", "torch-compile",
                    "torch-compile-max", "tensorrt")
"""``onnxruntime-cuda``: the portable fp16 graphs; ``onnxruntime-cuda-fused``: the graphs of ``sdexport
build --target onnxruntime-cuda`` (built as part of loading) in CUDA graphs."""
CONTENDERS = BASELINES + RUNTIME_BACKENDS
SLOW_UNET_HOOK = "SDEXPORT_TEST_SLOW_UNET"
"""The test hook that slows runtime contenders on purpose (``bench.plan.slow_unet_hook``); a report's
``test_hooks`` records it under this name."""


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
    config: str | None = None
    """A single-file model's architecture, as ``export --config``: a preset or a diffusers directory."""
    description: str = ""
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = ""
    scheduler: str = "euler"
    guidance: float = 7.5
    """The same for every contender and every family (a scenario states its workload; ``run``'s
    default follows diffusers' per family, 5.0 for SDXL). Any value above 1 costs the same."""
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
    strength: float | None = None
    """img2img: every contender starts from the same synthetic init image (seeded pixels), noised
    this far (0 < strength <= 1); None: text to image (with ``inpaint``: the model's default)."""
    inpaint: bool = False
    """Inpainting: every contender repaints the middle of the same synthetic init image (a box mask
    over half its height and width), from ``strength`` or diffusers' default for the model
    (``STRENGTH_DEFAULTS``). An inpainting model (9-channel U-Net) needs it; a standard one blends."""
    controlnets: list[str] = field(default_factory=list)
    """ControlNet presets or directories (as ``export --controlnet``), each given the same synthetic
    edge map; the baseline is diffusers' ControlNet pipeline with the same ControlNets."""
    control_mode: list[int] = field(default_factory=list)
    """Union ControlNets: the control mode each one's edge map is given as (diffusers'
    ``control_mode``; e.g. 3, xinsir's canny/lineart), one per ControlNet."""
    control_scale: float = 1.0
    """``controlnet_conditioning_scale``, given to every contender alike (the same for img2img: not
    the task default ``sdexport run`` takes); non-zero, as a ControlNet at 0 is skipped by sdexport
    and still run by diffusers."""
    guess_mode: bool = False
    """ControlNet guess mode for every contender (``run --guess-mode``; on anyway where the first
    ControlNet pools): under CFG the ControlNets run at the prompts' batch, half the work."""
    adapter: str | list[str] | None = None
    """A T2I-Adapter preset or directory (as ``export --adapter``), or a list of them (diffusers'
    ``MultiAdapter``), each given a synthetic edge map as a ControlNet; the baseline is diffusers'
    adapter pipeline with the same adapter(s)."""
    adapter_scale: float = 1.0
    """``adapter_conditioning_scale``, given to every contender alike."""
    refiner: str | None = None
    """SDXL's ensemble of experts: an SDXL refiner preset, diffusers directory or checkpoint that
    refines the (SDXL) model's latents from ``denoising_end`` on, as ``run --refiner`` does; the
    baseline is diffusers' two pipelines, the base model's latents handed over undecoded."""
    denoising_end: float | None = None
    """With ``refiner``: the base model's fraction of the schedule (default 0.8, diffusers' example)."""
    refiner_config: str | None = None
    """A single-file refiner's architecture (``sdxl-refiner``, or a refiner's diffusers directory)."""

    @property
    def cut(self) -> float | None:
        """Where the base model hands over to the refiner (None without one)."""
        from sdexport.runtime.ensemble import DENOISING_END_DEFAULT

        if self.refiner is None:
            return None
        return DENOISING_END_DEFAULT if self.denoising_end is None else self.denoising_end

    @property
    def adapters(self) -> list[str]:
        """``adapter`` as a list (empty without)."""
        return [self.adapter] if isinstance(self.adapter, str) else list(self.adapter or [])

    @property
    def image_inputs(self) -> bool:
        """The contenders start from an init image (img2img, inpainting): the VAE encoder is exported
        and loaded."""
        return self.strength is not None or self.inpaint

    @property
    def cases(self) -> list[Case]:
        return [Case(b, s) for b, s in itertools.product(self.batch, self.steps)]


WORKLOAD_FIELDS = ("model", "config", "prompt", "negative_prompt", "scheduler", "guidance", "seed", "height", "width", "dtype",
                   "strength", "inpaint", "controlnets", "control_mode", "control_scale", "guess_mode", "adapter",
                   "adapter_scale", "refiner", "denoising_end", "refiner_config",
                   "export", "build")
"""What a scenario's figures depend on besides its cases (batch × steps) and how often it measures:
``sdexport bench compare`` compares two reports only when these are equal."""


def workload_value(scenario: dict[str, Any], name: str) -> Any:
    """A workload field of a report's scenario, its default where an older report lacks it."""
    if name in scenario:
        return scenario[name]
    default = Scenario.__dataclass_fields__[name]
    return default.default_factory() if callable(default.default_factory) else default.default


_COUNTS = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "uniqueItems": True}
"""``batch``, ``steps``: a case named twice would be measured twice and compared once."""
_RANGE_TEXT = {"type": ["string", "integer"]}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$", "maxLength": 100},
        "model": {"type": "string", "minLength": 1},
        "config": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "prompt": {"type": "string"},
        "negative_prompt": {"type": "string"},
        "scheduler": {"type": "string"},
        "guidance": {"type": "number", "minimum": 0},
        "seed": {"type": "integer", "minimum": 0},
        "height": {"type": "integer", "minimum": 1},
        "width": {"type": "integer", "minimum": 1},
        "batch": _COUNTS,
        "steps": _COUNTS,
        "warmup": {"type": "integer", "minimum": 0},
        "repeats": {"type": "integer", "minimum": 1},
        "contenders": {"type": "array", "items": {"enum": list(CONTENDERS)}, "minItems": 1},
        "dtype": {"enum": ["auto", "fp32", "fp16"]},
        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "inpaint": {"type": "boolean"},
        "controlnets": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 8},
        "control_mode": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
        "control_scale": {"type": "number"},
        "guess_mode": {"type": "boolean"},
        "adapter": {"anyOf": [{"type": "string", "minLength": 1},
                              {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                               "maxItems": 4}]},  # specs.MAX_ADAPTERS
        "adapter_scale": {"type": "number"},
        "refiner": {"type": "string", "minLength": 1},
        "denoising_end": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "refiner_config": {"type": "string", "minLength": 1},
        "export": {
            "type": "object",
            "properties": {"verify": {"enum": list(VERIFY_MODES)}, "batch": _RANGE_TEXT,
                           "height": _RANGE_TEXT, "width": _RANGE_TEXT},
            "additionalProperties": False,
        },
        "build": {
            "type": "object",
            "properties": {"static": {"type": "boolean"}, "cuda_graph": {"type": "boolean"},
                           "optimization_level": {"type": "integer", "minimum": 0, "maximum": 5}},
            "additionalProperties": False,
        },
    },
}
"""Types and ranges of a scenario file; unknown keys are named separately (with the known ones)."""


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario: every value of the wrong type or range is refused with one line."""
    from sdexport.manifest_schema import first_error
    from sdexport.runtime.schedulers import check_scheduler_name

    if not path.is_file():
        what = "a folder, not a scenario file" if path.is_dir() else "no such scenario file"
        raise SdexportError(f"{path}: {what} (examples: benchmarks/scenarios/ in sdexport's "
                            "repository; the keys: README, Benchmarks)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # (Windows editors start files with a BOM)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SdexportError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise SdexportError(f"{path}: not valid TOML (nested too deeply)") from None
    named = "name" in data
    data.setdefault("name", path.stem)
    for key in ("batch", "steps"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            data[key] = [value]
        elif key in data and not isinstance(value, list):  # (the schema would say only "not of type 'array'")
            raise SdexportError(f"{path}: {key} {value!r}: need a whole number or a list of them "
                                f"({key} = 4 or {key} = [1, 4])")
    known = set(Scenario.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SdexportError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "model" not in data:
        raise SdexportError(f"{path}: a scenario needs a model (preset, diffusers directory or checkpoint)")
    bad = [c for c in data.get("contenders", []) if c not in CONTENDERS] if isinstance(data.get("contenders"), list) else []
    if bad:
        raise SdexportError(f"{path}: unknown contender(s) {', '.join(map(str, bad))}; choose from {', '.join(CONTENDERS)}")
    problem = first_error(SCHEMA, data)
    if problem:
        if problem.startswith("name:") and not named:
            rule = ("is longer than 100 characters" if len(data["name"]) > 100
                    else "must be letters, digits, '.', '_' or '-'")
            problem = f"name {data['name']!r} (from the file name) {rule}; set name = \"...\""
        raise SdexportError(f"{path}: {problem}")
    endless = next((key for key, value in data.items() if isinstance(value, float) and not math.isfinite(value)), None)
    if endless is not None:  # TOML has nan and inf; JSON Schema's ranges let nan through
        raise SdexportError(f"{path}: {endless} {data[endless]}: need a finite number")
    scenario = Scenario(**data)
    if scenario.control_scale == 0:
        raise SdexportError(f"{path}: control_scale {scenario.control_scale}: need a non-zero number (at 0 "
                            "sdexport skips the ControlNets and diffusers still runs them: the contenders would not "
                            "do the same work)")
    if scenario.control_mode and len(scenario.control_mode) != len(scenario.controlnets):
        raise SdexportError(f"{path}: control_mode: {len(scenario.control_mode)} modes for {len(scenario.controlnets)} "
                            "ControlNet(s): union ControlNets take one each (plain ones none)")
    if scenario.guess_mode and not scenario.controlnets:
        raise SdexportError(f"{path}: guess_mode is a ControlNet setting: add controlnets, or drop it")
    if "control_scale" in data and not scenario.controlnets:
        raise SdexportError(f"{path}: control_scale is a ControlNet setting: add controlnets, or drop it")
    if "adapter_scale" in data and not scenario.adapter:
        raise SdexportError(f"{path}: adapter_scale is a T2I-Adapter setting: add adapter, or drop it")
    if scenario.adapter and (scenario.controlnets or scenario.image_inputs):
        raise SdexportError(f"{path}: adapter with {'controlnets' if scenario.controlnets else 'an init image'}: "
                            "diffusers' adapter pipelines generate from text alone; benchmark one kind")
    if scenario.refiner_config is not None and scenario.refiner is None:
        raise SdexportError(f"{path}: refiner_config is a single-file refiner's architecture: add refiner, or drop it")
    if scenario.denoising_end is not None and scenario.refiner is None:
        raise SdexportError(f"{path}: denoising_end is the base model's share before the refiner's: add refiner, or "
                            "drop it")
    if scenario.refiner is not None and scenario.controlnets and scenario.image_inputs:
        raise SdexportError(f"{path}: refiner with controlnets and {'inpaint' if scenario.inpaint else 'strength'}: "
                            "ControlNets on the base model of an ensemble run text to image only, as "
                            "`sdexport run --refiner` runs them")
    try:
        check_scheduler_name(scenario.scheduler)
    except SdexportError as exc:
        raise SdexportError(f"{path}: {exc}") from None
    from sdexport.runtime.request import MAX_SEED

    if scenario.seed + max(scenario.batch) - 1 > MAX_SEED:
        raise SdexportError(f"{path}: seed {scenario.seed}: image seeds (seed + i) must stay below 2^64")
    return scenario

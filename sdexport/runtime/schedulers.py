"""Scheduler names users type → diffusers scheduler classes built from the saved scheduler config.

The runtime uses diffusers' schedulers as they are: they are small, readable and what every SD user
compares against. Only the naming (and the Karras variant) is ours.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdexport.errors import SdexportError, one_line
from sdexport.setting_names import setting

if TYPE_CHECKING:
    import torch

    from sdexport.runtime.request import GenerationRequest

_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_exponential_sigmas": False,
           "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False}
"""DPM++ 2M itself, whatever variant a model saved (the SDE algorithm, third order, other sigmas):
every DPMSolverMultistepScheduler setting that makes another sampler, at DPM++ 2M's value (all in
diffusers 0.39, the oldest sdexport takes)."""
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_DPM_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {**_DPM_2M, "use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
DEFAULT = "default"
"""The scheduler class saved with the model."""
A1111_SAMPLERS = {
    "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras", "pndm": "PLMS", "lms": "LMS", "unipc": "UniPC",
    "lcm": "LCM",
}
"""The names A1111's "Sampler:" field uses (PNDM without its Runge-Kutta steps is PLMS)."""


def scheduler_label(scheduler: Any) -> str:
    """The name a user would pass to get ``scheduler`` (an instance): ``pndm`` for the model's default
    PNDMScheduler, say, so that saved images name what ran, not "default"; the class name for a
    scheduler none of ours matches."""
    config = scheduler.config
    for name, (class_name, overrides) in SCHEDULERS.items():
        if type(scheduler).__name__ == class_name and all(config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__


def a1111_sampler(scheduler: Any) -> str:
    """The A1111 "Sampler:" name of ``scheduler`` (an instance), where one fits its configuration
    (DPM++ names only for the dpmsolver++ algorithm; " Karras" for Karras sigmas); else its class name.
    A config keeps the Karras setting a model was saved with though the scheduler picked over its own
    has none (DDIM, Euler a, PNDM, LCM): "DDIM Karras" named a schedule that never ran."""
    config = scheduler.config
    name = A1111_SAMPLERS.get(scheduler_label(scheduler))
    if name is None or name.startswith("DPM++") and config.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
        return type(scheduler).__name__
    karras = "use_karras_sigmas" in inspect.signature(type(scheduler).__init__).parameters
    if karras and config.get("use_karras_sigmas") and not name.endswith("Karras"):
        name += " Karras"
    return name


def extra_calls(name: str, steps: int, calls: int) -> str | None:
    """Why ``calls`` U-Net calls were made for ``steps`` steps, when they differ (None otherwise)."""
    if calls == steps:
        return None
    counted = f"{calls} U-Net call{'s' if calls != 1 else ''} for {steps} step{'s' if steps != 1 else ''}"
    if name == "pndm" and calls == steps + 1:
        return f"{counted}: PNDM's first step takes two (its multistep warm-up)"
    return f"{counted} (the {name} scheduler)"


def scheduler_names() -> list[str]:
    return [DEFAULT, *SCHEDULERS]


def check_scheduler_name(name: str) -> None:
    if not isinstance(name, str) or name != DEFAULT and name not in SCHEDULERS:  # (a list: TypeError, an audit)
        raise SdexportError(f"unknown scheduler {name!r}; choose one of {', '.join(scheduler_names())}")


LOOP_CALLS = ("set_timesteps", "scale_model_input", "step", "init_noise_sigma")
"""What the denoising loop uses of every scheduler; an init image also needs ``add_noise``."""


def make_scheduler(name: str, config: dict[str, Any], *, fix: str | None = None) -> Any:
    """A fresh scheduler (they hold per-run state) of ``name``, configured like the model's own.

    The saved config's own class must be one of diffusers' schedulers: a config naming anything else
    (or not a scheduler at all) is refused with one line, never imported blindly. ``fix``: what the
    refusal tells the user to do (default: the runtime's, another scheduler or a new export).
    """
    import diffusers

    check_scheduler_name(name)
    class_name, overrides = SCHEDULERS.get(name, (config.get("_class_name"), {}))
    cls = getattr(diffusers, str(class_name), None) if isinstance(class_name, str) else None
    backends = getattr(cls, "_backends", None)
    if isinstance(backends, list) and str(getattr(cls, "__module__", "")).startswith("diffusers.utils.dummy_"):
        # diffusers' stand-in for a scheduler whose optional package is missing (DPMSolverSDEScheduler:
        # torchsde): it was called "not a diffusers scheduler", and the user told to fix a valid config
        # (``fix`` is for a config to mend: this one is sound)
        missing = [b for b in backends if b != "torch"] or backends
        raise SdexportError(
            f"scheduler config names {class_name!r}, which needs the optional package{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)}: pip install {' '.join(missing)}"
            + ("" if fix else f", or pick another with {setting('scheduler')} ({', '.join(SCHEDULERS)})")
        )
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise SdexportError(
            f"scheduler config names {class_name!r}, which is not a diffusers scheduler; "
            + (fix or f"pick one with {setting('scheduler')} ({', '.join(SCHEDULERS)}) or re-export")
        )
    try:
        scheduler = _from_config(cls, config, overrides)
    except Exception as exc:  # diffusers validates configs with assorted exception types
        raise SdexportError(f"cannot build the {class_name} scheduler from its saved config ({one_line(exc, 300)})"
                            + (f"; {fix}" if fix else "")) from None
    lacking = [call for call in LOOP_CALLS if not hasattr(scheduler, call)]
    if lacking:  # (a diffusers scheduler made for another loop: ScoreSdeVe, DiscreteDDIM, ...)
        raise SdexportError(
            f"the {class_name} scheduler has no {', '.join(lacking)}, which the denoising loop uses; "
            + (fix or f"pick another with {setting('scheduler')} ({', '.join(SCHEDULERS)})")
        )
    trained = scheduler.config.get("num_train_timesteps")  # (KarrasVe's and DDPMWuerstchen's have none)
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is not None and trained is not None and len(table) != int(trained):  # e.g. trained_betas of another length
        raise SdexportError(
            f"the saved scheduler config is inconsistent: {len(table)} noise levels (trained_betas) for "
            f"num_train_timesteps {trained}; {fix or 're-export'}"
        )
    return scheduler


def set_schedule(scheduler: Any, steps: int, device: Any) -> None:
    """``scheduler.set_timesteps(steps)``, its schedule kept where its step reads it without making
    the host wait for a GPU (``device``, the latents').

    diffusers' pipelines put the timesteps on the GPU. Where a scheduler indexes its noise table
    with the timestep (PNDM, SD 1.5's default, DDIM, LCM: no ``sigmas``), each such read of a device
    timestep waits for the device, three to six per step: theirs stay on the host (a CPU number in
    a GPU operation needs no wait). The sigma-based ones read their host-side sigmas by step index
    and the timesteps only to find their first step (once a run): theirs go to the device, as
    diffusers puts them (inpainting's blend asks ``add_noise`` on host copies: ``HostSchedule``). UniPC alone copies each sigma it reads to the latents'
    device (a blocking copy, four per step): its sigmas go there once (its arithmetic is then
    diffusers' own on the GPU; its second-order corrector still waits once a step, in
    ``torch.linalg.solve``'s check)."""
    sigma_based = hasattr(scheduler, "sigmas")
    scheduler.set_timesteps(steps, device=device if sigma_based else None)
    if type(scheduler).__name__ == "UniPCMultistepScheduler" and getattr(device, "type", "cpu") != "cpu":
        scheduler.sigmas = scheduler.sigmas.to(device)


class HostSchedule:
    """Inpainting's blend (a standard U-Net keeps the region outside the mask on the image's own
    path: ``add_noise`` at every step), asked of the scheduler on the host.

    ``add_noise`` on the latents copies what it reads to their device at every call: the sigmas,
    which diffusers keeps on the host for the sigma-based schedulers, PNDM's and DDIM's noise
    table, an index list; on a GPU each is a blocking copy, which waits for the steps queued before
    it. ``add_noise(x, n, t)`` is ``a * x + b * n`` for every diffusers scheduler (``x + sigma * n``,
    ``alpha * x + sigma * n``), so ``noise_levels`` asks it for ``a`` and ``b`` on the host (of the
    2x2 identity's rows), at the same step and with the same step index as the loop's call would,
    with host copies of the schedule made once before the loop swapped in for the call; a CPU
    number in a device operation needs no copy. ``a * x + b * n`` is the very sum ``add_noise``
    computes (its factor of ``x`` is exactly 1 where it has none), so the latents are the same."""

    def __init__(self, scheduler: Any, window: torch.Tensor) -> None:
        """``window``: the timesteps the loop runs (``schedule_window``), wherever they lie."""
        import torch

        self.tensors = {name: value.cpu() for name in ("timesteps", "sigmas")
                        if isinstance(value := getattr(scheduler, name, None), torch.Tensor)}
        self.window = window.cpu()
        self.unit = torch.eye(2)

    def noise_levels(self, scheduler: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` and ``b`` of ``scheduler.add_noise(x, n, window[step])`` now, as 0-d host tensors.
        The scheduler's timesteps and sigmas are back in place
        after; PNDM's, DDIM's and LCM's ``add_noise`` moves their noise table to the samples' device
        itself, here the host, where ``set_schedule`` keeps what their steps read."""
        kept = {name: getattr(scheduler, name) for name in self.tensors}
        try:
            for name, value in self.tensors.items():
                setattr(scheduler, name, value)
            levels = scheduler.add_noise(self.unit[0], self.unit[1], self.window[step:step + 1])
        finally:
            for name, value in kept.items():
                setattr(scheduler, name, value)
        return levels[0], levels[1]


def config_as_loaded(config: dict[str, Any], name: str, *, family: str, conditioned: bool,
                     inpainting: bool) -> dict[str, Any]:
    """The saved scheduler config as diffusers' Stable Diffusion pipelines run it.

    ``StableDiffusionPipeline`` and its img2img pipeline rewrite an outdated config as they load:
    ``steps_offset`` to 1 and ``clip_sample`` to False; the inpainting pipeline ``steps_offset``
    to 1 and ``skip_prk_steps`` to True. Configs saved by older diffusers (no ``steps_offset``; a
    DDIM config without ``clip_sample``, which then clips) sample otherwise as saved: DDIM's
    clipping alone moved the latents 0.94 rel-L2 (measured once, tiny model). SDXL's, the
    ControlNet, T2I-Adapter and latent consistency pipelines rewrite nothing, and so neither does
    this for them (``conditioned``: ``ModelDims.conditioned``).

    The default scheduler (``name``) is judged by its values, the class's defaults where the file
    says nothing, as the pipeline judges it; a named one by the keys the file holds, as
    ``X.from_config(pipe.scheduler.config)`` gives the others the new class's defaults."""
    if family != "sd" or conditioned:
        return config
    seen = make_scheduler(DEFAULT, config).config if name == DEFAULT else config
    fixes: dict[str, Any] = {}
    if seen.get("steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if inpainting and seen.get("skip_prk_steps", True) is False:
        fixes["skip_prk_steps"] = True
    if not inpainting and seen.get("clip_sample", False) is True:
        fixes["clip_sample"] = False
    return {**config, **fixes} if fixes else config


def check_model_scheduler(config: dict[str, Any], where: str) -> None:
    """The scheduler config a model brings, refused in one line where the export would write one the
    runtime cannot use: not a diffusers scheduler's, or holding a NaN (diffusers' own -Infinity is
    kept). Run once the model is loaded (diffusers is then imported), before any graph is made."""
    import json

    from sdexport.manifest import strict_json

    fix = f"fix {where}'s scheduler config (scheduler/scheduler_config.json, model_index.json's scheduler)"
    try:
        strict_json(json.dumps(config), infinity=True)
    except ValueError as exc:
        raise SdexportError(f"{where}: its scheduler config has a value JSON cannot hold ({exc}); {fix}") from None
    make_scheduler(DEFAULT, config, fix=fix)


def default_scheduler_note(config: dict[str, Any], where: str, *, family: str, conditioned: bool,
                           again: str = "export it again") -> str | None:
    """Why the model's own scheduler does not sample, where a dry run of it fails at ``USUAL_STEPS``
    and at a few steps (``FEW_STEPS``, or fewer where an LCM config takes fewer); None where it samples.

    A note for export and adopt to print, not a refusal: KarrasVe's or RePaint's ``step`` takes other
    arguments, UniPC's bh1 solver with a final sigma of zero returns NaN (diffusers' pipeline too), a
    consistency model's timesteps leave the trained ones; each passed unsaid and every ``run``
    without ``--scheduler`` was refused. The engines are sound, and any scheduler that samples runs
    them: a model whose config cannot be edited where it lies is still exported. ``family``,
    ``conditioned``: ``config_as_loaded``'s, for text to image; ``config`` passed
    ``check_model_scheduler``; ``again``: how a fixed config reaches the directory (its own copy is
    hashed in the manifest)."""
    loaded = config_as_loaded(config, DEFAULT, family=family, conditioned=conditioned, inpainting=False)
    scheduler = make_scheduler(DEFAULT, loaded)
    few = min(FEW_STEPS, _most_steps(scheduler) or FEW_STEPS)
    trouble = _trouble(DEFAULT, loaded, USUAL_STEPS)
    if trouble is None or _trouble(DEFAULT, loaded, few) is None:
        return None
    usable = _sampling(lambda name: config_as_loaded(config, name, family=family, conditioned=conditioned,
                                                     inpainting=False), exclude=DEFAULT)
    return (f"{where}: its scheduler, {type(scheduler).__name__}, {trouble}, and at {few} steps too: `run` with "
            f"these engines needs " + (f"another {setting('scheduler')} ({usable}), or " if usable else "")
            + f"its scheduler config fixed in {where} and {again}")


def _sampling(config_for: Callable[[str], dict[str, Any]], exclude: str) -> str:
    """The scheduler names, ``exclude`` left out, that sample ``USUAL_STEPS`` steps with the config
    each would read (``config_for(name)``): a named scheduler takes the saved keys its class knows,
    so UniPC's with a config of UniPC's bh1 solver returns NaN as well (a review)."""
    return ", ".join(n for n in SCHEDULERS if n != exclude and _trouble(n, config_for(n), USUAL_STEPS) is None)


def _from_config(cls: Any, config: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``cls.from_config(config, **overrides)``, without its detour through every compatible class.

    diffusers' ``from_config`` imports each class in ``cls._compatibles`` (some fifteen scheduler
    modules, and scipy.stats for a few of them: about a second here, a quarter of a tiny model's
    ``run``) only to leave out the config keys those classes take and this one does not. Filtering
    by this class's own ``__init__`` leaves out the same keys; the rest of the saved config is kept
    as hidden entries, as ``from_config`` keeps it, so ``scheduler.config`` is the same
    (tests/test_schedulers.py compares the two for every scheduler name). Known differences, in
    configs no scheduler saves: a ``dtype`` key (``from_config`` passes it on and fails) and
    DDIMInverseScheduler's deprecated ``set_alpha_to_zero`` (kept in its config there, not here).
    """
    used_defaults = set(config.get("_use_default_values", []))  # a live config: those keys were defaults
    saved = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
    expected = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"} - set(cls.ignore_for_config)
    expected |= set(cls._deprecated_kwargs)
    init = {k: v for k, v in saved.items() if k in expected and not k.startswith("_")}
    init.update(overrides)
    scheduler = cls(**init)
    hidden = {k: v for k, v in saved.items() if k not in init}
    if "_class_name" in hidden:
        hidden["_class_name"] = cls.__name__
    scheduler.register_to_config(**hidden)
    return scheduler


def check_steps(name: str, config: dict[str, Any], steps: int, from_image: bool = False) -> None:
    """Refuse a step count the scheduler cannot take with this model, before any engine runs, and
    (``from_image``: img2img, inpainting) a scheduler that cannot noise an init image.

    Near the model's number of training timesteps, several diffusers schedulers produce timesteps
    past the last trained one or collapse them, and then fail deep in ``step`` (IndexError,
    AssertionError) or return NaN. Rather than guess a limit per class, the scheduler is asked:
    its timesteps must lie within the trained ones, and a dry run of the whole loop on a tiny
    latent (a few milliseconds per hundred steps) must finish with finite values.
    """
    scheduler = make_scheduler(name, config)
    label = name if name != DEFAULT else f"default ({scheduler.__class__.__name__})"
    if from_image and not hasattr(scheduler, "add_noise"):  # (IPNDM, DDIMInverse: diffusers' img2img fails too)
        raise SdexportError(f"the {label} scheduler has no add_noise, which an init image needs (img2img and "
                            f"inpainting noise it); pick another {setting('scheduler')} "
                            f"({', '.join(n for n in SCHEDULERS if n != name)})")
    most = _most_steps(scheduler)
    if most is not None and steps > most:
        raise SdexportError(f"{setting('steps')} {steps}: the {label} scheduler takes at most {most} steps (its "
                            f"original_inference_steps); latent consistency models need 1 to {min(8, most)}")
    trouble = _trouble(name, config, steps)
    if trouble is None:
        return
    other = FEW_STEPS if steps > FEW_STEPS else USUAL_STEPS  # (another count: the same one proves nothing)
    if _trouble(name, config, other) is not None:  # (another count would not mend it: the config does not sample so)
        others = _sampling(lambda _: config, exclude=name)
        raise SdexportError(f"{setting('steps')} {steps}: the {label} scheduler {trouble}, and at {other} steps too "
                            f"with this model's scheduler config; " + (f"pick another {setting('scheduler')} ({others})"
                                                                       if others else "fix the config"))
    raise SdexportError(f"{setting('steps')} {steps}: the {label} scheduler {trouble}; use "
                        + ("fewer" if steps > other else "more") + " steps (20-50 is usual)")


def _most_steps(scheduler: Any) -> int | None:
    """An LCM scheduler's ``original_inference_steps``: it picks its steps among these (other
    schedulers carry the key of a saved LCM config unread)."""
    most = scheduler.config.get("original_inference_steps")
    takes = "original_inference_steps" in inspect.signature(type(scheduler).__init__).parameters
    return most if isinstance(most, int) and takes else None


FEW_STEPS = 4
USUAL_STEPS = 20
"""The step counts ``check_steps`` tries again at where a count fails (a few, or for a count of a few,
a usual one): failing there too, the saved config is at fault (UniPC's bh1 solver with a final sigma
of zero returns NaN at every count, and was told "use fewer"; consistency models' scheduler
reaches past the training timesteps at every count), not the count. An export dry-runs its model's
default at both (``default_scheduler_note``)."""


def _trouble(name: str, config: dict[str, Any], steps: int) -> str | None:
    """What keeps scheduler ``name`` from running ``steps`` steps of the loop with ``config``, in words
    after "the ... scheduler" ("refuses 20 steps (...)", "returns NaN at 20 steps"); None where its
    timesteps lie within the trained ones (or are noise levels: ``continuous_timesteps``) and a dry
    run on a tiny latent ends finite."""
    scheduler = make_scheduler(name, config)
    trained = int(scheduler.config.get("num_train_timesteps") or 0)  # (none: the dry run decides)
    try:
        scheduler.set_timesteps(steps)
    except Exception as exc:  # e.g. DDIM's ValueError for steps > num_train_timesteps
        return f"refuses {steps} steps ({one_line(exc, 300)})"
    timesteps = scheduler.timesteps
    outside = [float(t) for t in (timesteps.max(), timesteps.min()) if not 0 <= float(t) < trained] if len(timesteps) else []
    if outside and trained and not continuous_timesteps(scheduler):
        return (f"reaches timestep {outside[0]:g} at {steps} steps, outside the model's {trained} training "
                f"timesteps (0 to {trained - 1})")
    failure = _dry_run(scheduler)
    return None if failure is None else f"{failure} at {steps} steps"


def _dry_run(scheduler: Any) -> str | None:
    """Why a dry run of ``scheduler``'s whole loop (its timesteps set) on a tiny latent fails, in
    words after "the scheduler": "fails (...)" or "returns NaN"; None where it ends finite."""
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn((1, 1, 2, 2), generator=generator) * scheduler.init_noise_sigma
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    try:
        for t in scheduler.timesteps:
            scheduler.scale_model_input(latents, t)
            latents = scheduler.step(torch.zeros_like(latents), t, latents, return_dict=False, **kwargs)[0]
    except Exception as exc:  # IndexError, AssertionError, ... from inside the scheduler
        return f"fails ({one_line(exc, 200) or 'no reason given'})"
    return None if bool(torch.isfinite(latents).all()) else "returns NaN"


def continuous_timesteps(scheduler: Any) -> bool:
    """Whether the scheduler hands the U-Net a noise level rather than one of the training timesteps:
    diffusers' EDM schedulers (``0.25 log sigma``, negative at the end) and Euler with
    ``timestep_type`` "continuous" (CosXL, Playground v2.5), which no range of indices bounds."""
    return type(scheduler).__name__.startswith("EDM") or scheduler.config.get("timestep_type") == "continuous"


def schedule_window(scheduler: Any, request: GenerationRequest, family: str) -> Any:
    """The timesteps the loop runs, the scheduler (its ``set_timesteps`` called) told where it starts.

    All of them for txt2img; with an init image, the last ``int(steps * strength)`` (diffusers'
    ``get_timesteps``); from ``denoising_start`` (SDXL's ensemble of experts), those below its
    cut-off, as diffusers' SDXL img2img pipeline takes them (one more for a second-order scheduler
    cut between its two evaluations). Then up to ``denoising_end``: those at or above its cut-off,
    as diffusers' SDXL pipelines stop. A window with no step is refused (diffusers would hand its
    starting latents back as they are). ``run`` calls it on a scheduler of its own before any
    engine loads, the loop on the one it steps."""
    timesteps = scheduler.timesteps
    if request.denoising_start is not None or request.image is not None:
        order = getattr(scheduler, "order", 1)
        if request.denoising_start is not None:
            runs = int((timesteps < _cutoff(scheduler, request.denoising_start)).sum().item())
            runs += 1 if order == 2 and runs % 2 == 0 else 0
            first = len(timesteps) - runs
        else:
            first = (request.steps - request.denoising_steps(family)) * order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        timesteps = timesteps[first:]
    if request.denoising_end is not None:
        timesteps = timesteps[:int((timesteps >= _cutoff(scheduler, request.denoising_end)).sum().item())]
    if not len(timesteps):
        given = [f"denoising_{name} {value:g}" for name in ("start", "end")
                 if (value := getattr(request, f"denoising_{name}")) is not None]
        noised = request.image is not None and request.denoising_start is None  # (its strength cut the start)
        advice = f"raise {setting('steps')}"
        if noised:
            said, advice = strength_words(request, family, request.denoising_end,
                                          least_strength(scheduler, request, family, request.denoising_end))
            given.append(said)
        raise SdexportError(f"{' and '.join(given)} with {setting('steps')} {request.steps} ({request.scheduler} scheduler) "
                            f"leave no step: move the window or {advice}")
    return timesteps


def least_strength(scheduler: Any, request: GenerationRequest, family: str, end: float | None) -> float | None:
    """The least strength, in hundredths, that leaves an init image's run of ``request.steps`` (on
    ``scheduler``, its timesteps set) a step before a cut at ``end``; None where none does. Asked of
    the timesteps themselves: "above 1 - end" (0.5 for a cut at 0.5) was refused again at 0.51 and
    0.6 with four steps, where 0.75 gives the first one (an audit)."""
    from dataclasses import replace

    timesteps, order = scheduler.timesteps, getattr(scheduler, "order", 1)
    cut = None if end is None else _cutoff(scheduler, end)
    for hundredths in range(1, 101):
        trial = replace(request, strength=hundredths / 100)
        window = timesteps[(request.steps - trial.denoising_steps(family)) * order:]
        if cut is not None:
            window = window[:int((window >= cut).sum().item())]
        if len(window):
            return hundredths / 100
    return None


def strength_words(request: GenerationRequest, family: str, end: float | None,
                   least: float | None) -> tuple[str, str]:
    """An init image's strength as a refusal of an empty schedule names it (given, or the task's
    default, said so: SDXL img2img's 0.3 was left unnamed), and what would give the schedule a step
    before a cut at ``end``: ``least`` (``least_strength``), the least strength that does at these
    steps. A strength at or below 1 - end starts the schedule at or below the cut, where no step
    count helps (the advice to raise the steps was false there: a review's finding). Where no
    strength does (``least`` None: the cut lies above the schedule's first timestep), only more
    steps help, with such a strength raised too: "raise strength" was advised at strength 1, and
    "above 0.95" for a cut at 0.05 at 4 steps, refused again at 0.96 (an audit)."""
    strength = request.effective_strength(family)
    said = f"{setting('strength')} {strength:g}" + (" (the default)" if request.strength is None else "")
    low = end is not None and strength <= 1 - end
    if least is None:
        also = f" and {setting('strength')} above {1 - end:g}" if low and end is not None else ""
        return said, f"raise {setting('steps')}{also} (no strength leaves a step at {request.steps} steps)"
    if least > strength:
        return said, f"raise {setting('strength')} to {least:g} (the least that leaves a step at {request.steps} steps)"
    if low and end is not None:
        return said, f"raise {setting('strength')} above {1 - end:g}"
    return said, f"raise {setting('strength')} or {setting('steps')}"


def _cutoff(scheduler: Any, fraction: float) -> int:
    """The training timestep ``fraction`` of the way through the schedule (diffusers'
    ``discrete_timestep_cutoff``): the base model runs those at or above it, the refiner those below."""
    trained = scheduler.config.num_train_timesteps
    return int(round(trained - fraction * trained))

"""A benchmark's settings and every check that needs no model: the first second of ``sdexport bench``.

Contender names, override values, image sizes, profile limits, seeds and step counts are refused here,
from the scenario and the model's configs, before torch is imported or weights are read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdexport.bench.scenario import BASELINES, CONTENDERS, SLOW_UNET_HOOK, Case, Scenario
from sdexport.errors import SdexportError
from sdexport.models.outline import ModelOutline, outline_model
from sdexport.runtime.request import GenerationRequest, check_request
from sdexport.setting_names import input_name, scenario_key, settings_named
from sdexport.shapes import ImageGeometry, ShapeProfile, parse_range
from sdexport.specs import SDXL_REFINER


@dataclass
class Options:
    engine_dir: Path | None = None
    contenders: list[str] | None = None
    repeats: int | None = None
    warmup: int | None = None
    engine_cache: Path | None = None
    """Keep the export in this folder, keyed by what it depends on (``sdexport.bench.engine_cache``)."""
    refiner_engine_dir: Path | None = None
    """With ``engine_dir``, for a scenario's refiner: its sdxl-refiner engine directory."""


@dataclass(frozen=True)
class BenchPlan:
    contenders: list[str]
    """Baselines first: every other contender is compared with the first one's output."""
    repeats: int
    warmup: int
    outline: ModelOutline
    export_profile: ShapeProfile
    """The profile an engine directory is exported with when ``--engine-dir`` is not given."""
    scheduler_config: dict[str, Any]
    """The scheduler config the runtime contenders will use (the engine directory's, if given)."""
    slow_unet: dict[str, float] = field(default_factory=dict)
    """The test hook ``SDEXPORT_TEST_SLOW_UNET`` (see ``slow_unet_hook``): contender → seconds."""
    refiner: ModelOutline | None = None
    """The scenario's SDXL refiner (``Scenario.refiner``), exported with the same profile."""
    dtype: str | None = None
    """The given engine directory's precision, which the baselines run in too (None: the scenario's,
    ``harness.precision``)."""
    on_trust: tuple[str, ...] = ()
    """The flags (``--engine-dir``, ``--refiner-engine-dir``) whose given directory does not record
    the checkpoint it was made from (an ONNX export adopted without --model): taken on trust, which
    the report says of each. Every other directory was made from the scenario's model (or refiner)
    as it lies here: exported by the run, taken from the cache, or given and proven so
    (``_check_made_from``), and its Torch contenders reload that checkpoint; a directory on trust,
    the one its manifest names."""

    def from_scenario(self, flag: str) -> bool:
        """Whether the directory given as (or exported in place of) ``flag`` was made from the
        scenario's model as it lies here."""
        return flag not in self.on_trust

    def refiner_plan(self) -> BenchPlan:
        """This plan as the refiner's export sees it: its model, the same profile and precision."""
        assert self.refiner is not None
        return replace(self, outline=self.refiner, scheduler_config=self.refiner.scheduler_config, refiner=None)


def slow_unet_hook(contenders: list[str]) -> dict[str, float]:
    """A test hook for regression gates: ``SDEXPORT_TEST_SLOW_UNET="torch=0.05,onnxruntime-cpu=0.01"``
    sleeps that many seconds before every U-Net call of those runtime contenders, inside the timed
    region, so a CI pipeline can prove that ``sdexport bench compare`` fails on a slower build. The
    report records it and its Markdown says so at the top: such figures are not the code's."""
    text = os.environ.get(SLOW_UNET_HOOK, "").strip()
    if not text:
        return {}
    delays: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or not 0 <= seconds <= 60:
            raise SdexportError(f"{SLOW_UNET_HOOK}: {item.strip()!r}: need CONTENDER=SECONDS (0 to 60), comma-separated")
        if name not in contenders or name in BASELINES:
            raise SdexportError(f"{SLOW_UNET_HOOK}: {name!r} is not a runtime contender of this benchmark "
                                f"({', '.join(c for c in contenders if c not in BASELINES) or 'none'})")
        delays[name] = seconds
    return delays


@settings_named(scenario_key)  # refusals name the scenario's keys (steps), not run's options
def plan_bench(scenario: Scenario, options: Options, source: Path | None = None) -> BenchPlan:
    """What ``scenario`` under ``options`` runs, every refusal made from configs alone. ``source``:
    the scenario's file, named before the refusals of what it states (its model, parts, sizes and
    cases), as ``load_scenario`` names it before its own; those of an option name the option."""
    requested = options.contenders or scenario.contenders
    named = "--contenders" if options.contenders else f"{source}: contenders" if source else "contenders"
    unknown = [c for c in requested if c not in CONTENDERS]
    if not requested or unknown:
        raise SdexportError(f"{named}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONTENDERS)}")
    twice = sorted({c for c in requested if requested.count(c) > 1})
    if twice:  # a report keys its figures by contender; one run of each, in one process
        raise SdexportError(f"{named}: {', '.join(twice)} named more than once; each contender runs once per benchmark")
    if options.repeats is not None and options.repeats < 1:
        raise SdexportError(f"--repeats {options.repeats}: need at least 1 timed run")
    if options.warmup is not None and options.warmup < 0:
        raise SdexportError(f"--warmup {options.warmup}: need 0 or more warm-up runs")
    if options.refiner_engine_dir is not None and scenario.refiner is None:
        raise SdexportError(f"--refiner-engine-dir {options.refiner_engine_dir}: the scenario has no refiner; drop it, "
                            "or add refiner to the scenario")
    if scenario.refiner is not None and options.engine_dir is not None and options.refiner_engine_dir is None:
        raise SdexportError(f"--engine-dir with refiner {scenario.refiner}: give the refiner's engine directory too "
                            "(--refiner-engine-dir), or neither (the benchmark exports both)")
    if options.refiner_engine_dir is not None and options.engine_dir is None:
        raise SdexportError(f"--refiner-engine-dir {options.refiner_engine_dir}: give the base model's engine directory "
                            "too (--engine-dir), or neither (the benchmark exports both)")
    if options.engine_cache is not None:
        if options.engine_dir is not None:
            raise SdexportError("--engine-dir and --engine-cache: give one (an engine directory, or where to keep them)")
        from sdexport.bench.engine_cache import check_cache_folder

        check_cache_folder(options.engine_cache)
    contenders = [c for c in requested if c in BASELINES] + [c for c in requested if c not in BASELINES]
    with stated_in(source):
        outline, refiner, modes, embedded, export_profile = _check_stated(scenario)
    if options.engine_cache is not None and any(c not in BASELINES for c in contenders):  # (it exports into it)
        check_outside_hashed(options.engine_cache, "--engine-cache", hashed_folders(scenario, outline, refiner))
    images = 1
    dtype: str | None = None
    on_trust: list[str] = []
    geometry: ImageGeometry = outline
    profile, scheduler_config = export_profile, outline.scheduler_config
    # what the refiner's share of a case is checked against: its geometry, profile and scheduler config
    refiner_checks: tuple[ImageGeometry, ShapeProfile, dict[str, Any]] | None = None
    if refiner is not None:
        refiner_checks = (refiner, export_profile, refiner.scheduler_config)
    if options.engine_dir is not None:
        from sdexport.manifest import load_manifest, read_scheduler_config
        from sdexport.runtime.loading import takes_init_images

        manifest = load_manifest(options.engine_dir, verify_files=False)
        _refuse_unlike_baseline("--engine-dir", options.engine_dir, manifest)
        if manifest.family != outline.family:
            raise SdexportError(
                f"--engine-dir {options.engine_dir} holds a {manifest.family} model, but the scenario's model "
                f"{scenario.model} is {outline.family}: the baseline and the engines must be the same model"
            )
        if manifest.model_dims.inpainting != outline.inpainting:
            which = "an inpainting U-Net" if manifest.model_dims.inpainting else "a standard U-Net"
            raise SdexportError(
                f"--engine-dir {options.engine_dir} holds {which}, the scenario's model {scenario.model} does not: "
                "the baseline and the engines must be the same model"
            )
        if scenario.image_inputs and not takes_init_images(options.engine_dir, manifest):
            raise SdexportError(f"--engine-dir {options.engine_dir} has no vae_encoder, which the scenario's init image "
                                "needs (img2img, inpainting): export it too")
        if len(manifest.controlnets) != len(scenario.controlnets):
            raise SdexportError(
                f"--engine-dir {options.engine_dir} has {len(manifest.controlnets)} ControlNet(s), the scenario "
                f"{len(scenario.controlnets)}: the baseline and the engines must be the same model"
            )
        if len(manifest.adapters) != len(scenario.adapters):
            has = {0: "has no T2I-Adapter", 1: "has a T2I-Adapter"}.get(len(manifest.adapters),
                                                                          f"has {len(manifest.adapters)} T2I-Adapters")
            raise SdexportError(
                f"--engine-dir {options.engine_dir} {has}, the scenario {' + '.join(scenario.adapters) or 'none'}: "
                "the baseline and the engines must be the same model")
        if bool(manifest.model_dims.G) != embedded:
            kind = {True: "a latent consistency model", False: "a model guided by a batch half"}
            raise SdexportError(
                f"--engine-dir {options.engine_dir} holds {kind[bool(manifest.model_dims.G)]}, the scenario's model "
                f"{scenario.model} is {kind[embedded]}: the baseline and the engines must be the same model")
        if manifest.model_dims.N != modes:
            raise SdexportError(
                f"--engine-dir {options.engine_dir} has {'union' if manifest.model_dims.N else 'plain'} ControlNets, "
                f"the scenario {'union' if modes else 'plain'} ones: the baseline and the engines must be the same "
                "model")
        if not _check_made_from("--engine-dir", options.engine_dir, manifest, scenario.model, outline):  # (kind first)
            on_trust.append("--engine-dir")
        if not _check_parts_made_from("--engine-dir", options.engine_dir, manifest, scenario) \
                and "--engine-dir" not in on_trust:
            on_trust.append("--engine-dir")
        _check_engine_files("--engine-dir", options.engine_dir, manifest, contenders, scenario.image_inputs)
        dtype = _engine_precision(options.engine_dir, manifest, scenario)
        profile, geometry = manifest.shape_profile, manifest.model_dims
        images = manifest.model_dims.K or 1
        scheduler_config = read_scheduler_config(options.engine_dir, manifest)
        if options.refiner_engine_dir is not None:
            paired = _refiner_engines(options.refiner_engine_dir, options.engine_dir, manifest)
            assert refiner is not None and scenario.refiner is not None  # (refused above otherwise)
            if not _check_made_from("--refiner-engine-dir", options.refiner_engine_dir, paired.manifest,
                                    scenario.refiner, refiner):
                on_trust.append("--refiner-engine-dir")
            if not _check_parts_made_from("--refiner-engine-dir", options.refiner_engine_dir, paired.manifest, scenario) \
                    and "--refiner-engine-dir" not in on_trust:
                on_trust.append("--refiner-engine-dir")
            if paired.manifest.dtype != dtype:
                raise SdexportError(f"--refiner-engine-dir {options.refiner_engine_dir} is an {paired.manifest.dtype} "
                                    f"export, --engine-dir {options.engine_dir} an {dtype} one: give a pair of one "
                                    "precision")
            refiner_checks = (paired.manifest.model_dims, paired.manifest.shape_profile, paired.scheduler_config)
            _check_engine_files("--refiner-engine-dir", options.refiner_engine_dir, paired.manifest, contenders, False)
    for case in scenario.cases:
        request, refine = request_for(scenario, case), None
        if scenario.cut is not None:  # the base model's share, then the refiner's
            from sdexport.runtime.ensemble import halves

            request, refine = halves(request, scenario.cut)
        # a given engine directory's profile is widened by exporting it again: with export's flags
        naming = input_name if options.engine_dir is not None else scenario_key
        with stated_in(source), settings_named(naming):
            check_request(request, family=outline.family, dims=geometry, profile=profile,
                          scheduler_config=scheduler_config, controlnets=len(scenario.controlnets),
                          adapters=len(scenario.adapters), union_modes=modes, union_images=images,
                          guidance_embedding=embedded)
            if refine is not None and refiner_checks is not None:
                _check_refiner_share(scenario, request, refine, *refiner_checks, scheduler_config)
    return BenchPlan(
        contenders=contenders,
        repeats=options.repeats or scenario.repeats,
        warmup=scenario.warmup if options.warmup is None else options.warmup,
        outline=outline,
        export_profile=export_profile,
        scheduler_config=scheduler_config,
        slow_unet=slow_unet_hook(contenders),
        refiner=refiner,
        dtype=dtype,
        on_trust=tuple(on_trust),
    )


def _check_made_from(flag: str, engine_dir: Path, manifest: Any, model: str, outline: ModelOutline) -> bool:
    """A given engine directory was exported from the scenario's model (the baseline runs that one,
    and the report names it), else one line. True where that is proven; False where the export does
    not record its checkpoint's files, and is taken on trust."""
    from sdexport.models.source_files import made_from, preset_unchanged

    source = manifest.model.get("source") or {}
    modules = {manifest.spec(name).module for name in manifest.components}
    same = made_from(source, outline.preset, outline.sources[0] if outline.sources else None, modules)
    if same is False and source.get("kind") == "preset" and source.get("name") == outline.preset \
            and not source.get("seed", 0) and not preset_unchanged(source):  # (its name and seed are the scenario's)
        raise SdexportError(f"{flag} {engine_dir} was exported from preset {outline.preset} as another sdexport "
                            "defined it (its configs changed since): the baseline and the engines must be the same "
                            "model; export it again")
    if same is False:
        was = (f"preset {source.get('name')}" + (f" (seed {source['seed']})" if source.get("seed", 0) else "")
               if source.get("kind") == "preset" else str(source.get("path")))
        raise SdexportError(f"{flag} {engine_dir} was exported from {was}, not from the scenario's model {model}: "
                            "the baseline and the engines must be the same model (its weight files' sha256 are "
                            "compared where the paths differ)")
    return bool(same)


def _check_parts_made_from(flag: str, engine_dir: Path, manifest: Any, scenario: Scenario) -> bool:
    """A given engine directory's own VAE (a scenario names none, so its baseline runs the model's)
    and the scenario's ControlNets and T2I-Adapters, each, else one line: their counts alone were
    compared, and an export with another ControlNet, or with an fp16-safe ``--vae``, was timed
    against a baseline running other weights under the scenario's names (an audit: PSNR 6 dB, and
    no word why). True where every part is proven; False where the manifest cannot tell for one (a
    directory at another path whose files it does not list): taken on trust, and the report says so."""
    from sdexport.models.adapter import resolve_adapter
    from sdexport.models.controlnet import resolve_controlnet
    from sdexport.models.part_sources import adapter_records
    from sdexport.models.source_files import part_made_from

    source = manifest.model.get("source") or {}
    if source.get("vae"):
        raise SdexportError(f"{flag} {engine_dir} was exported with --vae {source['vae']}, and a scenario's baseline "
                            "runs its model's own VAE: the baseline and the engines must be the same model; give an "
                            "export without --vae")
    files = source.get("files") or {}
    proven = True
    for kind, records, given, resolve in (
        ("ControlNet", source.get("controlnets") or [], scenario.controlnets, resolve_controlnet),
        ("T2I-Adapter", adapter_records(source), scenario.adapters, resolve_adapter),
    ):
        for index, (record, argument) in enumerate(zip(records, given)):
            part = resolve(argument)
            same = part_made_from(record, part.preset.name if part.preset else None, part.path, files)
            proven = proven and same is True
            if same is False:
                was = (f"preset {record.get('name')}" + (f" (seed {record['seed']})" if record.get("seed", 0) else "")
                       if record.get("kind") == "preset" else str(record.get("path")))
                raise SdexportError(f"{flag} {engine_dir}: its {kind} {index + 1} was exported from {was}, not from "
                                    f"the scenario's {argument}: the baseline and the engines must be the same model "
                                    "(weight files' sha256 are compared where the paths differ)")
    return proven


def _engine_precision(engine_dir: Path, manifest: Any, scenario: Scenario) -> str:
    """The precision a given engine directory runs in, which the baselines take too: the scenario's
    ``dtype`` where it names one (refused if it differs), else the export's."""
    if scenario.dtype not in ("auto", manifest.dtype):
        raise SdexportError(f"--engine-dir {engine_dir} is an {manifest.dtype} export, and the scenario's dtype is "
                            f"{scenario.dtype}: export it in {scenario.dtype}, or set dtype to auto or {manifest.dtype}")
    return str(manifest.dtype)


@contextmanager
def stated_in(source: Path | None) -> Iterator[None]:
    """Refusals raised inside are of what the scenario file ``source`` states: named after it (the
    same exception, its type, attributes and traceback kept, for ``SDEXPORT_TRACEBACK=1``)."""
    try:
        yield
    except SdexportError as exc:
        if source is not None and len(exc.args) == 1:  # (one with several arguments words itself)
            exc.args = (f"{source}: {exc.args[0]}",)
        raise


def _check_stated(scenario: Scenario) -> tuple[ModelOutline, ModelOutline | None, int, bool, ShapeProfile]:
    """What the scenario states, checked from the models' configs: its model and refiner outlines,
    its ControlNets' union modes (0: plain or none), whether the model embeds the guidance (a latent
    consistency model), and the profile the benchmark exports with."""
    outline = outline_model(scenario.model, config=scenario.config)
    if outline.missing_part is not None and not (scenario.controlnets or scenario.adapters):
        missing, flag = outline.missing_part  # (as export refuses it: diffusers' own baseline would too)
        key = {"--controlnet": "controlnets", "--adapter": "adapter"}[flag]
        raise SdexportError(f"{missing}; complete it, or set {key} in the scenario")
    refiner = _refiner_outline(scenario, outline)  # first: the checks below would ask for an init image
    if outline.inpainting and not scenario.inpaint:
        raise SdexportError(f"{scenario.model}: an inpainting model (its U-Net takes a mask): set inpaint = true in "
                            "the scenario")
    if outline.family == SDXL_REFINER and not scenario.image_inputs:
        raise SdexportError(f"{scenario.model}: the SDXL refiner refines an image: set strength (img2img) or "
                            "inpaint = true in the scenario")
    if outline.adapters and not scenario.adapter:
        named = ", ".join(f'"{p}"' for p in outline.adapters)
        raise SdexportError(f"{scenario.model}: a T2I-Adapter pipeline directory: name its adapter in the scenario "
                            f"(adapter = {named if len(outline.adapters) == 1 else f'[{named}]'}), so that every "
                            "contender runs it")
    from sdexport.models.adapter import adapters_for
    from sdexport.models.controlnet import controlnets_for, union_modes

    nets = controlnets_for(outline, scenario.controlnets)
    adapters_for(outline, scenario.adapters, len(nets))
    modes = union_modes(nets[0].config(outline.unet_config or {})) if nets else 0
    embedded = bool((outline.unet_config or {}).get("time_cond_proj_dim"))  # a latent consistency model: no CFG
    if modes and scenario.guess_mode and scenario.guidance > 1 and not embedded:
        raise SdexportError("guess_mode with union ControlNets under guidance: diffusers' union pipelines fail there "
                            "(they give the ControlNet the one-hot modes at the guidance batch), so the baseline "
                            "cannot run it; drop guess_mode, or set guidance = 1")
    export_profile = bench_export_profile(scenario)
    for model in (outline, *([refiner] if refiner else [])):
        export_profile.validate(model)
        export_profile.check_limits(model.vae_width)
    return outline, refiner, modes, embedded, export_profile


def _refiner_outline(scenario: Scenario, outline: ModelOutline) -> ModelOutline | None:
    """The scenario's refiner read (configs only) and checked against its base model, or None."""
    from sdexport.specs import FAMILY_LABELS

    if scenario.refiner is None:
        return None
    if outline.family != "sdxl":
        raise SdexportError(f"{scenario.model}: an SDXL base model hands its latents to the refiner, and this model is "
                            f"{FAMILY_LABELS[outline.family]}; name an SDXL base model with refiner")
    try:
        refiner = outline_model(scenario.refiner, config=scenario.refiner_config)
    except SdexportError as exc:
        raise SdexportError(f"refiner {exc}") from None
    if refiner.family != SDXL_REFINER:
        raise SdexportError(f"refiner {scenario.refiner}: not an SDXL refiner ({FAMILY_LABELS[refiner.family]})")
    if refiner.vae_scale_factor != outline.vae_scale_factor:
        raise SdexportError(f"refiner {scenario.refiner}: its latents are 1/{refiner.vae_scale_factor} of the image's "
                            f"sides, the base model's 1/{outline.vae_scale_factor}")
    return refiner


def _refiner_engines(engine_dir: Path, base_dir: Path, base_manifest: Any) -> Any:
    """``--refiner-engine-dir``, read (its manifest and scheduler) and checked as ``run --refiner``
    checks its refiner; fused LoRA refused as for ``--engine-dir``."""
    from sdexport.runtime.ensemble import Refiner

    paired = Refiner.open(engine_dir, base_dir, base_manifest, flag="--refiner-engine-dir")
    _refuse_unlike_baseline("--refiner-engine-dir", engine_dir, paired.manifest)
    return paired


def _check_engine_files(flag: str, engine_dir: Path, manifest: Any, contenders: list[str], image_inputs: bool) -> None:
    """What each sdexport contender will read from a given engine directory: its components, and the
    files hashed as its load hashes them (a damaged graph was found only as that contender loaded,
    after the baseline had been measured, and the bench ended with a report of the baseline alone)."""
    from sdexport.errors import EngineDirError
    from sdexport.runtime.loading import txt2img_components, verify_for_backend

    try:
        txt2img_components(manifest)
    except EngineDirError as exc:
        raise SdexportError(f"{flag} {engine_dir}: {exc}") from None
    for name in (c for c in contenders if c not in BASELINES):  # (their refusals name the directory)
        fused = name == "onnxruntime-cuda-fused"  # (as RuntimeContender loads each)
        verify_for_backend(engine_dir, manifest, "onnxruntime-cuda" if fused else name,
                           "auto" if fused else "portable", image_inputs=image_inputs)


def _refuse_unlike_baseline(flag: str, engine_dir: Path, manifest: Any) -> None:
    """Engines that compute otherwise than the diffusers baseline: LoRA fused in, embeddings added,
    or a clip skip (which the baseline's pipelines read otherwise, or not at all: diffusers#14124)."""
    if manifest.model.get("loras"):
        raise SdexportError(f"{flag} {engine_dir} has LoRA fused into its weights, the diffusers baseline has not: "
                            "the agreement figures would compare different models; benchmark a plain export")
    if manifest.model.get("embeddings"):
        raise SdexportError(f"{flag} {engine_dir} has textual inversion embeddings added to its text encoders, the "
                            "diffusers baseline has not: the agreement figures would compare different models; "
                            "benchmark a plain export")
    if manifest.model_dims.clip_skip:
        raise SdexportError(f"{flag} {engine_dir} reads the prompt with clip skip {manifest.model_dims.clip_skip} "
                            "(export --clip-skip), the diffusers baseline without: the agreement figures would "
                            "compare different readings; benchmark an export without it")


def _check_refiner_share(scenario: Scenario, base: GenerationRequest, refine: GenerationRequest,
                         dims: ImageGeometry, profile: ShapeProfile, refiner_config: dict[str, Any],
                         base_config: dict[str, Any]) -> None:
    """The refiner's share of a case, checked as ``run --refiner`` checks it (against the refiner's
    geometry, profile and scheduler), and neither share empty."""
    from sdexport.runtime.ensemble import check_refine, check_shares

    assert scenario.cut is not None
    check_refine(refine, dims=dims, profile=profile, scheduler_config=refiner_config,
                 who=f"refiner {scenario.refiner}")
    check_shares(base, base_config, refine, refiner_config, scenario.cut)


def own_engines(engine_dir: Path | None, output_dir: Path) -> bool:
    """Whether ``engine_dir`` is one of the ``engines/`` of the benchmark output being replaced: it is
    then carried into the new output instead of being protected from it."""
    if engine_dir is None:
        return False
    return engine_dir.resolve().parent == output_dir.parent.resolve() / output_dir.name / "engines"


def hashed_folders(scenario: Scenario, outline: ModelOutline, refiner: ModelOutline | None) -> list[Path]:
    """The folders whose every file the export's key (``engine_cache.export_key``) hashes: the model's
    (and its refiner's) sources, the ControlNets and adapters the scenario names, where folders."""
    paths = [*outline.sources, *(refiner.sources if refiner else ()), *map(Path, scenario.controlnets),
             *map(Path, scenario.adapters)]
    return [p.resolve() for p in paths if p.is_dir()]


def check_outside_hashed(path: Path, flag: str, folders: list[Path]) -> None:
    """Refuse an engine cache or a benchmark output inside a folder the export's key hashes: what a
    run writes there changes the key, so every run exported again and the cache grew by an entry a
    run (an audit)."""
    resolved = path.absolute().resolve()
    for folder in folders:
        if resolved.is_relative_to(folder):
            raise SdexportError(f"{flag} {path}: inside {folder}, whose every file the key of the benchmark's export "
                                "hashes, so what a run writes there would make each run export again; give a folder "
                                "outside it")


def protected_paths(plan: BenchPlan, options: Options, output_dir: Path) -> tuple[Path, ...]:
    """What the run reads, which the output folder may therefore not replace."""
    engines = tuple(d for d in (options.engine_dir, options.refiner_engine_dir)
                    if d is not None and not own_engines(d, output_dir))
    cache = () if options.engine_cache is None else (options.engine_cache,)
    return (*plan.outline.sources, *(plan.refiner.sources if plan.refiner else ()), *engines, *cache)


def init_image(scenario: Scenario) -> Any:
    """img2img's and inpainting's input: seeded random pixels over a colour gradient, the same for every contender
    (no image files ship with the benchmarks; speed does not depend on the picture)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(scenario.seed)
    y, x = np.mgrid[0:scenario.height, 0:scenario.width]
    gradient = np.stack([x / scenario.width, y / scenario.height, 0.5 + 0 * x], axis=-1)
    pixels = np.clip(gradient * 0.7 + rng.random((scenario.height, scenario.width, 3)) * 0.3, 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def mask_image(scenario: Scenario) -> Any:
    """Inpainting's mask: white (repaint) over the middle half of the height and width, black around."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (scenario.width, scenario.height))
    ImageDraw.Draw(mask).rectangle((scenario.width // 4, scenario.height // 4, 3 * scenario.width // 4 - 1,
                                    3 * scenario.height // 4 - 1), fill=255)
    return mask


def control_image(scenario: Scenario, index: int) -> Any:
    """A ControlNet's (or a T2I-Adapter's) input: a seeded synthetic edge map (white strokes on
    black, as a Canny map looks), one per ControlNet (or adapter), the same for every contender."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(scenario.seed + 1000 + index)
    image = Image.new("RGB", (scenario.width, scenario.height))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        points = rng.random((4, 2)) * (scenario.width, scenario.height)
        draw.line([tuple(p) for p in points], fill=(255, 255, 255), width=2)
    return image


def request_for(scenario: Scenario, case: Case) -> GenerationRequest:
    return GenerationRequest(
        prompt=[scenario.prompt] * case.batch,
        negative_prompt=[scenario.negative_prompt] * case.batch,
        steps=case.steps,
        guidance=scenario.guidance,
        scheduler=scenario.scheduler,
        seeds=[scenario.seed + i for i in range(case.batch)],
        height=scenario.height,
        width=scenario.width,
        image=[init_image(scenario)] if scenario.image_inputs else None,
        mask=[mask_image(scenario)] if scenario.inpaint else None,
        strength=scenario.strength,
        control_image=[control_image(scenario, i) for i in range(len(scenario.controlnets))] or None,
        control_mode=list(scenario.control_mode) or None,
        control_scale=scenario.control_scale if scenario.controlnets else None,
        guess_mode=scenario.guess_mode,
        adapter_image=[tuple(control_image(scenario, i) for i in range(len(scenario.adapters)))]
        if scenario.adapter else None,
        adapter_scale=scenario.adapter_scale if scenario.adapter else 1.0,
    )


def bench_export_profile(scenario: Scenario) -> ShapeProfile:
    """The profile the bench exports with: the scenario's batches and size, or its ``[export]`` ranges;
    one prompt chunk, the window diffusers' pipelines (the baseline) read: a longer prompt is cut
    alike on both sides, and the images stay comparable."""
    batches, ranges = scenario.batch, scenario.export
    return ShapeProfile(
        parse_range(str(ranges["batch"]), "batch", "export.batch") if "batch" in ranges
        else (min(batches), max(batches), max(batches)),
        parse_range(str(ranges.get("height", scenario.height)), "height", "export.height"),
        parse_range(str(ranges.get("width", scenario.width)), "width", "export.width"),
    )

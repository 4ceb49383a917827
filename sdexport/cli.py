"""The ``sdexport`` command line: export → build → run → bench, each a thin layer over the library.

Heavy imports happen inside each command, so ``sdexport --help`` is instant and a command that does
not need torch or TensorRT never imports them.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape

from sdexport.console import (
    NORMAL,
    VERBOSE,
    VERBOSITY,
    console,
    error_console,
    out,
    own_process,
    print_result,
    set_verbosity,
    spinner_drawn,
    step,
    verbosity,
)
from sdexport.errors import EngineRunError, ProfileError, SdexportError, pasteable
from sdexport.models.presets import PRESETS
from sdexport.runtime.schedulers import scheduler_names

if TYPE_CHECKING:
    from sdexport.runtime.ensemble import Ensemble
    from sdexport.runtime.request import GenerationRequest
    from sdexport.shapes import ShapeProfile

_Default = TypeVar("_Default", bound=float | None)


def _path(value: str | Path) -> Path:
    """A path argument or option as given: an empty one is refused, not read as the current
    directory (``Path("")`` is ``Path(".")``: ``sdexport inspect ""`` would inspect ``.``)."""
    if not str(value).strip():
        raise typer.BadParameter("an empty path; name one")
    return Path(value)


def _engine_path(value: str | Path) -> Path:
    """An engine directory argument (``_path``), refused where the ONNX tools cannot open its files
    (``require_text_path``), before anything loads."""
    from sdexport.errors import SdexportError
    from sdexport.output_dir import require_text_path

    path = _path(value)
    try:
        require_text_path(path, str(path))
    except SdexportError as exc:
        raise typer.BadParameter(str(exc)) from None
    return path


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Stable Diffusion checkpoints → verified ONNX → TensorRT engines → a slim runtime, and benchmarks.",
    pretty_exceptions_enable=False,
    # click's plain help: rich's tables cut option names to fit 80 columns, the width of a pipe too
    # (the negative prompt's option cut to 15 characters, an audit); this wraps the text and names
    # every option whole
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Say nothing on stderr but errors (results still go to stdout).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also show the libraries' own warnings, logs and progress bars (ONNX Runtime, diffusers, transformers, Triton).")]
VerbosityOpt = Annotated[str | None, typer.Option("--verbosity", help="quiet, normal (the default) or verbose; the same as -q / -v.")]


_verbosity_given: list[tuple[str, str]] = []
"""This call's verbosity flags and levels, wherever they stood (``sdexport -q inspect DIR -v`` conflicts)."""


def _apply_verbosity(quiet: bool, verbose: bool, level: str | None) -> None:
    """``-q``, ``-v`` and ``--verbosity``, given before or after the command's name; flags that ask
    for different levels are refused."""
    if level is not None and level not in VERBOSITY:
        raise SdexportError(f"--verbosity {level!r}: choose {', '.join(VERBOSITY)}")
    for flag, wanted in (("-q", "quiet" if quiet else None), ("-v", "verbose" if verbose else None),
                         ("--verbosity", level)):
        if wanted:
            _verbosity_given.append((flag, wanted))
    if len({wanted for _, wanted in _verbosity_given}) > 1:
        flags = dict.fromkeys(flag for flag, _ in _verbosity_given)
        raise SdexportError(f"{' and '.join(flags)}: give one of -q, -v, --verbosity")
    if _verbosity_given:
        set_verbosity(VERBOSITY[_verbosity_given[-1][1]])


def _version(value: bool) -> None:
    if value:
        from sdexport import __version__

        out.print(f"sdexport {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    level: VerbosityOpt = None,
) -> None:
    """Stable Diffusion checkpoints → verified ONNX → TensorRT engines → a slim runtime, and benchmarks."""
    _apply_verbosity(quiet, verbose, level)

_RANGE = "as min:opt:max or one number; default: {}."
_EXPORT_BATCH = "the model's profile (1:1:4; tiny presets 1:1:2)"
_EXPORT_SIDES = ("the model's profile (SD 1.x 256:512:1024; sd21 768 opt; SDXL 512:1024:1536; tiny presets 64:128:256; "
                 "a checkpoint: opt at its U-Net's sample_size)")
_BUILD_DEFAULT = "the exported profile; must lie inside it"
BatchOpt = Annotated[str | None, typer.Option("--batch", help="Images per call " + _RANGE.format(_EXPORT_BATCH))]
HeightOpt = Annotated[str | None, typer.Option("--height", help="Image height in pixels " + _RANGE.format(_EXPORT_SIDES))]
WidthOpt = Annotated[str | None, typer.Option("--width", help="Image width in pixels " + _RANGE.format(_EXPORT_SIDES))]
PromptChunksOpt = Annotated[str | None, typer.Option("--prompt-chunks", help="Prompt chunks of 75 tokens the U-Net reads at once, as A1111 reads long prompts (longer ones are cut, with a warning) " + _RANGE.format("1:1:3 (tiny presets 1:1:2)"))]
BuildPromptChunksOpt = Annotated[str | None, typer.Option("--prompt-chunks", help="Prompt chunks of 75 tokens " + _RANGE.format(_BUILD_DEFAULT))]
BuildBatchOpt = Annotated[str | None, typer.Option("--batch", help="Images per call " + _RANGE.format(_BUILD_DEFAULT))]
BuildHeightOpt = Annotated[str | None, typer.Option("--height", help="Image height " + _RANGE.format(_BUILD_DEFAULT))]
BuildWidthOpt = Annotated[str | None, typer.Option("--width", help="Image width " + _RANGE.format(_BUILD_DEFAULT))]
_SERVE_DEFAULT = "the engine directory's profile; must lie inside it. TensorRT loads the newest plan that covers these shapes; requests outside are refused"
ServeBatchOpt = Annotated[str | None, typer.Option("--batch", help="Images per generation call, as 1:opt:max or 1 (a request of more images is made in several calls); default: the engine directory's profile; must lie inside it. TensorRT loads the newest plan that covers these shapes.")]
ServeHeightOpt = Annotated[str | None, typer.Option("--height", help="Image heights served (opt: a request's that sends neither a size nor an image) " + _RANGE.format(_SERVE_DEFAULT))]
ServeWidthOpt = Annotated[str | None, typer.Option("--width", help="Image widths served (opt: a request's that sends neither a size nor an image) " + _RANGE.format(_SERVE_DEFAULT))]


@app.command()
def export(
    model: Annotated[str, typer.Argument(help=f"Preset ({', '.join(PRESETS)}), diffusers directory, or .safetensors/.ckpt file.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Engine directory to create.")],
    config: Annotated[str | None, typer.Option(help="For a single-file checkpoint: a diffusers directory or preset giving its architecture.")] = None,
    batch: BatchOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    prompt_chunks: PromptChunksOpt = None,
    dtype: Annotated[str, typer.Option(help="fp32 or fp16 (fp16 weights and compute, float32 inputs/outputs).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    components: Annotated[str | None, typer.Option(help="Comma-separated subset, e.g. unet,vae_decoder.")] = None,
    verify: Annotated[str, typer.Option(help="full (min, opt, max, odd), quick (min only) or none.")] = "full",
    seed: Annotated[int, typer.Option(help="Seed of a preset's random weights.")] = 0,
    vae: Annotated[str | None, typer.Option(help="Replace the model's VAE: an AutoencoderKL directory (e.g. an fp16-safe VAE), a pipeline directory with vae/, or a VAE file in the original layout (.safetensors/.ckpt, e.g. vae-ft-mse-840000-ema-pruned), read with the model's own VAE config.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    lora: Annotated[list[str] | None, typer.Option("--lora", help="FILE[:SCALE]: fuse a LoRA (.safetensors; diffusers/PEFT or kohya/A1111 layout) into the weights first; repeatable, applied in order.")] = None,
    controlnet: Annotated[list[str] | None, typer.Option("--controlnet", help="A diffusers ControlNetModel or ControlNetUnionModel directory (or preset: tiny-controlnet, sd15-controlnet, tiny-union, sdxl-union) exported beside the model; repeatable for several (run then takes one --control-image each, in this order, and --control-mode for union ones).")] = None,
    union_images: Annotated[int, typer.Option(help="Union ControlNet: control images it takes per call, each with its --control-mode (1 to 8; one each for several union ControlNets).")] = 1,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="A diffusers T2IAdapter directory (or preset: tiny-adapter, sd15-adapter, sdxl-adapter) exported beside the model (run then takes --adapter-image); repeatable for several (diffusers' MultiAdapter: one --adapter-image each, in this order).")] = None,
    textual_inversion: Annotated[list[str] | None, typer.Option("--textual-inversion", help="FILE[:WORD]: add a textual inversion embedding (.safetensors: one tensor for SD 1.x/2.x, clip_l and clip_g for SDXL) as a new word, the file's name unless WORD is given (as A1111 names them; e.g. EasyNegative), then write it in prompts; repeatable.")] = None,
    clip_skip: Annotated[int, typer.Option(help="Read the prompt this many text encoder layers before the last, as checkpoints trained that way need (diffusers' clip_skip; A1111's \"Clip skip\" is one more: its 2 is 1 here). SD: built into the text encoder graph. SDXL: the default of run and serve, which a request may change.")] = 0,
) -> None:
    """Export a checkpoint's text encoder(s), U-Net and VAE to ONNX and prove each against PyTorch."""
    from sdexport.export.plan import ExportOptions, plan_export
    from sdexport.models.lora import LoraFile
    from sdexport.models.textual_inversion import Embedding

    options = ExportOptions(
        ranges={"batch": batch, "height": height, "width": width, "chunks": prompt_chunks},
        dtype=dtype,
        opset=opset,
        components=_names(components, "--components"),
        verify=verify,  # type: ignore[arg-type]
        config=config,
        seed=seed,
        vae=vae,
        force=force,
        loras=[LoraFile.parse(item) for item in lora or []],
        controlnets=list(controlnet or []),
        adapters=list(adapter or []),
        union_images=union_images,
        clip_skip=clip_skip,
        embeddings=[Embedding.parse(item) for item in textual_inversion or []],
    )
    target = _output_path(output)
    plan_export(model, target, options)  # refuses bad input in well under a second, before torch loads
    from sdexport.export.exporter import export as run_export
    from sdexport.inspect_dir import print_summary

    manifest = run_export(model, target, options)
    print_summary(target, manifest)


@app.command()
def inspect(
    engine_dir: Annotated[Path, typer.Argument(parser=_engine_path, help="An engine directory written by `sdexport export`.")],
    check: Annotated[bool, typer.Option(help="Check every file against its sha256 (trusting the record of an earlier hash while a file is unchanged), every graph's inputs and outputs, and what `run` loads (tokenizers, scheduler).")] = True,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every file again and load the tokenizers and scheduler again, whatever earlier checks recorded.")] = False,
) -> None:
    """Show what an engine directory holds: model, profile, tools, parity results and engines.

    Exits non-zero, with the reason, for everything `sdexport run` would refuse, and also when a
    graph is not what the manifest says (inspect parses every graph's inputs and outputs; run leaves
    those to the engines).
    Files are hashed once and then trusted while their size, times and inode stay the same
    (README, "Engine directory checks"); --verify hashes everything again.
    """
    from sdexport.inspect_dir import print_summary
    from sdexport.manifest import load_manifest, verify_files_of

    if verify and not check:
        raise SdexportError("--verify and --no-check: --verify is the thorough check; drop one")
    manifest = load_manifest(engine_dir, verify_files=False)
    if check:  # (the checks' hash records go in the cache: a refused one is said before the summary, as run says it)
        from sdexport.user_cache import user_cache

        user_cache()
    print_summary(engine_dir, manifest)
    from sdexport.manifest import not_an_engine_dir

    foreign = not_an_engine_dir(engine_dir)  # (run ignores files it does not list; --force needs the proof)
    if foreign:
        console.print(f"note: `export --force` will not replace this directory: {escape(foreign)}", soft_wrap=True)
    if not check:
        return
    from sdexport.manifest import check_graph
    from sdexport.runtime.loading import check_runnable_once

    files = verify_files_of(engine_dir, manifest, rehash=verify)
    for name in manifest.components:
        check_graph(engine_dir, manifest, name)
    try:
        loaded = check_runnable_once(engine_dir, manifest, again=verify)
    except SdexportError as exc:
        raise SdexportError(f"`sdexport run` would refuse this directory: {exc}") from None
    trusted = f" ({files.trusted} unchanged since an earlier hash; --verify hashes all)" if files.trusted else ""
    console.print(f"[green]✓[/] {files.hashed + files.trusted} files match the manifest's sha256{trusted}; "
                  f"graphs match their specs; tokenizers and scheduler "
                  + ("load" if loaded else "loaded before with these files and libraries"), soft_wrap=True)


@app.command()
def adopt(
    directory: Annotated[Path, typer.Argument(parser=_engine_path, help="An ONNX export of a diffusers pipeline in optimum's layout (model_index.json, COMPONENT/model.onnx + config.json).")],
    model: Annotated[str | None, typer.Option(help="The checkpoint (or preset) it was exported from: each graph is then compared with PyTorch, and --backend torch can run it.")] = None,
    config: Annotated[str | None, typer.Option(help="With a single-file --model (.safetensors/.ckpt): a diffusers directory of the same architecture, or a preset, as `sdexport export --config`.")] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="Images per call " + _RANGE.format("the family's (SD 1:1:4, SDXL 1:1:4)"))] = None,
    height: Annotated[str | None, typer.Option("--height", help="Image height " + _RANGE.format("as export gives the checkpoint: opt at the U-Net's sample_size, within the family's sides (SD 256:1024, SDXL 512:1536), half to twice it below them, else the family's"))] = None,
    width: Annotated[str | None, typer.Option("--width", help="Image width " + _RANGE.format("as --height"))] = None,
    prompt_chunks: Annotated[str | None, typer.Option("--prompt-chunks", help="Prompt chunks of 75 tokens the U-Net reads at once, as A1111 reads long prompts, where its graph takes any text length (optimum's do) " + _RANGE.format("1:1:1: another exporter's U-Net may fix 77 tokens"))] = None,
    force: Annotated[bool, typer.Option(help="Adopt again, replacing a manifest that `sdexport adopt` wrote (engines built since are forgotten and their files removed: build again).")] = False,
    clip_skip: Annotated[int, typer.Option(help="The text encoder layer the export reads, as `export --clip-skip` gives it (SD: the layer its graph was exported to read, which --model then checks; SDXL: the default of run and serve).")] = 0,
) -> None:
    """Check another tool's ONNX export (optimum's) against sdexport's specs and write its manifest,
    so that `sdexport run`, `build` and `bench` use it. Adds manifest.json and nothing else."""
    from sdexport.export.adopt import adopt as run_adopt
    from sdexport.inspect_dir import print_summary

    if config is not None and model is None:
        raise SdexportError("--config goes with --model (a single-file checkpoint): the model to compare the graphs with")
    manifest = run_adopt(directory, ranges={"batch": batch, "height": height, "width": width, "chunks": prompt_chunks},
                         model=model, config=config, force=force, clip_skip=clip_skip)
    print_summary(directory, manifest)


@app.command()
def build(
    engine_dir: Annotated[Path, typer.Argument(parser=_engine_path, help="Engine directory from `sdexport export`.")],
    target: Annotated[str, typer.Option(help="tensorrt: TensorRT plans. onnxruntime-cuda: graphs with ONNX Runtime's own Stable Diffusion fusions (contrib ops for its CUDA provider), written beside the portable graphs; runs on the CPU too.")] = "tensorrt",
    fp16: Annotated[bool, typer.Option("--fp16/--fp32", help="fp16 engines. An fp16 export is built as its graph says (strongly typed); an fp32 export gets TensorRT 10's fp16 flag (TensorRT 11 has none: export with --dtype fp16). The fp32 VAE decoder and encoder stay fp32, and so do an fp32 SDXL export's VAE decoder and encoder where its config sets force_upcast.")] = True,
    static: Annotated[bool, typer.Option(help="One static shape (the profile's opt): fastest engines, CUDA graphs.")] = False,
    strongly_typed: Annotated[bool, typer.Option(help="Build fp32 exports strongly typed too (TensorRT 10; fp16 exports and TensorRT 11 always are).")] = False,
    batch: BuildBatchOpt = None,
    height: BuildHeightOpt = None,
    width: BuildWidthOpt = None,
    prompt_chunks: BuildPromptChunksOpt = None,
    timing_cache: Annotated[Path | None, typer.Option(parser=_path, help="Timing cache file, read and then replaced with the updated cache where sdexport wrote it (another is read only), outside the engine directory (default: one per GPU and TensorRT version under ~/.cache/sdexport).")] = None,
    optimization_level: Annotated[int | None, typer.Option(help="Builder optimization level 0-5 (TensorRT's default: 3).")] = None,
    refittable: Annotated[bool, typer.Option(help="Refittable engines (swap weights without a rebuild).")] = False,
    components: Annotated[str | None, typer.Option(help="Comma-separated subset, e.g. unet.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when a matching engine is cached.")] = False,
) -> None:
    """Build engines for an engine directory: TensorRT plans, or ONNX Runtime CUDA graphs
    (reusing what was built before from the same graphs with the same settings)."""
    from rich.table import Table

    from sdexport.build.tensorrt_build import build_engines, default_timing_cache, require_tensorrt
    from sdexport.build.timing_cache import check_timing_cache
    from sdexport.manifest import load_manifest, select_specs

    if target not in BUILD_TARGETS:
        raise SdexportError(f"--target {target!r}: choose {' or '.join(BUILD_TARGETS)}")
    # what the user typed before what the machine lacks: a missing directory, then the one line
    # that says what to install (the manifest's hashes are checked by the build itself)
    manifest = load_manifest(engine_dir, verify_files=False)
    exported = manifest.shape_profile
    if target == "onnxruntime-cuda":
        trt_only = {"--static": static, "--strongly-typed": strongly_typed, "--batch": batch, "--height": height,
                    "--width": width, "--prompt-chunks": prompt_chunks, "--timing-cache": timing_cache, "--optimization-level": optimization_level,
                    "--refittable": refittable}
        given = [flag for flag, value in trt_only.items() if value is not None and value is not False]  # (0 == False)
        if given:
            raise SdexportError(f"{', '.join(given)}: TensorRT build settings; --target onnxruntime-cuda "
                                "graphs keep the export's dynamic shapes (CUDA graphs fix them at load: run --cuda-graph)")
        _build_onnxruntime(engine_dir, components=_names(components, "--components"), fp16=fp16, force=force)
        return
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise SdexportError(f"--optimization-level {optimization_level}: TensorRT's levels are 0 to 5 (default 3)")
    if timing_cache is not None:
        check_timing_cache(timing_cache, engine_dir)
    profile = None
    if any(given is not None for given in (batch, height, width, prompt_chunks)):
        profile = exported.with_ranges(batch=batch, height=height, width=width, chunks=prompt_chunks)
    names = _names(components, "--components")
    select_specs(manifest, names)  # (a name the directory lacks: said before what the machine lacks)
    require_tensorrt()
    results = build_engines(
        engine_dir, components=names, profile=profile,
        static=static, fp16=fp16, strongly_typed=strongly_typed,
        timing_cache=timing_cache or default_timing_cache(), optimization_level=optimization_level,
        refittable=refittable, force=force,
    )
    table = Table(title=f"TensorRT engines in {engine_dir}", title_justify="left")
    for column in ("component", "status", "seconds", "plan", "why built"):
        table.add_column(column)
    for r in results:
        table.add_row(r.component, r.status, f"{r.seconds:.1f}", str(r.path.relative_to(engine_dir)),
                      "; ".join(r.reasons) or "-")
    out.print(table)


BUILD_TARGETS = ("tensorrt", "onnxruntime-cuda")
MAX_IMAGES_PER_RUN = 10_000
"""More is refused up front (a mistyped --batch), before a list of that many prompts is made."""


def _build_onnxruntime(engine_dir: Path, *, components: list[str] | None, fp16: bool, force: bool) -> None:
    from rich.table import Table

    from sdexport.build.onnxruntime_build import build_onnxruntime
    from sdexport.runtime.providers import require_onnxruntime

    require_onnxruntime()
    results = build_onnxruntime(engine_dir, components=components, fp16=fp16, force=force)
    table = Table(title=f"ONNX Runtime CUDA graphs in {engine_dir}", title_justify="left")
    for column in ("component", "status", "seconds", "fused operators", "parity", "why built"):
        table.add_column(column)
    for r in results:
        fused = ", ".join(f"{op} {n}" for op, n in sorted(r.fusions.items())) or "none"
        table.add_row(r.component, r.status, f"{r.seconds:.1f}", fused, r.parity or "-", "; ".join(r.reasons) or "-")
    out.print(table)


def _output_path(text: str) -> Path:
    """``-o`` as given: an empty value is refused, not read as the current directory."""
    if not text.strip():
        raise SdexportError(f"-o {text!r}: empty path; name the output")
    return Path(text)


def _print_markdown(text: str) -> None:
    """Markdown on stdout as written: table rows stay whole lines, brackets stay text."""
    print_result(text.rstrip("\n"))


def _names(text: str | None, flag: str, example: str = "unet,vae_decoder") -> list[str] | None:
    """A comma-separated list option; given but empty (``--components ''``) is an error, not "all"."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise SdexportError(f"{flag} {text!r}: expected comma-separated names, e.g. {example}")
    return names


def _per_image(values: list[str] | None, count: int, flag: str) -> list[str] | None:
    """One value for all images, or one per image."""
    if not values:
        return None
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise SdexportError(f"{flag}: give one value, or one per image ({count})")
    return list(values)


def _pair(text: str | None, sep: str, flag: str) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split(sep)
    try:
        if len(parts) != 2 or not all(p.strip().isascii() for p in parts):
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        example = "1024x1024 (height x width, as diffusers' sizes)" if sep == "x" else "0,0 (top,left, as diffusers' crop)"
        raise SdexportError(f"{flag} {text!r}: expected two integers joined by {sep!r}, like {example}") from None


@app.command()
def run(
    engine_dir: Annotated[Path, typer.Argument(parser=_engine_path, help="Engine directory (from `sdexport export`, optionally `sdexport build`).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt; repeat for several images.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Image path: .png, .jpg/.jpeg or .webp (each with the parameters in its metadata); several images write NAME-0.EXT, NAME-1.EXT, ...")] = "out.png",
    negative_prompt: Annotated[list[str] | None, typer.Option("--negative-prompt", "-n", help="One for all prompts, or one per prompt.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps (diffusers' pipelines default to 50).")] = 30,
    scheduler: Annotated[str, typer.Option(help=f"{', '.join(scheduler_names())}.")] = "default",
    guidance: Annotated[list[float] | None, typer.Option(help="Classifier-free guidance scale, one for all images or one per image (all above 1, or all at or below it); 1 disables CFG (a latent consistency model takes it as an input, with no CFG at any value) (default as diffusers: 7.5; SDXL 5.0, SDXL inpainting without ControlNets 7.5).")] = None,
    guidance_rescale: Annotated[float, typer.Option(help="diffusers' guidance_rescale: scale each step's guided prediction towards the spread of the prompted one by this share, 0 (off) to 1, against the over-exposure of strong guidance (0.7 for models trained for zero terminal SNR). With guidance above 1 only.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed + i.")] = 0,
    batch: Annotated[int, typer.Option(help="Images per prompt when one prompt is given.")] = 1,
    height: Annotated[int | None, typer.Option(help="Image height (default: the init, control or adapter image's, else the profile's opt).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width (default: the init, control or adapter image's, else the profile's opt).")] = None,
    backend: Annotated[str, typer.Option(help="onnxruntime (CUDA if available, else CPU), onnxruntime-cpu, onnxruntime-cuda (the fused graphs of `build --target onnxruntime-cuda` where present), torch, torch-compile, torch-compile-max (diffusers' fast recipe: fused QKV, channels_last, max-autotune with CUDA graphs; compiles for minutes first), tensorrt.")] = "onnxruntime",
    cuda_graph: Annotated[bool, typer.Option(help="tensorrt (every engine), onnxruntime-cuda (the U-Net): capture in a CUDA graph and replay it (fixed shapes; least launch overhead).")] = False,
    portable_graphs: Annotated[bool, typer.Option(help="onnxruntime-cuda: run the portable graphs even where `sdexport build --target onnxruntime-cuda` wrote fused ones.")] = False,
    ort_option: Annotated[list[str] | None, typer.Option("--ort-option", help="onnxruntime-cuda: a CUDA provider option KEY=VALUE passed through as given, e.g. sdpa_kernel=... (ONNX Runtime's attention-kernel mask; its values differ between releases). Repeatable.")] = None,
    prompt_2: Annotated[list[str] | None, typer.Option("--prompt-2", help="SDXL: prompt for the second text encoder (default: --prompt).")] = None,
    negative_prompt_2: Annotated[list[str] | None, typer.Option("--negative-prompt-2", help="SDXL: negative prompt for the second text encoder.")] = None,
    original_size: Annotated[str | None, typer.Option(help="SDXL micro-conditioning, HxW (default: the image size).")] = None,
    crop_top_left: Annotated[str | None, typer.Option(help="SDXL micro-conditioning, Y,X (default: 0,0).")] = None,
    target_size: Annotated[str | None, typer.Option(help="SDXL micro-conditioning, HxW (default: the image size).")] = None,
    aesthetic_score: Annotated[float | None, typer.Option(help="SDXL refiner: the aesthetic rating (0-10, LAION's) the image is refined towards (default as diffusers: 6.0).")] = None,
    negative_aesthetic_score: Annotated[float | None, typer.Option(help="SDXL refiner: the rating guidance steers away from (default as diffusers: 2.5).")] = None,
    clip_skip: Annotated[int | None, typer.Option(help="Read the prompts this many text encoder layers before the last (diffusers' clip_skip; A1111's \"Clip skip\" is one more), the negatives too. Default: the export's (export --clip-skip), which an SD export takes alone; SDXL takes any below its text encoders' layer count.")] = None,
    emphasis: Annotated[str, typer.Option(help="How brackets in the prompts are read: none (as text, as diffusers reads them), original (A1111's weights: (word:1.2), (word) x1.1, [word] /1.1, then its rescaling to the mean), no-norm (A1111's \"No norm\": without the rescaling). The negatives too.")] = "none",
    init_image: Annotated[list[Path] | None, typer.Option(parser=_path, help="img2img / inpainting: start from this image (its size is the default --height/--width); one per run, every image of the batch starts from it.")] = None,
    mask: Annotated[list[Path] | None, typer.Option(parser=_path, help="Inpainting: white repaints, black keeps; needs --init-image; one per run.")] = None,
    strength: Annotated[float | None, typer.Option(help="With --init-image: how far it is noised, 0-1 (default as diffusers: img2img 0.8, SDXL img2img 0.3, inpainting 1.0, SDXL inpainting 0.9999); runs int(steps x strength) steps.")] = None,
    fit: Annotated[str, typer.Option(help="An --init-image/--mask of another size than --height/--width: exact (refuse), resize (stretch), crop (scale to cover, centre crop).")] = "exact",
    lora: Annotated[list[str] | None, typer.Option("--lora", help="FILE[:SCALE]: add a LoRA to the exported weights for this run, no re-export (onnxruntime's portable graphs, torch, and tensorrt plans built with --refittable, refitted); repeatable.")] = None,
    control_image: Annotated[list[str] | None, typer.Option("--control-image", help="ControlNet: the conditioning image (an edge, depth or pose map) of each ControlNet, in export order, for every image, or that many per image, image by image; resized to --height/--width (default: its own size). 'masked-init': the init image with the mask's region at -1, for an inpainting ControlNet.")] = None,
    control_mode: Annotated[list[int] | None, typer.Option("--control-mode", help="Union ControlNet: the control mode of each --control-image, in the same order (the model's table, e.g. xinsir's 0 openpose, 1 depth, 2 scribble/HED, 3 canny/lineart, 4 normal, 5 segmentation, 6 tile, 7 repaint).")] = None,
    control_scale: Annotated[list[float] | None, typer.Option("--control-scale", help="ControlNet: conditioning scale, one for all or one per ControlNet, or that many per image, image by image (default as diffusers: txt2img 1.0, img2img 0.8, inpainting 0.5 for SD and 1.0 for SDXL).")] = None,
    control_start: Annotated[list[float] | None, typer.Option("--control-start", help="ControlNet: fraction of the steps after which it starts acting, as --control-scale is given (default 0); with --refiner, of the whole schedule, as diffusers weighs it.")] = None,
    control_end: Annotated[list[float] | None, typer.Option("--control-end", help="ControlNet: fraction of the steps after which it stops, as --control-scale is given (default 1); with --refiner, of the whole schedule, as diffusers weighs it.")] = None,
    guess_mode: Annotated[bool, typer.Option("--guess-mode", help="ControlNet: diffusers' guess mode, the ControlNets see the prompted half of the guidance batch only (the image shapes the picture with little or no prompt); on anyway where diffusers turns it on (the first ControlNet pools, as shuffle ones do).")] = False,
    adapter_image: Annotated[list[str] | None, typer.Option("--adapter-image", help="T2I-Adapter: the conditioning image (a sketch, edge, depth or pose map), one for all prompts or one per prompt; resized to --height/--width (default: its own size) and read in the adapter's channels. Several adapters: one each, in export order (or that many per prompt, prompt by prompt).")] = None,
    adapter_scale: Annotated[list[float] | None, typer.Option("--adapter-scale", help="T2I-Adapter: conditioning scale, the features' factor; one for all or one per adapter, or that many per image, image by image (default 1).")] = None,
    adapter_factor: Annotated[list[float] | None, typer.Option(help="T2I-Adapter: the share of the steps, the first ones, it acts on (0-1; diffusers' SDXL adapter_conditioning_factor), one for all images or one per image (default 1); with --refiner, of the base model's own steps, as diffusers counts them.")] = None,
    refiner: Annotated[Path | None, typer.Option(parser=_engine_path, help="SDXL's ensemble of experts (diffusers' base + refiner): an sdxl-refiner engine directory that takes the base model's latents at --denoising-end, not decoded, and runs the rest of the schedule with the same prompts, seeds, steps and scheduler; the images are the refiner's. --aesthetic-score goes to it; --lora, --init-image, --strength and the control and adapter images stay with the base model; --mask goes to both.")] = None,
    denoising_end: Annotated[float | None, typer.Option(help="With --refiner: the fraction of the schedule the base model runs, above 0 and below 1 (default 0.8, diffusers' example); the refiner runs the rest.")] = None,
) -> None:
    """Generate images from prompts (and an init image, and a mask) with the engines in an engine directory."""
    from sdexport.manifest import load_manifest, read_scheduler_config
    from sdexport.runtime.images import check_image_output
    from sdexport.runtime.loading import resolve_backend, verify_for_backend, zeroes_negatives
    from sdexport.runtime.providers import require_backend
    from sdexport.runtime.request import (
        MASKED_INIT,
        MAX_SEED,
        NOISE_SEEDS,
        GenerationRequest,
        check_backend,
        check_per_image,
        check_prompt_text,
        check_request,
        default_notes,
        ignored_settings,
        no_adapter,
        no_controlnet,
        pooling_note,
        sizing_image,
    )

    if batch < 1:
        raise SdexportError(f"--batch {batch}: need at least 1 image per prompt")
    if len(prompt) > 1 and batch != 1:
        raise SdexportError("--batch repeats a single --prompt; with several prompts, each makes one image")
    check_backend(backend)
    init_path, mask_path = _once(init_image, "--init-image"), _once(mask, "--mask")
    from sdexport.models.lora import LoraFile

    loras = [LoraFile.parse(item) for item in lora or []]
    provider_options = _key_values(ort_option, "--ort-option")
    from sdexport.runtime.providers import check_provider_options

    check_provider_options(provider_options)
    # Everything below up to the engines reads small files only: a bad request is refused at once.
    manifest = load_manifest(engine_dir, verify_files=False)
    profile = manifest.shape_profile
    # a flag given is a flag meant: one naming its default (--adapter-scale 1) is refused where nothing
    # reads it too, as the request alone cannot tell it from no flag; images refused before they are read
    if not manifest.controlnets and (control_image or control_mode or control_scale or control_start or control_end):
        raise no_controlnet()
    if not manifest.adapters and (adapter_image or adapter_scale or adapter_factor):
        raise no_adapter()
    if len(prompt) * batch > MAX_IMAGES_PER_RUN:  # before making a list of that many prompts
        raise SdexportError(f"{len(prompt) * batch} images in one run: at most {MAX_IMAGES_PER_RUN}; run several times")
    prompts = list(prompt) * batch if len(prompt) == 1 else list(prompt)
    if 0 <= seed <= MAX_SEED < seed + len(prompts) - 1:  # image i uses seed + i
        raise SdexportError(f"--seed {seed}: image {MAX_SEED - seed + 2} of {len(prompts)} would need seed "
                            f"{MAX_SEED + 1}, past the largest (2^64-1); pass --seed {MAX_SEED - len(prompts) + 1} "
                            "or less")
    last = seed + len(prompts) - 1
    if NOISE_SEEDS <= last <= MAX_SEED:  # (a note, not a refusal: the same image as diffusers' for that seed)
        console.print(f"[yellow]note:[/] --seed {seed}: seeds from 2^32 on draw the noise of their low 32 bits "
                      f"(PyTorch's CPU generator reads those alone, as in diffusers): seed {last} draws seed "
                      f"{last % NOISE_SEEDS}'s")
    negatives = _per_image(negative_prompt, len(prompts), "--negative-prompt")
    if guidance and len(guidance) not in (1, len(prompts)):
        raise SdexportError(f"{len(guidance)} --guidance for {len(prompts)} image{'s' if len(prompts) > 1 else ''}: "
                            "give one, or one per image")
    if height is None and width is None:  # an image gives the size: one far too large is refused undecoded
        _refuse_oversized(init_path, control_image, adapter_image, profile, fit)
    images, inputs = _image_inputs(init_path, mask_path, height, width, fit)
    controls = _condition_images(control_image, height, width, "--control-image", masked_init=True)
    adapters = _condition_images(adapter_image, height, width, "--adapter-image")
    adapter_entries = _per_prompt_adapter_images(adapters, len(manifest.adapters), len(prompts))
    union_images = manifest.model_dims.K or 1
    slots = len(manifest.controlnets) * union_images  # control images per image
    per_control = "one per ControlNet" if union_images == 1 else "one per control image"
    control_entries = _per_prompt_control_images(controls, slots, len(prompts), union_images)
    # the image whose size a run without --height/--width takes: the init image, else the first control
    # (or adapter) image, and its input
    sized = sizing_image(images, controls, adapters) if height is None else None
    if sized is not None:
        width, height = sized[0].size
    request = GenerationRequest(
        prompt=prompts, negative_prompt=negatives, steps=steps, guidance=_one_or_each(guidance, None),
        guidance_rescale=guidance_rescale, scheduler=scheduler,
        seeds=[seed + i for i in range(len(prompts))],
        height=profile.height[1] if height is None else height,
        width=profile.width[1] if width is None else width,
        prompt_2=_per_image(prompt_2, len(prompts), "--prompt-2"),
        negative_prompt_2=_per_image(negative_prompt_2, len(prompts), "--negative-prompt-2"),
        original_size=_pair(original_size, "x", "--original-size"),
        crops_coords_top_left=_pair(crop_top_left, ",", "--crop-top-left") or (0, 0),
        target_size=_pair(target_size, "x", "--target-size"),
        aesthetic_score=aesthetic_score,
        negative_aesthetic_score=negative_aesthetic_score,
        clip_skip=clip_skip,
        emphasis=emphasis,
        strength=strength,
        control_image=control_entries,
        control_mode=list(control_mode) if control_mode else None,
        control_scale=_place_setting(control_scale, None, slots, len(prompts), "--control-scale", per_control),
        control_start=_place_setting(control_start, 0.0, slots, len(prompts), "--control-start", per_control),
        control_end=_place_setting(control_end, 1.0, slots, len(prompts), "--control-end", per_control),
        guess_mode=guess_mode,
        adapter_image=adapter_entries,
        adapter_scale=_place_setting(adapter_scale, 1.0, len(manifest.adapters), len(prompts), "--adapter-scale",
                                     "one per adapter"),
        adapter_factor=_one_or_each(adapter_factor, 1.0),
    )
    notes: list[str] = []
    for flag, paths, read in (("--control-image", control_image, controls), ("--adapter-image", adapter_image, adapters)):
        for path, control in zip(paths or [], read):
            if isinstance(control, str) or control.size == (request.width, request.height):
                continue
            note = (f"{flag} {path} resized from {control.size[1]}x{control.size[0]} to {request.height}x"
                    f"{request.width} (as diffusers does)")
            aspect = control.size[0] * request.height != control.size[1] * request.width
            cropped = images and images[0].size[0] * request.height != images[0].size[1] * request.width
            if fit == "crop" and cropped and aspect:  # (a map made from the init image no longer lies on it)
                note = (f"{note[:-1]}: stretched, where --fit crop crops the init image and mask only; give it at "
                        f"{request.height}x{request.width} to keep the two aligned)")
            if note not in notes:  # a file given for several images: said once
                notes.append(note)
    per_image: dict[str, list[Any]] = {}  # what each saved image records of its own inputs
    for name, files, each in (("control_image", control_image, slots), ("adapter_image", adapter_image,
                                                                        max(len(manifest.adapters), 1))):
        # the record is read from anywhere: files by absolute path (``masked-init`` names no file)
        paths = [p if p == MASKED_INIT else str(Path(p).absolute()) for p in files or []]
        if paths and len(prompts) > 1 and len(paths) == each * len(prompts):  # given prompt by prompt
            per_image[name] = [paths[i:i + each] for i in range(0, len(paths), each)]
        elif paths:
            inputs[name] = paths
    multiple = manifest.model_dims.image_multiple
    if images:
        request.image = [_fit(images[0], request, fit, f"--init-image {init_path}", notes, multiple)]
    if len(images) > 1:
        request.mask = [_fit(images[1], request, fit, f"--mask {mask_path}", notes, multiple)]
    scheduler_config = read_scheduler_config(engine_dir, manifest)
    ensemble = _ensemble(engine_dir, manifest, refiner, denoising_end, request)
    if ensemble is not None:
        request = ensemble.base
    check_prompt_text(request.prompt, request.prompt_2)  # the whole list: numbers as the user counts
    zeroed = zeroes_negatives(manifest)
    embedded = bool(manifest.model_dims.G)  # a latent consistency model: its U-Net takes the guidance
    # the whole run's guidances and negatives reach a refiner too, which guides by a batch half; the
    # base model's parts (check_request below) are its own
    alone = embedded and ensemble is None
    check_per_image(request, family=manifest.family, controlnets=len(manifest.controlnets),  # the whole run
                    adapters=len(manifest.adapters), union_modes=manifest.model_dims.N, union_images=union_images,
                    guidance_embedding=alone)
    most = _served_batch(manifest, ensemble.refiner.manifest if ensemble else None)  # one call's, as served
    parts = request.split(most)  # more images than the engines take at once: several calls
    try:
        for part in (parts[0], parts[-1]):  # the batch sizes that occur (what differs per image: checked above)
            check_request(part, family=manifest.family, dims=manifest.model_dims, profile=profile,
                          scheduler_config=scheduler_config, controlnets=len(manifest.controlnets),
                          adapters=len(manifest.adapters), union_modes=manifest.model_dims.N,
                          union_images=manifest.model_dims.K or 1, guidance_embedding=embedded,
                          zeroed_negatives=zeroed)
        if ensemble is not None:
            ensemble.check(most)
    except ProfileError as exc:
        _refuse_split_batch(request.batch, parts, most, manifest, ensemble.refiner.manifest if ensemble else None)
        if sized is None or not all(profile.takes_batch(part.batch) for part in parts):
            raise  # (an image gives the sides, never the batch)
        from sdexport.runtime.image_inputs import sized_by

        raise ProfileError(f"{exc} ({sized_by(sized[1], fit)})") from None
    image_path = _output_path(output)
    from sdexport.runtime.images import output_paths, refuse_a_folder_name

    refuse_a_folder_name(output, f"-o {output}")
    check_image_output(image_path, request.batch)  # (and not inside an engine directory)

    for given in (init_path, mask_path, *(Path(p) for p, c in zip(control_image or [], controls) if not isinstance(c, str)),
                  *(Path(p) for p in adapter_image or [])):
        if given is not None and any(given.resolve() == p.resolve() for p in output_paths(image_path, request.batch)):
            raise SdexportError(f"-o {output}: that is the image this run reads ({given}); write to another name")
    resolved = resolve_backend(backend)
    _check_graph_flags(resolved, cuda_graph, portable_graphs)
    if provider_options and resolved != "onnxruntime-cuda":
        raise SdexportError(f"--ort-option: for --backend onnxruntime-cuda, not {resolved}")
    require_backend(resolved)
    # a line each, on a terminal or in a log: loading torch and diffusers takes seconds before any engine
    with step("Checking the engine files and the scheduler"):
        # hashes first (no torch or diffusers needed): the directory is what the manifest says
        verify_for_backend(engine_dir, manifest, resolved, "portable" if portable_graphs else "auto",
                           image_inputs=request.image is not None, lora=bool(loras))
        if ensemble is not None:
            verify_for_backend(ensemble.refiner.engine_dir, ensemble.refiner.manifest, resolved,
                               "portable" if portable_graphs else "auto")
        # (diffusers, loaded here: needed to run anyway)
        from sdexport.runtime.schedulers import check_steps, config_as_loaded

        check_steps(request.scheduler, config_as_loaded(
            scheduler_config, request.scheduler, family=manifest.family, conditioned=manifest.model_dims.conditioned,
            inpainting=request.mask is not None), request.steps, from_image=request.image is not None)
        if ensemble is not None:  # each model's share of the schedule holds a step
            ensemble.check_windows(scheduler_config)
    from sdexport.runtime.loading import pooled_controlnets

    said = pooling_note(list(pooled_controlnets(engine_dir, manifest)), manifest.controlnets, request, manifest.family)
    ignored = dict.fromkeys([*ignored_settings(request, alone, zeroed),
                             *(ignored_settings(ensemble.refine) if ensemble else [])])
    for note in [*ignored, *default_notes(request, manifest.family, zeroed), *notes, *([said] if said else [])]:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if notes and request.image is not None:  # how the init image (and mask) was fitted; control images are resized
        inputs["fit"] = fit
    if len(parts) > 1:
        same = ("as in one call" if request.task != "inpaint" or len(request.image or []) > 1 else
                "but inpainting samples the one init image with each call's first seed, so images after the "
                "first call differ from one call's")
        limit = "the refiner's profile's batch" if most < profile.batch[2] else "the profile's batch"
        console.print(f"[yellow]note:[/] {request.batch} images, {most} at most per call ({limit}): {len(parts)} calls, each image with its own seed ({seed} to "
                      f"{seed + request.batch - 1}) {same}", soft_wrap=True)
    _generate(engine_dir, resolved, parts, image_path, cuda_graph=cuda_graph,
              graphs="portable" if portable_graphs else "auto", provider_options=provider_options,
              inputs=inputs, per_image=per_image, loras=loras, ensemble=ensemble, whole=request,
              hashed=manifest.files)


def _numbered_after(output: Path, count: int) -> list[Path]:
    """``out-N.png`` files from ``N = count`` on (up to the first gap) beside a batch's ``out-0.png``..:
    an earlier, larger batch's, which a reader of the folder would take for this run's."""
    import itertools
    import os

    from sdexport.runtime.images import numbered_path

    if count == 1:
        return []
    paths = (numbered_path(output, i) for i in itertools.count(count))
    return list(itertools.takewhile(os.path.lexists, paths))


def _listed(paths: list[Path]) -> str:
    """A few paths, the first and last of many."""
    return ", ".join(map(str, paths)) if len(paths) <= 3 else f"{paths[0]} … {paths[-1]}"


def _written(paths: list[Path], count: int) -> str:
    """What a run stopped now leaves: the images written, the first and last of a long run."""
    names = _listed(paths)
    whole = f" ({len(paths)} of {count} images)" if count > 1 else ""
    return f"already written: {names}{whole}"


def _ensemble(engine_dir: Path, manifest: Any, refiner: Path | None, denoising_end: float | None,
              request: GenerationRequest) -> Ensemble | None:
    """``run --refiner``'s two requests, or None without it; what cannot be run refused in one line."""
    from sdexport.runtime.ensemble import Refiner

    end = _refiner_cut(refiner, denoising_end)
    if refiner is None:
        return None
    return Refiner.open(refiner, engine_dir, manifest).ensemble(request, end)


def _unbuilt(engine_dir: Path, manifest: Any, image_inputs: bool) -> str | None:
    """What a TensorRT repository's server would fail to load, said when the repository is written:
    the components it loads that have no TensorRT plan yet (it said nothing, an audit)."""
    from sdexport.runtime.loading import pipeline_components, upcast_parts

    names = [name for name in pipeline_components(manifest, image_inputs, upcast=upcast_parts(engine_dir, manifest))
             if not manifest.components[name].engines]
    if not names:
        return None
    return (f"{engine_dir} has no TensorRT plan for {', '.join(names)} yet: the server will fail to load the model "
            f"until `sdexport build {pasteable(engine_dir)}` has run on its GPU")


def _refiner_cut(refiner: Path | None, denoising_end: float | None, refiner_path: str | None = None) -> float:
    """``--denoising-end`` (and ``triton-repo --refiner-path``) only with ``--refiner``; the base
    model's share of the schedule, checked, or the default (``run``, ``serve``, ``triton-repo``)."""
    from sdexport.runtime.ensemble import DENOISING_END_DEFAULT, check_denoising_end

    if refiner is None and (denoising_end is not None or refiner_path is not None):
        raise SdexportError(f"{'--denoising-end' if denoising_end is not None else '--refiner-path'} needs --refiner: "
                            "the rest of the schedule is the refiner's")
    if denoising_end is None:
        return DENOISING_END_DEFAULT
    check_denoising_end(denoising_end)
    return denoising_end


def _check_graph_flags(backend: str, cuda_graph: bool, portable_graphs: bool) -> None:
    """``--cuda-graph`` and ``--portable-graphs`` only where ``backend`` has them (``run``, ``serve``)."""
    if cuda_graph and backend not in ("tensorrt", "onnxruntime-cuda"):
        raise SdexportError(f"--cuda-graph: for --backend tensorrt or onnxruntime-cuda, not {backend}")
    if portable_graphs and backend != "onnxruntime-cuda":
        raise SdexportError(f"--portable-graphs: for --backend onnxruntime-cuda, not {backend}")


def _once(given: list[Path] | None, flag: str) -> Path | None:
    """An option given at most once: a second --init-image would silently replace the first (each
    call starts every image from the one init image; --control-image is the one given per image)."""
    if given and len(given) > 1:
        raise SdexportError(f"{flag} given {len(given)} times: one per run (every image of the batch starts from it); "
                            "run once per image")
    return given[0] if given else None


def _image_inputs(init_image: Path | None, mask: Path | None, height: int | None, width: int | None,
                  fit: str) -> tuple[list[Any], dict[str, Any]]:
    """The init image and mask (read now: a bad file is refused before anything loads), and what the
    saved images record of them."""
    from sdexport.runtime.image_inputs import FITS, read_image, transparency_note

    if fit not in FITS:
        raise SdexportError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    if init_image is None:
        if mask is not None:
            raise SdexportError("--mask needs --init-image: inpainting repaints part of a given image")
        if fit != "exact":
            raise SdexportError("--fit needs --init-image: it says how that image is made the request's size")
        return [], {}
    if (height is None) != (width is None):
        raise SdexportError("with --init-image, give both --height and --width, or neither (the image's own size)")
    images = [read_image(init_image, "--init-image")]
    inputs: dict[str, Any] = {"init_image": str(Path(init_image).absolute())}  # the record is read from anywhere
    if mask is not None:
        images.append(read_image(mask, "--mask", mode=None))  # (resized, if at all, before it is made greyscale)
        inputs["mask"] = str(Path(mask).absolute())
        _note(transparency_note(images[1], f"--mask {mask}"))
        if fit == "exact" and images[1].size != images[0].size:  # else each "fix" names the other
            sizes = [f"{image.size[1]}x{image.size[0]}" for image in images]
            raise SdexportError(f"--mask {mask} is {sizes[1]} (HxW), --init-image {init_image} {sizes[0]}: give a mask "
                                "of the init image's size, or --fit resize / --fit crop to fit both to --height/--width")
    return images, inputs


def _refuse_oversized(init_image: Path | None, control_image: list[str] | None, adapter_image: list[str] | None,
                      profile: ShapeProfile, fit: str) -> None:
    """Refuse the image whose size a run without --height/--width takes (``sizing_image``'s: the init
    image, else the first control image, else the first adapter image) where its header declares a
    size larger than the profile's in both orientations (its EXIF orientation may turn it), before it
    is decoded: a 13000x13000 photo took 12 s and 2 GB to be refused (an audit). Other sizes are
    refused, as ever, after it is read (``check_request``)."""
    from sdexport.runtime.image_inputs import read_image_size, sized_by
    from sdexport.runtime.request import MASKED_INIT

    for flag, name, paths in (("--init-image", "init_image", [str(init_image)] if init_image else []),
                              ("--control-image", "control_image", [p for p in control_image or [] if p != MASKED_INIT]),
                              ("--adapter-image", "adapter_image", adapter_image or [])):
        if not paths or not paths[0].strip():  # (an empty path is refused where it is read)
            continue
        width, height = read_image_size(Path(paths[0]), flag)
        highest, widest = profile.height[2], profile.width[2]
        if not (height <= highest and width <= widest) and not (width <= highest and height <= widest):
            raise ProfileError(f"{flag} {paths[0]} is {height}x{width} (HxW), larger than the engines' profile "
                               f"takes: height at most {highest}, width at most {widest} ({sized_by(name, fit)})")
        return


def _condition_images(values: list[str] | None, height: int | None, width: int | None, flag: str, *,
                      masked_init: bool = False) -> list[Any]:
    """The ``--control-image`` or ``--adapter-image`` files, read now (a bad file is refused before
    anything loads); with ``masked_init`` (control images), ``masked-init`` where it names the
    masked init image (``MASKED_INIT``) instead of a file."""
    from sdexport.runtime.image_inputs import read_image, transparency_note
    from sdexport.runtime.request import MASKED_INIT

    if values and (height is None) != (width is None):
        raise SdexportError(f"with {flag}, give both --height and --width, or neither (the image's own size)")
    controls: list[Any] = []
    for value in values or []:
        if not value.strip():  # (Path("") is the current folder: "--control-image .: a directory")
            raise SdexportError(f"{flag} {value!r}: an empty path; name an image file")
        if value != MASKED_INIT or not masked_init:  # (in its own mode: resized first, then made RGB, as the API's)
            controls.append(read_image(Path(value), flag, mode=None, made="RGB"))
            _note(transparency_note(controls[-1], f"{flag} {value}"))
        elif Path(value).exists():
            raise SdexportError(f"--control-image {MASKED_INIT} names the masked init image, but a file of that name "
                                f"is here too: pass ./{MASKED_INIT} for the file")
        else:
            controls.append(MASKED_INIT)
    return controls


def _note(text: str | None) -> None:
    if text:
        console.print(f"[yellow]note:[/] {escape(text)}")


def _per_prompt_adapter_images(images: list[Any], adapters: int, prompts: int) -> list[Any] | None:
    """``--adapter-image`` files as ``GenerationRequest.adapter_image``: with one adapter, one image
    for every prompt or one per prompt, as given; with several, one per adapter for every prompt, or
    that many per prompt, prompt by prompt (a tuple each)."""
    if not images:
        return None
    if adapters < 2:
        return images
    if len(images) not in (adapters, adapters * prompts):
        raise SdexportError(f"{len(images)} --adapter-image for {adapters} T2I-Adapters and {prompts} prompt(s): give "
                            f"{adapters} (one per adapter, in the order they were exported, for every prompt)"
                            + (f" or {adapters * prompts} ({adapters} per prompt)" if prompts > 1 else ""))
    return [tuple(images[i:i + adapters]) for i in range(0, len(images), adapters)]


def _per_prompt_control_images(controls: list[Any], slots: int, images: int, union_images: int = 1) -> list[Any] | None:
    """``--control-image`` files as ``GenerationRequest.control_image``: one per ControlNet (``slots``:
    ``union_images`` each for union ones) for every image, as given; or that many per image, image by image,
    made one list per ControlNet of its image for each. ``masked-init``, made per image already,
    then stands in the same place for every image. Other counts are left to ``check_request``."""
    from sdexport.runtime.request import MASKED_INIT

    if not controls or not slots or images == 1 or len(controls) == slots:
        return controls or None
    if len(controls) != slots * images:
        each = "one per ControlNet" if union_images == 1 else f"{union_images} per union ControlNet, its --union-images"
        raise SdexportError(f"{len(controls)} --control-image for {images} images: give {slots} ({each}, in the order "
                            f"they were exported, for every image) or {slots * images} ({slots} per image, image by "
                            "image)")
    entries: list[Any] = []
    for k in range(slots):
        column = controls[k::slots]
        masked = [isinstance(c, str) for c in column]
        if any(masked) and not all(masked):
            raise SdexportError(f"--control-image {MASKED_INIT}: give it for every image or none"
                                + (f" (place {k + 1} of each image's {slots})" if slots > 1 else ""))
        entries.append(MASKED_INIT if all(masked) else column)
    return entries


def _one_or_each(values: list[float] | None, default: _Default) -> float | list[float] | _Default:
    """A repeatable per-image option (``--guidance``, ``--adapter-factor``): its default, one value for
    all, or one each."""
    if not values:
        return default
    return values[0] if len(values) == 1 else list(values)


def _place_setting(values: list[float] | None, default: _Default, places: int, images: int, flag: str,
                   one: str) -> Any:
    """A repeatable ControlNet or adapter option (``--control-scale``, ``-start``, ``-end``,
    ``--adapter-scale``) as ``GenerationRequest`` takes it: its default, one value for all, ``one``
    per place (``places``: the ControlNets, a union one's control images, the adapters), or that
    many per image, image by image, made one list per place of its value for each image. Other
    counts for one image are left to ``check_request``."""
    if not values:
        return default
    if len(values) == 1:
        return values[0]
    if images == 1 or not places or len(values) == places:
        return list(values)
    if len(values) != places * images:
        each = (f"{places} ({one}, in the order they were exported, for every image) or {places * images} "
                f"({places} per image, image by image)" if places > 1 else f"{images} (one per image)")
        raise SdexportError(f"{len(values)} {flag} for {images} images: give 1 (for every image)"
                            f"{', ' if places > 1 else ' or '}{each}")
    return [list(values[k::places]) for k in range(places)]


def _fit(image: Any, request: Any, fit: str, what: str, notes: list[str], multiple: int) -> Any:
    """``image`` at the request's size (``--fit``); a change is noted, to be said before generating."""
    from sdexport.runtime.image_inputs import fit_image

    fitted, note = fit_image(image, request.height, request.width, fit, what, multiple)
    if note:
        notes.append(note)
    return fitted


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """``KEY=VALUE`` options into a dict; a malformed one is refused with one line."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SdexportError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} sdpa_kernel=1")
        result[key.strip()] = value.strip()
    return result


def _generate(
    engine_dir: Path, backend: str, parts: list[GenerationRequest], output: Path, *, cuda_graph: bool,
    graphs: str = "auto", provider_options: dict[str, str] | None = None, inputs: dict[str, Any] | None = None,
    per_image: dict[str, list[Any]] | None = None, loras: list[Any] | None = None, ensemble: Ensemble | None = None,
    whole: GenerationRequest | None = None, hashed: dict[str, str] | None = None,
) -> None:
    """The heavy half of ``run`` (``backend`` resolved): load the engines, denoise each part of the
    request (one call of the engines each), save the images under one numbering. ``inputs``: what
    every image records of the inputs; ``per_image``: what each records of its own, in order.
    ``ensemble``: each part's latents go on to the refiner, whose images are saved. ``whole``: the
    request the parts were cut from, whose long texts are warned of first, by the run's numbers.
    ``hashed``: the manifest's files as ``run`` checked them (``load_pipeline``'s)."""
    from dataclasses import replace

    from sdexport import stopping
    from sdexport.runtime.ensemble import check_loaded
    from sdexport.runtime.images import image_parameters, output_paths, save_images
    from sdexport.runtime.loading import load_pipeline
    from sdexport.shapes import ShapeProfile

    first, sizes = parts[0], sorted({part.batch for part in parts})
    height, width = first.size
    wanted = ShapeProfile((sizes[0], sizes[-1], sizes[-1]), (height,) * 3, (width,) * 3)  # every call's batch
    with step(f"Loading engines ({backend})"):
        pipeline = load_pipeline(engine_dir, backend, cuda_graph=cuda_graph, request_profile=wanted,
                                 verify_files=False, graphs=graphs, provider_options=provider_options,
                                 image_inputs=first.image is not None, loras=loras, guess_mode=first.guess_mode,
                                 requests=parts, hashed=hashed)
        # (hashed before the heavy imports)
    refining = None
    if ensemble is not None:
        with step(f"Loading the refiner's engines ({backend})"):
            refining = load_pipeline(ensemble.refiner.engine_dir, backend, cuda_graph=cuda_graph, request_profile=wanted,
                                     verify_files=False, graphs=graphs, provider_options=provider_options,
                                     image_inputs=False,  # it starts from latents: no encoder
                                     requests=ensemble.parts, hashed=ensemble.refiner.manifest.files)
        for refine_part in ensemble.parts:  # before the base model runs
            check_loaded(refining, refine_part)
    for part in parts:
        pipeline.check(part)
    if whole is not None and len(parts) > 1:
        pipeline.truncations(whole)  # (the parts' own warnings then say nothing more)
    paths = output_paths(output, sum(part.batch for part in parts))
    saved = 0

    def wrote(path: Path) -> None:
        """Each image as it goes in place: a later one (or call) may fail, on a full disk say."""
        print_result(str(path))
        stopping.keep("images", _written(paths[:paths.index(path) + 1], len(paths)))

    unguided: list[tuple[int, int]] = []
    unadapted: list[int] = []
    with contextlib.ExitStack() as padded:
        if len(parts) > 1 and whole is not None:  # each image read as one call would (the whole run's chunks)
            padded.enter_context(pipeline.padded_to(whole))
            if refining is not None and ensemble is not None:
                padded.enter_context(refining.padded_to(ensemble.refine))
        for k, part in enumerate(parts):
            result = _denoise(pipeline, part, "Denoising")
            unguided += [(slot, saved + image) for slot, image in result.unguided]  # (the base model's, by the run's count)
            unadapted += [saved + image for image in result.unadapted]
            prefix = f"call {k + 1}/{len(parts)}: " if len(parts) > 1 else ""
            if refining is not None and ensemble is not None:
                console.print(_timing_line(f"{prefix}base model: ", result, pipeline), soft_wrap=True)
                # each image records the base model's half as its own run would (its prompt_2, strength,
                # truncations, the inputs: an init image, control and adapter images are the base
                # model's, those given per image too), under "base"
                base = [None] * saved + [
                    image_parameters(result, i, {**result.info, **(inputs or {}),
                                                 **{key: each[saved + i] for key, each in (per_image or {}).items()}})[1]
                    for i in range(part.batch)]
                refined = _denoise(refining, replace(ensemble.parts[k], init_latents=result.latents), "Refining")
                # the A1111 text's "Sampler:" is the run's, the base model's (as its strength and clip
                # skip are): it named the refiner's own scheduler, which ran the last steps alone (an audit)
                result = replace(refined, sampler=result.sampler)
                prefix = f"{prefix}refiner: "
                # the mask is the refiner's input too (it blends the base model's latents back outside it)
                own = {key: v for key, v in (inputs or {}).items() if key in ("mask", "fit")} if part.mask is not None else None
                save_images(result, output, own, first=saved, count=len(paths), per_image={"base": base}, on_written=wrote)
            else:
                save_images(result, output, inputs, first=saved, count=len(paths), per_image=per_image, on_written=wrote)
            saved += part.batch
            console.print(_timing_line(prefix, result, refining or pipeline), soft_wrap=True)
    for slot in sorted({slot for slot, _ in unguided}):
        images = [image + 1 for s, image in unguided if s == slot]
        guided = ("guided nothing" if len(paths) == 1 else "guided no image" if len(images) == len(paths) else
                  f"guided nothing in image{'s' if len(images) > 1 else ''} {', '.join(map(str, images))}")
        console.print(f"[yellow]note:[/] control image {slot + 1} {guided}: its --control-start to --control-end "
                      "window holds none of the steps that ran (as diffusers runs it)", soft_wrap=True)
    if unadapted:
        where = ("" if len(paths) == 1 else " in any image" if len(unadapted) == len(paths) else
                 f" in image{'s' if len(unadapted) > 1 else ''} {', '.join(str(i + 1) for i in unadapted)}")
        console.print(f"[yellow]note:[/] the T2I-Adapter features reached no U-Net call{where}: --adapter-factor "
                      "times the steps that ran rounds down to 0 (as diffusers counts it); raise --adapter-factor "
                      "or --steps" + (" (or --strength)" if parts[0].image is not None else ""), soft_wrap=True)
    older = _numbered_after(output, len(paths))
    if older:
        listed = escape(_listed(older)) + (f", {len(older)} files" if len(older) > 3 else "")
        console.print(f"[yellow]note:[/] {listed} (numbered past this run's {len(paths)} "
                      f"image{'s' if len(paths) != 1 else ''}) {'is' if len(older) == 1 else 'are'} not this run's: "
                      "left as found", soft_wrap=True)
    if pipeline.info.get("random_weights"):
        console.print("[yellow]note:[/] random weights: the images are noise-like by design")


def _denoise(pipeline: Any, part: GenerationRequest, label: str) -> Any:
    """One call of ``pipeline``, with a progress bar on a terminal."""
    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=not spinner_drawn()) as progress:  # (TERM=dumb: none)
        task = progress.add_task(label, total=part.denoising_steps(pipeline.family))

        def advance(calls: int, total: int) -> None:
            progress.update(task, completed=calls, total=total)

        return pipeline(part, on_step=advance)


def _timing_line(prefix: str, result: Any, pipeline: Any) -> str:
    """Where a call's time went, as ``run`` prints it."""
    from sdexport.runtime.schedulers import extra_calls

    t, request = result.timings, result.request
    if request.denoising_end is not None or request.denoising_start is not None:  # a window of the schedule
        n = len(t.unet_steps)
        calls: str | None = f"{n} U-Net call{'s' if n != 1 else ''} in its share of the {request.steps} steps"
    else:
        calls = extra_calls(result.scheduler, request.denoising_steps(pipeline.family), len(t.unet_steps))
    return (prefix + f"text encoder {t.text_encoder * 1000:.1f} ms, "
            + (f"T2I-Adapter {t.adapter * 1000:.1f} ms, " if pipeline.adapter else "")
            + (f"ControlNet {t.controlnet_total * 1000:.1f} ms, " if t.controlnet_steps else "")
            + f"U-Net {t.unet_total * 1000:.1f} ms "
            f"({calls or f'{len(t.unet_steps)} step' + ('s' if len(t.unet_steps) != 1 else '')}; "
            f"{t.iterations_per_second:.2f} it/s), "
            + (f"VAE {t.vae_decoder * 1000:.1f} ms, " if request.denoising_end is None else "")
            + f"overhead {t.loop_overhead * 1000:.1f} ms, total {t.total:.2f} s")


class _BenchGroup(typer.core.TyperGroup):
    """``sdexport bench SCENARIO`` runs a scenario (``bench run``), as it always has; ``bench compare``
    and ``bench cache-key`` sit beside it. Anything that is not one of those names is a scenario."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        first = _first_word(args)
        helps = ctx.help_option_names
        if first is None and not any(a in helps for a in args):
            raise SdexportError("bench: give a scenario file (sdexport bench SCENARIO, e.g. "
                                "benchmarks/scenarios/tiny-cpu.toml), or compare or cache-key")
        if first is not None and first not in self.commands and first not in helps:
            import difflib

            close = difflib.get_close_matches(first, list(self.commands), n=1, cutoff=0.6)
            if close and not Path(first).exists():  # (a misspelt command was run as a scenario's name, an audit)
                raise SdexportError(f"bench: no command or scenario file {first!r}; did you mean {close[0]!r}?")
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _first_word(args: list[str]) -> str | None:
    """The first argument after any leading -q/-v/--verbosity (``sdexport bench -v compare ...``)."""
    i = 0
    while i < len(args) and args[i] in ("-q", "--quiet", "-v", "--verbose", "--verbosity") \
            or i < len(args) and args[i].startswith("--verbosity="):
        i += 2 if args[i] == "--verbosity" else 1
    return args[i] if i < len(args) else None


bench_app = typer.Typer(
    cls=_BenchGroup,
    help="Benchmark a scenario (`sdexport bench SCENARIO`), compare two runs for CI, or print an engine cache key.",
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def _bench_options(quiet: QuietOpt = False, verbose: VerboseOpt = False, level: VerbosityOpt = None) -> None:
    """Benchmark a scenario (`sdexport bench SCENARIO`), compare two runs for CI, or print an engine cache key."""
    _apply_verbosity(quiet, verbose, level)


@bench_app.command("run")
def bench(
    scenario: Annotated[Path, typer.Argument(parser=_path, help="Scenario file, e.g. benchmarks/scenarios/tiny-cpu.toml.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Directory for results.json, results.md, results.png.")] = "bench-out",
    contenders: Annotated[str | None, typer.Option(help="Comma-separated override: diffusers, diffusers-compile, onnxruntime-cpu, onnxruntime-cuda (portable graphs), onnxruntime-cuda-fused (ONNX Runtime's fusions + CUDA graphs), torch, torch-compile, torch-compile-max, tensorrt.")] = None,
    engine_dir: Annotated[Path | None, typer.Option(parser=_engine_path, help="Use this engine directory instead of exporting one.")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed runs per case (overrides the scenario).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up runs per case (overrides the scenario).")] = None,
    engine_cache: Annotated[Path | None, typer.Option(parser=_engine_path, help="Keep the export in this folder between runs, in a subfolder named by what it depends on (`sdexport bench cache-key`); a later run with the same key reuses it.")] = None,
    refiner_engine_dir: Annotated[Path | None, typer.Option(parser=_engine_path, help="A scenario with a refiner: use this sdxl-refiner engine directory (with --engine-dir, the base model's) instead of exporting one.")] = None,
) -> None:
    """Benchmark the runtime's backends against eager diffusers on one scenario, in one process.

    `sdexport bench SCENARIO` is short for `sdexport bench run SCENARIO`.
    """
    from sdexport.bench.plan import Options, plan_bench, protected_paths
    from sdexport.bench.report import BENCH_OUTPUT
    from sdexport.bench.scenario import load_scenario
    from sdexport.output_dir import check_target

    loaded = load_scenario(scenario)
    options = Options(engine_dir=engine_dir, contenders=_names(contenders, "--contenders", "diffusers,torch"),
                      repeats=repeats, warmup=warmup, engine_cache=engine_cache, refiner_engine_dir=refiner_engine_dir)
    target = _output_path(output)
    plan = plan_bench(loaded, options, scenario)  # refuses bad input before torch and the model load
    check_target(target, BENCH_OUTPUT, replace=True, protected=protected_paths(plan, options, target))
    from sdexport.bench.harness import BenchmarkInterrupted, run_benchmark

    stopped = None
    try:
        _, paths = run_benchmark(loaded, target, options, scenario)
    except BenchmarkInterrupted as exc:  # the report is in place: shown as any other, then the stop goes on
        stopped, paths = exc, exc.paths
    _print_markdown(paths[1].read_text(encoding="utf-8"))  # (as written, whatever the locale)
    for path in paths:
        print_result(str(path))
    if stopped is not None:  # said once, with what is in place, on the line that ends the command
        from sdexport import stopping

        stopping.keep("report", str(stopped))
        raise stopped


@bench_app.command("cache-key")
def bench_cache_key(
    scenario: Annotated[Path, typer.Argument(parser=_path, help="Scenario file.")],
) -> None:
    """Print the name of the folder `--engine-cache` keeps this scenario's export in (SCENARIO-KEY;
    with a refiner, a second line: its own, SCENARIO-refiner-KEY).

    The key covers the model's files, the profile, the precision, the components, the sdexport code
    that writes graphs and the tracing libraries' versions: use it as a CI cache key (a refiner
    scenario prints two lines: join them where a key must be one line).
    """
    from sdexport.bench.plan import Options, plan_bench
    from sdexport.bench.scenario import load_scenario

    loaded = load_scenario(scenario)
    plan = plan_bench(loaded, Options(), scenario)
    from sdexport.bench.harness import engine_cache_entry, exports

    print_result("\n".join(engine_cache_entry(s, p, Path(".")).name for s, p in exports(loaded, plan)))


@bench_app.command("compare")
def bench_compare(
    baseline: Annotated[Path, typer.Argument(parser=_path, help="The reference run: a results.json, or the bench output folder holding it.")],
    new: Annotated[Path, typer.Argument(parser=_path, help="The run to judge, the same way.")],
    max_slowdown: Annotated[str, typer.Option(help="Fail a case whose end-to-end median is this much slower (and beyond the noise), e.g. 5%.")] = "5%",
    min_psnr: Annotated[float | None, typer.Option(help="Also fail a contender whose image agrees less than this (dB) with its run's baseline contender.")] = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Compare runs from different devices, precisions or scenario definitions anyway.")] = False,
    fail_unjudged: Annotated[bool, typer.Option(help="Fail a case with too few repeats (under 5) to tell a change beyond --max-slowdown from noise, rather than show it as not judged (the CI gate does).")] = False,
    relative_to: Annotated[str | None, typer.Option(help="Judge each contender's time as a ratio to this contender's in the same run (e.g. diffusers): drift of the machine between the runs cancels.")] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", help="Directory for comparison.json, comparison.md (for a merge-request comment) and comparison.xml (JUnit).")] = None,
) -> None:
    """Compare two benchmark runs: change of every median with a bootstrap interval, and a verdict.

    Prints the Markdown; exit status 1 when a case regressed (slower than --max-slowdown and beyond
    the noise of the repeats), a contender stopped working, agreement fell under --min-psnr, or
    (--fail-unjudged) a case had too few repeats to judge.
    """
    from sdexport.bench.compare import COMPARISON_OUTPUT, compare, markdown, parse_gate, write_comparison
    from sdexport.output_dir import check_target, claim

    gate = parse_gate(max_slowdown, min_psnr, allow_mismatch=allow_mismatch, fail_unjudged=fail_unjudged,
                      relative_to=relative_to)
    target = _output_path(output) if output is not None else None
    if target is not None:
        check_target(target, COMPARISON_OUTPUT, replace=True)
    comparison = compare(baseline, new, gate)
    _print_markdown(markdown(comparison))
    if target is not None:
        with claim(target, COMPARISON_OUTPUT, replace=True) as staging:
            paths = write_comparison(comparison, staging)
        for path in paths:  # stderr: stdout is the Markdown alone, ready for a comment
            console.print(str(target / path.name), markup=False, soft_wrap=True)
    if not comparison["passed"]:
        raise typer.Exit(1)



_BACKEND_HELP = "onnxruntime (CUDA if available, else CPU), onnxruntime-cpu, onnxruntime-cuda, torch, torch-compile, torch-compile-max, tensorrt (as for `run`)."
_DELAY_HELP = "How long a request may wait in Triton's queue for others to share its batch, in milliseconds."
_QUEUE_HELP = "Requests that may wait in the queue at all; over it, a request is refused at once (0: no bound)."
_MAX_STEPS_HELP = "The most steps one request may ask for (a scheduler would accept up to the model's 1000)."


_REFINER_HELP = ("SDXL's ensemble of experts: an sdxl-refiner engine directory that refines every image of this "
                 "SDXL base model from its latents at --denoising-end, as `run --refiner` does.")
_DENOISING_END_HELP = ("With --refiner: the base model's fraction of the schedule for a request that gives no "
                       "denoising_end, above 0 and below 1 (diffusers' example: 0.8).")
_SERVE_EMPHASIS_HELP = ("How brackets are read in a request that sends no emphasis: none (as text, as diffusers), "
                        "original (A1111's weights, as its UI does by default), no-norm (A1111's \"No norm\"), as "
                        "`run --emphasis`.")


def _serve_settings(engine_dir: Path, backend: str, cuda_graph: bool, portable_graphs: bool, max_steps: int,
                    engine_path: str | None = None, refiner: Path | None = None, denoising_end: float | None = None,
                    refiner_path: str | None = None, emphasis: str = "none",
                    shapes: dict[str, str | None] | None = None, *, command: str) -> tuple[Any, Any, Any, Any]:
    """The served model's manifest, its refiner's (None without ``--refiner``), its settings and the
    shapes it serves (``ServeSettings.served_profile``), with everything checked that can be before
    a server starts. ``shapes``: ``--batch``, ``--height``, ``--width`` as given (None: not given);
    ``command``: ``serve`` or ``triton-repo``, whose options the refusals name."""
    from sdexport.build.vae_upcast import upcast_parts
    from sdexport.manifest import load_manifest, read_scheduler_config
    from sdexport.runtime.emphasis import check_mode
    from sdexport.runtime.ensemble import Refiner
    from sdexport.runtime.loading import (
        check_lowered_vae,
        check_runnable,
        pipeline_components,
        resolve_backend,
        takes_init_images,
    )
    from sdexport.runtime.request import check_backend
    from sdexport.serving.triton_model import MAX_STEPS, ServeSettings

    check_backend(backend)
    _check_graph_flags(backend, cuda_graph, portable_graphs)
    if max_steps < 1:
        raise SdexportError(f"--max-steps {max_steps}: need at least 1")
    from sdexport.shapes import parse_range

    check_mode(emphasis, "--emphasis")
    narrowed = tuple((axis, parse_range(text, axis)) for axis, text in (shapes or {}).items() if text is not None)
    end = _refiner_cut(refiner, denoising_end, refiner_path)
    manifest = load_manifest(engine_dir, verify_files=False)
    trained = int(read_scheduler_config(engine_dir, manifest).get("num_train_timesteps") or 0)
    if trained and max_steps > trained:  # a limit no request can reach (the model refuses more): said now
        if max_steps != MAX_STEPS:  # (the default, for a model trained on fewer timesteps: theirs)
            raise SdexportError(f"--max-steps {max_steps}: the model was trained on {trained} timesteps, so no "
                                f"request can take more steps than that; pass --max-steps {trained} or less")
        max_steps = trained
    paired = Refiner.open(refiner, engine_dir, manifest) if refiner is not None else None
    graphs = "portable" if portable_graphs else "auto"
    # absolute, links and '..' kept as the filesystem reads them (a link with an ASCII name is how a
    # directory named otherwise is served; os.path.abspath would cut 'link/..' by text)
    settings = ServeSettings(engine_dir=engine_path or str(Path(engine_dir).absolute()), backend=backend, cuda_graph=cuda_graph,
                             graphs=graphs, max_steps=max_steps,
                             refiner=(refiner_path or str(Path(refiner).absolute())) if refiner is not None else "",
                             denoising_end=end, emphasis=emphasis, shapes=narrowed, set_by=command)
    refiner_manifest = paired.manifest if paired else None
    # refused here, not in Triton's log; and first, before the checks below load diffusers
    served = settings.served_profile(manifest, refiner_manifest)
    if command == "triton-repo":  # the paths the stock server will read (serve links them: ascii_links)
        from sdexport.serving.names import check_ascii

        check_ascii(settings.engine_dir, "--engine-path", engine_path is not None)
        if settings.refiner:
            check_ascii(settings.refiner, "--refiner-path", refiner_path is not None)
    # (a repository for another machine's server, engine_path, resolves "onnxruntime" there)
    resolved = resolve_backend(backend) if engine_path is None else backend
    for directory, read, image_inputs in ((engine_dir, manifest, takes_init_images(engine_dir, manifest)),
                                          *([(paired.engine_dir, paired.manifest, False)] if paired else [])):
        check_runnable(directory, read)
        loaded = pipeline_components(read, image_inputs, upcast=upcast_parts(directory, read))  # as ServedModel loads
        check_lowered_vae(directory, read, loaded, resolved, graphs)
    return manifest, refiner_manifest, settings, served


def _refuse_split_batch(images: int, parts: list[Any], most: int, manifest: Any, refiner_manifest: Any) -> None:
    """Where the images split into calls of ``most`` leave a last call of a batch a profile does
    not take, say so: the refusal named that call's batch as the run's ("--batch 1 is outside",
    when 3 were asked, an audit)."""
    last = parts[-1].batch
    if len(parts) < 2 or last == parts[0].batch:
        return
    for whose, read in (("the engines'", manifest), ("the refiner's", refiner_manifest)):
        if read is None:
            continue
        lo, _, hi = read.shape_profile.batch
        if lo <= parts[0].batch <= hi and not lo <= last <= hi:
            raise ProfileError(f"{images} images run in calls of {most}, the last of {last}, a batch {whose} profile "
                               f"does not take (batch must be in [{lo}, {hi}]): ask for a multiple of {most} images, "
                               f"or re-export with a batch range from {last}")


def _served_batch(manifest: Any, refiner_manifest: Any) -> int:
    """The most images one call takes (``run``'s; a served request's, which ``serve --batch`` may
    split into smaller calls): the base model's profile's, or its refiner's if fewer."""
    return min(m.shape_profile.batch[2] for m in (manifest, refiner_manifest) if m is not None)


def _batching(max_queue_delay_ms: float, max_queue_size: int) -> Any:
    from sdexport.serving.repository import Batching

    if not 0 <= max_queue_delay_ms <= 60_000:
        raise SdexportError(f"--max-queue-delay-ms {max_queue_delay_ms:g}: from 0 to 60000")
    if not 0 <= max_queue_size <= 2**32 - 1:  # (config.pbtxt's uint32: Triton cannot read a larger one)
        raise SdexportError(f"--max-queue-size {max_queue_size}: 0 (no bound) to {2**32 - 1}")
    return Batching(max_queue_delay_us=round(max_queue_delay_ms * 1000), max_queue_size=max_queue_size)


@app.command()
def serve(
    engine_dir: Annotated[Path, typer.Argument(parser=_engine_path, help="Engine directory to serve.")],
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "onnxruntime",
    cuda_graph: Annotated[bool, typer.Option(help="tensorrt, onnxruntime-cuda: replay CUDA graphs (as for `run`).")] = False,
    portable_graphs: Annotated[bool, typer.Option(help="onnxruntime-cuda: run the portable graphs, not the fused ones.")] = False,
    http_port: Annotated[int, typer.Option(help="KServe v2 HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="KServe v2 gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (/metrics).")] = 8002,
    address: Annotated[str, typer.Option(help="IPv4 address or host name to listen on (0.0.0.0: every interface; 127.0.0.1: this machine only).")] = "0.0.0.0",
    max_queue_delay_ms: Annotated[float, typer.Option(help=_DELAY_HELP)] = 100.0,
    max_queue_size: Annotated[int, typer.Option(help=_QUEUE_HELP)] = 0,
    max_steps: Annotated[int, typer.Option(help=_MAX_STEPS_HELP)] = 200,
    drain_timeout: Annotated[int, typer.Option(help="On Ctrl-C, SIGTERM or SIGHUP, seconds to let requests in flight finish (serve exits non-zero where some did not).")] = 30,
    startup_timeout: Annotated[int, typer.Option(help="Seconds to wait for the engines to load before giving up.")] = 600,
    log_file: Annotated[Path | None, typer.Option(parser=_path, help="Write Triton's log (and the model's) to this file (default: a temporary file, removed on exit, kept and named if the server failed; with -v it is shown here instead).")] = None,
    refiner: Annotated[Path | None, typer.Option(parser=_engine_path, help=_REFINER_HELP)] = None,
    denoising_end: Annotated[float | None, typer.Option(help=_DENOISING_END_HELP)] = None,
    emphasis: Annotated[str, typer.Option(help=_SERVE_EMPHASIS_HELP)] = "none",
    batch: ServeBatchOpt = None,
    height: ServeHeightOpt = None,
    width: ServeWidthOpt = None,
) -> None:
    """Serve an engine directory behind Triton Inference Server (KServe v2 HTTP/gRPC, metrics, dynamic batching)."""
    import shutil
    import tempfile

    from sdexport.serving.repository import write_repository
    from sdexport.serving.server import (
        Ports,
        check_ports,
        check_serving_installed,
        listen_address,
        run_server,
    )

    check_serving_installed()
    verbose = verbosity() >= VERBOSE  # -v: Triton's log here, not in a file
    ports = Ports(http=http_port, grpc=grpc_port, metrics=metrics_port, address=listen_address(address))
    batching = _batching(max_queue_delay_ms, max_queue_size)
    if not 0 <= drain_timeout <= 2**31 - 1 or startup_timeout < 1:  # (Triton's exit timeout, an int32)
        raise SdexportError(f"--drain-timeout must be 0 to {2**31 - 1}, --startup-timeout 1 or more")
    check_ports(ports)  # the cheap refusals first; the engine directory's checks load libraries
    from sdexport.serving.names import check_server_paths

    check_server_paths()
    if log_file is not None:
        from sdexport.output_dir import refuse_inside_engine_dir, require_creatable

        if log_file.is_dir() or verbose:
            raise SdexportError(f"--log-file {log_file}: " + ("a directory; give a file name" if log_file.is_dir()
                                                              else "not with -v, which shows the log here"))
        require_creatable(log_file.parent, f"--log-file {log_file}", nothing="no log can be written")
        refuse_inside_engine_dir(log_file, f"--log-file {log_file}")
        from sdexport.serving.server import check_log_file

        check_log_file(log_file)
    manifest, refiner_manifest, settings, served = _serve_settings(
        engine_dir, backend, cuda_graph, portable_graphs, max_steps, refiner=refiner, denoising_end=denoising_end,
        emphasis=emphasis, shapes={"batch": batch, "height": height, "width": width}, command="serve")
    from sdexport.runtime.loading import resolve_backend
    from sdexport.runtime.providers import require_backend

    resolved = resolve_backend(backend)
    require_backend(resolved)
    # Hash what the backend will read here, as `run` does: a damaged file is named in one line now,
    # not inside Triton's log after the server gave up; the model then loads without hashing again.
    from dataclasses import replace

    from sdexport.runtime.loading import takes_init_images, verify_for_backend

    # (the refiner starts from the base model's latents: no encoder)
    pairs = [(engine_dir, manifest, takes_init_images(engine_dir, manifest)),
             *([(refiner, refiner_manifest, False)] if refiner is not None else [])]
    for directory, read, image_inputs in pairs:
        verify_for_backend(directory, read, resolved, settings.graphs, image_inputs=image_inputs)
    if resolved == "tensorrt":  # a plan for this GPU (and the shapes served) for every part the model loads,
        from sdexport.runtime.loading import check_tensorrt_plans  # and a size all of them take
        from sdexport.serving.triton_model import taken_by_all

        wanted = settings.plan_profile(served)  # (as ServedModel loads)
        taken_by_all(served, [plan for directory, read, image_inputs in pairs for plan in check_tensorrt_plans(
            directory, read, image_inputs=image_inputs, request_profile=wanted)], settings.option)
    settings = replace(settings, verify=False, hashed=settings.checked_digest(manifest, refiner_manifest))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)  # Triton writes no log into a folder that is not there
    work = Path(tempfile.mkdtemp(prefix="sdexport-serve-"))
    repository = work / "repository"
    log = None if verbose else (log_file or work / "triton.log")
    try:
        from sdexport.serving.names import ascii_links

        settings = ascii_links(settings, work / "links")
        write_repository(repository, settings, _served_batch(manifest, refiner_manifest), batching)
        host = "localhost" if ports.address == "0.0.0.0" else address  # (a name as given: it resolves the same)

        refined = f" refined by {escape(str(refiner))}" if refiner is not None else ""

        def ready() -> None:
            console.print(f"serving {escape(str(engine_dir))}{refined} as model 'sdexport': http://{host}:{http_port} "
                          f"(gRPC {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics); Ctrl-C stops"
                          + (f"; Triton's log: {escape(str(log))}" if log is not None else ""))
            print_result(f"http://{host}:{http_port}/v2/models/sdexport")

        console.print(f"starting Triton and loading {escape(str(engine_dir))}{refined} ({backend})…")
        try:
            run_server(repository, ports, startup_timeout_s=startup_timeout, drain_timeout_s=drain_timeout,
                       log_file=log, on_ready=ready)
        except SdexportError as exc:  # the log says more: named, and kept where the temporary folder goes
            if log is None or not log.is_file():
                raise
            if log_file is None:
                try:
                    log = Path(shutil.move(log, work.with_name(f"{work.name}-triton.log")))
                except OSError:  # (the temporary folder's parent not writable now): the error as it was
                    raise exc from None
            raise SdexportError(f"{exc}; Triton's log: {log}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


@app.command("triton-repo")
def triton_repo(
    engine_dir: Annotated[Path, typer.Argument(parser=_engine_path, help="Engine directory to serve.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Model repository folder to create (tritonserver --model-repository).")],
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "onnxruntime",
    cuda_graph: Annotated[bool, typer.Option(help="tensorrt, onnxruntime-cuda: replay CUDA graphs.")] = False,
    portable_graphs: Annotated[bool, typer.Option(help="onnxruntime-cuda: run the portable graphs, not the fused ones.")] = False,
    engine_path: Annotated[str | None, typer.Option(help="The engine directory's path as the server will see it (e.g. /engines/tiny inside a container); default: its absolute path here.")] = None,
    max_queue_delay_ms: Annotated[float, typer.Option(help=_DELAY_HELP)] = 100.0,
    max_queue_size: Annotated[int, typer.Option(help=_QUEUE_HELP)] = 0,
    max_steps: Annotated[int, typer.Option(help=_MAX_STEPS_HELP)] = 200,
    force: Annotated[bool, typer.Option(help="Replace an existing repository that sdexport wrote.")] = False,
    refiner: Annotated[Path | None, typer.Option(parser=_engine_path, help=_REFINER_HELP)] = None,
    denoising_end: Annotated[float | None, typer.Option(help=_DENOISING_END_HELP)] = None,
    refiner_path: Annotated[str | None, typer.Option(help="With --refiner: its path as the server will see it (as --engine-path); default: its absolute path here.")] = None,
    emphasis: Annotated[str, typer.Option(help=_SERVE_EMPHASIS_HELP)] = "none",
    batch: ServeBatchOpt = None,
    height: ServeHeightOpt = None,
    width: ServeWidthOpt = None,
) -> None:
    """Write a Triton model repository serving an engine directory, for the stock tritonserver (NGC container)."""
    from sdexport.output_dir import claim
    from sdexport.serving.repository import REPOSITORY, write_repository

    batching = _batching(max_queue_delay_ms, max_queue_size)
    for flag, path in (("--engine-path", engine_path), ("--refiner-path", refiner_path)):
        if path is not None and not path.startswith("/"):
            raise SdexportError(f"{flag} {path}: an absolute path, as the server sees it")
    if engine_path is not None and refiner is not None and refiner_path is None:  # (it wrote this machine's path)
        raise SdexportError("--engine-path with --refiner: give --refiner-path too, the refiner's path as the server "
                            "will see it")
    from sdexport.output_dir import check_target

    target = _output_path(output)
    protected = (engine_dir, *([refiner] if refiner is not None else []))
    check_target(target, REPOSITORY, replace=force, protected=protected)  # before the engines' checks load libraries
    manifest, refiner_manifest, settings, _ = _serve_settings(
        engine_dir, backend, cuda_graph, portable_graphs, max_steps, engine_path, refiner, denoising_end, refiner_path,
        emphasis, shapes={"batch": batch, "height": height, "width": width}, command="triton-repo")
    from sdexport.runtime.loading import takes_init_images, verify_for_backend

    # the files the server's backend reads, hashed here as serve does (a stock server would only fail
    # at load): "onnxruntime" is the server's to resolve, and its portable graphs are read either way
    reads = "onnxruntime-cpu" if backend == "onnxruntime" else backend
    verify_for_backend(engine_dir, manifest, reads, settings.graphs, image_inputs=takes_init_images(engine_dir, manifest))
    if refiner is not None:
        verify_for_backend(refiner, refiner_manifest, reads, settings.graphs)
    if backend == "tensorrt":  # (a note: building after writing the repository is a way to work)
        _note(_unbuilt(engine_dir, manifest, takes_init_images(engine_dir, manifest)))
        if refiner is not None:
            _note(_unbuilt(refiner, refiner_manifest, False))
    with claim(target, REPOSITORY, replace=force, protected=protected) as staging:
        write_repository(staging, settings, _served_batch(manifest, refiner_manifest), batching)
    refined = f", refined by {escape(settings.refiner)}" if settings.refiner else ""
    console.print(f"wrote the Triton model repository {escape(str(target))} (model 'sdexport' over "
                  f"{escape(settings.engine_dir)}{refined}); start it with: tritonserver --model-repository {escape(pasteable(target.resolve()))}")
    print_result(str(target))


LOAD_REQUESTS = 16
"""``loadtest``'s request count where neither ``--requests`` nor ``--duration`` is given."""


@app.command()
def loadtest(
    url: Annotated[str, typer.Option(help="The server's HTTP address, host:port.")] = "localhost:8000",
    model: Annotated[str, typer.Option(help="Model name in the repository.")] = "sdexport",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt of every request.")] = "a lighthouse at dusk",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Concurrent clients, each with one request in flight.")] = 4,
    requests: Annotated[int | None, typer.Option("--requests", "-n", help="Requests in all (default 16; with --duration, no count: until it ends; 0: until --duration).")] = None,
    duration: Annotated[float, typer.Option(help="Stop sending after this many seconds (0: until --requests).")] = 0.0,
    batch: Annotated[int, typer.Option(help="Images per request.")] = 1,
    steps: Annotated[int | None, typer.Option(help="Steps per image (default: the model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Image height (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (default: the model's).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Scheduler (default: the model's).")] = None,
    init_image: Annotated[str | None, typer.Option(help="img2img (and the SDXL refiner): a PNG/JPEG every request sends as its init image.")] = None,
    mask: Annotated[str | None, typer.Option(help="Inpainting: a PNG/JPEG every request sends as its mask (white repaints).")] = None,
    strength: Annotated[float | None, typer.Option(help="With --init-image: how far it is noised (default: the model's).")] = None,
    denoising_end: Annotated[float | None, typer.Option(help="A base model served with a refiner (serve --refiner): its share of the schedule (default: the server's).")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Folder for loadtest.json and loadtest.md.")] = "loadtest-out",
) -> None:
    """Load-test a served model: concurrent clients, throughput, p50/p95/p99 latency and errors."""
    import json

    from sdexport import stopping
    from sdexport.atomic import write_atomic
    from sdexport.serving.loadtest import GONE, LoadPlan, LoadStopped, markdown, run_load
    from sdexport.serving.server import check_client_installed

    check_client_installed()
    params = {k: v for k, v in {"steps": steps, "height": height, "width": width, "guidance": guidance,
                                "scheduler": scheduler, "strength": strength,
                                "denoising_end": denoising_end}.items() if v is not None}
    images = {k: v for k, v in {"init_image": init_image, "mask": mask}.items() if v is not None}
    if requests is None:  # a duration alone bounds the run by time, not by the count's default too
        requests = 0 if duration else LOAD_REQUESTS
    plan = LoadPlan(url=url, model=model, concurrency=concurrency, requests=requests, duration_s=duration,
                    prompts_per_request=batch, params=params, images=images)
    files = plan.check()
    target = _output_path(output)
    if target.exists() and not target.is_dir():
        raise SdexportError(f"-o {output} is a file; give a folder for loadtest.json and loadtest.md")
    from sdexport.output_dir import refuse_inside_engine_dir, require_creatable

    require_creatable(target, f"-o {output}")
    refuse_inside_engine_dir(target, f"-o {output}", itself=True)
    changed = _not_as_loadtest_wrote(target)
    if changed is not None:
        raise SdexportError(f"-o {output}: {target / changed} exists and is not as sdexport loadtest wrote it; "
                            "choose another folder")
    stop: KeyboardInterrupt | None = None
    try:
        report = run_load(plan, prompt, files)
    except LoadStopped as stopped:  # (the figures before the stop are written, then it goes on)
        report, stop = stopped.report, stopped.stop
    target.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    changed = _not_as_loadtest_wrote(target)  # (again: a table annotated while the load ran was replaced)
    if changed is not None:
        _print_markdown(text)
        raise SdexportError(f"-o {output}: {target / changed} was changed while the load test ran, so it is not "
                            "replaced; the results are the table above (run again into another folder for the files)")
    from sdexport.written_reports import with_record

    # the JSON first (it holds everything), the table, then the JSON again with the table's hash
    # and its own: a report edited by hand is not replaced by the next run (``_not_as_loadtest_wrote``)
    write_atomic(target / "loadtest.json", json.dumps(report, indent=2) + "\n")
    write_atomic(target / "loadtest.md", text)
    recorded = with_record(report, "loadtest.json", [target / "loadtest.md"])
    write_atomic(target / "loadtest.json", json.dumps(recorded, indent=2) + "\n")
    _print_markdown(text)
    if stop is not None:
        stopping.keep("loadtest", f"the report of the {report['wall_s']:.0f} s before: {target / 'loadtest.json'}")
        raise stop
    if not report["succeeded"] and report["errors"]:
        first = next(iter(report["errors"]))
        raise SdexportError(f"no request succeeded ({sum(report['errors'].values())} failed), e.g.: {first} "
                            f"(the report: {target / 'loadtest.json'})")
    if report.get("ended_early_why") == GONE:  # (exit 0 told a CI gate the run had gone as asked, an audit)
        raise SdexportError(f"{GONE} {report['ended_early_s']:.1f} s into the run, which then ended; the report of "
                            f"what it answered: {target / 'loadtest.json'}")
    print_result(str(target / "loadtest.json"))


def _not_as_loadtest_wrote(folder: Path) -> str | None:
    """Which of ``folder``'s loadtest.json and loadtest.md may not be replaced (None: both may, or
    neither is there): each must be a file an earlier run wrote, as it wrote it (``written_reports``)."""
    import json

    from sdexport.atomic import read_regular
    from sdexport.written_reports import changed_file

    there = [name for name in ("loadtest.json", "loadtest.md") if (folder / name).exists() or (folder / name).is_symlink()]
    if not there:
        return None
    try:
        report = json.loads(read_regular(folder / "loadtest.json").decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return there[0]
    if not (isinstance(report, dict) and {"latency_s", "concurrency", "server"} <= set(report)):
        return there[0]
    return changed_file(folder, "loadtest.json", report, ["loadtest.md"])


def _with_verbosity_options(command: Any) -> Any:
    """``command`` taking ``-q``, ``-v`` and ``--verbosity`` after its name too (``sdexport run ... -v``),
    as users type them; they are applied before the command's body runs."""
    import functools
    import inspect

    signature = inspect.signature(command, eval_str=True)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in (("quiet", QuietOpt, False), ("verbose", VerboseOpt, False),
                                               ("level", VerbosityOpt, None))]

    @functools.wraps(command)
    def wrapper(*args: Any, quiet: bool = False, verbose: bool = False, level: str | None = None, **kwargs: Any) -> Any:
        _apply_verbosity(quiet, verbose, level)
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
    return wrapper


for _info in (*app.registered_commands, *bench_app.registered_commands):
    _info.callback = _with_verbosity_options(_info.callback)


def main() -> None:
    """Every failure a user can cause ends in one line on stderr and a non-zero exit.

    ``SdexportError``: bad input, stated by sdexport. Usage errors (a wrong option or value): the
    parser's own message, on one line. ``OSError``: the filesystem refused (full disk, permissions,
    a read-only mount). Anything else is a bug and keeps its traceback; ``SDEXPORT_TRACEBACK=1``
    shows the traceback of the one-line errors too.
    """
    own_process()
    set_verbosity(NORMAL)  # per call: tests run several commands in one process
    _verbosity_given.clear()
    from sdexport import stopping
    from sdexport.setting_names import run_option, settings_named

    # SIGTERM unwinds like Ctrl-C, a stop dropped on the way is not lost; refusals name run's options
    with stopping.listening(), settings_named(run_option):
        code = _run_app()
        if code == 130:  # typer (0.29) returns Ctrl-C and SIGTERM inside a command as this code
            _say_interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The console script (and ``python -m sdexport``): ``main``, whose outcome a stop during the
    interpreter's teardown no longer changes (``stopping.finished``), printing any path
    (``printable_streams``)."""
    from sdexport import stopping
    from sdexport.console import printable_streams

    printable_streams()
    try:
        main()
    except SystemExit:
        stopping.finished()
        raise


def _say_interrupted() -> None:
    """"interrupted", and what the command had finished before it was (``stopping.keep``)."""
    from sdexport import stopping

    error_console.print(escape("; ".join(["interrupted", *stopping.kept()])), style="red", soft_wrap=True)


def _run_app() -> Any:
    """The command's own exit code; the failures ``main`` describes end the process here."""
    try:
        return app(standalone_mode=False)
    except SdexportError as exc:
        _fail(str(exc), 2, exc)
    except (KeyboardInterrupt, typer.Abort):
        _say_interrupted()
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:  # (a name too long is the input's: a usage error, as other bad input)
        _fail(_describe_os_error(exc), 2 if exc.errno == errno.ENAMETOOLONG else 1, exc)
    except MemoryError as exc:
        _fail("out of memory; lower the profile's maxima (--batch, --height, --width) or use a larger machine", 1, exc)
    except EngineRunError as exc:  # the engine's failure, not the input's: exit 1, as other failures
        _fail(str(exc), 1, exc)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(0)  # the help was shown
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(" ".join(exc.format_message().split()) + hint, int(getattr(exc, "exit_code", 2) or 2), exc)  # type: ignore[attr-defined]


def _fail(message: str, code: int, exc: BaseException) -> NoReturn:
    from sdexport import stopping
    from sdexport.console import env_switch

    if env_switch("SDEXPORT_TRACEBACK", default=False):
        raise exc
    # what the command had finished before it failed (a run's first calls' images), as on a stop
    error_console.print(f"[red]error:[/] {escape('; '.join([message, *stopping.kept()]))}", soft_wrap=True)
    sys.exit(code)


def _is_usage_error(exc: BaseException) -> bool:
    """click's UsageError and its kind (typer vendors its own copy of click, so match by shape)."""
    return any(cls.__name__ == "UsageError" for cls in type(exc).__mro__) and hasattr(exc, "format_message")


def _describe_os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    advice = {
        errno.ENOSPC: "; free some space or write elsewhere",
        errno.EDQUOT: "; free some space or write elsewhere",
        errno.EFBIG: ("; a file outgrew the shell's file-size limit (ulimit -f) or the largest file this file system "
                      "holds: raise the limit or write elsewhere"),  # (said by writers that name no file)
        errno.EROFS: "; write elsewhere",
        errno.EACCES: "; check the permissions (or, for an output, write elsewhere)",
        errno.EPERM: "; check the permissions (or, for an output, write elsewhere)",
        errno.ENAMETOOLONG: "; choose a shorter name",
    }.get(exc.errno or 0, "")
    return f"{where}{what}{advice}"

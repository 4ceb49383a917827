"""The ``sdexport`` command line: export → build → run → bench, each a thin layer over the library.

Heavy imports happen inside each command, so ``sdexport --help`` is instant and a command that does
not need torch or TensorRT never imports them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdexport.console import console, quiet_libraries
from sdexport.errors import SdexportError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Stable Diffusion checkpoints → verified ONNX → TensorRT engines → a slim runtime, and benchmarks.",
    pretty_exceptions_enable=False,
)

BatchOpt = Annotated[Optional[str], typer.Option("--batch", help="Images per call as min:opt:max (default 1:1:4; tiny 1:1:2).")]
HeightOpt = Annotated[Optional[str], typer.Option("--height", help="Image height in pixels as min:opt:max (default 256:512:1024).")]
WidthOpt = Annotated[Optional[str], typer.Option("--width", help="Image width in pixels as min:opt:max (default 256:512:1024).")]


def _profile(batch: str | None, height: str | None, width: str | None, default: object = None):  # noqa: ANN202
    from sdexport.shapes import ShapeProfile, parse_range

    if batch is None and height is None and width is None:
        return default
    base = default if isinstance(default, ShapeProfile) else ShapeProfile()
    return ShapeProfile(
        parse_range(batch, "batch") if batch else base.batch,
        parse_range(height, "height") if height else base.height,
        parse_range(width, "width") if width else base.width,
    )


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Preset (tiny, tiny-v, sd15, sd21), diffusers directory, or .safetensors/.ckpt file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Engine directory to create.")],
    config: Annotated[Optional[str], typer.Option(help="For a single-file checkpoint: a diffusers directory or preset giving its architecture.")] = None,
    batch: BatchOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    dtype: Annotated[str, typer.Option(help="fp32 or fp16 (fp16 weights and compute, float32 inputs/outputs).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    components: Annotated[Optional[str], typer.Option(help="Comma-separated subset, e.g. unet,vae_decoder.")] = None,
    verify: Annotated[str, typer.Option(help="full (min, opt, max, odd), quick (min only) or none.")] = "full",
    seed: Annotated[int, typer.Option(help="Seed of a preset's random weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Export a checkpoint's text encoder, U-Net and VAE to ONNX and prove each against PyTorch."""
    from sdexport.export.exporter import ExportOptions
    from sdexport.export.exporter import export as run_export
    from sdexport.inspect_dir import print_summary

    if verify not in ("full", "quick", "none"):
        raise SdexportError(f"--verify {verify}: choose full, quick or none")
    options = ExportOptions(
        profile=_profile(batch, height, width),
        dtype=dtype,
        opset=opset,
        components=components.split(",") if components else None,
        verify=verify,  # type: ignore[arg-type]
        config=config,
        seed=seed,
        force=force,
    )
    manifest = run_export(model, output, options)
    print_summary(output, manifest)


@app.command()
def inspect(
    engine_dir: Annotated[Path, typer.Argument(help="An engine directory written by `sdexport export`.")],
    check: Annotated[bool, typer.Option(help="Check every file against its sha256.")] = True,
) -> None:
    """Show what an engine directory holds: model, profile, tools, parity results and engines."""
    from sdexport.inspect_dir import print_summary
    from sdexport.manifest import load_manifest

    print_summary(engine_dir, load_manifest(engine_dir, verify_files=check))


def main() -> None:
    quiet_libraries()
    try:
        app()
    except SdexportError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)

"""Where an SDXL VAE decodes in fp32 whatever the export's precision, as diffusers' SDXL pipelines
upcast a VAE whose config sets ``force_upcast``: which decoder the runtime loads
(``runtime.loading``), and what ``sdexport build`` makes and in which precision. Here, with the
builds, so that the bench's engine cache key, which covers ``build/``, covers it too.
"""

from __future__ import annotations

from pathlib import Path

from sdexport.errors import EngineDirError, one_line
from sdexport.manifest import Manifest, select_specs
from sdexport.specs import VAE_DECODER_FP32, ComponentSpec

FALLBACK_VAE = VAE_DECODER_FP32.name
"""The fp32 VAE decoder an fp16 export carries (``vae_decoder_fp32``)."""


def vae_config_file(manifest: Manifest) -> str | None:
    """The VAE's ``config.json`` as the manifest lists it (so hashed), beside the fp32 decoder's graph
    or else the decoder's; None where it lists neither."""
    for name in (FALLBACK_VAE, "vae_decoder"):
        if name in manifest.components:
            rel = f"{Path(manifest.components[name].onnx).parent.as_posix()}/config.json"
            return rel if rel in manifest.files else None
    return None


def vae_upcast(engine_dir: Path, manifest: Manifest) -> bool:
    """Whether diffusers decodes this model's VAE in fp32 whatever the pipeline's dtype: its SDXL
    pipelines upcast a VAE whose config sets ``force_upcast`` (SDXL's own VAE overflows fp16 with
    its trained weights; an fp16-safe one sets it false; AutoencoderKL's default is true). SD's
    pipelines ignore the flag, and so does this. Only a config the manifest lists decides
    (``verify_for_backend`` hashes it): without one, nothing changes."""
    import json

    rel = vae_config_file(manifest) if manifest.family == "sdxl" else None
    if rel is None:
        return False
    path = engine_dir / rel
    if not path.is_file():
        return False  # listed but missing: the file check says so
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        from sdexport.manifest import check_files

        try:
            check_files(engine_dir, {rel: manifest.files[rel]})  # damaged since the export: say that, not this
        except OSError:
            pass
        raise EngineDirError(f"{path}: unreadable VAE config ({one_line(exc)})") from None
    return isinstance(config, dict) and bool(config.get("force_upcast", True))


def decodes_in_fp32(engine_dir: Path, manifest: Manifest) -> bool:
    """Whether the loop decodes with an fp16 export's fp32 VAE decoder from the start (``vae_upcast``).
    Decoding in fp16 first would spend a decode that overflows, a wait for the device to find out,
    and a warning on every image. A directory without the fp32 decoder (an fp32 export, an adopted
    one) keeps its decoder and the overflow check."""
    return manifest.dtype == "fp16" and FALLBACK_VAE in manifest.components and vae_upcast(engine_dir, manifest)


VAE_PARTS = ("vae_decoder", "vae_encoder")


def kept_fp32(engine_dir: Path, manifest: Manifest) -> tuple[str, ...]:
    """The export's own VAE components that run in fp32 wherever they are built: fp32 graphs (an fp32
    export's; an fp16 export's are fp16) of a VAE that upcasts (``vae_upcast``), as diffusers' SDXL
    pipelines decode, and encode init images (img2img, inpainting), in fp32. An fp16 build must not
    lower them (TensorRT 10's fp16 flag, ONNX Runtime's conversion): the decoder would overflow, with
    no fp32 decoder beside it to fall back on. The runtime passes over such engines built before this
    rule (``runtime.loading.check_lowered_vae``)."""
    names = tuple(n for n in VAE_PARTS if n in manifest.components and manifest.components[n].dtype == "fp32")
    return names if names and vae_upcast(engine_dir, manifest) else ()


def specs_to_build(engine_dir: Path, manifest: Manifest, names: list[str] | None, *,
                   fp16: bool = True) -> list[ComponentSpec]:
    """What ``sdexport build`` makes engines for, and in which precision where the spec alone does not
    say (``vae_upcast``): ``names`` (``--components``), or every component but an fp16 VAE decoder
    that no run would load (``decodes_in_fp32``: minutes of TensorRT building, and a fused graph,
    for nothing; naming it still builds it). ``fp16``: the build would lower fp32 graphs to fp16
    (TensorRT 10's fp16 flag, ONNX Runtime's conversion); then ``kept_fp32``'s VAE components are
    built fp32, as diffusers runs them."""
    specs = select_specs(manifest, names)
    if not vae_upcast(engine_dir, manifest):
        return specs
    from dataclasses import replace

    from sdexport.console import console

    if decodes_in_fp32(engine_dir, manifest):
        if names:
            return specs
        console.print("[yellow]note:[/] not building vae_decoder: the runtime decodes with vae_decoder_fp32, as the "
                      "VAE's config sets force_upcast (--components vae_decoder builds it anyway)")
        return [s for s in specs if s.name != "vae_decoder"]
    kept = [s.name for s in specs if s.name in kept_fp32(engine_dir, manifest)] if fp16 else []
    if not kept:
        return specs
    console.print(f"[yellow]note:[/] keeping {' and '.join(kept)} fp32: the VAE's config sets force_upcast (it "
                  "overflows fp16), as diffusers' SDXL pipelines run it")
    return [replace(s, always_fp32=True) if s.name in kept else s for s in specs]

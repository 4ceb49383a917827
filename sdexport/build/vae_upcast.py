"""Where an SDXL VAE decodes and encodes in fp32 whatever the export's precision, as diffusers' SDXL
pipelines upcast a VAE whose config sets ``force_upcast``: which decoder and encoder the runtime
loads (``runtime.loading``), and what ``sdexport build`` makes and in which precision. Here, with
the builds, so that the bench's engine cache key, which covers ``build/``, covers it too.
"""

from __future__ import annotations

from pathlib import Path

from sdexport.errors import EngineDirError, one_line
from sdexport.manifest import Manifest, select_specs
from sdexport.specs import VAE_DECODER_FP32, VAE_ENCODER_FP32, ComponentSpec, is_sdxl

FALLBACK_VAE = VAE_DECODER_FP32.name
"""The fp32 VAE decoder an fp16 export carries (``vae_decoder_fp32``)."""
FP32_VAE = {"vae_decoder": FALLBACK_VAE, "vae_encoder": VAE_ENCODER_FP32.name}
"""An fp16 export's VAE components → the fp32 ones it carries beside them (SDXL's encoder: specs)."""


def vae_config_file(manifest: Manifest) -> str | None:
    """The VAE's ``config.json`` as the manifest lists it (so hashed), beside the first of the VAE's
    graphs the directory has (the fp32 decoder's, the decoder's, then the encoders'); None where it
    lists none."""
    for name in (FALLBACK_VAE, "vae_decoder", VAE_ENCODER_FP32.name, "vae_encoder"):
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

    rel = vae_config_file(manifest) if is_sdxl(manifest.family) else None
    if rel is None:
        return False
    path = engine_dir / rel
    if not path.is_file():
        return False  # listed but missing: the file check says so
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        from sdexport.manifest import check_files

        try:
            check_files(engine_dir, {rel: manifest.files[rel]})  # damaged since the export: say that, not this
        except OSError:
            pass
        raise EngineDirError(f"{path}: unreadable VAE config ({one_line(exc)})") from None
    return isinstance(config, dict) and bool(config.get("force_upcast", True))


def upcast_parts(engine_dir: Path, manifest: Manifest) -> dict[str, str]:
    """The fp16 VAE components the runtime replaces from the start with the fp32 ones the export
    carries (``FP32_VAE``), where the VAE upcasts (``vae_upcast``): ``{"vae_decoder":
    "vae_decoder_fp32", "vae_encoder": "vae_encoder_fp32"}``, or the part of it the directory has.
    Decoding in fp16 first would spend a decode that overflows, a wait for the device to find out,
    and a warning on every image; an fp16 encoder that overflows has no fallback at all. A directory
    without them (an fp32 export, an adopted one, an SDXL export from before sdexport carried the
    fp32 encoder) keeps its own, with the overflow checks."""
    present = {part: fp32 for part, fp32 in FP32_VAE.items() if fp32 in manifest.components}
    return present if manifest.dtype == "fp16" and present and vae_upcast(engine_dir, manifest) else {}



def kept_fp32(engine_dir: Path, manifest: Manifest) -> tuple[str, ...]:
    """The export's own VAE components that run in fp32 wherever they are built: fp32 graphs (an fp32
    export's; an fp16 export's are fp16) of a VAE that upcasts (``vae_upcast``), as diffusers' SDXL
    pipelines decode, and encode init images (img2img, inpainting), in fp32. An fp16 build must not
    lower them (TensorRT 10's fp16 flag, ONNX Runtime's conversion): the decoder would overflow, with
    no fp32 decoder beside it to fall back on. The runtime passes over such engines built before this
    rule (``runtime.loading.check_lowered_vae``)."""
    names = tuple(n for n in FP32_VAE if n in manifest.components and manifest.components[n].dtype == "fp32")
    return names if names and vae_upcast(engine_dir, manifest) else ()


def specs_to_build(engine_dir: Path, manifest: Manifest, names: list[str] | None, *,
                   fp16: bool = True) -> list[ComponentSpec]:
    """What ``sdexport build`` makes engines for, and in which precision where the spec alone does not
    say (``vae_upcast``): ``names`` (``--components``), or every component but the fp16 VAE decoder
    and encoder that no run would load (``upcast_parts``: minutes of TensorRT building, and fused
    graphs, for nothing; naming them still builds them). ``fp16``: the build would lower fp32 graphs
    to fp16 (TensorRT 10's fp16 flag, ONNX Runtime's conversion); then ``kept_fp32``'s VAE
    components are built fp32, as diffusers runs them."""
    specs = select_specs(manifest, names)
    if not vae_upcast(engine_dir, manifest):
        return specs
    from dataclasses import replace

    from sdexport.console import console

    upcast = upcast_parts(engine_dir, manifest)
    if upcast:  # an fp16 export: its fp32 graphs build fp32 (always_fp32), and nothing is kept_fp32
        unused = [s.name for s in specs if s.name in upcast]
        if not unused or names:
            return specs
        listed = " and ".join(f"{n} ({upcast[n]} runs)" for n in unused)
        console.print(f"[yellow]note:[/] not building {listed}: the VAE's config sets force_upcast "
                      f"(--components {','.join(unused)} builds {'it' if len(unused) == 1 else 'them'} anyway)")
        return [s for s in specs if s.name not in unused]
    kept = [s.name for s in specs if s.name in kept_fp32(engine_dir, manifest)] if fp16 else []
    if not kept:
        return specs
    console.print(f"[yellow]note:[/] keeping {' and '.join(kept)} fp32: the VAE's config sets force_upcast (it "
                  "overflows fp16), as diffusers' SDXL pipelines run it")
    return [replace(s, always_fp32=True) if s.name in kept else s for s in specs]

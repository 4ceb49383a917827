"""Real SD architectures (random weights): minutes on 2 cores (SDXL: about 15) and up to 15 GiB of memory, so marked slow.

Run with ``python3 -m pytest -m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdexport.export.exporter import ExportOptions, export
from sdexport.export.graph import PROTOBUF_LIMIT
from sdexport.manifest import load_manifest
from sdexport.shapes import ShapeProfile

pytestmark = pytest.mark.slow


def test_sd15_fp32_unet_over_2gb_uses_one_external_data_file(tmp_path: Path):
    out = tmp_path / "sd15"
    profile = ShapeProfile(batch=(1, 1, 1), height=(256, 256, 256), width=(256, 256, 256))
    manifest = export("sd15", out, ExportOptions(profile=profile, components=["unet"], verify="quick"))
    data = out / "unet" / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > PROTOBUF_LIMIT
    assert (out / "unet" / "model.onnx").stat().st_size < 50 * 1024**2
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "model.onnx", "model.onnx.data"]
    assert "unet/model.onnx.data" in manifest.files
    assert data.stat().st_mode & 0o777 == (out / "unet" / "model.onnx").stat().st_mode & 0o777
    parity = manifest.components["unet"].parity
    assert parity["status"] == "passed"
    assert [p["status"] for p in parity["points"]] == ["passed", "skipped", "skipped"]
    assert load_manifest(out).random_weights


def test_sd15_unet_fuses_every_attention_for_onnxruntime_cuda(tmp_path: Path):
    """SD 1.5's U-Net has 16 transformer blocks: 16 self- and 16 cross-attentions, each one fused
    MultiHeadAttention, from an fp16 export widened back to fp32 (over 2 GB) within 24 GB."""
    import onnx

    from sdexport.build.onnxruntime_build import TARGET, build_onnxruntime

    out = tmp_path / "sd15"
    profile = ShapeProfile(batch=(1, 1, 1), height=(256, 256, 256), width=(256, 256, 256))
    export("sd15", out, ExportOptions(profile=profile, components=["unet"], dtype="fp16", verify="none"))
    (result,) = build_onnxruntime(out, components=["unet"])
    assert result.status == "built"
    assert result.fusions["MultiHeadAttention"] == 32
    portable = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    assert result.fusions["NhwcConv"] == sum(n.op_type == "Conv" for n in portable.graph.node)
    record = load_manifest(out).components["unet"].optimized[TARGET]
    assert record["parity"]["status"] in ("passed", "passed-cpu-variant")


def test_sdxl_exports_fp16_valid_and_verified_on_this_machine(tmp_path: Path):
    """The real SDXL architecture (2.6B U-Net): every graph valid and verified at the min point.
    About 20 minutes on 2 cores; its peak memory is measured by benchmarks/export_memory.py, not here."""
    import onnx

    out = tmp_path / "sdxl"
    manifest = export("sdxl", out, ExportOptions(dtype="fp16", verify="quick"))
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder",
                                        "vae_decoder_fp32", "vae_encoder_fp32"}
    for name, entry in manifest.components.items():
        assert entry.parity["status"] == "passed", name
        assert entry.parity["points"][0]["status"] == "passed", name
        onnx.checker.check_model(str(out / entry.onnx), full_check=True)
    assert (out / "unet" / "model.onnx.data").stat().st_size > 4 * 1024**3  # 2.6B weights in fp16
    stages = {s["stage"] for s in manifest.tools["export_memory"]["stages"]}
    assert {f"{name}/{stage}" for name in manifest.components for stage in ("trace", "save", "verify")} <= stages

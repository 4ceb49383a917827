"""Real SD architectures (random weights): minutes on 2 cores and ~12 GB of memory, so marked slow.

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
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert "unet/model.onnx.data" in manifest.files
    assert data.stat().st_mode & 0o777 == (out / "unet" / "model.onnx").stat().st_mode & 0o777
    parity = manifest.components["unet"].parity
    assert parity["status"] == "passed"
    assert [p["status"] for p in parity["points"]] == ["passed", "skipped", "skipped"]
    assert load_manifest(out).random_weights

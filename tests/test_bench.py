"""The benchmark harness produces complete, valid output; it never judges how fast anything is."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from sdexport.bench.scenario import load_scenario
from sdexport.errors import SdexportError

SMOKE = """
model = "tiny"
height = 64
width = 64
scheduler = "euler"
steps = [3]
batch = [1, 2]
warmup = 1
repeats = 2
contenders = ["onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"]
"""


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    scenario = root / "smoke.toml"
    scenario.write_text(SMOKE)
    out = root / "out"
    code = run_cli("bench", scenario, "-o", out)
    return code, out


def test_bench_writes_json_markdown_and_png(bench_run):
    code, out = bench_run
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["random_weights"] is True and report["baseline"] == "diffusers"
    env = report["environment"]
    assert env["versions"]["torch"] and env["versions"]["onnxruntime"] and env["date"]
    measured = [r for r in report["results"] if r["status"] == "measured"]
    assert {(r["contender"], r["case"]["batch"]) for r in measured} == {
        (c, b) for c in ("diffusers", "onnxruntime-cpu") for b in (1, 2)}
    for r in measured:
        for stage in ("e2e_s", "text_encoder_s", "unet_step_s", "vae_decoder_s"):
            assert _finite_positive(r[stage]["median"]) and r[stage]["min"] <= r[stage]["median"] <= r[stage]["max"]
        assert r["e2e_s"]["n"] == 2 and r["unet_calls"] == 3
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["it_per_s"])
        assert _finite_positive(r["memory"]["host_rss_peak_mb"])
        assert _finite_positive(r["first_call_s"])
        if r["contender"] != "diffusers":
            assert r["agreement"]["latents_rel_l2"] < 1e-4 and r["agreement"]["psnr_db"] > 60
            assert _finite_positive(r["speedup_vs_baseline"])
    assert _finite_positive(report["one_time"]["export"]["export_s"])
    markdown = (out / "results.md").read_text()
    assert "Random weights" in markdown and "| onnxruntime-cpu |" in markdown and "baseline" in markdown
    with Image.open(out / "results.png") as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_unavailable_backends_are_named_with_what_to_install(bench_run):
    _, out = bench_run
    report = json.loads((out / "results.json").read_text())
    reasons = {r["contender"]: r["reason"] for r in report["results"] if r["status"] == "unavailable"}
    assert set(reasons) == {"onnxruntime-cuda", "tensorrt"}
    assert "onnxruntime-gpu" in reasons["onnxruntime-cuda"] and "pip" in reasons["onnxruntime-cuda"]
    assert "tensorrt" in reasons["tensorrt"].lower() and "pip install" in reasons["tensorrt"]
    assert "## Not measured" in (out / "results.md").read_text()


def test_shipped_scenarios_parse():
    for path in Path("benchmarks/scenarios").glob("*.toml"):
        scenario = load_scenario(path)
        assert scenario.cases and scenario.contenders[0] == "diffusers", path


@pytest.mark.parametrize("text, message", [
    ('model = "tiny"\ncontenders = ["openvino"]', "unknown contender(s) openvino"),
    ('model = "tiny"\nspeed = 3', "unknown key(s) speed"),
    ('height = 64', "needs a model"),
    ('model = "tiny"\nrepeats = 0', "repeats >= 1"),
])
def test_bad_scenarios_are_refused(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SdexportError, match=re.escape(message)):
        load_scenario(path)


def test_a_failing_case_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from sdexport.bench import harness
    from sdexport.errors import ProfileError

    real = harness._measure

    def failing_for_batch_2(contender, scenario, case, *args):
        if contender.name == "onnxruntime-cpu" and case.batch == 2:
            raise ProfileError("batch 2 is outside the engines' profile")
        return real(contender, scenario, case, *args)

    monkeypatch.setattr(harness, "_measure", failing_for_batch_2)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cuda", "tensorrt"', '"torch"').replace("repeats = 2", "repeats = 1"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--warmup", "0") == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    failed = [r for r in report["results"] if r["status"] == "failed"]
    assert [(r["contender"], r["case"]["batch"]) for r in failed] == [("onnxruntime-cpu", 2)]
    assert len([r for r in report["results"] if r["status"] == "measured"]) == 5
    assert report["scenario"]["warmup"] == 0 and report["scenario"]["repeats"] == 1
    assert "onnxruntime-cpu (batch 2, 3 steps): batch 2 is outside" in (tmp_path / "out" / "results.md").read_text()

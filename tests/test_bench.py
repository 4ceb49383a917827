"""The benchmark harness produces complete, valid output; it never judges how fast anything is."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cpu_only, drop_a_signal, hidden_siblings, run_cli, synthetic_bench_report
from sdexport.bench.report import stage_mean
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


# These test the harness on the CPU; on a GPU host they must still mean that.
pytestmark = pytest.mark.usefixtures("without_gpu")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    scenario = root / "smoke.toml"
    scenario.write_text(SMOKE)
    out = root / "out"
    err = io.StringIO()
    with cpu_only(), contextlib.redirect_stderr(err):
        code = run_cli("bench", scenario, "-o", out)
    _BENCH_STDERR[out] = err.getvalue()  # beside the output folder it would be an unexpected file
    return code, out


_BENCH_STDERR: dict[Path, str] = {}


def test_bench_writes_json_markdown_and_png(bench_run):
    code, out = bench_run
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["random_weights"] is True and report["baseline"] == "diffusers"
    manifest = json.loads((out / "engines" / "smoke" / "manifest.json").read_text())  # what bench compare holds equal
    assert report["engines"] == {"dtype": manifest["dtype"], "profile": manifest["profile"]}
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
        assert math.isclose(r["it_per_s"], 1 / stage_mean(r["unet_step_s"]))  # the U-Net column as a rate
        # the stage columns' means, in the JSON too (it had only medians, up to half again apart)
        assert all(math.isclose(r[s]["mean"], stage_mean(r[s])) for s in ("text_encoder_s", "unet_step_s", "vae_decoder_s"))
        assert _finite_positive(r["memory"]["host_rss_peak_mb"])
        assert _finite_positive(r["first_call_s"])
        assert r["stage_clock"] == "host clock"  # on a GPU: "cuda events"
        assert r["stage_runs"] == 2  # min(repeats, 3), apart from the timed runs
        if r["contender"] != "diffusers":
            assert r["agreement"]["latents_rel_l2"] < 1e-4 and r["agreement"]["psnr_db"] > 60
            base = next(b for b in measured if b["contender"] == "diffusers" and b["case"] == r["case"])
            assert math.isclose(r["speedup_vs_baseline"], base["e2e_s"]["median"] / r["e2e_s"]["median"])
    assert _finite_positive(report["one_time"]["export"]["export_s"])
    markdown = (out / "results.md").read_text()
    assert markdown.lower().count("random weights") == 1 and "| onnxruntime-cpu |" in markdown and "baseline" in markdown
    assert "no stage marks" in markdown and "host clock" in markdown and "separate marked runs" in markdown
    with Image.open(out / "results.png") as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_progress_says_each_step_once_and_each_contender_without_a_terminal(bench_run):
    """Without a terminal (a CI log) the progress bar is off: a line per contender says how far it got.
    The model's weights are loaded once, by the export; the bench itself reads configs, and the
    diffusers baseline builds the weights when it loads."""
    code, out = bench_run
    err = _BENCH_STDERR[out]
    assert code == 0
    assert err.count("Loading tiny") == 1 and err.count("Reading tiny's configs") == 1
    assert "✓ diffusers: 2 of 2 case(s) measured" in err
    assert "✓ onnxruntime-cpu: 2 of 2 case(s) measured" in err
    report = json.loads((out / "results.json").read_text())
    medians = [f"batch {r['case']['batch']}, 3 steps {r['e2e_s']['median']:.3f} s" for r in report["results"]
               if r["contender"] == "diffusers" and r["status"] == "measured"]
    assert re.search(r"✓ diffusers: 2 of 2 case\(s\) measured \(\d+\.\d s\): " + re.escape("; ".join(medians)), err)
    assert "\x1b[" not in err


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
    ('model = "tiny"\nrepeats = 0', "repeats: 0 is less than the minimum of 1"),
    ('model = "tiny"\nwarmup = -1', "warmup: -1 is less than the minimum of 0"),
    ('model = "tiny"\nsteps = "ten"', "steps 'ten': need a whole number or a list of them (steps = 4 or steps = [1, 4])"),
    ('model = "tiny"\nbatch = 2.0', "batch 2.0: need a whole number or a list of them"),
    ('model = "tiny"\nsteps = true', "steps True: need a whole number"),
    ('model = "tiny"\nbatch = [1, 0]', "batch.1: 0 is less than the minimum of 1"),
    ('model = "tiny"\nsteps = [2, 3, 2]', "steps: [2, 3, 2] has non-unique elements"),
    ('model = "tiny"\nheight = 64.5', "height: 64.5 is not of type 'integer'"),
    ('model = "tiny"\nrepeats = 2.0', "repeats: 2.0 is not of type 'integer'"),  # not a float to range() later
    ('model = "tiny"\nsteps = [2.0]', "steps.0: 2.0 is not of type 'integer'"),
    ('model = "tiny"\nguidance = nan', "guidance nan: need a finite number"),
    ('model = "tiny"\nguidance = -1.0', "guidance: -1.0 is less than the minimum of 0"),
    ('model = "tiny"\nseed = -1', "seed: -1 is less than the minimum of 0"),
    ('model = "tiny"\nseed = 18446744073709551615\nbatch = [2]', "must stay below 2^64"),
    ('model = "tiny"\nscheduler = "heun9"', "unknown scheduler 'heun9'"),
    ('model = "tiny"\nname = "../../etc"', "name: '../../etc' does not match"),
    ('model = "tiny"\nbuild = { static = "yes" }', "build.static: 'yes' is not of type 'boolean'"),
    ('model = "tiny"\nexport = { verify = "always" }', "export.verify: 'always' is not one of"),
    ('model = 3', "model: 3 is not of type 'string'"),
    ('model = "tiny"\ncontenders = []', "contenders: []"),
    ('model = "tiny"\nstrength = 0', "strength: 0 is less than or equal to the minimum of 0"),
    ('model = "tiny"\ncontrolnets = ["tiny-controlnet"]\ncontrol_scale = 0', "control_scale 0: need a non-zero"),
    ('model = "tiny"\ncontrol_scale = nan', "control_scale nan: need a finite number"),
    ('model = "tiny"\ncontrol_scale = 2.0', "control_scale is a ControlNet setting: add controlnets"),
    ('model = "tiny"\nstrength = nan', "strength nan: need a finite number"),
    ('model = "tiny-sdxl"\nrefiner = "tiny-sdxl-refiner"\ndenoising_end = nan', "denoising_end nan: need a finite"),
    ('model = "tiny"\nseed = inf', "seed: inf is not of type 'integer'"),  # the type first
    ('model = "tiny"\nguess_mode = true', "guess_mode is a ControlNet setting: add controlnets"),
    ('model = "tiny"\ncontrolnets = ["tiny-controlnet"]\nguess_mode = 1', "guess_mode: 1 is not of type 'boolean'"),
    ('model = "tiny"\nadapter_scale = 0.5', "adapter_scale is a T2I-Adapter setting: add adapter"),
    ('model = "tiny"\nadapter = "tiny-adapter"\nadapter_scale = inf', "adapter_scale inf: need a finite number"),
    ('model = "tiny"\nadapter = "tiny-adapter"\ncontrolnets = ["tiny-controlnet"]', "adapter with controlnets"),
    ('model = "tiny"\nadapter = "tiny-adapter"\nstrength = 0.5', "adapter with an init image"),
    ('model = "tiny-sdxl"\ndenoising_end = 0.5', "denoising_end is the base model's share before the refiner's"),
    ('model = "tiny-sdxl"\nrefiner = "tiny-sdxl-refiner"\ndenoising_end = 1', ("denoising_end: 1 is greater than or "
     "equal to the maximum of 1")),
    ('model = "tiny-sdxl"\nrefiner = "tiny-sdxl-refiner"\ncontrolnets = ["tiny-sdxl-controlnet"]\nstrength = 0.5',
     "refiner with controlnets and strength: ControlNets on the base model of an ensemble run text to image only"),
    ('model = "tiny-sdxl"\nrefiner = ""', "refiner: '' should be non-empty|refiner: '' is too short"),
    ('model = "tiny"\nconfig = ""', "config: '' should be non-empty|config: '' is too short"),
    ('model = "tiny-sdxl"\nrefiner_config = "sdxl-refiner"', "refiner_config is a single-file refiner's architecture"),
])
def test_bad_scenarios_are_refused(tmp_path, text, message):
    """``|``: jsonschema's own words, which moved after 4.18 (the floor)."""
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SdexportError, match="|".join(map(re.escape, message.split("|")))):
        load_scenario(path)


def test_a_scenario_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors save UTF-8 with a byte order mark, which TOML's parser refuses as a character
    before the first key: the mark is not the user's text, so it is skipped (one in a value stays)."""
    path = tmp_path / "s.toml"
    path.write_bytes('\ufeffmodel = "tiny"\ndescription = "\ufeffa \u00e9"\n'.encode())
    scenario = load_scenario(path)
    assert scenario.model == "tiny" and scenario.description == "\ufeffa \u00e9"


def test_a_file_name_that_is_no_scenario_name_asks_for_a_name(tmp_path):
    """The name comes from the file unless the scenario sets one: the refusal says which."""
    path = tmp_path / "my scenario.toml"
    path.write_text('model = "tiny"\n')
    with pytest.raises(SdexportError, match=r"name 'my scenario' \(from the file name\) must be letters"):
        load_scenario(path)
    path.write_text('model = "tiny"\nname = "my scenario"\n')
    with pytest.raises(SdexportError, match="name: 'my scenario' does not match"):
        load_scenario(path)
    path.write_text('model = "tiny"\nname = "mine"\n')
    assert load_scenario(path).name == "mine"
    long = tmp_path / f"{'a' * 101}.toml"  # (it was told its letters were wrong)
    long.write_text('model = "tiny"\n')
    with pytest.raises(SdexportError, match=r"\(from the file name\) is longer than 100 characters; set name"):
        load_scenario(long)
    with pytest.raises(SdexportError, match=r"scenarios: a folder, not a scenario file"):
        load_scenario(Path("benchmarks/scenarios"))


def test_a_failing_case_is_recorded_and_the_others_still_run(tmp_path, tiny_engines, monkeypatch):
    from sdexport.bench import harness
    from sdexport.errors import ProfileError

    real = harness._measure

    def failing_for_batch_2(contender, scenario, case, *args, **kwargs):
        if contender.name == "onnxruntime-cpu" and case.batch == 2:
            raise ProfileError("batch 2 is outside the engines' profile")
        return real(contender, scenario, case, *args, **kwargs)

    monkeypatch.setattr(harness, "_measure", failing_for_batch_2)
    from sdexport.bench import contenders

    closed = []
    for cls in (contenders.BaselineContender, contenders.RuntimeContender):
        def close(self, real=cls.close):
            closed.append(self.name)
            real(self)

        monkeypatch.setattr(cls, "close", close)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cuda", "tensorrt"', '"torch"').replace("repeats = 2", "repeats = 1"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--warmup", "0", "--engine-dir", tiny_engines) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    failed = [r for r in report["results"] if r["status"] == "failed"]
    assert [(r["contender"], r["case"]["batch"]) for r in failed] == [("onnxruntime-cpu", 2)]
    assert len([r for r in report["results"] if r["status"] == "measured"]) == 5
    assert report["scenario"]["warmup"] == 0 and report["scenario"]["repeats"] == 1
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "onnxruntime-cpu (batch 2, 3 steps): batch 2 is outside" in markdown
    assert "**No warm-up run** (`--warmup 0`): each contender's first timed run is its first call" in markdown
    assert closed == ["diffusers", "onnxruntime-cpu", "torch"]  # each freed before the next loads


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats 0: need at least 1 timed run"),
    (["--warmup", "-1"], "--warmup -1: need 0 or more warm-up runs"),
    (["--contenders", "diffusers,openvino"], "--contenders: unknown openvino"),
    (["--contenders", ""], "--contenders '': expected comma-separated names, e.g. diffusers,torch"),
    (["--contenders", "diffusers,torch,torch"], "--contenders: torch named more than once"),
    (["--engine-dir", "nowhere"], "nowhere: no such engine directory"),
])
def test_bad_overrides_are_refused_and_write_nothing(tmp_path, capsys, args, message):
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE)
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, *args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [scenario]


def test_a_bench_with_nothing_measured_leaves_no_output_folder(tmp_path, capsys, tiny_engines):
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('["onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"]', '["tensorrt"]'))
    out = tmp_path / "results" / "out"
    assert run_cli("bench", scenario, "-o", out) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no contender could run" in err and "skipping tensorrt: " in err
    assert "not exporting: tensorrt cannot run here" in err and "Exporting" not in err  # no export for nobody
    assert not (tmp_path / "results").exists(), "the parent folder it created is removed too"
    assert run_cli("bench", scenario, "-o", out, "--engine-dir", tiny_engines) == 2  # nothing to export anyway
    err = " ".join(capsys.readouterr().err.split())
    assert "skipping tensorrt: " in err and "not exporting" not in err


def test_engines_no_contender_here_can_run_are_not_exported(tmp_path, capsys):
    """The baseline is measured; TensorRT, not installed, is listed with what to install; and the
    engines only it would have run are not exported (nor recorded)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"', '"diffusers", "tensorrt"')
                        .replace("batch = [1, 2]", "batch = [1]").replace("repeats = 2", "repeats = 1"))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--warmup", "0") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "not exporting: tensorrt cannot run here" in err and "Exporting" not in err
    report = json.loads((out / "results.json").read_text())
    assert [(r["contender"], r["status"]) for r in report["results"]] == [("diffusers", "measured"), ("tensorrt", "unavailable")]
    assert report["engine_dir"] is None and not (out / "engines").exists() and "engines" not in report


def test_a_crashing_bench_leaves_no_output_folder(tmp_path, monkeypatch, capsys):
    from sdexport.bench import harness

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(harness, "_measure", crash)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"', '"diffusers"'))
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert "RuntimeError: boom" in captured.out + captured.err  # the crash is shown, with its traceback
    assert "no contender could run" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_a_damaged_cache_entry_is_set_aside_whole_and_exported_anew(tiny_engines, tmp_path, monkeypatch, capsys):
    """A cache entry whose graph no longer matches its sha256 is moved aside (kept for a look, never
    deleted) and exported again; a sound one is taken as it is. (The CI gate's slowed run, -m slow,
    does this on real runs too.) The export is a stand-in copying the module's engines."""
    from sdexport.bench import harness
    from sdexport.bench.plan import Options, plan_bench

    scenario_path = tmp_path / "s.toml"
    scenario_path.write_text(SMOKE)
    scenario = load_scenario(scenario_path)
    plan = plan_bench(scenario, Options())
    exports: list[Path] = []

    def export_to(target: Path, *args) -> float:
        exports.append(target)
        shutil.copytree(tiny_engines, target)
        return 0.5

    monkeypatch.setattr(harness, "_export_to", export_to)
    entry = tmp_path / "cache" / "smoke-0123"
    entry.parent.mkdir()
    one_time: dict = {}
    assert harness._cached_export(scenario, plan, entry, one_time) == entry  # absent: made
    assert one_time["export"] == {"export_s": 0.5, "path": str(entry), "status": "cached now"}
    harness._cached_export(scenario, plan, entry, one_time)  # sound: taken
    assert one_time["export"] == {"status": "cached", "path": str(entry)} and exports == [entry]
    graph = entry / "unet" / "model.onnx"
    damaged = graph.read_bytes()[:-1]
    graph.write_bytes(damaged)
    capsys.readouterr()
    harness._cached_export(scenario, plan, entry, one_time)
    assert one_time["export"]["status"] == "cached now" and exports == [entry, entry]
    aside = [p for p in entry.parent.iterdir() if p.name.startswith(".smoke-0123.damaged-")]
    assert len(aside) == 1 and (aside[0] / "unet" / "model.onnx").read_bytes() == damaged
    said = " ".join(capsys.readouterr().err.split())
    assert f"engine cache: smoke-0123 is damaged ({entry}: unet/model.onnx does not match its sha256" in said
    assert f"moved to {aside[0].name}, exporting again" in said


def test_a_cached_export_made_from_a_checkpoint_elsewhere_reloads_the_copy_here(tmp_path):
    """Another runner shares the engine cache with its checkpoint at another path: the cache key is the
    checkpoint's content, and the Torch contender reloads the copy the scenario names, proven the same
    files by sha256, not the path the export read (gone here)."""
    from sdexport.errors import EngineDirError
    from sdexport.models import load_model
    from sdexport.models.source_files import relocated

    first, moved, cache = tmp_path / "runner-1" / "model", tmp_path / "runner-2" / "model", tmp_path / "cache"
    load_model("tiny").save_pretrained(first)
    for runner, model in (("runner-1", first), ("runner-2", moved)):
        if runner == "runner-2":
            moved.parent.mkdir()
            first.rename(moved)
        scenario = tmp_path / runner / "s.toml"
        scenario.write_text(SMOKE.replace('model = "tiny"', f"model = {json.dumps(str(model))}").replace(
            '"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"', '"torch"').replace("[1, 2]", "[1]"))
        assert run_cli("bench", scenario, "-o", tmp_path / runner / "out", "--engine-cache", cache) == 0
    report = json.loads((tmp_path / "runner-2" / "out" / "results.json").read_text())
    assert report["one_time"]["export"]["status"] == "cached"
    assert [r["status"] for r in report["results"]] == ["measured"]
    # other weights than the export's are refused, in one line
    entry = Path(report["one_time"]["export"]["path"])
    recorded = json.loads((entry / "manifest.json").read_text())["model"]["source"]
    load_model("tiny", seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(EngineDirError, match="other.* is not the checkpoint the engines were exported from"):
        relocated(recorded, load_model(str(tmp_path / "other"), lazy=True).source, ["text_encoder", "unet", "vae"])


def test_given_engines_must_come_from_the_scenarios_model_and_set_its_precision(tmp_path, tiny_engines, capsys):
    """--engine-dir made from another model, or in another precision than the scenario names, is
    refused before anything loads (the report would name the scenario's model and precision); a
    checkpoint copied elsewhere is the same model by its files' sha256."""
    from sdexport.models import load_model

    scenario = tmp_path / "s.toml"
    for change, message in (('model = "tiny-v"', "was exported from preset tiny, not from the scenario's model tiny-v"),
                            ('model = "tiny"\ndtype = "fp16"', "is an fp32 export, and the scenario's dtype is fp16")):
        scenario.write_text(SMOKE.replace('model = "tiny"', change))
        assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", tiny_engines) == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and len(err.strip().splitlines()) == 1, err
    checkpoint, moved, other = tmp_path / "model", tmp_path / "moved", tmp_path / "other"
    load_model("tiny").save_pretrained(checkpoint)
    load_model("tiny", seed=3).save_pretrained(other)
    engines = tmp_path / "engines"
    assert run_cli("export", checkpoint, "-o", engines, "--batch", "1:1:2", "--height", "64", "--width", "64",
                   "--verify", "none", "-q") == 0
    checkpoint.rename(moved)  # the Torch contender reloads the copy the scenario names, proven the same
    for model, code in ((moved, 0), (other, 2)):
        scenario.write_text(SMOKE.replace('model = "tiny"', f"model = {json.dumps(str(model))}").replace(
            '"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"', '"torch"').replace("[1, 2]", "[1]"))
        assert run_cli("bench", scenario, "-o", tmp_path / f"out-{model.name}", "--engine-dir", engines,
                       "--repeats", "1", "--warmup", "0") == code
    assert f"was exported from {checkpoint}, not from the scenario's model {other}" in " ".join(capsys.readouterr().err.split())
    report = json.loads((tmp_path / "out-moved" / "results.json").read_text())
    assert [r["status"] for r in report["results"]] == ["measured"]
    # an ONNX export adopted without --model records no checkpoint: taken on trust, and the report
    # says so (it named the scenario's model as the engines' with nothing to show for it)
    adopted = tmp_path / "adopted"
    shutil.copytree(tiny_engines, adopted)
    (adopted / "manifest.json").unlink()
    assert run_cli("adopt", adopted, "-q") == 0
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                                      '"onnxruntime-cpu"').replace("[1, 2]", "[1]"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out-adopted", "--engine-dir", adopted, "--repeats", "1",
                   "--warmup", "0") == 0
    said = " ".join((tmp_path / "out-adopted" / "results.md").read_text().split())
    assert ("**Engines taken on trust**: the directory given as --engine-dir does not record the checkpoint they were "
            "made from (an ONNX export adopted without --model), or its ControlNets' or adapters' files, so nothing proves they are this model's") in said
    assert json.loads((tmp_path / "out-adopted" / "results.json").read_text())["engines_on_trust"] == ["--engine-dir"]
    assert "engines_on_trust" not in report


def test_a_contender_that_crashes_costs_only_its_own_figures(tmp_path, tiny_engines, monkeypatch):
    """A bug in one contender (on a rented GPU, say) is recorded with its reason; the others are measured."""
    from sdexport.bench import harness

    real_load = harness._load

    def load(name, *args, **kwargs):
        if name == "onnxruntime-cpu":
            raise RuntimeError("CUDA error: an illegal memory access\nmore detail")
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(harness, "_load", load)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                                      '"diffusers", "onnxruntime-cpu", "torch"'))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", tiny_engines) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    by_name = {r["contender"]: r for r in report["results"]}
    assert by_name["onnxruntime-cpu"]["status"] == "failed"
    assert by_name["onnxruntime-cpu"]["reason"] == "loading: RuntimeError: CUDA error: an illegal memory access"
    assert by_name["torch"]["status"] == "measured" and by_name["diffusers"]["status"] == "measured"
    assert by_name["torch"]["gpu_busy"] is None  # no GPU here: not profiled
    assert "onnxruntime-cpu: loading: RuntimeError" in (tmp_path / "out" / "results.md").read_text()


def test_bench_replaces_its_own_output_and_refuses_a_users_folder(bench_run, tmp_path, capsys):
    _, previous = bench_run
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"', '"diffusers"'))
    assert run_cli("bench", scenario, "-o", user) == 2
    assert "not an sdexport benchmark output" in capsys.readouterr().err
    assert (user / "notes.txt").read_text() == "keep me"
    from sdexport.bench.report import not_a_bench_output

    assert not_a_bench_output(previous) is None  # the fixture's output is one sdexport may replace
    # the table annotated by hand, or the chart replaced: no longer provably ours (a copy is judged)
    written = json.loads((previous / "results.json").read_text())["written"]
    assert sorted(written) == ["results.json", "results.md", "results.png"]
    for name, change in (("results.md", "\nMeasured on the lab's box.\n"), ("results.png", "x")):
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(previous, copy)
        with (copy / name).open("a", encoding="latin-1") as file:
            file.write(change)
        assert not_a_bench_output(copy) == f"its {name} was changed since sdexport wrote it (edited by hand?)"
    # the report itself given a note (as an audit did): refused; indented otherwise, the same report
    copy = tmp_path / "copy-json"
    shutil.copytree(previous, copy)
    data = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps(data))
    assert not_a_bench_output(copy) is None
    (copy / "results.json").write_text(json.dumps({**data, "note": "the lab's box, fans at full speed"}))
    assert not_a_bench_output(copy) == "its results.json was changed since sdexport wrote it (edited by hand?)"


def test_a_lock_a_killed_build_left_in_the_outputs_engines_does_not_make_it_foreign(bench_run, tmp_path):
    """A build of the engines a run exported (bench's own, or `sdexport build OUT/engines/NAME`) takes
    its lock beside them, in engines/; killed (a CI timeout), it left ``.NAME.sdexport-lock`` there,
    and every later bench into that output was refused as not sdexport's ("not a directory"; a
    review's repro). Such a file is sdexport's; one a live build holds, or one of other content or
    type, still makes the output another's."""
    import fcntl
    import os

    from sdexport.bench.report import BENCH_OUTPUT, not_a_bench_output
    from sdexport.output_dir import check_target

    _, previous = bench_run
    copy = tmp_path / "out"
    shutil.copytree(previous, copy)
    lock = copy / "engines" / ".smoke.sdexport-lock"
    lock.write_text("sdexport pid 4194304999\n")  # as _locked writes it; no such process
    assert not_a_bench_output(copy) is None
    check_target(copy, BENCH_OUTPUT, replace=True)
    lock.write_text("")  # (killed before it wrote its pid)
    assert not_a_bench_output(copy) is None
    with lock.open("r+") as held:  # (sdexport's folder still: to be waited for, not moved away)
        held.write(f"sdexport pid {os.getpid()}\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SdexportError, match=rf"^another sdexport process \(pid {os.getpid()}\) is writing "
                                                rf"{re.escape(str(copy / 'engines' / 'smoke'))}; wait for it to finish"):
            check_target(copy, BENCH_OUTPUT, replace=True)
    lock.write_text("my notes\n")
    assert not_a_bench_output(copy) == "engines/.smoke.sdexport-lock: not a directory"
    lock.unlink()
    os.mkfifo(lock)  # judged by its type, never opened to wait for a writer
    assert not_a_bench_output(copy) == "engines/.smoke.sdexport-lock: not a directory"


def test_a_damaged_export_in_the_output_is_exported_again_not_reused(bench_run, tmp_path, monkeypatch):
    """An audit's finding: a graph damaged under a bench output's engines/ was reused by every rerun
    into it, whose contender then failed ("re-export or rebuild it") and the run passed; nothing in
    bench could export it again. The reused export is hashed (trusted while unchanged)."""
    from sdexport.bench import harness
    from sdexport.bench.plan import Options, plan_bench
    from sdexport.bench.scenario import load_scenario

    _, out = bench_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    scenario = load_scenario(out.parent / "smoke.toml")
    plan = plan_bench(scenario, Options())
    exported: list[Path] = []
    monkeypatch.setattr(harness, "_export_to", lambda target, *a: exported.append(target) or 1.0)
    one_time: dict = {}
    assert harness._export(scenario, plan, copy, tmp_path / "staging", one_time) == copy / "engines" / "smoke"
    assert one_time["export"]["status"] == "reused" and not exported
    data = json.loads((copy / "engines" / "smoke" / "manifest.json").read_text())  # a plan listed, not yet written:
    data["files"]["unet/other.plan"] = "0" * 64  # (a build stopped halfway; its builder rebuilds it)
    (copy / "engines" / "smoke" / "manifest.json").write_text(json.dumps(data))
    assert harness._export(scenario, plan, copy, tmp_path / "staging", one_time) == copy / "engines" / "smoke"
    graph = copy / "engines" / "smoke" / "unet" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    assert harness._export(scenario, plan, copy, tmp_path / "staging", one_time) == tmp_path / "staging" / "engines" / "smoke"
    assert exported and "status" not in one_time["export"]


def test_a_second_run_into_the_same_output_reuses_its_engines(bench_run):
    """Runs last in this module: it replaces the shared output (with the same engines)."""
    _, out = bench_run
    engines = out / "engines" / "smoke"
    before = (engines / "manifest.json").read_text()
    scenario = out.parent / "smoke.toml"
    assert run_cli("bench", scenario, "-o", out, "--contenders", "onnxruntime-cpu", "--repeats", "1",
                   "--warmup", "0") == 0
    report = json.loads((out / "results.json").read_text())
    assert report["one_time"]["export"]["status"] == "reused"
    assert report["engine_dir"] == str(engines) and (engines / "manifest.json").read_text() == before
    assert [r["contender"] for r in report["results"]] == ["onnxruntime-cpu"] * 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "smoke.toml"]  # no staging left


@pytest.mark.parametrize("old, new, message", [
    ("steps = [3]", "steps = [5000]", "the model was trained on 1000 timesteps"),
    ("steps = [3]", "steps = [999]\nscheduler = 'dpmpp_2m'", "outside the model's 1000 training timesteps"),
    ("height = 64", "height = 72", "height min 72 is not a multiple of 16"),
    ("batch = [1, 2]", "batch = [100000]", "beyond the 2^31 elements"),
    ("batch = [1, 2]", 'batch = [1]\nexport = { batch = "4:1:2" }', "export.batch '4:1:2': need 0 < min <= opt <= max"),
    ("batch = [1, 2]", 'batch = [1]\ncontrolnets = ["nowhere"]', ("controlnets: nowhere: no such directory, and not a "
                                                                  "ControlNet preset")),
    ("batch = [1, 2]", 'batch = [1]\nadapter = ["tiny-adapter", "nowhere"]', "adapter: nowhere: no such directory"),
    ("batch = [1, 2]", 'batch = [4]\nexport = { batch = "1:1:2" }', ("batch 4 is outside the engines' profile: batch "
                                                                    "must be in [1, 2] (widen export.batch)")),
    ("batch = [1, 2]", 'batch = [1]\nexport = { batch = "1:1:100000" }', "lower the max of export.batch, export.height"),
])
def test_requests_a_scenario_cannot_make_are_refused_before_loading(tmp_path, capsys, old, new, message):
    """Named after the scenario file, in its own keys (``controlnets``, not export's ``--controlnet``)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace(old, new).replace('scheduler = "euler"\n', "" if "scheduler" in new else 'scheduler = "euler"\n'))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Loading" not in err and "Traceback" not in err
    assert err.startswith(f"error: {scenario}: ") and "--" not in err
    assert not out.exists()


def test_step_counts_are_checked_on_the_config_as_the_runtime_will_sample_it(tiny_diffusers_dir, tmp_path, capsys):
    """An outdated config (no steps_offset) samples with steps_offset 1, as diffusers' SD pipeline
    rewrites it: 1000 PNDM steps then reach timestep 1000. The raw config passed the plan's check,
    and the runtime contenders were refused after the export."""
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "skip_prk_steps": True}))
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('model = "tiny"', f'model = "{model}"').replace("steps = [3]", "steps = [1000]")
                        .replace('scheduler = "euler"', 'scheduler = "default"'))
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "reaches timestep 1000 at 1000 steps, outside the model's 1000 training timesteps" in err and "Loading" not in err


def test_engines_of_the_output_itself_can_be_named_with_engine_dir(bench_run):
    """--engine-dir OUT/engines/NAME -o OUT: the engines are read in place and carried into the new
    output (by hard links), not refused as "read by this command"."""
    _, out = bench_run
    engines = out / "engines" / "smoke"
    scenario = out.parent / "smoke.toml"
    assert run_cli("bench", scenario, "-o", out, "--engine-dir", engines, "--contenders", "onnxruntime-cpu",
                   "--repeats", "1", "--warmup", "0") == 0
    assert (engines / "manifest.json").is_file() and json.loads((out / "results.json").read_text())["engine_dir"] == str(engines)


def test_cuda_graphs_are_captured_while_loading_not_in_timed_runs(tmp_path):
    """With CUDA graphs, the TensorRT contender runs each case once as part of its load."""
    from sdexport.bench import harness
    from sdexport.errors import ProfileError

    path = tmp_path / "s.toml"
    path.write_text(SMOKE + "\n[build]\ncuda_graph = true\n")
    scenario = load_scenario(path)
    calls = []

    def contender(request):
        calls.append(request.batch)
        if request.batch == 2:
            raise ProfileError("outside a static engine: reported by the measurement instead")

    harness._capture_graphs(contender, scenario)
    assert calls == [1, 2]


@pytest.mark.slow  # an init image and strength in the bench by default: the inpainting scenario
def test_an_img2img_scenario_runs_every_contender_from_the_same_image(tmp_path):
    """strength: the baseline is diffusers' img2img pipeline; the engines export the VAE encoder."""
    scenario = tmp_path / "img2img.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                                      '"diffusers", "onnxruntime-cpu"').replace("steps = [3]", "steps = [4]")
                        + "strength = 0.5\n")
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["scenario"]["strength"] == 0.5
    measured = [r for r in report["results"] if r["contender"] == "onnxruntime-cpu"]
    assert measured and all(r["unet_calls"] == 2 for r in measured)  # int(4 x 0.5) steps
    assert all(r["agreement"]["latents_rel_l2"] < 1e-4 for r in measured)
    assert "img2img from a synthetic image at strength 0.5" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize(("model", "strength", "calls", "words"), [
    ("tiny-sdxl-inpaint", None, 3, ("at strength 0.9999 (diffusers' default for SDXL inpainting; "
                                    "int(steps x strength) denoising steps), ")),  # one parenthesis
    # a standard U-Net blends (its blending is checked against diffusers in test_image_tasks)
    pytest.param("tiny", 0.5, 2, "at strength 0.5 (int(steps x strength) denoising steps), ", marks=pytest.mark.slow),
])
def test_an_inpainting_scenario_repaints_the_same_middle_for_every_contender(tmp_path, model, strength, calls, words):
    """inpaint = true: the baseline is diffusers' inpaint pipeline; the engines export the VAE encoder."""
    from sdexport.bench.plan import mask_image

    scenario = tmp_path / "inpaint.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                                      '"diffusers", "onnxruntime-cpu"').replace("steps = [3]", "steps = [4]")
                        .replace('model = "tiny"', f'model = "{model}"') + "inpaint = true\n"
                        + (f"strength = {strength}\n" if strength is not None else ""))
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["scenario"]["inpaint"] is True
    measured = [r for r in report["results"] if r["contender"] == "onnxruntime-cpu"]
    assert measured and all(r["unet_calls"] == calls for r in measured)  # int(4 x strength) steps
    assert all(r["agreement"]["latents_rel_l2"] < 1e-4 for r in measured)
    assert f"inpainting the middle of a synthetic image {words}" in (tmp_path / "out" / "results.md").read_text()
    mask = np.asarray(mask_image(load_scenario(scenario)))
    assert mask.shape == (64, 64) and mask[16:48, 16:48].all() and mask.sum() == 32 * 32 * 255


def test_a_rerun_for_another_model_exports_again(tmp_path):
    """An output's engines are reused only for the export they were made for (the engine cache's key,
    recorded in results.json): not for another model under the same scenario name (a review found
    a standard U-Net's engines timed against an inpainting baseline)."""
    scenario, out = tmp_path / "r.toml", tmp_path / "out"
    one = 'name = "r"\nheight = 64\nwidth = 64\nsteps = [2]\nwarmup = 0\nrepeats = 1\n'
    scenario.write_text(one + 'model = "tiny"\ncontenders = ["onnxruntime-cpu"]\n')
    assert run_cli("bench", scenario, "-o", out) == 0
    key = json.loads((out / "results.json").read_text())["one_time"]["export"]["key"]
    scenario.write_text(one + 'model = "tiny-inpaint"\ninpaint = true\ncontenders = ["diffusers", "onnxruntime-cpu"]\n')
    for status in (None, "reused"):  # exported again, then reused by the same scenario
        assert run_cli("bench", scenario, "-o", out) == 0
        report = json.loads((out / "results.json").read_text())
        assert report["one_time"]["export"].get("status") == status and report["one_time"]["export"]["key"] != key
        runtime = next(r for r in report["results"] if r["contender"] == "onnxruntime-cpu")
        assert runtime["agreement"]["latents_rel_l2"] < 1e-4


def test_the_setup_line_says_each_input_the_slow_scenarios_give():
    """The words of the bench scenarios that run with -m slow (img2img, a standard U-Net's blended
    inpainting, a union ControlNet's mode, two adapters, the slowing hook), on a synthetic report."""
    from sdexport.bench.report import markdown

    report = synthetic_bench_report([], None, family="sd")

    def said(**scenario) -> str:
        return markdown({**report, "scenario": {**report["scenario"], **scenario}})

    assert "img2img from a synthetic image at strength 0.5 (int(steps x strength) denoising steps), " in said(strength=0.5)
    assert ("inpainting the middle of a synthetic image at strength 0.5 (int(steps x strength) denoising steps), "
            in said(inpaint=True, strength=0.5))
    assert ("1 ControlNet(s) (tiny-union) on a synthetic edge map at scale 1.0 as control mode(s) 3, "
            in said(controlnets=["tiny-union"], control_mode=[3]))
    assert ("T2I-Adapter tiny-adapter + tiny-adapter on a synthetic edge map at scale 0.6, "
            in said(adapter=["tiny-adapter", "tiny-adapter"], adapter_scale=0.6))
    assert ("**Slowed on purpose**: test hook SDEXPORT_TEST_SLOW_UNET slept before every U-Net call (torch +250 ms)"
            in markdown({**report, "test_hooks": {"SDEXPORT_TEST_SLOW_UNET": {"torch": 0.25}}}))


def test_the_slow_scenarios_inputs_reach_the_request_and_the_export(tmp_path, monkeypatch):
    """What the bench gives a union ControlNet (its modes) and two adapters (an edge map each) in
    the request, and a single file's config and every adapter in the export: the -m slow
    scenarios' plumbing, with the export a stand-in."""
    from sdexport.bench import harness
    from sdexport.bench.plan import request_for
    from sdexport.bench.scenario import Case, Scenario
    from sdexport.export import exporter
    from sdexport.shapes import ShapeProfile

    union = request_for(Scenario(name="s", model="tiny-sdxl", controlnets=["tiny-union"], control_mode=[3]), Case(2, 3))
    assert union.control_mode == [3] and len(union.control_image) == 1
    two = request_for(Scenario(name="s", model="tiny", adapter=["tiny-adapter", "tiny-adapter"], adapter_scale=0.6),
                      Case(2, 3))
    [(first, second)] = two.adapter_image
    assert not np.array_equal(np.asarray(first), np.asarray(second)) and two.adapter_scale == 0.6

    seen = []
    monkeypatch.setattr(exporter, "export", lambda model, target, options: seen.append((model, options)))
    harness._export_to(tmp_path / "e", Scenario(name="s", model="/m.safetensors", config="tiny"), "sd", "fp32",
                       ShapeProfile())
    harness._export_to(tmp_path / "e", Scenario(name="s", model="tiny", adapter=["tiny-adapter", "tiny-adapter"]),
                       "sd", "fp32", ShapeProfile())
    assert seen[0][0] == "/m.safetensors" and seen[0][1].config == "tiny"
    assert seen[1][1].adapters == ["tiny-adapter", "tiny-adapter"] and "adapter_1" in seen[1][1].components


def test_an_img2img_scenario_that_runs_no_step_is_refused_before_loading(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text('model = "tiny"\nstrength = 0.1\nsteps = [3]\nheight = 64\nwidth = 64\n')
    assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
    assert "runs no step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- SDXL's ensemble of experts: a base model and its refiner as one contender ------------------------

ENSEMBLE = """
name = "ensemble"
model = "tiny-sdxl"
refiner = "tiny-sdxl-refiner"
height = 64
width = 64
steps = [5]
batch = [2]
warmup = 0
repeats = 1
contenders = ["diffusers", "onnxruntime-cpu"]
"""


def test_a_refiner_scenario_times_both_models_for_every_contender(tmp_path, capsys):
    """``refiner``: every contender runs the base model to ``denoising_end`` and the refiner from its
    latents; the baseline is diffusers' two pipelines, which the runtime's pair matches. Both are
    exported into the output (the refiner without a VAE encoder) and reused by the next run. The
    report records the cut as run (the default here), so an explicit 0.8 compares as the same."""
    from sdexport.manifest import load_manifest

    scenario, out = tmp_path / "ensemble.toml", tmp_path / "out"
    scenario.write_text(ENSEMBLE)
    assert run_cli("bench", scenario, "-o", out) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["refiner"]["denoising_end"] == report["scenario"]["denoising_end"] == 0.8
    assert "tiny-sdxl-refiner" in report["refiner"]["model"]
    assert report["refiner"]["engine_dir"] == str(out / "engines" / "ensemble-refiner")
    assert report["scenario"]["refiner"] == "tiny-sdxl-refiner" and report["random_weights"]
    measured = {r["contender"]: r for r in report["results"]}
    assert [r["status"] for r in measured.values()] == ["measured", "measured"]
    assert all(r["unet_calls"] == 5 for r in measured.values())  # the base model's 4 steps, the refiner's 1
    assert measured["onnxruntime-cpu"]["agreement"]["latents_rel_l2"] < 1e-4
    said = (out / "results.md").read_text()
    assert "- Refiner: preset tiny-sdxl-refiner" in said and "U-Net per step is the mean over both models'" in said
    refiner = load_manifest(out / "engines" / "ensemble-refiner", verify_files=False)
    assert refiner.family == "sdxl-refiner" and "vae_encoder" not in refiner.components
    keys = {what: report["one_time"][what]["key"] for what in ("export", "refiner_export")}
    assert run_cli("bench", scenario, "-o", out, "--contenders", "onnxruntime-cpu") == 0
    again = json.loads((out / "results.json").read_text())["one_time"]
    assert {what: (again[what]["status"], again[what]["key"]) for what in keys} == {
        what: ("reused", key) for what, key in keys.items()}
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["ensemble", "ensemble-refiner"]
    capsys.readouterr()
    assert run_cli("bench", "cache-key", scenario) == 0  # the engine cache's entries: one per export
    assert [name.rsplit("-", 1)[0] for name in capsys.readouterr().out.split()] == ["ensemble", "ensemble-refiner"]
    # engine directories given: read in place; the output's own are carried into the new one
    base, refiner = out / "engines" / "ensemble", out / "engines" / "ensemble-refiner"
    for target in (out, tmp_path / "elsewhere"):
        assert run_cli("bench", scenario, "-o", target, "--contenders", "onnxruntime-cpu", "--engine-dir", base,
                       "--refiner-engine-dir", refiner) == 0
        report = json.loads((target / "results.json").read_text())
        assert (report["engine_dir"], report["refiner"]["engine_dir"]) == (str(base), str(refiner))
        assert report["command_line"]["--refiner-engine-dir"] == str(refiner) and "export" not in report["one_time"]
    assert not (tmp_path / "elsewhere" / "engines").exists() and (refiner / "manifest.json").is_file()
    capsys.readouterr()
    assert run_cli("bench", scenario, "-o", tmp_path / "not", "--engine-dir", base, "--refiner-engine-dir", base) == 2
    assert f"--refiner-engine-dir {base}: not an SDXL refiner (SDXL)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow  # each half's image task is checked against diffusers apart (test_sdxl_refiner)
@pytest.mark.parametrize(("given", "calls", "words"), [
    ("strength = 0.8", 4, "img2img from a synthetic image at strength 0.8"),  # int(5 x 0.8) steps
    ("inpaint = true", 4, "inpainting the middle of a synthetic image at strength 0.9999"),  # int(5 x 0.9999)
], ids=["img2img", "inpaint"])
def test_a_refiner_scenario_from_an_init_image_matches_diffusers(tmp_path, given, calls, words):
    """With ``strength``, the base model starts from the synthetic image (diffusers' img2img
    pipeline with ``denoising_end``) and the refiner from its latents, as in text to image. With
    ``inpaint``, both take the mask (diffusers' inpaint pipelines); the refiner's export still has
    no VAE encoder."""
    from sdexport.manifest import load_manifest

    scenario, out = tmp_path / "ensemble.toml", tmp_path / "out"
    scenario.write_text(ENSEMBLE.replace("batch = [2]", "batch = [1]") + given + "\n")
    assert run_cli("bench", scenario, "-o", out) == 0
    report = json.loads((out / "results.json").read_text())
    runtime = next(r for r in report["results"] if r["contender"] == "onnxruntime-cpu")
    assert runtime["unet_calls"] == calls and runtime["agreement"]["latents_rel_l2"] < 1e-4
    assert words in (out / "results.md").read_text()
    refiner = load_manifest(out / "engines" / "ensemble-refiner", verify_files=False)
    assert "vae_encoder" not in refiner.components


@pytest.mark.slow  # the base model's half with each is checked against diffusers by default (test_controlnet, test_adapter)
@pytest.mark.parametrize(("given", "stage"), [('controlnets = ["tiny-controlnet"]\ncontrol_scale = 0.7', "controlnet_step_s"),
                                             ('adapter = "tiny-adapter"\nadapter_scale = 0.8', "adapter_s")],
                         ids=["controlnet", "adapter"])
def test_a_refiner_scenario_with_a_conditioned_base_model_matches_diffusers(tmp_path, given, stage):
    """A ControlNet or T2I-Adapter on the base model: diffusers' SDXL ControlNet or adapter pipeline
    with ``denoising_end``, then the refiner's from its latents; its time is reported apart, and
    the refiner's export has neither."""
    from sdexport.manifest import load_manifest

    scenario, out = tmp_path / "ensemble.toml", tmp_path / "out"
    scenario.write_text(ENSEMBLE.replace("batch = [2]", "batch = [1]") + given + "\n")
    assert run_cli("bench", scenario, "-o", out) == 0
    report = json.loads((out / "results.json").read_text())
    runtime = next(r for r in report["results"] if r["contender"] == "onnxruntime-cpu")
    assert runtime["unet_calls"] == 5 and runtime["agreement"]["latents_rel_l2"] < 1e-4
    assert all(r[stage]["median"] > 0 for r in report["results"])
    refiner = load_manifest(out / "engines" / "ensemble-refiner", verify_files=False)
    assert not refiner.controlnets and not refiner.adapters


def test_an_engine_cache_or_output_inside_the_models_folder_is_refused(tiny_diffusers_dir, tmp_path, capsys):
    """The export's key hashes every file of a model folder: a cache or an output inside it changed the
    key with each run, which exported again and grew the cache by an entry (an audit). A run that
    exports nothing (diffusers alone) has no key: its output may go there."""
    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers_dir, model)
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'model = "{model}"\nheight = 64\nwidth = 64\nsteps = [2]\n'
                        'contenders = ["diffusers", "onnxruntime-cpu"]\n')
    for option, inside in (("--engine-cache", model / "cache"), ("-o", model / "out")):
        extra = [option, inside] if option == "--engine-cache" else []
        assert run_cli("bench", scenario, "-o", inside if option == "-o" else tmp_path / "out", *extra) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: {option} {inside}: inside {model.resolve()}, whose every file the key" in err, err
        assert not inside.exists() and not (tmp_path / "out").exists()
    scenario.write_text(scenario.read_text().replace(', "onnxruntime-cpu"', ""))
    assert run_cli("bench", scenario, "-o", model / "out", "--repeats", "1", "--warmup", "0") == 0


@pytest.mark.slow  # the engine cache is per export; this shows a refiner scenario's second entry
def test_a_refiner_scenario_keeps_both_exports_in_the_engine_cache(tmp_path, capsys):
    """One cache entry per export, the names ``bench cache-key`` prints, one per line."""
    scenario, cache = tmp_path / "ensemble.toml", tmp_path / "cache"
    scenario.write_text(ENSEMBLE.replace('"diffusers", ', ""))
    assert run_cli("bench", "cache-key", scenario) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 2 and names[0].startswith("ensemble-") and names[1].startswith("ensemble-refiner-")
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-cache", cache) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [report["one_time"][w]["status"] for w in ("export", "refiner_export")] == ["cached now"] * 2
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == names
    assert report["refiner"]["engine_dir"] == str((cache / names[1]).resolve())


@pytest.mark.parametrize(("change", "flags", "message"), [
    ('model = "tiny"', [], "tiny: an SDXL base model hands its latents to the refiner, and this model is SD"),
    ('refiner = "tiny-sdxl"', [], "refiner tiny-sdxl: not an SDXL refiner (SDXL)"),
    ('refiner = "nowhere"', [], "refiner nowhere: no such file or directory, and not a preset"),
    ("steps = [2]\ndenoising_end = 0.3", [], ("the base model's share of the schedule (steps 2, cut at denoising_end "
     "0.3) holds no step; raise steps, or move denoising_end")),
    ('model = "tiny-sdxl-refiner"', [], ("tiny-sdxl-refiner: an SDXL base model hands its latents to the refiner, and "
     "this model is SDXL refiner")),
    ("", ["--engine-dir"], ("--engine-dir with refiner tiny-sdxl-refiner: give the refiner's engine directory too "
     "(--refiner-engine-dir), or neither")),
    ("", ["--refiner-engine-dir"], "give the base model's engine directory too (--engine-dir), or neither"),
    ("refiner = None", ["--refiner-engine-dir"], "the scenario has no refiner; drop it, or add refiner to the scenario"),
])
def test_a_refiner_scenario_that_cannot_run_is_refused_before_loading(tmp_path, capsys, change, flags, message):
    """A scenario's lines replaced by ``change`` (``= None``: left out), run with ``flags`` (each
    naming a folder that is not there: they are refused before it is read)."""
    keys = {line.split(" =")[0] for line in change.splitlines()}
    lines = [line for line in ENSEMBLE.splitlines() if line.split(" =")[0] not in keys]
    lines += [line for line in change.splitlines() if not line.endswith("= None")]
    scenario, out = tmp_path / "s.toml", tmp_path / "out"
    scenario.write_text("\n".join(lines) + "\n")
    assert run_cli("bench", scenario, "-o", out, *[a for flag in flags for a in (flag, tmp_path / "engines")]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {scenario}: ") == (not flags)  # what the file states, or an option
    assert not out.exists()


def test_the_ensemble_contender_hands_the_base_models_latents_to_the_refiner():
    """The two calls' requests (``runtime.ensemble.halves``), the stages summed (the base model's
    latents' copy to the host is not a decode), and both contenders closed though the first fails."""
    import torch

    from sdexport.bench.contenders import EnsembleContender, Output
    from sdexport.runtime.request import GenerationRequest
    from sdexport.runtime.txt2img import Timings

    class Fake:
        def __init__(self, name, timings, fail_close=False):
            self.name, self.timings, self.fail_close, self.calls, self.closed = name, timings, fail_close, [], False

        def __call__(self, request, *, stages=True):
            self.calls.append((request, stages))
            return Output(torch.full((1, 4, 8, 8), float(len(self.name))), np.zeros((0, 64, 64, 3)), self.timings)

        def close(self):
            self.closed = True
            if self.fail_close:
                raise RuntimeError("device gone")

    base = Fake("base", Timings(text_encoder=0.1, unet_steps=[0.2, 0.2], vae_decoder=0.05, total=0.6,
                                controlnet_steps=[0.05], adapter=0.03), fail_close=True)
    refiner = Fake("refiner-half", Timings(text_encoder=0.1, unet_steps=[0.3], vae_decoder=0.4, total=0.9))
    ensemble = EnsembleContender(base, refiner, 0.7)
    request = GenerationRequest(prompt=["a lighthouse"], prompt_2=["at dusk"], steps=3, seeds=[1], height=64, width=64,
                                aesthetic_score=7.0)
    result = ensemble(request, stages=False)
    (first, stages), = base.calls
    (second, _), = refiner.calls
    assert (first.denoising_end, first.aesthetic_score, first.prompt_2, stages) == (0.7, None, ["at dusk"], False)
    assert (second.denoising_start, second.aesthetic_score, second.prompt_2) == (0.7, 7.0, None)
    assert torch.equal(second.init_latents, torch.full((1, 4, 8, 8), 4.0)) and float(result.latents.mean()) == 12.0
    timings = result.timings
    assert (timings.text_encoder, timings.unet_steps, timings.vae_decoder) == (0.2, [0.2, 0.2, 0.3], 0.4)
    assert (timings.controlnet_steps, timings.adapter) == ([0.05], 0.03)  # the base model's, reported apart
    assert ensemble.name == "base"
    with pytest.raises(RuntimeError, match="device gone"):
        ensemble.close()
    assert base.closed and refiner.closed


def test_memory_is_sampled_in_a_run_of_its_own_and_vae_reruns_are_counted(monkeypatch):
    """The sampler's thread takes Python's lock every 5 ms, which slows eager PyTorch most: no timed
    run may have it. A run whose fp16 VAE ran again in fp32 holds a second decode: counted and said."""
    import torch

    from sdexport.bench import harness
    from sdexport.bench.contenders import Output
    from sdexport.bench.report import case_warnings
    from sdexport.bench.scenario import Case, Scenario
    from sdexport.runtime.txt2img import Timings

    sampling: list[bool] = [False]

    class Sampler:
        def __init__(self, floor=None, left_over=None, device=None):
            self.floor = floor

        def __enter__(self):
            sampling[0] = True
            return self

        def __exit__(self, *exc):
            sampling[0] = False

        def to_dict(self):
            return {"host_rss_peak_mb": 1.0, "device_floor_mb": self.floor}

    class Fake:
        name = "torch"
        calls: list[tuple[bool, bool]] = []

        def __call__(self, request, *, stages=True):
            self.calls.append((stages, sampling[0]))
            return Output(torch.zeros(1, 4, 8, 8), np.zeros((1, 64, 64, 3)),
                          Timings(text_encoder=0.1, unet_steps=[0.2], vae_decoder=0.1, total=0.5), vae_reruns=1)

    monkeypatch.setattr(harness, "MemorySampler", Sampler)
    contender = Fake()
    scenario = Scenario(name="s", model="tiny", prompt="p", height=64, width=64, batch=[1], steps=[2])
    entry = harness._measure(contender, scenario, Case(1, 2), 1, 5, lambda: None, floor=7)
    timed = contender.calls[1:6]
    assert timed == [(False, False)] * 5  # after the warm-up: the five timed runs, none sampled
    assert [call for call in contender.calls if call[1]] == [(False, True)]  # one run of its own
    assert entry["memory"]["device_floor_mb"] == 7 and entry["vae_reruns"] == 5
    entry["e2e_s"]["samples"] = [0.5] * 5
    note, = [n for n in case_warnings([entry], "diffusers") if "VAE" in n]
    assert note == ("> ⚠ **torch**: an fp16 VAE part overflowed and ran again in fp32 5 time(s) in its 5 timed runs, "
                    "inside their time; the baseline returns the overflowed image instead, so this contender's runs "
                    "did more work than the baseline's.")


def test_peak_device_memory_is_given_above_the_floor():
    from sdexport.bench.report import _memory, case_warnings

    assert _memory({"memory": {"device_used_peak_mb": 5000.0, "device_floor_mb": 600.0}}) == "4,400 MiB GPU"
    assert _memory({"memory": {"device_used_peak_mb": 5000.0}}) == "5,000 MiB GPU (device-wide)"  # an older report
    assert _memory({"memory": {"device_used_peak_mb": None, "host_rss_peak_mb": 900.0}}) == "900 MiB process RSS"
    # a GPU contender whose device memory NVML did not give: not its host RSS in the GPU figure's place
    unread = {"contender": "tensorrt", "memory": {"device_used_peak_mb": None, "host_rss_peak_mb": 900.0,
                                                  "device_note": "not sampled: NVML is not installed"}}
    assert _memory(unread) == "GPU not sampled"
    staged = {key: {"median": 0.2, "samples": [0.2] * 5} for key in ("text_encoder_s", "unet_step_s",
                                                                         "vae_decoder_s", "loop_overhead_s")}
    staged["e2e_s"] = {"median": 0.6, "samples": [0.6] * 5}  # (the three stages' sum: no note of theirs)
    assert case_warnings([{**unread, **staged, "unet_calls": 0}], None) == [
        "> ⚠ **tensorrt**: device memory not sampled: NVML is not installed."]


def test_each_contender_is_measured_above_what_was_in_use_as_it_began(tmp_path, tiny_engines, monkeypatch):
    """The floor was read once, before the first contender: device memory an earlier contender did
    not give back counted in every later one's peak, so a figure depended on the order. Now each is
    measured from its own start, the left-over beside it; one on the CPU samples the host only."""
    from sdexport.bench import harness

    readings = iter([1000 << 20, 1000 << 20, 1400 << 20])  # the start, diffusers', torch's
    monkeypatch.setattr(harness, "device_floor", lambda: next(readings))
    monkeypatch.setattr(harness, "on_gpu", lambda name: name != "onnxruntime-cpu")
    real, given = harness._measure, {}

    def measure(contender, *args, floor, left_over, gpu):
        given[contender.name] = (floor and floor >> 20, left_over and left_over >> 20, gpu)
        return real(contender, *args, floor=floor, left_over=left_over, gpu=False)  # (no GPU here to sample)

    monkeypatch.setattr(harness, "_measure", measure)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                                      '"diffusers", "onnxruntime-cpu", "torch"').replace("batch = [1, 2]", "batch = [1]"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", tiny_engines,
                   "--warmup", "0", "--repeats", "1") == 0
    assert given == {"diffusers": (1000, 0, True), "onnxruntime-cpu": (None, None, False), "torch": (1400, 400, True)}


def test_a_contender_that_began_with_others_left_overs_is_said_to(monkeypatch):
    from sdexport.bench import measure
    from sdexport.bench.report import case_warnings

    monkeypatch.setattr(measure.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(measure, "nvml_reader_or_reason", lambda: lambda: 900 << 20)
    with measure.MemorySampler(interval=0.001, floor=600 << 20, left_over=300 << 20) as sampler:
        pass
    memory = sampler.to_dict()
    assert memory["device_floor_mb"] == 600 and memory["device_left_over_mb"] == 300
    row = {"contender": "torch", "e2e_s": {"median": 1.0, "samples": [1.0] * 5}, "memory": memory,
           "unet_step_s": {"median": 1.0, "samples": [1.0]}, "unet_calls": 1}
    [note] = case_warnings([row], None)
    assert note.startswith("> ⚠ **torch** began with 300 MiB more in use on the device than the first contender")
    assert case_warnings([{**row, "memory": {**memory, "device_left_over_mb": 100.0}}], None) == []
    with measure.MemorySampler(interval=0.001, floor=600 << 20, device=False) as on_the_host:
        pass
    host = on_the_host.to_dict()  # onnxruntime-cpu on a GPU machine: neither its figure nor "not sampled"
    assert host["device_used_peak_mb"] is None and "device_note" not in host and host["host_rss_peak_mb"] > 0


# --- Stopped part-way (Ctrl-C, SIGTERM: a CI timeout, the GPU lease's budget) -----------------------

INTERRUPTIBLE = SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                              '"diffusers", "torch", "onnxruntime-cpu"')


@pytest.fixture(scope="module")
def tiny_engines(bench_run, tmp_path_factory) -> Path:
    """Engines for the tests that are not about the benchmark's own export (--engine-dir): a copy of
    the smoke run's (the module's last test replaces that output). INTERRUPTIBLE's own export would
    be the same: the same model, sizes and batches, and the same parts for its contenders."""
    code, out = bench_run
    assert code == 0
    engines = tmp_path_factory.mktemp("interruptible") / "tiny"
    shutil.copytree(out / "engines" / "smoke", engines)
    return engines


def test_an_engine_directory_gone_after_the_measuring_keeps_the_figures(tmp_path, tiny_engines, monkeypatch):
    """A cache entry deleted while the bench ran: the report read the engines' manifest again after
    the measuring, and every figure was thrown away with 'no such engine directory' (an audit)."""
    from sdexport.bench import contenders

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    real = contenders.BaselineContender.close

    def close(self):  # the baseline measured: the directory goes
        real(self)
        shutil.rmtree(engines)

    monkeypatch.setattr(contenders.BaselineContender, "close", close)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"', '"diffusers"')
                        .replace("repeats = 2", "repeats = 1").replace("batch = [1, 2]", "batch = [1]"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--warmup", "0", "--engine-dir", engines) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["status"] for r in report["results"]] == ["measured"] and report["engines"]["dtype"] == "fp32"


@pytest.mark.parametrize("contender", ["tensorrt", "onnxruntime-cuda-fused"])
def test_the_engines_a_bench_builds_are_of_the_runs_precision(tmp_path, tiny_engines, monkeypatch, contender):
    """Every build was asked for fp16: an fp32 scenario's TensorRT plans got TensorRT 10's fp16 flag
    (and its fused graphs fp16), timed against the fp32 baseline."""
    from sdexport.bench import harness
    from sdexport.build import onnxruntime_build, tensorrt_build

    asked = []

    def build(*args, fp16, **kwargs):
        asked.append(fp16)
        raise SdexportError("stopped here by the test")

    monkeypatch.setattr(harness, "check_available", lambda name: None)
    monkeypatch.setattr(tensorrt_build, "build_engines", build)
    monkeypatch.setattr(onnxruntime_build, "build_onnxruntime", build)
    scenario = tmp_path / "s.toml"
    scenario.write_text(SMOKE.replace('"onnxruntime-cpu", "diffusers", "onnxruntime-cuda", "tensorrt"',
                                      f'"diffusers", "{contender}"').replace("repeats = 2", "repeats = 1"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--warmup", "0", "--engine-dir", tiny_engines) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["precision"] == "fp32" and asked == [False]


def test_an_interrupted_bench_writes_what_it_measured_and_names_what_it_stopped(tmp_path, tiny_engines, monkeypatch, capsys):
    """SIGTERM in torch's second case: diffusers' cases and torch's first are kept, whole and compared
    with the baseline; the case it stopped and the contender it never reached are named; the output
    is moved into place as any finished one, and the process still ends as an interrupted one."""
    from sdexport.bench import harness
    from sdexport.errors import Terminated

    real = harness._measure

    def stopped_in_torch_batch_2(contender, scenario, case, *args, **kwargs):
        if contender.name == "torch" and case.batch == 2:
            raise Terminated
        return real(contender, scenario, case, *args, **kwargs)

    monkeypatch.setattr(harness, "_measure", stopped_in_torch_batch_2)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE)
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0", "--engine-dir", tiny_engines) == 130
    captured = capsys.readouterr()
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"]["by"] == "SIGTERM"
    assert (report["interrupted"]["contender"], report["interrupted"]["case"]) == ("torch", {"batch": 2, "steps": 3})
    assert report["interrupted"]["not_run"] == ["onnxruntime-cpu"]
    outcome = [(r["contender"], r.get("case", {}).get("batch"), r["status"]) for r in report["results"]]
    assert outcome == [("diffusers", 1, "measured"), ("diffusers", 2, "measured"), ("torch", 1, "measured"),
                       ("torch", 2, "interrupted"), ("onnxruntime-cpu", None, "not run")]
    assert report["results"][2]["speedup_vs_baseline"] > 0 and "psnr_db" in report["results"][2]["agreement"]
    markdown = (out / "results.md").read_text()
    assert "> **Interrupted**: interrupted by SIGTERM while measuring torch, batch 2, 3 steps" in markdown
    assert "- torch (batch 2, 3 steps): interrupted by SIGTERM while it was measured" in markdown
    assert "- onnxruntime-cpu: not run: the benchmark was interrupted by SIGTERM before it" in markdown
    assert Image.open(out / "results.png").size[0] > 0
    assert str(out / "results.json") in captured.out  # the paths, as after a finished run
    said = [line for line in captured.err.splitlines() if "the report holds what was measured before it" in line]
    assert len(said) == 1 and said[0].startswith(f"interrupted; already in place: {out}; interrupted by SIGTERM"), said
    assert report["engine_dir"] == str(tiny_engines) and hidden_siblings(out) == []


def test_a_report_that_cannot_be_written_is_printed_not_lost(tmp_path, tiny_engines, monkeypatch, capsys):
    """A full disk as the report was written took every measurement with the staging folder, and
    the error named its file there, gone by then (an audit's finding): the table goes to stdout, and
    the error names the output's file."""
    import errno

    from sdexport.bench import harness

    def full(report, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / ".results.json.77-0123abcd.tmp"))

    monkeypatch.setattr(harness, "write_report", full)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"onnxruntime-cpu"'))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0", "--engine-dir", tiny_engines) == 1
    captured = capsys.readouterr()
    assert "| onnxruntime-cpu |" in captured.out and not out.exists() and hidden_siblings(out) == []
    assert captured.err.splitlines()[-1] == (f"error: {out / 'results.json'}: No space left on device: the report was "
                                             "not written; the results are the table printed above; free some space "
                                             "or write elsewhere")


def test_a_sigterm_python_dropped_stops_the_case_as_one_that_arrived_would(tmp_path, tiny_engines, monkeypatch):
    """The signal lands in a ``__del__`` as torch's second case starts, and Python drops its
    KeyboardInterrupt: the case's first timed run ends it all the same, and the report says so."""
    import signal

    from sdexport.bench import harness

    real = harness._measure

    def measure(contender, scenario, case, *args, **kwargs):
        if contender.name == "torch" and case.batch == 2:
            drop_a_signal(signal.SIGTERM)
        return real(contender, scenario, case, *args, **kwargs)

    monkeypatch.setattr(harness, "_measure", measure)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "torch"'))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0", "--engine-dir", tiny_engines) == 130
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"]["by"] == "SIGTERM"
    assert (report["interrupted"]["contender"], report["interrupted"]["case"]) == ("torch", {"batch": 2, "steps": 3})
    assert [r["status"] for r in report["results"]] == ["measured", "measured", "measured", "interrupted"]
    assert hidden_siblings(out) == []


def test_a_case_beyond_a_given_engine_directory_points_to_exporting_it_again(tmp_path, tiny_engines, capsys):
    """The scenario asks it (its file named); the engine directory is widened by export's --batch."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace("batch = [1, 2]", "batch = [4]"))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", tiny_engines) == 2
    assert capsys.readouterr().err.strip() == (f"error: {scenario}: batch 4 is outside the engines' profile: batch must "
                                               "be in [1, 2] (re-export, adopt again or rebuild with a wider --batch)")


def test_a_given_engine_directory_its_contenders_cannot_run_is_refused_before_the_baseline(tmp_path, tiny_engines,
                                                                                           capsys):
    """A part left out, or a damaged graph an ONNX Runtime contender reads: refused as the bench plans,
    not found as that contender loads, after the baseline had been measured (the bench then ended,
    status 0, with a report of the baseline alone)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_engines, damaged)
    with (damaged / "unet" / "model.onnx").open("r+b") as graph:
        graph.truncate(100)
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", damaged) == 2
    assert capsys.readouterr().err.strip() == (f"error: {damaged}: unet/model.onnx does not match its sha256 in the "
                                               "manifest (damaged or replaced); re-export or rebuild it")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_engines, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["components"]["text_encoder"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", partial) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --engine-dir {partial}: the engine directory has no text_encoder"), err
    assert not (tmp_path / "out").exists()


def test_a_stop_after_the_benchs_own_export_names_nothing_as_in_place(tmp_path, monkeypatch, capsys):
    """The bench's export is a claim inside the bench output's staging folder: it went into place
    there, and the stop then discarded the whole staging folder. "already in place" named it."""
    from sdexport.bench import harness

    def load(name, *args, **kwargs):
        raise KeyboardInterrupt  # the first contender, after the export

    monkeypatch.setattr(harness, "_load", load)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"onnxruntime-cpu"')
                        .replace("batch = [1, 2]", "batch = [1]"))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0") == 130
    err = capsys.readouterr().err
    assert not out.exists() and hidden_siblings(out) == [] and err.strip().endswith("interrupted"), err[-500:]


@pytest.mark.parametrize("stopped_in, kept", [("diffusers", False), ("onnxruntime-cpu", True)])
def test_ctrl_c_while_loading_keeps_only_what_was_measured(tmp_path, tiny_engines, monkeypatch, capsys, stopped_in, kept):
    """Nothing measured yet: no output folder at all, as for any failed run. Later: the report, with
    the contender that was loading named."""
    from sdexport.bench import harness

    real = harness._load

    def load(name, *args, **kwargs):
        if name == stopped_in:
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(harness, "_load", load)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "onnxruntime-cpu"'))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0", "--engine-dir", tiny_engines) == 130
    assert hidden_siblings(out) == []
    if not kept:
        assert not out.exists()
        assert capsys.readouterr().err.strip().endswith("interrupted")  # said, not a silent exit 130
        return
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"]["stage"] == "loading" and report["interrupted"]["not_run"] == []
    assert report["results"][-1] == {"contender": "onnxruntime-cpu", "status": "interrupted",
                                     "reason": "interrupted by Ctrl-C while loading"}


def test_sigterm_from_outside_stops_a_bench_that_keeps_what_it_measured(tmp_path, tiny_engines):
    """The real signal on a real process: the CLI's SIGTERM handler, the report, exit status 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace("batch = [1, 2]", "batch = [1]"))
    out, log = tmp_path / "out", tmp_path / "bench.log"
    # torch sleeps 0.5 s before each U-Net call: it is still being measured when the signal comes
    env = {**os.environ, "SDEXPORT_TEST_SLOW_UNET": "torch=0.5", "CUDA_VISIBLE_DEVICES": ""}
    with log.open("w") as handle:
        bench = subprocess.Popen([sys.executable, "-m", "sdexport", "bench", str(scenario), "-o", str(out),
                                  "--engine-dir", str(tiny_engines)],
                                 stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while "✓ diffusers" not in log.read_text() and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # into torch's measurement
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(120) == 130, log.read_text()[-3000:]
    finally:
        bench.kill()
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"]["by"] == "SIGTERM" and report["interrupted"]["contender"] == "torch"
    assert report["test_hooks"] == {"SDEXPORT_TEST_SLOW_UNET": {"torch": 0.5}}  # (its report says so: the hook's words)
    assert {(r["contender"], r["status"]) for r in report["results"]} == {
        ("diffusers", "measured"), ("torch", "interrupted"), ("onnxruntime-cpu", "not run")}
    assert hidden_siblings(out) == []


def test_a_closed_terminal_stops_a_bench_that_keeps_what_it_measured(tmp_path, tiny_engines):
    """A bench in a terminal that closes (an SSH session dropped): the kernel's SIGHUP stops it as
    SIGTERM does, and its report is written, though every write to the terminal now fails (EIO: the
    note before the report raised, and nothing was written; a review, in a pty)."""
    import os
    import pty
    import select
    import sys
    import time

    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace("batch = [1, 2]", "batch = [1]"))
    out = tmp_path / "out"
    env = {**os.environ, "SDEXPORT_TEST_SLOW_UNET": "torch=0.5", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
    pid, terminal = pty.fork()  # the child leads a session whose controlling terminal is the pty
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "sdexport", "bench", str(scenario), "-o", str(out),
                                   "--engine-dir", str(tiny_engines)], env)
    import re

    seen, deadline = b"", time.monotonic() + 240

    def shown() -> str:  # (a terminal's progress lines come with rich's escape codes)
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))

    try:
        while "✓ diffusers" not in shown() and time.monotonic() < deadline:
            if select.select([terminal], [], [], 1.0)[0]:
                try:
                    seen += os.read(terminal, 4096)
                except OSError:
                    break
        time.sleep(1)  # into torch's measurement
    finally:
        os.close(terminal)  # the terminal hangs up: SIGHUP to its foreground process group
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130, shown()[-2000:]
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"]["by"] == "SIGHUP" and report["interrupted"]["contender"] == "torch"
    assert hidden_siblings(out) == []


@pytest.mark.parametrize("first", ["interrupted", "finished"])
def test_signals_while_the_report_is_written_wait_for_it(tmp_path, tiny_engines, monkeypatch, capfd, first):
    """GitHub sends SIGINT then SIGTERM; a user presses Ctrl-C twice; the CI gate passes the job's
    signal on to a benchmark that had it already. Once the measuring is over, such a signal is noted,
    the report still goes into place, and then the run stops as an interrupted one: the report is
    marked when the measuring was cut short, whole when it had finished."""
    import os
    import signal

    from sdexport.bench import harness
    from sdexport.errors import Terminated

    real_measure, real_write = harness._measure, harness.write_report

    def measure(contender, scenario, case, *args, **kwargs):
        if first == "interrupted" and contender.name == "torch":
            raise Terminated
        return real_measure(contender, scenario, case, *args, **kwargs)

    def write_report(report, directory):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_write(report, directory)

    monkeypatch.setattr(harness, "_measure", measure)
    monkeypatch.setattr(harness, "write_report", write_report)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "torch"'))
    out = tmp_path / "out"
    # Ctrl-C as in a terminal, whatever this worker inherited (a run started in the background, as
    # CI's may be, has SIGINT ignored, and the shield leaves an ignored signal alone)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0",
                       "--engine-dir", tiny_engines) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    finally:
        signal.signal(signal.SIGINT, inherited)
    err = capfd.readouterr().err
    assert "SIGINT: the report is being written" in err  # written to fd 2 itself
    assert ("the report is complete" in err) == (first == "finished")
    report = json.loads((out / "results.json").read_text())
    assert ("interrupted" in report) == (first == "interrupted") and hidden_siblings(out) == []


def test_an_interruption_after_loading_frees_the_contender_and_one_after_the_last_keeps_the_run_whole(
        tmp_path, tiny_engines, monkeypatch):
    from sdexport.bench import contenders, harness
    from sdexport.errors import Terminated

    closed = []
    real_close = contenders.RuntimeContender.close

    def close(self):
        closed.append(self.name)
        real_close(self)
        if self.name == "onnxruntime-cpu":  # the last one, its cases all measured
            raise Terminated

    def stopped_after_loading(contender, seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(contenders.RuntimeContender, "close", close)
    monkeypatch.setattr(harness, "slow_down_unet", stopped_after_loading)
    monkeypatch.setenv("SDEXPORT_TEST_SLOW_UNET", "torch=0")
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "torch"'))
    assert run_cli("bench", scenario, "-o", tmp_path / "a", "--repeats", "1", "--warmup", "0",
                   "--engine-dir", tiny_engines) == 130
    assert closed == ["torch"]  # loaded, then stopped before its first case: still closed
    assert json.loads((tmp_path / "a" / "results.json").read_text())["results"][-1]["status"] == "interrupted"

    monkeypatch.delenv("SDEXPORT_TEST_SLOW_UNET")
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "onnxruntime-cpu"'))
    assert run_cli("bench", scenario, "-o", tmp_path / "b", "--repeats", "1", "--warmup", "0",
                   "--engine-dir", tiny_engines) == 130
    report = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["status"] for r in report["results"]] == ["measured"] * 4 and "interrupted" not in report
    assert "Interrupted" not in (tmp_path / "b" / "results.md").read_text()


def test_the_shield_keeps_an_ignored_sigint_ignored_and_survives_a_closed_stderr():
    """A background job starts with SIGINT ignored: the shield leaves that so. Its note goes to fd 2,
    which may be a pipe nobody reads any more (`bench ... | tee log`, tee killed by the same Ctrl-C):
    writing there must not raise into the report's writing."""
    import os
    import signal

    from sdexport.bench.harness import _WritingShield
    from sdexport.errors import Terminated

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    read_end, write_end = os.pipe()
    os.close(read_end)
    saved = os.dup(2)
    try:
        with _WritingShield() as shield:
            shield.engage()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.dup2(write_end, 2)
            os.kill(os.getpid(), signal.SIGINT)  # ignored: not pending
            os.kill(os.getpid(), signal.SIGTERM)  # noted (the note's write fails: EPIPE), kept
            os.dup2(saved, 2)
            assert isinstance(shield.pending, Terminated)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is before[1]
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write_end)
        signal.signal(signal.SIGINT, before[0])


def test_a_stop_after_contenders_that_all_failed_ends_the_run_as_interrupted(tmp_path, tiny_engines, monkeypatch, capsys):
    """Nothing to write, and a stop came: the run ends as a stopped one (130), not as a failed one
    whose stop was lost."""
    import signal

    from sdexport.bench import harness

    def unavailable(name):
        if name == "diffusers":
            drop_a_signal(signal.SIGTERM)  # the shield takes it when the last contender has ended
        raise SdexportError(f"{name} is not here")

    monkeypatch.setattr(harness, "check_available", unavailable)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "torch"'))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0", "--engine-dir", tiny_engines) == 130
    assert not out.exists() and hidden_siblings(out) == []
    assert capsys.readouterr().err.strip().endswith("interrupted")


def test_the_shield_takes_a_stop_python_dropped_before_it_engaged():
    """Dropped after the last timed run: the shield makes it its own pending stop, so the report goes
    into place whole and the run then ends as an interrupted one (no claim discards it)."""
    import signal

    from sdexport import stopping
    from sdexport.bench.harness import _WritingShield
    from sdexport.errors import Terminated

    with stopping.listening():
        drop_a_signal(signal.SIGTERM)
        with _WritingShield() as shield:
            shield.engage()
            assert isinstance(shield.pending, Terminated)
        stopping.check()  # taken by the shield: not raised again


def test_a_chart_that_cannot_be_drawn_leaves_the_measurements_in_place(tiny_engines, tmp_path, monkeypatch, capsys):
    """Under a file-size limit the chart failed after every case was measured, and the whole report
    went with the staging folder: the JSON and the table are written, the chart is said to be missing."""
    import errno

    from sdexport.bench import report as reports

    def failing(report, path):
        raise OSError(errno.EFBIG, "File too large", str(path))

    monkeypatch.setattr(reports, "plot", failing)
    scenario = tmp_path / "s.toml"
    scenario.write_text(INTERRUPTIBLE.replace('"diffusers", "torch", "onnxruntime-cpu"', '"diffusers", "onnxruntime-cpu"'))
    out = tmp_path / "out"
    assert run_cli("bench", scenario, "-o", out, "--repeats", "1", "--warmup", "0", "--engine-dir", tiny_engines) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert "results.png not drawn (" in " ".join(captured.err.split()) and "results.png" not in captured.out


def test_the_commit_recorded_is_sdexports_own_not_an_enclosing_repositorys(tmp_path, monkeypatch):
    """An installed sdexport whose virtualenv sits in some project's repository: that project's
    commit is not the one measured (recorded as unknown), while a checkout's is recorded."""
    import subprocess

    from sdexport.bench.environment import _git_revision

    if shutil.which("git") is None:
        pytest.skip("no git")
    monkeypatch.delenv("SDEXPORT_GIT_REVISION", raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")  # (no signing or hooks of the machine's)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "app.py").write_text("")
    subprocess.run([*git, "add", "app.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a project"], check=True)
    installed = tmp_path / "venv" / "site-packages" / "sdexport" / "bench" / "environment.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("")
    assert _git_revision(installed) is None
    subprocess.run([*git, "add", "-f", str(installed)], check=True)
    subprocess.run([*git, "commit", "-qm", "tracked"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert _git_revision(installed) == head
    installed.write_text("changed = True\n")
    assert _git_revision(installed) == head + "-dirty"

    # a `git status` that times out (a slow network file system) keeps the commit, said unverified
    import sdexport.bench.environment as environment

    real_run = subprocess.run

    def status_times_out(args, **kwargs):
        if "status" in args:
            raise subprocess.TimeoutExpired(args, kwargs.get("timeout", 0))
        return real_run(args, **kwargs)

    monkeypatch.setattr(environment.subprocess, "run", status_times_out)
    assert _git_revision(installed) == head + " (changes unknown)"

# From mutation testing round 6


@pytest.mark.parametrize("text, message", [
    ('model = "tiny"\nbuild = { optimization_level = 6 }', "build.optimization_level: 6 is greater than the maximum of 5"),
    ('model = "tiny"\ncontrolnets = ["tiny-controlnet", "tiny-controlnet"]\ncontrol_mode = [3]',
     "control_mode: 1 modes for 2 ControlNet(s)"),
    ('model = "tiny-sdxl"\nrefiner = "tiny-sdxl-refiner"\ncontrolnets = ["tiny-sdxl-controlnet"]\ninpaint = true',
     "refiner with controlnets and inpaint: ControlNets on the base model of an ensemble run text to image only"),
    ('model = "tiny"\nadapter_scale = 1.0', "adapter_scale is a T2I-Adapter setting: add adapter"),
])
def test_a_scenario_is_refused_for_what_its_keys_state_not_for_their_values(tmp_path, text, message):
    """A setting is refused for being there, not for differing from its default (an adapter_scale of
    1.0 without an adapter is a mistake all the same); fewer union modes than ControlNets would give
    the others none; an ensemble's ControlNets run text to image only, inpainting as much as
    img2img; and TensorRT's optimization levels stop at 5."""
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SdexportError, match=re.escape(message)):
        load_scenario(path)


def test_a_scenario_at_the_edges_of_its_ranges_is_taken(tmp_path):
    """strength 1 (all noise: an init image's full range) and the largest seed with one image per
    call are valid, as ``run`` takes them."""
    from sdexport.runtime.request import MAX_SEED

    path = tmp_path / "s.toml"
    path.write_text(f'model = "tiny"\nstrength = 1.0\nseed = {MAX_SEED}\nbatch = [1]\n')
    scenario = load_scenario(path)
    assert (scenario.strength, scenario.seed) == (1.0, MAX_SEED)


def test_the_warmup_and_repeats_given_on_the_command_line_are_the_plans(tmp_path):
    """``--warmup`` and ``--repeats`` override the scenario's, 0 warm-up runs included (the first
    timed run is then the first call): each value the options allow is planned as given."""
    from sdexport.bench.plan import Options, plan_bench

    path = tmp_path / "s.toml"
    path.write_text('model = "tiny"\nheight = 64\nwidth = 64\nwarmup = 1\nrepeats = 5\n')
    scenario = load_scenario(path)
    plan = plan_bench(scenario, Options())
    assert (plan.warmup, plan.repeats) == (1, 5)
    for warmup, repeats in ((0, 1), (2, 3)):
        plan = plan_bench(scenario, Options(warmup=warmup, repeats=repeats))
        assert (plan.warmup, plan.repeats) == (warmup, repeats)


def test_given_engines_without_the_scenarios_controlnet_are_refused(tmp_path, tiny_engine_dir):
    """The baseline runs diffusers' ControlNet pipeline; engines without the ControlNet would run
    plain text to image and be compared with it as if they did the same work."""
    from sdexport.bench.plan import Options, plan_bench

    path = tmp_path / "s.toml"
    path.write_text('model = "tiny"\nheight = 64\nwidth = 64\ncontrolnets = ["tiny-controlnet"]\n'
                    'contenders = ["diffusers", "onnxruntime-cpu"]\n')
    with pytest.raises(SdexportError, match=re.escape("has 0 ControlNet(s), the scenario 1: the baseline and the "
                                                      "engines must be the same model")):
        plan_bench(load_scenario(path), Options(engine_dir=tiny_engine_dir))


def test_what_a_bench_reads_is_protected_from_its_output_but_its_own_engines_are_not(tmp_path, monkeypatch):
    """The output folder may replace nothing the run reads: the refiner's checkpoint, the engine
    cache and given engine directories count as much as the model; engines inside the output being
    replaced are carried over instead, also when ``-o`` is a relative path."""
    import dataclasses

    from sdexport.bench.plan import Options, own_engines, plan_bench, protected_paths

    path = tmp_path / "s.toml"
    path.write_text('model = "tiny"\nheight = 64\nwidth = 64\n')
    plan = plan_bench(load_scenario(path), Options())
    refiner = dataclasses.replace(plan.outline, sources=(tmp_path / "refiner",))
    plan = dataclasses.replace(plan, refiner=refiner)
    options = Options(engine_dir=tmp_path / "base", refiner_engine_dir=tmp_path / "ref", engine_cache=tmp_path / "cache")
    protected = protected_paths(plan, options, tmp_path / "out")
    assert {tmp_path / "refiner", tmp_path / "base", tmp_path / "ref", tmp_path / "cache"} <= set(protected)
    monkeypatch.chdir(tmp_path)
    assert own_engines(tmp_path / "out" / "engines" / "tiny", Path("out"))
    assert not own_engines(tmp_path / "elsewhere" / "engines" / "tiny", Path("out"))
    own = Options(engine_dir=tmp_path / "out" / "engines" / "tiny")
    assert tmp_path / "out" / "engines" / "tiny" not in protected_paths(plan, own, Path("out"))


def test_each_image_of_a_case_has_its_own_seed():
    """A case of batch N draws images seed, seed + 1, ... (as ``run --seed`` numbers them, and as the
    scenario's seed range is checked): N copies of one seed would time a batch of one image."""
    from sdexport.bench.plan import request_for
    from sdexport.bench.scenario import Case, Scenario

    request = request_for(Scenario(name="s", model="tiny", seed=7, height=64, width=64), Case(3, 2))
    assert request.seeds == [7, 8, 9] and request.steps == 2 and len(request.prompt) == 3


def test_the_bench_exports_for_the_scenarios_batches_and_size_or_its_export_ranges():
    """The export spans the scenario's batches, no smaller (a wider profile is another export, and
    another engine cache entry, than the scenario needs), or the ranges its [export] table gives."""
    from sdexport.bench.plan import bench_export_profile
    from sdexport.bench.scenario import Scenario
    from sdexport.shapes import ShapeProfile

    scenario = Scenario(name="s", model="tiny", batch=[2, 4], height=64, width=128)
    assert bench_export_profile(scenario) == ShapeProfile((2, 4, 4), (64, 64, 64), (128, 128, 128))
    scenario.export = {"batch": "1:2:4", "height": "64:64:128"}
    assert bench_export_profile(scenario) == ShapeProfile((1, 2, 4), (64, 64, 128), (128, 128, 128))


def test_given_fp16_engines_are_refused_for_a_scenario_that_names_fp32(tmp_path, tiny_fp16_engine_dir):
    """The baselines run in the precision the engines were exported in: a scenario that names fp32
    would have its fp32 figures reported for an fp16 run, whichever precision it names."""
    from sdexport.bench.plan import Options, plan_bench

    path = tmp_path / "s.toml"
    path.write_text('model = "tiny"\nheight = 64\nwidth = 64\ndtype = "fp32"\ncontenders = ["diffusers"]\n')
    with pytest.raises(SdexportError, match="is an fp16 export, and the scenario's dtype is fp32"):
        plan_bench(load_scenario(path), Options(engine_dir=tiny_fp16_engine_dir))
    path.write_text('model = "tiny"\nheight = 64\nwidth = 64\ndtype = "fp16"\ncontenders = ["diffusers"]\n')
    assert plan_bench(load_scenario(path), Options(engine_dir=tiny_fp16_engine_dir)).dtype == "fp16"


def test_the_slow_unet_hook_takes_zero_seconds_and_names_only_runtime_contenders(monkeypatch):
    """0 is in the hook's range (a gate's control run, slowed by nothing); a baseline is not slowed
    (its U-Net is diffusers', not sdexport's)."""
    from sdexport.bench.plan import slow_unet_hook

    monkeypatch.setenv("SDEXPORT_TEST_SLOW_UNET", "torch=0, onnxruntime-cpu=60")
    assert slow_unet_hook(["diffusers", "torch", "onnxruntime-cpu"]) == {"torch": 0.0, "onnxruntime-cpu": 60.0}
    monkeypatch.setenv("SDEXPORT_TEST_SLOW_UNET", "diffusers=0.1")
    with pytest.raises(SdexportError, match="'diffusers' is not a runtime contender of this benchmark"):
        slow_unet_hook(["diffusers", "torch"])


def test_given_engines_with_another_controlnet_adapter_or_vae_are_refused(tmp_path):
    """Only the ControlNets' and adapters' counts were compared: engines exported with another
    ControlNet, or with an fp16-safe --vae, were timed against a baseline running the scenario's
    parts under their names (PSNR 6 dB, and no word why; an audit)."""
    from types import SimpleNamespace

    from sdexport.bench.plan import _check_parts_made_from

    net = tmp_path / "net"
    net.mkdir()
    (net / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (net / "diffusion_pytorch_model.safetensors").write_bytes(b"weights of one ControlNet")
    copy, other = tmp_path / "copy", tmp_path / "other"
    shutil.copytree(net, copy)
    shutil.copytree(net, other)
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"weights of another")
    from sdexport.models.source_files import fingerprint

    files = fingerprint([net / "diffusion_pytorch_model.safetensors"])

    def check(records: list[dict], given: list[str], **source) -> bool:
        scenario = load_scenario_text(tmp_path, 'model = "tiny"\ncontrolnets = ' + json.dumps(given))
        manifest = SimpleNamespace(model={"source": {"kind": "preset", "name": "tiny", "controlnets": records,
                                                     "files": files, **source}})
        return _check_parts_made_from("--engine-dir", tmp_path / "engines", manifest, scenario)

    preset = {"kind": "preset", "name": "tiny-controlnet", "seed": 0}
    assert check([preset], ["tiny-controlnet"])
    assert check([{"kind": "diffusers", "path": str(net)}], [str(copy)])  # a copy elsewhere: the same by its sha256
    # another path whose files the manifest does not list: on trust (the report says so), not proven
    assert not check([{"kind": "diffusers", "path": str(tmp_path / "gone")}], [str(copy)])
    for records, given, said in (
        ([{**preset, "seed": 1}], ["tiny-controlnet"], ("its ControlNet 1 was exported from preset tiny-controlnet "
                                                       "(seed 1), not from the scenario's tiny-controlnet")),
        ([{"kind": "diffusers", "path": str(net)}], [str(other)], f"exported from {net}, not from the scenario's {other}"),
        ([preset], [str(copy)], f"exported from preset tiny-controlnet, not from the scenario's {copy}"),
    ):
        with pytest.raises(SdexportError, match=re.escape(said)):
            check(records, given)
    with pytest.raises(SdexportError, match=re.escape(f"was exported with --vae {tmp_path / 'vae'}, and a scenario's "
                                                      "baseline runs its model's own VAE")):
        check([preset], ["tiny-controlnet"], vae=str(tmp_path / "vae"))
    assert check([], ["tiny-controlnet"], kind="onnx")  # an adopted export records none: on trust by its model


def load_scenario_text(folder: Path, text: str):
    path = folder / "scenario.toml"
    path.write_text(text)
    return load_scenario(path)


def test_an_fp16_baseline_on_a_cpu_computes_in_fp32_and_the_setup_line_says_so(monkeypatch):
    """The diffusers baseline ran PyTorch's fp16 kernels on a CPU, where the runtime's Torch backend
    computes fp32, and the report gave every contender a 45-68x speedup over it (an audit)."""
    import torch

    from sdexport.bench import contenders, reference
    from sdexport.bench.report import markdown

    seen = {}
    monkeypatch.setattr(reference, "DiffusersReference", lambda model, *, device, dtype, compile: seen.update(dtype=dtype))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    contenders.BaselineContender("diffusers", object(), "fp16")
    assert seen["dtype"] == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    contenders.BaselineContender("diffusers", object(), "fp16")
    assert seen["dtype"] == torch.float16
    report = synthetic_bench_report([], None, family="sd", precision="fp16", device="cpu")
    assert ("precision fp16 (on a CPU, PyTorch computes in fp32: the baseline and the Torch backend), warm-up 1"
            in markdown(report))
    assert "precision fp16, warm-up 1" in markdown({**report, "device": "cuda"})


def test_a_baseline_not_measured_is_said_on_its_line_and_under_each_case_it_missed():
    """The header claimed a baseline and the tables showed "–" for every speedup with no word why."""
    from sdexport.bench.report import markdown

    def entry(contender: str, batch: int) -> dict:
        stats = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1, "samples": [1.0]}
        return {"contender": contender, "status": "measured", "case": {"batch": batch, "steps": 2, "height": 64,
                                                                       "width": 64},
                "e2e_s": stats, "memory": {"host_rss_peak_mb": 100.0}, "images_per_s": 1.0, "it_per_s": 2.0, "unet_calls": 2,
                **{stage: stats for stage in ("text_encoder_s", "unet_step_s", "vae_decoder_s", "loop_overhead_s")}}

    failed = {"contender": "diffusers", "status": "failed", "reason": "RuntimeError: out of memory",
              "case": {"batch": 2, "steps": 2, "height": 64, "width": 64}}
    text = markdown(synthetic_bench_report([entry("diffusers", 1), entry("torch", 1), failed, entry("torch", 2)],
                                           "diffusers", family="sd"))
    assert text.count("**No speedup or agreement figures**: diffusers, the baseline, was not measured in this case "
                      "(see Not measured).") == 1
    assert "not measured in any case" not in text
    text = markdown(synthetic_bench_report([{k: v for k, v in failed.items() if k != "case"}, entry("torch", 1)], "diffusers", family="sd"))
    assert "same run); not measured in any case (see Not measured): no speedup or agreement figures" in text

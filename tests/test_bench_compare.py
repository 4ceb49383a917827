"""`sdexport bench compare` and the CI gate: the verdict follows the threshold *and* the noise,
mismatched runs are refused, and the outputs (Markdown, JSON, JUnit XML) say the same thing.

The verdict logic is tested on synthetic reports (fixed timings); the gate as a whole on real runs
of the tiny model on this CPU, 4 steps a run. A rerun of the same code is judged at 500%, which no
noise comes near; the contender slowed by a test hook (0.25 s before each U-Net call: +1 s on a run
of 60 to 75 ms) at 200%, which it passes even where a busy machine made its baseline four times
slower (seen once, with 10 steps a run: 0.77 s, +348%, under the 500% the slowed run was judged by
then). In the default run another worker shares the machine (tests/conftest.py); one such run on 2
cores (2026-12-03) measured the rerun at -0.7% (torch) and -4.4% (diffusers), the slowed torch at
+1462% (69 → 1080 ms) and the unslowed diffusers beside it at -1.1%. On a machine busier still (an
audit, 2026-12-07) the same code measured +2133% on the absolute scale: the rerun and the slowed
run are judged as ratios to diffusers' time in the same run (SDEXPORT_RELATIVE_TO), which cancels
what the machine does to both. The default run keeps the first run and the rerun (the gate's real
path: bench, compare, the summary, the engine cache); the slowed run is `-m slow` since the
default run's cut of 2026-12-07 (docs/design-notes.md): under another audit's three busy loops a
run of 2 s hid its +1 s at 200%.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import run_cli
from sdexport.bench.compare import MARKER, Gate, compare, relative_change
from sdexport.manifest_schema import FORMAT

ROOT = Path(__file__).resolve().parent.parent


def _stats(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "n": len(samples),
            "samples": samples}


def _entry(contender: str, samples: list[float], batch: int = 1, psnr: float | None = 40.0) -> dict:
    stage = _stats([s / 4 for s in samples])
    return {
        "contender": contender, "status": "measured", "case": {"batch": batch, "steps": 10, "height": 64, "width": 64},
        "e2e_s": _stats(samples), "text_encoder_s": stage, "unet_step_s": stage, "vae_decoder_s": stage,
        "loop_overhead_s": stage,
        **({"agreement": {"baseline": "diffusers", "latents_rel_l2": 1e-3, "psnr_db": psnr}} if psnr is not None else {}),
    }


def _report(entries: list[dict], *, gpu: str | None = None, precision: str = "fp32", **scenario) -> dict:
    return {
        "scenario": {"name": "synthetic", "model": "tiny", "repeats": len(entries[0]["e2e_s"]["samples"]), **scenario},
        "precision": precision,
        "environment": {"gpu": {"name": gpu} if gpu else None, "host": {"cpu": "Test CPU", "cores": 2},
                        "versions": {"sdexport": "0.1.0", "torch": "2.13.0"}, "git_revision": "abc1234",
                        "date": "2026-12-01T00:00:00+00:00"},
        "results": entries,
    }


TIGHT = [1.00, 1.01, 0.99, 1.00, 1.02, 0.98, 1.00]


def _write(tmp_path: Path, name: str, report: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def _compare(tmp_path: Path, baseline: dict, new: dict, gate: Gate | None = None) -> dict:
    return compare(_write(tmp_path, "baseline", baseline), _write(tmp_path, "new", new), gate or Gate())


def _row(comparison: dict, contender: str) -> dict:
    return next(r for r in comparison["rows"] if r["contender"] == contender)


def test_the_same_timings_are_no_change_and_the_interval_holds_zero():
    point, low, high = relative_change(TIGHT, TIGHT)
    assert point == 0 and low < 0 < high


def test_a_slowdown_beyond_threshold_and_noise_is_a_regression(tmp_path):
    comparison = _compare(tmp_path, _report([_entry("torch", TIGHT)]), _report([_entry("torch", [s * 1.3 for s in TIGHT])]))
    row = _row(comparison, "torch")
    assert row["status"] == "regression" and row["failed"] and not comparison["passed"]
    assert row["e2e"]["verdict"] == "slower" and row["e2e"]["low"] > 0.05
    assert "over the 5% gate" in row["reasons"][0]


def test_a_slowdown_within_the_noise_passes(tmp_path):
    noisy = [0.6, 1.0, 1.5, 0.7, 1.4, 0.8, 1.3]
    comparison = _compare(tmp_path, _report([_entry("torch", noisy)]), _report([_entry("torch", [s * 1.2 for s in noisy])]))
    row = _row(comparison, "torch")
    assert row["e2e"]["change"] > 0.05 and row["e2e"]["low"] < 0
    assert row["e2e"]["verdict"] == "within noise" and row["status"] == "within noise" and comparison["passed"]
    assert not row["failed"] and "the interval reaches zero, so it passes; raise --repeats to tell" in row["reasons"][0]
    from sdexport.bench.compare import markdown  # (it read "✅ no change", which the interval does not say)

    text = markdown(comparison)
    assert "✅ no regression (1 within noise: raise --repeats)" in text
    assert "| ⚠️ within noise: beyond the 5% gate, but the interval reaches zero, so it passes; raise --repeats" in text
    faster = _compare(tmp_path, _report([_entry("torch", noisy)]), _report([_entry("torch", [s / 1.2 for s in noisy])]))
    row = _row(faster, "torch")  # (a noisy speed-up is no slowdown to warn of: the 5% gate limits slowdowns)
    assert row["e2e"]["verdict"] == "within noise" and row["status"] == "no change" and faster["passed"]


def test_a_small_steady_slowdown_under_the_threshold_passes(tmp_path):
    comparison = _compare(tmp_path, _report([_entry("torch", TIGHT)]), _report([_entry("torch", [s * 1.03 for s in TIGHT])]))
    assert _row(comparison, "torch")["e2e"]["verdict"] == "within threshold" and comparison["passed"]
    stricter = _compare(tmp_path, _report([_entry("torch", TIGHT)]), _report([_entry("torch", [s * 1.03 for s in TIGHT])]),
                        Gate(max_slowdown=0.01))
    assert _row(stricter, "torch")["status"] == "regression"


def test_a_speedup_is_an_improvement(tmp_path):
    comparison = _compare(tmp_path, _report([_entry("torch", TIGHT)]), _report([_entry("torch", [s * 0.7 for s in TIGHT])]))
    assert _row(comparison, "torch")["status"] == "improvement" and comparison["passed"]


def test_a_contender_that_stopped_working_fails_and_a_new_one_does_not(tmp_path):
    baseline = _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT)])
    new = _report([_entry("diffusers", TIGHT, psnr=None), _entry("onnxruntime-cpu", TIGHT)])
    new["results"].append({"contender": "torch", "status": "failed", "reason": "loading: RuntimeError: boom"})
    comparison = _compare(tmp_path, baseline, new)
    torch_row, ort_row = _row(comparison, "torch"), _row(comparison, "onnxruntime-cpu")
    assert torch_row["status"] == "missing" and "boom" in torch_row["reasons"][0] and not comparison["passed"]
    assert ort_row["status"] == "new" and not ort_row["failed"]


def test_a_contender_that_failed_in_the_baseline_is_shown_not_dropped(tmp_path, capsys):
    """TensorRT failed in the committed baseline: it is not gated, and the comparison says so (and
    says why once it runs) rather than leaving it out."""
    failed = {"contender": "tensorrt", "status": "failed", "reason": "loading: no TensorRT"}
    baseline = _report([_entry("torch", TIGHT), failed])
    both = _compare(tmp_path, baseline, _report([_entry("torch", TIGHT), dict(failed, reason="loading: gone")]))
    row = _row(both, "tensorrt")
    assert row["status"] == "unmeasured" and not row["failed"] and both["passed"]
    assert row["reasons"] == ["measured in neither run", "baseline: loading: no TensorRT", "new run: loading: gone"]
    assert run_cli("bench", "compare", tmp_path / "baseline.json", tmp_path / "new.json") == 0
    assert "| tensorrt | – | – | – | ⚠️ not measured: measured in neither run; baseline: loading: no TensorRT" in \
        capsys.readouterr().out
    ran = _compare(tmp_path, baseline, _report([_entry("torch", TIGHT), _entry("tensorrt", TIGHT)]))
    assert _row(ran, "tensorrt")["reasons"] == ["not measured in the baseline (loading: no TensorRT)"]


@pytest.mark.parametrize("results", [[], [{"contender": "torch", "status": "failed", "reason": "boom"}]])
def test_a_baseline_that_measured_nothing_is_refused(results, tmp_path, capsys):
    """Every run would pass against it: the gate would gate nothing."""
    baseline = _report([_entry("torch", TIGHT)])
    baseline["results"] = results
    _write(tmp_path, "baseline", baseline)
    _write(tmp_path, "new", _report([_entry("torch", TIGHT)]))
    assert run_cli("bench", "compare", tmp_path / "baseline.json", tmp_path / "new.json") == 2
    assert "measured nothing (every contender failed or none ran)" in capsys.readouterr().err


def test_the_psnr_floor_fails_a_contender_that_draws_something_else(tmp_path):
    baseline, new = _report([_entry("torch", TIGHT, psnr=45.0)]), _report([_entry("torch", TIGHT, psnr=12.0)])
    assert _compare(tmp_path, baseline, new)["passed"]
    comparison = _compare(tmp_path, baseline, new, Gate(min_psnr=30))
    row = _row(comparison, "torch")
    assert row["status"] == "regression" and "under the 30 dB floor" in row["reasons"][0]
    assert row["agreement"]["psnr_db_baseline"] == 45.0 and row["agreement"]["psnr_db_new"] == 12.0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"gpu": "NVIDIA L4"}, "device: NVIDIA H100 80GB HBM3 vs NVIDIA L4"),
        ({"precision": "fp32"}, "precision: fp16 vs fp32"),
        ({"scheduler": "ddim"}, "scenario scheduler: 'euler' vs 'ddim'"),
    ],
)
def test_runs_that_measure_different_things_are_refused_unless_allowed(tmp_path, capsys, change, words):
    settings = {"gpu": "NVIDIA H100 80GB HBM3", "precision": "fp16", "scheduler": "euler"}
    baseline = _write(tmp_path, "a", _report([_entry("torch", TIGHT)], **settings))
    new = _write(tmp_path, "b", _report([_entry("torch", TIGHT)], **{**settings, **change}))
    capsys.readouterr()
    assert run_cli("bench", "compare", baseline, new) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "--allow-mismatch" in err
    assert run_cli("bench", "compare", baseline, new, "--allow-mismatch") == 0
    assert words in capsys.readouterr().out


def test_settings_that_change_nothing_measured_do_not_make_runs_incomparable():
    """dtype "auto" and the precision it gave ("fp32" on a CPU), and how far the export was proven
    ([export] verify), were refused as other workloads, forcing --allow-mismatch, which then hides
    real differences (an audit). The precision, and the export's ranges, still count."""
    from sdexport.bench.compare import mismatches

    auto = _report([_entry("torch", TIGHT)], dtype="auto", export={"verify": "full"})
    assert mismatches(auto, _report([_entry("torch", TIGHT)], dtype="fp32", export={"verify": "none"})) == []
    assert mismatches(auto, _report([_entry("torch", TIGHT)], dtype="fp32", precision="fp16")) == [
        "precision: fp32 vs fp16"]
    assert mismatches(auto, _report([_entry("torch", TIGHT)], dtype="auto", export={"height": "64:64:128"})) == [
        "scenario export: {} vs {'height': '64:64:128'}"]


def test_reports_it_cannot_compare_are_refused_in_one_line(tmp_path, capsys):
    good = _write(tmp_path, "good", _report([_entry("torch", TIGHT)]))
    old = _report([_entry("torch", TIGHT)])
    del old["results"][0]["e2e_s"]["samples"]
    cases = [
        ((tmp_path / "absent.json", good), "no such benchmark report"),
        ((_write(tmp_path, "junk", {"x": 1}), good), "not an sdexport benchmark report"),
        ((good, _write(tmp_path, "old", old)), "older sdexport"),
        ((good, good, "--max-slowdown", "fast"), "give a percentage"),
        ((good, good, "--min-psnr", "nan"), "finite"),
    ]
    (tmp_path / "text.json").write_text("{not json")
    cases.append(((tmp_path / "text.json", good), "not readable JSON"))
    for args, words in cases:
        capsys.readouterr()
        assert run_cli("bench", "compare", *args) == 2, words
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_markdown_json_and_junit_say_the_same(tmp_path, capsys):
    baseline = _write(tmp_path, "a", _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT)]))
    new = _write(tmp_path, "b", _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", [s * 1.5 for s in TIGHT])]))
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert run_cli("bench", "compare", baseline, new, "-o", out) == 1
    printed = capsys.readouterr().out
    markdown = (out / "comparison.md").read_text()
    assert markdown.startswith(MARKER) and markdown.rstrip() in printed  # stdout unwrapped, as written
    assert "❌ 1 regression" in markdown and "| torch | batch 1, 10 steps | 1000.0 → 1500.0 |" in markdown
    data = json.loads((out / "comparison.json").read_text())
    assert data["passed"] is False and {r["contender"]: r["status"] for r in data["rows"]} == {
        "diffusers": "no change", "torch": "regression"}
    root = ET.parse(out / "comparison.xml").getroot()
    assert root.tag == "testsuites" and root.get("tests") == "2" and root.get("failures") == "1"
    cases = {c.get("classname"): c for c in root.iter("testcase")}
    failure = cases["sdexport-bench.synthetic.torch"].find("failure")
    assert failure is not None and "+50.0%" in failure.get("message") and "over the 5% gate" in failure.get("message")
    assert cases["sdexport-bench.synthetic.diffusers"].find("failure") is None
    # Its own output is replaced on the next comparison; a folder of the user's is not.
    assert run_cli("bench", "compare", baseline, _write(tmp_path, "a2", json.loads(baseline.read_text())), "-o", out) == 0
    assert json.loads((out / "comparison.json").read_text())["passed"] is True
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert run_cli("bench", "compare", baseline, new, "-o", mine) == 2
    assert "not an sdexport comparison output" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
    # nor is its own output once a file in it was edited (an audit's note, appended, was replaced)
    for name in ("comparison.md", "comparison.xml", "comparison.json"):
        with (out / name).open("a", encoding="utf-8") as file:
            file.write("\n<!-- checked by hand -->\n" if name != "comparison.json" else " ")
        if name == "comparison.json":  # (whitespace is not an edit of the report; a note is)
            assert run_cli("bench", "compare", baseline, new, "-o", out) == 1
            data = json.loads((out / name).read_text())
            (out / name).write_text(json.dumps({**data, "note": "accepted: the new scheduler"}))
        capsys.readouterr()
        assert run_cli("bench", "compare", baseline, new, "-o", out) == 2
        assert f"its {name} was changed since sdexport wrote it" in capsys.readouterr().err
        assert run_cli("bench", "compare", baseline, new, "-o", tmp_path / f"again-{name}") == 1
        shutil.rmtree(out)
        shutil.copytree(tmp_path / f"again-{name}", out)


def test_bench_keeps_running_scenarios_beside_its_new_subcommands(capsys):
    capsys.readouterr()
    assert run_cli("bench", "--help") == 0
    text = capsys.readouterr().out
    assert "compare" in text and "cache-key" in text
    assert run_cli("bench", "no-such-scenario.toml") == 2  # a scenario, not a subcommand
    assert "no such scenario file" in capsys.readouterr().err


def test_the_test_hook_refuses_what_it_cannot_slow(tmp_path, capsys, monkeypatch):
    scenario = ROOT / "benchmarks" / "scenarios" / "tiny-cpu.toml"
    for value, words in (("diffusers=0.1", "not a runtime contender"), ("torch=-1", "CONTENDER=SECONDS"),
                         ("torch", "CONTENDER=SECONDS")):
        monkeypatch.setenv("SDEXPORT_TEST_SLOW_UNET", value)
        capsys.readouterr()
        assert run_cli("bench", scenario, "-o", tmp_path / "out") == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- The gate end to end: ci/bench-gate.sh over real runs of the tiny model on this CPU ---------

GATE_SCENARIO = """
description = "tiny gate check"
model = "tiny"
height = 64
width = 64
steps = [4]
batch = [1]
warmup = 1
repeats = 5
contenders = ["diffusers", "torch"]
"""


def _gate(tmp_path: Path, baseline: Path, out: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "SDEXPORT_TEST_SLOW_UNET"}
    environment.update({"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "SDEXPORT_ENGINE_CACHE": str(tmp_path / "cache"),
                        "SDEXPORT_MAX_SLOWDOWN": "500%", **env})
    return subprocess.run(["bash", str(ROOT / "ci" / "bench-gate.sh"), str(tmp_path / "gate.toml"), str(baseline),
                           str(tmp_path / out)], capture_output=True, text=True, env=environment, timeout=600)


def _first_gate_run(tmp_path: Path) -> tuple[Path, dict]:
    """The gate with no baseline yet (reported, not gated); its report saved as the baseline."""
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    baseline = tmp_path / "baselines" / "gate.json"
    first = _gate(tmp_path, baseline, "run1")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = (tmp_path / "run1" / "summary.md").read_text()
    assert summary.startswith(MARKER) and "no baseline yet" in summary and str(baseline) in summary
    report = json.loads((tmp_path / "run1" / "bench" / "results.json").read_text())
    assert report["one_time"]["export"]["status"] == "cached now"
    baseline.parent.mkdir()
    baseline.write_text((tmp_path / "run1" / "bench" / "results.json").read_text())
    return baseline, report


def test_the_ci_gate_passes_a_rerun_and_refuses_another_gpu(tmp_path):
    baseline, report = _first_gate_run(tmp_path)

    # the same code again: no change, engines from the cache; judged as a ratio to diffusers' time in
    # the same run, so that a busy machine's drift between the runs cancels (an audit saw the same
    # code at +2133% on an absolute scale)
    second = _gate(tmp_path, baseline, "run2", SDEXPORT_RELATIVE_TO="diffusers")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = (tmp_path / "run2" / "summary.md").read_text()
    assert "✅ no regression" in summary
    # the comment bots' key: the marker, then the scenario and baseline (a comment per scenario's gate
    # on each runner's baseline)
    assert summary.splitlines()[:2] == [MARKER, (f"<!-- sdexport bench scenario: {tmp_path / 'gate.toml'}, "
                                                f"baseline: {baseline} -->")]
    rerun = json.loads((tmp_path / "run2" / "bench" / "results.json").read_text())
    assert rerun["one_time"]["export"] == {"status": "cached", "path": report["one_time"]["export"]["path"]}
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1

    other = copy.deepcopy(rerun)
    other["environment"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.2}
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = subprocess.run([sys.executable, "-m", "sdexport", "bench", "compare", str(baseline),
                              str(tmp_path / "other.json")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "device: CPU only" in refused.stderr and "NVIDIA H100" in refused.stderr


@pytest.mark.slow  # by default: compare's verdicts on fixed timings, the gate's on a slowed stand-in report
def test_the_ci_gate_flags_a_slowed_contender(tmp_path):
    """What a regression gate is for, on real runs: its half that a busy machine can blur (the
    slowed run against the same run's diffusers; see the module docstring)."""
    baseline, _ = _first_gate_run(tmp_path)
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]

    # A damaged entry is set aside (kept) and exported anew; the slowed contender fails the gate.
    weights = next(entries[0].glob("unet/*.onnx*"))
    weights.write_bytes(weights.read_bytes()[:-1])
    # +1 s on well under 0.1 s, judged at 200% of the ratio to diffusers (see the module docstring).
    # Into run1 again: the gate replaces its own earlier bench output (and, in the default run's
    # stand-in test, compare's).
    slowed = _gate(tmp_path, baseline, "run1", SDEXPORT_TEST_SLOW_UNET="torch=0.25", SDEXPORT_MAX_SLOWDOWN="200%",
                   SDEXPORT_RELATIVE_TO="diffusers")
    assert slowed.returncode == 1, slowed.stdout[-3000:] + slowed.stderr[-3000:]
    assert "is damaged" in slowed.stdout + slowed.stderr
    assert len([p for p in (tmp_path / "cache").iterdir() if ".damaged-" in p.name]) == 1
    assert json.loads((tmp_path / "run1" / "bench" / "results.json").read_text())["one_time"]["export"]["status"] == "cached now"
    summary = (tmp_path / "run1" / "summary.md").read_text()
    assert "❌ 1 regression" in summary and "slowed on purpose" in summary
    root = ET.parse(tmp_path / "run1" / "compare" / "comparison.xml").getroot()
    failed = [c.get("classname") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["sdexport-bench.gate.torch"]


def test_an_interrupted_run_is_compared_for_what_it_measured_and_says_it_did_not_finish(tmp_path):
    from sdexport.bench.compare import markdown

    reason = "interrupted by SIGTERM while measuring torch, batch 1, 10 steps, 300 s into the benchmark"
    new = _report([_entry("diffusers", TIGHT, psnr=None),
                   {"contender": "torch", "status": "interrupted", "case": {"batch": 1, "steps": 10},
                    "reason": "interrupted by SIGTERM while it was measured"}])
    new["interrupted"] = {"by": "SIGTERM", "reason": reason}
    comparison = _compare(tmp_path, _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT)]), new)
    assert not comparison["passed"] and comparison["new"]["interrupted"] == reason
    assert _row(comparison, "diffusers")["status"] == "no change"
    assert _row(comparison, "torch")["reasons"] == [
        "measured in the baseline; new run: interrupted by SIGTERM while it was measured"]
    assert f"- **The new run did not finish**: {reason}; only what it measured before that is compared" \
        in markdown(comparison)


def test_an_interrupted_baseline_is_refused_unless_asked(tmp_path, capsys):
    """Committed as the baseline, a run that never reached a contender would let that contender go
    unchecked for good: refused in one line; --allow-mismatch compares what it has, and says so."""
    from sdexport.bench.compare import markdown

    baseline = _report([_entry("diffusers", TIGHT, psnr=None)])
    baseline["interrupted"] = {"by": "Ctrl-C", "reason": "interrupted by Ctrl-C while loading torch (9 s into the benchmark)"}
    new = _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT)])
    paths = _write(tmp_path, "baseline", baseline), _write(tmp_path, "new", new)
    assert run_cli("bench", "compare", *paths) == 2
    assert "did not finish (interrupted by Ctrl-C while loading torch" in " ".join(capsys.readouterr().err.split())
    comparison = _compare(tmp_path, baseline, new, Gate(allow_mismatch=True))
    assert comparison["passed"] and "- **The baseline run did not finish**" in markdown(comparison)


def _stand_in_bench(tmp_path: Path) -> Path:
    """A PYTHON for the gate whose benchmark is still running when the job is signalled: like sdexport
    bench, it then writes the report of what it measured and ends with status 130 (its report marked
    interrupted, unless STAND_IN_WHOLE is set: the signal came once the measuring had finished)."""
    script = tmp_path / "python"
    script.write_text("""#!/usr/bin/env bash
[[ $1 == -c ]] && exec "$REAL_PYTHON" "$@"  # the gate's own checks
out=""
for ((i = 1; i <= $#; i++)); do [[ ${!i} == -o ]] && { j=$((i + 1)); out=${!j}; }; done
trap 'kill $! 2>/dev/null; sleep 0.5; mkdir -p "$out"; echo "| diffusers | 55.8 |" > "$out/results.md"
      if [[ -n ${STAND_IN_WHOLE:-} ]]; then echo "{}"; else echo "{\\"interrupted\\": {\\"by\\": \\"SIGTERM\\"}}"; fi \\
        > "$out/results.json"; exit 130' TERM
touch "$STAND_IN_STARTED"
sleep 60 & wait $!
""")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("who, sig, whole", [("group", "SIGTERM", False), ("gate", "SIGINT", False),
                                             ("gate", "SIGTERM", True)])
def test_the_ci_gate_shows_what_an_interrupted_benchmark_measured(tmp_path, who, sig, whole):
    """A CI timeout or cancel signals the whole job, or (GitHub Actions: SIGINT, then SIGTERM) only the
    step's own process, which the workflow makes the gate: either way the benchmark is told, writes
    its report, the summary shows it, and the gate fails as a benchmark that did not finish (3)."""
    import signal
    import time

    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    started = tmp_path / "started"
    env = {**os.environ, "PYTHON": str(_stand_in_bench(tmp_path)), "STAND_IN_STARTED": str(started),
           **({"STAND_IN_WHOLE": "1"} if whole else {}),
           "REAL_PYTHON": sys.executable}
    gate = subprocess.Popen(["bash", str(ROOT / "ci" / "bench-gate.sh"), str(tmp_path / "gate.toml"),
                             str(tmp_path / "baseline.json"), str(tmp_path / "run")], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # as a CI runner starts it: a test run started in the background has SIGINT
                            # ignored, and a shell cannot trap a signal ignored when it started
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    number = getattr(signal, sig)
    if who == "group":
        os.killpg(gate.pid, number)
    else:
        gate.send_signal(number)
    output, _ = gate.communicate(timeout=30)
    assert gate.returncode == 3, output
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert summary.startswith(MARKER) and "did not finish" in summary
    assert (f"wrote its whole report, then ended with status 130 ({sig})" if whole else f"interrupted ({sig})") in summary
    assert "| diffusers | 55.8 |" in summary


def test_an_output_folders_key_stamps_the_model_files_instead_of_hashing_them(tmp_path):
    """``by_content=False`` (an output's own engines): the same files give the same key; a file
    rewritten with other bytes of the same size, or moved, gives another, as the content key does."""
    import os

    from sdexport.bench.engine_cache import export_key
    from sdexport.bench.scenario import Scenario
    from sdexport.shapes import ShapeProfile

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "w.bin"
    weights.write_bytes(b"a" * 64)
    scenario = Scenario(name="s", model=str(model))

    def keys() -> tuple[str, str]:
        return tuple(export_key(scenario, (model,), ShapeProfile(), "fp32", ["unet"], by_content=content)
                     for content in (True, False))

    first = keys()
    assert keys() == first and first[0] != first[1]
    stat = weights.stat()
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = keys()
    assert second[0] != first[0] and second[1] != first[1]
    weights.rename(model / "unet" / "v.bin")
    third = keys()
    assert third[1] != second[1]
    # other bytes of the same size with the modification time set back (cp -p, rsync --inplace -t):
    # only the change time tells (an audit)
    moved = model / "unet" / "v.bin"
    stat = moved.stat()
    time.sleep(0.05)  # (past the kernel's coarse clock tick, which stamps the rename's change time)
    moved.write_bytes(b"c" * 64)
    os.utime(moved, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert keys()[1] != third[1]


def test_the_engine_code_digest_reads_the_models_data_and_a_stamp_it_cannot_set_blocks_nothing(tmp_path, monkeypatch):
    """The presets' CLIP merges (models/data), which the exported tokenizers are made of, were left out
    of the key; and an entry whose time could not be set (another user's, in a shared cache) stopped
    the bench before it measured anything (an audit)."""
    import os

    from sdexport.bench import engine_cache

    read = []
    real = engine_cache._tree_digest
    monkeypatch.setattr(engine_cache, "_tree_digest",
                        lambda root, pattern="*", **kw: read.append((root.name, pattern)) or real(root, pattern, **kw))
    engine_cache.engine_code_digest()
    assert ("models", "*") in read and ("export", "*.py") in read

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "utime", refused)
    engine_cache.mark_used(tmp_path)


def test_the_engine_cache_key_follows_what_the_export_depends_on(tmp_path, capsys):
    from sdexport.bench.harness import engine_cache_entry
    from sdexport.bench.plan import Options, plan_bench
    from sdexport.bench.scenario import load_scenario

    def entry(text: str) -> str:
        path = tmp_path / "gate.toml"
        path.write_text(text)
        scenario = load_scenario(path)
        return engine_cache_entry(scenario, plan_bench(scenario, Options()), tmp_path).name

    base = entry(GATE_SCENARIO)
    assert base.startswith("gate-") and len(base) == len("gate-") + 16
    # What the graphs do not depend on keeps the key: repeats, contenders, prompt, steps.
    assert entry(GATE_SCENARIO.replace("repeats = 5", "repeats = 9") + 'prompt = "a red fox"\n') == base
    assert entry(GATE_SCENARIO.replace("steps = [4]", "steps = [10]")) == base
    # The profile, the precision, the ControlNets and img2img's VAE encoder change it.
    assert entry(GATE_SCENARIO.replace("height = 64", "height = 128")) != base
    assert entry(GATE_SCENARIO + 'dtype = "fp16"\n') != base
    one_controlnet = entry(GATE_SCENARIO + 'controlnets = ["tiny-controlnet"]\n')
    assert one_controlnet != base
    # another ControlNet in its place (as many components) changes it too
    from sdexport.models import load_model

    net = tmp_path / "my-controlnet"
    load_model("tiny", controlnets=["tiny-controlnet"]).module("controlnet").save_pretrained(net)
    assert entry(GATE_SCENARIO + f'controlnets = ["{net}"]\n') not in (base, one_controlnet)
    # a model read from disk by its content, not by where it lies or how its path is spelt
    model = tmp_path / "m1"
    load_model("tiny").save_pretrained(model)
    shutil.copytree(model, tmp_path / "m2")
    on_disk = {entry(GATE_SCENARIO.replace('model = "tiny"', f'model = "{path}"'))
               for path in (model, tmp_path / "m2", f"{tmp_path}/./m1")}
    assert len(on_disk) == 1 and on_disk != {base}
    assert entry(GATE_SCENARIO + "strength = 0.5\n") != base
    assert entry(GATE_SCENARIO + "inpaint = true\n") != base  # the VAE encoder too
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    capsys.readouterr()
    assert run_cli("bench", "cache-key", tmp_path / "gate.toml") == 0
    assert capsys.readouterr().out.strip() == base
    assert run_cli("bench", tmp_path / "gate.toml", "--engine-cache", tmp_path / "c", "--engine-dir", tmp_path) == 2
    assert "give one" in capsys.readouterr().err


def test_too_few_repeats_are_not_judged_and_fail_only_a_gate_that_must_judge(tmp_path, capsys):
    """Shown as not judged (in the JSON and the JUnit file too, not as "no change"); the CI gate
    fails them (--fail-unjudged), or a merge request that lowers the repeats passes any slowdown."""
    from sdexport.bench.compare import junit_xml, markdown

    baseline, new = _report([_entry("torch", [1.0, 1.01])]), _report([_entry("torch", [1.5, 1.51])])
    comparison = _compare(tmp_path, baseline, new)
    row = _row(comparison, "torch")
    assert row["e2e"]["verdict"] == "too few repeats" and row["status"] == "not judged" and comparison["passed"]
    assert "at least 5" in row["reasons"][0]
    text = markdown(comparison)
    assert "⚠️ 1 case not judged (too few repeats)" in text and "Fewer than 5 repeats" in text
    assert "| ⚠️ not judged: 2 repeats" in text
    assert 'failures="0" skipped="1"' in junit_xml(comparison)
    gated = _compare(tmp_path, baseline, new, Gate(fail_unjudged=True))
    assert _row(gated, "torch")["failed"] and not gated["passed"]
    text = markdown(gated)
    assert "❌ 1 not judged (too few repeats)" in text and "fails the gate (--fail-unjudged)" in text
    assert 'failures="1"' in junit_xml(gated)
    assert run_cli("bench", "compare", tmp_path / "baseline.json", tmp_path / "new.json", "--fail-unjudged") == 1


def test_a_change_of_warm_up_is_shown_and_a_run_without_one_is_named(tmp_path):
    """Repeats were shown, warm-up not: a new run with --warmup 0 (its first, cold call a timed
    sample) was compared without a word (an audit's finding)."""
    from sdexport.bench.compare import markdown

    baseline, new = _report([_entry("torch", TIGHT)], warmup=1), _report([_entry("torch", TIGHT)], warmup=0)
    text = markdown(_compare(tmp_path, baseline, new))
    assert "repeats 7 → 7, warm-up runs 1 → 0" in text
    assert "**The new run had no warm-up**: each case's first call" in text
    same = markdown(_compare(tmp_path, baseline, baseline | {}))
    assert "warm-up" not in same
    # both cold: no change to show, and no "the other run's are" steady-state (mutation testing round 8:
    # the change's condition, dropped, failed no test)
    assert "warm-up" not in markdown(_compare(tmp_path, new, new | {}))


def test_a_failing_row_with_too_few_repeats_shows_as_failing(tmp_path):
    """It showed as "not judged" under a title that counted it as a regression."""
    from sdexport.bench.compare import markdown

    comparison = _compare(tmp_path, _report([_entry("torch", [1.0, 1.01])]),
                          _report([_entry("torch", [2.0, 2.01], psnr=10.0)]), Gate(min_psnr=40))
    assert _row(comparison, "torch")["status"] == "regression" and not comparison["passed"]
    assert "| ❌ regression |" in markdown(comparison)


def test_the_psnr_floor_holds_for_a_contender_new_in_the_run(tmp_path):
    """One that failed in the baseline and now runs, drawing garbage, is what the floor is for."""
    baseline = _report([_entry("diffusers", TIGHT, psnr=None),
                        {"contender": "torch", "status": "failed", "reason": "loading: RuntimeError: boom"}])
    new = _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT, psnr=5.0)])
    comparison = _compare(tmp_path, baseline, new, Gate(min_psnr=30))
    row = _row(comparison, "torch")
    assert row["status"] == "regression" and row["failed"] and not comparison["passed"]
    assert "PSNR 5.0 dB against diffusers, under the 30 dB floor" in row["reasons"]
    assert row["agreement"]["psnr_db_new"] == 5.0
    fine = _compare(tmp_path, baseline, _report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT)]),
                    Gate(min_psnr=30))
    assert _row(fine, "torch")["status"] == "new" and fine["passed"]


def test_agreement_that_is_not_a_number_fails_the_floor_and_json_stays_strict(tmp_path):
    baseline = _report([_entry("torch", TIGHT, psnr=float("inf"))])
    new = _report([_entry("torch", TIGHT, psnr=float("nan"))])
    comparison = _compare(tmp_path, baseline, new, Gate(min_psnr=30))
    assert _row(comparison, "torch")["status"] == "regression"
    from sdexport.bench.compare import write_comparison

    paths = write_comparison(comparison, tmp_path / "out")
    strict = json.loads(paths[0].read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert strict["rows"][0]["agreement"] == {"psnr_db_baseline": "inf", "psnr_db_new": None,
                                              "latents_rel_l2_baseline": 1e-3, "latents_rel_l2_new": 1e-3}
    assert "| ∞ → – |" in paths[1].read_text()


def test_identical_images_are_written_as_inf_in_strict_json_and_pass_the_floor(tmp_path, monkeypatch):
    """results.json held a bare Infinity (no JSON parser but Python's reads it); written as "inf", it
    still counts as infinite agreement, as an older report's Infinity does."""
    from sdexport.bench import report as reports

    monkeypatch.setattr(reports, "markdown", lambda report: "")  # (the synthetic report has no scenario text)
    monkeypatch.setattr(reports, "plot", lambda report, path: None)
    write_report = reports.write_report
    report = _report([_entry("torch", TIGHT, psnr=float("inf"))])
    path = write_report(report, tmp_path / "new")[0]
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert strict["results"][0]["agreement"]["psnr_db"] == "inf"
    comparison = compare(_write(tmp_path, "old", report), path, Gate(min_psnr=30))
    assert _row(comparison, "torch")["status"] != "regression" and comparison["passed"]


def test_a_report_saved_with_a_byte_order_mark_is_read(tmp_path):
    """A baseline edited by a Windows editor starts with a BOM: refused as "not readable JSON",
    where a scenario file with one is read."""
    good = _write(tmp_path, "good", _report([_entry("torch", TIGHT)]))
    marked = _write(tmp_path, "marked", _report([_entry("torch", TIGHT)]))
    marked.write_bytes(b"\xef\xbb\xbf" + marked.read_bytes())
    assert run_cli("bench", "compare", good, marked) == 0


@pytest.mark.parametrize("damage", [
    lambda r: r.update(results={"torch": 1}),
    lambda r: r.update(environment=None),
    lambda r: r["results"][0].pop("contender"),
    lambda r: r["results"][0]["e2e_s"].update(samples=[]),
    lambda r: r["results"][0]["e2e_s"].update(samples=[0.0, 0.0]),
    lambda r: r["results"][0]["case"].update(batch="1"),  # rows sort by it: a TypeError, exit 1, read as a regression
    lambda r: r["results"][0]["case"].update(steps=1.5),  # else "not in the new run", silently
    lambda r: r["scenario"].update(repeats="five"),  # compared with MIN_REPEATS: a TypeError
    lambda r: r["results"][0]["agreement"].update(latents_rel_l2="bad"),  # formatted as a number
    lambda r: r["results"][0]["agreement"].update(psnr_db="high"),
])
def test_a_damaged_report_is_refused_in_one_line(tmp_path, capsys, damage):
    report = _report([_entry("torch", TIGHT)])
    damage(report)
    good = _write(tmp_path, "good", _report([_entry("torch", TIGHT)]))
    capsys.readouterr()
    assert run_cli("bench", "compare", good, _write(tmp_path, "bad", report)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a benchmark report sdexport can compare" in err, err


def test_runs_sharing_a_cache_entry_take_turns(tmp_path, capsys):
    import threading
    import time

    from sdexport.bench.engine_cache import in_use

    entry, order = tmp_path / "cache" / "s-0123", []

    def second() -> None:
        with in_use(entry):
            order.append("second")

    with in_use(entry):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(10)
    assert order == ["first done", "second"]
    assert "waiting for another benchmark run" in capsys.readouterr().err
    # the mark is new while a run holds it and gone after: it was left for good, untouched by later
    # runs, so the README's month-old clean-up listed (and would remove) the mark of an entry in use,
    # letting the next run in beside the holder (an audit's finding)
    mark = entry.parent / f".{entry.name}.in-use"
    assert not mark.exists()
    mark.touch()
    os.utime(mark, (time.time() - 40 * 86400,) * 2)  # as an earlier sdexport left it, a run 40 days ago
    with in_use(entry):
        assert time.time() - mark.stat().st_mtime < 60
    assert not mark.exists()


def test_an_unusable_engine_cache_or_gate_folder_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert run_cli("bench", tmp_path / "gate.toml", "--engine-cache", tmp_path / "file" / "c") == 2
    captured = capsys.readouterr()
    assert "--engine-cache" in captured.err and "Loading" not in captured.out + captured.err
    engines = tmp_path / "engines"  # an engine directory named as the cache: nothing written in it
    engines.mkdir()
    (engines / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    assert run_cli("bench", tmp_path / "gate.toml", "--engine-cache", engines) == 2
    captured = capsys.readouterr()
    assert f"--engine-cache {engines}: inside the engine directory {engines}" in captured.err
    assert "Loading" not in captured.out + captured.err and sorted(p.name for p in engines.iterdir()) == ["manifest.json"]
    (tmp_path / "out" / "compare").mkdir(parents=True)
    (tmp_path / "out" / "compare" / "notes.txt").write_text("mine")
    result = _gate(tmp_path, tmp_path / "none.json", "out")
    assert result.returncode == 2 and "out/compare is not a compare output this gate wrote" in result.stderr
    assert (tmp_path / "out" / "compare" / "notes.txt").read_text() == "mine"
    archive = tmp_path / "out3" / "bench" / "results.2025-archive"  # named like a result, not one
    archive.mkdir(parents=True)
    (archive / "notes.txt").write_text("precious")
    result = _gate(tmp_path, tmp_path / "none.json", "out3")
    assert result.returncode == 2, result.stderr
    assert "out3/bench is not a bench output this gate wrote (it has no readable results.json)" in result.stderr
    assert (archive / "notes.txt").read_text() == "precious"
    required = _gate(tmp_path, tmp_path / "none.json", "out2", SDEXPORT_REQUIRE_BASELINE="1")  # before benchmarking
    assert required.returncode == 2 and "no baseline" in required.stderr and not (tmp_path / "out2" / "bench").exists()


@pytest.mark.parametrize(("setting", "words"), [
    ({"SDEXPORT_MAX_SLOWDOWN": "0.05"}, "SDEXPORT_MAX_SLOWDOWN 0.05: a percentage; write 5%"),
    ({"SDEXPORT_MIN_PSNR": "nan"}, "SDEXPORT_MIN_PSNR nan: need a finite number of dB"),
    ({"SDEXPORT_MIN_PSNR": "high"}, "SDEXPORT_MIN_PSNR high: need a finite number of dB"),
    ({"SDEXPORT_RELATIVE_TO": "difusers"}, "SDEXPORT_RELATIVE_TO 'difusers': not a contender"),
    # settings the run cannot satisfy: the whole benchmark ran, then compare refused, and the summary
    # said only "See the job log"
    ({"SDEXPORT_RELATIVE_TO": "onnxruntime-cpu"},
     "SDEXPORT_RELATIVE_TO onnxruntime-cpu: the run's contenders (diffusers, torch) do not include it"),
    ({"SDEXPORT_RELATIVE_TO": "diffusers", "SDEXPORT_BENCH_ARGS": "--contenders torch"},
     "SDEXPORT_RELATIVE_TO diffusers: the run's contenders (torch) do not include it"),
    ({"SDEXPORT_MIN_PSNR": "30", "SDEXPORT_BENCH_ARGS": "--contenders=torch,onnxruntime-cpu"},
     "SDEXPORT_MIN_PSNR 30: the run's contenders (torch, onnxruntime-cpu) hold no baseline"),
    # the run would go elsewhere (the gate then said to commit OUT/bench/results.json, which was not there)
    ({"SDEXPORT_BENCH_ARGS": "--repeats 5 -o /tmp/elsewhere"}, "SDEXPORT_BENCH_ARGS: -o is the gate's own"),
    ({"SDEXPORT_BENCH_ARGS": "--engine-cache=/tmp/c"}, "SDEXPORT_BENCH_ARGS: --engine-cache=/tmp/c is the gate's own"),
    ({"SDEXPORT_BENCH_ARGS": "-qo /tmp/elsewhere"}, "SDEXPORT_BENCH_ARGS: -qo is the gate's own"),  # (bundled)
    ({"SDEXPORT_BENCH_ARGS": "--help"}, "SDEXPORT_BENCH_ARGS: --help prints and benchmarks nothing"),
    ({"scenario": "missing"}, "gate.toml: no such scenario file"),
    ({"summary": "my notes"}, "summary.md was not written by this gate"),
    ({"summary": "\0binary\n"}, "summary.md was not written by this gate"),
])
def test_the_gate_refuses_bad_settings_and_a_summary_it_did_not_write_before_anything_runs(tmp_path, setting, words):
    """A benchmark takes the whole job: a setting that would only fail at the comparison is refused
    at the start, with a summary saying why (the earlier run's results cleared: a comment updated
    from OUT must not show them as this run's). An OUT whose summary.md is the user's (the gate
    would overwrite it) is refused with nothing in OUT touched."""
    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)  # an earlier run's report (what proves it is one)
    (out / "bench" / "results.json").write_text(json.dumps({"scenario": {}, "results": [], "environment": {}}))
    (out / "bench" / "results.md").write_text("an earlier run's")
    mine = setting.pop("summary", None)
    if mine is not None:
        (out / "summary.md").write_text(mine)
    scenario = setting.pop("scenario", "gate.toml")
    if scenario == "gate.toml":
        (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    else:
        (tmp_path / "gate.toml").unlink(missing_ok=True)
    result = _gate(tmp_path, tmp_path / "none.json", "out", **setting)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if "summary" in words:
        assert (out / "bench" / "results.md").read_text() == "an earlier run's"
        assert (out / "summary.md").read_text() == mine
    else:
        summary = (out / "summary.md").read_text()
        assert summary.startswith(MARKER) and "did not run" in summary and words in summary
        assert sorted(p.name for p in out.iterdir()) == ["summary.md"]


@pytest.mark.parametrize(("case", "words"), [
    ("inside", "lies in"),  # the last run's results as the baseline: deleted, then the run compared with itself
    ("dangling", "is a link to nothing"),  # a moved baseline: not "no baseline yet", which passes
    ("require-true", "no baseline at"),  # a CI variable's natural spelling
    ("require-bad", "SDEXPORT_REQUIRE_BASELINE=sometimes: use 1"),
    ("no-home", "neither SDEXPORT_ENGINE_CACHE nor HOME is set"),
    ("out-a-file", "cannot make the folder"),  # a setup error, not exit 1 (a regression)
])
def test_the_gate_refuses_a_baseline_it_would_lose_or_miss_and_setup_errors_with_2(tmp_path, case, words):
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    out, env = "out", {}
    baseline = tmp_path / "baseline.json"
    if case == "inside":
        baseline = tmp_path / "out" / "bench" / "results.json"
        baseline.parent.mkdir(parents=True)
        baseline.write_text("{}")
    elif case == "dangling":
        baseline.symlink_to(tmp_path / "moved.json")
    elif case.startswith("require"):
        env["SDEXPORT_REQUIRE_BASELINE"] = "true" if case == "require-true" else "sometimes"
    elif case == "no-home":
        env = {"SDEXPORT_ENGINE_CACHE": "", "HOME": ""}
    else:
        (tmp_path / "taken").write_text("mine")
        out = "taken"
    result = _gate(tmp_path, baseline, out, **env)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / out / "summary.md").exists() or case == "require-true"  # nothing ran
    if case == "inside":
        assert baseline.read_text() == "{}"
    if case == "out-a-file":
        assert (tmp_path / "taken").read_text() == "mine"


def _report_writing_bench(tmp_path: Path) -> Path:
    """A PYTHON for the gate whose benchmark writes the report STAND_IN_REPORT names, as written, in
    a moment (anything else runs in this interpreter: compare is real)."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -m && $3 == bench && $4 != compare ]]; then  # the benchmark: STAND_IN_REPORT, as written
  for ((i = 1; i <= $#; i++)); do [[ ${{!i}} == -o ]] && {{ j=$((i + 1)); out=${{!j}}; }}; done
  mkdir -p "$out" && cp "$STAND_IN_REPORT" "$out/results.json" && echo "| stand-in |" > "$out/results.md" && exit 0
fi
exec {sys.executable} "$@"
""")
    stand_in.chmod(0o755)
    return stand_in


def test_a_comparison_the_gate_could_not_make_says_why_in_the_summary(tmp_path):
    """The summary posted to the merge request said "See the job log for the reason": it carries
    compare's one-line refusal now (here, a baseline of another GPU; the benchmark is a stand-in
    that writes a finished CPU report)."""
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    baseline = _write(tmp_path, "baseline", _report([_entry("diffusers", TIGHT)], gpu="NVIDIA H100 80GB HBM3"))
    report = _write(tmp_path, "report", _report([_entry("diffusers", TIGHT)]))
    result = _gate(tmp_path, baseline, "out", PYTHON=str(_report_writing_bench(tmp_path)), STAND_IN_REPORT=str(report))
    assert result.returncode == 2, result.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.splitlines()[1] == f"<!-- sdexport bench scenario: {tmp_path / 'gate.toml'}, baseline: {baseline} -->"
    assert "could not be compared" in summary and "NVIDIA H100" in summary and "See the job log" not in summary, summary


def test_the_gate_fails_a_slowed_report_and_replaces_its_own_outputs_on_the_next_run(tmp_path):
    """The verdict side of the slowed gate run (-m slow) on a stand-in benchmark that writes a
    synthetic report: torch four times slower, the test hook recorded. Exit 1, the summary and the
    JUnit failure say so; a second run into the same folder replaces the bench/ and compare/ the
    first wrote (proved to be bench's and compare's) and passes."""
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    baseline = _write(tmp_path, "baseline", _report([_entry("diffusers", TIGHT), _entry("torch", TIGHT)]))
    slowed = _report([_entry("diffusers", TIGHT), _entry("torch", [s * 4 for s in TIGHT])])
    slowed["test_hooks"] = {"SDEXPORT_TEST_SLOW_UNET": {"torch": 0.25}}
    stand_in = _report_writing_bench(tmp_path)
    failed = _gate(tmp_path, baseline, "out", PYTHON=str(stand_in), STAND_IN_REPORT=str(_write(tmp_path, "slowed", slowed)),
                   SDEXPORT_MAX_SLOWDOWN="200%", SDEXPORT_RELATIVE_TO="diffusers")
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith(MARKER) and "❌ 1 regression" in summary and "slowed on purpose" in summary
    root = ET.parse(tmp_path / "out" / "compare" / "comparison.xml").getroot()
    assert [c.get("classname") for c in root.iter("testcase") if c.find("failure") is not None] == [
        "sdexport-bench.synthetic.torch"]
    passed = _gate(tmp_path, baseline, "out", PYTHON=str(stand_in), STAND_IN_REPORT=str(baseline),
                   SDEXPORT_RELATIVE_TO="diffusers")
    assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-3000:]
    assert "✅ no regression" in (tmp_path / "out" / "summary.md").read_text()
    assert json.loads((tmp_path / "out" / "compare" / "comparison.json").read_text())["passed"] is True


def test_a_python_sdexport_cannot_run_in_is_the_benchmarks_failure_not_a_refusal(tmp_path):
    """A PYTHON without sdexport's dependencies failed the settings check's imports, and the gate
    exited 2 (the runs could not be compared: bad input) where its table gives 3."""
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'rich'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    result = _gate(tmp_path, tmp_path / "none.json", "out", PYTHON=str(broken))
    assert result.returncode == 3, result.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"sdexport cannot run with {broken}: ModuleNotFoundError: No module named 'rich'" in summary


def test_bench_arguments_the_benchmark_refuses_are_said_to_be_refused(tmp_path):
    """Exit 3 as any benchmark that did not run (sdexport's exit 2 is also 'no contender could run
    here', a broken runner, not bad input); the summary says it refused, not that it failed."""
    (tmp_path / "gate.toml").write_text(GATE_SCENARIO)
    result = _gate(tmp_path, tmp_path / "none.json", "out", SDEXPORT_BENCH_ARGS="--repeats 0")
    assert result.returncode == 3 and "--repeats" in result.stderr, result.stderr
    assert "The benchmark refused to run" in (tmp_path / "out" / "summary.md").read_text()


def test_a_cache_entry_is_judged_by_its_export_and_leaves_plans_to_their_builders(tiny_engine_dir, tmp_path):
    import shutil

    from sdexport.bench.engine_cache import damage
    from sdexport.manifest import load_manifest, save_manifest

    entry = tmp_path / "tiny-0123"
    shutil.copytree(tiny_engine_dir, entry)
    manifest = load_manifest(entry, verify_files=False)
    # A build stopped halfway: listed, not (yet) on disk. Its builder rebuilds it.
    manifest.files["unet/0123456789abcdef.plan"] = "0" * 64
    manifest.files["unet/onnxruntime-cuda/model.onnx"] = "0" * 64
    save_manifest(entry, manifest)
    assert damage(entry) is None
    graph = entry / "vae_decoder" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert "vae_decoder/model.onnx does not match its sha256" in damage(entry)


def test_the_gate_settings_refuse_what_would_check_nothing_or_mean_something_else(tmp_path, capsys):
    baseline = _write(tmp_path, "a", _report([_entry("torch", TIGHT, psnr=None)]))
    again = _write(tmp_path, "b", _report([_entry("torch", TIGHT, psnr=None)]))
    for args, words in ((("--max-slowdown", "0.05"), "write 5%"), (("--max-slowdown", "1001"), "from 0 to 1000"),
                        (("--min-psnr", "30"), "no agreement figures")):
        capsys.readouterr()
        assert run_cli("bench", "compare", baseline, again, *args) == 2
        assert words in capsys.readouterr().err
    assert run_cli("bench", "compare", baseline, again, "--max-slowdown", "0.5%") == 0


def test_the_title_names_missing_contenders_apart_from_regressions(tmp_path):
    from sdexport.bench.compare import markdown

    baseline = _report([_entry("torch", TIGHT), _entry("onnxruntime-cpu", TIGHT)])
    new = _report([_entry("torch", [s * 1.5 for s in TIGHT])])
    assert "❌ 1 regression, 1 missing" in markdown(_compare(tmp_path, baseline, new))


def test_cpu_only_runs_with_other_thread_counts_are_not_compared():
    """ONNX Runtime's CPU sessions follow OMP_NUM_THREADS (sdexport.console.cpu_threads_asked): the
    count is part of a CPU-only device, so two settings are not read as a regression."""
    from sdexport.bench.compare import device_label, mismatches

    one = _report([_entry("torch", TIGHT)])
    other = copy.deepcopy(one)
    other["environment"]["host"]["cpu_threads"] = 1
    assert device_label(one) == "CPU only: Test CPU, 2 cores"
    assert device_label(other) == "CPU only: Test CPU, 2 cores, OMP_NUM_THREADS=1"
    assert mismatches(one, other) == ["device: CPU only: Test CPU, 2 cores vs CPU only: Test CPU, 2 cores, OMP_NUM_THREADS=1"]


def test_runs_of_engines_exported_for_other_shapes_are_not_compared():
    """--engine-dir times engines the scenario's export settings do not describe (an audit's wide
    profile compared as the same workload); reports from before the record are not held to it."""
    from sdexport.bench.compare import mismatches

    one = _report([_entry("torch", TIGHT)])
    profile = {"batch": [1, 1, 4], "height": [256, 512, 1024], "width": [256, 512, 1024], "chunks": [1, 1, 2]}
    ours, wide = copy.deepcopy(one), copy.deepcopy(one)
    ours["engines"] = {"dtype": "fp16", "profile": profile}
    wide["engines"] = {"dtype": "fp16", "profile": {**profile, "height": [64, 256, 512]}}
    wide["command_line"] = {"--engine-dir": "wide"}
    assert mismatches(ours, wide) == ["engines: height 256:512:1024 vs 64:256:512 (--engine-dir)"]
    assert mismatches(one, wide) == [] and mismatches(ours, copy.deepcopy(ours)) == []
    # each differing axis with its opt, a left-out chunks axis read as one window, and the cause a
    # run without --engine-dir has (the words summed up every axis's span: an opt that differed read
    # the same on both sides, chunks '?', and '--engine-dir?' where no run had one; an audit's finding)
    one_chunk = {k: v for k, v in profile.items() if k != "chunks"}
    batches = copy.deepcopy(ours)
    batches["engines"] = {"dtype": "fp32", "profile": {**one_chunk, "batch": [1, 2, 4]}}
    assert mismatches(ours, batches) == [(
        "engines: precision fp16 vs fp32; batch 1:1:4 vs 1:2:4; prompt chunks 1:1:2 vs 1:1:1 (the scenario's batch "
        "sizes and image size, or its [export] ranges, set them)")]
    fp32 = copy.deepcopy(ours)  # the precision alone: no word of the shapes (a review's finding)
    fp32["engines"]["dtype"] = "fp32"
    assert mismatches(ours, fp32) == ["engines: precision fp16 vs fp32"]


def test_a_run_pinned_to_fewer_cores_is_another_device():
    """os.cpu_count() is the machine's; a run under taskset or a container's cpuset ran on fewer (an
    audit's one-core run, its U-Net steps +139%, compared as the same device). Runs that could use
    every core keep the machine's count alone; a report from before the field is compared by the
    machine's count (a runner in a cpuset keeps the baseline it committed)."""
    import os

    from sdexport.bench.compare import device_label, mismatches
    from sdexport.bench.environment import environment

    one = _report([_entry("torch", TIGHT)])
    pinned, whole = copy.deepcopy(one), copy.deepcopy(one)
    pinned["environment"]["host"]["usable_cores"] = 1
    whole["environment"]["host"]["usable_cores"] = 2
    assert device_label(pinned) == "CPU only: Test CPU, 1 of 2 cores"
    assert device_label(whole) == device_label(one) == "CPU only: Test CPU, 2 cores"
    assert mismatches(whole, pinned) == ["device: CPU only: Test CPU, 2 cores vs CPU only: Test CPU, 1 of 2 cores"]
    assert mismatches(one, pinned) == []
    assert environment()["host"]["usable_cores"] == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("edit", "problem"), [
    ({"test_hooks": ["slow"]}, "test_hooks"), ({"test_hooks": {"SDEXPORT_TEST_SLOW_UNET": "x"}}, "test_hooks"),
    ({"interrupted": "yes"}, "interrupted")])
def test_a_report_with_malformed_hooks_or_interruption_is_refused_in_one_line(edit, problem, tmp_path, capsys):
    """compare reads both in its words: a list was a traceback (exit 1, the gate's "regression"), and
    a string read as a finished run."""
    good = _write(tmp_path, "good", _report([_entry("torch", TIGHT)]))
    bad = _write(tmp_path, "bad", {**_report([_entry("torch", TIGHT)]), **edit})
    assert run_cli("bench", "compare", good, bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: NEW {bad}: not a benchmark report sdexport can compare (") and problem in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_report_compared_with_itself_is_refused(tmp_path, capsys):
    """A gate given one path twice passed whatever it measured."""
    path = _write(tmp_path, "results", _report([_entry("torch", TIGHT)]))
    assert run_cli("bench", "compare", tmp_path, path) == 2
    assert "BASELINE and NEW are the same report" in capsys.readouterr().err
    (tmp_path / "linked").mkdir()  # a hard link, which its path does not tell (an audit)
    os.link(path, tmp_path / "linked" / "results.json")
    assert run_cli("bench", "compare", path, tmp_path / "linked") == 2
    assert "BASELINE and NEW are the same report file (one name a hard link to the other)" in capsys.readouterr().err


def test_a_failure_in_a_terminals_colours_leaves_the_junit_file_readable(tmp_path):
    """A contender's failure is reported in its own words: an ESC in them made comparison.xml
    unreadable to every JUnit parser while the gate exited 0 (an audit)."""
    failed = {"contender": "tensorrt", "status": "failed", "reason": "boom \x1b[31mred\x1b[0m \x00"}
    baseline = _write(tmp_path, "a", _report([_entry("torch", TIGHT), failed]))
    new = _write(tmp_path, "b", _report([_entry("torch", TIGHT), failed]))
    assert run_cli("bench", "compare", baseline, new, "-o", tmp_path / "cmp") == 0
    text = ET.tostring(ET.parse(tmp_path / "cmp" / "comparison.xml").getroot(), encoding="unicode")
    assert "boom \\x1b[31mred\\x1b[0m \\x00" in text, text


def test_edited_reports_neither_break_the_comparison_nor_pass_a_slowdown(tmp_path, capsys):
    """A NaN median (JSON readers take NaN) ended in a traceback; two entries of one case had the
    last stand silently for both. The medians shown are the samples' own; a case twice is refused."""
    good = _report([_entry("torch", TIGHT)])
    _write(tmp_path, "new", good)
    nan = json.dumps(good).replace('"median": 1.0,', '"median": NaN,', 1)
    (tmp_path / "nan.json").write_text(nan)
    assert run_cli("bench", "compare", tmp_path / "nan.json", tmp_path / "new.json") == 0
    assert "| torch | batch 1, 10 steps | 1000.0 → 1000.0 |" in capsys.readouterr().out
    tiny = _report([_entry("torch", [1e-320] * len(TIGHT))])  # (a ratio to it overflowed: a traceback)
    _write(tmp_path, "tiny", tiny)
    assert run_cli("bench", "compare", tmp_path / "tiny.json", tmp_path / "new.json") == 2
    assert ": 1e-320 is less than the minimum of 1e-09" in capsys.readouterr().err
    tiny["results"][0]["e2e_s"] = good["results"][0]["e2e_s"]  # a stage's, then: left out, as a NaN one
    _write(tmp_path, "tiny", tiny)
    assert run_cli("bench", "compare", tmp_path / "tiny.json", tmp_path / "new.json") == 0
    assert "| torch | batch 1, 10 steps | 1000.0 → 1000.0 |" in capsys.readouterr().out
    twice = _report([_entry("torch", [3 * s for s in TIGHT]), _entry("torch", TIGHT)])
    _write(tmp_path, "twice", twice)
    assert run_cli("bench", "compare", tmp_path / "new.json", tmp_path / "twice.json") == 2
    assert "torch, batch 1, 10 steps is measured twice" in capsys.readouterr().err


def test_the_medians_shown_are_the_samples_own(tmp_path):
    """A recorded median that disagrees with its samples (an edited file) is not shown beside a
    change computed from the samples."""
    slower = _entry("torch", [1.5 * s for s in TIGHT])
    slower["e2e_s"]["median"] = 1.0  # as the baseline's: the table read 1000.0 → 1000.0, +50%
    row = _row(_compare(tmp_path, _report([_entry("torch", TIGHT)]), _report([slower])), "torch")
    assert row["e2e"]["baseline_s"] == 1.0 and row["e2e"]["new_s"] == 1.5 and row["status"] == "regression"


def test_a_driver_or_cuda_change_is_listed_with_the_versions(tmp_path):
    baseline, new = _report([_entry("torch", TIGHT)], gpu="H100"), _report([_entry("torch", TIGHT)], gpu="H100")
    baseline["environment"]["gpu"].update(driver="580.159.04", cuda="13.0")
    new["environment"]["gpu"].update(driver="590.10.01", cuda="13.0")
    assert _compare(tmp_path, baseline, new)["versions_changed"] == {"GPU driver": ["580.159.04", "590.10.01"]}


def test_a_gate_relative_to_a_contender_its_baseline_did_not_measure_is_refused_before_the_run(tmp_path):
    """The gate's check before the benchmark: a --relative-to contender the committed BASELINE did not
    measure (or only failed on) is refused then, not after the whole run (mutation testing round 8:
    that part of ``check_gate_fits_run``, dropped, failed no test)."""
    import re

    from sdexport.bench.compare import check_gate_fits_run
    from sdexport.errors import SdexportError

    scenario = ROOT / "benchmarks" / "scenarios" / "tiny-cpu.toml"
    failed = {**_entry("diffusers", TIGHT), "status": "failed"}
    baseline = _write(tmp_path, "baseline", _report([_entry("torch", TIGHT), failed]))
    with pytest.raises(SdexportError, match=rf"^--relative-to diffusers: BASELINE {re.escape(str(baseline))} did not "
                                            "measure it, so nothing could be judged against it$"):
        check_gate_fits_run(Gate(relative_to="diffusers"), scenario, [], baseline)
    check_gate_fits_run(Gate(relative_to="torch"), scenario, [], baseline)  # measured: fits
    check_gate_fits_run(Gate(relative_to="diffusers"), scenario, [], tmp_path / "none.json")  # no baseline yet


def test_relative_to_a_reference_cancels_drift_of_the_machine_and_catches_a_contender_of_its_own(tmp_path, capsys):
    """A shared runner 50% slower in the new run: absolute medians call every contender slower;
    as ratios to diffusers' time in the same run, nothing changed. A contender slower on its own is
    still caught, and the reference itself is shown, not judged."""
    from sdexport.bench.compare import markdown

    baseline = _report([_entry("diffusers", [2 * s for s in TIGHT]), _entry("torch", TIGHT)])
    drifted = _report([_entry("diffusers", [3 * s for s in TIGHT]), _entry("torch", [1.5 * s for s in TIGHT])])
    assert not _compare(tmp_path, baseline, drifted)["passed"]  # absolute: drift reads as a regression
    relative = _compare(tmp_path, baseline, drifted, Gate(relative_to="diffusers"))
    assert relative["passed"] and _row(relative, "torch")["status"] == "no change"
    assert _row(relative, "diffusers")["status"] == "reference" and not _row(relative, "diffusers")["failed"]
    assert abs(_row(relative, "torch")["e2e"]["change"]) < 1e-9
    text = markdown(relative)
    assert "judged as a ratio to the time of diffusers in the same run" in text
    assert "| 📏 reference: the reference the others are judged against" in text
    assert "+0.0% vs diffusers" in text
    own = _report([_entry("diffusers", [3 * s for s in TIGHT]), _entry("torch", [2.25 * s for s in TIGHT])])
    slower = _compare(tmp_path, baseline, own, Gate(relative_to="diffusers"))
    assert _row(slower, "torch")["status"] == "regression" and not slower["passed"]
    assert "end-to-end +50.0% vs diffusers" in _row(slower, "torch")["reasons"][0]
    _write(tmp_path, "baseline", baseline)
    _write(tmp_path, "new", _report([_entry("torch", TIGHT)]))
    assert run_cli("bench", "compare", tmp_path / "baseline.json", tmp_path / "new.json", "--relative-to", "diffusers") == 2
    assert f"--relative-to diffusers: NEW {tmp_path / 'new.json'} did not measure diffusers" in capsys.readouterr().err
    assert run_cli("bench", "compare", tmp_path / "baseline.json", tmp_path / "new.json", "--relative-to", "difusers") == 2
    assert "--relative-to 'difusers': not a contender" in capsys.readouterr().err


def test_a_case_not_judged_for_want_of_the_reference_is_not_called_too_few_repeats(tmp_path):
    from sdexport.bench.compare import markdown

    baseline = _report([_entry("diffusers", TIGHT), _entry("torch", TIGHT), _entry("torch", TIGHT, batch=2)])
    new = _report([_entry("diffusers", TIGHT), _entry("torch", TIGHT), _entry("torch", TIGHT, batch=2)])
    new["results"] = new["results"][:2] + [_entry("torch", TIGHT, batch=2)]
    baseline["results"].append(_entry("diffusers", TIGHT, batch=2))  # measured in the baseline only
    comparison = _compare(tmp_path, baseline, new, Gate(relative_to="diffusers"))
    text = markdown(comparison)
    row = next(r for r in comparison["rows"] if r["contender"] == "torch" and r["batch"] == 2)
    assert row["status"] == "not judged" and "diffusers was not measured in this case in the new run" in row["reasons"][0]
    assert "not judged (too few repeats)" not in text and "not judged" in text


def test_a_reference_contender_with_too_few_repeats_is_not_judged():
    """``--relative-to``: the reference's repeats count as the contender's do (noise would fail the gate)."""
    from sdexport.bench.compare import change_of

    tight = [1.00, 1.01, 0.99, 1.00, 1.02, 0.98, 1.00]
    change = change_of("end-to-end", {"samples": tight}, {"samples": [2 * s for s in tight]}, 0.05,
                       ("diffusers", {"samples": [2.0, 2.0]}, {"samples": [2.0, 2.0]}))
    assert change.verdict == "too few repeats"


def test_agreement_exactly_at_the_floor_passes():
    from sdexport.bench.compare import Row, _agreement

    row = Row("x", 1, 10, "no change")
    _agreement(row, {}, {"psnr_db": 30.0, "baseline": "diffusers"}, Gate(min_psnr=30.0))
    assert row.status == "no change"


# From mutation testing round 6


def test_every_setting_a_scenario_states_besides_its_cases_and_counts_is_a_workload_field():
    """``bench compare`` refuses reports whose workloads differ, field by field: a scenario key left
    out of ``WORKLOAD_FIELDS`` (a refiner's denoising_end, say) would let it compare runs that did
    different work as if one had become slower or faster."""
    from sdexport.bench.scenario import WORKLOAD_FIELDS, Scenario

    measuring = {"name", "description", "batch", "steps", "warmup", "repeats", "contenders"}
    assert set(WORKLOAD_FIELDS) == set(Scenario.__dataclass_fields__) - measuring
    assert len(WORKLOAD_FIELDS) == len(set(WORKLOAD_FIELDS))


def test_the_psnr_floor_does_not_pass_a_case_whose_baseline_was_not_measured(tmp_path):
    """A contender measured where the baseline failed (out of memory at batch 2) has no PSNR: the
    floor skipped it, and it read "no change" (an audit). Not judged, and failing under --fail-unjudged."""
    from sdexport.bench.compare import markdown

    failed = {"contender": "diffusers", "status": "failed", "reason": "RuntimeError: out of memory",
              "case": {"batch": 2, "steps": 10, "height": 64, "width": 64}}
    report = {**_report([_entry("diffusers", TIGHT, psnr=None), _entry("torch", TIGHT), failed,
                         _entry("torch", TIGHT, batch=2, psnr=None)]), "baseline": "diffusers"}
    comparison = _compare(tmp_path, report, report, Gate(min_psnr=30))
    rows = {(r["contender"], r["batch"]): r for r in comparison["rows"]}
    assert rows["torch", 1]["status"] == "no change" and rows["diffusers", 1]["status"] == "no change"
    assert rows["torch", 2]["status"] == "not judged" and comparison["passed"]
    assert ("no PSNR to hold to the 30 dB floor: diffusers was not measured in this case in the new run"
            in rows["torch", 2]["reasons"])
    assert "(too few repeats)" not in markdown(comparison)  # (its repeats were enough)
    assert not _compare(tmp_path, report, report, Gate(min_psnr=30, fail_unjudged=True))["passed"]
    assert _row(_compare(tmp_path, report, report), "torch")["status"] == "no change"  # no floor: nothing to judge

"""``sdexport bench compare BASELINE NEW``: did a change make a benchmark slower, beyond a threshold
*and* beyond the noise of its repeats?

A CI gate on timings must not fail on noise, nor pass a real slowdown because one lucky run hid it.
So every figure is compared with an interval: each report keeps the timed repeats themselves, and
the interval of a relative change (new median / baseline median - 1) is a percentile bootstrap,
both runs resampled independently (a fixed seed: the same two reports always give the same text).
A case is a **regression** when its end-to-end median is slower by more than ``max_slowdown`` and
the whole interval lies above zero; slower beyond the threshold with an interval that reaches zero
is "within noise" and passes (with few repeats, that is what the evidence supports: measure more).
Per-stage medians are shown with their intervals to say where the time went; the gate reads the
end-to-end figure only, which is what a user waits for. A contender measured in the baseline that
is missing or broken in the new run fails the gate too, and ``min_psnr`` adds a floor on the
agreement with each run's baseline contender (diffusers).

The repeats of one run share the machine's state, so the interval covers run-to-run noise only
partly; the threshold is there for the rest (clock boosts, a neighbour on the host). Where the
machine itself drifts between runs (a shared CPU runner), ``relative_to`` judges each contender's
time as a ratio to a reference contender measured in the same run (diffusers): the drift both
share cancels, at the cost of the reference's noise added to the interval. Comparing runs from
different devices, precisions or scenario definitions is refused unless asked for.
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdexport.atomic import read_regular
from sdexport.bench.report import MIN_REPEATS, STAGES, cores_label, decibels, json_ready, test_hooks_text
from sdexport.bench.scenario import CONTENDERS, WORKLOAD_FIELDS, workload_value
from sdexport.errors import SdexportError
from sdexport.output_dir import OutputKind
from sdexport.written_reports import changed_file, with_record

RESAMPLES = 4000
CONFIDENCE = 0.95
MARKER = "<!-- sdexport bench compare -->"
"""First line of the Markdown: a bot updating its merge-request comment finds its own by it."""
FORMAT = 1
COMPARISON_FILES = ("comparison.json", "comparison.md", "comparison.xml")


@dataclass(frozen=True)
class Gate:
    max_slowdown: float = 0.05
    """Fraction: 0.05 fails a case whose end-to-end median is over 5% slower (and beyond the noise)."""
    min_psnr: float | None = None
    """dB: fails a contender whose image agrees less than this with its run's baseline contender."""
    allow_mismatch: bool = False
    """Compare runs from different devices, precisions or scenario definitions anyway."""
    relative_to: str | None = None
    """Judge each contender's end-to-end time as a ratio to this contender's in the same run and
    case (``--relative-to``): machine drift between the runs cancels. The reference is shown, not
    judged."""
    fail_unjudged: bool = False
    """Fail a case with too few repeats to judge (``--fail-unjudged``; the CI gate's), rather than
    show it as not judged: otherwise a merge request that lowers the repeats passes any slowdown."""


@dataclass
class Change:
    """One median, baseline → new, as a relative change with its bootstrap interval."""

    metric: str
    baseline_s: float
    new_s: float
    change: float
    low: float
    high: float
    verdict: str
    """"slower" / "faster" (beyond the threshold and the noise), "within noise" (beyond the threshold,
    but the interval reaches zero), "within threshold"."""
    relative_to: str | None = None
    """The change is of the ratio to this contender's time (``Gate.relative_to``); the medians shown
    are still the contender's own."""

    def text(self) -> str:
        relative = f" vs {self.relative_to}" if self.relative_to else ""
        return f"{_percent(self.change)}{relative} ({_percent(self.low)} to {_percent(self.high)})"


@dataclass
class Row:
    """One contender on one case (batch, steps): what the gate concluded, and why."""

    contender: str
    batch: int | None
    steps: int | None
    status: str
    """"regression", "improvement", "no change", "within noise" (slower beyond the threshold, but its
    interval reaches zero: passes, and says so; a noisy speed-up is "no change"), "not judged" (a change beyond the threshold, but too
    few repeats to tell it from noise), "reference" (``Gate.relative_to``'s own: shown, not judged),
    "missing" (measured in the baseline, not in the new run),
    "new" (only in the new run), "unmeasured" (in neither run: it failed or was skipped, so nothing
    gates it)."""
    reasons: list[str] = field(default_factory=list)
    e2e: Change | None = None
    stages: list[Change] = field(default_factory=list)
    agreement: dict[str, float | None] = field(default_factory=dict)
    must_judge: bool = False
    """A "not judged" row fails (``Gate.fail_unjudged``)."""

    @property
    def failed(self) -> bool:
        return self.status in ("regression", "missing") or (self.status == "not judged" and self.must_judge)

    @property
    def case(self) -> str:
        return "–" if self.batch is None else f"batch {self.batch}, {self.steps} steps"


def _percent(value: float) -> str:
    return f"{value * 100:+.1f}%"


def parse_gate(max_slowdown: str, min_psnr: str | float | None, *, allow_mismatch: bool = False,
               fail_unjudged: bool = False, relative_to: str | None = None,
               names: tuple[str, str, str] = ("--max-slowdown", "--min-psnr", "--relative-to")) -> Gate:
    """The gate from the settings as given; refusals name them as ``names`` (``bench compare``'s
    options, or the CI gate's environment variables, which it checks before the benchmark runs)."""
    psnr = None
    if min_psnr is not None:
        try:
            psnr = float(min_psnr)
        except ValueError:
            psnr = math.nan
        if not math.isfinite(psnr):
            raise SdexportError(f"{names[1]} {min_psnr}: need a finite number of dB")
    if relative_to is not None and relative_to not in CONTENDERS:
        raise SdexportError(f"{names[2]} {relative_to!r}: not a contender; choose one of {', '.join(CONTENDERS)} "
                            "(usually diffusers, the baseline every run measures)")
    return Gate(max_slowdown=parse_percent(max_slowdown, names[0]), min_psnr=psnr, allow_mismatch=allow_mismatch,
                fail_unjudged=fail_unjudged, relative_to=relative_to)


def check_gate_fits_run(gate: Gate, scenario_path: Path, bench_args: list[str], baseline_path: Path,
                        names: tuple[str, str, str] = ("--max-slowdown", "--min-psnr", "--relative-to")) -> None:
    """The CI gate's settings against the run they will judge, before the benchmark (it takes the
    whole job, and the comparison then refused in words the pull request never saw): a reference
    contender the run does not measure (the scenario's contenders, or ``--contenders`` among
    ``bench_args``), or the baseline did not; a PSNR floor where no baseline contender runs."""
    from sdexport.bench.scenario import BASELINES, load_scenario

    contenders = list(load_scenario(scenario_path).contenders)
    for arg, after in zip(bench_args, [*bench_args[1:], None]):  # the bench's own override, as given
        given = after if arg == "--contenders" else arg.removeprefix("--contenders=") if arg.startswith("--contenders=") else None
        if given is not None:
            contenders = [name.strip() for name in given.split(",") if name.strip()]
    if gate.relative_to is not None and gate.relative_to not in contenders:
        raise SdexportError(f"{names[2]} {gate.relative_to}: the run's contenders ({', '.join(contenders)}) do not "
                            "include it, so nothing could be judged against it")
    if gate.min_psnr is not None and not any(name in BASELINES for name in contenders):
        raise SdexportError(f"{names[1]} {gate.min_psnr:g}: the run's contenders ({', '.join(contenders)}) hold no "
                            f"baseline ({' or '.join(BASELINES)}) to measure agreement against")
    if gate.relative_to is not None and baseline_path.exists():
        baseline = load_report(baseline_path, "BASELINE")
        if not any(e.get("contender") == gate.relative_to and e.get("status") == "measured"
                   for e in baseline["results"] if isinstance(e, dict)):
            raise SdexportError(f"{names[2]} {gate.relative_to}: BASELINE {baseline_path} did not measure it, so "
                                "nothing could be judged against it")


def parse_percent(text: str, flag: str) -> float:
    """``5%`` or ``5``: five percent, as the fraction 0.05. A bare number under 1 (``0.05``) is
    refused: it reads as a fraction but would mean 0.05%."""
    stripped = text.strip()
    try:
        value = float(stripped.removesuffix("%"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 1000:
        raise SdexportError(f"{flag} {text}: give a percentage from 0 to 1000, e.g. 5%")
    if 0 < value < 1 and not stripped.endswith("%"):
        raise SdexportError(f"{flag} {text}: a percentage; write {value * 100:g}% for {value:g} as a fraction, "
                            f"or {value:g}% if that is meant")
    return value / 100


def report_file(path: Path) -> Path:
    """The results.json ``path`` names: itself, or the one in the bench output folder it is."""
    return path / "results.json" if path.is_dir() else path


def load_report(path: Path, label: str) -> dict[str, Any]:
    """A benchmark's results.json (or the output folder holding it), refused in one line unless it
    is a report this sdexport can compare: one that kept its timed repeats."""
    file = report_file(path)
    if not file.is_file():
        raise SdexportError(f"{label} {path}: no such benchmark report (a results.json or the folder with it)")
    try:
        report = json.loads(file.read_text(encoding="utf-8-sig"))  # (a baseline saved by a Windows editor: a BOM)
    except (OSError, ValueError, RecursionError) as exc:
        raise SdexportError(f"{label} {file}: not readable JSON ({exc})") from None
    if not isinstance(report, dict) or not {"scenario", "results", "environment", "precision"} <= set(report):
        raise SdexportError(f"{label} {file}: not an sdexport benchmark report")
    measured = [e for e in report["results"] if isinstance(e, dict) and e.get("status") == "measured"] \
        if isinstance(report["results"], list) else []
    if any(isinstance(e.get("e2e_s"), dict) and "samples" not in e["e2e_s"] for e in measured):
        raise SdexportError(f"{label} {file}: written by an older sdexport that kept no per-run timings; "
                            "run that benchmark again to compare it")
    from sdexport.manifest_schema import first_error

    problem = first_error(REPORT_SCHEMA, report)
    if problem:
        raise SdexportError(f"{label} {file}: not a benchmark report sdexport can compare ({problem})")
    keys = [_key(e) for e in measured]
    twice = sorted({key for key in keys if keys.count(key) > 1}, key=str)
    if twice:  # one would silently stand for both
        contender, batch, steps = twice[0]
        raise SdexportError(f"{label} {file}: {contender}, batch {batch}, {steps} steps is measured twice; "
                            "not a report sdexport wrote (edit it back, or run the benchmark again)")
    return report


_TIMES = {"type": "object", "required": ["median", "samples"],
          "properties": {"median": {"type": "number"}, "samples": {"type": "array", "items": {"type": "number"}}}}
_MEASURED_TIMES = {**_TIMES, "properties": {
    "median": {"type": "number", "exclusiveMinimum": 0},
    # (a nanosecond to a million seconds: a ratio to a denormal 1e-320 overflowed to a traceback)
    "samples": {"type": "array", "minItems": 1, "items": {"type": "number", "minimum": 1e-9, "maximum": 1e6}}}}
_COUNT = {"type": "integer", "minimum": 1}
_AGREEMENT = {"type": "object", "properties": {
    "psnr_db": {"anyOf": [{"type": ["number", "null"]}, {"const": "inf"}]},  # "inf": identical images
    "latents_rel_l2": {"type": ["number", "null"]}}}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "precision": {"type": "string"},
        "scenario": {"type": "object", "required": ["name", "model"],
                     "properties": {"name": {"type": "string"}, "repeats": _COUNT}},
        "environment": {"type": "object", "required": ["host"], "properties": {
            "gpu": {"type": ["object", "null"], "required": ["name"]},
            "host": {"type": "object"},
            "versions": {"type": "object"}}},
        # (read by the report's words: a list or a string here was a traceback, exit 1 as a regression)
        "test_hooks": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": {"type": "number"}}},
        "interrupted": {"type": ["object", "null"], "required": ["reason"], "properties": {"reason": {"type": "string"}}},
        "results": {"type": "array", "items": {
            "type": "object", "required": ["contender", "status"],
            "properties": {"contender": {"type": "string"}, "status": {"type": "string"},
                           "case": {"type": "object", "required": ["batch", "steps"],  # rows sort and pair by them
                                    "properties": {"batch": _COUNT, "steps": _COUNT}}},
            "if": {"properties": {"status": {"const": "measured"}}},
            "then": {"required": ["case", "e2e_s"],
                     "properties": {"e2e_s": _MEASURED_TIMES, **{stage: _TIMES for stage, _ in STAGES},
                                    "agreement": _AGREEMENT}},
        }},
    },
}
"""What compare reads of a results.json: a damaged or foreign file is refused in one line."""


def device_label(report: dict[str, Any], usable: bool = True) -> str:
    """The device a report ran on, as compared: a GPU's name; a CPU's model, cores (``usable``: and
    the cores the run could use, ``cores_label``) and OMP_NUM_THREADS."""
    env = report["environment"]
    if env.get("gpu"):
        return str(env["gpu"]["name"])
    host = env.get("host", {})
    if not usable:
        host = {key: value for key, value in host.items() if key != "usable_cores"}
    threads = f", OMP_NUM_THREADS={host['cpu_threads']}" if host.get("cpu_threads") else ""  # the CPU timings follow it
    return f"CPU only: {host.get('cpu', 'unknown')}, {cores_label(host)}{threads}"


def mismatches(baseline: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why two reports do not measure the same thing on the same machine type (empty: they do). The
    cores a run could use count where both reports record them: a baseline committed before the
    record is compared by the machine's count, as it was (a runner in a cpuset kept its baseline)."""
    found = []
    usable = all("usable_cores" in (r["environment"].get("host") or {}) for r in (baseline, new))
    labels = device_label(baseline, usable), device_label(new, usable)
    if labels[0] != labels[1]:
        found.append(f"device: {labels[0]} vs {labels[1]}")
    if baseline["precision"] != new["precision"]:
        found.append(f"precision: {baseline['precision']} vs {new['precision']}")
    for name in WORKLOAD_FIELDS:
        if name == "dtype":  # ("auto" and the precision it gave on this device: the same work; compared above)
            continue
        old, now = workload_value(baseline["scenario"], name), workload_value(new["scenario"], name)
        if name == "export" and isinstance(old, dict) and isinstance(now, dict):  # (how far the export was
            old, now = ({k: v for k, v in d.items() if k != "verify"} for d in (old, now))  # proven: not measured)
        if old != now:
            found.append(f"scenario {name}: {old!r} vs {now!r}")
    engines = baseline.get("engines"), new.get("engines")  # (reports from before the record: not compared)
    if None not in engines and engines[0] != engines[1]:
        given = [r for r in (baseline, new) if "--engine-dir" in (r.get("command_line") or {})]
        shapes = [e.get("profile") if isinstance(e, dict) else e for e in engines]
        why = (" (--engine-dir)" if given else " (the scenario's batch sizes and image size, or its [export] ranges, "
               "set them)" if shapes[0] != shapes[1] else "")  # (a precision alone: the precision line's)
        found.append(f"engines: {_engines_difference(*engines)}{why}")
    return found


def _engines_difference(old: Any, now: Any) -> str:
    """How two reports' ``engines`` differ: ``batch 1:1:2 vs 1:1:1`` (each differing axis's
    min:opt:max; the precision where it differs). The whole of both summed up every axis's span,
    without the opt, so an opt that differed printed the same words on both sides, and the prompt
    chunks a profile leaves out where it reads one (``ShapeProfile.to_dict``) were '?'."""
    if not all(isinstance(e, dict) and isinstance(e.get("profile"), dict) for e in (old, now)):
        return f"{old!r} vs {now!r}"
    found = [f"precision {old.get('dtype')} vs {now.get('dtype')}"] if old.get("dtype") != now.get("dtype") else []
    one_window = [1, 1, 1]  # (the axis left out)
    for axis in dict.fromkeys([*old["profile"], *now["profile"]]):
        values = [e["profile"].get(axis, one_window if axis == "chunks" else None) for e in (old, now)]
        if values[0] != values[1]:
            found.append(f"{'prompt chunks' if axis == 'chunks' else axis} "
                         + " vs ".join(":".join(map(str, v)) if isinstance(v, list) else repr(v) for v in values))
    return "; ".join(found) or f"{old!r} vs {now!r}"


def relative_change(baseline: list[float], new: list[float], seed: int = 0,
                    references: tuple[list[float], list[float]] | None = None) -> tuple[float, float, float]:
    """new median / baseline median - 1, and a percentile-bootstrap interval for it. With
    ``references`` (the reference contender's samples in the baseline and in the new run), of the
    ratio to the reference's median in each run instead; every sample set is resampled on its own."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = [np.asarray(samples, np.float64) for samples in (baseline, new, *(references or ()))]
    medians = [float(np.median(v)) for v in values]
    booted = [np.median(v[rng.integers(0, len(v), (RESAMPLES, len(v)))], axis=1) for v in values]
    if references is None:
        point, spread = medians[1] / medians[0] - 1, booted[1] / booted[0] - 1
    else:
        point = (medians[1] / medians[3]) / (medians[0] / medians[2]) - 1
        spread = (booted[1] / booted[3]) / (booted[0] / booted[2]) - 1
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(spread, [tail, 1 - tail])
    return float(point), float(min(low, point)), float(max(high, point))


def change_of(metric: str, baseline: dict[str, Any], new: dict[str, Any], threshold: float,
              reference: tuple[str, dict[str, Any], dict[str, Any]] | None = None) -> Change | None:
    """The change of one median (None when either median is not a positive time, or their ratio
    overflows: nothing to compare).
    The medians are the samples' own, not the recorded ``median``: the figure shown is the one judged
    (a recorded one that disagrees, or is NaN, in an edited file, changes nothing). ``reference``:
    (name, its baseline timings, its new ones) to judge the ratio to (``Gate.relative_to``)."""
    import statistics

    sets = [baseline["samples"], new["samples"], *([reference[1]["samples"], reference[2]["samples"]] if reference else [])]
    if not all(math.isfinite(v) and v > 0 for samples in sets for v in samples):
        return None
    point, low, high = relative_change(sets[0], sets[1], references=(sets[2], sets[3]) if reference else None)
    if not all(math.isfinite(value) for value in (point, low, high)):  # (1e-320 s in an edited file: no time either)
        return None
    if abs(point) <= threshold:
        verdict = "within threshold"
    elif min(map(len, sets)) < MIN_REPEATS:
        verdict = "too few repeats"
    elif point > threshold:
        verdict = "slower" if low > 0 else "within noise"
    else:
        verdict = "faster" if high < 0 else "within noise"
    return Change(metric, statistics.median(sets[0]), statistics.median(sets[1]), point, low, high, verdict,
                  reference[0] if reference else None)


def _key(entry: dict[str, Any]) -> tuple[str, int | None, int | None]:
    case = entry.get("case") or {}
    return entry["contender"], case.get("batch"), case.get("steps")


def compare_rows(baseline: dict[str, Any], new: dict[str, Any], gate: Gate) -> list[Row]:
    base_measured = {_key(e): e for e in baseline["results"] if e["status"] == "measured"}
    new_measured = {_key(e): e for e in new["results"] if e["status"] == "measured"}
    new_reasons = {_key(e): e.get("reason", e["status"]) for e in new["results"] if e["status"] != "measured"}
    base_reasons = {_key(e): e.get("reason", e["status"]) for e in baseline["results"] if e["status"] != "measured"}
    rows = []
    for key, old in base_measured.items():
        contender, batch, steps = key
        now = new_measured.get(key)
        if now is None:
            reason = new_reasons.get(key) or new_reasons.get((contender, None, None)) or "not in the new run"
            rows.append(Row(contender, batch, steps, "missing", [f"measured in the baseline; new run: {reason}"]))
            continue
        row = Row(contender, batch, steps, "reference" if contender == gate.relative_to else "no change")
        against = None
        if gate.relative_to is not None and contender != gate.relative_to:
            pair = (base_measured.get((gate.relative_to, batch, steps)), new_measured.get((gate.relative_to, batch, steps)))
            if pair[0] is None or pair[1] is None:  # (compare refuses runs where the reference measured nothing)
                which = "baseline" if pair[0] is None else "new run"
                rows.append(Row(contender, batch, steps, "not judged",
                                [f"{gate.relative_to} was not measured in this case in the {which} (--relative-to)"],
                                must_judge=gate.fail_unjudged))
                continue
            against = (gate.relative_to, pair[0]["e2e_s"], pair[1]["e2e_s"])
        row.e2e = change_of("end-to-end", old["e2e_s"], now["e2e_s"], gate.max_slowdown, against)
        stages = [change_of(label, old[stage], now[stage], gate.max_slowdown) for stage, label in STAGES
                  if old.get(stage, {}).get("samples") and now.get(stage, {}).get("samples")]
        row.stages = [c for c in stages if c is not None]
        if row.e2e is None:  # load_report refuses such timings; a guard, not a verdict
            raise SdexportError(f"{contender}, {row.case}: end-to-end timings are not positive numbers")
        if row.status == "reference":
            row.reasons.append("the reference the others are judged against (--relative-to): shown, not judged")
        elif row.e2e.verdict == "too few repeats":
            row.status, row.must_judge = "not judged", gate.fail_unjudged
            timed = [old["e2e_s"], now["e2e_s"], *(against[1:] if against else ())]  # (the reference's count too)
            fewest = min(len(t['samples']) for t in timed)
            row.reasons.append(f"{fewest} repeat{'s' * (fewest != 1)}: "
                               f"at least {MIN_REPEATS} are needed to tell a change from noise (--repeats)")
        elif row.e2e.verdict == "slower":
            row.status = "regression"
            row.reasons.append(f"end-to-end {row.e2e.text()} slower, over the {gate.max_slowdown * 100:g}% gate "
                               "and beyond the noise")
        elif row.e2e.verdict == "faster":
            row.status = "improvement"
        elif row.e2e.verdict == "within noise" and row.e2e.change > 0:  # (a slowdown the evidence cannot tell:
            row.status = "within noise"  # it read "no change", an audit; a noisy speed-up stays "no change")
            row.reasons.append(f"beyond the {gate.max_slowdown * 100:g}% gate, but the interval reaches zero, so it "
                               "passes; raise --repeats to tell")
        _agreement(row, old.get("agreement") or {}, now.get("agreement") or {}, gate, new.get("baseline"))
        rows.append(row)
    for key in new_measured.keys() - base_measured.keys():
        reason = base_reasons.get(key) or base_reasons.get((key[0], None, None))
        row = Row(*key, "new", ["not measured in the baseline" + (f" ({reason})" if reason else "")])
        _agreement(row, {}, new_measured[key].get("agreement") or {}, gate, new.get("baseline"))  # (and its floor)
        rows.append(row)
    # What neither run measured is shown, not dropped: a contender that failed in the baseline is
    # gated by nothing until a run measures it (a case of a contender either run measured has its row).
    measured = {contender for contender, _, _ in (*base_measured, *new_measured)}
    for key in sorted(base_reasons.keys() | new_reasons.keys(), key=str):
        if key in base_measured or key in new_measured or (key[1] is None and key[0] in measured):
            continue
        said = [f"{which}: {reasons[key]}" for which, reasons in (("baseline", base_reasons), ("new run", new_reasons))
                if key in reasons]
        rows.append(Row(*key, "unmeasured", ["measured in neither run", *said]))
    return sorted(rows, key=lambda r: (r.batch or 0, r.steps or 0, r.contender))


def _agreement(row: Row, old: dict[str, Any], new: dict[str, Any], gate: Gate, judge: str | None = None) -> None:
    """``row``'s image agreement, baseline → new, and the PSNR floor on the new run's (a contender
    new in it included: one that a merge request fixed, drawing garbage, is what the floor is for).
    ``judge``: the new run's baseline contender, whose own rows have no agreement; another row
    without any (the baseline failed in that case) is not judged by the floor, and says so: it read
    "no change" (an audit)."""
    if new or old:
        row.agreement = {"psnr_db_baseline": old.get("psnr_db"), "psnr_db_new": new.get("psnr_db"),
                         "latents_rel_l2_baseline": old.get("latents_rel_l2"),
                         "latents_rel_l2_new": new.get("latents_rel_l2")}
    psnr = decibels(new.get("psnr_db"))  # "inf" (json_ready), or an older report's Infinity
    if gate.min_psnr is not None and new and not (isinstance(psnr, (int, float)) and psnr >= gate.min_psnr):
        row.status = "regression"
        row.reasons.append(f"PSNR {_db(psnr)} dB against {new.get('baseline')}, under the {gate.min_psnr:g} dB floor")
    elif gate.min_psnr is not None and not new and judge and row.contender != judge:
        if row.status not in ("regression", "not judged"):
            row.status, row.must_judge = "not judged", gate.fail_unjudged
        row.reasons.append(f"no PSNR to hold to the {gate.min_psnr:g} dB floor: {judge} was not measured in this case "
                           "in the new run")


def _versions(report: dict[str, Any]) -> dict[str, Any]:
    """The libraries' versions, and the GPU's driver and CUDA: a driver update moves timings too."""
    gpu = report["environment"].get("gpu") or {}
    return {**report["environment"].get("versions", {}),
            **{f"GPU {name}": gpu[name] for name in ("driver", "cuda") if gpu.get(name)}}


def _run_summary(report: dict[str, Any], path: Path) -> dict[str, Any]:
    env = report["environment"]
    return {"path": str(path), "git": env.get("git_revision"), "date": env.get("date"), "device": device_label(report),
            "precision": report["precision"], "scenario": report["scenario"]["name"],
            "repeats": report["scenario"].get("repeats"), "warmup": report["scenario"].get("warmup"),
            "test_hooks": test_hooks_text(report),
            "interrupted": _interrupted_reason(report)}


def _interrupted_reason(report: dict[str, Any]) -> str | None:
    stopped = report.get("interrupted")
    return str(stopped.get("reason") or "interrupted") if isinstance(stopped, dict) else None


def compare(baseline_path: Path, new_path: Path, gate: Gate) -> dict[str, Any]:
    """The comparison as one JSON-ready dict; refuses (SdexportError) reports that do not compare."""
    baseline, new = load_report(baseline_path, "BASELINE"), load_report(new_path, "NEW")
    files = [report_file(p).resolve() for p in (baseline_path, new_path)]
    # (a gate given one path twice would pass whatever it measured; so would one given a hard link to
    # the baseline: an audit)
    if files[0] == files[1] or os.path.samefile(*files):
        same = "the same report" if files[0] == files[1] else "the same report file (one name a hard link to the other)"
        raise SdexportError(f"BASELINE and NEW are {same} ({files[0]}, {files[1]}): a run compared with itself "
                            "always passes; give the baseline run and the new one")
    if not any(e["status"] == "measured" for e in baseline["results"]):
        raise SdexportError(f"BASELINE {baseline_path} measured nothing (every contender failed or none ran), "
                            "so every run would pass; use a run that measured as the baseline")
    unfinished = _interrupted_reason(baseline)
    if unfinished and not gate.allow_mismatch:  # what it never reached would pass unchecked
        raise SdexportError(f"BASELINE {baseline_path} did not finish ({unfinished}), so what it "
                            "never measured would go unchecked; use a finished run as the baseline, or pass "
                            "--allow-mismatch to compare what it has")
    found = mismatches(baseline, new)
    if found and not gate.allow_mismatch:
        raise SdexportError(f"the runs do not measure the same thing ({'; '.join(found)}); "
                            "pass --allow-mismatch to compare them anyway")
    for label, path, report in (("BASELINE", baseline_path, baseline), ("NEW", new_path, new)):
        if gate.relative_to is not None and not any(e["contender"] == gate.relative_to and e["status"] == "measured"
                                                    for e in report["results"]):
            raise SdexportError(f"--relative-to {gate.relative_to}: {label} {path} did not measure {gate.relative_to}, "
                                "so nothing in it can be judged against it")
    if gate.min_psnr is not None and not any(e.get("agreement") for e in new["results"] if e["status"] == "measured"):
        raise SdexportError(f"--min-psnr {gate.min_psnr:g}: NEW {new_path} has no agreement figures to check "
                            "(no baseline contender such as diffusers ran in it)")
    rows = compare_rows(baseline, new, gate)
    old_versions, new_versions = _versions(baseline), _versions(new)
    return {
        "format": FORMAT,
        "passed": not any(r.failed for r in rows),
        "gate": asdict(gate),
        "confidence": CONFIDENCE,
        "baseline": _run_summary(baseline, baseline_path),
        "new": _run_summary(new, new_path),
        "mismatches": found,
        "versions_changed": {name: [old_versions.get(name), new_versions.get(name)]
                             for name in sorted(set(old_versions) | set(new_versions))
                             if old_versions.get(name) != new_versions.get(name)},
        "rows": [json_ready(asdict(r)) | {"failed": r.failed} for r in rows],
    }


def _rows(comparison: dict[str, Any]) -> list[Row]:
    rows = []
    for data in comparison["rows"]:
        values = {k: v for k, v in data.items() if k != "failed"}
        values["e2e"] = Change(**values["e2e"]) if values["e2e"] else None
        values["stages"] = [Change(**s) for s in values["stages"]]
        rows.append(Row(**values))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _db(value: float | str | None) -> str:
    if isinstance(value, str) or (isinstance(value, float) and math.isinf(value)):
        return "∞" if value in ("inf", math.inf) else "–"
    return "–" if value is None or not math.isfinite(value) else f"{value:.1f}"


_SYMBOL = {"regression": "❌ regression", "missing": "❌ missing", "improvement": "✅ faster",
           "no change": "✅ no change", "within noise": "⚠️ within noise", "not judged": "⚠️ not judged", "reference": "📏 reference", "new": "🆕 new",
           "unmeasured": "⚠️ not measured"}


def markdown(comparison: dict[str, Any]) -> str:
    rows = _rows(comparison)
    base, new, gate = comparison["baseline"], comparison["new"], comparison["gate"]
    slower = sum(r.status == "regression" for r in rows)
    missing = sum(r.status == "missing" for r in rows)
    unjudged = sum(r.status == "not judged" for r in rows)
    failing_unjudged = sum(r.status == "not judged" and r.failed for r in rows)
    why = (" (too few repeats)" if all(r.e2e is not None and r.e2e.verdict == "too few repeats"
                                       for r in rows if r.status == "not judged") else "")  # (else the reference
    # was missing in a case, --relative-to, or the baseline, --min-psnr: the rows say which)
    counts = ([f"{slower} regression{'s' * (slower != 1)}"] * bool(slower) + [f"{missing} missing"] * bool(missing)
              + [f"{failing_unjudged} not judged{why}"] * bool(failing_unjudged))
    noisy = sum(r.status == "within noise" for r in rows)
    title = ("❌ " + ", ".join(counts) if counts
             else f"⚠️ {unjudged} case{'s' * (unjudged != 1)} not judged{why}" if unjudged
             else "✅ no regression") + (f" ({noisy} within noise: raise --repeats)" if noisy and not counts else "")
    lines = [
        MARKER,
        f"## sdexport bench: {new['scenario']} — {title}",
        "",
        f"- Baseline: git {base['git'] or 'unknown'}, {base['date'] or 'date unknown'} ({base['path']})"
        + (f", scenario {base['scenario']}" if base["scenario"] != new["scenario"] else ""),
        f"- New: git {new['git'] or 'unknown'}, {new['date'] or 'date unknown'} ({new['path']})",
        f"- Device: {new['device']}, precision {new['precision']}; repeats {base['repeats']} → {new['repeats']}"
        + (f", warm-up runs {base['warmup']} → {new['warmup']}" if base.get("warmup") != new.get("warmup") else ""),
        (f"- Gate: a case fails when its end-to-end median is more than {gate['max_slowdown'] * 100:g}% slower and "
         f"the whole {comparison['confidence'] * 100:g}% bootstrap interval of the change lies above zero; a "
         "contender measured in the baseline must still run"
         + (f"; each contender's time is judged as a ratio to the time of {gate['relative_to']} in the same run, so "
            "drift of the machine between the runs cancels" if gate.get("relative_to") else "")
         + (f"; PSNR against the run's baseline contender at least {gate['min_psnr']:g} dB" if gate["min_psnr"] is not None
            else "")),
    ]
    if comparison["versions_changed"]:
        lines.append("- Versions changed: " + ", ".join(f"{name} {old or '–'} → {now or '–'}"
                                                        for name, (old, now) in comparison["versions_changed"].items()))
    for which in ("baseline", "new"):
        if comparison[which].get("interrupted"):  # .get: comparison.json files from before this field
            lines.append(f"- **The {which} run did not finish**: {comparison[which]['interrupted']}; only what it "
                         "measured before that is compared")
        if comparison[which]["test_hooks"]:
            lines.append(f"- **The {which} run was slowed on purpose**: {comparison[which]['test_hooks']}; "
                         "its figures measure the hook, not the code")
    if comparison["mismatches"]:
        lines.append("- **Compared across a mismatch (--allow-mismatch)**: " + "; ".join(comparison["mismatches"]))
    cold = [which for which, run in (("baseline", base), ("new", new)) if run.get("warmup") == 0]
    if cold and base.get("warmup") != new.get("warmup"):  # (a change of warm-up was not shown: an audit's finding)
        lines.append(f"- **The {cold[0]} run had no warm-up**: each case's first call (lazy initialisation, "
                     "autotuning, a first enqueue) is one of its timed samples, so its figures are not steady-state "
                     "ones and the other run's are")
    if min(base["repeats"] or 0, new["repeats"] or 0) < MIN_REPEATS:
        lines.append(f"- **Fewer than {MIN_REPEATS} repeats**: so few runs say nothing about the noise, so a change "
                     "beyond the threshold is not judged" + (", and fails the gate (--fail-unjudged)"
                                                           if gate.get("fail_unjudged") else "")
                     + "; raise --repeats")
    lines += [
        "",
        "| contender | case | end-to-end ms, baseline → new | change (interval) | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        timing = f"{_ms(row.e2e.baseline_s)} → {_ms(row.e2e.new_s)}" if row.e2e else "–"
        change = f"{row.e2e.text()}, {row.e2e.verdict}" if row.e2e else "–"
        verdict = _SYMBOL[row.status] + (": " + "; ".join(row.reasons) if row.reasons and row.status != "regression" else "")
        lines.append(f"| {row.contender} | {row.case} | {timing} | {change} | {verdict} |")
    staged = [r for r in rows if r.stages]
    if staged:
        lines += ["", "<details><summary>Stages: change of each median (interval)</summary>", "",
                  "| contender | case | " + " | ".join(label for _, label in STAGES) + " |",
                  "|---|---|" + "---|" * len(STAGES)]
        for row in staged:
            by_metric = {c.metric: c for c in row.stages}
            cells = [by_metric[label].text() if label in by_metric else "–" for _, label in STAGES]
            lines.append(f"| {row.contender} | {row.case} | " + " | ".join(cells) + " |")
        lines += ["", "</details>"]
    agreeing = [r for r in rows if r.agreement]
    if agreeing:
        lines += ["", "| contender | case | PSNR dB, baseline → new | latents rel-L2, baseline → new |", "|---|---|---|---|"]
        for row in agreeing:
            a = row.agreement
            rel = " → ".join("–" if v is None else f"{v:.2e}" for v in (a["latents_rel_l2_baseline"], a["latents_rel_l2_new"]))
            lines.append(f"| {row.contender} | {row.case} | {_db(a['psnr_db_baseline'])} → {_db(a['psnr_db_new'])} | {rel} |")
    failed = [r for r in rows if r.failed]
    if failed:
        lines += ["", "**Failing:**", ""]
        lines += [f"- {r.contender}, {r.case}: {'; '.join(r.reasons)}" for r in failed]
    return "\n".join(lines) + "\n"


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
"""What XML 1.0 cannot hold, even escaped: control characters, lone surrogates, two non-characters."""


def xml_text(text: str) -> str:
    """``text`` as XML 1.0 can hold it, each character it cannot shown as ``\\xNN`` (``\\uNNNN``).
    A contender's failure is kept in its own words, which may carry a terminal's colour codes: an
    ESC made comparison.xml unreadable to every JUnit parser while the gate exited 0 (an audit)."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def junit_xml(comparison: dict[str, Any]) -> str:
    """JUnit XML: one test case per contender × case, the gate's reasons as the failure text, so any
    CI system shows the comparison in its own test view."""
    rows = _rows(comparison)
    suite_name = f"sdexport-bench.{comparison['new']['scenario']}"
    root = ET.Element("testsuites", name="sdexport bench compare")
    suite = ET.SubElement(root, "testsuite", name=suite_name, timestamp=str(comparison["new"]["date"] or ""))
    counts = {"tests": 0, "failures": 0, "skipped": 0}
    for row in rows:
        case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{row.contender}", name=row.case,
                             time=f"{row.e2e.new_s:.6f}" if row.e2e else "0")
        counts["tests"] += 1
        summary = (f"end-to-end {_ms(row.e2e.baseline_s)} ms → {_ms(row.e2e.new_s)} ms, {row.e2e.text()}, "
                   f"{row.e2e.verdict}" if row.e2e else "; ".join(row.reasons))
        if row.failed:
            counts["failures"] += 1
            ET.SubElement(case, "failure", message="; ".join(row.reasons), type=row.status).text = summary
        elif row.status in ("new", "unmeasured", "not judged"):
            counts["skipped"] += 1
            ET.SubElement(case, "skipped", message="; ".join(row.reasons))
        ET.SubElement(case, "system-out").text = "\n".join(
            [summary, *(f"{c.metric}, median: {_ms(c.baseline_s)} ms → {_ms(c.new_s)} ms, {c.text()}" for c in row.stages)])
    for element in (root, suite):
        for name, value in counts.items():
            element.set(name, str(value))
    for element in root.iter():  # (a contender's failure in its own words: a terminal's colour codes)
        element.text = None if element.text is None else xml_text(element.text)
        for key, text in element.attrib.items():
            element.set(key, xml_text(text))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def not_a_comparison_output(directory: Path) -> str | None:
    """Why ``directory`` is not a comparison sdexport wrote (None when it is), before it is replaced."""
    from sdexport.output_dir import MARKER as STAGING_MARKER

    try:
        data = json.loads(read_regular(directory / COMPARISON_FILES[0]).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"it has no readable {COMPARISON_FILES[0]}"
    if not isinstance(data, dict) or data.get("format") != FORMAT or "rows" not in data:
        return f"its {COMPARISON_FILES[0]} is not an sdexport comparison"
    extra = sorted(p.name for p in directory.iterdir() if p.name not in (*COMPARISON_FILES, STAGING_MARKER))
    if extra:
        return f"it holds other files: {', '.join(extra[:3])}"
    changed = changed_file(directory, COMPARISON_FILES[0], data, COMPARISON_FILES[1:])
    return f"its {changed} was changed since sdexport wrote it (edited by hand?)" if changed else None


COMPARISON_OUTPUT = OutputKind("comparison output", not_a_comparison_output)


def write_comparison(comparison: dict[str, Any], directory: Path) -> list[Path]:
    """comparison.json, .md and .xml (JUnit) into ``directory`` (a staging folder); the JSON again
    last, with the others' hashes and its own (``written_reports``: not replaced once edited)."""
    from sdexport.atomic import write_atomic

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in COMPARISON_FILES]
    write_atomic(paths[0], json.dumps(comparison, indent=2, allow_nan=False) + "\n")
    write_atomic(paths[1], markdown(comparison))
    write_atomic(paths[2], junit_xml(comparison))
    recorded = with_record(comparison, paths[0].name, paths[1:])
    write_atomic(paths[0], json.dumps(recorded, indent=2, allow_nan=False) + "\n")
    return paths

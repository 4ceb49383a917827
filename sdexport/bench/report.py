"""Benchmark output: results.json (everything), results.md (the table people read), results.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sdexport.atomic import atomic_path, read_regular, write_atomic
from sdexport.bench.scenario import SLOW_UNET_HOOK
from sdexport.manifest import write_json_atomic
from sdexport.output_dir import MARKER, OutputKind
from sdexport.specs import FAMILY_LABELS
from sdexport.written_reports import changed_file, with_record

MIN_REPEATS = 5
"""Fewer timed runs give no spread worth reporting. ``bench compare`` judges no change on them either:
with identical code and 5% noise, a bootstrap over 1-3 repeats calls 4-19% of cases slower, so such a
case beyond the threshold is "not judged": shown, and failed only by a gate that must judge every
case (``--fail-unjudged``, which the CI gate passes)."""
NOISY_CV = 0.10
"""A contender whose end-to-end runs vary more than this (coefficient of variation: standard
deviation / mean) gives a ratio that is not to be trusted: the report says so."""
STAGES_APART = 0.10
"""Stage figures whose sum differs from the end-to-end median by more than this get a note saying why."""
LEFT_OVER_NOTE_MB = 256
"""Device memory the contenders before one left behind (``device_left_over_mb``) from which a note
says so: less is CUDA's and the libraries' per-process share (kernels loaded once, workspaces)."""


def _ms(stats: dict[str, float]) -> str:
    return f"{stats['median'] * 1000:.1f}"


def stage_mean(stats: dict[str, Any]) -> float:
    """A stage's mean over the marked runs (its median in reports that kept no samples): means of the
    parts add up to the mean of the whole, which medians do not. Reports from before ``Stats``
    recorded it have it from their samples."""
    if isinstance(stats.get("mean"), int | float):
        return float(stats["mean"])
    samples = stats.get("samples") or []
    return sum(samples) / len(samples) if samples else stats["median"]


def _mean_ms(stats: dict[str, Any]) -> str:
    return f"{stage_mean(stats) * 1000:.1f}"


def repeats(stats: dict[str, Any]) -> int:
    return len(stats.get("samples") or []) or int(stats.get("n") or 0)


def timed_runs(*counts: int) -> str:
    """"1 timed run", "3 timed runs", "1 or 2 timed runs": a count's words in the report's notes."""
    return f"{' or '.join(map(str, counts))} timed run{'s' if max(counts) != 1 else ''}"


def variation(stats: dict[str, Any]) -> float | None:
    """The coefficient of variation of a Stats dict's samples: None with fewer than ``MIN_REPEATS``
    (too few for a spread), without samples (older reports) or with a value that is not finite."""
    import statistics

    samples = stats.get("samples") or []
    if len(samples) < MIN_REPEATS or not all(math.isfinite(x) for x in samples) or not statistics.fmean(samples):
        return None
    return statistics.stdev(samples) / statistics.fmean(samples)


def _range_ms(stats: dict[str, Any]) -> str:
    cv = variation(stats)
    return (f"{stats['median'] * 1000:.1f} ({stats['min'] * 1000:.1f}–{stats['max'] * 1000:.1f})"
            + (f" ±{cv * 100:.1f}%" if cv is not None else ""))  # (a steady GPU run is under 1%)


STAGES = (("text_encoder_s", "text enc."), ("adapter_s", "adapter"), ("controlnet_step_s", "ControlNet/step"),
          ("unet_step_s", "U-Net/step"), ("vae_decoder_s", "VAE"), ("loop_overhead_s", "overhead"))
"""A measured entry's stage keys, in the loop's order, with the short label a table column gives each."""
STAGE_KEYS = tuple(key for key, _ in STAGES)


def stages_sum(entry: dict[str, Any]) -> float:
    """What the stage columns add up to: text encoder + per-call means × calls + VAE + overhead, which
    is the marked runs' mean end-to-end time (overhead is each run's remainder)."""
    total = sum(stage_mean(entry[k]) for k in ("text_encoder_s", "adapter_s", "vae_decoder_s", "loop_overhead_s")
                if k in entry)
    total += stage_mean(entry["unet_step_s"]) * entry["unet_calls"]
    if "controlnet_step_s" in entry:
        total += stage_mean(entry["controlnet_step_s"]) * entry["controlnet_calls"]
    return total


def noisy(entry: dict[str, Any]) -> bool:
    """The entry's end-to-end runs vary by more than ``NOISY_CV``."""
    cv = variation(entry["e2e_s"])
    return cv is not None and cv > NOISY_CV


def ratio_untrusted(entry: dict[str, Any], measured: list[dict[str, Any]], baseline: str | None) -> bool:
    """A speedup not to be trusted (⚠): the contender's runs are noisy, or its case's baseline's are
    (every ratio of that case divides by the baseline's median). ``measured``: the report's measured
    entries, or those of the entry's case."""
    return noisy(entry) or any(r["contender"] == baseline and case_key(r) == case_key(entry) and noisy(r)
                               for r in measured)


WAITS_PER_STEP = frozenset({"onnxruntime-cuda-fused"})
"""Contenders whose engines make the host wait inside the loop (``runtime.onnxruntime_backend``)."""


def vae_rerun_note(entry: dict[str, Any]) -> str | None:
    """Where a runtime contender's fp16 VAE overflowed in its timed runs and ran again in fp32
    (random weights can do this): those runs hold a second decode the baseline does not make (it
    returns the overflowed image), so the ratio compares unlike work. None where it never did."""
    reruns = entry.get("vae_reruns")
    if not reruns:
        return None
    return (f"an fp16 VAE part overflowed and ran again in fp32 {reruns} time(s) in its "
            f"{timed_runs(repeats(entry['e2e_s']))}, inside their time; the baseline returns the overflowed image "
            "instead, so this contender's runs did more work than the baseline's")


def case_warnings(rows: list[dict[str, Any]], baseline: str | None, command_line: dict[str, Any] | None = None,
                  warmup: int | None = None) -> list[str]:
    """What a reader must know before trusting a case's table: too few repeats for a spread, a
    spread too wide for the ratio, stage figures that do not add up to the end-to-end one (and why),
    timed runs that include a first call (``warmup`` 0).
    ``command_line``: the flags that replaced scenario values (the advice names the one that set it)."""
    notes = []
    if baseline and rows and not any(r["contender"] == baseline for r in rows):
        notes.append(f"**No speedup or agreement figures**: {baseline}, the baseline, was not measured in this case "
                     "(see Not measured).")
    if warmup == 0 and rows:
        where = "`--warmup 0`" if "--warmup" in (command_line or {}) else "`warmup = 0` in the scenario"
        notes.append(f"**No warm-up run** ({where}): each contender's first timed run is its first call at these "
                     "shapes, with the one-time work that call does (lazy initialisation, cuDNN's algorithm search, "
                     "TensorRT's first enqueue; compiled and CUDA-graph contenders settle untimed first), so these "
                     "are not steady-state figures and the speedups compare first calls as much as steps.")
    few = sorted({repeats(r["e2e_s"]) for r in rows if repeats(r["e2e_s"]) < MIN_REPEATS})
    if few:
        where = ("`--repeats` on the command line" if "--repeats" in (command_line or {})
                 else "`repeats` in the scenario, or pass `--repeats`")
        notes.append(f"**Too few repeats**: {timed_runs(*few)} per contender; at least "
                     f"{MIN_REPEATS} are needed to report a spread (raise {where}).")
    spread = [r for r in rows if noisy(r)]
    if spread:
        base_noisy = any(r["contender"] == baseline for r in spread)
        notes.append(
            f"**Spread too wide to trust the ratio** (variation over {NOISY_CV:.0%} of the mean): "
            + ", ".join(f"{r['contender']} ±{variation(r['e2e_s']) * 100:.0f}%" for r in spread)  # type: ignore[operator]
            + ("; every speedup in this table depends on the baseline's figure" if base_noisy else "")
            + ". The machine was busy or its clock varied: rerun on a quiet machine, or with more repeats.")
    for r in rows:
        total, e2e = stages_sum(r), r["e2e_s"]["median"]
        if e2e and math.isfinite(total) and abs(total - e2e) / e2e > STAGES_APART:
            kept = all(r[k].get("samples") for k in STAGE_KEYS if k in r)
            why = ("the stages are means over {runs} separate marked runs and add up to those runs' mean time; "
                   "the difference lies between the runs (the marks' cost, or the machine's noise: compare the "
                   "spread)" if kept else "the stages are medians over {runs} separate marked runs (this report "
                   "kept no samples to average), which need not add up")
            notes.append(
                f"**{r['contender']}: the stages add up to {total * 1000:.1f} ms, end-to-end is {e2e * 1000:.1f} ms** "
                f"({(total - e2e) / e2e:+.0%}): " + why.format(runs=r.get("stage_runs", "a few")) + ".")
    notes += [f"**{r['contender']}**: {note}." for r in rows if (note := vae_rerun_note(r))]
    notes += [f"**{r['contender']}**: device memory {note}." for r in rows if (note := r["memory"].get("device_note"))]
    notes += [f"**{r['contender']}** began with {left:,.0f} MiB more in use on the device than the first contender: "
              "what the contenders before it did not give back (kernels CUDA loaded once, library workspaces, caches). "
              "Its memory figure is its peak above that, so what it reused of it is not counted."
              for r in rows if (left := r["memory"].get("device_left_over_mb") or 0) >= LEFT_OVER_NOTE_MB]
    return [f"> ⚠ {note}" for note in notes]


def _memory(entry: dict[str, Any]) -> str:
    """The device's peak above the floor read before the contender loaded, where there is one (a
    report before that floor: the device-wide peak, said so); "not sampled" for a GPU contender
    whose device memory could not be read (a note under the table says why: the process's RSS in
    its place read as the contender's GPU figure); else the process's RSS."""
    memory = entry["memory"]
    if memory.get("device_note"):
        return "GPU not sampled"
    if memory.get("device_used_peak_mb") is not None:
        floor = memory.get("device_floor_mb")
        if floor is None:
            return f"{memory['device_used_peak_mb']:,.0f} MiB GPU (device-wide)"
        return f"{memory['device_used_peak_mb'] - floor:,.0f} MiB GPU"
    return f"{memory['host_rss_peak_mb']:,.0f} MiB process RSS"


def _busy_fraction(entry: dict[str, Any]) -> float | None:
    """The measured fraction of wall time the GPU was busy, None where none was measured."""
    busy = entry.get("gpu_busy")
    return busy["fraction"] if busy and "fraction" in busy else None


def _busy(entry: dict[str, Any]) -> str:
    fraction = _busy_fraction(entry)
    return "–" if fraction is None else f"{fraction * 100:.0f}%"


def case_key(entry: dict[str, Any]) -> tuple[int, int]:
    return entry["case"]["batch"], entry["case"]["steps"]


def _row(r: dict[str, Any], rows: list[dict[str, Any]], baseline: str | None, controlnet: bool = False,
         busy: bool = True, adapter: bool = False) -> str:
    agreement = r.get("agreement")
    speedup = r.get("speedup_vs_baseline")
    if r["contender"] == baseline:
        ratio, rel, psnr_text = "baseline", "–", "–"
    else:
        ratio = f"{speedup:.2f}×" if speedup else "–"
        if speedup and ratio_untrusted(r, rows, baseline):
            ratio += " ⚠"
        rel = f"{agreement['latents_rel_l2']:.2e}" if agreement else "–"
        psnr_value = agreement["psnr_db"] if agreement else None
        psnr_text = "–" if psnr_value is None else "∞" if math.isinf(psnr_value) else f"{psnr_value:.1f}"
    cells = [
        r["contender"], _range_ms(r["e2e_s"]), f"{r['images_per_s']:.2f}", ratio, _mean_ms(r["text_encoder_s"]),
        *([_mean_ms(r["adapter_s"]) if "adapter_s" in r else "–"] if adapter else []),
        *([_mean_ms(r["controlnet_step_s"]) if "controlnet_step_s" in r else "–"] if controlnet else []),
        _mean_ms(r["unet_step_s"]), _mean_ms(r["vae_decoder_s"]), _mean_ms(r["loop_overhead_s"]), f"{r['it_per_s']:.2f}",
        _memory(r), *([_busy(r)] if busy else []), rel, psnr_text,
    ]
    return "| " + " | ".join(cells) + " |"


def _random_weights_words(label: str) -> str:
    """What random weights mean for the figures, saying "random weights" only where the label does not."""
    if "random weights" in label:
        return "  \n  Timings are representative; the images are not."
    return "  \n  **Random weights**: timings are representative; images are not."


def test_hooks_text(report: dict[str, Any]) -> str | None:
    """What a test hook did to a run, in words (None: nothing); its figures are not the code's."""
    slowed = report.get("test_hooks", {}).get(SLOW_UNET_HOOK)
    if not slowed:
        return None
    what = ", ".join(f"{name} +{seconds * 1000:g} ms" for name, seconds in slowed.items())
    return f"test hook {SLOW_UNET_HOOK} slept before every U-Net call ({what})"


def _on_trust_words(flags: Any, flag: str) -> str:
    """The Model (``--engine-dir``) or Refiner (``--refiner-engine-dir``) line's note when the
    directory given as ``flag`` does not record its checkpoint. ``flags``: the report's
    ``engines_on_trust``, a list of flags (``true`` before 2026-12-07, which did not say which
    directory: said on the Model line, as then)."""
    legacy = flags is True and flag == "--engine-dir"
    if not legacy and not (isinstance(flags, list) and flag in flags):
        return ""
    whose = "the refiner's" if flag == "--refiner-engine-dir" else "this model's"
    given = "their directory does not" if legacy else f"the directory given as {flag} does not"
    return (f"  \n  **Engines taken on trust**: {given} record the checkpoint they were made from (an ONNX export "
            f"adopted without --model), or its ControlNets' or adapters' files, so nothing proves they are {whose}")


def _test_hook_lines(report: dict[str, Any]) -> list[str]:
    text = test_hooks_text(report)
    return [f"> **Slowed on purpose**: {text}; these figures measure the hook, not the code.", ""] if text else []


def _interrupted_lines(report: dict[str, Any]) -> list[str]:
    stopped = report.get("interrupted")
    if not stopped:
        return []
    note = (f"> **Interrupted**: {stopped['reason']}. Only the cases finished before it have figures; what it "
            "stopped and what never ran is listed under \"Not measured\".")
    return [note, ""]


def _command_line_words(flags: dict[str, Any]) -> str:
    given = ", ".join(f"{flag} {value}" for flag, value in flags.items())
    return f"- Command line: {given} (in place of the scenario's values)"


def cores_label(host: dict[str, Any]) -> str:
    """``2 cores``, or ``1 of 2 cores`` where the run could use fewer than the machine has (its CPU
    affinity): a run pinned to fewer cores is another device, which ``bench compare`` refuses to
    judge against. Reports from before the field say the machine's count alone."""
    cores, usable = host.get("cores", "?"), host.get("usable_cores")
    return f"{cores} cores" if usable in (None, cores) else f"{usable} of {cores} cores"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    scenario = report["scenario"]
    gpu = env["gpu"]
    device = (f"{gpu['name']} ({gpu['memory_gb']} GiB, CUDA {gpu['cuda']}, driver {gpu['driver'] or 'unknown'})"
              if gpu else f"CPU only: {env['host']['cpu']}, {cores_label(env['host'])}")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"# Benchmark: {scenario['name']}",
        "",
        *_interrupted_lines(report),
        *_test_hook_lines(report),
        (
            f"- Model: {report['model']}"
            + (_random_weights_words(report["model"]) if report["random_weights"] else "")
            + _on_trust_words(report.get("engines_on_trust"), "--engine-dir")
        ),
        *([_refiner_words(report["refiner"]) + _on_trust_words(report.get("engines_on_trust"), "--refiner-engine-dir")]
          if report.get("refiner") else []),
        f"- Device: {device}",
        f"- Versions: {versions}; git {env['git_revision'] or 'unknown'}",
        f"- Date: {env['date']}",
        (
            f"- Setup: {scenario['height']}×{scenario['width']}, scheduler {scenario['scheduler']}, guidance "
            f"{scenario['guidance']}, precision {report['precision']}"
            + (" (on a CPU, PyTorch computes in fp32: the baseline and the Torch backend)"
               if report["precision"] == "fp16" and report.get("device") == "cpu" else "")
            + f", warm-up {scenario['warmup']}, "
            + _image_task_words(scenario, report.get("family"))
            + (f"{len(scenario['controlnets'])} ControlNet(s) ({', '.join(scenario['controlnets'])}) on a synthetic "
               f"edge map at scale {scenario.get('control_scale', 1.0)}"
               + (f" as control mode(s) {', '.join(map(str, scenario['control_mode']))}"
                  if scenario.get("control_mode") else "")
               + f"{' in guess mode' if scenario.get('guess_mode') else ''}, " if scenario.get("controlnets") else "")
            + (f"T2I-Adapter {_names(scenario['adapter'])} on a synthetic edge map at scale "
               f"{scenario.get('adapter_scale', 1.0)}, " if scenario.get("adapter") else "")
            + f"prompt \"{scenario['prompt']}\""
        ),
        (f"- Baseline: {report['baseline']} (speedup = baseline median end-to-end / contender's, same run)"
         + ("; not measured in any case (see Not measured): no speedup or agreement figures"
            if not any(r["contender"] == report["baseline"] and r["status"] == "measured" for r in report["results"])
            else "")
         if report["baseline"] else "- Baseline: none measured (no speedup column figures; add `diffusers` to the "
         "contenders for one)"),
        *([_command_line_words(report["command_line"])] if report.get("command_line") else []),
    ]
    measured = [r for r in report["results"] if r["status"] == "measured"]
    phrases = {"cuda events": "CUDA events", "host clock": "the host clock"}
    clocks = sorted({phrases.get(r.get("stage_clock", ""), str(r.get("stage_clock"))) for r in measured})
    busy = any(_busy_fraction(r) is not None for r in measured)  # a column only where a GPU was measured
    waiting = sorted({r["contender"] for r in measured if r["contender"] in WAITS_PER_STEP})
    lines += [
        (
            "- Timing: end-to-end is the host's wall clock around each whole call, in runs with no "
            "stage marks and nothing of sdexport's that waits for the device inside the denoising loop"
            + (f" ({', '.join(waiting)}: ONNX Runtime's CUDA-graph replay waits for its stream after every "
               "U-Net call, which its released versions do unconditionally)" if waiting else "") + "; per-stage "
            f"times (text encoder, T2I-Adapter, ControlNet, U-Net, VAE) come from {' and '.join(clocks) or 'no runs'} in up to "
            f"{max((r.get('stage_runs', 0) for r in measured), default=0)} separate marked runs per case, "
            "and overhead is those runs' end-to-end time outside the stages (with an init image, the VAE "
            "encoder's too: VAE is the decoder). The stage columns are means "
            "over those runs, so they (U-Net and ControlNet per call, times the calls) add up to the marked "
            "runs' mean time; where that is more than "
            f"{STAGES_APART:.0%} away from the end-to-end median, a note under the table says so. ± is the "
            "end-to-end runs' variation (standard deviation / mean); ⚠ marks a ratio not to be trusted. "
            "Peak memory is sampled in one more run, not a timed one: on a GPU the device's memory in use at "
            "its peak less what was in use as the contender began loading, the one before it freed (this "
            "process's CUDA context, other processes, what earlier contenders left); on a CPU, and for a "
            "contender that runs on it, the whole process's RSS (imports and what earlier contenders left "
            "included). it/s is U-Net calls per second of U-Net time (its mean per call inverted), not loop "
            "iterations per second of wall time; each case's heading counts the U-Net calls of one image "
            "batch (PNDM makes one more than its steps; an init image, int(steps x strength))."
            + (" GPU busy is the share of one more run's wall time in which a kernel (or a copy) ran (PyTorch's "
               "profiler, every kernel of the process; tracing slows the host, so it is a lower bound)." if busy else "")
        ),
        "",
    ]
    for case in sorted({case_key(r) for r in measured}):
        rows = [r for r in measured if case_key(r) == case]
        controlnet = any("controlnet_step_s" in r for r in rows)
        adapter = any("adapter_s" in r for r in rows)
        calls = sorted({r["unet_calls"] for r in rows if "unet_calls" in r})
        lines += [
            f"## Batch {case[0]}, {case[1]} steps" + (f" ({' or '.join(map(str, calls))} U-Net calls)" if calls else ""),
            "",
            (
                "| contender | end-to-end ms, median (min–max) ±variation | images/s | speedup | text enc. ms "
                + ("| adapter ms " if adapter else "")
                + ("| ControlNet ms/step " if controlnet else "")
                + "| U-Net ms/step | VAE ms | overhead ms | it/s | peak memory "
                + ("| GPU busy " if busy else "") + "| latents rel-L2 | PSNR dB |"
            ),
            "|---" * (12 + adapter + controlnet + busy) + "|",
        ]
        lines += [_row(r, rows, report["baseline"], controlnet, busy, adapter) for r in rows]
        lines.append("")
        warnings = case_warnings(rows, report["baseline"], report.get("command_line"), report["scenario"].get("warmup"))
        if warnings:
            lines += [*[w for note in warnings for w in (note, ">")][:-1], ""]
    one_time = report["one_time"]
    if one_time:
        lines += ["## One-time costs (not in the figures above)", ""]
        for name, values in one_time.items():
            parts = [f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
            lines.append(f"- {name}: {', '.join(parts)}")
        first = [r for r in measured if r.get("first_call_s")]
        if first:
            lines.append("- first warm-up call (lazy initialisation; compiling and CUDA-graph capture are in the "
                         "load times above): " + ", ".join(
                f"{r['contender']} (batch {r['case']['batch']}, {r['case']['steps']} steps) {r['first_call_s']:.2f} s"
                for r in first))
        lines.append("")
    skipped = [r for r in report["results"] if r["status"] != "measured"]
    if skipped:
        lines += ["## Not measured", ""]
        for r in skipped:
            where = f" (batch {r['case']['batch']}, {r['case']['steps']} steps)" if "case" in r else ""
            lines.append(f"- {r['contender']}{where}: {r['reason']}")
        lines.append("")
    return "\n".join(lines)


def _names(adapter: str | list[str]) -> str:
    """A scenario's ``adapter``: one name, or several joined (a MultiAdapter)."""
    return adapter if isinstance(adapter, str) else " + ".join(adapter)


def _refiner_words(refiner: dict[str, Any]) -> str:
    """The Model line's second half for SDXL's ensemble of experts."""
    return (f"- Refiner: {refiner['model']}, from denoising_end {refiner['denoising_end']:g} (the ensemble of "
            "experts: the base model's latents handed over undecoded; every contender, the baseline too, runs "
            "both models, and the figures cover both: U-Net per step is the mean over both models' steps, VAE the "
            "refiner's decode)" + (_random_weights_words(refiner["model"]) if refiner["random_weights"] else ""))


def _image_task_words(scenario: dict[str, Any], family: str | None) -> str:
    """The Setup line's words for an init image: img2img at a strength, or inpainting its middle
    (without a strength: the model family's default, which the report records)."""
    from sdexport.runtime.request import STRENGTH_DEFAULTS

    strength = scenario.get("strength")
    counted = "int(steps x strength) denoising steps"
    if strength is None and family in STRENGTH_DEFAULTS:
        strength = STRENGTH_DEFAULTS[family]["inpaint"]
        at = f"at strength {strength:g} (diffusers' default for {FAMILY_LABELS[family]} inpainting; {counted}), "
    else:
        at = (f"at strength {strength}" if strength is not None else "at diffusers' default strength for the model"
              ) + f" ({counted}), "
    if scenario.get("inpaint"):
        return f"inpainting the middle of a synthetic image {at}"
    return f"img2img from a synthetic image {at}" if scenario.get("strength") is not None else ""


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in report["results"] if r["status"] == "measured"]
    cases = sorted({case_key(r) for r in measured})
    names = list(dict.fromkeys(r["contender"] for r in measured))
    fig, (ax_time, ax_parts) = plt.subplots(1, 2, figsize=(13, 5.6))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rows = {case_key(r): r for r in measured if r["contender"] == name}
        xs = [c + i * width for c, case in enumerate(cases) if case in rows]
        medians = [rows[case]["e2e_s"]["median"] for case in cases if case in rows]
        errors = [[rows[c]["e2e_s"]["median"] - rows[c]["e2e_s"]["min"] for c in cases if c in rows],
                  [rows[c]["e2e_s"]["max"] - rows[c]["e2e_s"]["median"] for c in cases if c in rows]]
        bars = ax_time.bar(xs, medians, width, yerr=errors, capsize=3, label=name)
        for bar, case in zip(bars, [c for c in cases if c in rows]):
            speedup = rows[case].get("speedup_vs_baseline")
            if speedup:  # above the error bar's top, not on it; marked as the table marks it (⚠)
                untrusted = ratio_untrusted(rows[case], measured, report.get("baseline"))
                ax_time.annotate(f"{speedup:.2f}×" + ("\n(noisy)" if untrusted else ""), (bar.get_x() + bar.get_width() / 2, rows[case]["e2e_s"]["max"]),
                                 xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax_time.set_xticks([c + width * (len(names) - 1) / 2 for c in range(len(cases))])
    ax_time.set_xticklabels([f"batch {b}\n{s} steps" for b, s in cases])
    ax_time.margins(y=0.15)  # room for the labels above the tallest error bar
    ax_time.set_ylabel("end-to-end seconds (median, min–max)")
    ax_time.set_title("End-to-end latency (speedup vs baseline)")
    ax_time.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)  # off the bars
    # Where the time goes, for the first case: stacked stages per contender.
    first = [r for r in measured if case_key(r) == cases[0]] if cases else []
    bottoms = [0.0] * len(first)
    stages = [("text_encoder_s", "text encoder"), ("unet_step_s", "U-Net (all steps)"),
              ("vae_decoder_s", "VAE decode"), ("loop_overhead_s", "loop overhead")]
    if any("controlnet_step_s" in r for r in first):
        stages.insert(1, ("controlnet_step_s", "ControlNet (all steps)"))
    if any("adapter_s" in r for r in first):
        stages.insert(1, ("adapter_s", "T2I-Adapter"))
    calls = {"unet_step_s": "unet_calls", "controlnet_step_s": "controlnet_calls"}
    for stage, label in stages:
        values = [stage_mean(r[stage]) * (r[calls[stage]] if stage in calls else 1) if stage in r else 0.0
                  for r in first]
        ax_parts.bar([r["contender"] for r in first], values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax_parts.scatter([r["contender"] for r in first], [r["e2e_s"]["median"] for r in first], marker="_", s=400,
                     color="black", zorder=3, label="end-to-end median (unmarked runs)")
    ax_parts.set_ylabel("seconds (stage means over the marked runs)")
    ax_parts.set_title(f"Where the time goes (batch {cases[0][0]}, {cases[0][1]} steps)" if cases else "")
    ax_parts.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    ax_parts.tick_params(axis="x", rotation=20)
    env = report["environment"]
    device = env["gpu"]["name"] if env["gpu"] else f"CPU ({cores_label(env['host'])})"
    weights = "random weights" if report["random_weights"] else "trained weights"
    fig.suptitle(f"{report['scenario']['name']}: {report['model'].split(' (')[0]}, {weights}, {device}, "
                 f"{env['date'][:10]}" + (f" (interrupted by {report['interrupted']['by']})"
                                          if report.get("interrupted") else ""), fontsize=10)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:  # (a chart that fails is survived: its figure must not stay open)
        plt.close(fig)


RESULT_FILES = ("results.json", "results.md", "results.png")


def not_a_bench_output(directory: Path) -> str | None:
    """Why ``directory`` is not a benchmark output sdexport wrote (None when it is), before it is replaced.

    Ours: the result files, an ``engines/`` folder of sdexport engine directories, nothing else;
    the report, the table and the chart as written (``written_reports``: a table annotated by hand
    before a commit was replaced without a word).
    """
    from sdexport.manifest import not_an_engine_dir
    from sdexport.output_dir import LOCK_SUFFIX, not_a_lock_left_behind

    try:
        data = json.loads(read_regular(directory / RESULT_FILES[0]).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"it has no readable {RESULT_FILES[0]}"
    if not isinstance(data, dict) or not {"scenario", "results", "environment"} <= set(data):
        return f"its {RESULT_FILES[0]} is not an sdexport benchmark report"
    extra = sorted(p.name for p in directory.iterdir() if p.name not in (*RESULT_FILES, "engines", MARKER))
    if extra:
        return f"it holds other files: {', '.join(extra[:3])}"
    changed = changed_file(directory, RESULT_FILES[0], data, RESULT_FILES[1:])
    if changed:
        return f"its {changed} was changed since sdexport wrote it (edited by hand?)"
    engines = directory / "engines"
    if engines.is_symlink() or engines.is_file():
        return "its engines is not a folder of engine directories"
    for child in sorted(engines.iterdir()) if engines.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            reason = not_an_engine_dir(child)
        elif child.name.startswith(".") and child.name.endswith(LOCK_SUFFIX):  # a killed build's, in place
            reason = not_a_lock_left_behind(child)
        else:
            reason = "not a directory"
        if reason:
            return f"engines/{child.name}: {reason}"
    return None


BENCH_OUTPUT = OutputKind("benchmark output", not_a_bench_output, holds_engines=True)  # (engines/: its exports)


def json_ready(value: Any) -> Any:
    """``value`` as strict JSON can hold it: JSON has no Infinity or NaN (JavaScript's JSON.parse and
    strict readers refuse them), so a PSNR of identical images is written as the string "inf" (read
    back by ``decibels``), anything else not a number as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value == math.inf else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def decibels(value: Any) -> Any:
    """A PSNR as a report holds it, as a number: "inf" (``json_ready``'s) is infinite."""
    return math.inf if value == "inf" else value


def write_report(report: dict[str, Any], output_dir: Path) -> list[Path]:
    """The report's files; the chart where it can be drawn. A chart that fails (a file-size limit,
    a broken font cache) would otherwise discard, with the staging folder, the measurements of a
    whole benchmark, which the JSON and the table hold: said, and left out. The JSON comes first (it
    holds everything: a run killed meanwhile keeps it) and again last, with the hashes of the other
    two and its own (``written_reports``; ``not_a_bench_output`` reads them)."""
    from sdexport.console import console
    from sdexport.errors import one_line

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in RESULT_FILES]
    ready = json_ready(json.loads(json.dumps(report, default=str)))
    write_json_atomic(paths[0], ready)
    write_atomic(paths[1], markdown(report))
    try:
        plot(report, paths[2])
    except Exception as exc:  # matplotlib's errors are of many kinds; the table is written already
        console.print(f"[yellow]note:[/] {RESULT_FILES[2]} not drawn ({one_line(exc, 200)}): the results are in "
                      f"{RESULT_FILES[0]} and {RESULT_FILES[1]}")
        paths = paths[:2]
    write_json_atomic(paths[0], with_record(ready, paths[0].name, paths[1:]))
    return paths

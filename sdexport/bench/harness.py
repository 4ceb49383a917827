"""Run a scenario: baseline first, then each contender, every case, in one process.

Order of work per contender: check it is available (else record why and go on), load it (one-time
cost), warm up (the first call is recorded apart: it includes compilation for compiled contenders),
then timed repeats under a memory sampler. Agreement is measured against the baseline's output for
the same case and seed; the headline figure is the baseline's median end-to-end time divided by the
contender's, both measured in this run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sdexport import stopping
from sdexport.bench.contenders import (
    BaselineContender,
    Contender,
    EnsembleContender,
    Output,
    RuntimeContender,
    check_available,
    device,
    on_gpu,
    slow_down_unet,
)
from sdexport.bench.engine_cache import in_use
from sdexport.bench.environment import environment
from sdexport.bench.gpu_busy import measure_gpu_busy, start_before_cuda_graphs
from sdexport.bench.measure import MemorySampler, Stats, device_floor, psnr
from sdexport.bench.plan import (
    BenchPlan,
    Options,
    check_outside_hashed,
    hashed_folders,
    own_engines,
    plan_bench,
    protected_paths,
    request_for,
    stated_in,
)
from sdexport.bench.report import BENCH_OUTPUT, write_report
from sdexport.bench.scenario import BASELINES, SLOW_UNET_HOOK, Case, Scenario
from sdexport.console import console, spinner_drawn, step
from sdexport.errors import SdexportError, interruption_name
from sdexport.output_dir import claim
from sdexport.runtime.schedulers import check_steps, config_as_loaded
from sdexport.setting_names import scenario_key, settings_named
from sdexport.shapes import ShapeProfile


def precision(scenario: Scenario) -> str:
    if scenario.dtype != "auto":
        return scenario.dtype
    return "fp16" if torch.cuda.is_available() else "fp32"


@settings_named(scenario_key)  # as the plan: the contenders' refusals name the scenario's keys too
def run_benchmark(scenario: Scenario, output_dir: Path, options: Options,
                  source: Path | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Run ``scenario`` and write its report into ``output_dir``; returns the report and its files.
    ``source``: the scenario's file, named in refusals of what it states (``plan_bench``).

    The output folder appears only when at least one case was measured, whole: the work (and any
    engine export) happens in a hidden staging folder (``sdexport.output_dir``). A previous
    benchmark output there is replaced, its matching engines reused; anything else is refused.

    Ctrl-C or SIGTERM part-way (a CI timeout, a rented GPU's budget) does not cost what was already
    measured: once a case has figures, the report of the finished cases, marked as interrupted, is
    written and put in place like a finished one, then ``BenchmarkInterrupted`` is raised. Once the
    measuring is over, a signal waits for the report to be in place (``_WritingShield``), then
    raises ``BenchmarkInterrupted`` too.
    """
    plan = plan_bench(scenario, options, source)
    if options.engine_dir is None and any(c not in BASELINES for c in plan.contenders):  # (it exports)
        check_outside_hashed(output_dir, "-o", hashed_folders(scenario, plan.outline, plan.refiner))
    with stated_in(source):
        # as the runtime will sample (its SD pipeline's rewrite of an outdated config: the model's
        # dims are not read yet, so what conditions its U-Net comes from the scenario and the config)
        conditioned = bool(scenario.controlnets or scenario.adapter
                           or (plan.outline.unet_config or {}).get("time_cond_proj_dim"))
        config = config_as_loaded(plan.scheduler_config, scenario.scheduler, family=plan.outline.family,
                                  conditioned=conditioned, inpainting=scenario.inpaint)
        for case in scenario.cases:  # needs diffusers' schedulers, still before the first model loads
            check_steps(scenario.scheduler, config, case.steps, from_image=scenario.image_inputs)
    needs_engines = _engines_wanted(plan.contenders, exporting=options.engine_dir is None)
    cached = ([engine_cache_entry(s, p, options.engine_cache) for s, p in exports(scenario, plan)]
              if options.engine_cache and needs_engines else [])
    with (_WritingShield() as shield,
          claim(output_dir, BENCH_OUTPUT, replace=True, protected=protected_paths(plan, options, output_dir)) as staging,
          contextlib.ExitStack() as held):
        for entry in cached:
            held.enter_context(in_use(entry))
        report, reused = _run(scenario, output_dir, staging, options, plan, cached, shield, needs_engines)
        if not any(r["status"] == "measured" for r in report["results"]):
            shield.release()  # nothing to write: a signal may stop the clean-up (an export to discard)
            if shield.pending is not None:  # a stop noted (or dropped on the way) as the last contender ended
                raise shield.pending
            raise SdexportError("no contender could run; see the reasons above (nothing was written)")
        try:
            paths = [output_dir / p.name for p in write_report(report, staging)]
        except OSError as exc:
            raise _report_unwritten(exc, report, staging, output_dir) from None
        for engines in reused:  # the previous output's engines go into the new one, only now
            (staging / "engines").mkdir(exist_ok=True)
            _link_tree(engines, staging / "engines" / engines.resolve().name)
    if report.get("interrupted"):
        raise BenchmarkInterrupted(report, paths, f"{report['interrupted']['reason']}: the report holds what was "
                                                  "measured before it")
    if shield.pending is not None:
        raise BenchmarkInterrupted(report, paths, f"{interruption_name(shield.pending)} came when the measuring had "
                                                  "finished: the report is complete")
    return report, paths


def _report_unwritten(exc: OSError, report: dict[str, Any], staging: Path, output_dir: Path) -> OSError:
    """A report that could not be written (a full disk) took the run's measurements with the staging
    folder, and the error named that folder's file, gone by then: the table goes to stdout, as
    loadtest's does, and the error names the output's file and says where the figures are."""
    from sdexport.atomic import TEMP_NAME
    from sdexport.bench.report import markdown
    from sdexport.console import print_result

    print_result(markdown(report).rstrip("\n"))
    where = Path(str(exc.filename)) if exc.filename else None
    if where is not None and where.is_relative_to(staging):
        temporary = TEMP_NAME.match(where.name)
        where = output_dir / where.relative_to(staging).with_name(temporary["name"] if temporary else where.name)
    return OSError(exc.errno, f"{exc.strerror or exc}: the report was not written; the results are the table printed "
                              "above", None if where is None else str(where))


def _link_tree(source: Path, destination: Path) -> None:
    """Copy a directory by hard links (no second copy of gigabytes of weights; the old output stays
    intact until the swap replaces it), falling back to copying where links are not possible."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, destination, copy_function=link)


def _engines_wanted(contenders: list[str], *, exporting: bool) -> bool:
    """Whether a contender that runs sdexport's engines can run here, so that exporting them is
    worth its minutes. One that cannot (TensorRT or onnxruntime-gpu not installed) is skipped later
    with what to install; a bench of only such contenders says so at once instead of after an export
    nobody would run. ``exporting``: the engines would be exported (no --engine-dir), so say why not."""
    wanted = [c for c in contenders if c not in BASELINES]
    for name in wanted:
        try:
            check_available(name)
            return True
        except SdexportError:
            continue
    if wanted and exporting:
        console.print(f"[yellow]not exporting:[/] {', '.join(wanted)} cannot run here (the reasons follow)")
    return False


def _run(
    scenario: Scenario, output_dir: Path, staging: Path, options: Options, plan: BenchPlan, cached: list[Path],
    shield: _WritingShield, needs_engines: bool,
) -> tuple[dict[str, Any], list[Path]]:
    """The measurements; also the previous output's engine directories that were reused in place.
    ``cached``: the engine cache entries to use (or fill), one per export (``exports``), held for
    this run; empty without ``--engine-cache``. ``shield`` is engaged
    once the measuring is over, finished or interrupted. ``needs_engines``: whether a contender
    that can run here runs engines (``_engines_wanted``)."""
    contenders, repeats, warmup = plan.contenders, plan.repeats, plan.warmup
    baseline = contenders[0] if contenders[0] in BASELINES else None
    start_before_cuda_graphs()  # before any contender loads: the GPU-busy runs trace CUDA-graph replays
    start_floor = device_floor()  # (likewise: what the contenders leave behind is measured from it)
    dtype = plan.dtype or precision(scenario)  # a given engine directory's, else the scenario's
    env = environment()
    one_time: dict[str, dict[str, float | str]] = {}

    from sdexport.models import load_model

    start = time.perf_counter()
    # lazy: configs and tokenizers now, weights only when a PyTorch baseline loads (_load), so the
    # export below, which loads the model again one part at a time, holds no second copy of them
    # (ControlNets excepted: they are read at once, lazy or not)
    with step(f"Reading {scenario.model}'s configs" + (f" and {scenario.refiner}'s" if scenario.refiner else "")):
        model = load_model(scenario.model, config=scenario.config, controlnets=scenario.controlnets,
                           adapters=scenario.adapters, lazy=True)
        refiner = (load_model(scenario.refiner, config=scenario.refiner_config, lazy=True)
                   if scenario.refiner is not None else None)
    one_time["model"] = {"load_s": time.perf_counter() - start}
    engine_dir, refiner_dir = options.engine_dir, options.refiner_engine_dir
    recorded_dir, recorded_refiner = engine_dir, refiner_dir
    made_by = exports(scenario, plan)
    reused: list[Path] = []
    if engine_dir is not None:  # read in place; the output's own are carried into the new one
        reused = [d for d in (engine_dir, refiner_dir) if d is not None and own_engines(d, output_dir)]
        recorded_dir, recorded_refiner = (output_dir / "engines" / d.resolve().name if d in reused else d
                                          for d in (engine_dir, refiner_dir))
    elif cached:
        made = [_cached_export(s, p, entry, one_time, what) for (s, p), entry, what in zip(made_by, cached, EXPORTS)]
        engine_dir, refiner_dir = _pair(made)
        recorded_dir, recorded_refiner = engine_dir, refiner_dir
    elif needs_engines and engine_dir is None:
        made = [_export(s, p, output_dir, staging, one_time, what) for (s, p), what in zip(made_by, EXPORTS)]
        engine_dir, refiner_dir = _pair(made)
        reused = [d for d in made if d.is_relative_to(output_dir)]
        # where they are once the output is in place
        recorded_dir, recorded_refiner = _pair([output_dir / "engines" / s.name for s, _ in made_by])

    # what the engines were exported for, read now: the report is assembled after the measuring, when
    # a cache entry deleted meanwhile threw away every figure (an audit)
    workload = engines_workload(engine_dir) if engine_dir is not None else None
    tally = _Tally(baseline)
    results = tally.results
    total_runs = len(contenders) * len(scenario.cases) * (warmup + repeats)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not spinner_drawn(),
                  auto_refresh=False) as progress:  # (no redraw thread taking Python's lock in a timed run)
        task = progress.add_task("benchmark", total=total_runs)

        def advance() -> None:
            """One timed run is done; also where a Ctrl-C or SIGTERM whose KeyboardInterrupt was
            dropped on the way (``sdexport.stopping``) stops the case, as one that arrived would."""
            progress.advance(task)
            progress.refresh()  # between runs, never inside one
            stopping.check()

        try:
            for name in contenders:
                began = time.perf_counter()
                tally.start(name)
                progress.update(task, description=f"{name}: loading", refresh=True)
                # its peaks are given above what was in use as it began, the one before it freed
                gpu = on_gpu(name)
                floor = device_floor() if gpu else None
                left_over = floor - start_floor if floor is not None and start_floor is not None else None
                try:
                    check_available(name)
                    for built, what in zip((engine_dir, refiner_dir), EXPORTS):
                        if name == "tensorrt" and built is not None:
                            _build_tensorrt(built, scenario, one_time, what, fp16=dtype == "fp16")
                        if name == "onnxruntime-cuda-fused" and built is not None:
                            _build_onnxruntime(built, one_time, what, fp16=dtype == "fp16")
                    loaded_at = time.perf_counter()
                    # engines made from the scenario's checkpoint (exported, cached, or given and proven so):
                    # the Torch contenders reload it where it lies here, else as their manifests say
                    contender = _load(name, model, engine_dir, dtype, scenario, plan.from_scenario("--engine-dir"))
                    if refiner is not None:
                        contender = _with_refiner(contender, name, refiner, refiner_dir, dtype, scenario,
                                                  plan.from_scenario("--refiner-engine-dir"))
                    try:
                        if name in plan.slow_unet:
                            slow_down_unet(contender, plan.slow_unet[name])
                        if getattr(contender, "per_shape", False) or name == "diffusers-compile":
                            _capture_graphs(contender, scenario)  # compiling and capturing are loading
                        one_time[name] = {"load_s": time.perf_counter() - loaded_at}
                    except BaseException:  # a failed capture, an interruption: its engines leave the device
                        contender.close()
                        raise
                except SdexportError as exc:
                    console.print(f"[yellow]skipping {name}:[/] {escape(str(exc))}")
                    results.append({"contender": name, "status": "unavailable", "reason": str(exc)})
                    progress.advance(task, len(scenario.cases) * (warmup + repeats))
                    continue
                except Exception as exc:  # noqa: BLE001 - a broken contender must not lose the others' numbers
                    reason = _broken(name, "loading", exc)
                    results.append({"contender": name, "status": "failed", "reason": reason})
                    progress.advance(task, len(scenario.cases) * (warmup + repeats))
                    _free_device()
                    continue
                tally.stage = "measuring"
                try:
                    for case in scenario.cases:
                        tally.case = case
                        progress.update(task, description=f"{name}: {case.label}", refresh=True)
                        try:
                            entry = _measure(contender, scenario, case, warmup, repeats, advance,
                                             floor=floor, left_over=left_over, gpu=gpu)
                        except SdexportError as exc:  # e.g. a shape outside a static TensorRT engine
                            console.print(f"[yellow]{name}, {case.label}: not measured:[/] {escape(str(exc))}")
                            results.append({"contender": name, "status": "failed", "case": vars(case),
                                            "reason": str(exc)})
                            continue
                        except Exception as exc:  # noqa: BLE001 - recorded with its traceback; the next case runs
                            results.append({"contender": name, "status": "failed", "case": vars(case),
                                            "reason": _broken(name, case.label, exc)})
                            continue
                        tally.measured.append((case, entry))
                    tally.stage, tally.case = "done", None
                finally:  # its weights and engines leave the device before the next contender loads
                    contender.close()
                    del contender
                    _free_device()
                # a line per contender: the bar above is for terminals; a CI log sees these, with each
                # case's median (a run killed before its report is written still leaves them in its log)
                mark = "[green]✓[/]" if tally.measured else "[yellow]✗[/]"
                medians = "; ".join(f"{case.label} {entry['e2e_s']['median']:.3f} s" for case, entry in tally.measured)
                console.print(f"{mark} {name}: {len(tally.measured)} of {len(scenario.cases)} case(s) measured "
                              f"[dim]({time.perf_counter() - began:.1f} s)[/]" + (f": {medians}" if medians else ""))
                tally.settle()
            tally.stage = "finished"
            shield.engage()
        except KeyboardInterrupt as exc:
            # a second signal (GitHub sends SIGINT, then SIGTERM) must not cost the report; engaging also
            # takes this stop's record (sdexport.stopping), so that the claim does not raise it again
            shield.engage()
            if not tally.settle():
                shield.release()
                raise  # nothing measured: nothing to keep, the output folder is not made
            if tally.stage == "finished" or tally.stage == "done" and tally.contender == contenders[-1]:
                shield.pending = exc  # it came after the last contender: the run is whole, and then stops
            else:
                tally.interrupted = _interruption(exc, tally, contenders, scenario.cases, time.perf_counter() - start)
            _free_device()
    return {
        # the cut as run (a default and an explicit 0.8 compare as the same workload)
        "scenario": {**vars(scenario), "denoising_end": scenario.cut, "contenders": contenders, "warmup": warmup,
                     "repeats": repeats},
        "baseline": baseline,
        "precision": dtype,
        "device": str(device()),
        "random_weights": model.random_weights,
        "model": model.label,
        "family": model.family,
        "engine_dir": str(recorded_dir) if recorded_dir else None,
        **({"engines": workload} if workload is not None else {}),
        # (the flags of given directories that do not record their checkpoint: ONNX exports adopted
        # without --model; true in reports before 2026-12-07, which did not say which)
        **({"engines_on_trust": list(plan.on_trust)} if plan.on_trust else {}),
        **({"refiner": {"model": refiner.label, "random_weights": refiner.random_weights, "denoising_end": scenario.cut,
                        "engine_dir": str(recorded_refiner) if recorded_refiner else None}} if refiner else {}),
        "environment": env,
        "one_time": one_time,
        "test_hooks": {SLOW_UNET_HOOK: plan.slow_unet} if plan.slow_unet else {},
        "command_line": command_line(options),
        **({"interrupted": tally.interrupted} if tally.interrupted else {}),
        "results": results,
    }, reused


def engines_workload(engine_dir: Path) -> dict[str, Any]:
    """What the timed engines were exported for (their precision and shape profile): part of what a
    report measures, exported by the run or given with ``--engine-dir`` (where the scenario's
    ``export`` settings say nothing of them), which ``bench compare`` holds equal."""
    from sdexport.manifest import load_manifest

    manifest = load_manifest(engine_dir, verify_files=False)
    return {"dtype": manifest.dtype, "profile": manifest.profile}


class BenchmarkInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a benchmark after something was measured. Raised once the report is
    in place (``paths``): marked as interrupted, or whole when the signal came after the measuring;
    a KeyboardInterrupt still, so the process ends as an interrupted one (exit status 130)."""

    def __init__(self, report: dict[str, Any], paths: list[Path], message: str) -> None:
        super().__init__(message)
        self.report, self.paths = report, paths


class _WritingShield:
    """Once the measuring is over, a Ctrl-C or SIGTERM would cost everything measured: the report is
    being written, and an interruption discards the staging folder. From ``engage`` until the block
    ends (the output in place) such a signal is noted on stderr and kept in ``pending``, and the
    writing goes on (seconds; SIGKILL still ends it); ``run_benchmark`` acts on it once the output
    is in place. Senders that signal twice: GitHub Actions (SIGINT, then SIGTERM 7.5 s later), a user
    pressing Ctrl-C again, and ci/bench-gate.sh passing the job's signal on to a benchmark that had
    it already."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self.pending: KeyboardInterrupt | None = None
        """The first signal that came while engaged (or one that ended a run with nothing left to run)."""

    def __enter__(self) -> _WritingShield:
        return self

    def engage(self) -> None:
        """Take over SIGINT, SIGTERM and SIGHUP. Safe to call again: a handler that was not installed (an old
        handler ran first and raised) is installed by the next call. A signal ignored when the run
        began (SIGINT in a background job) stays ignored. A stop asked for earlier whose
        KeyboardInterrupt was dropped on the way (``sdexport.stopping``) becomes ``pending``."""
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can be set in the main thread only; a library caller's thread keeps its own
        for number in stopping.STOPS:  # (a closed terminal sends two SIGHUPs: the second came mid-write)
            if number in self._previous or signal.getsignal(number) is signal.SIG_IGN:
                continue
            # recorded only once installed: after that a signal goes to _note, which never raises
            previous = signal.signal(number, self._note)
            self._previous[number] = previous
        dropped = stopping.take()
        if self.pending is None:
            self.pending = dropped

    def _note(self, number: int, frame: object) -> None:
        if self.pending is None:
            self.pending = stopping.stop_for(number)
        if number == stopping.HANGUP:
            stopping.detach_terminal()
        # os.write, not the console: a handler may run in the middle of the console's own print; and
        # nothing it raises (stderr a closed pipe) may abort the write it protects
        with contextlib.suppress(OSError):
            os.write(2, f"{signal.Signals(number).name}: the report is being written; sdexport stops once it is in "
                        f"place (SIGKILL stops it now)\n".encode())

    def release(self) -> None:
        """Give the handlers back (also when nothing is left to write: discarding is not protected)."""
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Tally:
    """The results as they come in, and what runs now: an interruption names what it stopped and
    keeps every case measured before it, with its agreement with the baseline's images."""

    def __init__(self, baseline: str | None) -> None:
        self.baseline = baseline
        self.results: list[dict[str, Any]] = []
        self.contender: str | None = None
        self.stage = "done"
        """"loading", "measuring" (``case``, None between cases), "done" (closing, or between contenders),
        or "finished" (every contender has run)."""
        self.case: Case | None = None
        self.measured: list[tuple[Case, dict[str, Any]]] = []
        self.interrupted: dict[str, Any] | None = None
        self._baseline_outputs: dict[Case, Output] = {}
        self._baseline_median: dict[Case, float] = {}

    def start(self, name: str) -> None:
        self.contender, self.stage, self.case, self.measured = name, "loading", None, []

    def settle(self) -> bool:
        """Add the current contender's measured cases to the results, with their agreement with the
        baseline. Safe to call again when an interruption came in the middle of it: a case already
        added is not added twice. True when anything at all has been measured."""
        for case, entry in self.measured:
            if any(entry is r for r in self.results):
                continue
            output = entry.get("_output")  # popped below, once the figures that need it are in
            if output is not None and self.contender == self.baseline:
                self._baseline_outputs[case] = output
                self._baseline_median[case] = entry["e2e_s"]["median"]
            elif output is not None and case in self._baseline_outputs:
                reference = self._baseline_outputs[case]
                entry["agreement"] = {
                    "baseline": self.baseline,
                    "latents_rel_l2": float(torch.linalg.norm(output.latents - reference.latents)
                                            / torch.linalg.norm(reference.latents)),
                    "psnr_db": psnr(output.pixels, reference.pixels),
                }
                entry["speedup_vs_baseline"] = self._baseline_median[case] / entry["e2e_s"]["median"]
            entry.pop("_output", None)
            self.results.append(entry)
        return any(r["status"] == "measured" for r in self.results)


def _interruption(exc: KeyboardInterrupt, tally: _Tally, contenders: list[str], cases: list[Case],
                  after_s: float) -> dict[str, Any]:
    """Record what an interruption stopped (an "interrupted" entry) and what it left unrun ("not run"
    entries) in ``tally``'s results; returns the report's ``interrupted`` summary."""
    by = interruption_name(exc)
    never = f"not run: the benchmark was interrupted by {by} before it"
    name, stage, case = tally.contender, tally.stage, tally.case
    left = contenders[contenders.index(name) + 1:] if name in contenders else list(contenders)
    # what has an entry already (the interruption may come just after one was added)
    recorded = [r.get("case") for r in tally.results if r["contender"] == name]
    if name is not None and stage == "loading":
        where = f"while loading {name}"
        if not recorded:
            tally.results.append({"contender": name, "status": "interrupted",
                                  "reason": f"interrupted by {by} while loading"})
    elif name is not None and stage == "measuring":
        where = f"while measuring {name}" + (f", {case.label}" if case is not None else "")
        ran = {(c["batch"], c["steps"]) for c in recorded if c}
        # the cases before this one ran (measured or failed); this one was stopped; the rest wait
        for later in cases[cases.index(case) if case in cases else 0:]:
            if (later.batch, later.steps) in ran:
                continue
            stopped = later == case
            tally.results.append({
                "contender": name, "status": "interrupted" if stopped else "not run", "case": vars(later),
                "reason": f"interrupted by {by} while it was measured" if stopped else never})
    else:
        where = f"after {name}" if name is not None else "before the first contender"
    for other in left:
        tally.results.append({"contender": other, "status": "not run", "reason": never})
    reason = f"interrupted by {by} {where} ({after_s:.0f} s into the benchmark)"
    console.print(f"[yellow]{escape(reason)}:[/] writing what was measured before it")
    return {"by": by, "contender": name, "stage": stage, "case": vars(case) if case is not None else None,
            "after_s": after_s, "not_run": left, "reason": reason}


def command_line(options: Options) -> dict[str, Any]:
    """The flags that replaced the scenario's values in this run (the report names them, so that no
    figure is read as the scenario file's alone)."""
    given = {"--contenders": ",".join(options.contenders) if options.contenders else None,
             "--repeats": options.repeats, "--warmup": options.warmup,
             "--engine-dir": str(options.engine_dir) if options.engine_dir else None,
             "--refiner-engine-dir": str(options.refiner_engine_dir) if options.refiner_engine_dir else None}
    return {flag: value for flag, value in given.items() if value is not None}


def _broken(name: str, stage: str, exc: Exception) -> str:
    """Print a contender's unexpected failure with its traceback (the log shows where it broke) and
    return the one line the report keeps. A benchmark on a rented GPU runs many contenders; a bug in
    one of them must cost its own figures only, never the measurements of the others."""
    console.print(f"[red]{escape(name)}, {escape(stage)}: failed:[/] {escape(type(exc).__name__)}: {escape(str(exc))}")
    console.print_exception(show_locals=False, max_frames=20)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{stage}: {type(exc).__name__}: {first_line}"


def _free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


EXPORTS = ("export", "refiner_export")
"""The report's ``one_time`` records of the exports (``exports``): the model's, the refiner's."""
BASE_MODEL_KEYS = ("refiner", "denoising_end", "refiner_config", "strength", "inpaint", "controlnets", "control_mode", "control_scale",
                   "guess_mode", "adapter", "adapter_scale")
"""The keys of a refiner scenario that its refiner's export (``exports``) leaves at their
defaults: the ensemble's own, and those of the base model alone (an init image, ControlNets,
adapters)."""


def exports(scenario: Scenario, plan: BenchPlan) -> list[tuple[Scenario, BenchPlan]]:
    """What the benchmark exports, each as a scenario and plan of its own: the model, and a
    refiner's (``Scenario.refiner``) as a model of its own with the same profile and precision,
    in ``engines/<name>-refiner`` (or its own engine cache entry)."""
    if scenario.refiner is None:
        return [(scenario, plan)]
    from sdexport.runtime.ensemble import field_defaults

    # it starts from latents (no VAE encoder) and takes no ControlNet or T2I-Adapter: those are the base model's
    alone = dataclasses.replace(scenario, name=f"{scenario.name}-refiner", model=scenario.refiner,
                                config=scenario.refiner_config, **field_defaults(Scenario, BASE_MODEL_KEYS))
    return [(scenario, plan), (alone, plan.refiner_plan())]


def _pair(paths: list[Path]) -> tuple[Path, Path | None]:
    """The model's engine directory and the refiner's (None without one), from ``exports``' order."""
    return paths[0], (paths[1] if len(paths) > 1 else None)


def _export(scenario: Scenario, plan: BenchPlan, output_dir: Path, staging: Path,
            one_time: dict[str, dict[str, float | str]], what: str = "export") -> Path:
    """Export once into the staging output, or use the previous output's engines in place when they
    were made for the same export (they move into the new output only when it is complete).

    "The same export" is the engine cache's key (``export_key``: the model's files or preset, the
    ControlNets, profile, precision, components, sdexport's graph code and library versions; files by
    their stamps, not hashed on every run), which the previous output's results.json records.
    Comparing the manifest's settings alone reused SD engines for an SDXL model, and a standard
    U-Net's for an inpainting one."""
    from sdexport.bench.engine_cache import damage

    key = _export_key(scenario, plan, by_content=False)
    previous = output_dir / "engines" / scenario.name
    target = staging / "engines" / scenario.name
    if (previous / "manifest.json").is_file() and _previous_export_key(output_dir, what) == key:
        # (its export's files hashed, as a cache entry's: a damaged graph was reused run after run;
        # plans and fused graphs are their builders' to check and rebuild one by one)
        if damage(previous) is None:
            one_time[what] = {"status": "reused", "path": str(previous), "key": key}
            return previous
    seconds = _export_to(target, scenario, plan.outline.family, precision(scenario), plan.export_profile)
    one_time[what] = {"export_s": seconds, "path": str(previous), "key": key}
    return target


def _export_key(scenario: Scenario, plan: BenchPlan, *, by_content: bool = True) -> str:
    from sdexport.bench.engine_cache import export_key

    dtype = precision(scenario)
    return export_key(scenario, plan.outline.sources, plan.export_profile, dtype,
                      export_components(scenario, plan.outline.family, dtype), by_content=by_content)


def _previous_export_key(output_dir: Path, what: str = "export") -> str | None:
    """The export key the previous output's engines (``what``: of ``EXPORTS``) were made (or reused)
    under; None for an output that does not record one (it exports again)."""
    try:
        report = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
        key = report["one_time"][what]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return key if isinstance(key, str) else None


def _export_to(target: Path, scenario: Scenario, family: str, dtype: str, profile: ShapeProfile) -> float:
    """Export what the scenario runs into ``target``; returns the seconds it took."""
    from sdexport.export.exporter import ExportOptions, export

    start = time.perf_counter()
    export(scenario.model, target, ExportOptions(profile=profile, dtype=dtype, config=scenario.config,
                                                 components=export_components(scenario, family, dtype),
                                                 verify=scenario.export.get("verify", "quick"), force=True,
                                                 controlnets=list(scenario.controlnets), adapters=scenario.adapters))
    return time.perf_counter() - start


def export_components(scenario: Scenario, family: str, dtype: str) -> list[str]:
    """What the loop may run (the VAE encoders for img2img and inpainting only), plus the fp32 VAE
    parts for fp16 exports (the fallback decoder, or SDXL's decoder and encoder from the start:
    ``build.vae_upcast``; the fp16 ones stay in an SDXL export, as in any other)."""
    from sdexport.specs import VAE_ENCODERS, components_for

    return [s.name for s in components_for(family, len(scenario.controlnets), len(scenario.adapters))
            if (s.name not in VAE_ENCODERS or scenario.image_inputs) and (dtype == "fp16" or not s.always_fp32)]


def engine_cache_entry(scenario: Scenario, plan: BenchPlan, cache: Path) -> Path:
    """Where ``--engine-cache`` keeps (or will keep) this scenario's export."""
    from sdexport.bench.engine_cache import cache_entry

    return cache_entry(cache.resolve(), scenario, _export_key(scenario, plan))


def _cached_export(scenario: Scenario, plan: BenchPlan, entry: Path, one_time: dict[str, dict[str, float | str]],
                   what: str = "export") -> Path:
    """The export from the engine cache, made there first when no run has made it yet (or when the
    one there is damaged: it is set aside first)."""
    from sdexport.bench.engine_cache import damage, mark_used, set_aside

    problem = damage(entry) if entry.exists() or entry.is_symlink() else "absent"
    if problem is None:
        one_time[what] = {"status": "cached", "path": str(entry)}
    else:
        if problem != "absent":
            aside = set_aside(entry)
            console.print(f"[yellow]engine cache:[/] {escape(entry.name)} is damaged ({escape(problem)}); "
                          f"moved to {escape(aside.name)}, exporting again")
        seconds = _export_to(entry, scenario, plan.outline.family, precision(scenario), plan.export_profile)
        one_time[what] = {"export_s": seconds, "path": str(entry), "status": "cached now"}
    mark_used(entry)
    return entry


def _build_tensorrt(engine_dir: Path, scenario: Scenario, one_time: dict[str, dict[str, float | str]],
                    what: str = "export", *, fp16: bool) -> None:
    """``fp16``: the run's precision (an fp32 scenario's engines were built with TensorRT 10's fp16
    flag, and timed against the fp32 baseline)."""
    from sdexport.build.tensorrt_build import build_engines

    start = time.perf_counter()
    results = build_engines(
        engine_dir,
        static=bool(scenario.build.get("static", False)),
        optimization_level=scenario.build.get("optimization_level"),
        fp16=fp16,
    )
    one_time[_built(what, "tensorrt_build")] = {
        "build_s": time.perf_counter() - start,
        "engines": ", ".join(f"{r.component}: {r.status}" for r in results),
    }


def _build_onnxruntime(engine_dir: Path, one_time: dict[str, dict[str, float | str]], what: str = "export", *,
                       fp16: bool) -> None:
    from sdexport.build.onnxruntime_build import build_onnxruntime

    start = time.perf_counter()
    results = build_onnxruntime(engine_dir, fp16=fp16)
    one_time[_built(what, "onnxruntime_build")] = {
        "build_s": time.perf_counter() - start,
        "graphs": ", ".join(f"{r.component}: {r.status}" for r in results),
    }


def _built(what: str, build: str) -> str:
    """The ``one_time`` record of a build into the export ``what``: ``refiner_tensorrt_build`` for the refiner's."""
    return build if what == EXPORTS[0] else f"refiner_{build}"


def _load(name: str, model: Any, engine_dir: Path | None, dtype: str, scenario: Scenario,
          from_scenario: bool) -> Contender:
    """``from_scenario``: ``engine_dir`` was exported from the scenario's model (by this run, into the
    engine cache, perhaps on another runner, or given and proven so), which the Torch backends then
    reload where it is."""
    if name in BASELINES:
        for part in list(model.modules):
            model.materialize(part)  # the weights: its loading time is this contender's
        return BaselineContender(name, model, dtype)
    assert engine_dir is not None
    cuda_graph = name == "tensorrt" and bool(scenario.build.get("cuda_graph", False))
    return RuntimeContender(name, engine_dir, cuda_graph=cuda_graph, image_inputs=scenario.image_inputs,
                            model_source=model.source if from_scenario else None)


def _with_refiner(base: Contender, name: str, refiner: Any, refiner_dir: Path | None, dtype: str,
                  scenario: Scenario, from_scenario: bool) -> Contender:
    """``base`` and the refiner loaded as the same kind of contender, as one (``EnsembleContender``)."""
    assert scenario.cut is not None
    try:
        if name in BASELINES:
            for part in list(refiner.modules):
                refiner.materialize(part)
            second: Contender = BaselineContender(name, refiner, dtype)
        else:
            assert refiner_dir is not None
            cuda_graph = name == "tensorrt" and bool(scenario.build.get("cuda_graph", False))
            second = RuntimeContender(name, refiner_dir, cuda_graph=cuda_graph,
                                      model_source=refiner.source if from_scenario else None)
    except BaseException:
        base.close()
        raise
    return EnsembleContender(base, second, scenario.cut)


def stage_runs(repeats: int) -> int:
    """Marked runs for the stage breakdown, after the timed ones: a few suffice for medians."""
    return max(1, min(repeats, 3))


def _capture_graphs(contender: Contender, scenario: Scenario) -> None:
    """One call per case as part of loading: the engines capture their CUDA graphs (or compile) for
    every shape the cases use now, so these one-time costs are reported with loading. A case the
    engines cannot run is left for the measurement to report. (ONNX Runtime CUDA graphs hold one
    shape set at a time: with several cases, each case's warm-up makes its session again.)"""
    for case in scenario.cases:
        try:
            contender(request_for(scenario, case))
        except SdexportError:
            continue


def _measure(contender: Contender, scenario: Scenario, case: Case, warmup: int, repeats: int,
             advance: Any, *, floor: int | None = None, left_over: int | None = None,
             gpu: bool | None = None) -> dict[str, Any]:
    """One case's figures: the timed runs end to end, then separate runs for the stages, the peak
    memory (``MemorySampler``, whose thread would slow a timed run) and the GPU's busy share.
    ``floor``: the device memory in use before this contender loaded (``device_floor``), of which
    ``left_over`` the contenders before it left; ``gpu``: whether it runs on the GPU (``on_gpu``;
    default: whether there is one), else its memory is the host's and no busy share is measured."""
    request = request_for(scenario, case)
    first_call = None
    if warmup == 0 and getattr(contender, "per_shape", False):
        contender(request)  # settles on this case's shapes untimed (see _capture_graphs)
    for i in range(warmup):
        start = time.perf_counter()
        contender(request)
        if i == 0:
            first_call = time.perf_counter() - start
        advance()
    first: Output | None = None
    totals: list[float] = []
    reruns = 0
    for _ in range(repeats):  # end to end: runs with no marks and no synchronisation inside
        output = contender(request, stages=False)
        totals.append(output.timings.total)
        reruns += output.vae_reruns
        first = first or output  # (only the first is kept)
        del output
        advance()
    # Stage figures from separate runs marked with the device's clock (CUDA events on a GPU).
    staged = [contender(request) for _ in range(stage_runs(repeats))]
    gpu = torch.cuda.is_available() if gpu is None else gpu
    with MemorySampler(floor=floor, left_over=left_over, device=gpu) as memory:  # its thread would slow a timed run
        contender(request, stages=False)
    busy = measure_gpu_busy(lambda: contender(request, stages=False)) if gpu else None
    steps = [s for o in staged for s in o.timings.unet_steps]
    e2e = Stats.of(totals)
    return {
        "contender": contender.name,
        "status": "measured",
        "case": {"batch": case.batch, "steps": case.steps, "height": scenario.height, "width": scenario.width},
        "first_call_s": first_call,
        "e2e_s": e2e.to_dict(),
        "images_per_s": case.batch / e2e.median,
        "text_encoder_s": Stats.of([o.timings.text_encoder for o in staged]).to_dict(),
        **({"adapter_s": Stats.of([o.timings.adapter for o in staged]).to_dict()} if scenario.adapter else {}),
        "unet_step_s": Stats.of(steps).to_dict(),
        "unet_calls": len(staged[0].timings.unet_steps),
        **({"controlnet_step_s": Stats.of([s for o in staged for s in o.timings.controlnet_steps]).to_dict(),
            "controlnet_calls": len(staged[0].timings.controlnet_steps)} if staged[0].timings.controlnet_steps else {}),
        "vae_decoder_s": Stats.of([o.timings.vae_decoder for o in staged]).to_dict(),
        "loop_overhead_s": Stats.of([o.timings.loop_overhead for o in staged]).to_dict(),
        # the U-Net column's figure as a rate (1 / its mean), not a median of per-run rates that disagrees with it
        "it_per_s": len(steps) / sum(steps) if sum(steps) > 0 else 0.0,
        "stage_clock": staged[0].timings.clock,
        "stage_runs": len(staged),
        "marked_e2e_s": Stats.of([o.timings.total for o in staged]).to_dict(),
        "memory": memory.to_dict(),
        "gpu_busy": busy,
        **({"vae_reruns": reruns} if reruns else {}),
        "_output": first,
    }


__all__ = ["BenchmarkInterrupted", "Options", "request_for", "run_benchmark"]

"""Interop with optimum and ONNX Runtime's Stable Diffusion tools, both ways (scripts/interop-check.sh).

Runs in two environments, one stage each, sharing a work directory (``cases`` only checks the selection):
  prepare   (sdexport's)  diffusers checkpoints of the tiny presets; sdexport exports of them (SD and
                          SDXL, fp32 and fp16); an image from each with `sdexport`'s runtime
  optimum   (optimum's)   the same images from optimum's ORTDiffusionPipeline over sdexport's
                          directories; ONNX Runtime's optimize_pipeline over them (and an image from
                          its CPU-operator variant's output); optimum's own exports of the
                          checkpoints, and images from them
  adopt     (sdexport's)  `sdexport adopt --model` on optimum's exports, images from sdexport's runtime;
                          every pair of images compared; report.json
Each stage calls the tools in its own process (sdexport's CLI, optimize_pipeline's ``main``, optimum's
``main_export``, the functions their commands call): the libraries load once per stage, not once per
tool (5 to 10 s each on 2 cores; README, "Interop", has the check's times).
The tiny presets have random weights: the images are noise, but the same noise from the same seed,
scheduler and graphs is what interop means. SDEXPORT_INTEROP_CASES (comma-separated names of CASES;
default: all) narrows the check: ONNX Runtime's optimizer and optimum's own export of a preset are
checked with that preset's fp32 case. SDEXPORT_INTEROP_OPTIMIZE (comma-separated names of
VARIANTS; default: all) narrows the optimizer's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
STEPS, GUIDANCE, SEED, SIDE = 4, 7.5, 1, 128
CASES = {  # name: (preset, dtype)
    "sd-fp32": ("tiny", "fp32"),
    "sd-fp16": ("tiny", "fp16"),
    "sdxl-fp32": ("tiny-sdxl", "fp32"),
    "sdxl-fp16": ("tiny-sdxl", "fp16"),
}
ALL_CASES = dict(CASES)


def fp32_presets(cases: dict[str, tuple[str, str]]) -> tuple[str, ...]:
    """The presets optimum exports itself: those of the fp32 cases (its fp16 export needs a CUDA device)."""
    return tuple(dict.fromkeys(preset for preset, dtype in cases.values() if dtype == "fp32"))


OPTIMUM_EXPORTS = fp32_presets(CASES)
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "fused": 2e-2}
"""Largest pixel difference (images in [0, 1]) between two tools running the same graphs."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("cases", "prepare", "optimum", "adopt"))
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    if not select_cases(os.environ.get("SDEXPORT_INTEROP_CASES", "")) or not select_variants(
            os.environ.get("SDEXPORT_INTEROP_OPTIMIZE", "")):
        return 2
    if args.stage == "cases":  # checked before anything is built
        print(f"interop-check: cases {', '.join(CASES)}; optimum exports {', '.join(OPTIMUM_EXPORTS) or 'none'}; "
              f"optimizer variants {', '.join(VARIANTS)}", file=sys.stderr)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "images").mkdir(exist_ok=True)
    return {"prepare": prepare, "optimum": optimum_side, "adopt": adopt_side}[args.stage](args.work)


def select_cases(names: str) -> bool:
    """Keep the CASES named (all when none is) and the optimum exports of their fp32 presets."""
    global CASES, OPTIMUM_EXPORTS
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ALL_CASES]
    if unknown:
        print(f"SDEXPORT_INTEROP_CASES: unknown case {', '.join(unknown)} (cases: {', '.join(ALL_CASES)})",
              file=sys.stderr)
        return False
    CASES = {name: ALL_CASES[name] for name in wanted or ALL_CASES}
    OPTIMUM_EXPORTS = fp32_presets(CASES)
    return True


def select_variants(names: str) -> bool:
    """Keep the optimizer VARIANTS named (all when none is)."""
    global VARIANTS
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ALL_VARIANTS]
    if unknown:
        print(f"SDEXPORT_INTEROP_OPTIMIZE: unknown variant {', '.join(unknown)} "
              f"(variants: {', '.join(ALL_VARIANTS)})", file=sys.stderr)
        return False
    VARIANTS = {name: ALL_VARIANTS[name] for name in wanted or ALL_VARIANTS}
    return True


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in packages:
        if package == "sdexport":  # the running checkout's, as sdexport records its own
            from sdexport.versions import installed_version

            found[package] = str(installed_version(package))
            continue
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def record(work: Path, stage: str, data: dict[str, Any]) -> None:
    path = work / "stages.json"
    stages = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    stages[stage] = data
    path.write_text(json.dumps(stages, indent=2), encoding="utf-8")


# -- sdexport's side ----------------------------------------------------------------------------


def sdexport(*args: str) -> None:
    """`sdexport ARGS` in this process: the libraries load once per stage, not once per command
    (seconds each on 2 cores). A failure stops the stage (status 1), naming the command and its status."""
    from sdexport.cli import main

    argv, sys.argv = sys.argv, ["sdexport", *args]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"interop-check: `sdexport {' '.join(args)}` failed (exit status {exc.code})") from None
    finally:
        sys.argv = argv


def sdexport_image(engine_dir: Path, out: Path) -> None:
    import numpy as np

    from sdexport.runtime.loading import load_pipeline
    from sdexport.runtime.request import GenerationRequest

    pipeline = load_pipeline(engine_dir, "onnxruntime-cpu")
    request = GenerationRequest(prompt=[PROMPT], negative_prompt=[NEGATIVE], steps=STEPS, guidance=GUIDANCE,
                                seeds=[SEED], height=SIDE, width=SIDE)
    np.save(out, pipeline(request).pixels[0])


def prepare(work: Path) -> int:
    from sdexport.models import load_model

    for preset in OPTIMUM_EXPORTS:
        target = work / "diffusers" / preset
        if not (target / "model_index.json").is_file():
            load_model(preset).save_pretrained(target)
    for case, (preset, dtype) in CASES.items():
        target = work / "sdexport" / case
        sdexport("export", preset, "-o", str(target), "--dtype", dtype, "--verify", "quick", "--force")
        sdexport_image(target, work / "images" / f"{case}.sdexport.npy")
    record(work, "prepare", versions("sdexport", "torch", "diffusers", "transformers", "onnx", "onnxruntime"))
    return 0


def adopt_side(work: Path) -> int:
    import numpy as np

    for preset in OPTIMUM_EXPORTS:
        target = work / "optimum" / preset
        sdexport("adopt", str(target), "--model", str(work / "diffusers" / preset), "--force")
        sdexport_image(target, work / "images" / f"optimum-{preset}.adopted.npy")
    pairs = [(f"{case}: optimum on sdexport's directory", f"{case}.sdexport", f"{case}.optimum", dtype)
             for case, (_, dtype) in CASES.items()]
    stages = json.loads((work / "stages.json").read_text(encoding="utf-8"))
    optimized = stages["optimum"]["optimize_pipeline"]
    cpu = ALL_VARIANTS["cpu"][0]  # compared when the optimum stage ran it now, not for an image a reused WORK kept
    pairs += [(f"{case}: optimum on ONNX Runtime's optimize_pipeline output", f"{case}.sdexport",
               f"{case}.ort-optimized", "fused") for case in CASES if optimized.get(f"{case}{cpu}", {}).get("accepted")]
    pairs += [(f"{preset}: sdexport on optimum's export (adopted)", f"optimum-{preset}.optimum",
               f"optimum-{preset}.adopted", "fp32") for preset in OPTIMUM_EXPORTS]
    results, failed = [], 0
    for label, a, b, kind in pairs:
        first, second = np.load(work / "images" / f"{a}.npy"), np.load(work / "images" / f"{b}.npy")
        diff = float(np.abs(first.astype(np.float64) - second).max())
        ok = first.shape == second.shape and diff <= TOLERANCE[kind]
        failed += not ok
        results.append({"check": label, "max_abs_pixel_diff": diff, "tolerance": TOLERANCE[kind],
                        "passed": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {label}: max |pixel difference| {diff:.2e} (tolerance {TOLERANCE[kind]:g})")
    report = {"cases": list(CASES), "optimum_exports": list(OPTIMUM_EXPORTS),
              "optimizer_variants": stages["optimum"]["optimizer_variants"],
              "settings": {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE,
                           "seed": SEED, "side": SIDE},
              "environments": {"sdexport": stages["prepare"], "optimum": stages["optimum"]["versions"]},
              "optimize_pipeline": optimized, "comparisons": results}
    (work / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    refused = [c for c, r in optimized.items() if not r["accepted"]]
    for case in refused:
        print(f"FAIL {case}: optimize_pipeline refused sdexport's directory")
    return 1 if failed or refused else 0


# -- optimum's side -----------------------------------------------------------------------------


def optimum_image(directory: Path, out: Path) -> None:
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTDiffusionPipeline

    pipe = ORTDiffusionPipeline.from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)
    result = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  height=SIDE, width=SIDE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np")
    np.save(out, result.images[0])


OPTIMIZE = "onnxruntime.transformers.models.stable_diffusion.optimize_pipeline"
CPU_VARIANT = ["--disable_nhwc_conv", "--disable_group_norm", "--disable_skip_group_norm", "--disable_bias_splitgelu",
               "--disable_bias_add"]
"""The tool targets the CUDA provider; without these fusions (CUDA-only operators) its output runs on a CPU."""

VARIANTS = {  # name: (what report.json calls it after the case, output folder suffix, arguments)
    "cuda": ("", "", ()),  # the tool's defaults: the CUDA fusions
    "float16": (" --float16", "-fp16", ("--float16",)),
    "cpu": (" (CPU operators)", "-cpu", tuple(CPU_VARIANT)),  # its output is run, and its image compared
}
ALL_VARIANTS = dict(VARIANTS)


def optimize(directory: Path, target: Path, *extra: str) -> dict[str, Any]:
    """ONNX Runtime's optimize_pipeline over ``directory``: accepted or not, its fused-operator counts.

    Its ``main`` in this process, as ``python -m`` would run it: onnxruntime's transformers package
    and torch load once for all the variants, not once each (about 5 s each on 2 cores)."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback

    argv = ["-i", str(directory), "-o", str(target), "--overwrite", *extra]
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)
    try:  # what it prints too (argparse's refusal of an option goes to stderr)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            counts = importlib.import_module(OPTIMIZE).main(argv)
        accepted, why = True, ""
    except (Exception, SystemExit):  # a refusal, in whatever form the tool gives it
        accepted, counts, why = False, {}, traceback.format_exc()
    finally:
        logging.getLogger().removeHandler(handler)
    return {"accepted": accepted, "command": " ".join(["python -m", OPTIMIZE, *argv]),
            "fused_operators": {name: dict(found) for name, found in (counts or {}).items()},
            "log_tail": (log.getvalue()[-1800:] + why.strip().splitlines()[-1]) if not accepted else ""}


def optimum_side(work: Path) -> int:
    optimized: dict[str, dict[str, Any]] = {}
    for case, (_, dtype) in CASES.items():
        directory = work / "sdexport" / case
        optimum_image(directory, work / "images" / f"{case}.optimum.npy")
        if dtype != "fp32":  # the tool takes fp32 pipelines and converts them itself (--float16)
            continue
        for name, (label, suffix, extra) in VARIANTS.items():
            target = work / "ort-optimized" / f"{case}{suffix}"
            optimized[f"{case}{label}"] = result = optimize(directory, target, *extra)
            if name == "cpu" and result["accepted"]:  # the variant whose output runs here
                optimum_image(target, work / "images" / f"{case}.ort-optimized.npy")
    for preset in OPTIMUM_EXPORTS:
        target = work / "optimum" / preset
        # `optimum-cli export onnx --task text-to-image --model DIR TARGET` in this process (optimum
        # loads once): the function the command calls, without the command's validation of each
        # graph against the checkpoint (half the export's time on 2 cores). That validation fails
        # only on output shapes or a graph ONNX Runtime cannot run, and warns on values; the adopt
        # stage's `sdexport adopt --model` fails on either: it runs each graph against the same
        # checkpoint, every output, at the profile's min point (rel-L2 1e-3).
        from optimum.exporters.onnx import main_export

        main_export(str(work / "diffusers" / preset), target, task="text-to-image", do_validation=False)
        optimum_image(target, work / "images" / f"optimum-{preset}.optimum.npy")
    record(work, "optimum", {"versions": versions("optimum", "optimum-onnx", "torch", "diffusers", "transformers",
                                                  "onnx", "onnxruntime"),
                             "optimizer_variants": list(VARIANTS), "optimize_pipeline": optimized})
    return 0


if __name__ == "__main__":
    sys.exit(main())

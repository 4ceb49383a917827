"""Peak memory of ``sdexport export`` on the real architectures, per stage, on this machine.

A benchmark, not a test: it reports what it measured and asserts nothing. Each case runs
``sdexport export PRESET --dtype D --verify V`` in a fresh process, so that no case's memory counts
in another's, and reports two figures of its own: the whole process's peak resident set as the
kernel counted it (``wait4``'s ``ru_maxrss``: imports, every stage, everything) and the peak of each
stage the export recorded in its manifest (``tools.export_memory``). The presets carry the real
architectures with random weights: memory and speed do not depend on the weights' values.

    python benchmarks/export_memory.py -o benchmarks/results/export-memory-cpu \\
        --case sdxl:fp16 --case sd15:fp32 --case sdxl:fp32:quick [--verify full] [--append]

``PRESET:DTYPE[:VERIFY]``: VERIFY (full, quick, none) overrides ``--verify`` for that case.
``--single-file``: export from an original-layout fp16 ``.safetensors`` checkpoint of the preset's
architecture instead (``sdexport export FILE --config PRESET``), written first from the preset's
random weights one component at a time; the file's writing is not measured.
Writes export-memory.json and export-memory.md into the output folder (replacing only files this
script wrote there before; ``--append`` adds to the cases already there); each case's result is
saved as soon as it is known, so an interrupted run keeps the cases it finished. The engine
directories go to a temporary folder and are removed. Nothing in an export resets the kernel's
high-water mark, so the process peak (``wait4``) is the whole run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's sdexport, installed or not (so do the exports: cwd ROOT)
from result_files import written_by  # noqa: E402  (beside this script, on sys.path as python runs it)

KIND = "sdexport export memory benchmark"
FILES = ("export-memory.json", "export-memory.md")
TITLE = "# sdexport export: peak memory per stage"
VERIFY_MODES = ("full", "quick", "none")
STAGES = ("load", "trace", "pytorch", "graph passes", "save", "verify")


def _ours(folder: Path) -> bool:
    """Whether each result file in ``folder`` was written by this script (its kind, its title)."""
    return written_by(folder, FILES, KIND, TITLE)


def _case(text: str) -> tuple[str, str, str | None]:
    parts = text.split(":")
    if (not 2 <= len(parts) <= 3 or not parts[0] or parts[1] not in ("fp32", "fp16")
            or (len(parts) == 3 and parts[2] not in VERIFY_MODES)):
        raise argparse.ArgumentTypeError(f"{text!r}: give PRESET:DTYPE[:VERIFY], e.g. sdxl:fp16 or sdxl:fp32:quick")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the results")
    parser.add_argument("--case", type=_case, action="append", required=True, metavar="PRESET:DTYPE",
                        help="an export to measure, e.g. sdxl:fp16 (repeatable)")
    parser.add_argument("--verify", choices=VERIFY_MODES, default="full",
                        help="the export's --verify (default full, as sdexport export)")
    parser.add_argument("--append", action="store_true", help="keep the cases already in the output folder")
    parser.add_argument("--note", help="a line for the report about how it was measured (--append keeps the one "
                                       "already there unless this gives another)")
    parser.add_argument("--single-file", action="store_true",
                        help="export from an original-layout fp16 single-file checkpoint of each preset (written first)")
    parser.add_argument("--checkpoints", type=Path, metavar="FOLDER",
                        help="with --single-file: keep the checkpoints in FOLDER, and use PRESET.safetensors "
                             "found there (default: written to a temporary folder each run)")
    options = parser.parse_args()
    if options.checkpoints is not None and not options.single_file:
        parser.error("--checkpoints keeps the checkpoints --single-file writes; give --single-file too")
    if options.output.exists() and not options.output.is_dir():
        parser.error(f"{options.output} is a file; give a folder")
    if any((options.output / name).exists() for name in FILES) and not _ours(options.output):
        parser.error(f"{options.output} holds {' or '.join(FILES)} not written by this script")
    work = Path(tempfile.mkdtemp(prefix="sdexport-export-memory-", dir=options.output.parent
                                 if options.output.parent.exists() else None))
    try:
        return _measure(options, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: list[str], log: Path) -> tuple[int, float, float]:
    """Exit status, wall seconds and the process's peak resident set (MB) of one export."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "sdexport", *args], cwd=ROOT, stdout=handle,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: KiB


def _measure(options: argparse.Namespace, work: Path) -> int:
    from sdexport.bench.environment import cpu_name  # as the bench reports name the CPU
    from sdexport.export.memory import machine_memory_mb
    from sdexport.versions import installed_versions

    report: dict = {
        "kind": KIND,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "memory_mb": round(machine_memory_mb() or 0),
                    "python": platform.python_version()},
        "versions": installed_versions(("sdexport", "torch", "diffusers", "transformers", "onnx", "onnxruntime",
                                        "onnx-graphsurgeon")),
        "weights": "random (the presets' real architectures; memory does not depend on the values)",
        "results": [],
    }
    earlier = options.output / FILES[0]
    if options.append and earlier.is_file():
        previous = json.loads(earlier.read_text())
        report["results"] = previous["results"]
        if options.note is None and previous.get("note"):
            report["note"] = previous["note"]
    if options.note:
        report["note"] = options.note
    options.output.mkdir(parents=True, exist_ok=True)
    for preset, dtype, verify in options.case:
        out = work / f"{preset}-{dtype}"
        log = work / f"{preset}-{dtype}.log"
        model, source = [preset], preset
        if options.single_file:
            checkpoint = (options.checkpoints or work) / f"{preset}.safetensors"
            if not checkpoint.exists():
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                print(f"writing {checkpoint.name} (fp16, original layout) ...", file=sys.stderr, flush=True)
                write_fp16_checkpoint(preset, checkpoint)
            model, source = [str(checkpoint), "--config", preset], f"{preset}.safetensors --config {preset}"
        args = ["export", *model, "-o", str(out), "--dtype", dtype, "--verify", verify or options.verify]
        print(f"sdexport {' '.join(args)} ...", file=sys.stderr, flush=True)
        code, seconds, peak_mb = _run(args, log)
        entry: dict = {"preset": preset, "dtype": dtype, "verify": args[-1], "date": datetime.now(UTC).isoformat(timespec="seconds"),
                       "command": f"sdexport export {source} " + " ".join(args[-4:]),
                       "exit_code": code, "wall_s": round(seconds, 1), "process_peak_rss_mb": round(peak_mb)}
        manifest = out / "manifest.json"
        if code == 0 and manifest.is_file():
            data = json.loads(manifest.read_text())
            entry["memory"] = data.get("tools", {}).get("export_memory", {})
            entry["points"] = {name: [p["status"] + (f" ({p['reason']})" if p.get("reason") else "")
                                      for p in c["parity"]["points"]] for name, c in data["components"].items()}
            entry["point_memory"] = {name: {p["label"]: p["memory_mb"] for p in c["parity"]["points"] if p.get("memory_mb")}
                                     for name, c in data["components"].items()}
            entry["size_mb"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1024**2)
        else:
            entry["log_tail"] = log.read_text(errors="replace")[-2000:]
        report["results"].append(entry)
        shutil.rmtree(out, ignore_errors=True)
        _write(options.output, report)
        print(f"  exit {code}, {seconds:.0f} s, peak {peak_mb / 1024:.1f} GB", file=sys.stderr, flush=True)
    print(options.output / FILES[1])
    return 0


def write_fp16_checkpoint(preset: str, path: Path) -> None:
    """The preset's random weights as one original-layout fp16 ``.safetensors`` file (as Stability
    publishes them), built one component at a time so that only one is held in float32."""
    import torch
    from safetensors.torch import save_file

    from sdexport.models import load_model
    from tests.ldm_layout import ldm_state_dict  # the inverse of diffusers' converters, kept for the tests

    model = load_model(preset, lazy=True)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    tensors: dict[str, torch.Tensor] = {}
    for part in [n for n in names if n in model.modules]:
        model.materialize(part)
        parts = [model.modules.get(n) for n in names]
        state = ldm_state_dict(*parts[:3], text_encoder_2=parts[3])
        tensors |= {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
                    for k, v in state.items() if not v.is_meta and k not in tensors}
        model.release(part)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(staging))
    staging.replace(path)


def _write(folder: Path, report: dict) -> None:
    from sdexport.atomic import write_atomic

    write_atomic(folder / FILES[0], json.dumps(report, indent=2) + "\n")
    write_atomic(folder / FILES[1], markdown(report))


def _dates(report: dict) -> str:
    days = sorted({r.get("date", report["date"])[:10] for r in report["results"]}) or [report["date"][:10]]
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f}"


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        TITLE,
        "",
        (f"- Machine: {machine['cpu']}, {machine['cores']} cores, {_gb(machine['memory_mb'])} GB of memory, "
        f"Python {machine['python']}, no GPU used"),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        f"- Measured {_dates(report)}; weights: {report['weights']}",
        ("- Peak resident set in GiB (1024³ bytes): the whole process (the kernel's count), then the highest of "
        "each stage over the components (the export's own record, `manifest.json` → `tools.export_memory`)"),
        *([f"- {report['note']}"] if report.get("note") else []),
        "",
        "| export | exit | process peak | " + " | ".join(STAGES) + " | wall | output |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for r in report["results"]:
        stages = (r.get("memory") or {}).get("stages", [])
        peaks = {s: max((x["peak_rss_mb"] for x in stages if x["stage"].rpartition("/")[2] == s), default=None)
                 for s in STAGES}
        lines.append(f"| `{r['command']}` | {r['exit_code']} | **{_gb(r['process_peak_rss_mb'])}** | "
                     + " | ".join(_gb(v) if v is not None else "–" for v in peaks.values())
                     + f" | {r['wall_s'] / 60:.1f} min | {_gb(r['size_mb']) + ' GiB' if 'size_mb' in r else '–'} |")
    skipped = [(r["command"], name, point) for r in report["results"] for name, points in r.get("points", {}).items()
               for point in points if point.startswith("skipped") and "by request" not in point]
    notes = sorted({f"- `{command}`, {name}: {point}" for command, name, point in skipped
                    if "quick verification" not in point and "verification off" not in point})
    if notes:
        lines += ["", "Verification points not run:", "", *notes]
    measured = [(r["command"], name, label, m) for r in report["results"]
                for name, points in r.get("point_memory", {}).items() for label, m in points.items()]
    if measured:
        lines += ["", ("Verification points run: the estimate of each point's working memory (GiB; the min point "
                       "is not estimated, it always runs) and what running it added to the process's resident set "
                       "at its peak, in PyTorch and in ONNX Runtime (`parity.points[].memory_mb`):"), "",
                  "| export | component | point | estimated | pytorch | onnxruntime |", "|---|---|---|---|---|---|"]
        lines += [f"| `{command}` | {name} | {label} | " + " | ".join(
            f"{m[k] / 1024:.2f}" if k in m else "–" for k in ("estimated", "pytorch", "onnxruntime")) + " |"
            for command, name, label, m in measured]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

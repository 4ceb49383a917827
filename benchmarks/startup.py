"""How long a new user waits: wall time of the CLI's quick answers, and how much of a tiny run is imports.

A benchmark, not a test: it reports what it measured on this machine and asserts nothing. Each
command runs in a fresh ``python -m sdexport`` process (as a user runs it), several times; the
report gives the median and the range. For ``run`` on the tiny model it also reports the time
``python -X importtime`` attributes to top-level imports (a lower bound on import time: work done
on first use of a lazily imported name, such as transformers' module scan, is not counted).

    python benchmarks/startup.py -o benchmarks/results/startup-cpu [--repeats 5]

The tiny model is exported once into a temporary folder (random weights; timing does not depend
on them). Writes startup.json and startup.md into the output folder, replacing only files this
script wrote there before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's sdexport, installed or not (so do the timed processes: cwd ROOT)
from result_files import written_by  # noqa: E402  (beside this script, on sys.path as python runs it)

KIND = "sdexport startup benchmark"
FILES = ("startup.json", "startup.md")


TITLE = "# sdexport startup: how long a new user waits"


def _ours(folder: Path) -> bool:
    """Whether each result file in ``folder`` was written by this script (its kind, its title)."""
    return written_by(folder, FILES, KIND, TITLE)


def _time(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - start, done.returncode, done.stderr


def _top_level_imports(stderr: str) -> dict[str, float]:
    """Seconds per top-level import from ``-X importtime`` output (nested imports are inside theirs);
    a module imported again at top level (never, in practice) adds up."""
    seconds: dict[str, float] = {}
    for line in stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line.split("|", 2)
            if name.startswith(" ") and not name.startswith("  "):
                seconds[name.strip()] = seconds.get(name.strip(), 0.0) + int(cumulative) / 1e6
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for startup.json and startup.md")
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default 5)")
    options = parser.parse_args()
    if options.repeats < 1:
        parser.error("--repeats: at least 1")
    if options.output.exists() and not options.output.is_dir():
        parser.error(f"{options.output} is a file; give a folder")
    if any((options.output / name).exists() for name in FILES) and not _ours(options.output):
        parser.error(f"{options.output} holds startup.json or startup.md not written by this script")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    work = Path(tempfile.mkdtemp(prefix="sdexport-startup-"))
    try:
        return _measure(options, work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(options: argparse.Namespace, work: Path, env: dict[str, str]) -> int:
    engines = work / "engines" / "tiny"
    subprocess.run([sys.executable, "-m", "sdexport", "-q", "export", "tiny", "-o", str(engines)], check=True,
                   cwd=ROOT, env=env, timeout=900)
    time.sleep(2.5)  # past hash_records' racy window, so the first inspect can record what it hashed
    subprocess.run([sys.executable, "-m", "sdexport", "-q", "inspect", str(engines)], check=True, cwd=ROOT, env=env)
    commands = {
        "--help": ["--help"],
        "--version": ["--version"],
        "inspect (files unchanged since the last check)": ["inspect", str(engines)],
        "inspect --verify (re-hash, reload tokenizers and scheduler)": ["inspect", str(engines), "--verify"],
        "export: unknown model (argument error)": ["export", "nope", "-o", str(work / "x")],
        "run: --steps 0 (argument error)": ["run", str(engines), "-p", "x", "--steps", "0"],
        "run: -o x.gif (argument error)": ["run", str(engines), "-p", "x", "-o", str(work / "x.gif")],
        "bench: --repeats 0 (argument error)": ["bench", "benchmarks/scenarios/tiny-cpu.toml", "--repeats", "0"],
        "serve: --http-port 0 (argument error)": ["serve", str(engines), "--http-port", "0"],
        "run tiny, 20 steps, 128x128": ["run", str(engines), "-p", "a lighthouse at dusk", "--steps", "20",
                                       "-o", str(work / "tiny.png")],
    }
    results = []
    for label, args in commands.items():
        times, codes = [], set()
        for _ in range(options.repeats):
            seconds, code, _ = _time(["-m", "sdexport", *args], ROOT, env)
            times.append(seconds)
            codes.add(code)
        entry = {"command": label, "args": args, "exit_codes": sorted(codes), "median_s": statistics.median(times),
                 "min_s": min(times), "max_s": max(times), "samples_s": times}
        if label.startswith("run tiny"):
            seconds, _, stderr = _time(["-X", "importtime", "-m", "sdexport", *args], ROOT, env)
            imports = _top_level_imports(stderr)
            entry["importtime_run_s"] = seconds
            entry["top_level_imports_s"] = sum(imports.values())
            entry["largest_imports_s"] = dict(sorted(imports.items(), key=lambda kv: -kv[1])[:4])
        results.append(entry)
        print(f"{label}: {entry['median_s']:.2f} s", file=sys.stderr)
    from sdexport.bench.environment import cpu_name  # as the bench reports name the CPU
    from sdexport.versions import installed_versions

    report = {
        "kind": KIND,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": installed_versions(("sdexport", "torch", "diffusers", "transformers", "onnxruntime", "typer", "rich")),
        "repeats": options.repeats,
        "results": results,
    }
    options.output.mkdir(parents=True, exist_ok=True)
    from sdexport.atomic import write_atomic

    write_atomic(options.output / "startup.json", json.dumps(report, indent=2) + "\n")
    write_atomic(options.output / "startup.md", markdown(report))
    print(options.output / "startup.md")
    return 0


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        TITLE,
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        f"- Date: {report['date']}; {report['repeats']} runs per command, each a fresh `python -m sdexport` process",
        "",
        "| command | wall s, median (min–max) | exit |",
        "|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['command']} | {r['median_s']:.2f} ({r['min_s']:.2f}–{r['max_s']:.2f}) | "
                     f"{', '.join(map(str, r['exit_codes']))} |")
    run = next((r for r in report["results"] if "top_level_imports_s" in r), None)
    if run:
        lines += ["", (f"In one more run of `{run['command']}` under `python -X importtime` "
                  f"({run['importtime_run_s']:.2f} s, the flag itself adds a little), top-level imports took "
                  f"{run['top_level_imports_s']:.2f} s, the largest "
                  + ", ".join(f"{name} {t:.2f} s" for name, t in run.get("largest_imports_s", {}).items())
                  + ". The rest is the work, loading the engines and Python's own start.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

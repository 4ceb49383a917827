"""Turn what a GPU lease brought back into a results folder to commit, and the table for the README.

    python scripts/gpu-lease/collect.py LEASE_RESULTS [-o benchmarks/results/DATE-GPU]

with the Python sdexport is installed in (``scripts/setup.sh``'s, a virtualenv's): the report code
is sdexport's, and needs its packages.

LEASE_RESULTS is the ``lease-results.tar.gz`` that ``scripts/gpu-lease/lease.sh`` leaves in the
device call's ``$OUT`` (or the folder holding it). The folder gets everything in it (the machine's
facts, the GPU test log, each benchmark's results.json/md/png and log, the step outcomes) and a
``README.md`` that puts them on one page: the machine, what ran and how it ended, and one table of
every benchmark's measured cases with the ratio to the baseline from the same run. The table is
also printed, ready for the project README.

Every figure comes from a results.json the lease brought back; nothing is estimated. Default
folder: ``benchmarks/results/<date of the runs>-<GPU>`` (e.g. ``2026-12-02-h200``); an existing one
is refused, never replaced.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

try:  # (a Python without the project's packages: one line, not a traceback, an audit)
    import rich  # noqa: F401
except ImportError:
    sys.exit(f"collect.py: {sys.executable} lacks sdexport's packages (rich, ...): run it with the Python sdexport "
             "is installed in (scripts/setup.sh's, a virtualenv's python)")
from sdexport.bench.report import (  # noqa: E402 - the checkout's sdexport
    NOISY_CV,
    case_key,
    ratio_untrusted,
    stage_mean,
    timed_runs,
    vae_rerun_note,
    variation,
)

MARKERS = ("done", "failed")
"""lease.sh's own bookkeeping (one file per finished or failed step): steps.tsv says the same."""


class CollectError(Exception):
    """Bad input: said in one line, nothing written."""


def archive_path(given: Path) -> Path:
    path = given / "lease-results.tar.gz" if given.is_dir() else given
    if not path.is_file():
        raise CollectError(f"{given}: no lease-results.tar.gz (give the file, or the folder the device call's files are in)")
    return path


def unpack(archive: Path, into: Path) -> None:
    """The archive's files and folders into ``into``. Left out: lease.sh's marker folders, hidden
    top-level entries (what a benchmark killed after its grace leaves: its staging folder and lock),
    and links (a lease writes none); paths that leave the folder are refused by tarfile's "data"
    filter."""
    if not hasattr(tarfile, "data_filter"):  # Python 3.11.4, 3.12
        raise CollectError(f"Python {sys.version.split()[0]} has no safe tar extraction (tarfile's data filter, "
                           "3.11.4 and later): run this with the project's environment")

    def kept(member: tarfile.TarInfo) -> bool:
        top = Path(member.name).parts[:1]
        return (member.isfile() or member.isdir()) and top not in [(d,) for d in MARKERS] \
            and not (top and top[0].startswith("."))

    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, members=[m for m in tar.getmembers() if kept(m)], filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CollectError(f"{archive}: not a readable lease archive ({exc})") from None


def bench_reports(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """(run name, report) for every benchmark folder the lease wrote (``bench-NAME/results.json``),
    in the order the lease ran them (its steps.tsv), then by name."""
    order = [row[0] for row in steps(folder)]
    found = []
    for path in sorted(folder.glob("bench-*/results.json")):
        member = path.relative_to(folder)  # named as in the archive: the folder here is temporary
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CollectError(f"{member}: not readable JSON ({exc})") from None
        problem = unreadable(report)
        if problem:
            raise CollectError(f"{member}: not a benchmark report collect can read ({problem})")
        found.append((path.parent.name.removeprefix("bench-"), report))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda item: (rank.get(f"bench-{item[0]}", len(rank)), item[0]))


def unreadable(report: Any) -> str | None:
    """What a report lacks that the page needs (None: nothing)."""
    if not isinstance(report, dict) or not {"results", "environment", "scenario"} <= set(report):
        return "no results, environment and scenario"
    if not all(isinstance(report[key], dict) for key in ("environment", "scenario")) \
            or not isinstance(report["results"], list) \
            or not isinstance(report["environment"].get("gpu") or {}, dict):
        return "its environment, scenario or results are not what sdexport writes"
    for entry in report["results"]:
        if not isinstance(entry, dict) or "contender" not in entry:
            return "a result without a contender"
        case = entry.get("case")
        if case is not None and not (isinstance(case, dict) and {"batch", "steps"} <= set(case)):
            return f"{entry['contender']}: a case without batch and steps"
        if entry.get("status") == "measured" and not (
                case and isinstance(entry.get("e2e_s"), dict) and isinstance(entry["e2e_s"].get("median"), (int, float))):
            return f"{entry['contender']}: measured, without a case and an end-to-end median"
    return None


def steps(folder: Path) -> list[list[str]]:
    """lease.sh's steps.tsv: name, outcome, seconds, limit; the last line of each step wins."""
    path = folder / "steps.tsv"
    if not path.is_file():
        return []
    last: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[0] != "call":
            last.pop(fields[0], None)  # a later call's outcome, in the later call's place
            last[fields[0]] = fields
    return list(last.values())


def gpu_facts(folder: Path) -> dict[str, str]:
    """The first GPU's row of nvidia-smi's CSV query, by column name ({} without one)."""
    path = folder / "nvidia-smi.csv"
    if not path.is_file():
        return {}
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8", errors="replace"))))
    if len(rows) < 2 or len(rows[1]) != len(rows[0]):
        return {}
    return {key.strip(): value.strip() for key, value in zip(rows[0], rows[1])}


def gpu_name(folder: Path, reports: list[tuple[str, dict[str, Any]]]) -> str | None:
    for _, report in reports:
        gpu = report["environment"].get("gpu")
        if gpu and gpu.get("name"):
            return str(gpu["name"])
    return gpu_facts(folder).get("name") or None


def default_output(folder: Path, reports: list[tuple[str, dict[str, Any]]]) -> Path:
    # (a date that is no date, "../../x", named a folder anywhere: an audit)
    dated = (str(r["environment"].get("date") or "")[:10] for _, r in reports)
    dates = sorted(d for d in dated if re.fullmatch(r"\d{4}-\d{2}-\d{2}", d))
    name = gpu_name(folder, reports)
    if not dates or not name:
        raise CollectError("the lease brought back no benchmark report with a date and a GPU to name the folder by; "
                           "give one with -o")
    return ROOT / "benchmarks" / "results" / f"{dates[0]}-{gpu_slug(name)}"


def gpu_slug(name: str) -> str:
    """A folder name for a GPU: its model token (H200, GH200, A100, L40S, T4), with "-pcie" or "-nvl"
    for those boards (an H100 PCIe is a slower card than the SXM one nvidia-smi calls "H100 80GB
    HBM3", and published figures name which they ran on) and "-mig" for a MIG slice; else the name
    without the vendor's words ("rtx-4090")."""
    words = [w for w in re.split(r"[\s\-_]+", name) if w.lower() not in ("nvidia", "tesla", "geforce", "quadro")]
    model = next((w for w in words if re.fullmatch(r"[A-Z]{1,2}\d{1,4}[A-Z]?", w)), None)
    slug = model.lower() if model else "-".join(re.sub(r"[^A-Za-z0-9]+", "", w) for w in words).strip("-").lower()
    board = next((f"-{w.lower()}" for w in words if model and w.lower() in ("pcie", "nvl")), "")
    return (slug or "gpu") + board + ("-mig" if re.search(r"\bMIG\b", name) else "")


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f}"


def table(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One row per measured contender and case of every report: end-to-end median and its runs'
    variation, the ratio to that report's own baseline (same process), U-Net per step (the mean over
    the marked runs, as results.md gives it), it/s and GPU busy. ⚠ marks a ratio whose runs (the
    contender's or the baseline's) spread more than the report itself trusts, as results.md marks it;
    † one whose runs decoded twice (``vae_rerun_note``)."""
    lines = [("| run | case | contender | end-to-end ms (median ±variation) | vs baseline, same run | U-Net ms/step | it/s "
             "| GPU busy |"),
             "|---|---|---|---|---|---|---|---|"]
    for run, report in reports:
        measured = [r for r in report["results"] if r.get("status") == "measured"]
        baseline = report.get("baseline")
        for r in measured:
            key = case_key(r)
            if r["contender"] == baseline:
                ratio = f"baseline ({baseline})"
            elif isinstance(r.get("speedup_vs_baseline"), (int, float)) and r["speedup_vs_baseline"] > 0:
                ratio = f"{r['speedup_vs_baseline']:.2f}×" + (" ⚠" if ratio_untrusted(r, measured, baseline) else "")
            else:
                ratio = "–"
            ratio += " †" if vae_rerun_note(r) else ""
            spread = variation(r["e2e_s"])
            profiled = r.get("gpu_busy") if isinstance(r.get("gpu_busy"), dict) else {}
            busy = profiled.get("fraction") if isinstance(profiled.get("fraction"), (int, float)) else None
            it_per_s = r.get("it_per_s")
            lines.append(f"| {run}{' (interrupted)' if report.get('interrupted') else ''} | batch {key[0]}, {key[1]} steps | "
                         f"{r['contender']} | {_ms(r['e2e_s']['median'])}"
                         f"{'' if spread is None else f' ±{spread * 100:.0f}%'} | {ratio} | "
                         f"{_ms(stage_mean(r['unet_step_s']) if r.get('unet_step_s') else None)} | "
                         f"{f'{it_per_s:.2f}' if isinstance(it_per_s, (int, float)) else '–'} | "
                         f"{'–' if busy is None else f'{busy * 100:.0f}%'} |")
    return lines


def summary(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The table, what ⚠ means, and where the figures come from: what the project README takes."""
    lines = table(reports)
    if any("⚠" in line for line in lines[2:]):
        lines += ["", (f"⚠: the end-to-end runs of the contender or of its baseline vary by more than {NOISY_CV:.0%} "
                      "of their mean; that ratio is not to be trusted.")]
    reruns = [f"† {run}, {r['contender']} (batch {case_key(r)[0]}, {case_key(r)[1]} steps): {note}."
              for run, report in reports for r in report["results"]
              if r.get("status") == "measured" and (note := vae_rerun_note(r))]
    lines += ["", *reruns] if reruns else []
    return [*lines, "", *provenance(reports)]


def not_measured(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = []
    for run, report in reports:
        for r in report["results"]:
            if r.get("status") != "measured":
                case = r.get("case")
                where = f" (batch {case['batch']}, {case['steps']} steps)" if case else ""
                lines.append(f"- {run}: {r['contender']}{where}: {r.get('reason') or r.get('status')}")
    return lines


def provenance(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Device, versions, revision, date and weights, as each report recorded them (one line per
    distinct set, so a lease whose calls ran different code says so)."""
    seen: dict[str, list[str]] = {}
    for run, report in reports:
        env = report["environment"]
        gpu = env.get("gpu") or {}
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        device = (f"{gpu.get('name')} ({gpu.get('memory_gb')} GiB, CUDA {gpu.get('cuda')}, driver {gpu.get('driver')})"
                  if gpu else "no GPU")
        label = str(report.get("model"))
        if report.get("random_weights"):
            weights = (("" if "random weights" in label else ", random weights") + ": speed does not depend on weight values"
                       + (" but where † marks an fp16 VAE that overflowed and decoded twice"
                          if any(vae_rerun_note(r) for r in report["results"] if r.get("status") == "measured") else ""))
        else:
            weights = ", trained weights"
        scenario = report["scenario"]
        size = f", {scenario['height']}×{scenario['width']}" if scenario.get("height") and scenario.get("width") else ""
        runs = (f", warm-up {scenario['warmup']}, {timed_runs(scenario['repeats'])} per case"
                if "warmup" in scenario and "repeats" in scenario else "")
        flags = report.get("command_line") or {}
        given = f" (command line: {', '.join(f'{k} {v}' for k, v in flags.items())})" if flags else ""
        text = (f"{device}; {versions}; git {env.get('git_revision') or 'unknown'}; {str(env.get('date'))[:10]}; "
                f"scenario {scenario.get('name')}{size}, precision {report.get('precision')}{runs}{given}; "
                f"{label}{weights}")
        seen.setdefault(text, []).append(run)
    return [f"- {', '.join(runs)}: {text}" for text, runs in seen.items()]


def gpu_tests_line(folder: Path) -> str:
    """pytest's closing summary line from the GPU tests' log, or why there is none."""
    log = folder / "gpu-tests" / "pytest.log"
    if not log.is_file():
        return "no GPU test log (the step did not run or wrote none)"
    summary = [line.strip("= ").strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
               if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return summary[-1] if summary else "the log has no pytest summary line (cut short?)"


def page(folder: Path, reports: list[tuple[str, dict[str, Any]]]) -> str:
    facts = gpu_facts(folder)
    tensorrt = (folder / "import-tensorrt.txt").read_text(errors="replace", encoding="utf-8").strip() if (folder / "import-tensorrt.txt").is_file() else "not recorded"
    revision = (folder / "REVISION").read_text(encoding="utf-8").strip() if (folder / "REVISION").is_file() else "unknown"
    lines = [f"# GPU lease results: {gpu_name(folder, reports) or 'unknown GPU'}", "",
             (f"Collected by `scripts/gpu-lease/collect.py` from the lease's `lease-results.tar.gz` (revision {revision}): "
              "the machine from `nvidia-smi.csv`, the steps from `steps.tsv`, and every benchmark figure from a "
              "`results.json` in this folder."), ""]
    if facts:
        lines += ["## The machine (nvidia-smi)", "", *[f"- {k}: {v}" for k, v in facts.items()], ""]
    lines += [f"- `import tensorrt`: {' / '.join(tensorrt.splitlines())}",
              f"- GPU tests (`gpu-tests/pytest.log`): {gpu_tests_line(folder)}", ""]
    rows = steps(folder)
    if rows:
        lines += ["## Steps", "", "| step | outcome | seconds | limit |", "|---|---|---|---|",
                  *[f"| {' | '.join(row)} |" for row in rows], ""]
    if reports:
        lines += ["## Benchmarks", "", *summary(reports), ""]
        missing = not_measured(reports)
        if missing:
            lines += ["### Not measured", "", *missing, ""]
        lines += [("Each run's own `results.md` has the stage breakdown (text encoder, U-Net, VAE, overhead), "
                  "memory and image agreement; `results.png` plots it."), ""]
    else:
        lines += ["## Benchmarks", "", "None came back.", ""]
    return "\n".join(lines)


def collect(given: Path, output: Path | None) -> tuple[Path, list[str]]:
    archive = archive_path(given)
    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CollectError(f"-o {output}: exists and is not empty; choose a new folder")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "lease"
        folder.mkdir()
        unpack(archive, folder)
        reports = bench_reports(folder)
        target = output if output is not None else default_output(folder, reports)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise CollectError(f"{target}: exists and is not empty; pass -o with a new folder")
        (folder / "README.md").write_text(page(folder, reports), encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{os.getpid()}"
        try:
            shutil.copytree(folder, staging)
            if target.is_dir():
                target.rmdir()  # empty (checked above)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left
            raise
    return target, summary(reports) if reports else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lease_results", type=Path, help="lease-results.tar.gz, or the folder holding it")
    parser.add_argument("-o", "--output", type=Path, help="the results folder (default benchmarks/results/DATE-GPU)")
    args = parser.parse_args(argv)
    try:
        target, rows = collect(args.lease_results, args.output)
    except CollectError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 2
    print("\n".join(rows))
    print(f"wrote {target}/README.md and what the lease brought back", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

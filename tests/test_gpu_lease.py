"""The GPU lease's plumbing, on the CPU: the one-call archive (pack-site.py), and the step runner
(lease.sh) with a stand-in for sdexport's commands (its time plan, resuming, what comes back). The
heavy steps are sdexport's own commands, tested elsewhere; a slow test runs the whole lease for
real on the tiny model, and only a GPU lease runs it on SD 1.5."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEASE = ROOT / "scripts" / "gpu-lease"


def _pack_site():
    spec = importlib.util.spec_from_file_location("pack_site", LEASE / "pack-site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fatbin(entries: list[tuple[int, bytes]], kind: dict[int, int] | None = None) -> bytes:
    """A fatbin as CUDA lays it out: header (magic, version 1, header size 16, entries' size), then
    per entry a 64-byte header (kind: 1 PTX, 2 cubin; version, header size, payload size, ..., SM
    arch at 28) and its payload."""
    body = b""
    for arch, payload in entries:
        header = bytearray(64)
        struct.pack_into("<HHIQ", header, 0, (kind or {}).get(arch, 2), 0x101, 64, len(payload))
        struct.pack_into("<I", header, 28, arch)
        body += bytes(header) + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> dict[str, Path]:
    sm80, sm90, ptx75 = os.urandom(4096), os.urandom(4096), os.urandom(1024)
    library = (b"\x7fELF host code" + _fatbin([(80, sm80), (90, sm90)]) + b"more host code"
               + _fatbin([(75, ptx75)], kind={75: 1}))
    ort = _wheel(tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", {
        "onnxruntime/__init__.py": b"__version__ = '1.31.1'\n",
        "onnxruntime/capi/libonnxruntime_providers_cuda.so": library,
        "onnxruntime/capi/libonnxruntime.so.1.31.1": b"C API",
        "onnxruntime/capi/libonnxruntime_providers_tensorrt.so": b"TensorRT provider",
        "onnxruntime/capi/libonnxruntime_providers_shared.so": b"shared",
        "onnxruntime_gpu-1.31.1.dist-info/METADATA": b"Name: onnxruntime-gpu\nVersion: 1.31.1\n",
    })
    small = tmp_path / "small"
    small.mkdir()
    _wheel(small / "diffusers-0.42.1-py3-none-any.whl", {"diffusers/__init__.py": b"", "diffusers-0.42.1.dist-info/METADATA": b""})
    _wheel(small / "jsonschema_specifications-2025.9.1-py3-none-any.whl", {"jsonschema_specifications/__init__.py": b""})
    _wheel(small / "ml_dtypes-0.5.4-cp312-cp312-manylinux_2_28_x86_64.whl", {"ml_dtypes/__init__.py": b""})
    (small / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256(w.read_bytes()).hexdigest()}  ./{w.name}\n" for w in sorted(small.glob("*.whl"))))
    listed = tmp_path / "gpu-wheels.txt"
    listed.write_text("# comment\ndiffusers==0.42.1\njsonschema-specifications==2025.9.1\n")
    repo = tmp_path / "repo"  # the checkout that would travel beside the archive: 1 KiB
    repo.mkdir()
    (repo / "file").write_bytes(bytes(1024))
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "file"], check=True)
    return {"ort": ort, "small": small, "list": listed, "sm80": sm80, "sm90": sm90, "ptx75": ptx75,
            "library": library, "repo": repo}


def _pack(wheels: dict[str, Path], out: Path, *extra: str) -> None:
    _pack_site().main(["--ort", str(wheels["ort"]), "--small", str(wheels["small"]), "--out", str(out),
                       "--wheel-list", str(wheels["list"]), "--repo", str(wheels["repo"]), *extra])


def test_the_archive_holds_the_target_code_byte_for_byte_and_leaves_the_rest(wheels, tmp_path: Path):
    out = tmp_path / "lease"
    _pack(wheels, out)
    blob = (out / "site.tar.xz").read_bytes()
    assert (out / "site.sha256").read_text() == f"{hashlib.sha256(blob).hexdigest()}  site.tar.xz\n"
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(blob))) as tar:
        names = set(tar.getnames())
        library = tar.extractfile("onnxruntime/capi/libonnxruntime_providers_cuda.so").read()
    # the layout is unchanged, the sm_90 code is the wheel's, the sm_80 code is zeros
    assert library == wheels["library"].replace(wheels["sm80"], bytes(len(wheels["sm80"])))
    assert wheels["sm90"] in library and wheels["ptx75"] in library  # PTX is kept, whatever its arch
    assert {"onnxruntime/__init__.py", "onnxruntime/capi/libonnxruntime_providers_shared.so",
            "onnxruntime_gpu-1.31.1.dist-info/METADATA", "diffusers/__init__.py",
            "jsonschema_specifications/__init__.py"} <= names
    # the C API library and the TensorRT provider stay behind; so does a wheel the list does not name
    assert not any("libonnxruntime.so" in n or "tensorrt" in n or n.startswith("ml_dtypes") for n in names)
    notes = (out / "site.txt").read_text()
    assert "sm_90" in notes and "left out onnxruntime/capi/libonnxruntime.so.1.31.1" in notes


def test_an_archive_that_would_not_fit_one_call_is_refused(wheels, tmp_path: Path):
    _pack(wheels, tmp_path / "fits")
    archive_mib = (tmp_path / "fits" / "site.tar.xz").stat().st_size / 2**20
    # a limit the 1-KiB tree fits under (with the 0.5-MiB margin) but the archive beside it does not
    limit = 0.5 + 2 / 2**20 * 1024 + archive_mib / 2
    with pytest.raises(SystemExit, match=r"too large for one device call: archive 0\.0 MiB \+ working tree 0\.0 MiB"):
        _pack(wheels, tmp_path / "lease", "--limit-mib", str(limit))
    assert not (tmp_path / "lease").exists()


def test_after_a_new_commit_the_fit_is_checked_again(wheels, tmp_path: Path, capsys):
    _pack(wheels, tmp_path / "lease")
    archive = tmp_path / "lease" / "site.tar.xz"
    check = ["--check-fit", str(archive), "--repo", str(wheels["repo"])]
    _pack_site().main(check)
    assert "archive 0.0 MiB + working tree 0.0 MiB" in capsys.readouterr().out
    (wheels["repo"] / "results.png").write_bytes(os.urandom(2**20))  # untracked, not ignored: it travels
    with pytest.raises(SystemExit, match="working tree 1.0 MiB"):
        _pack_site().main([*check, "--limit-mib", "1.5"])


def test_a_fatbin_that_does_not_parse_is_refused_not_zeroed(tmp_path: Path):
    pack_site = _pack_site()
    broken = bytearray(_fatbin([(80, bytes(64)), (90, bytes(64))]))
    struct.pack_into("<Q", broken, 16 + 8, 10**6)  # the first entry's payload runs past its fatbin
    with pytest.raises(SystemExit, match="does not parse"):
        pack_site.keep_only_arch(broken, 90)


def test_wheels_are_checked_before_packing(wheels, tmp_path: Path):
    (wheels["small"] / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="does not match"):
        _pack(wheels, tmp_path / "lease")
    wheels["list"].write_text("diffusers==0.43.0\n")
    with pytest.raises(SystemExit, match=r"no wheel for diffusers==0\.43\.0"):
        _pack(wheels, tmp_path / "lease")


def test_no_code_for_the_target_is_refused():
    with pytest.raises(SystemExit, match="no cubins for sm_89"):
        _pack_site().keep_only_arch(bytearray(_fatbin([(80, bytes(64)), (90, bytes(64))])), 89)


# lease.sh's heavy steps are sdexport's own commands (a whole lease on the tiny model and the CPU
# is the slow test below); here a stand-in python3 answers for them in seconds, does what each
# command leaves behind, and logs its arguments, while the rest (unpacking the archive, the
# library paths) runs on the real interpreter.
STAND_IN = r"""#!/usr/bin/env bash
# one write per command (its line and, for python -m, its environment's): steps that run side by
# side (gpu-tests beside the export) append to the same log
line="$*"
[[ $1 == -m ]] && line+=$'\n'"  revision=${SDEXPORT_GIT_REVISION:-} path=${PYTHONPATH%%:*} threads=${OMP_NUM_THREADS:-}"
[[ $1 == -m ]] && line+=" cpus=$(awk '/^Cpus_allowed_list/ {print $2}' /proc/$$/status) compile=${TORCHINDUCTOR_COMPILE_THREADS:-}"
printf '%s\n' "$line" >> "$STAND_IN_LOG"
out=""
for ((i = 1; i <= $#; i++)); do [[ ${!i} == -o ]] && { j=$((i + 1)); out=${!j}; }; done
case "$1 $2 ${3:-}" in
  "-m sdexport export")
    sleep "${STAND_IN_EXPORT_S:-0}"; mkdir -p "$out"; echo exported > "$out/manifest.json" ;;
  "-m sdexport build")
    [[ -n ${STAND_IN_BUILD_S:-} ]] && exec sleep "$STAND_IN_BUILD_S"; echo built ;;
  "-m sdexport bench")
    if [[ -n ${STAND_IN_BENCH_S:-} ]]; then  # like sdexport bench: on SIGTERM, a moment to write what it measured
      trap 'sleep 0.3; mkdir -p "$out"; echo "{\"interrupted\": true}" > "$out/results.json"; exit 130' TERM
      sleep "$STAND_IN_BENCH_S" & wait $!
    elif [[ -n ${STAND_IN_BENCH_DEAF_S:-} ]]; then  # one that ignores SIGTERM (its sleep inherits that)
      trap '' TERM
      sleep "$STAND_IN_BENCH_DEAF_S"
    fi
    mkdir -p "$out"; echo '{}' > "$out/results.json" ;;
  "-m pytest "*) sleep "${STAND_IN_PYTEST_S:-0}"; exit "${STAND_IN_PYTEST_RC:-0}" ;;
  "-m pip "*) echo "the image's packages" ;;
  "- "*)  # gpu-tests.sh's record of the machine, into its --out folder
    cat > /dev/null; [[ -n ${2:-} ]] && mkdir -p "$2" && echo '{}' > "$2/environment.json" ;;
  *)
    if [[ $1 == -c && $2 == *torch* ]]; then exit 1; fi  # "is there a CUDA GPU": no
    if [[ $1 == -c && $2 == *get_available_providers* && -n ${STAND_IN_LEFT_BEHIND:-} ]]; then
      setsid sleep "$STAND_IN_LEFT_BEHIND" &  # a process left behind on the lease's own output
    fi
    exec "$REAL_PYTHON" "$@" ;;
esac
"""


@pytest.fixture
def carried(tmp_path: Path) -> Path:
    return _carried(tmp_path)


def _carried(tmp_path: Path) -> Path:
    """What prepare.sh leaves in .lease: a site archive (one module), its checksum, REVISION."""
    carried = tmp_path / "carried"
    (carried / "src").mkdir(parents=True)
    (carried / "src" / "lease_probe.py").write_text("X = 1\n")
    with tarfile.open(carried / "site.tar.xz", "w:xz") as tar:
        tar.add(carried / "src" / "lease_probe.py", arcname="lease_probe.py")
    (carried / "site.sha256").write_text(
        f"{hashlib.sha256((carried / 'site.tar.xz').read_bytes()).hexdigest()}  site.tar.xz\n")
    (carried / "REVISION").write_text("0123abc\n")
    return carried


def _lease(tmp_path: Path, carried: Path, budget: int, *, real: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    bin_dir = tmp_path / "bin"
    if not real and not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "python3").write_text(STAND_IN)
        (bin_dir / "python3").chmod(0o755)
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}" if real else f"{bin_dir}:{os.environ['PATH']}"
    env = {**os.environ, "OUT": str(out), "LEASE_BUDGET_S": str(budget), "LEASE_DIR": str(tmp_path / "lease"),
           "LEASE_SITE": str(tmp_path / "site"), "LEASE_CARRIED": str(carried), "PATH": path,
           "REAL_PYTHON": sys.executable, "STAND_IN_LOG": str(tmp_path / "commands.log"), **env}
    return subprocess.run(["bash", str(LEASE / "lease.sh")], env=env, capture_output=True, text=True, timeout=1200)


def _steps(tmp_path: Path) -> dict[str, str]:
    """The last outcome of each step, from the archive that came back."""
    with tarfile.open(tmp_path / "out" / "lease-results.tar.gz") as tar:
        lines = tar.extractfile("./steps.tsv").read().decode().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines if not line.startswith("call\t")}


def test_the_lease_runs_every_step_in_order_with_the_commands_it_means(tmp_path: Path, carried: Path):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: none to leave to the machine")
    # all cores but the last left to the machine: every step runs on that one (on the GPU server,
    # all but two), torch.compile's workers counted by it
    done = _lease(tmp_path, carried, 600, STAND_IN_EXPORT_S="1", LEASE_KEEP_CPUS=str(len(cores) - 1))
    assert done.returncode == 0, done.stdout + done.stderr
    steps = _steps(tmp_path)
    assert set(steps.values()) == {"rc 0"}, steps
    assert list(steps)[:2] == ["facts", "install"] and set(list(steps)[2:4]) == {"gpu-tests", "export"}
    assert list(steps)[4:] == ["bench-runtime", "bench-compile", "build-fused", "bench-fused"]  # no compile-max unasked
    assert (tmp_path / "site" / "lease_probe.py").read_text() == "X = 1\n"
    commands = (tmp_path / "commands.log").read_text().splitlines()
    engines = tmp_path / "lease" / "engines" / "sd15-512"
    assert (f"-m sdexport export sd15 -o {engines} --dtype fp16 --batch 1:1:4 --height 512 --width 512 --verify none "
            "--components text_encoder,unet,vae_decoder,vae_decoder_fp32 --force") in commands
    assert f"-m sdexport build {engines} --target onnxruntime-cuda" in commands
    benches = [c for c in commands if c.startswith("-m sdexport bench")]
    assert [b.split("--contenders ")[1].split()[0] for b in benches] == [
        "diffusers,torch,onnxruntime-cuda", "diffusers,diffusers-compile,tensorrt", "diffusers,onnxruntime-cuda-fused"]
    assert all(f"--engine-dir {engines}" in b and "benchmarks/scenarios/sd15-512-b1.toml" in b for b in benches)
    assert any(c.startswith("-m pytest -m gpu") and c.endswith("-m gpu and not slow") for c in commands)
    # every command runs with the installed site first on the path and the commit it measures; the
    # export and the tests, side by side, split the cores
    environments = {command.split()[2]: after for command, after in zip(commands, commands[1:])
                    if command.startswith(("-m sdexport", "-m pytest"))}
    unset = os.environ.get("OMP_NUM_THREADS", "")  # (what the test process has: 1 in an xdist worker)
    assert environments == {command: f"  revision=0123abc path={tmp_path / 'site'} threads={threads} cpus={cores[-1]} "
                                     "compile=1" for command, threads
                            in (("export", 10), ("-m", 4), ("build", unset), ("bench", unset))}, environments
    assert f"steps on cores {cores[-1]}" in done.stdout
    with tarfile.open(tmp_path / "out" / "lease-results.tar.gz") as tar:
        names = tar.getnames()
        assert tar.extractfile("./REVISION").read() == b"0123abc\n"
    assert {"./pip-list-image.txt", "./bench-fused/results.json", "./gpu-tests/environment.json"} <= set(names)
    assert not any("/engines" in name for name in names)  # gigabytes on a GPU: they stay there
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lease-results.tar.gz", "lease.log"]
    assert "lease done: " in (tmp_path / "out" / "lease.log").read_text()  # the log whole, its last line too

    asked = _lease(tmp_path, carried, 600, LEASE_COMPILE_MAX="1")  # the warm machine, asked for more
    assert "bench-runtime: done in an earlier call" in asked.stdout
    assert _steps(tmp_path)["bench-compile-max"] == "rc 0"
    assert "--contenders diffusers,torch-compile-max" in (tmp_path / "commands.log").read_text()


def test_the_lease_split_into_three_calls_brings_back_each_part_and_goes_on_where_it_ended(tmp_path: Path, carried: Path):
    """The recipe in lease.sh's header: the facts alone (only REVISION carried), then the install,
    export and tests, then the benchmarks; each call's archive holds all done so far."""
    only_revision = tmp_path / "only-revision"
    only_revision.mkdir()
    shutil.copy(carried / "REVISION", only_revision / "REVISION")
    (carried / "site.txt").write_text("what the archive holds\n")  # (prepare.sh writes it beside the archive)
    first = _lease(tmp_path, only_revision, 60, LEASE_UNTIL="facts")
    assert first.returncode == 0, first.stdout + first.stderr
    assert _steps(tmp_path) == {"facts": "rc 0"}
    assert "call ends after facts (LEASE_UNTIL)" in (tmp_path / "out" / "lease.log").read_text()

    second = _lease(tmp_path, carried, 380, LEASE_UNTIL="export")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "facts: done in an earlier call" in second.stdout
    assert _steps(tmp_path) == {"facts": "rc 0", "install": "rc 0", "export": "rc 0", "gpu-tests": "rc 0"}
    assert "sdexport bench" not in (tmp_path / "commands.log").read_text()
    with tarfile.open(tmp_path / "out" / "lease-results.tar.gz") as tar:  # recorded by the install, not the facts
        assert tar.extractfile("./site.txt").read() == b"what the archive holds\n"

    third = _lease(tmp_path, carried, 300, LEASE_SKIP="export gpu-tests")  # (call 3 as the header writes it)
    assert third.returncode == 0, third.stdout + third.stderr
    steps = _steps(tmp_path)
    assert list(steps)[4:] == ["bench-runtime", "bench-compile", "build-fused", "bench-fused"]
    assert set(steps.values()) == {"rc 0"}, steps
    assert "install: done in an earlier call" in third.stdout
    assert (tmp_path / "commands.log").read_text().count("sdexport export") == 1  # not again

    # the same call on a machine that went back meanwhile (a fresh one): installed again, and the
    # baseline measured against torch.compile, which needs no export, rather than a second export
    fresh = _lease(tmp_path, carried, 300, LEASE_SKIP="export gpu-tests", LEASE_DIR=str(tmp_path / "fresh"),
                   LEASE_SITE=str(tmp_path / "fresh-site"))
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert _steps(tmp_path) == {"facts": "rc 0", "install": "rc 0", "export": "left out", "gpu-tests": "left out",
                                "bench-compile": "rc 0"}
    assert (tmp_path / "commands.log").read_text().count("sdexport export") == 1
    assert "--contenders diffusers,diffusers-compile " in (tmp_path / "commands.log").read_text()


def test_a_call_asked_to_end_after_the_runtime_benchmark_ends_there_also_without_an_export(tmp_path: Path, carried: Path):
    """Without an export there is no runtime benchmark to run, and the call still ends where it
    was asked to, not after the torch.compile benchmark the next call was meant to run."""
    ended = _lease(tmp_path, carried, 300, LEASE_SKIP="export", LEASE_UNTIL="bench-runtime")
    assert ended.returncode == 0, ended.stdout + ended.stderr
    assert "call ends after bench-runtime (LEASE_UNTIL)" in ended.stdout
    assert "bench-runtime" not in _steps(tmp_path) and "bench-compile" not in _steps(tmp_path)
    assert "sdexport bench" not in (tmp_path / "commands.log").read_text()


def test_a_lease_asked_to_end_after_no_step_of_its_own_is_refused_before_it_starts(tmp_path: Path, carried: Path):
    refused = _lease(tmp_path, carried, 60, LEASE_UNTIL="bench")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        ("lease.sh: LEASE_UNTIL=bench: name one of facts install export bench-runtime bench-compile build-fused "
         "bench-fused (the call ends after it), or leave it unset")]
    assert not (tmp_path / "lease").exists() and not list((tmp_path / "out").iterdir())


def test_a_budget_past_one_calls_most_is_taken_as_560_and_one_not_in_seconds_is_refused(tmp_path: Path, carried: Path):
    """Call 3's budget is the device time left less 90: above 650 s left, its timeout would pass the
    tool's 600 s (an audit); the script keeps its own steps inside one call whatever it is told."""
    capped = _lease(tmp_path, carried, 900, LEASE_UNTIL="facts")
    assert capped.returncode == 0, capped.stderr
    assert "lease.sh: LEASE_BUDGET_S=900: at most 560 in one call (its timeout is 600 s at most); taking 560" in capped.stderr
    refused = _lease(tmp_path, carried, 60, LEASE_BUDGET_S="9m")
    assert refused.returncode == 2 and "LEASE_BUDGET_S=9m: give whole seconds" in refused.stderr


def test_a_process_a_step_left_behind_does_not_hold_the_lease_open(tmp_path: Path, carried: Path):
    """The output goes through tee, which lasts while anything holds its pipe: the lease waits a few
    seconds for it, packs the log, and returns, rather than wait out the leftover (or the call's limit)."""
    import time

    leftover = f"41.{os.getpid()}"
    began = time.monotonic()
    try:
        done = _lease(tmp_path, carried, 600, STAND_IN_LEFT_BEHIND=leftover)
        assert done.returncode == 0, done.stdout + done.stderr
        assert time.monotonic() - began < 30
        assert "lease done: " in (tmp_path / "out" / "lease.log").read_text()
    finally:
        subprocess.run(["pkill", "-f", f"sleep {leftover}"])


def _resuming(tmp_path: Path) -> None:
    carried = _carried(tmp_path)
    # scaled down 20 times: the tests may take 12 s, the runtime benchmark needs 5 s, the fused
    # build 10 to 20 s
    first = _lease(tmp_path, carried, 16, LEASE_TIME_SCALE="20", STAND_IN_PYTEST_S="30")
    assert first.returncode == 0, first.stdout + first.stderr
    assert _steps(tmp_path)["gpu-tests"] == "rc 124, over its own limit of 12 s", first.stdout

    # the second call on the warm machine carries nothing: the revision is the first call's
    sleeper = f"299.{os.getpid()}"
    nothing = tmp_path / "nothing-carried"
    nothing.mkdir()
    second = _lease(tmp_path, nothing, 19, LEASE_TIME_SCALE="20", STAND_IN_BUILD_S=sleeper)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "gpu-tests: failed in an earlier call (rc 124, over its own limit of 12 s): not repeated" in second.stdout
    steps = _steps(tmp_path)
    assert steps["bench-runtime"] == steps["bench-compile"] == "rc 0"
    assert steps["build-fused"] == "cut at the budget" and steps["bench-fused"] == "skipped", second.stdout
    assert subprocess.run(["pgrep", "-f", f"sleep {sleeper}"], capture_output=True).returncode == 1  # none left
    assert "revision=0123abc " in (tmp_path / "commands.log").read_text().splitlines()[-1]

    (carried / "REVISION").write_text("4567def\n")  # a new commit: all but the unchanged install again
    third = _lease(tmp_path, carried, 600, LEASE_TIME_SCALE="20")
    assert "revision 4567def after 0123abc: every step runs again" in third.stdout
    assert "install: done in an earlier call" in third.stdout and "facts (at most" in third.stdout
    steps = _steps(tmp_path)
    assert steps["gpu-tests"] == steps["build-fused"] == steps["bench-fused"] == "rc 0"
    assert (tmp_path / "lease" / "REVISION").read_text() == "4567def\n"


def _cut_short(tmp_path: Path) -> None:
    """timeout returns as soon as the step's bash has gone, which SIGTERM ends at once; the benchmark
    under it writes its report of what it measured after the signal: the step waits for it (up to
    the grace) before packing, and nothing of the step is left running."""
    carried = _carried(tmp_path)
    sleeper = f"61.{os.getpid()}"
    cut = _lease(tmp_path, carried, 12, LEASE_TIME_SCALE="20", STAND_IN_BENCH_S=sleeper)
    assert cut.returncode == 0, cut.stdout + cut.stderr
    assert _steps(tmp_path)["bench-runtime"] in ("cut at the budget", "rc 124, over its own limit of 12 s"), cut.stdout
    with tarfile.open(tmp_path / "out" / "lease-results.tar.gz") as tar:
        assert tar.extractfile("./bench-runtime/results.json").read() == b'{"interrupted": true}\n'
    assert subprocess.run(["pgrep", "-f", f"sleep {sleeper}"], capture_output=True).returncode == 1  # none left


def _deaf(tmp_path: Path) -> None:
    carried = _carried(tmp_path)
    sleeper = f"62.{os.getpid()}"
    cut = _lease(tmp_path, carried, 9, LEASE_TIME_SCALE="20", STAND_IN_BENCH_DEAF_S=sleeper)
    assert cut.returncode == 0, cut.stdout + cut.stderr
    assert "killed what was left of the step after 2s" in cut.stdout
    assert _steps(tmp_path)["bench-runtime"] in ("cut at the budget", "rc 124, over its own limit of 12 s"), cut.stdout
    assert subprocess.run(["pgrep", "-f", f"sleep {sleeper}"], capture_output=True).returncode == 1  # none left
    assert "lease done" in cut.stdout


SIDE_BY_SIDE = {  # the test that reads it: its run
    "test_resuming_runs_again_only_what_the_budget_cut_or_another_revision_ran": _resuming,
    "test_a_benchmark_cut_short_brings_back_what_it_wrote_after_the_signal": _cut_short,
    "test_a_step_that_ignores_sigterm_is_killed_after_the_grace_and_the_lease_goes_on": _deaf,
}
"""The lease runs whose stand-ins sleep until a budget or a limit cuts them (what they test): about
30, 13 and 11 s, nearly all of it waiting. They run side by side, each in a folder of its own and
with a sleeper of its own to look for, so the three take the time of the longest."""


@pytest.fixture(scope="module")
def budget_cuts(request, tmp_path_factory) -> Iterator[dict[str, Future[None]]]:
    """The runs of the tests selected, started together when the first of them starts."""
    selected = {item.name for item in request.session.items}
    with ThreadPoolExecutor(len(SIDE_BY_SIDE)) as pool:
        yield {name: pool.submit(run, tmp_path_factory.mktemp(run.__name__.strip("_")))
               for name, run in SIDE_BY_SIDE.items() if name in selected}


def _result_of_this_test(budget_cuts: dict[str, Future[None]], request) -> None:
    budget_cuts[request.node.name].result()  # the run's own assertion error, if one failed


def test_resuming_runs_again_only_what_the_budget_cut_or_another_revision_ran(budget_cuts, request):
    _result_of_this_test(budget_cuts, request)


def test_a_benchmark_cut_short_brings_back_what_it_wrote_after_the_signal(budget_cuts, request):
    _result_of_this_test(budget_cuts, request)


def test_a_step_that_ignores_sigterm_is_killed_after_the_grace_and_the_lease_goes_on(budget_cuts, request):
    _result_of_this_test(budget_cuts, request)


def test_a_damaged_archive_stops_the_lease_at_once(tmp_path: Path, carried: Path):
    (carried / "site.tar.xz").write_bytes(b"not what was packed")
    failed = _lease(tmp_path, carried, 60)
    assert failed.returncode == 1
    assert "does not match site.sha256" in failed.stdout and "nothing installed" in failed.stdout
    assert _steps(tmp_path)["install"] == "rc 1"
    assert not (tmp_path / "commands.log").read_text().count("sdexport")
    # the archive carried again, whole: the next call installs it and goes on
    shutil.rmtree(carried)
    fixed = _lease(tmp_path, _carried(tmp_path), 600)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert _steps(tmp_path)["install"] == "rc 0" and _steps(tmp_path)["export"] == "rc 0"


# --- collect.py: what a lease brought back, as a results folder and a README table -------------

def _collect():
    spec = importlib.util.spec_from_file_location("collect", LEASE / "collect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _times(median: float, spread: float = 0.01) -> dict:
    samples = [median * (1 + spread * k) for k in (-2, -1, 0, 1, 2)]
    return {"median": median, "min": min(samples), "max": max(samples), "n": 5, "samples": samples}


def _bench_report(entries: list[dict], **extra) -> dict:
    return {"scenario": {"name": "sd15-512-b1", "model": "sd15", "height": 512, "width": 512, "warmup": 1, "repeats": 5},
            "baseline": "diffusers", "command_line": {"--warmup": 1, "--engine-dir": "/tmp/lease/engines/sd15-512"},
            "precision": "fp16",
            "model": "preset sd15 (random weights, seed 0)", "random_weights": True,
            "environment": {"gpu": {"name": "NVIDIA H200", "memory_gb": 139.8, "cuda": "13.0", "driver": "580.1"},
                            "versions": {"sdexport": "0.1.0", "torch": "2.11.0+cu130"}, "git_revision": "0123abc",
                            "date": "2026-12-02T10:00:00+00:00", "host": {}},
            "results": entries, **extra}


def _measured(contender: str, e2e: float, speedup: float | None = None, spread: float = 0.01) -> dict:
    return {"contender": contender, "status": "measured", "case": {"batch": 1, "steps": 50},
            "e2e_s": _times(e2e, spread), "unet_step_s": _times(e2e / 60), "it_per_s": 50 / e2e,
            "gpu_busy": {"fraction": 0.87}, **({"speedup_vs_baseline": speedup} if speedup else {})}


def _lease_results(tmp_path: Path) -> Path:
    """A lease-results.tar.gz as lease.sh packs it: facts, steps, markers, two benchmarks (the
    second cut short), the GPU tests' log."""
    lease = tmp_path / "lease-dir"
    for folder in ("done", "gpu-tests", "bench-runtime", "bench-compile"):
        (lease / folder).mkdir(parents=True)
    (lease / "done" / "export").touch()
    (lease / "REVISION").write_text("0123abc\n")
    (lease / "nvidia-smi.csv").write_text("name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.1, 143771 MiB\n")
    (lease / "import-tensorrt.txt").write_text("ModuleNotFoundError: No module named 'tensorrt'\nimport tensorrt: rc 1\n")
    (lease / "gpu-tests" / "pytest.log").write_text("....\n==== 41 passed, 3 skipped in 80.2s ====\n")
    (lease / "steps.tsv").write_text("call\trevision 0123abc\t0\tbudget 560 s\nfacts\trc 0\t1\tlimit 30 s\n"
                                     "bench-runtime\trc 0\t200\tlimit 240 s\nbench-compile\tcut at the budget\t90\tlimit 90 s\n")
    (lease / "bench-runtime" / "results.json").write_text(json.dumps(_bench_report(
        [_measured("diffusers", 1.5), _measured("onnxruntime-cuda", 0.75, 2.0), {**_measured("torch", 1.0, 1.5),
                                                                                   "vae_reruns": 5}])))
    (lease / "bench-compile" / "results.json").write_text(json.dumps(_bench_report(
        [_measured("diffusers", 1.5, spread=0.2), _measured("diffusers-compile", 1.2, 1.25),
         {"contender": "tensorrt", "status": "not run", "reason": "not run: the benchmark was interrupted by SIGTERM before it"}],
        interrupted={"by": "SIGTERM", "reason": "interrupted by SIGTERM after diffusers-compile"})))
    (lease / ".bench-fused.partial-99").mkdir()  # what a benchmark killed after its grace leaves
    (lease / ".bench-fused.partial-99" / ".sdexport-partial").touch()
    (lease / "bench-runtime" / "elsewhere").symlink_to("/etc")  # no lease writes links
    archive = tmp_path / "out" / "lease-results.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(lease, arcname=".")
    return archive


def test_collect_makes_a_results_folder_whose_figures_are_the_reports(tmp_path: Path, capsys):
    collect = _collect()
    archive = _lease_results(tmp_path)
    target = tmp_path / "results" / "2026-12-02-h200"
    assert collect.main([str(archive.parent), "-o", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "| runtime | batch 1, 50 steps | onnxruntime-cuda | 750.0 ±2% | 2.00× | 12.5 | 66.67 | 87% |" in printed
    # the baseline of that run spread ±14%: its ratio is marked, as results.md marks it
    assert "| compile (interrupted) | batch 1, 50 steps | diffusers-compile | 1200.0 ±2% | 1.25× ⚠ |" in printed
    assert "⚠: the end-to-end runs of the contender or of its baseline vary by more than 10%" in printed
    # a contender whose fp16 VAE ran twice in its timed runs: marked, and said what it means
    assert "| runtime | batch 1, 50 steps | torch | 1000.0 ±2% | 1.50× † |" in printed
    assert ("† runtime, torch (batch 1, 50 steps): an fp16 VAE part overflowed and ran again in fp32 5 time(s) in its "
            "5 timed runs") in printed
    # the device, versions, date, runs and the flags that replaced the scenario's, beside the table
    provenance = "NVIDIA H200 (139.8 GiB, CUDA 13.0, driver 580.1); sdexport 0.1.0, torch 2.11.0+cu130;"
    assert f"- compile: {provenance} git 0123abc; 2026-12-02" in printed
    assert ("precision fp16, warm-up 1, 5 timed runs per case (command line: --warmup 1, --engine-dir "
            "/tmp/lease/engines/sd15-512);") in printed
    assert "speed does not depend on weight values but where † marks" in printed
    page = (target / "README.md").read_text()
    assert printed.strip() in page and "- name: NVIDIA H200" in page
    assert "41 passed, 3 skipped in 80.2s" in page and "import tensorrt: rc 1" in page
    assert "| bench-compile | cut at the budget | 90 | limit 90 s |" in page
    assert "- compile: tensorrt: not run: the benchmark was interrupted by SIGTERM before it" in page
    weights = "preset sd15 (random weights, seed 0): speed does not depend on weight values"
    assert "scenario sd15-512-b1, 512×512, precision fp16, warm-up 1, 5 timed runs per case (command line: " in page
    assert f"; {weights}" in page
    assert (target / "bench-runtime" / "results.json").is_file() and not (target / "done").exists()
    assert not (target / ".bench-fused.partial-99").exists() and not (target / "bench-runtime" / "elsewhere").exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left
    # never replaces a folder: a second collect into it is refused, and the folder is as it was
    before = page
    assert collect.main([str(archive), "-o", str(target)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (target / "README.md").read_text() == before
    # without -o: benchmarks/results/<date of the runs>-<GPU>
    (tmp_path / "unpacked").mkdir()
    collect.unpack(archive, tmp_path / "unpacked")
    reports = collect.bench_reports(tmp_path / "unpacked")
    assert [run for run, _ in reports] == ["runtime", "compile"]  # the order the lease ran them
    assert collect.default_output(tmp_path / "unpacked", reports) == ROOT / "benchmarks" / "results" / "2026-12-02-h200"


def test_collect_refuses_what_is_not_a_lease_archive(tmp_path: Path, capsys):
    collect = _collect()
    (tmp_path / "lease-results.tar.gz").write_bytes(b"not gzip")
    assert collect.main([str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "not a readable lease archive" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert collect.main([str(tmp_path / "nowhere")]) == 2
    assert "no lease-results.tar.gz" in capsys.readouterr().err
    # a report it cannot read is named as the archive names it, in one line
    lease = tmp_path / "lease"
    (lease / "bench-runtime").mkdir(parents=True)
    (lease / "bench-runtime" / "results.json").write_text(json.dumps(_bench_report([{"contender": "torch", "status": "measured"}])))
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:
        tar.add(lease, arcname=".")
    assert collect.main([str(tmp_path / "bad.tar.gz"), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("collect: bench-runtime/results.json: not a benchmark report collect can read (torch: measured,")
    assert not (tmp_path / "r").exists()


def test_collect_names_its_folder_only_by_a_date_that_is_one(tmp_path: Path):
    """A report's date went into the folder's name as it was: "../../../x" wrote outside the repository."""
    collect = _collect()
    gpu = {"gpu": {"name": "NVIDIA H200"}}
    with pytest.raises(collect.CollectError, match="no benchmark report with a date and a GPU"):
        collect.default_output(tmp_path, [("r", {"environment": {"date": "../../../x", **gpu}})])
    assert collect.default_output(tmp_path, [("r", {"environment": {"date": "2026-12-08T01:02:03", **gpu}})]).name == (
        "2026-12-08-h200")


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA GB200", "gb200"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "h100-mig"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"),
    ("Tesla V100-SXM2-16GB", "v100"), ("Tesla T4", "t4"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie"), ("NVIDIA H100 PCIe MIG 1g.10gb", "h100-pcie-mig"),
])
def test_collect_names_the_folder_after_the_gpu_model(name: str, slug: str):
    assert _collect().gpu_slug(name) == slug


@pytest.mark.slow
def test_the_whole_lease_on_the_tiny_model_and_the_cpu(tmp_path: Path, carried: Path):
    """Every step for real, on the CPU: the commands' flags, the export, the fused build's CPU check
    and the benchmarks (the CUDA contenders are recorded as unavailable). About 2 minutes here."""
    done = _lease(tmp_path, carried, 1100, real=True, LEASE_MODEL="tiny", LEASE_SIZE="128", LEASE_DTYPE="fp32",
                  LEASE_SCENARIO="benchmarks/scenarios/tiny-cpu.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(_steps(tmp_path).values()) == {"rc 0"}, _steps(tmp_path)
    assert "bench-fused" in _steps(tmp_path)
    # what came back, collected as a GPU session would (no GPU here: the folder is named with -o)
    assert _collect().main([str(tmp_path / "out"), "-o", str(tmp_path / "results")]) == 0
    page = (tmp_path / "results" / "README.md").read_text()
    assert "| runtime | batch 1, 10 steps | diffusers | " in page and "| runtime | batch 1, 10 steps | torch | " in page
    assert "onnxruntime-cuda: onnxruntime-gpu is required" in page or "onnxruntime-cuda: " in page


def test_a_revision_whose_code_changed_since_prepare_is_marked(tmp_path: Path, carried: Path):
    """prepare.sh writes the code's fingerprint under the commit; a call whose tree differs (a commit
    since, without `prepare.sh --revision`) runs as "<commit>-changed", and the reports say so."""
    here = subprocess.run(["bash", str(LEASE / "fingerprint.sh")], capture_output=True, text=True, check=True).stdout.strip()
    assert len(here) == 16
    for fingerprint, revision in ((here, "0123abc"), ("0" * 16, "0123abc-changed")):
        (carried / "REVISION").write_text(f"0123abc\n{fingerprint}\n")
        done = _lease(tmp_path, carried, 60, LEASE_UNTIL="facts")
        assert done.returncode == 0, done.stdout + done.stderr
        with tarfile.open(tmp_path / "out" / "lease-results.tar.gz") as tar:
            assert tar.extractfile("./REVISION").read().decode() == f"{revision}\n"
        assert ("the code here is not REVISION's" in done.stdout) == revision.endswith("-changed")

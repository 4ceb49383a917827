"""The GPU lease's plumbing, on the CPU: the one-call archive (pack-site.py) and the step runner
(lease.sh) with a budget too small for the heavy steps. The heavy steps themselves are sdexport's
own commands, tested elsewhere; the lease runs them on a GPU only."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEASE = ROOT / "scripts" / "gpu-lease"


def _pack_site():
    spec = importlib.util.spec_from_file_location("pack_site", LEASE / "pack-site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fatbin(entries: list[tuple[int, bytes]]) -> bytes:
    """A fatbin as CUDA lays it out: header (magic, version 1, header size 16, entries' size), then
    per entry a 64-byte header (kind, version, header size, payload size, ..., SM arch at 28)."""
    body = b""
    for arch, payload in entries:
        header = bytearray(64)
        struct.pack_into("<HHIQ", header, 0, 2, 0x101, 64, len(payload))
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
    sm80, sm90 = os.urandom(4096), os.urandom(4096)
    library = b"\x7fELF host code" + _fatbin([(80, sm80), (90, sm90)]) + b"more host code"
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
    return {"ort": ort, "small": small, "list": listed, "sm80": sm80, "sm90": sm90, "library": library}


def _pack(wheels: dict[str, Path], out: Path, *extra: str) -> None:
    _pack_site().main(["--ort", str(wheels["ort"]), "--small", str(wheels["small"]), "--out", str(out),
                       "--wheel-list", str(wheels["list"]), *extra])


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
    assert wheels["sm90"] in library
    assert {"onnxruntime/__init__.py", "onnxruntime/capi/libonnxruntime_providers_shared.so",
            "onnxruntime_gpu-1.31.1.dist-info/METADATA", "diffusers/__init__.py",
            "jsonschema_specifications/__init__.py"} <= names
    # the C API library and the TensorRT provider stay behind; so does a wheel the list does not name
    assert not any("libonnxruntime.so" in n or "tensorrt" in n or n.startswith("ml_dtypes") for n in names)
    notes = (out / "site.txt").read_text()
    assert "sm_90" in notes and "left out onnxruntime/capi/libonnxruntime.so.1.31.1" in notes


def test_an_archive_that_would_not_fit_one_call_is_refused(wheels, tmp_path: Path):
    with pytest.raises(SystemExit, match="too large for one device call: archive .* MiB"):
        _pack(wheels, tmp_path / "lease", "--limit-mib", "0.6")
    assert not (tmp_path / "lease" / "site.tar.xz").exists()


def test_wheels_are_checked_before_packing(wheels, tmp_path: Path):
    (wheels["small"] / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="does not match"):
        _pack(wheels, tmp_path / "lease")
    wheels["list"].write_text("diffusers==0.43.0\n")
    with pytest.raises(SystemExit, match=r"no wheel for diffusers==0\.43\.0"):
        _pack(wheels, tmp_path / "lease")


def test_no_cubins_for_the_target_is_refused(wheels, tmp_path: Path):
    with pytest.raises(SystemExit, match="no cubins for sm_89"):
        _pack(wheels, tmp_path / "lease", "--arch", "89")


def _lease(tmp_path: Path, budget: int, carried: Path) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "LEASE_BUDGET_S": str(budget), "LEASE_DIR": str(tmp_path / "lease"),
           "LEASE_SITE": str(tmp_path / "site"), "LEASE_CARRIED": str(carried),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(LEASE / "lease.sh")], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def carried(tmp_path: Path) -> Path:
    carried = tmp_path / "carried"
    (carried / "src").mkdir(parents=True)
    (carried / "src" / "lease_probe.py").write_text("X = 1\n")
    with tarfile.open(carried / "site.tar.xz", "w:xz") as tar:
        tar.add(carried / "src" / "lease_probe.py", arcname="lease_probe.py")
    (carried / "site.sha256").write_text(
        f"{hashlib.sha256((carried / 'site.tar.xz').read_bytes()).hexdigest()}  site.tar.xz\n")
    (carried / "REVISION").write_text("0123abc\n")
    return carried


def test_the_lease_skips_what_no_longer_fits_and_brings_back_what_it_did(tmp_path: Path, carried: Path):
    done = _lease(tmp_path, 20, carried)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "lease_probe.py").read_text() == "X = 1\n"
    with tarfile.open(tmp_path / "out" / "lease-results.tar.gz") as tar:
        steps = tar.extractfile("./steps.tsv").read().decode()
        assert "./REVISION" in tar.getnames() and "./pip-list-image.txt" in tar.getnames()
    rows = {line.split("\t")[0]: line.split("\t")[1] for line in steps.splitlines()}
    assert rows["facts"] == rows["install"] == "rc 0"
    for heavy in ("export", "gpu-tests", "build-fused", "bench-fastest", "bench-compile", "bench-compile-max"):
        assert rows[heavy] == "skipped", steps
    assert "needs at least 60 s" in (tmp_path / "out" / "lease.log").read_text()

    again = _lease(tmp_path, 20, carried)  # the same machine, still warm: what is done is not redone
    assert again.returncode == 0
    assert "facts: done in an earlier call" in again.stdout and "install: done in an earlier call" in again.stdout


def test_a_damaged_archive_stops_the_lease_at_once(tmp_path: Path, carried: Path):
    (carried / "site.tar.xz").write_bytes(b"not what was packed")
    failed = _lease(tmp_path, 20, carried)
    assert failed.returncode == 1
    assert "does not match site.sha256" in failed.stdout and "nothing installed" in failed.stdout
    assert (tmp_path / "out" / "lease-results.tar.gz").is_file()

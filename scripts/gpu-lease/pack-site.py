"""Pack what the GPU lease installs into one archive that fits one device call with the repository.

A device call carries at most 64 MiB (the working tree included), and a second call must follow the
first within the machine's 30-second warm window or what the first carried is gone. The lease is
therefore one call, and everything it installs travels in it: the onnxruntime-gpu wheel (244 MiB)
and the small wheels scripts/gpu-wheels.txt names, as the tree an install would leave in the site
folder, in one xz archive.

    python3 scripts/gpu-lease/pack-site.py --ort WHEEL --small DIR --out .lease

What makes onnxruntime-gpu fit, none of it touching code the lease runs:
- the CUDA machine code (cubins) of every GPU generation but the target's is zero-filled; each
  fatbin's headers stay, so the library's layout and offsets are unchanged and the target's code is
  byte for byte the wheel's. A Hopper GPU (sm_90) cannot run another generation's cubins anyway.
  PTX, which the driver could compile for it, would be kept; onnxruntime-gpu 1.31.1 has none.
- ``libonnxruntime.so.*`` is left out: it is the C API library for programs that link ONNX Runtime;
  the Python module has the runtime linked in and no Python file of the package loads it.
- ``libonnxruntime_providers_tensorrt.so`` is left out: TensorRT cannot be installed there.
- x86 machine code is filtered (xz's BCJ filter) before LZMA2 at its strongest preset.

OUT gets ``site.tar.xz``, ``site.sha256`` and ``site.txt`` (what is inside and why); the script
fails, naming the sizes, when the archive and the working tree would not fit one call.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
CARRY_LIMIT_MIB = 64.0
#: room left for what the tree gains before the call (REVISION, a results folder) and rounding
CARRY_MARGIN_MIB = 0.5
LEFT_OUT = {
    "libonnxruntime.so": "the C API library; the Python module links the runtime in",
    "libonnxruntime_providers_tensorrt.so": "TensorRT cannot be installed on the lease machine",
}
CUDA_PROVIDER = "libonnxruntime_providers_cuda.so"
XZ_FILTERS = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def keep_only_arch(data: bytearray, arch: int) -> tuple[int, int]:
    """Zero the payload of every cubin not built for ``arch``; returns (kept, zeroed) bytes. PTX is
    kept whatever its architecture (onnxruntime-gpu 1.31.1 has none).

    Fatbin layout (CUDA's fatbinary.h): a 16-byte header (magic, version 1, header size 16, size of
    the entries), then entries, each a header (kind, version, its own size, payload size, ..., the
    SM architecture at offset 28) followed by its payload."""
    kept = zeroed = 0
    pos = 0
    while (start := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header_size, size = struct.unpack_from("<HHQ", data, start + 4)
        if version != 1 or header_size != 16:
            pos = start + 4
            continue
        entry, end = start + header_size, start + header_size + size
        if end > len(data):
            raise SystemExit(f"a fatbin at byte {start} claims {size} bytes past the file's end: not packing")
        while entry < end:
            kind, _version, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch = struct.unpack_from("<I", data, entry + 28)[0]
            body = entry + entry_header
            # 1: PTX, 2: cubin; a header too short to hold the architecture, or an entry running
            # past its fatbin, means this is not the layout this script knows: zero nothing blind
            if kind not in (1, 2) or entry_header < 32 or body + payload > end:
                raise SystemExit(f"an entry at byte {entry} of the fatbin at byte {start} does not parse "
                                 f"(kind {kind}, header {entry_header}, payload {payload}): not packing")
            if entry_arch == arch or kind == 1:  # PTX stays: the driver compiles it for any newer GPU
                kept += payload
            else:
                data[body:body + payload] = bytes(payload)
                zeroed += payload
            entry = body + payload
        pos = end
    if kept == 0:
        raise SystemExit(f"no cubins for sm_{arch}: refusing to write a library that cannot run there")
    return kept, zeroed


def left_out(name: str) -> str | None:
    """Why the wheel member ``name`` stays behind, or None to pack it."""
    base = name.rsplit("/", 1)[-1]
    for prefix, reason in LEFT_OUT.items():
        if base == prefix or base.startswith(prefix + "."):
            return reason
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def listed_wheels(wheel_list: Path) -> dict[str, str]:
    """NAME==VERSION lines of scripts/gpu-wheels.txt, as {normalized name: version}."""
    listed = {}
    for line in wheel_list.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            listed[normalized(name)] = version.strip()
    return listed


def checked_small_wheels(folder: Path, wheel_list: Path) -> dict[Path, str]:
    """The wheels of ``folder`` that ``wheel_list`` names, at its versions, with their sha256, each
    checked against the folder's SHA256SUMS (prepare-wheels.sh writes it). Other wheels there are
    left out: a folder prepared for an older list must not carry what the list no longer names."""
    wanted = listed_wheels(wheel_list)
    found = {(normalized(w.name.split("-")[0]), w.name.split("-")[1]): w for w in folder.glob("*.whl")}
    missing = [f"{name}=={version}" for name, version in wanted.items() if (name, version) not in found]
    if missing:
        raise SystemExit(f"{folder}: no wheel for {', '.join(missing)} (scripts/gpu-lease/prepare.sh downloads "
                         f"again when {wheel_list.name} is newer than {folder / 'SHA256SUMS'})")
    wheels = sorted(found[item] for item in wanted.items())
    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        raise SystemExit(f"{folder}: no SHA256SUMS beside the wheels")
    sums = {line.split()[1].removeprefix("./"): line.split()[0]
            for line in sums_file.read_text(encoding="utf-8").splitlines() if line.strip()}
    checked = {}
    for wheel in wheels:
        if sums.get(wheel.name) != (digest := sha256_of(wheel)):
            raise SystemExit(f"{wheel}: does not match {sums_file}")
        checked[wheel] = digest
    return checked


def add(tar: tarfile.TarFile, name: str, data: bytes, executable: bool) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode = len(data), 0o755 if executable else 0o644
    tar.addfile(member, io.BytesIO(data))


def add_wheel(tar: tarfile.TarFile, wheel: Path, arch: int | None, notes: list[str]) -> None:
    """The wheel's files as pip --target would lay them out (none of these wheels has .data).
    ``arch``: for the onnxruntime-gpu wheel, the GPU architecture whose code stays (and LEFT_OUT
    applies); None for the others, packed whole."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if (reason := left_out(info.filename)) is not None and arch is not None:
                notes.append(f"  left out {info.filename} ({info.file_size / 2**20:.0f} MiB): {reason}")
                continue
            data = bytearray(archive.read(info))
            if arch is not None and info.filename.endswith("/" + CUDA_PROVIDER):
                kept, zeroed = keep_only_arch(data, arch)
                notes.append(f"  {info.filename}: kept the {kept / 2**20:.0f} MiB of sm_{arch} cubins, "
                             f"zero-filled {zeroed / 2**20:.0f} MiB of other generations'")
            executable = info.filename.endswith(".so") or ".so." in info.filename
            add(tar, info.filename, bytes(data), executable)


def travelling_tree_bytes(repo: Path) -> int:
    """What a device call sends besides the carried folder: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.split(b"\0")
    return sum((repo / name.decode()).stat().st_size for name in listed
               if name and (repo / name.decode()).is_file())


def fits_one_call(archive_bytes: int, repo: Path, limit_mib: float) -> str:
    """The carry budget of one device call, as a sentence; SystemExit when the archive and the
    working tree beside it would not fit (the device tool would refuse the call)."""
    tree = travelling_tree_bytes(repo)
    total = (archive_bytes + tree) / 2**20
    budget = f"archive {archive_bytes / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {total:.1f} MiB"
    if total > limit_mib - CARRY_MARGIN_MIB:
        raise SystemExit(f"too large for one device call: {budget}, over {limit_mib:g} MiB less "
                         f"{CARRY_MARGIN_MIB} MiB of margin")
    return budget


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-fit", type=Path, metavar="ARCHIVE",
                        help="only check that ARCHIVE and the working tree fit one call (after a new commit)")
    parser.add_argument("--ort", type=Path, help="the onnxruntime-gpu wheel")
    parser.add_argument("--small", type=Path, help="folder of the small wheels, with SHA256SUMS")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--wheel-list", type=Path, default=Path(__file__).resolve().parents[1] / "gpu-wheels.txt",
                        help="which of the small wheels to pack (default: scripts/gpu-wheels.txt)")
    parser.add_argument("--arch", type=int, default=90, help="SM architecture to keep (H100/H200: 90)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2],
                        help="the checkout whose tree travels with the archive")
    parser.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_fit is not None:
        if not args.check_fit.is_file():
            raise SystemExit(f"{args.check_fit}: no such archive (run scripts/gpu-lease/prepare.sh)")
        print(f"{args.check_fit}: {fits_one_call(args.check_fit.stat().st_size, args.repo, args.limit_mib)}")
        return
    if args.ort is None or args.small is None or args.out is None:
        parser.error("--ort, --small and --out are required to pack")
    if not args.ort.is_file():
        raise SystemExit(f"{args.ort}: no such wheel")
    small = checked_small_wheels(args.small, args.wheel_list)
    notes = [f"onnxruntime-gpu: {args.ort.name} (sha256 {sha256_of(args.ort)})"]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_wheel(tar, args.ort, args.arch, notes)
        for wheel, digest in small.items():
            add_wheel(tar, wheel, None, notes)
            notes.append(f"{wheel.name} (sha256 {digest})")
    print(f"compressing {raw.tell() / 2**20:.0f} MiB (xz, strongest preset: about a minute per 100 MiB) ...",
          file=sys.stderr, flush=True)
    blob = lzma.compress(raw.getvalue(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS)
    budget = fits_one_call(len(blob), args.repo, args.limit_mib)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "site.tar.xz.partial"
    partial.write_bytes(blob)
    partial.replace(args.out / "site.tar.xz")
    (args.out / "site.sha256").write_text(f"{hashlib.sha256(blob).hexdigest()}  site.tar.xz\n", encoding="utf-8")
    (args.out / "site.txt").write_text("\n".join([f"sm_{args.arch}; {budget}", *notes]) + "\n", encoding="utf-8")
    print(f"{args.out / 'site.tar.xz'}: {budget} (limit {args.limit_mib:g} MiB per call)")


if __name__ == "__main__":
    main()

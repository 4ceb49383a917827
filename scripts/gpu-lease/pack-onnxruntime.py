"""Pack an onnxruntime-gpu wheel for a GPU lease whose transfers are capped (64 MiB per call here).

The wheel is ~244 MiB, mostly CUDA machine code (cubins) for six GPU generations. A GPU runs only the
code built for its own architecture, so the cubins for the others are zero-filled (their fatbin
headers stay, so the file's layout and every offset are unchanged) and the installed tree is
xz-compressed: the code the target GPU executes is byte for byte the wheel's.

    python3 scripts/gpu-lease/pack-onnxruntime.py WHEEL OUT_DIR --arch 90 --first-part-mib 54

OUT_DIR gets ort-a/part-00, ort-b/part-01, ... and ort.sha256 (of the joined .tar.xz). On the
server: cat OUT_DIR/ort-*/part-* > /tmp/ort.tar.xz; sha256sum -c; tar -xJf into the site folder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import struct
import tarfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def keep_only_arch(data: bytearray, arch: int) -> tuple[int, int]:
    """Zero the payload of every fatbin entry not built for ``arch``; returns (kept, zeroed) bytes."""
    kept = zeroed = 0
    pos = 0
    while (start := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header_size, size = struct.unpack_from("<HHQ", data, start + 4)
        if version != 1 or header_size != 16:
            pos = start + 4
            continue
        entry, end = start + header_size, start + header_size + size
        while entry < end:
            _kind, _version, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch = struct.unpack_from("<I", data, entry + 28)[0]
            body = entry + entry_header
            if entry_arch == arch:
                kept += payload
            else:
                data[body:body + payload] = bytes(payload)
                zeroed += payload
            entry = body + payload
        pos = end
    if kept == 0:
        raise SystemExit(f"no cubins for sm_{arch}: refusing to write a library that cannot run there")
    return kept, zeroed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", type=int, default=90, help="SM architecture to keep (H100/H200: 90)")
    parser.add_argument("--first-part-mib", type=float, default=54)
    parser.add_argument("--part-mib", type=float, default=61)
    args = parser.parse_args()
    buffer = io.BytesIO()
    with zipfile.ZipFile(args.wheel) as wheel, tarfile.open(fileobj=buffer, mode="w:xz",
                                                            preset=6 | lzma.PRESET_DEFAULT) as tar:
        for info in wheel.infolist():
            if info.is_dir():
                continue
            data = bytearray(wheel.read(info))
            if info.filename.endswith("libonnxruntime_providers_cuda.so"):
                kept, zeroed = keep_only_arch(data, args.arch)
                print(f"{info.filename}: kept {kept / 2**20:.0f} MiB of sm_{args.arch} cubins, zeroed {zeroed / 2**20:.0f} MiB")
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
            tar.addfile(member, io.BytesIO(bytes(data)))
    blob = buffer.getvalue()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort.sha256").write_text(f"{hashlib.sha256(blob).hexdigest()}  /tmp/ort.tar.xz\n")
    (args.out / "ort.name").write_text(args.wheel.name + "\n")
    offset, index = 0, 0
    while offset < len(blob):
        size = int((args.first_part_mib if index == 0 else args.part_mib) * 2**20)
        folder = args.out / f"ort-{'abcdefgh'[index]}"
        folder.mkdir(exist_ok=True)
        (folder / f"part-{index:02d}").write_bytes(blob[offset:offset + size])
        offset, index = offset + size, index + 1
    print(f"{len(blob) / 2**20:.1f} MiB in {index} parts under {args.out}")


if __name__ == "__main__":
    main()

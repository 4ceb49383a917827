#!/usr/bin/env bash
# Install sdexport on a CI GPU runner, into a virtualenv that sees the runner's own CUDA torch.
#
#   bash ci/install.sh                           this checkout (editable), its dependencies from PyPI
#                                                 at the versions in constraints.txt (onnxruntime-gpu too)
#   SDEXPORT_WHEELS=/srv/wheels bash ci/install.sh   air-gapped: the dependencies from a wheel folder
#                                                 made by scripts/prepare-offline.sh, no network at all
#                                                 (ci/bench-gate.sh still runs this checkout's code)
#
# SDEXPORT_VENV names the virtualenv (default .venv-bench in the checkout, which CI's workspace clean
# removes: give an absolute path outside it to keep it between jobs). The runner's torch is used,
# never replaced. Python 3.11 or 3.12: the pinned set has no wheels for newer ones yet.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SDEXPORT_VENV:-.venv-bench}
# A virtualenv whose pip does not run, made by this script (its mark, written before anything
# else), was cut short while it was made (a cancelled job): made again. Any other folder there
# that holds files (a virtualenv without pip, as uv makes them; a project) is the user's: refused.
mark=$venv/.sdexport-ci-venv
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  if [[ -e $venv || -L $venv ]] && [[ -L $venv || ! -d $venv || -n $(ls -A -- "$venv" 2>/dev/null || echo unreadable) ]]; then
    if [[ -L $venv || ! -f $mark ]]; then
      echo "ci/install: $venv is not a virtualenv with pip that this script made; set SDEXPORT_VENV to another" \
           "folder, or delete it" >&2
      exit 2
    fi
    rm -rf -- "$venv"
  fi
  mkdir -p -- "$venv"
  : > "$mark"
  python3 -m venv --system-site-packages "$venv"
fi
if [[ -n ${SDEXPORT_WHEELS:-} ]]; then
  PYTHON=$venv/bin/python bash scripts/offline-install.sh "$SDEXPORT_WHEELS"
else
  PYTHON=$venv/bin/python bash scripts/setup.sh --gpu
fi
"$venv/bin/python" -m sdexport --help >/dev/null

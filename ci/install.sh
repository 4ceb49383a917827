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
# A virtualenv whose pip does not run was cut short while it was made (a cancelled job): made again.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  if [[ -e $venv && ! -f $venv/pyvenv.cfg && -n $(find "$venv" -mindepth 1 -maxdepth 1 -print -quit 2>/dev/null) ]]; then
    echo "ci/install: $venv holds files and is not a virtualenv; set SDEXPORT_VENV to another folder" >&2
    exit 2
  fi
  python3 -m venv --clear --system-site-packages "$venv"
fi
if [[ -n ${SDEXPORT_WHEELS:-} ]]; then
  PYTHON=$venv/bin/python bash scripts/offline-install.sh "$SDEXPORT_WHEELS"
else
  PYTHON=$venv/bin/python bash scripts/setup.sh --gpu
fi
"$venv/bin/python" -m sdexport --help >/dev/null

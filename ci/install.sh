#!/usr/bin/env bash
# Install sdexport on a CI GPU runner, into a virtualenv that sees the runner's own CUDA torch.
#
#   bash ci/install.sh                           from PyPI, at the versions in constraints.txt
#   SDEXPORT_WHEELS=/srv/wheels bash ci/install.sh   air-gapped: a wheel folder made by
#                                                 scripts/prepare-offline.sh, no network at all
#
# SDEXPORT_VENV names the virtualenv (default .venv-bench; kept between runs where the workspace is);
# the next steps run "$SDEXPORT_VENV/bin/python". The runner's torch is used, never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SDEXPORT_VENV:-.venv-bench}
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv --system-site-packages "$venv"
fi
if [[ -n ${SDEXPORT_WHEELS:-} ]]; then
  PYTHON=$venv/bin/python bash scripts/offline-install.sh "$SDEXPORT_WHEELS"
else
  PYTHON=$venv/bin/python bash scripts/setup.sh --gpu
fi
"$venv/bin/python" -m sdexport --help >/dev/null

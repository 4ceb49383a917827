#!/usr/bin/env bash
# The one command a GPU runner uses: install sdexport with onnxruntime-gpu, TensorRT and the dev tools,
# check that the GPU stack is really there, then run the tests marked `gpu` (TensorRT build + runtime,
# CUDA execution). Needs an NVIDIA GPU and driver; a CUDA build of torch is kept if installed (the
# default torch wheel from PyPI is a CUDA build on Linux x86_64).
#   bash scripts/gpu-tests.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

# onnxruntime (CPU) and onnxruntime-gpu install the same module and break each other: keep only -gpu.
if "$PYTHON" -m pip show --quiet onnxruntime >/dev/null 2>&1; then
  echo "gpu-tests: replacing onnxruntime (CPU) with onnxruntime-gpu" >&2
  "$PYTHON" -m pip uninstall --quiet --yes onnxruntime
fi
echo "gpu-tests: installing sdexport[gpu,tensorrt,dev]" >&2
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  pip_install "${SDEXPORT_TORCH:-torch==2.13.0}"
fi
# The tested pins (constraints.txt, as scripts/setup.sh uses them); TensorRT and onnxruntime-gpu are not pinned.
CONSTRAINTS=${SDEXPORT_CONSTRAINTS-constraints.txt}
pip_install ${CONSTRAINTS:+--constraint "$CONSTRAINTS"} -e ".[gpu,tensorrt,dev]"
bash scripts/setup.sh --dev   # sees onnxruntime-gpu and keeps it; adds tensorrt-stubs for mypy

"$PYTHON" - <<'PY'
import sys

import torch

problems = []
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA GPU (a CPU build, or no driver)")
try:
    import tensorrt
    if not hasattr(tensorrt, "Builder"):
        problems.append("`tensorrt` is only the type stubs (pip install 'tensorrt>=10')")
except (ImportError, OSError) as exc:
    problems.append(f"TensorRT does not import: {exc}")
import onnxruntime

if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
    problems.append("onnxruntime has no CUDAExecutionProvider")
if problems:
    sys.exit("gpu-tests: not a usable GPU environment:\n  " + "\n  ".join(problems))
print(f"gpu-tests: {torch.cuda.get_device_name()} | torch {torch.__version__} | TensorRT {tensorrt.__version__}"
      f" | onnxruntime {onnxruntime.__version__}", file=sys.stderr)
PY

exec "$PYTHON" -m pytest -m gpu -q -rs "$@"

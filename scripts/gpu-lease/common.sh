# Shared by the lease phases: where results collect on the GPU machine, and how they come back.
# The machine keeps /tmp between calls while it is warm; $OUT is emptied before each call and at
# most 8 files come back, so every phase packs the results gathered so far into one archive.
set -uo pipefail
export PYTHONUNBUFFERED=1 SDEXPORT_TRACEBACK=1
# The image's pytest plugins were built for its own pytest, not the pinned one put ahead of it.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
: "${OUT:?run through the device tool: \$OUT is where files come back}"
LEASE=/tmp/lease        # results, logs and the engine directory; survives while the machine is warm
SITE=/tmp/site          # wheels the image lacks, first on PYTHONPATH
ENGINES=$LEASE/engines/sd15-512
mkdir -p "$LEASE"
T0=$(date +%s)
mark() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
pack() {  # everything but the engines (gigabytes) into one file that comes back
  tar -czf "$OUT/lease-results.tar.gz" -C "$LEASE" --exclude=./engines --exclude='./*/engines' . 2>/dev/null
}
use_site() {
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # onnxruntime-gpu dlopens the CUDA 13 libraries (cuBLAS, cuFFT, cuRAND, cuDNN) that the image's
  # nvidia-* wheels hold; name their folders instead of relying on torch having loaded them first.
  local libs
  libs=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages()
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(f"{r}/nvidia/**/lib/*.so*", recursive=True)})))
PY
)
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
bench() {  # bench NAME TIMEOUT ARGS...: one scenario run into $LEASE/NAME, its report copied out
  local name=$1 limit=$2; shift 2
  mark "bench $name ($*)"
  timeout --signal=TERM --kill-after=20 "$limit" python3 -m sdexport bench benchmarks/scenarios/sd15-512-b1.toml \
    -o "$LEASE/$name" --engine-dir "$ENGINES" "$@" 2>&1 | tee "$LEASE/$name.log"
  mark "bench $name: rc ${PIPESTATUS[0]}"
  pack
}
# The tree arrives without .git: the commit it is (written by the caller) goes into every report.
[[ -f REVISION ]] && export SDEXPORT_GIT_REVISION=$(cat REVISION)

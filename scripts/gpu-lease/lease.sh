#!/usr/bin/env bash
# The GPU lease in one device call (issue 11): the machine's facts, the GPU tests, and the SD 1.5
# benchmarks against eager diffusers, most important first, inside a time budget.
#
# Prepare here (network), then make the call (README, "The GPU lease"):
#   bash scripts/gpu-lease/prepare.sh          # .lease/site.tar.xz + .lease/REVISION, checked to fit
#   device run: command "bash scripts/gpu-lease/lease.sh", carry [".lease"], timeout_s 600
#
# Why one call: a call carries at most 64 MiB, a second call must come within the machine's 30-s
# warm window or all the first installed is gone, and the session's device time (15 min) counts
# the start, every call and every idle second. So everything travels at once (pack-site.py) and
# the script plans its own time: each step has the least time it needs and the most it may take,
# a step that no longer fits is skipped and said so, and LEASE_BUDGET_S (default 500 s) leaves the
# call's timeout room to pack and return. Every finished step packs the results so far into
# $OUT/lease-results.tar.gz, so a call cut short still brings back what it measured.
#
# Run again on the same (still warm) machine, the script skips what is done and goes on with the
# rest: what a step finished is marked under /tmp/lease/done. On a fresh machine it starts over.
#
# Overrides, for a different lease or a dry run of the plumbing on a CPU machine:
#   LEASE_BUDGET_S  seconds this call may spend on steps (default 500)
#   LEASE_MODEL, LEASE_SIZE, LEASE_DTYPE, LEASE_SCENARIO  (default sd15, 512, fp16,
#                   benchmarks/scenarios/sd15-512-b1.toml)
#   LEASE_DIR       where results collect (default /tmp/lease); LEASE_SITE the install (/tmp/site)
#   LEASE_CARRIED   the carried folder with site.tar.xz, site.sha256, REVISION (default .lease)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${OUT:?run through the device tool: \$OUT is where files come back}"
BUDGET=${LEASE_BUDGET_S:-500}
MODEL=${LEASE_MODEL:-sd15}
SIZE=${LEASE_SIZE:-512}
DTYPE=${LEASE_DTYPE:-fp16}
SCENARIO=${LEASE_SCENARIO:-benchmarks/scenarios/sd15-512-b1.toml}
LEASE=${LEASE_DIR:-/tmp/lease}
SITE=${LEASE_SITE:-/tmp/site}
CARRIED=${LEASE_CARRIED:-.lease}
ENGINES=$LEASE/engines/$MODEL-$SIZE
export PYTHONUNBUFFERED=1 SDEXPORT_TRACEBACK=1
# The image's own pytest plugins were built for its pytest, not the pinned one put ahead of it.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
mkdir -p "$LEASE/done"
exec > >(tee -a "$LEASE/lease.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
mark() { echo "=== [$(elapsed)s of ${BUDGET}s] $*"; }
pack() {  # everything but the engines (gigabytes) into the one file that comes back; the export's
  # step packs from the background too, hence a temporary name per process
  local partial=$OUT/lease-results.tar.gz.$BASHPID
  cp "$LEASE/lease.log" "$OUT/lease.log.$BASHPID" 2>/dev/null && mv "$OUT/lease.log.$BASHPID" "$OUT/lease.log"
  if tar -czf "$partial" -C "$LEASE" --exclude=./engines --exclude='./*/engines' . 2>/dev/null; then
    mv "$partial" "$OUT/lease-results.tar.gz"
  else
    rm -f "$partial"
  fi
}
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$LEASE/steps.tsv"; }

# step NAME LEAST MOST COMMAND...: run COMMAND under a timeout of MOST seconds or what is left of
# the budget, whichever is less; skip it when less than LEAST is left or it is done already.
step() {
  local name=$1 least=$2 most=$3 limit rc began
  shift 3
  if [[ -e $LEASE/done/$name ]]; then
    mark "$name: done in an earlier call"; return 0
  fi
  if (( $(left) < least )); then
    mark "$name: skipped, $(left) s left and it needs at least $least s"
    record "$name" skipped "$(left)" "needs $least s"; pack; return 1
  fi
  limit=$(( $(left) < most ? $(left) : most ))
  mark "$name (at most ${limit}s): $*"
  began=$(date +%s)
  # the steps are shell functions (exported below): a child bash runs them under the timeout,
  # which signals its whole process group
  timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@"
  rc=$?
  record "$name" "rc $rc" "$(( $(date +%s) - began ))" "limit $limit s"
  mark "$name: rc $rc after $(( $(date +%s) - began ))s"
  [[ $rc == 0 ]] && touch "$LEASE/done/$name"
  pack
  return "$rc"
}

facts() {
  nvidia-smi > "$LEASE/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,persistence_mode,compute_mode \
    --format=csv > "$LEASE/nvidia-smi.csv" 2>&1
  cat "$LEASE/nvidia-smi.csv"
  python3 -m pip list --disable-pip-version-check > "$LEASE/pip-list-image.txt" 2>&1
  { python3 -c 'import tensorrt; print(tensorrt.__version__)'; echo "import tensorrt: rc $?"; } > "$LEASE/import-tensorrt.txt" 2>&1
  cat "$LEASE/import-tensorrt.txt"
  cp "$CARRIED/REVISION" "$CARRIED/site.txt" "$LEASE/" 2>/dev/null
  return 0
}

install_site() {  # the archive pack-site.py made: checked, then unpacked ahead of the image's packages
  (cd "$CARRIED" && sha256sum -c site.sha256) || { echo "$CARRIED/site.tar.xz does not match site.sha256"; return 1; }
  mkdir -p "$SITE"
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$CARRIED/site.tar.xz" "$SITE"
}

use_site() {
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # onnxruntime-gpu dlopens the CUDA 13 libraries (cuBLAS, cuFFT, cuRAND, cuDNN) that the image's
  # nvidia-* wheels hold; name their folders rather than rely on torch having loaded them first.
  local libs
  libs=$(python3 -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for r in site.getsitepackages()
                       for p in glob.glob(f"{r}/nvidia/**/lib/*.so*", recursive=True)})))')
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())'
}

gpu_tests() {
  bash scripts/gpu-tests.sh --no-install --site "$SITE" --out "$LEASE/gpu-tests" -- -m "gpu and not slow"
}

export_engines() {
  python3 -m sdexport export "$MODEL" -o "$ENGINES" --dtype "$DTYPE" --batch 1:1:4 --height "$SIZE" --width "$SIZE" \
    --verify quick --components text_encoder,unet,vae_decoder,vae_decoder_fp32 --force > "$LEASE/export.log" 2>&1
}

build_fused() {
  [[ -d $ENGINES ]] || { echo "no engine directory: the export did not finish"; return 1; }
  python3 -m sdexport build "$ENGINES" --target onnxruntime-cuda > "$LEASE/build-onnxruntime.log" 2>&1
}

bench() {  # bench NAME CONTENDERS: the scenario with the baseline first, so each report has its ratio
  [[ -d $ENGINES ]] || { echo "no engine directory: the export did not finish"; return 1; }
  python3 -m sdexport bench run "$SCENARIO" -o "$LEASE/bench-$1" --engine-dir "$ENGINES" \
    --contenders "$2" --warmup 1 --repeats 5 > "$LEASE/bench-$1.log" 2>&1
  local rc=$?
  tail -20 "$LEASE/bench-$1.log"
  return "$rc"
}

export -f facts install_site gpu_tests export_engines build_fused bench
export LEASE SITE CARRIED ENGINES MODEL SIZE DTYPE SCENARIO

mark "lease: $(cat "$CARRIED/REVISION" 2>/dev/null || echo "no $CARRIED/REVISION"); $MODEL ${SIZE}² $DTYPE, budget ${BUDGET}s"
if [[ -f $CARRIED/REVISION ]]; then
  SDEXPORT_GIT_REVISION=$(cat "$CARRIED/REVISION"); export SDEXPORT_GIT_REVISION
fi
step facts 5 30 facts
step install 10 60 install_site || { mark "nothing installed: the GPU paths cannot run"; exit 1; }
use_site
# The export and the GPU tests side by side (the machine has 16 cores); the fused ONNX Runtime
# graphs follow the export, still beside the tests, so that no benchmark shares the machine.
step export 60 240 export_engines &
exporting=$!
step gpu-tests 30 180 gpu_tests
wait "$exporting"
tail -5 "$LEASE/export.log" 2>/dev/null
step build-fused 60 180 build_fused
# Most important first: the baseline against the likely fastest contenders, then the rest.
step bench-fastest 90 240 bench fastest diffusers,onnxruntime-cuda-fused,torch
step bench-compile 120 300 bench compile diffusers,diffusers-compile,onnxruntime-cuda,tensorrt
step bench-compile-max 150 360 bench compile-max diffusers,torch-compile-max
mark "lease done: $(awk -F'\t' '{printf "%s %s; ", $1, $2}' "$LEASE/steps.tsv")"
pack

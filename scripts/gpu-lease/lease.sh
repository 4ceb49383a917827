#!/usr/bin/env bash
# The GPU lease (issue 11): the machine's facts, the GPU tests, and the SD 1.5 benchmarks against
# eager diffusers, most important first, inside a time budget.
#
# Prepare here (network), commit, then make the calls, each one at once after the last (within the
# machine's 30-s warm window, or what the earlier calls carried and built is gone):
#   bash scripts/gpu-lease/prepare.sh          # .lease/site.tar.xz, checked to fit; .lease/REVISION
#   1. carry [".lease/REVISION"], command "LEASE_UNTIL=facts bash scripts/gpu-lease/lease.sh",
#      timeout_s 60: the machine's facts, in seconds (the issue's first evidence)
#   2. carry [".lease"], command "LEASE_UNTIL=export LEASE_BUDGET_S=380 bash scripts/gpu-lease/lease.sh",
#      timeout_s 420: the install, then the export beside the GPU tests
#   3. carry [".lease"], command "LEASE_SKIP='export gpu-tests' LEASE_BUDGET_S=<device time left less 90,
#      at most 560> bash scripts/gpu-lease/lease.sh", timeout_s <budget + 40, at most 600 (the tool's
#      most: a larger one is refused, and the warm machine idles while the call is mended)>: the
#      benchmarks, most important first; the same again while time is left (under 90 s left: no
#      call, give_back). The time left is in call 2's reply (lease.budget_left_s):
#      no status call between. Carried again and told to leave out what call 2 did: on the warm
#      machine those steps are done (said so, not repeated); on one that went back meanwhile (a
#      call later than 30 s) it installs again and measures the baseline against torch.compile,
#      which needs no export, where it would have found nothing installed and measured nothing.
# LEASE_UNTIL ends a call after the step it names; the next call goes on from there. Why three
# calls, where one (carry [".lease"], "bash scripts/gpu-lease/lease.sh", timeout_s 600) would do:
# a call whose machine stops answering brings back nothing, not even the steps it finished. The
# first lease (2026-12-05, one call) lost its device time so: the call spent 699 s of it, start
# included, before the machine stopped answering, and no file came back. Split, each call brings
# back all done so far.
# After a new commit, `prepare.sh --revision` and carry just ".lease/REVISION" in a later call.
# Then, here, with the Python sdexport is installed in (collect.py reads sdexport's report code):
#   python scripts/gpu-lease/collect.py <files_at>/lease-results.tar.gz
#   (benchmarks/results/<date>-<gpu>/ with a README.md, and the table for the project README)
#
# A call carries at most 64 MiB, a later call must come within 30 s or all an earlier one carried
# and built is gone, and the session's device time (15 min) counts the start, every call and every
# idle second. So the wheels travel in one call (pack-site.py) and the script plans its own
# time: each step has the least time it needs and the most it may take, a step that no longer fits
# is skipped and said so, and LEASE_BUDGET_S (default 560 s) leaves the call's 600-s timeout room
# for a step's kill grace (15 s) and the last pack. Every step packs the results so far into
# $OUT/lease-results.tar.gz, so a call cut short still brings back what it measured. A benchmark
# the budget cuts short writes the report of what it measured on SIGTERM (its contenders finished
# before it, marked as interrupted); its step waits the grace for that before packing. One killed
# before it wrote that (a native call that outlasted the grace) leaves each finished contender's
# medians in lease.log, the bench's line per contender.
#
# The order, most valuable first: the export (SD 1.5 fp16 took 256 s on this project's 2-core CI
# machine; it runs on the CPU there too) beside the GPU tests; the baseline against the runtime
# over the export (PyTorch, portable ONNX Runtime graphs); the baseline against torch.compile;
# then ONNX Runtime's fused build (336 s on the CI machine, 238 s of it the U-Net), which starts
# only with 200 s left, and its benchmark. torch-compile-max (minutes of autotuning) runs only when
# LEASE_COMPILE_MAX=1. LEASE_SKIP="name ..." leaves steps out, e.g. for a lease that goes straight
# to the fused graphs.
#
# Resuming: a later call on the same machine skips a step that finished (marked under $LEASE/done)
# or failed by itself (an error or its own time limit: $LEASE/failed); a step the budget cut short
# or skipped runs again. A call with another REVISION than the last one's starts over, but for the
# install of an unchanged archive.
#
# Overrides, for a different lease or a dry run of the plumbing on a CPU machine:
#   LEASE_BUDGET_S  seconds this call may spend on steps (default 560)
#   LEASE_SKIP, LEASE_COMPILE_MAX, LEASE_UNTIL (a step's name: facts, install, export, ...)  (above)
#   LEASE_MODEL, LEASE_SIZE, LEASE_DTYPE, LEASE_SCENARIO  (default sd15, 512, fp16,
#                   benchmarks/scenarios/sd15-512-b1.toml)
#   LEASE_DIR       where results collect (default /tmp/lease); LEASE_SITE the install (/tmp/site)
#   LEASE_CARRIED   the carried folder with site.tar.xz, site.sha256, REVISION (default .lease)
#   LEASE_TIME_SCALE  divides every step's least and most seconds (default 1; tests of the runner)
#   LEASE_KEEP_CPUS   cores no step runs on, left to the machine itself (default 2; 0: none)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${OUT:?run through the device tool: \$OUT is where files come back}"
BUDGET=${LEASE_BUDGET_S:-560}
if [[ ! $BUDGET =~ ^[0-9]+$ ]]; then
  echo "lease.sh: LEASE_BUDGET_S=$BUDGET: give whole seconds" >&2; exit 2
fi
if (( BUDGET > 560 )); then  # (a call runs 600 s at most: the steps' kill grace and the last pack need the rest)
  echo "lease.sh: LEASE_BUDGET_S=$BUDGET: at most 560 in one call (its timeout is 600 s at most); taking 560" >&2
  BUDGET=560
fi
SCALE=${LEASE_TIME_SCALE:-1}
MODEL=${LEASE_MODEL:-sd15}
SIZE=${LEASE_SIZE:-512}
DTYPE=${LEASE_DTYPE:-fp16}
SCENARIO=${LEASE_SCENARIO:-benchmarks/scenarios/sd15-512-b1.toml}
LEASE=${LEASE_DIR:-/tmp/lease}
SITE=${LEASE_SITE:-/tmp/site}
CARRIED=${LEASE_CARRIED:-.lease}
UNTIL=${LEASE_UNTIL:-}
ENGINES=$LEASE/engines/$MODEL-$SIZE
STEPS="facts install export bench-runtime bench-compile build-fused bench-fused"
if [[ -n $UNTIL && " $STEPS " != *" $UNTIL "* ]]; then
  echo "lease.sh: LEASE_UNTIL=$UNTIL: name one of $STEPS (the call ends after it), or leave it unset" >&2; exit 2
fi
export PYTHONUNBUFFERED=1 SDEXPORT_TRACEBACK=1
# The image's own pytest plugins were built for its pytest, not the pinned one put ahead of it.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
mkdir -p "$LEASE/done" "$LEASE/failed"
exec > >(tee -a "$LEASE/lease.log") 2>&1
TEE=$!
# finish STATUS: the log whole (tee ends once nothing writes to it: up to 5 s, as a process a step
# left behind may hold the pipe), packed, and exit
finish() {
  local waited=0
  exec >/dev/null 2>&1  # (tee still writes the call's output; this shell says nothing more)
  while kill -0 "$TEE" 2>/dev/null && (( waited < 50 )); do sleep 0.1; waited=$((waited + 1)); done
  kill "$TEE" 2>/dev/null  # (what such a process still writes is its own)
  pack
  exit "$1"
}
# end_call_after NAME: end this call here when LEASE_UNTIL names NAME (a later call goes on from the next step)
end_call_after() {
  [[ $UNTIL == "$1" ]] || return 0
  mark "call ends after $1 (LEASE_UNTIL): the next call on this machine goes on from there"
  finish 0
}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
mark() { echo "=== [$(elapsed)s of ${BUDGET}s] $*"; }
pack() {  # everything but the engines (gigabytes) into the one file that comes back; the export's
  # step packs from the background too, hence a temporary name per process
  local partial=$OUT/lease-results.tar.gz.$BASHPID rc
  cp "$LEASE/lease.log" "$OUT/lease.log.$BASHPID" 2>/dev/null && mv "$OUT/lease.log.$BASHPID" "$OUT/lease.log"
  # logs grow while they are read: tar says so with status 1, and the archive is still whole
  tar -czf "$partial" --warning=no-file-changed -C "$LEASE" --exclude=./engines --exclude='./*/engines' . 2>/dev/null
  rc=$?
  if (( rc <= 1 )); then mv "$partial" "$OUT/lease-results.tar.gz"; else rm -f "$partial"; fi
}
# seconds a step has to stop once signalled, before SIGKILL (2 at the least, also in scaled tests)
GRACE=$(( (15 + SCALE - 1) / SCALE ))
(( GRACE >= 2 )) || GRACE=2

# group_alive PGID: a process of that group is still running (a zombie is not: it awaits its reaper)
group_alive() {
  local f line state pgrp
  for f in /proc/[0-9]*/stat; do
    { read -r line < "$f"; } 2>/dev/null || continue
    read -r state _ pgrp _ <<< "${line##*) }"
    [[ $pgrp == "$1" && $state != Z ]] && return 0
  done
  return 1
}

# finish_group PGID: wait up to the grace for that group's processes to end, then kill what is left
finish_group() {
  local waited=0
  while group_alive "$1"; do
    if (( waited >= GRACE )); then
      kill -KILL -- "-$1" 2>/dev/null
      mark "killed what was left of the step after ${GRACE}s"
      return
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

# Cores left to the machine itself (what answers the device calls runs there too; the first lease's
# machine stopped answering, cause unknown): every step runs on the others, where at least one is
# left and taskset works, and torch.compile starts a compile worker per core it may use, not per
# core of the machine (16 processes beside the benchmark otherwise).
PIN=()
spare=$(python3 -c 'import os, sys; c = sorted(os.sched_getaffinity(0)); k = int(sys.argv[1])
print(",".join(map(str, c[k:])) if 0 < k < len(c) else "")' "${LEASE_KEEP_CPUS:-2}" 2>/dev/null)
if [[ -n $spare ]] && taskset -c "$spare" true 2>/dev/null; then
  PIN=(taskset -c "$spare")
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(awk -F, '{print NF}' <<< "$spare")}
fi

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$LEASE/steps.tsv"; }

# step NAME LEAST MOST COMMAND...: run COMMAND under a timeout of MOST seconds or what is left of
# the budget, whichever is less; skip it when less than LEAST is left or an earlier call settled it.
step() {
  local name=$1 least=$(( ($2 + SCALE - 1) / SCALE )) most=$(( ($3 + SCALE - 1) / SCALE )) limit rc began
  shift 3
  if [[ -e $LEASE/done/$name ]]; then
    mark "$name: done in an earlier call"; return 0
  fi
  if [[ -e $LEASE/failed/$name ]]; then
    mark "$name: failed in an earlier call ($(cat "$LEASE/failed/$name")): not repeated"; return 1
  fi
  if [[ " ${LEASE_SKIP:-} " == *" $name "* ]]; then
    mark "$name: left out (LEASE_SKIP)"; record "$name" "left out" 0 "LEASE_SKIP"; return 1
  fi
  if (( $(left) < least )); then
    mark "$name: skipped, $(left) s left and it needs at least $least s"
    record "$name" skipped "$(left)" "needs $least s"; pack; return 1
  fi
  limit=$(( $(left) < most ? $(left) : most ))
  mark "$name (at most ${limit}s): $*"
  began=$(date +%s)
  # the steps are shell functions (exported below): a child bash runs them under the timeout,
  # which signals its whole process group (its own: timeout leads it)
  timeout --signal=TERM --kill-after="$GRACE" "$limit" ${PIN[@]+"${PIN[@]}"} bash -c '"$@"' "$name" "$@" &
  local group=$!
  wait "$group"
  rc=$?
  # timeout returns as soon as that bash has gone, and bash goes at once on SIGTERM; a command of
  # the step may still be at work on it (a benchmark writes the report of what it measured before
  # it stops): it gets the same grace, then the group is killed, before the results are packed
  if [[ $rc == 124 || $rc == 137 ]]; then
    finish_group "$group"
  fi
  local took=$(( $(date +%s) - began )) outcome="rc $rc"
  if [[ $rc == 0 ]]; then
    touch "$LEASE/done/$name"
  elif [[ $rc == 124 || $rc == 137 ]] && (( limit < most && took >= limit )); then
    outcome="cut at the budget"  # runs again in a later call on this machine
  else
    [[ $rc == 124 || $rc == 137 ]] && (( took >= limit )) && outcome="rc $rc, over its own limit of $most s"
    echo "$outcome" > "$LEASE/failed/$name"
  fi
  record "$name" "$outcome" "$took" "limit $limit s"
  mark "$name: $outcome after ${took}s"
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
  # torch.compile's Triton kernels build a small launcher with the host's C compiler
  for compiler in cc gcc clang nvcc; do echo "$compiler: $(command -v "$compiler" || echo none)"; done > "$LEASE/compilers.txt"
  cat "$LEASE/compilers.txt"
  return 0
}

install_site() {  # the archive pack-site.py made: checked, then unpacked ahead of the image's packages
  [[ -f $CARRIED/site.tar.xz ]] || { echo "no $CARRIED/site.tar.xz: a fresh machine needs carry [\".lease\"]"; return 1; }
  (cd "$CARRIED" && sha256sum -c site.sha256) || { echo "$CARRIED/site.tar.xz does not match site.sha256"; return 1; }
  mkdir -p "$SITE"
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$CARRIED/site.tar.xz" "$SITE" \
    && cp "$CARRIED/site.sha256" "$LEASE/site.sha256" && { cp "$CARRIED/site.txt" "$LEASE/" 2>/dev/null; true; }
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
  # --verify none: the export is the first call's longest step; the GPU tests verify exports on the
  # tiny model, and every benchmark compares each contender's images with the baseline's. The fp32
  # fallback decoder is an fp16 export's alone (export refuses it for fp32: its decoder is fp32).
  local components=text_encoder,unet,vae_decoder
  [[ $DTYPE == fp16 ]] && components+=,vae_decoder_fp32
  python3 -m sdexport export "$MODEL" -o "$ENGINES" --dtype "$DTYPE" --batch 1:1:4 --height "$SIZE" --width "$SIZE" \
    --verify none --components "$components" --force > "$LEASE/export.log" 2>&1
}

build_fused() {
  python3 -m sdexport build "$ENGINES" --target onnxruntime-cuda > "$LEASE/build-onnxruntime.log" 2>&1
}

bench() {  # bench NAME CONTENDERS: the scenario with the baseline first, so each report has its ratio
  local engines=()
  [[ -e $LEASE/done/export ]] && engines=(--engine-dir "$ENGINES")
  python3 -m sdexport bench run "$SCENARIO" -o "$LEASE/bench-$1" ${engines[@]+"${engines[@]}"} \
    --contenders "$2" --warmup 1 --repeats 5 > "$LEASE/bench-$1.log" 2>&1
  local rc=$?
  tail -20 "$LEASE/bench-$1.log"
  return "$rc"
}

export -f facts install_site gpu_tests export_engines build_fused bench
export LEASE SITE CARRIED ENGINES MODEL SIZE DTYPE SCENARIO

# The commit this call runs (the tree comes without .git): the carried REVISION, else the last
# call's; "-changed" where the code here is not what prepare.sh fingerprinted under it (a commit
# since, without `prepare.sh --revision`). Markers from another revision do not count: its steps
# ran other code.
revision=$(head -n1 "$CARRIED/REVISION" 2>/dev/null || head -n1 "$LEASE/REVISION" 2>/dev/null || echo unknown)
fingerprint=$(sed -n 2p "$CARRIED/REVISION" 2>/dev/null || true)
if [[ -n $fingerprint && $(bash scripts/gpu-lease/fingerprint.sh) != "$fingerprint" ]]; then
  revision=$revision-changed
  mark "the code here is not REVISION's (fingerprint $fingerprint): run prepare.sh --revision after a commit"
fi
if [[ -f $LEASE/REVISION && $(cat "$LEASE/REVISION") != "$revision" ]]; then
  mark "revision $revision after $(cat "$LEASE/REVISION"): every step runs again"
  find "$LEASE/done" -type f ! -name install -delete
  find "$LEASE/failed" -type f -delete
fi
if [[ -f $LEASE/done/install ]] && ! cmp -s "$CARRIED/site.sha256" "$LEASE/site.sha256" 2>/dev/null \
    && [[ -f $CARRIED/site.sha256 ]]; then
  rm -f "$LEASE/done/install"  # another archive: installed again
fi
echo "$revision" > "$LEASE/REVISION"
SDEXPORT_GIT_REVISION=$revision; export SDEXPORT_GIT_REVISION
record call "revision $revision" 0 "budget $BUDGET s"
mark "lease: $revision; $MODEL ${SIZE}² $DTYPE, budget ${BUDGET}s; steps on cores ${PIN[2]:-all}"
step facts 5 30 facts
end_call_after facts
# (a failed install is tried again by the next call: the archive may have been carried anew)
step install 10 60 install_site || { rm -f "$LEASE/failed/install"; mark "nothing installed: the GPU paths cannot run"; finish 1; }
use_site
end_call_after install
# The export beside the GPU tests (the machine has 16 cores), so that no benchmark shares the
# machine with other work. They split the cores rather than each start 16 threads: the export is
# CPU work throughout; the tests mostly wait on the GPU. Two cores stay with the machine itself
# (what answers the device calls runs there too).
OMP_NUM_THREADS=10 step export 60 330 export_engines &
exporting=$!
OMP_NUM_THREADS=4 step gpu-tests 30 240 gpu_tests
wait "$exporting"
tail -5 "$LEASE/export.log" 2>/dev/null
end_call_after export
# Most important first (see the header). Without an export, only what needs none is measured: a
# runtime contender without --engine-dir would make the benchmark export on its own.
if [[ -e $LEASE/done/export ]]; then
  step bench-runtime 90 240 bench runtime diffusers,torch,onnxruntime-cuda
  end_call_after bench-runtime
  step bench-compile 120 300 bench compile diffusers,diffusers-compile,tensorrt
  end_call_after bench-compile
  step build-fused 200 400 build_fused
  end_call_after build-fused
  if [[ -e $LEASE/done/build-fused ]]; then
    step bench-fused 60 180 bench fused diffusers,onnxruntime-cuda-fused
  elif [[ ! -e $LEASE/done/bench-fused ]]; then
    record bench-fused skipped "$(left)" "no fused build"
  fi
  if [[ ${LEASE_COMPILE_MAX:-0} == 1 ]]; then
    step bench-compile-max 300 540 bench compile-max diffusers,torch-compile-max
  fi
else
  mark "no export: only the contenders that need none are measured"
  end_call_after bench-runtime  # (its place in the order: a call asked to end there ends before the rest)
  step bench-compile 120 300 bench compile diffusers,diffusers-compile
fi
mark "lease done: $(awk -F'\t' '{printf "%s: %s; ", $1, $2}' "$LEASE/steps.tsv")"
finish 0

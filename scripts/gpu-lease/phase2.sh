#!/usr/bin/env bash
# Lease call 2 of 2 — carry .lease/ort-b. Joins and installs onnxruntime-gpu, records the machine
# again (now with the CUDA provider), builds the fused graphs while the ONNX Runtime GPU tests run,
# benchmarks the ONNX Runtime contenders against the baseline, then (if time is left) the tuned
# torch.compile contender. Each step packs what it has: a call cut short still returns its results.
source "$(dirname "$0")/common.sh"
exec > >(tee "$OUT/phase2.log") 2>&1
mark "join and install onnxruntime-gpu"
[[ -d $ENGINES ]] || echo "no engine directory from call 1 (a fresh machine?): the benches will export again"
cp .lease/ort-b/part-* "$LEASE/" && cat "$LEASE"/part-* > /tmp/ort.tar.xz && sha256sum -c "$LEASE/ort.sha256" \
  && python3 -c 'import sys, tarfile; tarfile.open("/tmp/ort.tar.xz").extractall(sys.argv[1], filter="data")' "$SITE" \
  || echo "onnxruntime-gpu could not be installed: its contenders will be listed as unavailable"
use_site
python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())'
mark "fused build (background) + all GPU tests"
( timeout 300 python3 -m sdexport build "$ENGINES" --target onnxruntime-cuda > "$LEASE/build-ort.log" 2>&1
  echo "build rc $?" >> "$LEASE/build-ort.log" ) &
build_pid=$!
timeout 200 bash scripts/gpu-tests.sh --no-install --site "$SITE" --out "$LEASE/tests-phase2" -- -m "gpu and not slow" --continue-on-collection-errors
mark "gpu tests: rc $?"
pack
wait "$build_pid"; tail -15 "$LEASE/build-ort.log"
bench ort-contenders 300 --contenders diffusers,onnxruntime-cuda,onnxruntime-cuda-fused --warmup 1 --repeats 5
bench torch-compile-max 280 --contenders diffusers,torch-compile-max --warmup 1 --repeats 5
mark "phase 2 done"

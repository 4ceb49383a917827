#!/usr/bin/env bash
# Lease call 1 of 2 — carry .gpu/small (diffusers, polygraphy, pytest, ...) and .lease/ort-a (the
# first part of the packed onnxruntime-gpu, kept for call 2). Records the machine, runs the Torch
# GPU tests, exports SD 1.5 (fp16) once for both calls, and benchmarks the PyTorch contenders.
source "$(dirname "$0")/common.sh"
exec > >(tee "$OUT/phase1.log") 2>&1
mark "machine"
cp .lease/ort-a/part-* .lease/ort.sha256 "$LEASE/" || echo "ort-a not carried: call 2 cannot install onnxruntime-gpu"
nvidia-smi | tee "$LEASE/nvidia-smi.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,persistence_mode,compute_mode --format=csv | tee "$LEASE/nvidia-smi.csv"
python3 -m pip list 2>/dev/null > "$LEASE/pip-list-image.txt"
python3 -c 'import tensorrt' > "$LEASE/import-tensorrt.txt" 2>&1; echo "import tensorrt: rc $?" | tee -a "$LEASE/import-tensorrt.txt"
pack
mark "install the small wheels"
python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target "$SITE" .gpu/small/*.whl \
  || { echo "install failed"; pack; exit 1; }
use_site
mark "export SD 1.5 fp16 (background) + Torch GPU tests"
( timeout 400 python3 -m sdexport export sd15 -o "$ENGINES" --dtype fp16 --batch 1:1:4 --height 512 --width 512 \
    --verify quick --components text_encoder,unet,vae_decoder,vae_decoder_fp32 --force > "$LEASE/export-sd15.log" 2>&1
  echo "export rc $?" >> "$LEASE/export-sd15.log" ) &
export_pid=$!
timeout 240 bash scripts/gpu-tests.sh --no-install --site "$SITE" --out "$LEASE/tests-phase1" -- -m "gpu and not slow" --continue-on-collection-errors
mark "gpu tests: rc $?"
pack
wait "$export_pid"
tail -25 "$LEASE/export-sd15.log"
mark "export done"
pack
bench torch-contenders 330 --contenders diffusers,diffusers-compile,torch --warmup 1 --repeats 5
mark "phase 1 done"

#!/usr/bin/env bash
# Interop with optimum and ONNX Runtime's Stable Diffusion tools, both ways (README, "Interop").
#   bash scripts/interop-check.sh [WORK_DIR]       (default: a new temporary directory)
# Run it in sdexport's environment (scripts/setup.sh). optimum-onnx pins transformers < 4.58, so it
# gets a virtualenv of its own, built from scripts/interop/constraints.txt on first use and reused
# after (SDEXPORT_INTEROP_VENV, default ~/.cache/sdexport/interop-venv; delete it to rebuild). A
# folder there that it did not make is refused, never emptied.
# It exports the tiny presets (SD and SDXL, fp32 and fp16) with sdexport and checks that optimum's
# ORTDiffusionPipeline generates the image sdexport does from them and that ONNX Runtime's
# optimize_pipeline accepts them; then exports the same checkpoints with optimum, adopts them with
# `sdexport adopt --model` and checks that sdexport generates optimum's image. Exit status 0 when
# every check passes; the figures are in WORK_DIR/report.json. CPU only; a few minutes.
# SDEXPORT_INTEROP_CASES=sd-fp32,sdxl-fp16 checks those cases only, and SDEXPORT_INTEROP_OPTIMIZE=cpu,float16
# runs those of the optimizer's variants (cuda, float16, cpu): the default test run's choice.
set -euo pipefail
# WORK_DIR and SDEXPORT_INTEROP_VENV relative to where the script was called from (a .pth needs the latter absolute)
WORK=$(realpath -m -- "${1:-$(mktemp -d -t sdexport-interop.XXXXXX)}")
VENV=$(realpath -m -- "${SDEXPORT_INTEROP_VENV:-$HOME/.cache/sdexport/interop-venv}")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.constraints.sha256"  # written once the environment is complete
MARK="$VENV/.sdexport-interop"  # written first: proof that a half-built folder is this script's to remove
TORCH=${SDEXPORT_TORCH:-torch==2.13.0}

"$PYTHON" -c "import sdexport" 2>/dev/null || { echo "interop-check: run it where sdexport is installed (bash scripts/setup.sh)" >&2; exit 2; }
"$PYTHON" scripts/interop/check.py cases "$WORK"
# torch is the biggest part of the build (900 MB; README, "Interop", has the build's times):
# when sdexport's environment has the very version TORCH asks for, the optimum environment reads
# that copy through links in a folder of its own, named by a .pth file. Only torch's own folders are
# seen, not the rest of sdexport's environment. A pip in the optimum environment asked to replace
# torch finds its files outside that environment (the links resolve there) and leaves them: pip
# compares the paths as strings, so nothing is shared when sdexport's folder starts with this one's
# path. (Python may write torch's missing bytecode there, as sdexport's own imports would.)
# Another torch version is installed as before.
shared=$("$PYTHON" scripts/interop/shared_torch.py "$TORCH")  # version, folder, its entries; or nothing
if [[ -n $shared ]]; then
  IFS=$'\t' read -r _ site entries <<< "$shared"
  if [[ "$(realpath -m "$site")" == "$VENV"* ]]; then shared=""; fi
fi
want="$(sha256sum scripts/interop/constraints.txt | cut -d' ' -f1) ${shared:-own $TORCH}"
if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "$want" ]]; then
  if [[ -e $VENV && ! -e $STAMP && ! -e $MARK && -n "$(ls -A "$VENV" 2>/dev/null || echo unreadable)" ]]; then
    echo "interop-check: $VENV holds files this script did not make; it removes only its own environment" \
         "there: delete the folder yourself, or set SDEXPORT_INTEROP_VENV to another" >&2
    exit 2
  fi
  echo "interop-check: building the optimum environment in $VENV" >&2
  rm -rf "$VENV"  # links inside it are removed, never what they point to
  mkdir -p "$VENV"
  : > "$MARK"  # before the environment: a venv cut short (or failing: no ensurepip) is still this script's
  "$PYTHON" -m venv "$VENV"
  # --no-compile: no bytecode for the thousands of modules never imported (half the build's time);
  # Python writes it for those the check imports, on first use
  pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile "$@"; }
  if [[ -n $shared ]]; then
    echo "interop-check: reading torch from $site (SDEXPORT_TORCH=$TORCH is installed there)" >&2
    mkdir "$VENV/shared-torch"
    for entry in ${entries//,/ }; do ln -s "$site/$entry" "$VENV/shared-torch/$entry"; done
    "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' |
      { read -r purelib; echo "$VENV/shared-torch" > "$purelib/sdexport-shared-torch.pth"; }
  else
    pip_install "$TORCH"
  fi
  # TORCH again: a no-op for the torch installed or shared above, and what brings a shared torch's
  # own dependencies
  pip_install --constraint scripts/interop/constraints.txt "$TORCH" optimum-onnx diffusers transformers onnxruntime "huggingface_hub<1.0"
  echo "$want" > "$STAMP"
fi
echo "interop-check: working in $WORK" >&2
"$PYTHON" scripts/interop/check.py prepare "$WORK"
# The bytecode of what the check imports is written on first use, also where
# PYTHONDONTWRITEBYTECODE is set, as in many CI images: otherwise every check compiled optimum's,
# diffusers' and transformers' sources again (12 s of the 50 s stage on 2 cores). It goes into this
# environment, and, for a shared torch installed without its bytecode, beside torch (see above).
env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" scripts/interop/check.py optimum "$WORK"
"$PYTHON" scripts/interop/check.py adopt "$WORK"

#!/usr/bin/env bash
# Prepare the GPU lease's one device call, here (with network), from the repository root:
#
#   bash scripts/gpu-lease/prepare.sh              (minutes: downloads, then xz at its strongest)
#   bash scripts/gpu-lease/prepare.sh --revision   (seconds: only .lease/REVISION, after a new commit)
#
# Downloads onnxruntime-gpu and the wheels scripts/gpu-wheels.txt names for the GPU image (Python
# 3.12, CUDA 13) with the workplace's ../shared/gpu/prepare-wheels.sh, checks them, packs them into
# .lease/site.tar.xz with pack-site.py (which fails when the archive and the working tree would not
# fit one call), and writes the commit the call will run into .lease/REVISION (the tree travels
# without .git). Then the device calls, as lease.sh's header gives them (three, one right after
# another). Commit first: REVISION names HEAD, and "-dirty" when the tree has changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
revision() {
  mkdir -p .lease
  # the full commit, "-dirty" when files differ from it, untracked ones too (the reports name what
  # they measured); then the code's fingerprint, which lease.sh checks the tree it runs against
  local dirty=""
  git diff --quiet HEAD -- && [[ -z $(git status --porcelain --untracked-files=normal) ]] || dirty=-dirty
  printf '%s\n%s\n' "$(git rev-parse HEAD)$dirty" "$(bash scripts/gpu-lease/fingerprint.sh)" > .lease/REVISION
  echo "REVISION $(head -n1 .lease/REVISION) (code $(sed -n 2p .lease/REVISION))"
}
if [[ ${1:-} == --revision ]]; then
  revision
  python3 scripts/gpu-lease/pack-site.py --check-fit .lease/site.tar.xz   # the tree may have grown
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "usage: bash scripts/gpu-lease/prepare.sh [--revision]" >&2; exit 2
fi
for ignored in /.gpu/ /.lease/; do
  git check-ignore -q "${ignored#/}x" 2>/dev/null || echo "$ignored" >> "$(git rev-parse --git-path info/exclude)"
done
# again when the wheel list changed since the last download (pack-site.py takes the listed versions)
if [[ ! -f .gpu/ort.sha256 || ! -f .gpu/small/SHA256SUMS || scripts/gpu-wheels.txt -nt .gpu/small/SHA256SUMS ]]; then
  [[ -f ../shared/gpu/prepare-wheels.sh ]] \
    || { echo "prepare.sh: no ../shared/gpu/prepare-wheels.sh (the workplace's download script) to fill .gpu/" >&2; exit 2; }
  SMALL="$(grep -v '^#' scripts/gpu-wheels.txt | xargs)" bash ../shared/gpu/prepare-wheels.sh .gpu
fi
ort=/tmp/$(cat .gpu/ort.name)
trap 'rm -f "$ort"' EXIT  # (the joined wheel, 244 MiB, also where a check below stops the script)
cat .gpu/ort-*/part-* > "$ort"
sha256sum --quiet -c .gpu/ort.sha256   # names the joined wheel under /tmp
python3 scripts/gpu-lease/pack-site.py --ort "$ort" --small .gpu/small --out .lease
revision
echo "now: the three device calls in scripts/gpu-lease/lease.sh's header, one right after another"

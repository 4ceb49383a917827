#!/usr/bin/env bash
# A benchmark regression gate for CI: run a scenario, compare it with the committed baseline, and
# leave everything a CI system shows in one folder.
#
#   bash ci/bench-gate.sh SCENARIO BASELINE OUT
#
#   SCENARIO  a scenario file, e.g. benchmarks/scenarios/sd15-512-b1.toml
#   BASELINE  the committed results.json of that scenario on this runner's GPU; while there is none,
#             the run is reported and not gated: commit OUT/bench/results.json there to start
#   OUT       gets bench/ (results.json, .md, .png), compare/ (comparison.json, .md, and .xml: JUnit)
#             and summary.md (the Markdown for the merge-request comment)
#
# Environment:
#   PYTHON                 the Python sdexport is installed in (default: .venv-bench/bin/python if
#                          ci/install.sh made it, else python3)
#   SDEXPORT_ENGINE_CACHE  where exports are kept between runs, one folder per engine cache key
#                          (default ~/.cache/sdexport/engines); TensorRT plans are built inside them
#   SDEXPORT_MAX_SLOWDOWN  the gate: fail a case this much slower and beyond the noise (default 5%)
#   SDEXPORT_MIN_PSNR      optional: fail a contender whose image agrees less (dB) with diffusers'
#   SDEXPORT_BENCH_ARGS    more arguments for `sdexport bench`, e.g. "--repeats 10"
#
# Exit status: 0 passed (or no baseline yet), 1 a regression, 2 the runs could not be compared,
# 3 the benchmark itself failed.
set -euo pipefail
if [[ $# -ne 3 ]]; then
  echo "usage: $0 SCENARIO BASELINE OUT" >&2
  exit 2
fi
scenario=$1 baseline=$2 out=$3
root=$(cd "$(dirname "$0")/.." && pwd)
default_python=python3
[[ -x $root/.venv-bench/bin/python ]] && default_python=$root/.venv-bench/bin/python
PYTHON=${PYTHON:-$default_python}
cache=${SDEXPORT_ENGINE_CACHE:-$HOME/.cache/sdexport/engines}
marker="<!-- sdexport bench compare -->"
mkdir -p "$out"
rm -f "$out/summary.md"

extra=()
read -ra extra <<< "${SDEXPORT_BENCH_ARGS:-}"
if ! "$PYTHON" -m sdexport bench "$scenario" -o "$out/bench" --engine-cache "$cache" ${extra[@]+"${extra[@]}"}; then
  printf '%s\n## sdexport bench: %s did not run\n\nThe benchmark failed; its log is in the job output.\n' \
    "$marker" "$scenario" > "$out/summary.md"
  exit 3
fi

if [[ ! -f $baseline ]]; then
  {
    printf '%s\n## sdexport bench: no baseline yet for %s\n\n' "$marker" "$scenario"
    echo "Nothing was gated. To gate later changes, commit this run as the baseline: copy \`bench/results.json\`"
    echo "from the artifacts of this job to \`$baseline\`."
    echo
    cat "$out/bench/results.md"
  } > "$out/summary.md"
  echo "sdexport bench: no baseline at $baseline; commit $out/bench/results.json there to start gating" >&2
  exit 0
fi

gate=(--max-slowdown "${SDEXPORT_MAX_SLOWDOWN:-5%}")
if [[ -n ${SDEXPORT_MIN_PSNR:-} ]]; then
  gate+=(--min-psnr "$SDEXPORT_MIN_PSNR")
fi
status=0
"$PYTHON" -m sdexport bench compare "$baseline" "$out/bench" -o "$out/compare" "${gate[@]}" || status=$?
if [[ -f $out/compare/comparison.md && $status -le 1 ]]; then
  cp "$out/compare/comparison.md" "$out/summary.md"
else
  printf '%s\n## sdexport bench: %s could not be compared with %s\n\nSee the job log for the reason.\n' \
    "$marker" "$scenario" "$baseline" > "$out/summary.md"
fi
exit "$status"

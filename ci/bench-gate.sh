#!/usr/bin/env bash
# A benchmark regression gate for CI: run a scenario, compare it with the committed baseline, and
# leave everything a CI system shows in one folder.
#
#   bash ci/bench-gate.sh SCENARIO BASELINE OUT
#
#   SCENARIO  a scenario file, e.g. benchmarks/scenarios/sd15-512-b1.toml
#   BASELINE  the committed results.json of that scenario on this runner's GPU; while there is none,
#             the run is reported and not gated: commit OUT/bench/results.json there to start
#             (SDEXPORT_REQUIRE_BASELINE=1 fails instead, once a baseline should exist)
#   OUT       gets bench/ (results.json, .md, .png), compare/ (comparison.json, .md, and .xml: JUnit)
#             and summary.md (the Markdown for the merge-request comment)
#
# Environment:
#   PYTHON                 the Python sdexport is installed in (default: the virtualenv ci/install.sh
#                          made, SDEXPORT_VENV or .venv-bench, else python3)
#   SDEXPORT_ENGINE_CACHE  where exports are kept between runs, one folder per engine cache key
#                          (default ~/.cache/sdexport/engines); TensorRT plans are built inside them
#   SDEXPORT_MAX_SLOWDOWN  the gate: fail a case this much slower and beyond the noise (default 5%)
#   SDEXPORT_MIN_PSNR      optional: fail a contender whose image agrees less (dB) with diffusers'
#   SDEXPORT_RELATIVE_TO   optional: judge each contender's time as a ratio to this one's in the same
#                          run (e.g. diffusers), so that drift of a shared runner between the runs cancels
#   SDEXPORT_BENCH_ARGS    more arguments for `sdexport bench`, e.g. "--repeats 10"
#
# Exit status: 0 passed (or no baseline yet), 1 a regression, 2 the runs could not be compared,
# 3 the benchmark itself failed, or was interrupted (summary.md then shows what it measured).
set -Eeuo pipefail
if [[ $# -ne 3 ]]; then
  echo "usage: $0 SCENARIO BASELINE OUT" >&2
  exit 2
fi
scenario=$1 baseline=$2 out=$3
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${SDEXPORT_VENV:-.venv-bench}
[[ $venv == /* ]] || venv=$root/$venv
default_python=python3
[[ -x $venv/bin/python ]] && default_python=$venv/bin/python
PYTHON=${PYTHON:-$default_python}
# The checkout's sdexport is what is measured, even where the environment holds an installed one
# (the wheel folder of an air-gapped install brings its own).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
marker="<!-- sdexport bench compare -->"
# Every summary starts with the marker (what proves it this gate's) and then names its scenario and
# baseline: the merge-request comment bots update the comment that starts with both lines, so the
# gates of two scenarios (or of one on two runners' baselines) keep a comment each rather than
# overwrite one.
header="$marker"$'\n'"<!-- sdexport bench scenario: $scenario, baseline: $baseline -->"

refuse() {
  echo "sdexport bench gate: $1" >&2
  exit 2
}
# Exit 1 means a regression: a command of this script that fails unexpectedly says where, and exits 2.
trap 'echo "sdexport bench gate: failed at line $LINENO of $0" >&2; exit 2' ERR
[[ -n ${SDEXPORT_ENGINE_CACHE:-} || -n ${HOME:-} ]] || refuse "neither SDEXPORT_ENGINE_CACHE nor HOME is set: name the engine cache"
cache=${SDEXPORT_ENGINE_CACHE:-$HOME/.cache/sdexport/engines}
case ${SDEXPORT_REQUIRE_BASELINE:-0} in
  1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) require_baseline=1 ;;
  0 | [Ff]alse | FALSE | [Nn]o | NO | [Oo]ff | OFF | "") require_baseline=0 ;;
  *) refuse "SDEXPORT_REQUIRE_BASELINE=$SDEXPORT_REQUIRE_BASELINE: use 1, true, yes or on; or 0, false, no, off or nothing" ;;
esac
if [[ -L $baseline && ! -e $baseline ]]; then
  refuse "$baseline is a link to nothing ($(readlink -- "$baseline")): a moved baseline would leave the runs ungated"
fi
# The folders below are replaced: a baseline inside them would be deleted, then the run compared with itself.
for replaced in "$out/bench" "$out/compare"; do
  inside=$(realpath -m -- "$replaced")
  case $(realpath -m -- "$baseline") in
    "$inside" | "$inside"/*) refuse "$baseline lies in $replaced, which this run replaces: copy it out of $out first" ;;
  esac
done

# Results of an earlier run in OUT go first, so nothing stale is uploaded or reported; only what
# this script's commands wrote is removed, proved as `sdexport bench` and `bench compare` prove
# their outputs before replacing them (their reports, nothing else), and anything else stops it
# (checked before any is removed). An empty folder is removed too.
ours() {
  local dir=$1 kind=$2 why
  [[ -e $dir || -L $dir ]] || return 0
  if [[ ! -L $dir && -d $dir && -z $(ls -A -- "$dir") ]]; then return 0; fi
  why=$("$PYTHON" -c 'import sys
from pathlib import Path
from sdexport.bench.compare import not_a_comparison_output
from sdexport.bench.report import not_a_bench_output
path = Path(sys.argv[2])
reason = ("not a folder" if path.is_symlink() or not path.is_dir()
          else {"bench": not_a_bench_output, "compare": not_a_comparison_output}[sys.argv[1]](path))
sys.exit(reason)' "$kind" "$dir" 2>&1) || refuse "$dir is not a $kind output this gate wrote (${why##*$'\n'}); choose another OUT"
}
summary=$out/summary.md
if [[ -e $summary || -L $summary ]] &&
  [[ -L $summary || ! -f $summary || $(head -n 1 "$summary" | tr -d '\0') != "$marker" ]]; then
  refuse "$summary was not written by this gate (not a file that starts with $marker); choose another OUT"
fi
ours "$out/bench" bench
ours "$out/compare" compare
mkdir -p -- "$out" 2>/dev/null || refuse "$out: cannot make the folder (a file is there, or no permission); choose another OUT"
rm -rf "$out/bench" "$out/compare"
rm -f "$summary"

# Bad input is refused before the benchmark (it takes the whole job), with a summary that says so.
refuse_reported() {
  printf '%s\n## sdexport bench: %s did not run\n\n%s\n' "$header" "$scenario" "$1" > "$summary"
  refuse "$1"
}
[[ -f $scenario ]] || refuse_reported "$scenario: no such scenario file (see benchmarks/scenarios/)"
extra=()
read -ra extra <<< "${SDEXPORT_BENCH_ARGS:-}"
# The settings, and against the run they will judge (its contenders, the baseline's): exit 10 is a
# refusal; anything else is an environment sdexport cannot run in, which is the benchmark's failure.
checked=0
problem=$("$PYTHON" -c 'import sys
from pathlib import Path
from sdexport.bench.compare import check_gate_fits_run, parse_gate
from sdexport.errors import SdexportError
names = ("SDEXPORT_MAX_SLOWDOWN", "SDEXPORT_MIN_PSNR", "SDEXPORT_RELATIVE_TO")
try:
    gate = parse_gate(sys.argv[1], sys.argv[2] or None, relative_to=sys.argv[3] or None, names=names)
    check_gate_fits_run(gate, Path(sys.argv[4]), sys.argv[6:], Path(sys.argv[5]), names=names)
except SdexportError as exc:
    print(exc)
    sys.exit(10)' "${SDEXPORT_MAX_SLOWDOWN:-5%}" "${SDEXPORT_MIN_PSNR:-}" "${SDEXPORT_RELATIVE_TO:-}" "$scenario" \
  "$baseline" ${extra[@]+"${extra[@]}"} 2>&1) || checked=$?
problem=${problem##*$'\n'}  # the last line: the refusal, or a broken environment's error
if [[ $checked == 10 ]]; then
  refuse_reported "$problem"
elif [[ $checked != 0 ]]; then
  printf '%s\n## sdexport bench: %s did not run\n\nsdexport cannot run with %s: %s\n' "$header" "$scenario" \
    "$PYTHON" "${problem:-status $checked}" > "$summary"
  echo "sdexport bench gate: sdexport cannot run with $PYTHON: ${problem:-status $checked}" >&2
  exit 3
fi
if [[ ! -e $baseline && $require_baseline == 1 ]]; then
  printf '%s\n## sdexport bench: no baseline at %s\n\nSDEXPORT_REQUIRE_BASELINE=%s and the baseline is missing.\n' \
    "$header" "$baseline" "$SDEXPORT_REQUIRE_BASELINE" > "$summary"
  refuse "no baseline at $baseline (SDEXPORT_REQUIRE_BASELINE=$SDEXPORT_REQUIRE_BASELINE)"
fi

for arg in ${extra[@]+"${extra[@]}"}; do  # the gate's own: elsewhere, the run would be gated as missing
  case $arg in
    -o*|-[!-]*o*|--output|--output=*|--engine-cache|--engine-cache=*)  # (-qo DIR: bundled short flags)
      refuse_reported "SDEXPORT_BENCH_ARGS: $arg is the gate's own (it benchmarks into OUT/bench, with --engine-cache from SDEXPORT_ENGINE_CACHE)" ;;
    -h|--help|--version)
      refuse_reported "SDEXPORT_BENCH_ARGS: $arg prints and benchmarks nothing" ;;
  esac
done
# A CI timeout or a cancelled job signals this script (GitHub Actions: SIGINT, then SIGTERM 7.5 s
# later, then SIGKILL 2.5 s after that, to the step's own process: run the gate with `exec`), or the
# whole job. The benchmark runs in the background so that a trapped signal is acted on at once:
# it is passed on as SIGTERM (a background command starts with SIGINT ignored), the benchmark
# writes the report of what it measured, marked as interrupted, and the summary shows it.
stopped="" bench=""
# shellcheck disable=SC2329  # called by the traps below
stop() {
  stopped=$1
  if [[ -n $bench ]]; then kill -TERM "$bench" 2>/dev/null || true; fi
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
"$PYTHON" -m sdexport bench "$scenario" -o "$out/bench" --engine-cache "$cache" ${extra[@]+"${extra[@]}"} &
bench=$!
if [[ -n $stopped ]]; then kill -TERM "$bench" 2>/dev/null || true; fi  # signalled before it had started
# wait returns early when a trapped signal comes, and the benchmark is then still writing; bash keeps
# a finished background command's status for the last wait
while kill -0 "$bench" 2>/dev/null; do wait "$bench" || true; done
rc=0
wait "$bench" || rc=$?
# From here on a signal is only noted: what is left (the summary, a comparison) takes seconds.
trap 'stopped=SIGTERM' TERM
trap 'stopped=SIGINT' INT
if [[ $rc != 0 ]]; then
  if [[ -f $out/bench/results.md ]]; then  # this run's report (an earlier one's was cleared above)
    state=$("$PYTHON" -c 'import json, sys
try:
    print("interrupted" if json.load(open(sys.argv[1])).get("interrupted") else "whole")
except Exception:
    print("unknown")' "$out/bench/results.json" 2>/dev/null) || state=unknown
    {
      printf '%s\n## sdexport bench: %s did not finish\n\n' "$header" "$scenario"
      case $state in
        interrupted)
          echo "The benchmark was interrupted${stopped:+ ($stopped)}, so nothing was gated. What it measured before"
          echo "that:" ;;
        whole)
          echo "The benchmark wrote its whole report, then ended with status $rc${stopped:+ ($stopped)}, so nothing"
          echo "was gated. Its report:" ;;
        *)
          echo "The benchmark ended with status $rc${stopped:+ ($stopped)}, so nothing was gated; whether its report"
          echo "is whole could not be read. The report:" ;;
      esac
      echo
      cat "$out/bench/results.md"
    } > "$out/summary.md"
  elif [[ $rc == 2 && -z $stopped ]]; then  # sdexport's one-line refusal, before it measured anything
    printf '%s\n## sdexport bench: %s did not run\n\nThe benchmark refused to run: its scenario or SDEXPORT_BENCH_ARGS, or no contender could run on this runner; its one-line reason is in the job output.\n' \
      "$header" "$scenario" > "$out/summary.md"
  elif [[ -n $stopped || $rc == 130 ]]; then
    printf '%s\n## sdexport bench: %s did not finish\n\nThe benchmark was interrupted%s and wrote no report (nothing was measured yet, or it was killed before it could write).\n' \
      "$header" "$scenario" "${stopped:+ ($stopped)}" > "$out/summary.md"
  else
    printf '%s\n## sdexport bench: %s did not run\n\nThe benchmark failed; its log is in the job output.\n' \
      "$header" "$scenario" > "$out/summary.md"
  fi
  exit 3
fi

if [[ ! -e $baseline ]]; then
  {
    printf '%s\n## sdexport bench: no baseline yet for %s\n\n' "$header" "$scenario"
    echo "Nothing was gated. To gate later changes, commit this run as the baseline: copy \`bench/results.json\`"
    echo "from the artifacts of this job to \`$baseline\`."
    echo
    cat "$out/bench/results.md"
  } > "$out/summary.md"
  echo "sdexport bench: no baseline at $baseline; commit $out/bench/results.json there to start gating" >&2
  exit 0
fi

# checked at the start; a case with too few repeats to judge fails (a change to the scenario's or
# SDEXPORT_BENCH_ARGS' repeats must not pass what it cannot judge)
gate=(--max-slowdown "${SDEXPORT_MAX_SLOWDOWN:-5%}" --fail-unjudged)
if [[ -n ${SDEXPORT_MIN_PSNR:-} ]]; then
  gate+=(--min-psnr "$SDEXPORT_MIN_PSNR")
fi
if [[ -n ${SDEXPORT_RELATIVE_TO:-} ]]; then
  gate+=(--relative-to "$SDEXPORT_RELATIVE_TO")
fi
status=0
said=$(mktemp)  # compare's stderr: its one-line reason goes in the summary too
"$PYTHON" -m sdexport bench compare "$baseline" "$out/bench" -o "$out/compare" "${gate[@]}" 2> "$said" || status=$?
cat "$said" >&2
reason=$(grep -v '^[[:space:]]*$' "$said" | tail -n 1 || true)
rm -f "$said"
# 1 is a regression only when the comparison was written (every sdexport command exits 1 when the
# filesystem refuses, too); anything else that is not 0 means the runs could not be compared.
if [[ $status -le 1 && -f $out/compare/comparison.md ]]; then
  { printf '%s\n' "$header"; tail -n +2 "$out/compare/comparison.md"; } > "$out/summary.md"
else
  status=2
  printf '%s\n## sdexport bench: %s could not be compared with %s\n\n%s\n' \
    "$header" "$scenario" "$baseline" "${reason:-See the job log for the reason.}" > "$out/summary.md"
fi
if [[ -n $stopped ]]; then  # signalled once the benchmark had finished: said, with whatever came of it
  printf '\n_The job was signalled (%s) while the summary was being made._\n' "$stopped" >> "$out/summary.md"
  echo "sdexport bench gate: signalled ($stopped) after the benchmark had finished" >&2
fi
exit "$status"

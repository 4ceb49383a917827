#!/usr/bin/env bash
# What a lease call runs, as one short hash: every .py, .sh and .toml file under sdexport/,
# scripts/, tests/ (the GPU tests) and benchmarks/scenarios/, and pyproject.toml (tracked or not;
# __pycache__ holds none of them), in byte order of their paths. prepare.sh writes it under the
# commit in .lease/REVISION; lease.sh computes it again on the device, where the tree arrives
# without .git, and marks a revision whose files differ from that commit's, so no report names a
# commit it did not run (a commit made after prepare.sh, without its --revision).
set -euo pipefail
cd "$(dirname "$0")/../.."
{ find sdexport scripts tests benchmarks/scenarios -type f \( -name '*.py' -o -name '*.sh' -o -name '*.toml' \) -print0
  printf 'pyproject.toml\0'; } | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16

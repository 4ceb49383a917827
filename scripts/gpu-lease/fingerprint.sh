#!/usr/bin/env bash
# The code a lease call runs, as one short hash: every .py and .sh file under sdexport/ and
# scripts/ (tracked or not; __pycache__ holds neither), in byte order of their paths. prepare.sh
# writes it under the commit in .lease/REVISION; lease.sh computes it again on the device, where
# the tree arrives without .git, and marks a revision whose files differ from that commit's, so no
# report names a commit it did not run (a commit made after prepare.sh, without its --revision).
set -euo pipefail
cd "$(dirname "$0")/../.."
find sdexport scripts -type f \( -name '*.py' -o -name '*.sh' \) -print0 | LC_ALL=C sort -z \
  | xargs -0 sha256sum | sha256sum | cut -c1-16

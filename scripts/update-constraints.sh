#!/usr/bin/env bash
# Move the dependency pins forward, on purpose: install the newest releases pyproject.toml allows
# into a brand-new virtualenv, run the default tests there, and rewrite constraints.txt only if
# they pass. Review the diff (and the upstream changelogs it names) and commit it on its own.
#   bash scripts/update-constraints.sh [extra pytest arguments]
# torch is not in constraints.txt: move it with SDEXPORT_TORCH's default in scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
echo "update-constraints: installing the newest allowed releases into $work/venv" >&2
SDEXPORT_CONSTRAINTS='' PYTHON="$py" bash scripts/setup.sh --dev
echo "update-constraints: running the tests against them" >&2
"$py" -m pytest -q "$@"
{
  echo "# The tested dependency set: scripts/setup.sh (and so CI) installs exactly these versions."
  echo "# Written by scripts/update-constraints.sh on $(date -u +%Y-%m-%d) with Python $("$py" -c 'import platform; print(platform.python_version())');"
  echo "# regenerate it with that script to move the pins (README, \"Dependency pins\"). torch is pinned"
  echo "# separately (SDEXPORT_TORCH in scripts/setup.sh) and an installed torch is never replaced."
  "$py" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|sdexport)==' | LC_ALL=C sort -f
  # The gpu extra cannot be installed here: its pins are carried over as they are, with their comment.
  sed -n '/^# GPU machines only/,$p' constraints.txt
} > constraints.txt.new
mv constraints.txt.new constraints.txt
# The GPU image's wheel list follows the same pins (tests/test_pins.py checks it).
python3 - <<'PY'
from pathlib import Path
pins = {}
for line in Path("constraints.txt").read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        name, _, version = line.partition("==")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
path = Path("scripts/gpu-wheels.txt")
lines = []
for line in path.read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        name = line.partition("==")[0].strip()
        line = f"{name}=={pins.get(name.lower().replace('_', '-'), line.partition('==')[2])}"
    lines.append(line)
path.write_text("\n".join(lines) + "\n")
PY
git --no-pager diff --stat -- constraints.txt scripts/gpu-wheels.txt || true
echo "update-constraints: constraints.txt rewritten; review and commit it" >&2

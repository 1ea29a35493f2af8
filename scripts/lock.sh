#!/usr/bin/env bash
# Writes requirements-lock.txt from .venv: every installed package at its exact version (build labels such as torch's
# +cpu dropped, since setup.sh picks the build). Run it only on a set the suite has just passed on:
#   bash scripts/setup.sh --test --latest && .venv/bin/python -m pytest && bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-lock.txt
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('pyreft'); m.version('pytest')" 2>/dev/null; then
  echo "lock.sh: .venv lacks the test peers; set it up with: bash scripts/setup.sh --test --latest" >&2
  exit 1
fi
python_version=$(.venv/bin/python -c "import platform; print(platform.python_version())")
{
  echo "# Exact versions the test suite passed on ($(uname -s) $(uname -m), Python $python_version, $(date +%F)),"
  echo "# written by scripts/lock.sh from .venv; scripts/setup.sh installs these unless given --latest."
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | awk '
    /^#/ { next }
    !/^[A-Za-z0-9._-]+==[^ ]+$/ { print "lock.sh: cannot lock the line: " $0 > "/dev/stderr"; bad = 1; next }
    { split($0, part, "=="); name = tolower(part[1]); gsub(/[-_.]+/, "-", name); sub(/\+.*/, "", part[2])
      print name "==" part[2] }
    END { exit bad }' | LC_ALL=C sort -t '=' -k1,1
} > "$LOCK.new"
mv "$LOCK.new" "$LOCK"
echo "lock.sh: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"

#!/usr/bin/env bash
# The README's test command: set up .venv, then run pytest (default: not slow, not gpu).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the long tests.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then  # pytest: no test selected (e.g. `-m gpu` on a machine without one)
    echo "pytest selected no tests for: ${*:-the default run}" >&2
    exit 0
fi
exit "$status"

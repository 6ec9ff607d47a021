#!/usr/bin/env bash
# The README's test command: set up .venv, then run pytest (default: not slow, not gpu) on two workers
# (pytest-xdist; TEST_WORKERS=N changes it, 0 runs in this process). Extra arguments go to pytest, e.g.
# `scripts/test.sh -m slow` for the long tests.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# the packaged real model, prepared once per machine, before the workers would race to do it
.venv/bin/python -c "from models import packaged; packaged.prepare()" || exit 1
.venv/bin/python -m pytest --numprocesses "${TEST_WORKERS:-2}" --dist loadscope "$@"
status=$?
if [ "$status" -eq 5 ]; then  # pytest: no test selected (e.g. `-m gpu` on a machine without one)
    echo "pytest selected no tests for: ${*:-the default run}" >&2
    exit 0
fi
exit "$status"

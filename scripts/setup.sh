#!/usr/bin/env bash
# Create or reuse the repo's virtual environment (.venv) and install the project with the extras the tests use.
# torch's CPU build goes first: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.gemma-deploy-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[export,serve,ray,test]"
    touch "$stamp"
fi

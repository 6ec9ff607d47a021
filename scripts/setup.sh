#!/usr/bin/env bash
# Create or reuse the repo's virtual environment (.venv) and install the project with the extras the tests use.
# torch's CPU build goes first: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
# Debian's chromium is the browser of the chat page's test (Playwright drives it; `playwright install` would
# download a browser build of its own, which a machine here cannot fetch).
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
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    # not fatal: without it the browser test skips and says why
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
        || echo "setup: could not install chromium (the chat page's browser test will skip)" >&2
fi

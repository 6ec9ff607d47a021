#!/usr/bin/env bash
# A Triton Inference Server for this machine, in .venv-triton: the nvidia-pytriton wheel's tritonserver (Triton 2.51,
# Python backend only), tritonclient, and gemma-deploy's runtime for the model's stub process. numpy < 2: the stub
# breaks BYTES tensors with numpy 2 (docs/deployment.md). The Python backend's library, its utilities and the stub
# for this Python go into .venv-triton/backends/python, the --backend-directory to start tritonserver with.
# Prints the venv's path. Idempotent: a stamp newer than pyproject.toml skips the installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRITON_VENV:-.venv-triton}
PYTHON=${PYTHON:-python3}
stamp=$VENV/.gemma-deploy-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "nvidia-pytriton==0.7.0" "tritonclient[http,grpc]>=2.50" "numpy>=1.26,<2" -e .
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    version=$("$VENV/bin/python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    server="$site/pytriton/tritonserver"
    mkdir -p "$VENV/backends/python"
    cp "$server/backends/python/libtriton_python.so" "$server/backends/python/triton_python_backend_utils.py" \
        "$server/python_backend_stubs/$version/triton_python_backend_stub" "$VENV/backends/python/"
    touch "$stamp"
fi
cd "$VENV" && pwd

#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-server and llama-perplexity from the source vendored in the
# llama-cpp-python sdist on PyPI (no other way to its source here), for side-by-side measurements on
# the same GGUF file (scripts/bench_speed.py, bench_accuracy.py, bench_serve.py --llama-cpp). About 20 minutes on
# 2 cores; run it alone. Usage: scripts/build_llama_cpp.sh [DIR]
# The binaries land in DIR/bin (default ~/.cache/gemma-deploy/llama.cpp/bin).
set -euo pipefail
DIR=${1:-$HOME/.cache/gemma-deploy/llama.cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$DIR"
# ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on the AMX machines here, and -march=native
# turns them on: there, build for the CPU's vector extensions with AMX left out.
isa="-DGGML_NATIVE=ON"
if grep -q amx_int8 /proc/cpuinfo; then
    isa="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON"
    isa="$isa -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
fi
# a build made with other flags (an earlier AMX build) is made again
[ "$(cat "$DIR/bin/FLAGS" 2>/dev/null)" = "$VERSION $isa" ] || rm -rf "$DIR/bin"
if [ ! -x "$DIR/bin/llama-bench" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION"
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        $isa -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
    cmake --build "$tmp/build" -j"$(nproc)" --target llama-bench llama-server llama-perplexity >/dev/null
    mkdir -p "$DIR/bin"
    cp "$tmp"/build/bin/llama-bench "$tmp"/build/bin/llama-server "$tmp"/build/bin/llama-perplexity "$DIR/bin/"
    echo "$VERSION $isa" > "$DIR/bin/FLAGS"
    rm -rf "$tmp"
fi
echo "$DIR/bin"
# Examples (2 threads, the packaged model's GGUF):
#   $DIR/bin/llama-bench -m gemma-3-270m-q4_k_m.gguf -t 2 -p 128 -n 64 -r 3
#   $DIR/bin/llama-server -m gemma-3-270m-q4_k_m.gguf -t 2 -np 8 -c 8192 --host 127.0.0.1 --port 8080

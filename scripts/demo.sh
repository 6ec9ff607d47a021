#!/usr/bin/env bash
# The README's main job: export the packaged real Gemma 3 270M (verified against PyTorch) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ARTIFACT=${ARTIFACT:-artifacts/gemma3-270m}
PROMPT=${PROMPT:-The capital of France is}
if [ ! -f "$ARTIFACT/manifest.json" ]; then
    .venv/bin/gemma-export --model gemma3-270m --output "$ARTIFACT" --logits last
fi
echo "$PROMPT" | .venv/bin/gemma-run generate "$ARTIFACT" --max-new-tokens 40 --stream

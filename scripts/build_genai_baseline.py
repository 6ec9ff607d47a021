"""Build onnxruntime-genai's own ONNX model of the packaged Gemma 3 270M: the peer our artifacts are measured
against (scripts/bench_accuracy.py --genai, scripts/bench_speed.py --genai).

    python scripts/build_genai_baseline.py --precision int4      # -> ~/.cache/gemma-deploy/genai-int4

The builder (onnxruntime_genai.models.builder, 0.18) reads the Hugging Face folder that models/packaged.py
prepares. It predates transformers 5's nested `rope_parameters`: the builder runs in this process with
AutoConfig's result flattened back to `rope_theta` / `rope_local_base_freq`.
"""

from __future__ import annotations

import argparse
import logging
import runpy
import shutil
import sys
from pathlib import Path

log = logging.getLogger("build_genai_baseline")


def _flatten_gemma3_rope() -> None:
    """transformers 5 nests Gemma 3's RoPE per layer type (rope_parameters.full_attention / .sliding_attention)
    and drops the legacy keys; the 0.18 builder reads rope_parameters["rope_type"], rope_theta and
    rope_local_base_freq. Put them back on every config AutoConfig returns in this process."""
    import transformers

    original = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = original(*args, **kwargs)
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and "full_attention" in rope:
            config.rope_theta = rope["full_attention"]["rope_theta"]
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(rope["full_attention"])
        return config

    transformers.AutoConfig.from_pretrained = from_pretrained


def main() -> int:
    from models.packaged import cache_dir, prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["int4", "fp32"], default="int4")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output or cache_dir() / f"genai-{args.precision}"
    if (output / "genai_config.json").is_file():
        log.info("already built: %s", output)
        print(output)
        return 0
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    sys.argv = ["builder", "-i", str(prepare()), "-o", str(staging), "-p", args.precision, "-e", "cpu",
                "-c", str(cache_dir() / "genai-hf-cache")]
    log.info("onnxruntime_genai.models.builder %s", " ".join(sys.argv[1:]))
    _flatten_gemma3_rope()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    staging.rename(output)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Console scripts: gemma-export and gemma-parity. Thin: parse options, call the library, map errors
to exit codes a CI job can rely on."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from runtime import exit_codes
from runtime.spec import (ACCURACY_LEVELS, BLOCK_SIZES, DTYPES, KV_LAYOUTS, LM_HEAD, LOGITS, QUANT_METHODS, QUANTS,
                          SLIDING_CACHES, TARGETS, TASKS, ArtifactOptions)

from .api import ParityError, build_trt_engine, export
from .options import ExportOptions
from .trt.build import resume_command

log = logging.getLogger("gemma-export")
# bad input: a path, a model type, an option, an artifact that cannot be used (runtime.ArtifactError is a ValueError)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError)


def _default(name: str):
    """The option's default, as ArtifactOptions sets it (the one place it is set), for --help."""
    return ArtifactOptions.__dataclass_fields__[name].default


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("onnxscript", "onnx_ir", "torch", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", default=None, help="HF folder or hub name, .gguf file, gemma3-270m, or random:<preset>.")
@click.option("--output", "-o", default=None, type=click.Path(path_type=Path), help="Artifact directory to write.")
@click.option("--target", type=click.Choice(TARGETS), default=None, show_default=_default("target"))
@click.option("--task", type=click.Choice(TASKS), default=None, show_default=_default("task"))
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Weights and activations [default: fp16 for --target trt, else fp32]; fp16/bf16 keep the "
                   "residual stream, norms, rotary and softmax in float32; bf16 text generation also keeps the "
                   "embedding/lm_head table in float32 (a larger file).")
@click.option("--quant", type=click.Choice(QUANTS), default=None, help="Weight-only quantization of every MatMul.")
@click.option("--quant-method", type=click.Choice(QUANT_METHODS), default=None,
              help="gptq (default; calibrated on exporter/data/calibration.txt), rtn: round to nearest (default "
                   "and only choice for --target trt), hqq: half-quadratic scales and float zero points, gguf: "
                   "a GGUF source's own blocks (Q8_0, Q5_0, Q4_0 exactly; k-quants to int8).")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default=None,
              show_default=str(_default("block_size")))
@click.option("--symmetric/--zero-points", default=None,
              help="int4 without zero points (default for --target trt) or with (default otherwise).")
@click.option("--lm-head", type=click.Choice(LM_HEAD), default=None,
              help="Precision of the tied lm_head/embedding under --quant [default: int8 (ggml's Q8_0 blocks); "
                   "int4 for trt; gguf with --quant-method gguf].")
@click.option("--accuracy-level", type=click.IntRange(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)), default=None,
              show_default=str(_default("accuracy_level")),
              help="MatMulNBits compute: 4 quantizes activations to int8 (fastest on CPU), 1 keeps float32.")
@click.option("--int8-weights", default="", metavar="NAMES",
              help="Comma-separated weight names (e.g. v_proj,down_proj) kept in 8 bits under --quant int4.")
@click.option("--kv-cache", type=click.Choice(KV_LAYOUTS), default=None,
              help="dynamic: past grows each step; static: buffers of --max-length updated in place [default: static "
                   "for --target ort, else dynamic].")
@click.option("--sliding-cache", type=click.Choice(SLIDING_CACHES), default=None,
              help="--kv-cache static: sliding-window layers keep GroupQueryAttention's windowed cache (window, "
                   "--target ort), a ring of window + one chunk slots (ring), or --max-length slots as global layers "
                   "(full) [default: window where the fused graph takes it, else ring, where smaller].")
@click.option("--max-length", type=int, default=None,
              help="KV buffer length (static layout) [default for --target ort: the model's context]; for --target "
                   "trt the engine's context [default: the model's, at most 4096].")
@click.option("--max-batch-size", type=int, default=None, show_default=str(_default("max_batch_size")),
              help="--target trt: the engine's batch limit.")
@click.option("--max-input-len", type=int, default=None,
              help="--target trt: the most prompt tokens in one prefill [default: min(512, --max-length)]; "
                   "longer prompts are fed in chunks.")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None,
              show_default=str(_default("optimization_level")),
              help="--target trt: TensorRT's builder optimization level.")
@click.option("--build/--no-build", default=True, show_default=True,
              help="--target trt: build the engine after the ONNX (--no-build stops after the ONNX and the plan).")
@click.option("--plan-only", is_flag=True,
              help="--target trt: print the build plan (profiles, KV cache and weight bytes) from the model's config "
                   "and stop; nothing is exported or loaded.")
@click.option("--resume-build", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Build the TensorRT engine of an artifact exported with --target trt (on a GPU machine).")
@click.option("--logits", type=click.Choice(LOGITS), default=None, show_default=_default("logits"),
              help="last: logits of the last position only (faster prefill with a 256k vocabulary).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with tokenizer.json to ship instead of the checkpoint's (e.g. for random weights).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check parity with PyTorch after export.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verbose", "-v", is_flag=True)
def export_command(model, output, target, task, dtype, quant, quant_method, block_size, symmetric, lm_head,
                   accuracy_level, int8_weights, kv_cache, sliding_cache, max_length, max_batch_size, max_input_len,
                   optimization_level, build, plan_only, resume_build, logits, tokenizer, verify, overwrite, quiet, verbose):
    """Export a Gemma model to a verified artifact directory (and, for --target trt, build its TensorRT engine).

    Exit codes: 0 done, 1 parity or build failed, 2 bad input, 3 the TensorRT build needs TensorRT and a
    GPU that this machine lacks (the artifact is written; finish with --resume-build on a GPU machine)."""
    _setup_logging(verbose)
    if resume_build is not None:
        _guard_build(lambda: build_trt_engine(resume_build, not quiet))
        return
    if model is None or (output is None and not plan_only):
        click.echo("gemma-export: --model and --output are required (or --resume-build DIR)", err=True)
        sys.exit(exit_codes.USAGE)
    given = dict(target=target, task=task, dtype=dtype, kv_cache=kv_cache, sliding_cache=sliding_cache,
                 max_length=max_length, logits=logits,
                 quant=quant, quant_method=quant_method, block_size=int(block_size) if block_size else None,
                 symmetric=symmetric, lm_head=lm_head, accuracy_level=accuracy_level,
                 int8_weights=tuple(n for n in int8_weights.split(",") if n) or None, max_batch_size=max_batch_size,
                 max_input_len=max_input_len, optimization_level=optimization_level)
    # build=False: built below, after the summary, so that a missing TensorRT still shows what was written
    options = ExportOptions(**{k: v for k, v in given.items() if v is not None}, verify=verify, overwrite=overwrite,
                            tokenizer=tokenizer, progress=not quiet, build=False)
    try:
        if plan_only:
            from .trt.plan import plan_engine, plan_table

            click.echo(plan_table(*plan_engine(model, options)))
            return
        manifest = export(model, output, options)
    except ParityError as e:
        click.echo(f"gemma-export: {e}; no artifact was written (use --no-verify to keep it anyway)", err=True)
        sys.exit(exit_codes.FAILED)
    except USER_ERRORS as e:
        click.echo(f"gemma-export: {e}", err=True)
        sys.exit(exit_codes.USAGE)
    except Exception as e:  # a bug, not bad input: the traceback for whoever debugs it
        log.error("unexpected failure", exc_info=True)
        click.echo(f"gemma-export: {type(e).__name__}: {e}", err=True)
        sys.exit(exit_codes.FAILED)
    _summary(model, output, manifest)
    if manifest.trt is not None:  # the build plan was logged when it was made
        if build:
            _guard_build(lambda: build_trt_engine(output, options.progress))
        else:
            click.echo(f"--no-build: finish on a GPU machine with: {resume_command(output)}")


def _guard_build(build) -> None:
    from runtime.trt_device import TensorRTUnavailable

    from .trt.build import BuildError

    try:
        manifest = build()
    except TensorRTUnavailable as e:
        click.echo(f"gemma-export: {e}", err=True)
        sys.exit(exit_codes.NO_TENSORRT)
    except BuildError as e:  # UnsupportedOperators included
        click.echo(f"gemma-export: {e}", err=True)
        sys.exit(exit_codes.FAILED)
    except USER_ERRORS as e:
        click.echo(f"gemma-export: {e}", err=True)
        sys.exit(exit_codes.USAGE)
    engine = manifest.engines[-1]
    click.echo(f"engine: {engine.file} ({engine.gpu}, compute capability {engine.compute_capability}, "
               f"TensorRT {engine.tensorrt_version}) in {engine.build_seconds} s")


def _summary(model, output, manifest) -> None:
    size = sum(f.size for f in manifest.files.values())
    stats = manifest.export
    click.echo(f"exported {model} -> {output} ({size / 2**20:.1f} MiB) in {stats.seconds} s, "
               f"peak RSS {stats.peak_rss_bytes / 2**30:.2f} GiB")
    if manifest.fusions:
        click.echo("fusions: " + ", ".join(f"{name} {count}" for name, count in manifest.fusions.items()))
    if manifest.quantized:
        click.echo(f"quantization: {manifest.quant.method} block {manifest.quant.block_size}, " + ", ".join(
            f"{count} weights {bits}" for bits, count in manifest.quantized.weights.items() if count))
    if manifest.parity:
        p = manifest.parity
        click.echo(f"parity: max |logit diff| {p.max_abs_diff:.2e}, greedy agreement {100 * p.greedy_agreement:.0f}%")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="The PyTorch source the artifact was exported from.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text file, one prompt a line.")
@click.option("--new-tokens", type=int, default=8, show_default=True)
@click.option("--tolerance", type=float, default=None, help="Max |logit difference| (default: per precision).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="What runs the artifact: ONNX Runtime (CPU), or its TensorRT engine (GPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--verbose", "-v", is_flag=True)
def parity_command(artifact, model, prompts, new_tokens, tolerance, backend, as_json, verbose):
    """Check an artifact against its PyTorch source. Exit 0 pass, 1 fail, 2 usage or load error, 3 TensorRT
    or a GPU missing for --backend tensorrt."""
    _setup_logging(verbose)
    from runtime.trt_device import TensorRTUnavailable

    from .parity import check_artifact

    try:
        prompt_list = None
        if prompts is not None:
            prompt_list = [line for line in prompts.read_text().splitlines() if line.strip()]
            if not prompt_list:
                raise ValueError(f"{prompts} has no prompts; expected one prompt a line")
        if tolerance is not None and tolerance <= 0:
            raise ValueError(f"tolerance {tolerance} must be > 0")
        report = check_artifact(artifact, model, prompt_list, new_tokens, tolerance, backend)
    except TensorRTUnavailable as e:
        click.echo(f"gemma-parity: {e}", err=True)
        sys.exit(exit_codes.NO_TENSORRT)
    except USER_ERRORS as e:  # a manifest the runtime refuses, a graph ONNX Runtime cannot load, a wrong model...
        click.echo(f"gemma-parity: {e}", err=True)
        sys.exit(exit_codes.USAGE)
    except Exception as e:  # a bug, not bad input: the traceback for whoever debugs it
        log.error("unexpected failure", exc_info=True)
        click.echo(f"gemma-parity: cannot check {artifact}: {type(e).__name__}: {e}", err=True)
        sys.exit(exit_codes.FAILED)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(
            f"{'PASS' if report.passed else 'FAIL'}: max |logit diff| {report.max_abs_diff:.2e} "
            f"(tolerance {report.tolerance:.1e}), greedy agreement {100 * report.greedy_agreement:.0f}% "
            f"over {report.new_tokens} steps x {report.batch_size} prompts"
        )
        if report.vs_onnxruntime:
            worst = max(r["max_abs_diff"] for r in report.vs_onnxruntime)
            click.echo(f"{report.backend} vs ONNX Runtime on the same graph: max |logit diff| {worst:.2e}")
        if report.divergence and report.divergence["first"]:
            first = report.divergence["first"]
            click.echo(f"first diverging output: {first['scope']} ({first['value']}): max |diff| "
                       f"{first['max_abs_diff']:.3g}, relative {first['relative']:.3g}")
    sys.exit(exit_codes.OK if report.passed else exit_codes.FAILED)


if __name__ == "__main__":  # python -m exporter.cli (used by scripts/bench_export.py)
    export_command()

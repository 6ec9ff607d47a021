"""`export()`: checkpoint -> traced ONNX -> verified, self-describing artifact directory.

    resolve the spec   runtime/spec.py (every default, once)   load      exporter/source.py
    trace              exporter/trace.py                        fuse      exporter/fusions/ (--target ort)
    quantize           exporter/quantize.py, gptq.py            verify    exporter/verify.py
    plan the engine    exporter/trt/plan.py (--target trt)      write     exporter/artifact.py, runtime/manifest.py

The CLI (`gemma-export`) parses options and calls this; a Python user can call it too.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import resource
import time
from pathlib import Path

from models.loading import resolve as resolve_checkpoint
from runtime.manifest import ExportStats, Manifest, write_manifest
from runtime.spec import ArtifactSpec, ModelSpec, resolve

from .artifact import ArtifactDir, generation_spec, tool_versions, write_tokenizer_files
from .options import ExportOptions
from .source import load_for_export, reference_model
from .trace import parameter_bytes, trace

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The exported graph does not match the PyTorch reference; nothing was written."""

    def __init__(self, report, int8_activations: bool = False):
        self.report = report
        message = (f"parity failed: max |logit difference| {report.max_abs_diff:.3g} (tolerance "
                   f"{report.tolerance:.3g}), greedy agreement {100 * report.greedy_agreement:.0f}% (needs "
                   f"{100 * report.min_greedy_agreement:.0f}%)")
        if int8_activations and report.max_abs_diff <= report.tolerance:
            message += ("; the logits match with float32 activations, so the int8 activations of --accuracy-level 4 "
                        "changed the tokens (a mixture of experts' routing is that sensitive): export with "
                        "--accuracy-level 1")
        super().__init__(message)


def export(model: str | Path, output: str | Path, options: ExportOptions | None = None) -> Manifest:
    """Export `model` to the artifact directory `output`; returns its manifest."""
    options = options or ExportOptions()
    start = time.perf_counter()
    ckpt = resolve_checkpoint(model)
    ggml_types = ckpt.ggml_types()  # a GGUF source's types: its blocks are the default quantization
    spec = resolve(options, ModelSpec.from_config(ckpt.config), gguf_source=bool(ggml_types))
    quant, onnx_path = spec.quant, None
    ggml_types = ggml_types if quant and quant.method == "gguf" else None
    if quant and quant.method == "gguf" and not ggml_types:
        raise ValueError(f"--quant-method gguf carries a GGUF's blocks, and {model} has no GGUF: pass a .gguf file "
                         "or the packaged gemma3-270m, or use --quant-method gptq|rtn|hqq")
    stages = _Stages(["load", "trace and save", "quantize" if quant else None, "verify" if options.verify else None,
                      "manifest"], options.progress)
    with ArtifactDir(output, options.overwrite) as tmp, stages:
        onnx_path = tmp / "model.onnx"
        stages.next()
        files = write_tokenizer_files(ckpt, tmp, options.tokenizer)
        tokenizer_dir = tmp if "tokenizer.json" in files else None
        torch_model = load_for_export(ckpt, spec, options.progress)
        weight_bytes = parameter_bytes(torch_model)
        calibrated = {}
        if quant and quant.method == "gptq":
            from .gptq import calibration_ids, gptq_model

            ids = calibration_ids(tokenizer_dir, spec.model.vocab_size, ckpt.config.bos_token_id)
            calibrated = gptq_model(torch_model, ids, quant.block_size, options.progress, quant.int8_weights)
        stages.next()
        trace_start = time.perf_counter()
        trace(torch_model, spec, onnx_path)
        trace_seconds = time.perf_counter() - trace_start
        del torch_model
        gc.collect()
        fusions = {}
        if spec.graph.target == "ort":
            from .fusions import fuse_for_ort

            fusions = fuse_for_ort(onnx_path, spec)
        quantized, dequantized = None, {}
        if quant:
            from .quantize import quantize_graph

            stages.next()
            quantized, dequantized = quantize_graph(onnx_path, quant, options.progress, calibrated,
                                                    ggml_types=ggml_types)
            if spec.graph.target == "ort":
                from .fusions import pack_for_ort

                fusions |= pack_for_ort(onnx_path)
        export_rss = _peak_rss()
        (tmp / "config.json").write_text(json.dumps(ckpt.config.to_dict(), indent=2))
        generation = generation_spec(ckpt.config, tmp) if spec.kv else None

        parity = None
        if options.verify:
            from .verify import verify

            stages.next()
            report = verify(lambda: reference_model(ckpt, spec, dequantized), onnx_path, spec,
                            ckpt.config.pad_token_id, tokenizer_dir)
            del dequantized
            (tmp / "parity.json").write_text(json.dumps(report.to_dict(), indent=2))
            if not report.passed:
                raise ParityError(report, bool(quant and quant.format == "matmulnbits" and quant.accuracy_level == 4))
            parity = report.summary()

        stages.next()
        if spec.graph.target == "ort" and spec.kv and spec.kv.layout == "dynamic":
            from .genai import write_genai_config  # onnxruntime-genai runs the artifact as it is

            write_genai_config(tmp, spec, generation)
        plan = None
        if spec.trt is not None:
            from .trt.plan import make_plan, plan_table

            plan = make_plan(onnx_path, spec)
            log.info("%s", plan_table(spec, plan))
        stats = ExportStats(round(time.perf_counter() - start, 1), round(trace_seconds, 1), export_rss, weight_bytes)
        manifest = write_manifest(tmp, Manifest(**_sections(spec), source=ckpt.source, generation=generation,
                                                fusions=fusions, quantized=quantized, parity=parity, plan=plan,
                                                export=stats, tools=tool_versions()))
    log.info("wrote %s in %.0f s", output, time.perf_counter() - start)
    if spec.trt is not None and options.build:
        manifest = build_trt_engine(Path(output), options.progress)
    return manifest


def build_trt_engine(folder: Path, progress: bool = True) -> Manifest:
    """Build the engine of a written trt artifact (export() does unless options.build is False), or say why
    not: UnsupportedOperators (checked from the manifest's plan before TensorRT is looked for), or
    TensorRTUnavailable with the command that finishes the build on a GPU machine. Returns the manifest with
    the engine."""
    from .trt.build import build_artifact_engine

    return build_artifact_engine(folder, progress)


def _sections(spec: ArtifactSpec) -> dict:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(ArtifactSpec)}


class _Stages:
    """A progress bar over the export's stages (tracing itself reports no progress of its own)."""

    def __init__(self, names: list[str | None], enabled: bool):
        self.names = [n for n in names if n]
        self.enabled = enabled
        self.bar = None
        self.done = -1

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.names), desc="export", unit="stage", leave=False)
        return self

    def next(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.set_postfix_str(self.names[min(self.done, len(self.names) - 1)])

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

"""`export()`: checkpoint -> traced ONNX -> verified, self-describing artifact directory.

The CLI (`gemma-export`) parses options and calls this; a Python user can call it too.
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime.manifest import write_manifest  # adds schema_version and kind, lists the files

from .artifact import ArtifactDir, add_bos_token, end_token_ids, write_tokenizer_files
from .trace import GraphSpec, parameter_bytes, trace

log = logging.getLogger(__name__)

# onnx: standard operators; ort: fused for ONNX Runtime (com.microsoft operators);
# trt: standard operators in the forms TensorRT consumes (fp16/bf16, int4 as blocked DequantizeLinear)
TARGETS = ("onnx", "ort", "trt")
KV_LAYOUTS = ("dynamic", "static")
LOGITS = ("all", "last")
DTYPES = ("fp32", "fp16", "bf16")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
QUANTS = ("int4",)


class ParityError(RuntimeError):
    """The exported graph does not match the PyTorch reference; nothing was written."""

    def __init__(self, report):
        self.report = report
        super().__init__(
            f"parity failed: max |logit difference| {report.max_abs_diff:.3g} (tolerance {report.tolerance:.3g}), "
            f"greedy agreement {100 * report.greedy_agreement:.0f}% (needs {100 * report.min_greedy_agreement:.0f}%)"
        )


@dataclass
class ExportOptions:
    target: str = "onnx"
    task: str = "text-generation"
    dtype: str | None = None  # None: fp16 for --target trt, fp32 otherwise
    kv_cache: str = "dynamic"
    max_length: int | None = None
    logits: str = "all"
    verify: bool = True
    overwrite: bool = False
    tokenizer: Path | None = None
    progress: bool = True
    quant: str | None = None  # int4: weight-only, see exporter/quantize.py
    quant_method: str | None = None  # None: gptq (rtn for --target trt)
    block_size: int = 32
    symmetric: bool | None = None  # None: zero points for ONNX Runtime, symmetric for TensorRT
    lm_head: str | None = None  # the tied lm_head/embedding: int4 | int8 | float; None: int8 (ort), int4 (trt)
    accuracy_level: int = 4
    int8_weights: tuple[str, ...] = ()  # names containing one of these are quantized to 8 bits
    # --target trt: the engine's limits (exporter/trt/plan.py) and whether to build it here
    max_batch_size: int = 1
    max_input_len: int | None = None  # None: min(512, the context)
    build: bool = True
    optimization_level: int = 3

    def trt_limits(self, model_context: int):
        """The engine's limits: --max-length (default: the model's context, at most 4,096 tokens)."""
        from .trt.plan import BuildLimits

        max_length = self.max_length or min(model_context, 4096)
        return BuildLimits(self.max_batch_size, self.max_input_len or min(512, max_length), max_length)

    def quant_options(self):
        from .quantize import QuantOptions

        trt = self.target == "trt"
        return QuantOptions(
            method=self.quant_method,
            block_size=self.block_size,
            symmetric=trt if self.symmetric is None else self.symmetric,
            lm_head=self.lm_head or ("int4" if trt else "int8"),
            format="qdq" if trt else "matmulnbits",
            accuracy_level=self.accuracy_level,
            int8_weights=tuple(self.int8_weights),
        )

    def check(self) -> None:
        from models.loading import TASKS

        if self.dtype is None:
            self.dtype = "fp16" if self.target == "trt" else "fp32"
        if self.quant_method is None:
            self.quant_method = "rtn" if self.target == "trt" else "gptq"

        choices = {"target": TARGETS, "task": TASKS, "dtype": DTYPES, "kv_cache": KV_LAYOUTS, "logits": LOGITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported; supported: {', '.join(allowed)}")
        if self.kv_cache == "static" and not self.max_length:
            raise ValueError("--kv-cache static needs --max-length N (the size of the KV buffers)")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length {self.max_length} must be a positive number of tokens")
        if self.task != "text-generation" and (self.kv_cache != "dynamic" or self.logits != "all"):
            raise ValueError(f"--kv-cache and --logits apply to text-generation only, not to {self.task}")
        if self.target == "trt":
            self.trt_limits(self.max_length or 4096).check()
        if self.quant is not None:
            if self.quant not in QUANTS:
                raise ValueError(f"quant {self.quant!r} is not supported; supported: {', '.join(QUANTS)}")
            self.quant_options().check()


def export(model: str | Path, output: str | Path, options: ExportOptions | None = None) -> dict:
    """Export `model` to the artifact directory `output`; returns its manifest."""
    from models.gemma import compute_dtype
    from models.loading import load_model, resolve

    options = options or ExportOptions()
    options.check()
    start = time.perf_counter()
    ckpt = resolve(model)
    config = ckpt.config
    if options.max_length and options.max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length {options.max_length} exceeds the model's context of {config.max_position_embeddings} tokens"
        )
    spec = _graph_spec(config, options)
    stages = _Stages(["load", "trace and save", "quantize" if options.quant else None, "config",
                      "verify" if options.verify else None, "manifest"], options.progress)
    with ArtifactDir(output, options.overwrite) as tmp, stages:
        stages.next()
        files = write_tokenizer_files(ckpt, tmp, options.tokenizer)
        torch_model = load_for_export(ckpt, options)
        weight_bytes = parameter_bytes(torch_model)
        calibrated = {}
        if options.quant and options.quant_method == "gptq":
            from .gptq import calibration_ids, gptq_model

            ids = calibration_ids(tmp if "tokenizer.json" in files else None, config.vocab_size, config.bos_token_id)
            calibrated = gptq_model(torch_model, ids, options.block_size, options.progress, options.int8_weights)
        stages.next()
        trace_start = time.perf_counter()
        trace(torch_model, spec, tmp / "model.onnx", dtype=compute_dtype(torch_model))
        trace_seconds = time.perf_counter() - trace_start
        del torch_model
        gc.collect()
        fusions = {}
        if options.target == "ort":
            from .fusions import fuse_for_ort

            fusions = fuse_for_ort(tmp / "model.onnx")
        quantization, dequantized = None, {}
        if options.quant:
            from .quantize import quantize_graph

            stages.next()
            quantization, dequantized = quantize_graph(tmp / "model.onnx", options.quant_options(), options.progress,
                                                       calibrated)
        export_rss = _peak_rss()
        stages.next()
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

        parity = None
        if options.verify:
            from .verify import verify

            stages.next()
            report = verify(
                lambda: reference_model(ckpt, options.task, dequantized),
                tmp / "model.onnx",
                spec,
                config,
                dtype=DTYPE_NAMES[options.dtype],
                tokenizer_dir=tmp if "tokenizer.json" in files else None,
                quantized_activations=bool(options.quant) and options.accuracy_level not in (0, 1),
            )
            del dequantized
            (tmp / "parity.json").write_text(json.dumps(report.to_dict(), indent=2))
            if not report.passed:
                raise ParityError(report)
            parity = report.summary()

        stages.next()
        manifest = build_manifest(config, spec, options, tmp, ckpt.source, parity)
        manifest["quantization"] = quantization
        if spec.kv_layout == "static" and fusions.get("group_query_attention") == config.num_hidden_layers:
            manifest["kv_cache"]["shares_buffers"] = True  # GroupQueryAttention writes the buffers in place
        if options.target == "ort" and spec.with_past and spec.kv_layout == "dynamic":
            from .genai import write_genai_config  # onnxruntime-genai runs the artifact as it is

            write_genai_config(tmp, config, spec, manifest["generation"], manifest["kv_cache"]["shares_buffers"])
        manifest["fusions"] = fusions
        if options.target == "trt":
            from .trt.plan import make_plan

            plan = make_plan(tmp / "model.onnx", manifest, options.trt_limits(config.max_position_embeddings),
                             options.optimization_level)
            log.info("%s", plan.table())
            manifest["trt"] = {"plan": plan.to_dict(), "engines": []}
        manifest["export"] = {
            "seconds": round(time.perf_counter() - start, 1),
            "trace_seconds": round(trace_seconds, 1),
            "peak_rss_bytes": export_rss,
            "weight_bytes": weight_bytes,
        }
        manifest = write_manifest(tmp, manifest)
    log.info("wrote %s in %.0f s", output, time.perf_counter() - start)
    if options.target == "trt" and options.build:
        manifest = build_trt_engine(Path(output), options)
    return manifest


def build_trt_engine(folder: Path, options: ExportOptions) -> dict:
    """Build the engine of a written trt artifact (export() does unless options.build is False), or say why
    not: UnsupportedOperators (checked from the manifest's plan before TensorRT is looked for), or
    TensorRTUnavailable with the command that finishes the build on a GPU machine. Returns the manifest with
    the engine."""
    from .trt.build import build_artifact_engine

    return build_artifact_engine(folder, options.progress)


def load_for_export(ckpt, options: ExportOptions):
    """The PyTorch model in the graph's dtype (bf16 text generation: but for the vocabulary tables, see
    `float32_vocab_tables`). float16 and bfloat16 graphs keep the residual stream (and, in
    models/gemma.py, the embedding's scaling, the norms, the rotation of q and k and the softmax) in float32:
    the residual passes float16's 65504, and each of these roundings costs bfloat16 top-1 agreement."""
    import torch

    from models.gemma import decoder_of
    from models.loading import load_model

    dtype = getattr(torch, DTYPE_NAMES[options.dtype])
    table = torch.float32 if float32_vocab_tables(options) else None
    model, _ = load_model(ckpt, task=options.task, progress=options.progress, dtype=dtype, embedding_dtype=table)
    decoder = decoder_of(model)
    if dtype != torch.float32:
        decoder.residual_dtype = torch.float32
        for layer in decoder.layers:  # Gemma 3's q/k norms hand float32 to the rotation (models/gemma.py)
            if hasattr(layer.self_attn, "q_norm"):
                layer.self_attn.q_norm.out_dtype = layer.self_attn.k_norm.out_dtype = torch.float32
    if dtype == torch.bfloat16:
        _widen_bfloat16(decoder)
    if table is not None:
        decoder.norm.out_dtype = torch.float32  # lm_head: the float32 hidden state times the float32 table
    return model


def float32_vocab_tables(options: ExportOptions) -> bool:
    """Whether the graph keeps the embedding and lm_head (one tied table in Gemma) in float32: bfloat16 text
    generation. bfloat16 logits near 20 are 0.125 apart, and rounding them alone changes the top-1 token at 3%
    of the positions of a real text, so lm_head runs in float32; and on the real 270M the table's own rounding
    to bfloat16 costs 7 of the 1,989 positions of tests/data/heldout.txt that agree with float32 (weights
    rounded, float32 arithmetic). A bfloat16 table would also be held twice on the device: TensorRT folds the
    Cast lm_head needs into a float32 copy. So the table is stored in float32 once; the lookup reads its rows
    into the float32 residual."""
    return options.dtype == "bf16" and options.task == "text-generation"


def _widen_bfloat16(decoder) -> None:
    """bfloat16 keeps 8 bits of mantissa, so its graphs also keep in float32 what a GPU kernel holds in float32
    anyway: q·k and the softmax (a fused attention's accumulator), gelu(gate)·up (a GEMM's epilogue) and the
    post-norms that feed the float32 residual. Measured on the real 270M over tests/data/heldout.txt, with
    bfloat16 weights: mean |logit - float32| 0.042 with every rounding, 0.033 without these (0.021 with none)."""
    import torch

    for layer in decoder.layers:
        layer.self_attn.scores_dtype = torch.float32
        layer.mlp.act_dtype = torch.float32
        if layer.sandwich_norms:  # Gemma 1's post_attention_layernorm feeds the MLP: it stays bfloat16
            layer.post_attention_layernorm.out_dtype = layer.post_feedforward_layernorm.out_dtype = torch.float32


def reference_model(ckpt, task: str, dequantized: dict):
    """The float32 PyTorch reference; with the quantized weights' dequantized values when the graph has them,
    so that parity measures the graph, not the quantization error (reported apart by scripts/bench_accuracy.py)."""
    from models.loading import load_model

    model, _ = load_model(ckpt, task=task, progress=False)
    if dequantized:
        from .quantize import load_dequantized

        load_dequantized(model, dequantized)
    return model


def build_manifest(config, spec: GraphSpec, options: ExportOptions, folder: Path, source: str, parity) -> dict:
    return {
        **describe_graph(config, spec, options),
        "target": options.target,
        "family": config.model_type,
        "source": source,
        "quantization": None,
        "generation": {
            "bos_token_id": config.bos_token_id,
            "eos_token_ids": end_token_ids(config, folder),
            "pad_token_id": config.pad_token_id,
            "add_bos_token": add_bos_token(folder),
            "context_length": spec.max_length or config.max_position_embeddings,
        },
        "tools": _tool_versions(),
        "parity": parity,
    }


def describe_graph(config, spec: GraphSpec, options: ExportOptions) -> dict:
    """The manifest's description of the graph: dims, I/O, KV cache, dtype."""
    dtype = DTYPE_NAMES[options.dtype]
    return {
        "task": spec.task,
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "sliding_window": config.sliding_window,
            "layer_types": list(config.layer_types),
        },
        "dtype": dtype,
        "io": {"inputs": spec.input_names, "outputs": spec.output_names},
        "kv_cache": {
            "layout": spec.kv_layout,
            "max_length": spec.max_length,
            "num_layers": config.num_hidden_layers,
            "num_kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "dtype": dtype,
            "sliding_window": config.sliding_window,
            "sliding_window_layers": config.sliding_window_layers,
            "shares_buffers": False,
        },
        "logits": spec.logits,
    }


def plan_engine(model: str | Path, options: ExportOptions):
    """The TensorRT build plan of `model` before anything is exported or loaded (gemma-export --plan-only):
    profiles, KV cache bytes, and the weight bytes estimated from the config. Reads the config only."""
    from models.loading import resolve

    from .trt.plan import estimate_weight_bytes, make_plan

    options.check()
    if options.target != "trt":
        raise ValueError(f"--plan-only plans a TensorRT engine: pass --target trt (not {options.target!r})")
    config = resolve(model).config
    spec = _graph_spec(config, options)
    quant = options.quant_options() if options.quant else None
    table = "float32" if float32_vocab_tables(options) else None
    weights = estimate_weight_bytes(config, DTYPE_NAMES[options.dtype], quant, table)
    return make_plan(None, describe_graph(config, spec, options), options.trt_limits(config.max_position_embeddings),
                     options.optimization_level, estimated_weights=weights)


def _graph_spec(config, options: ExportOptions) -> GraphSpec:
    return GraphSpec(
        task=options.task,
        num_layers=config.num_hidden_layers,
        kv_layout=options.kv_cache,
        max_length=options.max_length if options.kv_cache == "static" else None,
        logits=options.logits,
    )


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


def _tool_versions() -> dict:
    versions = {}
    for name in ("gemma-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

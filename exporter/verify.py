"""Parity of an exported graph with the PyTorch reference: prefill + greedy decode steps, teacher-forced.

The reference (models/, itself tested against transformers) decodes greedily; the ONNX graph is fed the
same tokens, so every step's logits are comparable. Reported per step: max and mean |logit difference|
over real positions; and the greedy agreement: the share of steps whose argmax is the reference's token.
The reference runs first and is freed before ONNX Runtime loads the graph: peak memory stays at one model.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.kv import positions
from runtime.manifest import ParitySummary
from runtime.spec import LOGITS_TO_KEEP, ArtifactSpec
from runtime.tokenizer import left_pad

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The capital of France is",
    "LLMs generate text through a process known as",
    "def fibonacci(n):",
)
# Max |logit difference| allowed per precision of the graph.
TOLERANCES = {"fp32": 1e-3, "fp16": 0.5, "bf16": 1.0}
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.9}
# numpy's dtype for the graph's KV cache: bfloat16 graphs run through the float32-carried emulation
KV_NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}
# int4 graphs are compared with a reference holding the same dequantized weights. At MatMulNBits'
# accuracy_level 4 the activations are quantized to int8 per block: greedy tokens must then agree on
# the steps whose reference top-2 are further apart than INT4_TIE_MARGIN.
INT4_MIN_AGREEMENT, INT4_TIE_MARGIN = 0.9, 0.5


@dataclass
class ParityReport:
    passed: bool
    tolerance: float
    min_greedy_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    greedy_agreement: float
    steps: list[dict] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    batch_size: int = 0
    new_tokens: int = 0
    reference: str = "models/ (PyTorch)"
    seconds: float = 0.0
    backend: str = "onnxruntime"  # what ran the graph: the export's own ONNX Runtime session, or a runtime backend
    vs_onnxruntime: list[dict] = field(default_factory=list)  # a backend's logits against ONNX Runtime's, per step
    divergence: dict | None = None  # when a backend failed: the first layer output that differs from ONNX Runtime's

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> ParitySummary:
        return ParitySummary(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ParitySummary)})


def encode_prompts(tokenizer_dir: Path | None, prompts, vocab_size: int, seed: int = 0):
    """Token ids per prompt: the artifact's tokenizer when it has one, else random ids (random models)."""
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # its post-processor adds <bos>
        return [tokenizer.encode(p).ids for p in prompts]
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(3, vocab_size, size=4 + 3 * i).tolist()] for i in range(len(prompts))]


def reference_steps(model, spec: ArtifactSpec, ids: np.ndarray, mask: np.ndarray, new_tokens: int):
    """Greedy decode with the PyTorch module (the dynamic layout: a left-padded batch, as transformers runs it);
    returns (tokens [B, N], logits per step)."""
    import torch

    from models.gemma import empty_past

    config, kv = model.config, spec.kv
    B = ids.shape[0]
    past = empty_past(config, B) if kv else None
    steps, tokens = [], []
    with torch.no_grad():
        step_ids, step_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        for step in range(new_tokens + 1 if kv else 1):
            pos = torch.from_numpy(positions(step_mask.numpy()))[:, -step_ids.shape[1] :]
            if kv:
                logits, past = model(step_ids, pos, step_mask, past, logits_to_keep=int(spec.graph.logits == "last"))
            else:
                logits, _ = model(step_ids, pos, step_mask, empty_past(config, B))
            steps.append(logits.float().numpy())
            if not kv or step == new_tokens:
                break
            step_ids = logits[:, -1:].argmax(-1)
            tokens.append(step_ids.numpy()[:, 0])
            step_mask = torch.cat([step_mask, torch.ones(B, 1, dtype=step_mask.dtype)], dim=1)
    return np.stack(tokens, axis=1) if tokens else np.zeros((B, 0), np.int64), steps


def zero_past(kv, batch: int) -> dict[str, np.ndarray]:
    """Zeroed past tensors by name: each entry's slots (an empty past in the dynamic layout)."""
    return {name: np.zeros((batch, heads, slots or 0, head_dim), KV_NUMPY[kv.dtype])
            for name, (heads, slots, head_dim) in kv.shapes_by_name.items()}


class _Session:
    """The graph on ONNX Runtime (CPU) as a backend-like object: `forward(ids, mask, positions, rows)` over a KV
    cache held in numpy (plain session.run: what the runtime's IO binding must agree with)."""

    def __init__(self, onnx_path: Path, spec: ArtifactSpec, batch: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # TensorScatter warns that plain run() copies the cache: it does, here
        # ONNX Runtime fuses the TensorRT graph's DequantizeLinear + MatMul into MatMulNBits with int8 activations
        # (its default level 4); TensorRT multiplies in the graph's float type, so check it with float activations.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.kv = kv = spec.kv
        self.keep = {LOGITS_TO_KEEP: np.array(1, np.int64)} if spec.graph.keeps_logits else {}  # as decoding does
        self.past = {}
        if kv is not None:
            self.past = zero_past(kv, batch)

    def forward(self, ids, mask, pos, rows: slice):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 **{name: value[rows] for name, value in self.past.items()}, **self.keep}
        outputs = self.session.run(None, feeds)
        for name, present in zip(self.past, outputs[1:]):
            if self.kv.layout == "static":
                self.past[name][rows] = present
            else:
                self.past[name] = present
        return outputs[0].astype(np.float32)


def candidate_steps(run, spec: ArtifactSpec, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray):
    """The graph's logits per step, fed the reference's tokens through `run(ids, mask, positions, rows)`: as one
    left-padded batch in the dynamic layout; in the static one, each row's prompt alone at slot 0 (in the chunks
    a ring takes; its logits laid out as the left-padded batch's), then the rows decoded together, each after its
    own length."""
    B, W = ids.shape
    if spec.kv is None or spec.kv.layout == "dynamic":
        steps, step_ids, step_mask = [], ids, mask
        for step in range(tokens.shape[1] + 1):
            steps.append(run(step_ids, step_mask, positions(step_mask)[:, -step_ids.shape[1]:], slice(0, B)))
            if step == tokens.shape[1]:
                break
            step_ids = tokens[:, step : step + 1]
            step_mask = np.concatenate([step_mask, np.ones((B, 1), np.int64)], axis=1)
        return steps
    lengths = mask.sum(-1)
    first = None
    for row, n in enumerate(lengths):
        prompt, done, pieces = ids[row:row + 1, W - n:], 0, []
        while done < n:
            size = min(n - done, spec.kv.chunk_limit(done) or n)
            pieces.append(run(prompt[:, done:done + size], np.ones((1, done + size), np.int64),
                              np.arange(done, done + size)[None], slice(row, row + 1)))
            done += size
        logits = np.concatenate(pieces, axis=1) if spec.graph.logits == "all" else pieces[-1]
        if first is None:
            first = np.zeros((B, W if logits.shape[1] > 1 else 1, logits.shape[-1]), np.float32)
        first[row, first.shape[1] - logits.shape[1]:] = logits[0]
    steps = [first]
    for step in range(tokens.shape[1]):
        lengths = lengths + 1
        step_mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
        steps.append(run(tokens[:, step:step + 1], step_mask, (lengths - 1)[:, None], slice(0, B)))
    return steps


def onnx_steps(onnx_path: Path, spec: ArtifactSpec, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray):
    """The graph on ONNX Runtime (CPU), fed the reference's tokens; logits per step."""
    return candidate_steps(_Session(onnx_path, spec, ids.shape[0]).forward, spec, ids, mask, tokens)


def backend_steps(backend, spec: ArtifactSpec, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray):
    """The graph through a runtime backend (its KV cache, bindings, profiles), fed the reference's tokens."""
    all_logits = spec.graph.logits == "all"
    backend.reset(ids.shape[0], ids.shape[1] + tokens.shape[1] + 1)

    def run(step_ids, step_mask, pos, rows):
        logits = backend.forward(step_ids, step_mask, pos, all_logits=all_logits and step_ids.shape[1] > 1,
                                 rows=rows)
        return logits if logits.ndim == 3 else logits[:, None]

    return candidate_steps(run, spec, ids, mask, tokens)


def compare(
    reference, candidate, mask: np.ndarray, spec: ArtifactSpec, tokens: np.ndarray, tie_margin: float = 0.0
) -> tuple[list[dict], float]:
    """Per-step differences over real positions, and the greedy agreement."""
    rows = []
    agree = total = 0
    for step, (ref, got) in enumerate(zip(reference, candidate)):
        diff = np.abs(ref - got)
        if step == 0 and diff.ndim == 3 and diff.shape[1] == mask.shape[1]:
            diff = diff[mask.astype(bool)]  # prefill over all positions: only real tokens count
        rows.append({"step": step, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())})
        if step < tokens.shape[1]:
            # A step whose reference top-2 lie within the tolerance is a tie at this precision: not counted.
            top2 = np.sort(ref[:, -1], axis=-1)[:, -2:]
            decisive = (top2[:, 1] - top2[:, 0]) > tie_margin
            agree += int(((got[:, -1].argmax(-1) == tokens[:, step]) & decisive).sum())
            total += int(decisive.sum())
    if spec.kv is None:  # heads: agreement of the argmax over labels / features is not greedy decoding
        agree, total = 1, 1
    return rows, (agree / total if total else 1.0)


def verify(
    model_factory,
    onnx_path: Path,
    spec: ArtifactSpec,
    pad_token_id: int = 0,
    tokenizer_dir: Path | None = None,
    prompts=DEFAULT_PROMPTS,
    new_tokens: int = 8,
    tolerance: float | None = None,
    backend=None,
    locate_with=None,
) -> ParityReport:
    """Compare the graph at `onnx_path` with the module `model_factory()` builds (loaded only for this).

    With a runtime `backend` (runtime.backends: ONNX Runtime or a TensorRT engine of this graph) the
    backend's logits are the candidate, and are also compared with ONNX Runtime's on the graph itself,
    step by step. When such a run fails and `locate_with` is given (divergence.locate's candidate
    runner), the report names the first layer output where the backend departs from ONNX Runtime."""
    start = time.perf_counter()
    dtype = spec.precision.dtype
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    # MatMulNBits above accuracy_level 1 quantizes its activations to int8
    quantized_activations = spec.quant is not None and spec.quant.accuracy_level not in (0, 1)
    sequences = encode_prompts(tokenizer_dir, prompts, spec.model.vocab_size)
    ids, mask = left_pad(sequences, pad_token_id)
    model = model_factory()
    tokens, reference = reference_steps(model, spec, ids, mask, new_tokens)
    del model
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="gemma-verify-") as scratch:
        if dtype == "bf16":  # no bfloat16 kernels on ONNX Runtime's CPU provider: rounding emulated
            from .bf16_emulation import emulate_bfloat16

            onnx_path = emulate_bfloat16(onnx_path, Path(scratch) / "model.onnx")
        candidate = onnx_steps(onnx_path, spec, ids, mask, tokens)
        vs_onnxruntime = []
        if backend is not None:
            session_steps, candidate = candidate, backend_steps(backend, spec, ids, mask, tokens)
            vs_onnxruntime, _ = compare(session_steps, candidate, mask, spec, tokens)
        margin = INT4_TIE_MARGIN if quantized_activations else tolerance
        rows, agreement = compare(reference, candidate, mask, spec, tokens, tie_margin=margin)
        if quantized_activations:
            # The logits are checked on a twin whose MatMulNBits keep float32 activations (accuracy_level 1):
            # graph and weights must then match the reference to the precision's tolerance. The shipped
            # graph's int8 activations must keep the greedy tokens (their effect on perplexity is measured
            # by scripts/bench_accuracy.py).
            twin = float_activation_twin(onnx_path, Path(scratch) / "twin" / "model.onnx")
            rows, _ = compare(reference, onnx_steps(twin, spec, ids, mask, tokens), mask, spec, tokens,
                              tie_margin=tolerance)
    max_diff = max(r["max_abs_diff"] for r in rows)
    mean_diff = float(np.mean([r["mean_abs_diff"] for r in rows]))
    min_agreement = min(MIN_AGREEMENT[dtype], INT4_MIN_AGREEMENT if quantized_activations else 1.0)
    report = ParityReport(
        passed=bool(max_diff <= tolerance and agreement >= min_agreement),
        tolerance=tolerance,
        min_greedy_agreement=min_agreement,
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        greedy_agreement=agreement,
        steps=rows,
        prompts=list(prompts) if tokenizer_dir else [f"<{len(s)} random ids>" for s in sequences],
        batch_size=len(sequences),
        new_tokens=int(tokens.shape[1]),
        seconds=round(time.perf_counter() - start, 2),
        backend="onnxruntime" if backend is None else f"runtime: {type(backend).__name__} ({backend.provider})",
        vs_onnxruntime=vs_onnxruntime,
    )
    if not report.passed and locate_with is not None and dtype != "bf16":  # no bfloat16 kernels in ORT's CPU
        from .divergence import locate

        kv = spec.kv
        if kv.layout == "static":  # a row of its own: the first prompt (as much as a run takes) alone at slot 0
            n = min(int(mask[0].sum()), kv.chunk_limit(0) or ids.shape[1])
            ids, mask = ids[:1, ids.shape[1] - n:], np.ones((1, n), np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
                 **zero_past(kv, ids.shape[0])}
        report.divergence = locate(onnx_path, feeds, locate_with, dtype).to_dict()
    log.info(
        "parity %s: max |diff| %.3g (tolerance %.3g), greedy agreement %.0f%% over %d steps",
        "passed" if report.passed else "FAILED", max_diff, tolerance, 100 * agreement, len(rows),
    )
    return report


def float_activation_twin(src: Path, dst: Path) -> Path:
    """A copy of the graph at `src` whose MatMulNBits compute with float32 activations (accuracy_level 1)."""
    import onnx_ir as ir

    from .graph_io import save_copy

    model = ir.load(src)
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 1)
    return save_copy(model, dst)

"""A loaded artifact: `runtime.load(DIR)` -> GemmaRuntime.

    model.generate_text(prompts, SamplingParams(...))        completions (a prompt, or a left-padded batch)
    model.stream(prompt, params)                             text pieces
    model.chat_session(params).send(text)                    multi-turn, the earlier turns' cache kept (session.py)
    model.generate(ids, max_new_tokens=20, do_sample=...)    as transformers' (compat.py)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import generate as loop
from .chat import ChatTemplate
from .compat import TransformersGenerate
from .kv import KVCache
from .manifest import Manifest, read_manifest
from .params import LoadOptions, SamplingParams
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load(folder: str | Path, options: LoadOptions | None = None, **given) -> "GemmaRuntime":
    """Open an artifact directory with `options` (or LoadOptions' fields as keywords: backend, provider,
    allow_cpu_fallback, threads, verify): the validated manifest (sha256 of every file unless verify=False), the
    backend, the tokenizer and the chat template when the artifact has them.

    backend "onnxruntime": an ONNX Runtime session on `provider` ("cpu", "cuda", "tensorrt"; an unusable
    provider is an error unless allow_cpu_fallback). "tensorrt": the artifact's engine for this GPU and
    TensorRT version (an error where there is none). "auto": "tensorrt" when the artifact has engines,
    else "onnxruntime"; never a silent switch from one to the other."""
    o = (options or LoadOptions()).replace(**given)
    manifest = read_manifest(folder, verify=o.verify)
    backend = o.backend if o.backend != "auto" else "tensorrt" if manifest.engines else "onnxruntime"
    if backend == "tensorrt":
        from .backends.tensorrt_backend import TensorRTBackend

        return GemmaRuntime(manifest, TensorRTBackend(manifest), o)
    if not manifest.path("model.onnx").is_file():
        raise ValueError(f"{folder} has no model.onnx (target {manifest.graph.target!r}); this runtime runs ONNX "
                         "graphs")
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    return GemmaRuntime(manifest, OnnxRuntimeBackend(manifest, o.provider, o.allow_cpu_fallback, o.threads, o.spin),
                        o)


class GemmaRuntime(TransformersGenerate):
    """An artifact with its backend, tokenizer (None for a token-ids-only artifact) and chat template."""

    def __init__(self, manifest: Manifest, backend, load_options: LoadOptions | None = None):
        self.manifest = manifest
        self.backend = backend
        self.load_options = load_options or LoadOptions()  # how it was opened: a draft artifact is opened alike
        generation = manifest.generation
        self.eos_token_ids = list(generation.eos_token_ids) if generation else []
        self.pad_token_id = generation.pad_token_id if generation else 0
        self.context_length = int(backend.max_length or manifest.context_length)
        self.generation_config = _read_json(manifest.path("generation_config.json"))
        folder = manifest.folder
        self.tokenizer = None
        self.chat_template = None
        if (folder / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.for_artifact(manifest)
            config = _read_json(folder / "tokenizer_config.json")
            special = {k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                       if isinstance(v := config.get(k), str)}
            self.chat_template = ChatTemplate.from_dir(folder, special)
        self.last_timings: dict = {}
        self.cache: KVCache | None = None  # the backend's rows as the last call left them
        self._engine = None  # the serving engine, driven by this runtime's calls (speculative decoding)

    def new_cache(self, rows: int, max_length: int | None = None) -> KVCache:
        """Forget what the backend's cache holds and size it for `rows` rows (the KV manager: runtime/kv.py)."""
        self.cache = KVCache(self.backend, rows, max_length)
        return self.cache

    def fit(self, params: SamplingParams, prompt_length: int) -> int:
        """The number of new tokens that fits the context (ContextLengthError, naming the prompt or
        max_new_tokens, when none or too few do)."""
        if self.manifest.kv is None:
            raise ValueError(f"this artifact was exported for {self.manifest.graph.task!r}, not text-generation")
        return loop.fit_new_tokens(prompt_length, params.max_new_tokens, self.context_length,
                                   static=self.backend.static)

    def _generate(self, input_ids, mask, params: SamplingParams, eos, pad, stop=None) -> np.ndarray:
        max_new = self.fit(params, input_ids.shape[1])
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new)
        start = time.perf_counter()
        new = loop.generate_tokens(cache, input_ids, mask, params.sampler(), max_new, eos, pad, stop,
                                   params.use_history)
        self._record(start, new.shape[1])
        return new

    def _record(self, start: float, new_tokens: int) -> None:
        seconds = time.perf_counter() - start
        self.last_timings = {"seconds": seconds, "new_tokens": new_tokens, "run_seconds": self.backend.run_seconds,
                             "tokens_per_s": new_tokens / seconds if seconds else 0.0}

    # -- text -----------------------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.manifest.folder} has no tokenizer.json; pass token ids to generate()")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        if self.chat_template is None:
            raise ValueError(f"{self.manifest.folder} has no chat_template.jinja; re-export it with a tokenizer")
        return self.chat_template.render(messages, add_generation_prompt, **variables)

    def encode(self, prompts: list[str], chat: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask. A rendered chat already starts with <bos>: the template writes it."""
        return self._require_tokenizer().encode_batch(prompts, add_special_tokens=not chat)

    def generate_text(self, prompts: str | list[str], params: SamplingParams | None = None,
                      chat: bool = False, **speculative) -> str | list[str]:
        """The completion of a prompt, or of each prompt of a list (one left-padded batch): the new text
        up to the end token, cut before the first stop string. With `speculative` (as stream_ids takes it) the
        prompts go one after the other through the engine."""
        params = params or SamplingParams()
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if speculative.get("speculative"):
            texts = ["".join(self.stream(p, params, chat, **speculative)) for p in prompts]
            return texts[0] if single else texts
        ids, mask = self.encode(prompts, chat)
        tokenizer = self._require_tokenizer()
        stop = loop.StopStrings(tokenizer, params.stop, len(prompts)) if params.stop else None
        eos = [] if params.ignore_eos else self.eos_token_ids
        new = self._generate(ids, mask, params, eos, self.pad_token_id, stop)
        texts = [self._completion(row, params.stop, eos) for row in new]
        return texts[0] if single else texts

    def _completion(self, row: np.ndarray, stop_strings, eos) -> str:
        tokens = row.tolist()
        ends = [i for i, t in enumerate(tokens) if t in eos]
        text = self.tokenizer.decode(tokens[: ends[0]] if ends else tokens)
        cut = loop.stop_index(text, stop_strings)
        return text if cut is None else text[:cut]

    def stream(self, prompt: str, params: SamplingParams | None = None, chat: bool = False,
               **speculative) -> Iterator[str]:
        """Text pieces of one completion as they are generated; they concatenate to generate_text's. `speculative`,
        `num_speculative_tokens`: as stream_ids takes them."""
        ids, _ = self.encode([prompt], chat)
        yield from self.stream_ids(ids[0].tolist(), params, **speculative)

    def engine(self, speculative: str | None = None, num_speculative_tokens: int = 4):
        """The serving engine (runtime/serving/scheduler.py) over this runtime's backend, one row, driven by the
        caller's thread: what generation takes with speculative decoding (a static-layout artifact). Its rows keep
        their tokens between calls (a chat's earlier turns are reused) until another call takes the backend."""
        from .serving.options import ServeOptions
        from .serving.scheduler import Scheduler

        options = ServeOptions(max_batch_size=1, speculative=speculative,
                               num_speculative_tokens=num_speculative_tokens, load=self.load_options)
        if self._engine is None or self._engine.options != options or self._engine.kv is not self.cache:
            self._engine = Scheduler(self, options)
            self.cache = self._engine.kv
        return self._engine

    def stream_ids(self, ids: list[int], params: SamplingParams | None = None, cache: KVCache | None = None,
                   tokens: list[int] | None = None, speculative: str | None = None,
                   num_speculative_tokens: int = 4) -> Iterator[str]:
        """Text pieces of the completion of one tokenized sequence. With `cache` (a one-row cache of this runtime,
        session.py's) the row keeps the longest prefix of `ids` it holds and only the rest is fed; the generated
        token ids go to `tokens`. With `speculative` ("ngram"), the engine drafts tokens and verifies them in one
        run (the output is the same: docs/speculative.md)."""
        params = params or SamplingParams()
        generated = [] if tokens is None else tokens
        if speculative is not None:
            start = time.perf_counter()
            try:
                yield from self.engine(speculative, num_speculative_tokens).generate(list(ids), params,
                                                                                      tokens=generated)
            finally:
                self._record(start, len(generated))
            return
        max_new = self.fit(params, len(ids))
        if cache is None or cache is not self.cache:
            cache = self.new_cache(1, len(ids) + max_new)
        keep = cache.prefix(0, ids)
        cache.keep(0, keep)
        new = np.array([ids[keep:]], np.int64)
        mask = np.ones((1, keep + new.shape[1]), np.int64)
        eos = [] if params.ignore_eos else self.eos_token_ids
        start = time.perf_counter()
        try:
            yield from loop.stream(cache, self._require_tokenizer(), new, mask, params.sampler(), max_new, eos,
                                   params.stop, params.use_history, generated)
        finally:
            self._record(start, len(generated))

    def chat_session(self, params: SamplingParams | None = None, system: str | None = None, **speculative):
        from .session import ChatSession

        return ChatSession(self, params or SamplingParams(), system, **speculative)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}

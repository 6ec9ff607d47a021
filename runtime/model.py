"""A loaded artifact: `runtime.load(DIR)` -> GemmaRuntime.

    model.generate(ids, attention_mask=None, max_new_tokens=20, do_sample=False, ...)   as transformers'
    model.generate_text(prompts, GenerationOptions(...))                                 completions
    model.stream(prompt, options)                                                        text pieces
    model.chat_session(options).send(text)                                               multi-turn, cache kept
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import generate as loop
from .chat import ChatTemplate
from .manifest import Manifest, read_manifest
from .sampling import check_options, make_sampler
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# transformers' GenerationConfig defaults, for what neither the call nor generation_config.json sets
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                         "repetition_penalty": 1.0, "max_length": 20}


@dataclass
class GenerationOptions:
    """How to generate. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1
    disable their filter. Stop strings end a completion before the first of them."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)

    @classmethod
    def from_transformers(cls, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                          top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                          seed: int | None = None, stop_strings=None) -> "GenerationOptions":
        """transformers' arguments: greedy unless do_sample (the sampling options are then ignored)."""
        return cls(
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_k=top_k if do_sample else 0,
            top_p=top_p if do_sample else 1.0,
            min_p=min_p if do_sample else 0.0,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_strings=list(stop_strings or []),
        )

    def check(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} is out of range; expected an integer >= 1")
        check_options(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, self.seed)
        if isinstance(self.stop_strings, str) or any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings {self.stop_strings!r} must be a list of non-empty strings")

    def sampler(self):
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, self.seed)

    @property
    def use_history(self) -> bool:
        return self.repetition_penalty != 1.0


BACKENDS = ("auto", "onnxruntime", "tensorrt")


def load(folder: str | Path, provider: str = "cpu", allow_cpu_fallback: bool = False, threads: int | None = None,
         verify: bool = True, backend: str = "auto") -> "GemmaRuntime":
    """Open an artifact directory: the validated manifest (sha256 of every file unless verify=False), the
    backend, the tokenizer and the chat template when the artifact has them.

    backend "onnxruntime": an ONNX Runtime session on `provider` ("cpu", "cuda", "tensorrt"; an unusable
    provider is an error unless allow_cpu_fallback). "tensorrt": the artifact's engine for this GPU and
    TensorRT version (an error where there is none). "auto": "tensorrt" when the artifact has engines,
    else "onnxruntime"; never a silent switch from one to the other."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; supported: {', '.join(BACKENDS)}")
    manifest = read_manifest(folder, verify=verify)
    if backend == "auto":
        backend = "tensorrt" if manifest.engines else "onnxruntime"
    if backend == "tensorrt":
        from .backends.tensorrt_backend import TensorRTBackend

        return GemmaRuntime(manifest, TensorRTBackend(manifest))
    if not manifest.path("model.onnx").is_file():
        raise ValueError(f"{folder} has no model.onnx (target {manifest.graph.target!r}); this runtime runs ONNX "
                         "graphs")
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    return GemmaRuntime(manifest, OnnxRuntimeBackend(manifest, provider, allow_cpu_fallback, threads))


class GemmaRuntime:
    """An artifact with its backend, tokenizer (None for a token-ids-only artifact) and chat template."""

    def __init__(self, manifest: Manifest, backend):
        self.manifest = manifest
        self.backend = backend
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
        #: the tokens whose keys and values the backend's cache holds after the last single-sequence stream
        #: ([] after a batch): `stream_ids(..., reuse_cache=True)` keeps the prefix a new prompt shares with them
        self.cached_tokens: list[int] = []
        self.last_prefilled = 0  # tokens the last stream fed to its prefill (the rest came from the cache)

    # -- token level: the shape of transformers' generate ---------------------------------------------

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Prompt + new tokens [batch, prompt + n] int64; a row that ends early (eos) is padded with
        pad_token_id after its end token. Options left None come from the artifact's
        generation_config.json, then transformers' defaults (greedy; max_length 20)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids shape {input_ids.shape} is not supported; expected [batch, length >= 1]")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
        given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repetition_penalty": repetition_penalty, "max_length": max_length}
        o = {k: v if v is not None else self.generation_config.get(k, TRANSFORMERS_DEFAULTS[k]) for k, v in given.items()}
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.get("max_new_tokens") or max(o["max_length"] - input_ids.shape[1], 1)
        options = GenerationOptions.from_transformers(max_new_tokens, bool(o["do_sample"]), o["temperature"], o["top_k"],
                                                      o["top_p"], o["min_p"], o["repetition_penalty"], seed)
        eos = self.eos_token_ids if eos_token_id is None else [int(t) for t in np.atleast_1d(eos_token_id)]
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        new = self._generate(input_ids, mask, options, eos, pad)
        return np.concatenate([input_ids, new], axis=1)

    def _check(self, options: GenerationOptions, prompt_length: int) -> int:
        """Validated options; the number of new tokens that fits the context."""
        options.check()
        if self.manifest.kv is None:
            raise ValueError(f"this artifact was exported for {self.manifest.graph.task!r}, not text-generation")
        return loop.fit_new_tokens(prompt_length, options.max_new_tokens, self.context_length,
                                   static=self.backend.kv_layout == "static")

    def _generate(self, input_ids, mask, options: GenerationOptions, eos, pad, stop=None) -> np.ndarray:
        max_new = self._check(options, input_ids.shape[1])
        self.cached_tokens = []
        start = time.perf_counter()
        new = loop.generate_tokens(self.backend, input_ids, mask, options.sampler(), max_new, eos, pad, stop,
                                   options.use_history)
        self._record(start, new.shape[1])
        return new

    def _record(self, start: float, new_tokens: int) -> None:
        seconds = time.perf_counter() - start
        self.last_timings = {"seconds": seconds, "new_tokens": new_tokens, "run_seconds": self.backend.run_seconds,
                             "tokens_per_s": new_tokens / seconds if seconds else 0.0}

    # -- text level -----------------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.manifest.folder} has no tokenizer.json; pass token ids to generate()")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(f"{self.manifest.folder} has no chat_template.jinja; re-export it with a tokenizer")
        return self.chat_template.render(messages, add_generation_prompt)

    def encode(self, prompts: list[str], chat: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask. A rendered chat already starts with <bos>: the template writes it."""
        return self._require_tokenizer().encode_batch(prompts, add_special_tokens=not chat)

    def generate_text(self, prompts: str | list[str], options: GenerationOptions | None = None,
                      chat: bool = False) -> str | list[str]:
        """The completion of a prompt, or of each prompt of a list (one left-padded batch): the new text
        up to the end token, cut before the first stop string."""
        options = options or GenerationOptions()
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ids, mask = self.encode(prompts, chat)
        tokenizer = self._require_tokenizer()
        stop = loop.StopStrings(tokenizer, options.stop_strings, len(prompts)) if options.stop_strings else None
        new = self._generate(ids, mask, options, self.eos_token_ids, self.pad_token_id, stop)
        texts = [self._completion(row, options.stop_strings) for row in new]
        return texts[0] if single else texts

    def _completion(self, row: np.ndarray, stop_strings: list[str]) -> str:
        tokens = row.tolist()
        ends = [i for i, t in enumerate(tokens) if t in self.eos_token_ids]
        text = self.tokenizer.decode(tokens[: ends[0]] if ends else tokens)
        cut = loop.stop_index(text, stop_strings)
        return text if cut is None else text[:cut]

    def stream(self, prompt: str, options: GenerationOptions | None = None, chat: bool = False) -> Iterator[str]:
        """Text pieces of one completion as they are generated; they concatenate to generate_text's."""
        ids, _ = self.encode([prompt], chat)
        yield from self.stream_ids(ids[0].tolist(), options)

    def stream_ids(self, ids: list[int], options: GenerationOptions | None = None,
                   reuse_cache: bool = False) -> Iterator[str]:
        """Text pieces of the completion of one tokenized sequence. With `reuse_cache` the backend's cache keeps
        the longest prefix `ids` share with `cached_tokens` (what the last single-sequence stream left there: a
        chat's earlier turns) and only the rest is prefilled."""
        options = options or GenerationOptions()
        keep = min(common_prefix(self.cached_tokens, ids), len(ids) - 1) if reuse_cache else 0
        keep = self.backend.keepable(keep) if keep else 0
        max_new = self._check(options, len(ids))
        if keep:
            self.backend.trim(keep)
        new = np.array([ids[keep:]], np.int64)
        mask = np.ones((1, keep + new.shape[1]), np.int64)
        self.last_prefilled, self.cached_tokens = new.shape[1], []
        generated: list[int] = []
        start = time.perf_counter()
        try:
            yield from loop.stream(self.backend, self._require_tokenizer(), new, mask, options.sampler(), max_new,
                                   self.eos_token_ids, options.stop_strings, options.use_history, keep > 0, generated)
        except GeneratorExit:  # the caller stopped reading: the cache is as far as the stream got
            self.cached_tokens = list(ids) + generated[:-1] if generated else []
            raise
        else:
            # The last sampled token was never fed: the cache holds the prompt and the reply but it.
            self.cached_tokens = list(ids) + generated[:-1]
        finally:
            self._record(start, len(generated))

    def chat_session(self, options: GenerationOptions | None = None, system: str | None = None) -> "ChatSession":
        return ChatSession(self, options or GenerationOptions(), system)


class ChatSession:
    """A multi-turn chat that keeps the KV cache between turns. Each turn renders the whole conversation and
    streams its reply with `GemmaRuntime.stream_ids(..., reuse_cache=True)`: the cache keeps the longest prefix
    the conversation shares with what it holds, and only the tokens after it are prefilled (the new user turn,
    and the end of the previous reply as the template writes it)."""

    def __init__(self, model: GemmaRuntime, options: GenerationOptions, system: str | None = None):
        model._require_tokenizer()
        model.apply_chat_template([{"role": "user", "content": "ping"}])  # fails now if there is no template
        self.model = model
        self.options = options
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.model.cached_tokens = []

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys and values the cache holds."""
        return self.model.cached_tokens

    @property
    def prefilled(self) -> int:
        """Tokens fed in the last turn's prefill (the rest came from the cache)."""
        return self.model.last_prefilled

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply joins the conversation when the stream ends."""
        model = self.model
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = model.tokenizer.encode(model.apply_chat_template(messages, add_generation_prompt=True),
                                     add_special_tokens=False)
        reply = ""
        for piece in model.stream_ids(ids, self.options, reuse_cache=True):
            reply += piece
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": reply}]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}

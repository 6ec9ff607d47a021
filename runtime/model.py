"""A loaded artifact: `runtime.load(DIR)` -> GemmaRuntime, with transformers-shaped `generate`, text
generation, streaming and a chat session that keeps its KV cache between turns."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chat import ChatTemplate
from .generate import fit_new_tokens, generate_tokens
from .manifest import Manifest, read_manifest
from .sampling import make_sampler
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)

    def sampler(self):
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, self.seed)

    @classmethod
    def from_transformers(cls, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                          top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                          seed: int | None = None, stop_strings=None) -> "GenerationOptions":
        """transformers' arguments and defaults: greedy unless do_sample, top_k 50 when sampling."""
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
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} is out of range; expected an integer >= 1")
        self.sampler()  # validates the sampling options


def load(
    folder: str | Path,
    provider: str = "cpu",
    allow_cpu_fallback: bool = False,
    threads: int | None = None,
    verify: bool = True,
) -> "GemmaRuntime":
    """Open an artifact directory: validated manifest, session, tokenizer and chat template."""
    manifest = read_manifest(folder, verify=verify)
    if manifest["target"] == "trt" and provider == "cpu" and not (Path(folder) / "model.onnx").is_file():
        raise ValueError(f"{folder} holds TensorRT engines only; load it with provider='trt' on a GPU machine")
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(manifest, provider, allow_cpu_fallback, threads)
    return GemmaRuntime(manifest, backend)


class GemmaRuntime:
    def __init__(self, manifest: Manifest, backend):
        self.manifest = manifest
        self.backend = backend
        generation = manifest.generation
        self.eos_token_ids = list(generation.get("eos_token_ids", [1]))
        self.pad_token_id = generation.get("pad_token_id", 0)
        self.context_length = int(backend.max_length or generation.get("context_length") or 8192)
        folder = manifest.folder
        self.tokenizer = None
        self.chat_template = None
        if (folder / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_dir(folder, generation.get("bos_token_id"), self.pad_token_id)
            self.tokenizer.add_bos_token = generation.get("add_bos_token", self.tokenizer.add_bos_token)
            self.chat_template = ChatTemplate.from_dir(folder, self.tokenizer.bos_token)
        self.last_timings: dict = {}

    # -- token level: the shape of transformers' generate -------------------------------------------

    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """Prompt + new tokens [batch, prompt + n], rows padded with pad_token_id after their end token.
        Defaults as transformers': greedy unless do_sample; max_length 20 when neither length is given."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
        if max_new_tokens is None:
            max_new_tokens = max((max_length or 20) - input_ids.shape[1], 1)
        options = GenerationOptions.from_transformers(
            max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed
        )
        eos = self.eos_token_ids if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        new = self._generate(input_ids, mask, options, eos, pad)
        return np.concatenate([input_ids, new], axis=1)

    def _generate(self, input_ids, mask, options: GenerationOptions, eos, pad, stop=None, continue_cache=False):
        options.check()
        if self.manifest.task != "text-generation":
            raise ValueError(f"this artifact was exported for {self.manifest.task}, not text-generation")
        past = self.backend.past_length if continue_cache else 0
        max_new = fit_new_tokens(past + input_ids.shape[1], options.max_new_tokens, self.context_length)
        start = time.perf_counter()
        new = generate_tokens(
            self.backend, input_ids, mask, options.sampler(), max_new, eos, pad, stop,
            use_history=options.repetition_penalty != 1.0, continue_cache=continue_cache,
        )
        seconds = time.perf_counter() - start
        self.last_timings = {"seconds": seconds, "new_tokens": int(new.shape[1]), "run_seconds": self.backend.run_seconds}
        return new

    # -- text level --------------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.manifest.folder} has no tokenizer.json; pass token ids to generate()")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(f"{self.manifest.folder} has no chat_template.jinja; re-export with a tokenizer")
        return self.chat_template.render(messages, add_generation_prompt)

    def encode(self, prompts: list[str], chat: bool = False) -> tuple[np.ndarray, np.ndarray]:
        tokenizer = self._require_tokenizer()
        # A rendered chat starts with <bos> already (the template writes it).
        return tokenizer.encode_batch(prompts, add_special_tokens=not chat)

    def generate_text(self, prompts: str | list[str], options: GenerationOptions | None = None,
                      chat: bool = False) -> list[str]:
        """Completions of one or several prompts (a batch, left-padded)."""
        options = options or GenerationOptions()
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ids, mask = self.encode(prompts, chat)
        stop = self._stop_on_strings(options.stop_strings)
        new = self._generate(ids, mask, options, self.eos_token_ids, self.pad_token_id, stop)
        texts = [self._completion(row, options.stop_strings) for row in new]
        return texts[0] if single else texts

    def stream(self, prompt: str, options: GenerationOptions | None = None, chat: bool = False) -> Iterator[str]:
        """Text pieces of one completion as they are generated; they concatenate to generate_text's result."""
        options = options or GenerationOptions()
        ids, mask = self.encode([prompt], chat)
        yield from self._stream(ids, mask, options, continue_cache=False)

    def _stream(self, ids, mask, options: GenerationOptions, continue_cache: bool) -> Iterator[str]:
        from .generate import generate_step

        options.check()
        decoder = self._require_tokenizer().stream_decoder()
        past = self.backend.past_length if continue_cache else 0
        max_new = fit_new_tokens(past + ids.shape[1], options.max_new_tokens, self.context_length)
        text, emitted = "", 0
        # Text that could still grow into a stop string is held back until it cannot.
        holdback = max((len(s) for s in options.stop_strings), default=1) - 1
        self.generated_ids = []
        steps = generate_step(self.backend, ids, mask, options.sampler(), max_new,
                              options.repetition_penalty != 1.0, continue_cache)
        for token in steps:
            token = int(token[0])
            self.generated_ids.append(token)
            if token in self.eos_token_ids:
                steps.close()
                break
            text += decoder.push(token)
            cut = _stop_index(text, options.stop_strings)
            if cut is not None:
                steps.close()
                if cut > emitted:
                    yield text[emitted:cut]
                return
            if len(text) - holdback > emitted:
                yield text[emitted : len(text) - holdback]
                emitted = len(text) - holdback
        text += decoder.flush()
        cut = _stop_index(text, options.stop_strings)
        text = text if cut is None else text[:cut]
        if len(text) > emitted:
            yield text[emitted:]

    def _stop_on_strings(self, stop_strings: list[str]):
        if not stop_strings:
            return None
        tokenizer = self._require_tokenizer()
        return lambda row, tokens: _stop_index(tokenizer.decode(tokens), stop_strings) is not None

    def _completion(self, row: np.ndarray, stop_strings: list[str]) -> str:
        tokens = [int(t) for t in row]
        for i, t in enumerate(tokens):
            if t in self.eos_token_ids:
                tokens = tokens[:i]
                break
        text = self._require_tokenizer().decode(tokens)
        cut = _stop_index(text, stop_strings)
        return text if cut is None else text[:cut]

    def chat_session(self, options: GenerationOptions | None = None) -> "ChatSession":
        return ChatSession(self, options or GenerationOptions())


def _stop_index(text: str, stop_strings: list[str]) -> int | None:
    """Where the first stop string begins in `text` (the completion ends there), or None."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


class ChatSession:
    """A multi-turn chat that keeps the KV cache between turns: each turn prefills only the tokens that
    the cache does not hold yet (when the rendered history extends what was fed; else it starts over)."""

    def __init__(self, model: GemmaRuntime, options: GenerationOptions):
        self.model = model
        self.options = options
        self.messages: list[dict] = []
        self.cached: list[int] = []  # tokens whose keys and values are in the backend's cache

    def reset(self) -> None:
        self.messages, self.cached = [], []

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply joins the history when the stream ends."""
        self.messages.append({"role": "user", "content": text})
        rendered = self.model.apply_chat_template(self.messages, add_generation_prompt=True)
        ids = self.model._require_tokenizer().encode(rendered, add_special_tokens=False)
        keep = len(self.cached) > 0 and ids[: len(self.cached)] == self.cached
        new = ids[len(self.cached) :] if keep else ids
        mask = np.ones((1, (len(self.cached) if keep else 0) + len(new)), np.int64)
        reply = ""
        for piece in self.model._stream(np.array([new], np.int64), mask, self.options, continue_cache=keep):
            reply += piece
            yield piece
        generated = self.model.generated_ids
        # The last sampled token was never fed to the model: the cache holds the prompt and all but it.
        self.cached = ids + generated[:-1] if generated else ids
        self.messages.append({"role": "assistant", "content": reply})

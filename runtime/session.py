"""A multi-turn chat that keeps the KV cache between turns: `model.chat_session(params, system)`.

Each turn renders the whole conversation with the chat template and streams the reply through one row of the
runtime's KV cache (runtime/kv.py): the row keeps the longest prefix the conversation shares with what it holds,
and only the tokens after it are fed (the new user turn, and the end of the previous reply as the template
writes it). The serving engine reuses prefixes across requests the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

from .params import SamplingParams


class ChatSession:
    def __init__(self, model, params: SamplingParams, system: str | None = None, **speculative):
        """`speculative`: speculative and num_speculative_tokens, as GemmaRuntime.stream_ids takes them (the turns then
        go through the engine, whose row keeps the conversation the same way)."""
        model._require_tokenizer()
        model.apply_chat_template([{"role": "user", "content": "ping"}])  # fails now if there is no template
        self.model = model
        self.params = params
        self.system = system
        self.speculative = speculative
        self.cache = None  # the one-row cache of the last turn (stale once the runtime made another)
        self.prefilled = 0  # tokens the last turn fed (the rest came from the cache)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys and values the session's row holds."""
        return list(self.cache.tokens[0]) if self.cache is not None and self.cache is self.model.cache else []

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply joins the conversation when the stream ends."""
        model = self.model
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = model.tokenizer.encode(model.apply_chat_template(messages, add_generation_prompt=True),
                                     add_special_tokens=False)
        if self.speculative.get("speculative"):
            self.cache = model.engine(**self.speculative).kv
        elif self.cache is None or self.cache is not model.cache:
            self.cache = model.new_cache(1)
        self.prefilled = len(ids) - self.cache.prefix(0, ids)
        reply = ""
        for piece in model.stream_ids(ids, self.params, cache=self.cache, **self.speculative):
            reply += piece
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": reply}]

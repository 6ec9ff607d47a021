"""Structured outputs: a request's constraint compiled by llguidance into a grammar, and a matcher per request
that says, before each token, which tokens may come next.

    info = TokenizerInfo(tokenizer, end_ids, vocab_size)   # once per artifact (llguidance's token trie: ~2 s at 262k)
    spec = spec_from_request(body)                          # None: unconstrained; GrammarError: a 400 naming its param
    grammar = compile(spec, info)                           # once per distinct spec (an LRU cache in `info`)
    matcher = grammar.matcher()                             # one per request
    matcher.fill_mask(masks[row])                           # the next token's allowed set, one bit a token
    apply_mask(logits[row], masks[row])                     # the others at -inf; then sample as usual
    matcher.accept(token)                                   # False: the token broke the grammar (matcher.error)

For the rows of a continuous batch, `MaskBatch` computes the masks of every constrained row at once in
llguidance's own threads (the GIL released), started before the model step and collected after it.

Why llguidance and not xgrammar (scripts/bench_grammar.py has the figures): both build masks for our 262k
byte-fallback vocabulary correctly; llguidance is a 8 MB wheel with no dependencies, where xgrammar requires torch,
transformers and triton, which the torch-free runtime cannot take. llguidance also rolls back tokens (speculative
decoding) and computes masks for a batch in parallel.

JSON is compiled with bounded whitespace: one optional space between tokens, never a newline (llguidance's default
allows any run of whitespace, and a base model will write newlines until max_tokens); `disable_any_whitespace`
makes it compact, a `whitespace_pattern` replaces the bound.

The base runtime never imports this module's engine: llguidance comes with the `serve` extra and is imported when
the first TokenizerInfo is built.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

WHITESPACE = r"[ ]?"  # between JSON tokens: at most one space, no newline
CACHE_SIZE = 64  # compiled grammars kept per tokenizer
SPEC_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# vLLM's StructuredOutputsParams (sampling_params.py): the constraint fields, then the options
STRUCTURED_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
                      "disable_fallback")
# vLLM removed these in 0.12 for structured_outputs: say what replaces them rather than ignore them
LEGACY_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar", "guided_whitespace_pattern": "whitespace_pattern",
                 "guided_decoding_backend": None}


class GrammarError(ValueError):
    """A constraint that is malformed or that the engine cannot compile; `param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint, in a canonical form (equal specs compile once).

    kind: json_object | json_schema | regex | choice | grammar
    text: the JSON schema (as JSON text), the regex, the choices (a JSON list), the grammar (Lark or GBNF)
    strict: json_schema: refuse a keyword the engine does not enforce (else it is ignored, with a warning)
    whitespace: JSON: the pattern allowed between tokens; "" for none (compact)
    """

    kind: str
    text: str
    strict: bool = False
    whitespace: str = WHITESPACE
    param: str = field(default="response_format", compare=False)

    def __post_init__(self):
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"grammar kind {self.kind!r} is not one of {', '.join(SPEC_KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict, strict: bool = False, whitespace: str = WHITESPACE,
                    param: str = "response_format") -> "GrammarSpec":
        if not isinstance(schema, dict):
            raise GrammarError(param, f"the JSON schema must be an object, got {type(schema).__name__}")
        # keys keep their order: the engine writes an object's properties in the order the schema lists them
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), strict, whitespace, param)


# -- the request's fields -> a spec ---------------------------------------------------------------------


def spec_from_request(body: dict) -> GrammarSpec | None:
    """The constraint of a request body: OpenAI's `response_format` or vLLM's `structured_outputs` (one of them);
    None when it asks for plain text. GrammarError names the field and what is wrong with it."""
    for name, replacement in LEGACY_FIELDS.items():
        if body.get(name) is not None:
            fix = f"send structured_outputs.{replacement}" if replacement else "leave it out (one engine is served)"
            raise GrammarError(name, f"{name} was removed in vLLM 0.12 and is not served: {fix}")
    specs = [s for s in (spec_from_response_format(body.get("response_format")),
                         spec_from_structured_outputs(body.get("structured_outputs"))) if s is not None]
    if len(specs) > 1:
        raise GrammarError("structured_outputs", "send either response_format or structured_outputs, not both")
    return specs[0] if specs else None


def spec_from_response_format(response_format) -> GrammarSpec | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    param = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError(param, "must be an object with a `type`: text, json_object or json_schema")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", '{"type": "object"}', param=param)
    if kind != "json_schema":
        raise GrammarError(param, f"type {kind!r} is not served; use text, json_object or json_schema")
    body = response_format.get("json_schema")
    if not isinstance(body, dict) or not isinstance(body.get("schema"), dict):
        raise GrammarError(param, 'json_schema needs {"name": ..., "schema": {...}}: the schema is missing')
    return GrammarSpec.json_schema(body["schema"], strict=bool(body.get("strict")), param=param)


def spec_from_structured_outputs(options) -> GrammarSpec | None:
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object, with the whitespace
    options for JSON (disable_any_whitespace, whitespace_pattern) and disable_additional_properties."""
    param = "structured_outputs"
    if options is None:
        return None
    if not isinstance(options, dict):
        raise GrammarError(param, f"must be an object with one of {', '.join(STRUCTURED_CONSTRAINTS)}")
    unknown = set(options) - set(STRUCTURED_CONSTRAINTS) - set(STRUCTURED_OPTIONS)
    if unknown:
        raise GrammarError(param, f"unknown field(s) {', '.join(sorted(unknown))}; it takes "
                                  f"{', '.join(STRUCTURED_CONSTRAINTS + STRUCTURED_OPTIONS)}")
    given = [k for k in STRUCTURED_CONSTRAINTS if options.get(k) not in (None, False)]
    if len(given) != 1:
        raise GrammarError(param, f"give exactly one of {', '.join(STRUCTURED_CONSTRAINTS)} (got {given or 'none'})")
    kind = given[0]
    value = options[kind]
    whitespace = "" if options.get("disable_any_whitespace") else options.get("whitespace_pattern") or WHITESPACE
    if kind == "structural_tag":
        raise GrammarError(param, "structural_tag is not served; use json, regex, choice or grammar")
    if kind == "json_object":
        return GrammarSpec("json_object", '{"type": "object"}', whitespace=whitespace, param=param)
    if kind == "json":
        schema = _json_value(value, param) if isinstance(value, str) else value
        if options.get("disable_additional_properties"):
            schema = closed_objects(schema)
        return GrammarSpec.json_schema(schema, whitespace=whitespace, param=param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise GrammarError(param, "choice must be a non-empty list of strings")
        return GrammarSpec("choice", json.dumps(value), param=param)
    if not isinstance(value, str) or not value:
        raise GrammarError(param, f"{kind} must be a non-empty string")
    return GrammarSpec(kind, value, param=param)


def _json_value(text: str, param: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(param, f"json is not valid JSON: {e}") from None


def closed_objects(schema):
    """The schema with `additionalProperties: false` on every object that does not say (vLLM's
    disable_additional_properties)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


# -- the engine -----------------------------------------------------------------------------------------


class TokenizerInfo:
    """llguidance's view of an artifact's tokenizer (its token trie, built on first use), the end tokens a
    finished grammar allows, the logits' width, and the cache of compiled grammars."""

    def __init__(self, tokenizer, end_ids, vocab_size: int, cache_size: int = CACHE_SIZE):
        """`tokenizer`: runtime.tokenizer.Tokenizer; `end_ids`: the tokens that end a reply (the model's end
        tokens); `vocab_size`: the width of the logits (the model's, which may exceed the tokenizer's)."""
        self.tokenizer, self.end_ids, self.vocab_size = tokenizer, [int(i) for i in end_ids], int(vocab_size)
        if not self.end_ids:
            raise ValueError("a grammar needs at least one end token to finish on; the model has none")
        self.words = (self.vocab_size + 31) // 32  # int32 words of one row's mask
        self._ll = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[GrammarSpec, Grammar] = collections.OrderedDict()
        self.cache_size = cache_size

    @property
    def ll(self):
        """The llguidance LLTokenizer (built once, thread-safe)."""
        with self._lock:
            if self._ll is None:
                self._ll = _llguidance().LLTokenizer(self.tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.end_ids)
            return self._ll

    def allocate(self, rows: int) -> np.ndarray:
        """Masks for `rows` rows, [rows, words] int32, every token allowed."""
        return np.full((rows, self.words), -1, dtype=np.int32)


def compile(spec: GrammarSpec, info: TokenizerInfo) -> "Grammar":
    """The spec's grammar, compiled once per distinct spec and tokenizer (least recently used ones dropped).
    GrammarError (naming spec.param) when the engine cannot compile it."""
    with info._lock:
        grammar = info._cache.get(spec)
        if grammar is not None:
            info._cache.move_to_end(spec)
            return grammar
    grammar = Grammar(spec, _build(spec, info))
    with info._lock:
        info._cache[spec] = grammar
        while len(info._cache) > info.cache_size:
            info._cache.popitem(last=False)
    return grammar


def _build(spec: GrammarSpec, info: TokenizerInfo):
    llg = _llguidance()
    try:
        if spec.kind in ("json_schema", "json_object"):
            options = {"lenient": not spec.strict, **_whitespace_options(spec.whitespace)}
            text = llg.LLMatcher.grammar_from_json_schema(spec.text, overrides=options)
        elif spec.kind == "regex":
            text = llg.LLMatcher.grammar_from_regex(spec.text)
        elif spec.kind == "choice":
            text = llg.grammar_from("choice", spec.text)
        else:  # Lark, or GBNF (converted to Lark)
            text = llg.grammar_from("grammar", spec.text)
    except ValueError as e:
        raise GrammarError(spec.param, f"the {spec.kind} cannot be compiled: {e}") from None
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(text, info.ll)
    if failed:
        raise GrammarError(spec.param, f"the {spec.kind} cannot be compiled: {messages[0]}")
    for message in messages:
        log.warning("%s: %s (ignored; strict: true refuses it)", spec.param, message)
    matcher = llg.LLMatcher(info.ll, text, log_level=0)
    if matcher.is_error():
        raise GrammarError(spec.param, f"the {spec.kind} cannot be compiled: {matcher.get_error()}")
    return matcher


def _whitespace_options(pattern: str) -> dict:
    if pattern == "":
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return {"whitespace_flexible": True, "whitespace_pattern": pattern}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError('structured outputs need llguidance: pip install "gemma-deploy[serve]"') from None
    return llguidance


class Grammar:
    """A compiled grammar; `matcher()` starts a request on it (a copy of the compiled start state)."""

    def __init__(self, spec: GrammarSpec, start):
        self.spec, self._start = spec, start

    def matcher(self) -> "Matcher":
        return Matcher(self._start.deep_copy())


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, ll):
        self._ll = ll

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the next token's allowed set into `out` ([words] int32, contiguous: one row of
        TokenizerInfo.allocate): bit t of word t // 32 is set when token t may come next. When the grammar can
        end, the end tokens are allowed; once it has ended, only they are."""
        if out.dtype != np.int32 or not out.flags.c_contiguous or out.ndim != 1:
            raise ValueError(f"the mask row must be a contiguous 1-D int32 array, got {out.dtype} {out.shape}")
        self._ll.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False (and `error` says why) when the grammar does not allow it."""
        return self._ll.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar is complete: only an end token may come (or one came)."""
        return self._ll.is_stopped()

    @property
    def can_end(self) -> bool:
        """What was accepted is a complete match (an end token is allowed now)."""
        return self._ll.is_accepting()

    @property
    def error(self) -> str | None:
        return self._ll.get_error() or None

    def rollback(self, tokens: int) -> None:
        """Forget the last `tokens` accepted tokens (speculative decoding's rejected drafts)."""
        if not self._ll.rollback(int(tokens)):
            raise ValueError(f"cannot roll back {tokens} tokens: {self.error or 'fewer were accepted'}")


# -- masks on logits ------------------------------------------------------------------------------------

# Each byte of a mask, as the 8 logit offsets it stands for (0 or -inf): a gather and an add apply a mask with no
# branch, the same ~0.15 ms per 262k-entry row whatever the mask (a boolean where() costs 0.1-1.6 ms by density).
_BYTE_OFFSETS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
                         np.float32(0), np.float32(-np.inf)).astype(np.float32)


def apply_mask(logits: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """In place: logits [V] or [B, V] float32 get -inf where the masks ([W] or [B, W] int32) have a 0 bit."""
    vocab = logits.shape[-1]
    offsets = np.take(_BYTE_OFFSETS, masks.view(np.uint8), axis=0)  # [..., W * 4, 8]
    logits += offsets.reshape(*masks.shape[:-1], -1)[..., :vocab]
    return logits


class MaskBatch:
    """The masks of a continuous batch's constrained rows, computed together off the critical path:

        batch.start([(row, matcher), ...])   # after the tokens of step t were accepted: masks for step t + 1
        logits = model.decode(...)           # meanwhile llguidance fills the rows in its own threads
        masks = batch.wait()                 # [max_rows, words]; rows not listed are untouched
        apply_mask(logits[row], masks[row]) for the listed rows

    One background thread hands the rows to llguidance's executor (a thread pool in Rust, the GIL released). Between
    start() and wait() the listed matchers belong to it: accept their tokens after wait()."""

    def __init__(self, info: TokenizerInfo, max_rows: int, threads: int | None = None):
        self.masks = info.allocate(max_rows)
        self._executor = _llguidance().LLExecutor(threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gemma-masks")
        self._pending: concurrent.futures.Future | None = None

    def start(self, rows: list[tuple[int, Matcher]]) -> None:
        if self._pending is not None:
            raise RuntimeError("the previous masks were not collected: call wait() first")
        for row, _ in rows:
            if not 0 <= row < len(self.masks):
                raise ValueError(f"row {row} is outside the batch's {len(self.masks)} rows")
        self._pending = self._pool.submit(self._fill, [(m._ll, row) for row, m in rows])

    def wait(self) -> np.ndarray:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        return self.masks

    def _fill(self, rows) -> None:
        if rows:
            words = self.masks.shape[1]
            self._executor.unsafe_compute_mask_ptr(rows, self.masks.ctypes.data, words * 4, len(self.masks))

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

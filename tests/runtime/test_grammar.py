"""Structured outputs (runtime/serving/grammar.py) on the tiny byte-fallback tokenizer, and on the real 262k one:
random walks over the allowed tokens end in text that parses and validates, the request fields map to specs, and
what the engine cannot compile is refused naming the field."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from runtime.tokenizer import Tokenizer

from .conftest import END_OF_TURN, tiny_tokenizer

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from runtime.serving import grammar as G  # noqa: E402  (after the skip: it needs llguidance to be useful)

END_IDS = (1, END_OF_TURN)

# Held-out style schemas: nested objects, enums, arrays with bounds, nullable fields, patterns.
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "status": {"enum": ["open", "closed", "on hold"]},
        "priority": {"type": "integer", "enum": [1, 2, 3]},
        "label": {"const": "ticket"}},
        "required": ["status", "priority", "label"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10}, "maxItems": 4}},
        "required": ["tags", "scores"], "additionalProperties": False},
    "nullable": {"type": "object", "properties": {
        "middle_name": {"type": ["string", "null"], "maxLength": 8},
        "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 150}, {"type": "null"}]},
        "nickname": {"type": "string", "maxLength": 8}},
        "required": ["middle_name", "age"], "additionalProperties": False},
    "patterns": {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
        "required": ["date", "code"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tiny_info():
    return G.TokenizerInfo(Tokenizer(tiny_tokenizer()), END_IDS, 512)


def allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little", count=vocab))


def walk(grammar, info, rng, budget=400, prefer=(), also=()):
    """Sample uniformly among the allowed tokens (half the time among `prefer` ∩ allowed, to reach the ends of
    strings and arrays; a quarter among `also`), until an end token; returns the tokens before it, or fails past
    `budget`."""
    matcher, mask, vocab = grammar.matcher(), info.allocate(1)[0], info.vocab_size
    prefer, also, ends = (np.isin(np.arange(vocab), list(s)) for s in (prefer, also, info.end_ids))
    tokens = []
    for _ in range(budget):
        matcher.fill_mask(mask)
        ok = np.unpackbits(mask.view(np.uint8), bitorder="little", count=vocab).astype(bool)
        assert ok.any(), "the grammar allows no token"
        if (ok & ends).any() and (rng.random() < 0.5 or not (ok & ~ends).any()):
            token = int(np.flatnonzero(ok & ends)[0])
        else:
            pool = ok & ~ends
            for favoured in (prefer, also):
                if (pool & favoured).any() and rng.random() < 0.5:
                    pool = pool & favoured
                    break
            token = int(rng.choice(np.flatnonzero(pool)))
        assert matcher.accept(token), matcher.error
        if token in info.end_ids:
            assert matcher.done
            return tokens
        tokens.append(token)
    raise AssertionError(f"no end within {budget} tokens: {tokens}")


def closers(tokenizer: Tokenizer) -> set[int]:
    """Tokens that close strings, objects and arrays or separate items."""
    texts = tokenizer.tokenizer.decode_batch([[i] for i in range(tokenizer.vocab_size)])
    return {i for i, text in enumerate(texts) if any(c in text for c in '"}],') and len(text) <= 3}


def check_walks(info, tokenizer, spec, check, walks=12, seed=0):
    rng, grammar, prefer = np.random.default_rng(seed), G.compile(spec, info), closers(tokenizer)
    for _ in range(walks):
        tokens = walk(grammar, info, rng, prefer=prefer)
        text = tokenizer.decode(tokens)
        # what the engine accepted (its own bytes of the tokens) is what the tokenizer decodes
        assert info.ll.decode_bytes(tokens).decode("utf-8") == text
        check(text)


def outside_strings(json_text: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', json_text)


# -- request fields -> specs ------------------------------------------------------------------------------


def test_response_format_maps_to_specs():
    assert G.spec_from_request({}) is None
    assert G.spec_from_request({"response_format": {"type": "text"}}) is None
    spec = G.spec_from_request({"response_format": {"type": "json_object"}})
    assert (spec.kind, spec.param) == ("json_object", "response_format")
    spec = G.spec_from_request({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "b": 1, "a": 2}, "strict": True}}})
    assert spec.kind == "json_schema" and spec.strict and json.loads(spec.text) == {"type": "object", "b": 1, "a": 2}
    # equal schemas are one spec (one compilation); the order of the keys is kept (properties are written in it)
    same = G.GrammarSpec.json_schema({"type": "object", "b": 1, "a": 2}, strict=True)
    assert same == spec and hash(same) == hash(spec)
    assert list(json.loads(spec.text)) == ["type", "b", "a"]


def test_structured_outputs_map_to_specs():
    so = lambda **kw: G.spec_from_request({"structured_outputs": kw})  # noqa: E731
    assert so(regex=r"\d+") == G.GrammarSpec("regex", r"\d+")
    assert so(choice=["yes", "no"]).text == '["yes", "no"]'
    assert so(grammar='root ::= "a"').kind == "grammar"
    assert so(json_object=True).kind == "json_object"
    assert so(json='{"type": "integer"}').text == '{"type": "integer"}'
    assert so(json={"type": "object"}, disable_any_whitespace=True).whitespace == ""
    assert so(json={"type": "object"}, whitespace_pattern="[ \\n]?").whitespace == "[ \\n]?"
    closed = json.loads(so(json={"type": "object", "properties": {"a": {"type": "object"}}},
                           disable_additional_properties=True).text)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"response_format": "json"}, "response_format", "type"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "jsn"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "valid JSON"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    ({"guided_json": {"type": "object"}}, "guided_json", "structured_outputs.json"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
])
def test_bad_constraints_name_their_field(body, param, words):
    with pytest.raises(G.GrammarError) as error:
        G.spec_from_request(body)
    assert error.value.param == param and words in str(error.value)


def test_llguidance_is_imported_only_to_build_a_grammar():
    """The runtime (and a request without a constraint) never loads the engine."""
    code = ("import sys, runtime.serving.grammar as G, runtime.serving.tools as T; "
            "G.spec_from_request({'response_format': {'type': 'json_object'}}); T.check_tools([]); "
            "print('llguidance' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# -- compiling ---------------------------------------------------------------------------------------------


def test_what_the_engine_cannot_compile_is_refused(tiny_info):
    with pytest.raises(G.GrammarError, match="response_format: the json_schema cannot be compiled") as error:
        G.compile(G.GrammarSpec.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
                  tiny_info)
    assert error.value.param == "response_format"
    with pytest.raises(G.GrammarError, match="structured_outputs: the regex cannot be compiled"):
        G.compile(G.GrammarSpec("regex", "(unclosed", param="structured_outputs"), tiny_info)
    with pytest.raises(G.GrammarError, match="grammar cannot be compiled"):
        G.compile(G.GrammarSpec("grammar", "root ::= undefined_rule", param="structured_outputs"), tiny_info)


def test_strict_refuses_keywords_the_engine_ignores(tiny_info, caplog):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(G.GrammarError, match="uniqueItems"):
        G.compile(G.GrammarSpec.json_schema(schema, strict=True), tiny_info)
    G.compile(G.GrammarSpec.json_schema(schema, strict=False), tiny_info)
    assert "uniqueItems" in caplog.text


def test_compiled_once_per_spec_least_recently_used_dropped():
    info = G.TokenizerInfo(Tokenizer(tiny_tokenizer()), END_IDS, 512, cache_size=2)
    a, b, c = (G.GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    first = G.compile(a, info)
    assert G.compile(a, info) is first
    G.compile(b, info)
    G.compile(a, info)  # a is the most recently used now
    G.compile(c, info)  # b goes
    assert G.compile(a, info) is first
    assert list(info._cache) == [c, a]


# -- random walks on the tiny tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_walks_end_in_json_that_validates(tiny_info, name):
    tokenizer = tiny_info.tokenizer
    schema = SCHEMAS[name]
    check_walks(tiny_info, tokenizer, G.GrammarSpec.json_schema(schema, strict=True),
                lambda text: jsonschema.validate(json.loads(text), schema))


def test_json_object_and_whitespace_bound(tiny_info):
    """Even a walk that favours whitespace writes no newline, and ends: at most one space between tokens."""
    tokenizer = tiny_info.tokenizer
    spaces = {tokenizer.token_id("▁"), tokenizer.token_id("<0x0A>"), tokenizer.token_id("<0x09>")}
    grammar = G.compile(G.GrammarSpec("json_object", '{"type": "object"}'), tiny_info)
    rng, spaced = np.random.default_rng(1), 0
    for _ in range(10):
        text = tokenizer.decode(walk(grammar, tiny_info, rng, prefer=closers(tokenizer), also=spaces))
        assert isinstance(json.loads(text), dict)
        between = outside_strings(text)
        assert "\n" not in between and "\t" not in between and "  " not in between
        spaced += " " in between
    assert spaced, "no walk wrote a space between tokens: the bound allows one"
    compact = G.compile(G.GrammarSpec("json_object", '{"type": "object"}', whitespace=""), tiny_info)
    for _ in range(10):
        text = tokenizer.decode(walk(compact, tiny_info, rng, prefer=closers(tokenizer), also=spaces))
        assert isinstance(json.loads(text), dict) and not re.search(r"\s", outside_strings(text))


def test_regex_choice_and_grammar_walks(tiny_info):
    tokenizer = tiny_info.tokenizer
    check_walks(tiny_info, tokenizer, G.GrammarSpec("regex", r"[A-Z]{3}-[0-9]{2,4}"),
                lambda text: re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", text) or pytest.fail(text))
    choices = ["Paris", "the capital of France", "ünïcödé"]
    check_walks(tiny_info, tokenizer, G.GrammarSpec("choice", json.dumps(choices)),
                lambda text: text in choices or pytest.fail(text))
    gbnf = 'root ::= "SELECT " col " FROM t" \ncol ::= "a" | "b"'
    check_walks(tiny_info, tokenizer, G.GrammarSpec("grammar", gbnf),
                lambda text: text in ("SELECT a FROM t", "SELECT b FROM t") or pytest.fail(text))


def test_end_tokens_only_when_the_grammar_can_end(tiny_info):
    tokenizer = tiny_info.tokenizer
    matcher = G.compile(G.GrammarSpec("regex", "ab?"), tiny_info).matcher()
    mask = tiny_info.allocate(1)[0]
    matcher.fill_mask(mask)
    assert not set(END_IDS) & set(allowed(mask, 512)) and not matcher.can_end
    assert matcher.accept(tokenizer.token_id("a"))
    matcher.fill_mask(mask)
    assert set(END_IDS) <= set(allowed(mask, 512)) and matcher.can_end and not matcher.done
    assert matcher.accept(tokenizer.token_id("b"))
    matcher.fill_mask(mask)
    assert set(allowed(mask, 512)) == set(END_IDS) and matcher.done
    assert not matcher.accept(tokenizer.token_id("a")) and matcher.error


def test_rollback_restores_the_mask(tiny_info):
    tokenizer = tiny_info.tokenizer
    matcher = G.compile(G.GrammarSpec.json_schema(SCHEMAS["enums"]), tiny_info).matcher()
    before, after = tiny_info.allocate(2)
    matcher.fill_mask(before)
    for token in tokenizer.encode('{"status": "op', add_special_tokens=False):
        assert matcher.accept(token), matcher.error
    matcher.rollback(len(tokenizer.encode('{"status": "op', add_special_tokens=False)))
    matcher.fill_mask(after)
    np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match="roll back"):
        matcher.rollback(1)


def test_apply_mask_sets_the_disallowed_to_minus_infinity():
    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    keep = rng.random((3, vocab)) < np.array([[0.01], [0.5], [0.99]])
    masks = np.packbits(np.pad(keep, ((0, 0), (0, 1024 - vocab))), axis=1, bitorder="little").view(np.int32)
    expected = np.where(keep, logits, -np.inf)
    np.testing.assert_array_equal(G.apply_mask(logits.copy(), masks), expected)
    one = logits[1].copy()
    np.testing.assert_array_equal(G.apply_mask(one, masks[1]), expected[1])


def test_mask_batch_equals_row_by_row(tiny_info):
    tokenizer = tiny_info.tokenizer
    specs = [G.GrammarSpec.json_schema(SCHEMAS[n]) for n in ("nested", "arrays")] + [G.GrammarSpec("regex", "x+")]
    matchers = [G.compile(s, tiny_info).matcher() for s in specs]
    assert matchers[0].accept(tokenizer.encode("{", add_special_tokens=False)[0])
    batch = G.MaskBatch(tiny_info, max_rows=5)
    try:
        batch.start([(4, matchers[0]), (1, matchers[1]), (2, matchers[2])])
        with pytest.raises(RuntimeError, match="wait"):
            batch.start([])
        masks = batch.wait()
        for row, matcher in ((4, matchers[0]), (1, matchers[1]), (2, matchers[2])):
            expected = tiny_info.allocate(1)[0]
            matcher.fill_mask(expected)
            np.testing.assert_array_equal(masks[row], expected)
        assert (masks[[0, 3]] == -1).all()  # rows not listed are untouched
        with pytest.raises(ValueError, match="outside"):
            batch.start([(5, matchers[0])])
    finally:
        batch.close()


# -- the real tokenizer -------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_tokenizer_walks_validate(real_model_dir):
    """262k entries with byte fallback: strings take byte tokens and multi-token characters, and what the engine
    accepted decodes to the same text."""
    tokenizer = Tokenizer.from_dir(real_model_dir)
    info = G.TokenizerInfo(tokenizer, (1, tokenizer.token_id("<end_of_turn>")), 262144)
    byte_tokens = {tokenizer.token_id(f"<0x{b:02X}>") for b in range(256)}
    for name in ("nested", "nullable", "patterns"):
        schema = SCHEMAS[name]
        grammar = G.compile(G.GrammarSpec.json_schema(schema, strict=True), info)
        rng, prefer = np.random.default_rng(2), closers(tokenizer) | byte_tokens
        used_bytes = False
        for _ in range(6):
            tokens = walk(grammar, info, rng, prefer=prefer)
            used_bytes |= bool(byte_tokens & set(tokens))
            text = tokenizer.decode(tokens)
            assert info.ll.decode_bytes(tokens).decode("utf-8") == text
            jsonschema.validate(json.loads(text), schema)
        assert used_bytes or name == "patterns", "the walks never took a byte-fallback token"

"""Grammar engines for structured outputs on our tokenizer: llguidance against xgrammar, then what a constrained
decode step costs with the chosen one (llguidance) on a real model.

    python scripts/bench_grammar.py [--tokenizer DIR] [--walks 20] [--engines llguidance,xgrammar]
                                    [--artifact DIR --steps 48 --repeats 3]

Part 1, per engine: the tokenizer view's build time; per JSON schema (nested objects, enums, bounded arrays,
nullable fields, patterns, any object): compile time, then random walks over the allowed tokens (half the time
among tokens that close strings and containers, a quarter among byte-fallback tokens, else uniform; an end token
half the time it is allowed). Per-token mask time p50/p99 over every step; correctness: each walk must end, its
text parse and validate (jsonschema), and the text be what the engine accepted (llguidance: its own bytes of the
tokens; xgrammar: a fresh matcher accepts the decoded string and can end). The tokenizer defaults to the packaged
real Gemma 3 270M's (262,144 entries, byte fallback).

Part 2 (--artifact, a static-layout artifact such as the int4 recipe): greedy decoding at batch 1 and 8, every row
constrained by one of the schemas, against the same rows unconstrained: ms per step p50 with the masks computed
while the model runs (MaskBatch) and after it (sequential), and the grammar's own time on the critical path (masks
awaited and applied, tokens accepted) as a share of the unconstrained step: the whole steps' difference is within
the model step's noise on a shared machine, the grammar's time is not. xgrammar needs torch and
transformers (`pip install xgrammar`); without it part 1 runs llguidance alone. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "country": {"type": "string"}},
                    "required": ["street", "city", "country"], "additionalProperties": False}},
        "required": ["name", "age", "address"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]}, "stars": {"enum": [1, 2, 3, 4, 5]},
        "language": {"type": "string", "enum": ["en", "fr", "de", "es"]}},
        "required": ["sentiment", "stars", "language"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "keywords": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
                   "maxItems": 3}},
        "required": ["keywords", "matrix"], "additionalProperties": False},
    "nullable": {"type": "object", "properties": {
        "title": {"type": "string"}, "subtitle": {"type": ["string", "null"]},
        "year": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "isbn": {"type": "string"}},
        "required": ["title", "subtitle", "year"], "additionalProperties": False},
    "patterns": {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "phone": {"type": "string", "pattern": "^\\+[0-9]{1,3} [0-9]{6,10}$"}},
        "required": ["date", "email", "phone"], "additionalProperties": False},
    "any_object": {"type": "object"},
}
PROMPT = "Here is the record, as one line of JSON:\n"


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- the engines behind one interface --------------------------------------------------------------------------


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, folder: Path, end_ids, vocab: int):
        from runtime.serving import grammar

        self.grammar, self.vocab = grammar, vocab
        self.info = grammar.TokenizerInfo(tokenizer, end_ids, vocab)
        start = time.perf_counter()
        self.info.ll  # noqa: B018  (builds the token trie)
        self.build_seconds = time.perf_counter() - start
        import llguidance

        self.version = llguidance.__version__

    def compile(self, schema):
        return self.grammar.compile(self.grammar.GrammarSpec.json_schema(schema), self.info)

    def matcher(self, compiled):
        return compiled.matcher()

    def fill(self, matcher, row):
        matcher.fill_mask(row)

    def accept(self, matcher, token) -> bool:
        return matcher.accept(token)

    def agrees(self, compiled, tokens, text: str) -> bool:
        return self.info.ll.decode_bytes(tokens).decode("utf-8", "replace") == text


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, folder: Path, end_ids, vocab: int):
        import transformers
        import xgrammar

        from importlib.metadata import version

        self.xgr, self.vocab, self.version = xgrammar, vocab, version("xgrammar")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        start = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=list(end_ids))
        self.compiler = xgrammar.GrammarCompiler(info)
        self.build_seconds = time.perf_counter() - start

    def compile(self, schema):
        # compact: ", " and ": " between tokens, no other whitespace (the bound we compile llguidance's JSON with)
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, row):
        matcher.fill_next_token_bitmask(row[None], 0)

    def accept(self, matcher, token) -> bool:
        return matcher.accept_token(int(token))

    def agrees(self, compiled, tokens, text: str) -> bool:
        fresh = self.xgr.GrammarMatcher(compiled)
        return fresh.accept_string(text) and fresh.is_completed()


# -- part 1: random walks -----------------------------------------------------------------------------------------


def preferred(tokenizer, vocab: int):
    """(closers, bytes): tokens of at most 3 characters with a quote, brace, bracket or comma; byte tokens."""
    texts = tokenizer.tokenizer.decode_batch([[i] for i in range(tokenizer.vocab_size)])
    closers = np.zeros(vocab, bool)
    closers[[i for i, t in enumerate(texts) if len(t) <= 3 and any(c in t for c in '"}],')]] = True
    byte_tokens = np.zeros(vocab, bool)
    byte_tokens[[tokenizer.token_id(f"<0x{b:02X}>") for b in range(256)]] = True
    return closers, byte_tokens


def walk(engine, compiled, end_ids, prefer, rng, budget=600):
    """(tokens before the end token or None past the budget, seconds of each mask fill)."""
    matcher = engine.matcher(compiled)
    row = np.full((engine.vocab + 31) // 32, -1, dtype=np.int32)
    ends = np.zeros(engine.vocab, bool)
    ends[list(end_ids)] = True
    tokens, times = [], []
    for _ in range(budget):
        start = time.perf_counter()
        engine.fill(matcher, row)
        times.append(time.perf_counter() - start)
        ok = np.unpackbits(row.view(np.uint8), bitorder="little", count=engine.vocab).astype(bool)
        if (ok & ends).any() and (rng.random() < 0.5 or not (ok & ~ends).any()):
            token = int(np.flatnonzero(ok & ends)[0])
        else:
            pool = ok & ~ends
            for favoured, chance in zip(prefer, (0.5, 0.5)):
                if (pool & favoured).any() and rng.random() < chance:
                    pool = pool & favoured
                    break
            token = int(rng.choice(np.flatnonzero(pool)))
        if not engine.accept(matcher, token):
            raise RuntimeError(f"{engine.name} refused a token its own mask allowed: {token}")
        if ends[token]:
            return tokens, times
        tokens.append(token)
    return None, times


def compare(engines, tokenizer, end_ids, vocab: int, walks: int) -> dict:
    import jsonschema

    prefer = preferred(tokenizer, vocab)
    results = {}
    for engine in engines:
        print(f"\n{engine.name} {engine.version}: tokenizer view built in {engine.build_seconds:.2f} s")
        print(f"  {'schema':<11} {'compile':>9} {'mask p50':>9} {'mask p99':>9} {'max':>8} {'tokens':>7} "
              f"{'ended':>6} {'valid':>6} {'agrees':>6}")
        rows = {}
        for name, schema in SCHEMAS.items():
            start = time.perf_counter()
            compiled = engine.compile(schema)
            compile_ms = (time.perf_counter() - start) * 1e3
            rng, times, ended, valid, agrees, lengths = np.random.default_rng(0), [], 0, 0, 0, []
            for _ in range(walks):
                tokens, walk_times = walk(engine, compiled, end_ids, prefer, rng)
                times += walk_times
                if tokens is None:
                    continue
                ended += 1
                lengths.append(len(tokens))
                text = tokenizer.decode(tokens)
                try:
                    jsonschema.validate(json.loads(text), schema)
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                    print(f"    invalid: {text!r}: {e}")
                agrees += engine.agrees(compiled, tokens, text)
            ms = [t * 1e3 for t in times]
            rows[name] = {"compile_ms": compile_ms, "mask_p50_ms": percentile(ms, 50), "mask_p99_ms": percentile(ms, 99),
                          "mask_max_ms": max(ms), "tokens": sum(lengths), "walks": walks, "ended": ended,
                          "valid": valid, "agrees": agrees}
            print(f"  {name:<11} {compile_ms:>7.1f}ms {rows[name]['mask_p50_ms']:>7.3f}ms "
                  f"{rows[name]['mask_p99_ms']:>7.3f}ms {max(ms):>6.2f}ms {sum(lengths):>7} {ended:>6} {valid:>6} "
                  f"{agrees:>6}")
        results[engine.name] = {"version": engine.version, "build_seconds": engine.build_seconds, "schemas": rows}
    return results


# -- part 2: constrained decode steps on a real model ----------------------------------------------------------------


def decode_steps(model, info, batch: int, steps: int, mode: str) -> dict[str, list[float]]:
    """Seconds per greedy decode step at `batch` rows, whole ("step") and in parts: the model ("model"), and the
    grammar's time on the critical path ("grammar": starting and waiting for the masks, applying them, accepting
    the tokens). Mode "free": unconstrained; "overlap": the masks are computed while the model runs (MaskBatch);
    "sequential": after it."""
    from runtime.generate import decode_rows, prefill_rows
    from runtime.serving import grammar

    backend = model.backend
    backend.reset(batch, backend.max_length)
    prompt = np.array([model.tokenizer.encode(PROMPT)], np.int64)
    names = list(SCHEMAS)
    matchers = [grammar.compile(grammar.GrammarSpec.json_schema(SCHEMAS[names[r % len(names)]]), info).matcher()
                for r in range(batch)] if mode != "free" else []
    masks = grammar.MaskBatch(info, batch)
    tokens = np.zeros(batch, np.int64)
    for r in range(batch):
        logits = prefill_rows(backend, slice(r, r + 1), prompt)[0]
        if matchers:
            matchers[r].fill_mask(masks.masks[r])
            grammar.apply_mask(logits, masks.masks[r])
            matchers[r].accept(int(logits.argmax()))
        tokens[r] = int(logits.argmax())
    times = {"step": [], "model": [], "grammar": []}
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            if mode == "overlap":
                masks.start(list(enumerate(matchers)))
            t1 = time.perf_counter()
            logits = decode_rows(backend, tokens, slice(0, batch))
            t2 = time.perf_counter()
            if mode == "sequential":
                masks.start(list(enumerate(matchers)))
            if matchers:
                grammar.apply_mask(logits, masks.wait())
            t3 = time.perf_counter()
            tokens = logits.argmax(axis=-1)
            t4 = time.perf_counter()
            for matcher, token in zip(matchers, tokens):
                if not matcher.done:
                    matcher.accept(int(token))
            t5 = time.perf_counter()
            times["step"].append(t5 - t0)
            times["model"].append(t2 - t1)
            times["grammar"].append((t1 - t0) + (t3 - t2) + (t5 - t4))
    finally:
        masks.close()
    return {k: v[3:] for k, v in times.items()}  # the first steps warm up


def overhead(artifact: str, steps: int, repeats: int, batches=(1, 8)) -> dict:
    import runtime
    from runtime.serving import grammar

    model = runtime.load(artifact)
    vocab = model.manifest.model.vocab_size
    info = grammar.TokenizerInfo(model.tokenizer, model.eos_token_ids, vocab)
    print(f"\nconstrained decode steps on {artifact}: greedy, every row constrained, median ms per step over "
          f"{repeats} x {steps - 3} steps; grammar: its time on the critical path (masks started/awaited, applied, "
          "tokens accepted), as a share of the unconstrained step")
    print(f"  {'batch':>5} {'free step':>10} {'model':>8} | {'overlap step':>12} {'grammar':>8} {'share':>6} | "
          f"{'sequential step':>15} {'grammar':>8} {'share':>6}")
    results = {}
    modes = ("free", "overlap", "sequential")
    for batch in batches:
        samples = {mode: {"step": [], "model": [], "grammar": []} for mode in modes}
        for _ in range(repeats):  # the modes take turns, so that a slower minute does not favour one
            for mode in modes:
                for part, values in decode_steps(model, info, batch, steps, mode).items():
                    samples[mode][part] += values
        row = {f"{mode}_{part}_ms": statistics.median(values) * 1e3
               for mode in modes for part, values in samples[mode].items()}
        for mode in ("overlap", "sequential"):
            row[f"{mode}_share"] = row[f"{mode}_grammar_ms"] / row["free_step_ms"]
        results[batch] = row
        print(f"  {batch:>5} {row['free_step_ms']:>8.2f}ms {row['free_model_ms']:>6.2f}ms | "
              f"{row['overlap_step_ms']:>10.2f}ms {row['overlap_grammar_ms']:>6.2f}ms {row['overlap_share']:>6.1%} | "
              f"{row['sequential_step_ms']:>13.2f}ms {row['sequential_grammar_ms']:>6.2f}ms "
              f"{row['sequential_share']:>6.1%}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="a folder with tokenizer.json (default: the packaged real model's)")
    parser.add_argument("--walks", type=int, default=20, help="random walks per schema and engine")
    parser.add_argument("--engines", default="llguidance,xgrammar")
    parser.add_argument("--artifact", help="a static-layout artifact: also time constrained decode steps on it")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per run (--artifact)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, taking turns (--artifact)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    from runtime.tokenizer import Tokenizer

    if args.tokenizer:
        folder = Path(args.tokenizer)
    else:
        from models import packaged

        folder = packaged.prepare()
    tokenizer = Tokenizer.from_dir(folder)
    end_ids = [tokenizer.token_id("<eos>"), tokenizer.token_id("<end_of_turn>")]
    vocab = tokenizer.vocab_size
    print(f"tokenizer {folder}: {vocab} entries, end tokens {end_ids}")
    kinds = {"llguidance": Llguidance, "xgrammar": Xgrammar}
    engines = []
    for name in args.engines.split(","):
        try:
            engines.append(kinds[name](tokenizer, folder, end_ids, vocab))
        except ImportError as e:
            print(f"{name}: not installed ({e}); skipped")
    results = {"tokenizer": str(folder), "vocab": vocab, "engines": compare(engines, tokenizer, end_ids, vocab,
                                                                            args.walks)}
    if args.artifact:
        results["decode"] = overhead(args.artifact, args.steps, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

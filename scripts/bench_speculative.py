"""Speculative decoding's parts, measured: the n-gram proposer's cost, verification's cost on Gemma's 262k rows,
and how often prompt lookup's drafts match the real model's greedy continuation of input-grounded prompts.

    python scripts/bench_speculative.py proposer [--lengths 1000,4000,16000]
    python scripts/bench_speculative.py verify [--vocab 262144 --k 4]
    python scripts/bench_speculative.py acceptance --artifact DIR [--new-tokens 512 --ks 2,4,6,8 --cache FILE]
    python scripts/bench_speculative.py decode --artifact DIR [--speculative ngram|DRAFT --prose --k 4 --new-tokens 256]
    python scripts/bench_speculative.py engine --artifact DIR [--k 4 --clients 1,8 --new-tokens 128 --rounds 2]
    python scripts/bench_speculative.py prompts            the input-grounded prompts, printed

Input-grounded prompts (`input_grounded_prompts`): a held-out passage of about 500 words (paragraphs of
tests/data/heldout.txt, never seen in calibration), a request to copy it ("copy") or to copy it with its
spelling mistakes corrected ("edit": every 25th word has two letters swapped), and the copy's first sentence,
which a base model needs to start copying: the use prompt lookup is for; summarizing is weaker on a base model.

`acceptance` generates each prompt's greedy continuation once with the artifact (runtime.load(DIR).generate),
then replays speculative greedy decoding over it offline: the proposer drafts from the tokens so far, the drafts'
leading tokens that equal the greedy continuation are accepted, one more token comes from the target run, and the
next draft starts after it (greedy speculation emits exactly these tokens, so the replay is the real run's
schedule). It reports vLLM's counters (runtime.speculative.SpecDecodeStats) per k: acceptance rate per position,
mean acceptance length (tokens per target run), target runs against plain decoding's one per token, for the
proposer's settings and for vLLM's earliest-occurrence variant.

`decode` runs the engine itself on each input-grounded prompt, one row, greedy, `--new-tokens` tokens (ignore_eos:
the copies are longer), plain and with `--speculative ngram`, interleaved prompt by prompt and round by round:
decode tokens/s (from the first token on) and their ratio. `engine` is the server's engine in-process (its
scheduler thread, no HTTP): `--clients` requests at once over the prompts, speculation off and on, interleaved;
tokens/s over all of them. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.params import SamplingParams  # noqa: E402
from runtime.speculative import NgramProposer, SpecDecodeStats, ngram_draft, verify  # noqa: E402

log = logging.getLogger("bench_speculative")

HELDOUT = ROOT / "tests" / "data" / "heldout.txt"
# A base model (the packaged 270M) follows "copy this" only when the copy is started for it: each prompt ends with
# the passage's first sentence, the continuation is the rest.
TASKS = {
    "copy": "Here is a passage, then the same passage again, word for word.\n\n{passage}\n\n"
            "The same passage again, word for word:\n\n{opening}",
    "edit": "Here is a passage with a few spelling mistakes, then the same passage again with the mistakes corrected "
            "and nothing else changed.\n\n{passage}\n\nThe same passage, corrected:\n\n{opening}",
}


# -- prompts -------------------------------------------------------------------------------------------------


def passages(text: str, words: int = 500) -> list[str]:
    """Consecutive paragraphs of `text` grouped into passages of at least `words` words (a short tail is dropped)."""
    out, current = [], []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if paragraph:
            current.append(paragraph)
        if sum(len(p.split()) for p in current) >= words:
            out.append("\n\n".join(current))
            current = []
    return out


def misspell(passage: str, every: int = 25) -> str:
    """Every `every`-th word of more than three letters with two inner letters swapped: mistakes to correct."""
    words = passage.split(" ")
    for i in range(every - 1, len(words), every):
        w = words[i]
        if len(w) > 3 and w[1:3].isalpha():
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def input_grounded_prompt(passage: str, task: str = "copy") -> str:
    """The passage and a request to copy it ("copy") or to correct its spelling ("edit": the passage misspelled
    first), then the copy's first sentence (correctly spelled): the model goes on from there."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; supported: {', '.join(TASKS)}")
    opening = passage[: passage.index(". ") + 1] if ". " in passage else ""
    return TASKS[task].format(passage=misspell(passage) if task == "edit" else passage, opening=opening)


def input_grounded_prompts(words: int = 500, text_path: Path = HELDOUT) -> dict[str, str]:
    """name -> prompt, for every ~`words`-word passage of the held-out text and every task."""
    return {f"{task}-{i}": input_grounded_prompt(p, task)
            for i, p in enumerate(passages(text_path.read_text(), words)) for task in TASKS}


# -- the proposer's cost -------------------------------------------------------------------------------------


def time_per_call(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_proposer(lengths: list[int], k: int = 4, repeats: int = 200) -> list[dict]:
    """Per decode step: NgramProposer (index kept between steps: index one new token, then look up) against
    ngram_draft (a numpy scan of the whole sequence), on text-like token sequences (the held-out text's tokens
    repeated to length, so matches exist; a fresh random tail token forces the longest search)."""
    base = np.frombuffer(HELDOUT.read_bytes(), dtype=np.uint8).astype(np.int64)  # bytes as tokens: text statistics
    rows = []
    for length in lengths:
        tokens = np.resize(base, length).tolist()
        proposer = NgramProposer()
        start = time.perf_counter()
        proposer.propose(tokens, k)
        first = time.perf_counter() - start
        sequence, step = list(tokens), [0]

        def incremental():  # a step: one accepted token appended, then a draft
            sequence.append(int(base[step[0] % len(base)]))
            step[0] += 1
            proposer.propose(sequence, k)

        rows.append({
            "length": length,
            "index_prompt_ms": first * 1e3,
            "incremental_step_us": time_per_call(incremental, repeats) * 1e6,
            "scan_step_us": time_per_call(lambda: ngram_draft(tokens + [10**6], k), max(repeats // 10, 5)) * 1e6,
            "scan_list_to_array_us": time_per_call(lambda: np.asarray(tokens, np.int64), repeats) * 1e6,
        })
    return rows


# -- verification's cost -------------------------------------------------------------------------------------


def accepted_draft(logits: np.ndarray, params, seed: int, history: list[int]) -> list[int]:
    """The k tokens a verify call with np.random.default_rng(seed) accepts whole: the target's own draws (n-gram
    drafts are checked by drawing from p with the request's Generator, runtime/speculative.py)."""
    rng, draft = np.random.default_rng(seed), []
    for i in range(logits.shape[0] - 1):
        draft.append(verify([], logits[i:i + 1], params, rng, history=history + draft)[1])
    return draft


def bench_verify(vocab: int = 262144, k: int = 4, repeats: int = 20, seed: int = 0) -> list[dict]:
    """ms per verify call on [k + 1, vocab] rows for each sampling setting: the whole draft accepted (k + 1 rows
    processed, the most a step costs) and the first token rejected (one row, the least). The logits have a
    Gemma-like shape: normal(0, 2) with 40 tokens a row lifted by 8-14 (a peaked head over a long flat tail)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(k + 1, vocab)).astype(np.float32)
    head = rng.integers(0, vocab, size=(k + 1, 40))
    logits[np.arange(k + 1)[:, None], head] += rng.uniform(8, 14, size=head.shape).astype(np.float32)
    history = rng.integers(0, vocab, size=1000).tolist()
    worst = int(logits[0].argmin())  # a draft token the target never draws
    settings = {
        "greedy": {},
        "greedy, repetition_penalty 1.1": {"repetition_penalty": 1.1},
        "temperature 1": {"temperature": 1.0},
        "temperature 0.8, top_k 64": {"temperature": 0.8, "top_k": 64},
        "temperature 0.8, top_p 0.95": {"temperature": 0.8, "top_p": 0.95},
        "temperature 0.8, min_p 0.05": {"temperature": 0.8, "min_p": 0.05},
        "temperature 0.8, top_p 0.95, repetition_penalty 1.1": {"temperature": 0.8, "top_p": 0.95,
                                                                 "repetition_penalty": 1.1},
    }
    rows = []
    for name, options in settings.items():
        params = SamplingParams(**options)
        draft = accepted_draft(logits, params, seed, history)
        call = lambda d: verify(d, logits, params, np.random.default_rng(seed), history=history)  # noqa: E731
        assert len(call(draft)[0]) == k and not call([worst] * k)[0]
        rows.append({"setting": name, "accept_all_ms": 1e3 * time_per_call(lambda: call(draft), repeats),
                     "reject_first_ms": 1e3 * time_per_call(lambda: call([worst] * k), repeats)})
    params = SamplingParams(temperature=1.0)
    q = np.full((k, vocab), 1.0 / vocab)  # a draft model's q, dense: p(x) / q(x) = V p(x)
    draft = accepted_draft(logits, params, seed, history)
    call = lambda d: verify(d, logits, params, np.random.default_rng(seed), draft_probs=q)  # noqa: E731
    assert len(call(draft)[0]) == k and not call([worst] * k)[0]
    rows.append({"setting": "temperature 1, a draft model's q [k, V]",
                 "accept_all_ms": 1e3 * time_per_call(lambda: call(draft), repeats),
                 "reject_first_ms": 1e3 * time_per_call(lambda: call([worst] * k), repeats)})
    return rows


# -- n-gram acceptance on the real model's greedy continuations -----------------------------------------------


def earliest_ngram_draft(tokens, k: int, min_n: int = 1, max_n: int = 4) -> list[int]:
    """vLLM's choice among the longest matches: the earliest occurrence (for comparison; numpy scan)."""
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(max_n, min_n - 1, -1):
        if len(seq) <= n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(seq[: len(seq) - 1], n)
        hits = np.flatnonzero((windows == seq[len(seq) - n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            out: list[int] = []
            for j in range(k):
                out.append(int(seq[start + j]) if start + j < len(seq) else out[start + j - len(seq)])
            return out
    return []


def replay(prompt: list[int], generated: list[int], k: int, propose) -> dict:
    """Speculative greedy decoding's schedule over a known greedy continuation: runs and vLLM's counters."""
    stats = SpecDecodeStats(k)
    position, runs, drafted_steps = 0, 0, 0
    while position < len(generated):
        draft = propose(prompt + generated[:position], k)
        accepted = 0
        while accepted < len(draft) and position + accepted < len(generated) \
                and draft[accepted] == generated[position + accepted]:
            accepted += 1
        stats.observe(len(draft), accepted)
        drafted_steps += bool(draft)
        runs += 1
        position += accepted + 1
    return {"tokens": len(generated), "runs": runs, "steps_with_a_draft": drafted_steps, "stats": stats}


def greedy_sequences(artifact: str, new_tokens: int, words: int = 500) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (prompt ids, greedy continuation up to and with the first end token) for each input-grounded
    prompt, generated with the artifact."""
    import runtime

    model = runtime.load(artifact)
    sequences = {}
    for name, text in input_grounded_prompts(words).items():
        ids, _ = model.encode([text])
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0)
        seconds = time.perf_counter() - start
        prompt, generated = ids[0].tolist(), out[0, ids.shape[1]:].tolist()
        eos = [i for i, t in enumerate(generated) if t in model.eos_token_ids]
        sequences[name] = (prompt, generated[: eos[0] + 1] if eos else generated)
        log.info("%s: %d prompt tokens, %d generated in %.1f s", name, len(prompt), len(sequences[name][1]), seconds)
    return sequences


VARIANTS = {
    "ngram 1-4, latest": lambda: NgramProposer(1, 4).propose,
    "ngram 2-4, latest": lambda: NgramProposer(2, 4).propose,
    "ngram 3-5, latest": lambda: NgramProposer(3, 5).propose,
    "ngram 1-4, earliest (vLLM)": lambda: earliest_ngram_draft,
}


def bench_acceptance(artifact: str, new_tokens: int, ks: list[int], words: int = 500,
                     cache: Path | None = None) -> dict:
    """The replay per proposer variant and k over the greedy continuations (generated, or read from `cache`, a
    JSON file this writes when it does not exist)."""
    if cache is not None and cache.is_file():
        sequences = {name: tuple(pair) for name, pair in json.loads(cache.read_text()).items()}
    else:
        sequences = greedy_sequences(artifact, new_tokens, words)
        if cache is not None:
            cache.write_text(json.dumps(sequences))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(artifact) / "tokenizer.json"))  # the texts, for the report
    results = {"artifact": artifact, "new_tokens": new_tokens, "prompts": {}, "variants": {}}
    for name, (prompt, generated) in sequences.items():
        results["prompts"][name] = {"prompt_tokens": len(prompt), "generated_tokens": len(generated)}
        results["prompts"][name].update(start=tokenizer.decode(generated[:40]), end=tokenizer.decode(generated[-40:]))
    for variant, make in VARIANTS.items():
        for k in ks:
            total = SpecDecodeStats(k)
            runs = tokens = drafted = 0
            per_prompt = {}
            for name, (prompt, generated) in sequences.items():
                r = replay(prompt, generated, k, make())
                total.merge(r["stats"])
                runs, tokens, drafted = runs + r["runs"], tokens + r["tokens"], drafted + r["steps_with_a_draft"]
                per_prompt[name] = r["tokens"] / r["runs"]
            results["variants"].setdefault(variant, {})[k] = {
                "tokens": tokens, "target_runs": runs, "tokens_per_run": tokens / runs,
                "steps_with_a_draft": drafted / runs, "acceptance_rate": total.acceptance_rate,
                "mean_acceptance_length": total.mean_acceptance_length,
                "acceptance_rate_per_pos": total.acceptance_rate_per_pos,
                "tokens_per_run_by_prompt": per_prompt,
            }
    return results


def prose_prompts(words: int = 500, text_path: Path = HELDOUT) -> dict[str, str]:
    """name -> the opening two sentences of each held-out passage: open-ended prose for the model to go on with."""
    out = {}
    for i, passage in enumerate(passages(text_path.read_text(), words)):
        sentences = passage.split(". ")
        out[f"prose-{i}"] = ". ".join(sentences[:2]) + "."
    return out


def bench_decode(artifact: str, k: int, new_tokens: int, rounds: int, words: int = 500, speculative: str = "ngram",
                 prose: bool = False, spin: bool = True) -> dict:
    """Plain against speculative decoding (`speculative`: ngram or a draft artifact), one row, each input-grounded
    prompt (or open-ended prose), interleaved."""
    import runtime
    from runtime.bench import time_speculative

    model = runtime.load(artifact, spin=spin)
    texts = prose_prompts(words) if prose else input_grounded_prompts(words)
    prompts = {name: np.array([model.tokenizer.encode(text)]) for name, text in texts.items()}
    modes = {"plain": {}, f"{speculative} k={k}": {"speculative": speculative, "num_speculative_tokens": k}}
    rates = {name: {mode: [] for mode in modes} for name in prompts}
    acceptance = {name: [] for name in prompts}
    for round_ in range(rounds):
        for name, ids in prompts.items():
            for mode, given in modes.items():
                model.engine(**given).kv.clear(0)  # no prefix kept from the other mode's run
                out = time_speculative(model, ids, new_tokens, **given)
                rates[name][mode].append(out["decode_tokens_per_s"])
                if given:
                    acceptance[name].append(out["acceptance_rate"])
            log.info("round %d %s: %s", round_ + 1, name,
                     ", ".join(f"{mode} {rates[name][mode][-1]:.1f} tok/s" for mode in modes))
    plain, spec = list(modes)
    rows = {name: {"plain_tokens_per_s": statistics.median(r[plain]), "spec_tokens_per_s": statistics.median(r[spec]),
                   "ratio": statistics.median(r[spec]) / statistics.median(r[plain]),
                   "acceptance_rate": statistics.mean(acceptance[name])} for name, r in rates.items()}
    ratios = [row["ratio"] for row in rows.values()]
    return {"artifact": artifact, "speculative": speculative, "spin": spin, "k": k, "new_tokens": new_tokens, "rounds": rounds,
            "prompts": rows,
            "ratio_geomean": float(np.exp(np.mean(np.log(ratios))))}


def bench_engine(artifact: str, k: int, clients: list[int], new_tokens: int, rounds: int, words: int = 500) -> dict:
    """The serving engine with speculation off and on: `clients` requests at once, tokens/s over all of them."""
    import threading

    import runtime
    from runtime.params import SamplingParams
    from runtime.serving.options import ServeOptions
    from runtime.serving.scheduler import Failed, Finished, Scheduler

    model = runtime.load(artifact)
    texts = list(input_grounded_prompts(words).values())
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    modes = {"off": {}, f"ngram k={k}": {"speculative": "ngram", "num_speculative_tokens": k}}
    rates = {(c, mode): [] for c in clients for mode in modes}
    for round_ in range(rounds):
        for c in clients:
            for mode, speculative in modes.items():
                scheduler = Scheduler(model, ServeOptions(max_batch_size=max(clients), prefix_cache=False,
                                                          **speculative)).start()
                done = [threading.Event() for _ in range(c)]
                try:
                    start = time.perf_counter()
                    for i in range(c):
                        ids = model.tokenizer.encode(texts[i % len(texts)])
                        scheduler.submit(ids, params, lambda e, d=done[i]: isinstance(e, (Finished, Failed)) and d.set())
                    if not all(d.wait(1800) for d in done):
                        raise TimeoutError("the engine did not finish in 30 minutes")
                    seconds = time.perf_counter() - start
                finally:
                    scheduler.stop()
                rates[c, mode].append(c * new_tokens / seconds)
                log.info("round %d, %d clients, speculation %s: %.1f tok/s", round_ + 1, c, mode, rates[c, mode][-1])
    off, on = list(modes)
    return {"artifact": artifact, "k": k, "new_tokens": new_tokens, "rounds": rounds,
            "clients": {c: {"off_tokens_per_s": statistics.median(rates[c, off]),
                            "on_tokens_per_s": statistics.median(rates[c, on]),
                            "ratio": statistics.median(rates[c, on]) / statistics.median(rates[c, off])}
                        for c in clients}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("proposer")
    p.add_argument("--lengths", default="1000,4000,16000")
    p = sub.add_parser("verify")
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--k", type=int, default=4)
    p = sub.add_parser("acceptance")
    p.add_argument("--artifact", required=True)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--words", type=int, default=500)
    p.add_argument("--cache", type=Path, help="JSON of the greedy continuations: read if it exists, else written")
    p = sub.add_parser("decode")
    p.add_argument("--artifact", required=True)
    p.add_argument("--speculative", default="ngram", help="ngram, or a draft artifact's directory")
    p.add_argument("--prose", action="store_true", help="open-ended prose prompts instead of input-grounded ones")
    p.add_argument("--no-spin", dest="spin", action="store_false", help="the target's threads sleep between runs")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.add_parser("engine")
    p.add_argument("--artifact", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--clients", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    sub.add_parser("prompts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "proposer":
        out = bench_proposer([int(n) for n in args.lengths.split(",")])
    elif args.command == "verify":
        out = bench_verify(args.vocab, args.k)
    elif args.command == "acceptance":
        out = bench_acceptance(args.artifact, args.new_tokens, [int(k) for k in args.ks.split(",")], args.words,
                               args.cache)
    elif args.command == "decode":
        out = bench_decode(args.artifact, args.k, args.new_tokens, args.rounds, speculative=args.speculative,
                           prose=args.prose, spin=args.spin)
    elif args.command == "engine":
        out = bench_engine(args.artifact, args.k, [int(c) for c in args.clients.split(",")], args.new_tokens,
                           args.rounds)
    else:
        out = input_grounded_prompts()
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

"""The serving engine in this process, on tiny-gemma3 with the tiny tokenizer: requests that arrive together
with prompts of different lengths, prefilled in chunks (neighbouring rows together where the graph allows) and
decoded together, each give what they give alone; on the unfused static graph, its sliding-window layers on a ring
of 16 slots (window 8, chunks of at most 8 that do not cross its end), and on the GroupQueryAttention one with
every layer's cache full (the kernel told each row's new tokens takes rows of several over a filled cache). The prefix
cache, n > 1 and followers change what is computed, never what is generated."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import runtime
from runtime import SamplingParams
from runtime.kv import KVCache
from runtime.manifest import read_manifest, write_manifest
from runtime.params import ParamError
from runtime.serving.options import ServeOptions
from runtime.serving.scheduler import Failed, Finished, Piece, QueueFull, Scheduler

from .conftest import add_text_files

PROMPTS = ["The capital of France is", "Paris", "a b c d e f g h the of and", "the of", "France is the capital",
           "is a in to"]
LONG = "the capital of France is Paris and the capital of"  # 13 tokens
SHARED = LONG + " Italy is Rome and the capital of"  # 29 tokens: past the ring's 16 slots and a copy's worth


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """tiny-gemma3 --target ort: GroupQueryAttention on every layer, the sliding-window ones with every slot
    ("full") or on the kernel's windowed cache of 16 slots ("window": compacted every 9 tokens)."""
    from exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("fused")
    folders = {}
    for sliding_cache in ("full", "window"):
        export("random:tiny-gemma3", root / sliding_cache, ExportOptions(
            target="ort", kv_cache="static", max_length=64, sliding_cache=sliding_cache, verify=False, progress=False))
        folders[sliding_cache] = add_text_files(root / sliding_cache, root / f"{sliding_cache}-text")
    return folders


@pytest.fixture(scope="module", params=["unfused", "fused", "window"])
def model(request, tiny_text_artifacts, fused):
    folder = tiny_text_artifacts["static"] if request.param == "unfused" else fused[
        "full" if request.param == "fused" else "window"]
    loaded = runtime.load(folder)
    assert ("group_query_attention_rotary" in loaded.manifest.fusions) == (request.param != "unfused")
    assert loaded.manifest.kv.sliding_cache == {"unfused": "ring", "fused": "full", "window": "window"}[request.param]
    return loaded


class Collector:
    """A request's events; `text` per choice."""

    def __init__(self, n: int = 1):
        self.pieces = [[] for _ in range(n)]
        self.finished: list = [None] * n
        self.done = threading.Event()

    def __call__(self, event):
        if isinstance(event, Piece):
            self.pieces[event.index].append(event.text)
        elif isinstance(event, (Finished, Failed)):  # a Failed is no Finished: the assertions on it fail
            self.finished[event.index] = event
            if all(f is not None for f in self.finished):
                self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces[0])

    def texts(self) -> list[str]:
        return ["".join(p) for p in self.pieces]


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 12, **kw})


def serve(model, prompts, each=None, **options) -> list[Collector]:
    """Submit every prompt at once (each with `each(i)` params, else greedy), wait, stop; the collectors. They are
    all queued before the scheduler's first step: started first, it could run the first request alone for a few
    steps while the others were still being tokenized, and a windowed cache compacts within them."""
    scheduler = Scheduler(model, ServeOptions(**options))
    try:
        collectors = [Collector() for _ in prompts]
        for i, (prompt, collector) in enumerate(zip(prompts, collectors)):
            scheduler.submit(model.tokenizer.encode(prompt), each(i) if each else params(), collector)
        scheduler.start()
        assert all(c.done.wait(60) for c in collectors)
    finally:
        scheduler.stop()
    return collectors


def test_requests_arriving_together_are_each_what_they_give_alone(model):
    alone = [model.generate_text(p, params()) for p in PROMPTS]
    collectors = serve(model, PROMPTS, max_batch_size=4, max_queue=8, prefill_chunk=3)  # two wait for a row
    assert [c.text for c in collectors] == alone
    assert all(c.finished[0].prompt_tokens == len(model.tokenizer.encode(p)) for c, p in zip(collectors, PROMPTS))


def test_a_seeded_request_samples_the_same_whatever_shares_the_batch(model):
    sampled = params(temperature=0.9, top_p=0.9, seed=3)
    alone = model.generate_text(PROMPTS[0], sampled)
    scheduler = Scheduler(model, ServeOptions(max_batch_size=3, prefill_chunk=4)).start()
    try:
        others = [Collector() for _ in range(2)]
        for prompt, collector in zip(PROMPTS[1:], others):
            scheduler.submit(model.tokenizer.encode(prompt), params(temperature=1.0), collector)
        mine = Collector()
        scheduler.submit(model.tokenizer.encode(PROMPTS[0]), sampled, mine)
        assert mine.done.wait(60) and all(c.done.wait(60) for c in others)
    finally:
        scheduler.stop()
    assert mine.text == alone


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cache", "no-cache"])
def test_the_prefix_cache_changes_what_is_computed_not_what_is_generated(model, prefix_cache):
    """The same prompts twice, then prompts that share a long prefix with earlier ones: every completion is the
    request's alone; with the cache the repeats compute only their last tokens. (Four new tokens: a ring row that
    went on more than a chunk past a prefix no longer holds it, test_a_ring_prefix_is_reusable... below.)"""
    prompts = [LONG, "is a in to Paris of", LONG, LONG + " Spain"]
    alone = [model.generate_text(p, params(max_new_tokens=4)) for p in prompts]
    scheduler = Scheduler(model, ServeOptions(max_batch_size=2, prefix_cache=prefix_cache)).start()
    try:
        results = []
        for prompt in prompts:  # one after the other: each finds what the earlier ones left in the rows
            collector = Collector()
            scheduler.submit(model.tokenizer.encode(prompt), params(max_new_tokens=4), collector)
            assert collector.done.wait(60)
            results.append(collector)
    finally:
        scheduler.stop()
    assert [c.text for c in results] == alone
    long = len(model.tokenizer.encode(LONG))
    expected = [0, 0, long - 1, long] if prefix_cache else [0, 0, 0, 0]  # all but the last token of a repeat
    assert [c.finished[0].cached_tokens for c in results] == expected


def test_followers_and_n_choices_copy_the_prefix_and_match_their_seed_alone(model):
    """Requests sharing a prefix submitted together: the later ones follow the first and copy its prefix once
    computed. n = 3: one prefill, three choices, choice i equal to the request alone with seed + i."""
    if not model.backend.can_copy_rows:
        pytest.skip("copies need the CPU provider")
    shared = [SHARED + " Spain", SHARED + " Germany", SHARED + " Greece"]
    alone = [model.generate_text(p, params()) for p in shared]
    collectors = serve(model, shared, max_batch_size=4)
    assert [c.text for c in collectors] == alone
    assert collectors[0].finished[0].cached_tokens == 0
    assert all(c.finished[0].cached_tokens >= len(model.tokenizer.encode(SHARED)) for c in collectors[1:])

    sampled = params(temperature=1.0, seed=5)
    by_seed = [model.generate_text(PROMPTS[2], sampled.replace(seed=5 + i)) for i in range(3)]
    scheduler = Scheduler(model, ServeOptions(max_batch_size=4)).start()
    try:
        three = Collector(3)
        scheduler.submit(model.tokenizer.encode(PROMPTS[2]), sampled, three, n=3)
        assert three.done.wait(60)
    finally:
        scheduler.stop()
    assert three.texts() == by_seed and len(set(by_seed)) > 1
    prompt = len(model.tokenizer.encode(PROMPTS[2]))
    assert [f.cached_tokens for f in three.finished][1:] == [prompt, prompt]


def test_cancel_frees_the_row_and_the_queue_holds_rows_plus_max_queue(model):
    scheduler = Scheduler(model, ServeOptions(max_batch_size=1, max_queue=1)).start()
    try:
        running, go = threading.Event(), threading.Event()

        class Holding(Collector):  # holds the scheduler at its first piece: the request is in its row meanwhile
            def __call__(self, event):
                super().__call__(event)
                if isinstance(event, Piece) and not running.is_set():
                    running.set()
                    go.wait(30)

        long, waiting = Holding(), Collector()
        first = scheduler.submit(model.tokenizer.encode(PROMPTS[0]), params(max_new_tokens=40), long)
        assert running.wait(30) and scheduler.running == 1
        scheduler.submit(model.tokenizer.encode(PROMPTS[1]), params(), waiting)
        with pytest.raises(QueueFull, match="--max-queue 1"):
            scheduler.submit(model.tokenizer.encode(PROMPTS[2]), params(), Collector())
        scheduler.cancel(first)
        go.set()
        assert long.done.wait(60) and long.finished[0].reason == "cancelled"
        assert long.finished[0].completion_tokens < 40
        assert waiting.done.wait(60) and waiting.text == model.generate_text(PROMPTS[1], params())
        assert scheduler.running == 0 and scheduler.queued == 0
    finally:
        scheduler.stop()


def test_a_burst_is_admitted_up_to_rows_plus_queue(model):
    """20 requests at once on 4 rows and a queue of 8 (the scheduler held at the first one's first piece, so none
    ends meanwhile): 12 are taken, free rows counted, 8 refused."""
    scheduler = Scheduler(model, ServeOptions(max_batch_size=4, max_queue=8)).start()
    held, go = threading.Event(), threading.Event()

    class Holding(Collector):
        def __call__(self, event):
            super().__call__(event)
            if isinstance(event, Piece) and not held.is_set():
                held.set()
                go.wait(30)

    taken, refused = [Holding()], 0
    try:
        scheduler.submit(model.tokenizer.encode(PROMPTS[0]), params(max_new_tokens=4), taken[0])
        assert held.wait(30)
        for i in range(19):
            try:
                collector = Collector()
                scheduler.submit(model.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), params(max_new_tokens=4),
                                 collector)
                taken.append(collector)
            except QueueFull:
                refused += 1
        go.set()
        assert all(c.done.wait(60) for c in taken)
    finally:
        go.set()
        scheduler.stop()
    assert (len(taken), refused) == (12, 8)


def test_a_dynamic_layout_artifact_is_refused_with_the_export_line(tiny_text_artifacts):
    from runtime.serving.scheduler import NotServable

    with pytest.raises(NotServable, match="dynamic KV layout.*--kv-cache static"):
        Scheduler(runtime.load(tiny_text_artifacts["dynamic"]))


# -- the ring and the prefix cache -----------------------------------------------------------------------------


def test_a_ring_prefix_is_reusable_exactly_while_the_ring_holds_its_window(tiny_text_artifacts):
    """Window W = 8, ring R = 16 (chunks of C = 8). A row holding n = 30 tokens keeps positions 14..29 in its ring. A
    prefix of m tokens is reusable when the first query after it (position m) finds its window, positions m-7..m-1,
    in the ring: m >= n - C - 1 = 21. At m = 21 the logits after the kept prefix equal a fresh computation's; at
    m = 20 position 13 is gone (its slot holds 29), so reusing it would give other logits: it is refused."""
    model = runtime.load(tiny_text_artifacts["static"])
    kv = model.manifest.kv
    assert (kv.sliding_window, kv.ring_size, kv.ring_chunk) == (8, 16, 8)
    rng = np.random.default_rng(0)
    tokens = rng.integers(7, 500, size=30)
    cont = rng.integers(7, 500, size=3)  # within every chunk limit below

    def fresh(prefix):
        cache = KVCache(model.backend, 1)
        for start in range(0, len(prefix), 8):
            cache.feed(slice(0, 1), prefix[None, start:start + 8])
        return cache.feed(slice(0, 1), cont[None])[0]

    def reused(m, force=False):
        cache = KVCache(model.backend, 1)
        for start in range(0, 30, 8):
            cache.feed(slice(0, 1), tokens[None, start:start + 8])
        assert cache.reusable(0, m) == (m >= 21)
        if force:  # what keep() refuses: cut the row anyway
            del cache.tokens[0][m:]
            cache.lengths[0] = m
        else:
            cache.keep(0, m)
        return cache.feed(slice(0, 1), cont[None])[0]

    np.testing.assert_allclose(reused(21), fresh(tokens[:21]), atol=1e-5)
    np.testing.assert_allclose(reused(29), fresh(tokens[:29]), atol=1e-5)
    assert np.abs(reused(20, force=True) - fresh(tokens[:20])).max() > 1e-3
    with pytest.raises(ValueError, match="cannot keep 20 tokens"):
        reused(20)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The other families' tiny configs in the static layout (Gemma 2 and 4 with rings of window 8 + 8 slots)."""
    from exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in ("tiny-gemma-2b", "tiny-gemma2", "tiny-gemma4"):
        export(f"random:{name}", root / name, ExportOptions(kv_cache="static", max_length=64, verify=False,
                                                            progress=False))
        out[name] = add_text_files(root / name, root / f"{name}-text")
    return out


@pytest.mark.parametrize("name", ["tiny-gemma-2b", "tiny-gemma2", "tiny-gemma4"])
def test_the_prefix_cache_and_followers_on_every_family(families, name):
    """Repeats, prompts sharing a prefix, and followers computing it together: each completion is the request's alone
    (tiny-gemma3 is the tests above)."""
    model = runtime.load(families[name])
    prompts = [SHARED + " Spain", SHARED + " Germany", LONG, LONG + " Rome"]
    alone = [model.generate_text(p, params(max_new_tokens=4)) for p in prompts]
    together = serve(model, prompts[:2], lambda i: params(max_new_tokens=4), max_batch_size=3)
    assert [c.text for c in together] == alone[:2]
    assert together[1].finished[0].cached_tokens >= len(model.tokenizer.encode(SHARED))
    one_by_one = []
    scheduler = Scheduler(model, ServeOptions(max_batch_size=2)).start()
    try:
        for prompt in prompts[2:]:
            collector = Collector()
            scheduler.submit(model.tokenizer.encode(prompt), params(max_new_tokens=4), collector)
            assert collector.done.wait(60)
            one_by_one.append(collector)
    finally:
        scheduler.stop()
    assert [c.text for c in one_by_one] == alone[2:]
    assert one_by_one[1].finished[0].cached_tokens == len(model.tokenizer.encode(LONG))


def test_a_prompt_whose_window_an_idle_run_compacts_is_computed_again(fused):
    """The windowed cache (16 slots, window 8): a row between two decoding rows idles in their run, writing a dummy
    token at its next slot; at 16 tokens that token compacts the window and the row loses what it held. Its request,
    half-way through its prompt, computes it again from the start: every completion is still the request's alone."""
    model = runtime.load(fused["window"])
    words = (LONG + " " + SHARED).split()
    eight = next(" ".join(words[:i]) for i in range(1, len(words))
                 if len(model.tokenizer.encode(" ".join(words[:i]))) == 8)
    prompts = [eight, SHARED + " " + LONG, eight]  # 8 tokens, 40 or so, 8: rows 0, 1 and 2
    p = params(max_new_tokens=24)
    alone = [model.generate_text(x, p) for x in prompts]
    scheduler = Scheduler(model, ServeOptions(max_batch_size=3, prefix_cache=False)).start()
    try:
        collectors = [Collector() for _ in prompts]
        for prompt, collector in zip(prompts, collectors):
            scheduler.submit(model.tokenizer.encode(prompt), p, collector)
        assert all(c.done.wait(60) for c in collectors)
    finally:
        scheduler.stop()
    assert [c.text for c in collectors] == alone


# -- speculative decoding --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["ring", "window"])
def drafting(request, tmp_path_factory):
    """tiny-gemma3, static, --logits last (the graph takes num_logits_to_keep: verification reads k + 1): on rings of
    16 slots (--target onnx), or on GroupQueryAttention's windowed cache of 16 slots, compacted every 9 tokens."""
    from exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("spec")
    target = {"ring": "onnx", "window": "ort"}[request.param]
    export("random:tiny-gemma3", root / "plain", ExportOptions(target=target, kv_cache="static", max_length=64,
                                                                logits="last", verify=False, progress=False))
    model = runtime.load(add_text_files(root / "plain", root / "text"))
    assert model.backend.keeps_logits and model.manifest.kv.sliding_cache == request.param
    return model


REPEATING = ["the of the of the of the of the of", "a b c a b c a b c a b c", "Paris is the capital of France is"]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_speculative_decoding_generates_what_plain_decoding_does(drafting, sampled):
    """n-gram drafts verified in one run: greedy and seeded sampled outputs are token for token plain decoding's,
    alone and in a batch (k shrinks as rows join), with drafts accepted (the prompts repeat themselves), across the
    rings' ends (a rejected draft's writes roll back without losing what the window needs)."""
    model = drafting
    p = params(max_new_tokens=40, **({"temperature": 1.0, "seed": 3} if sampled else {}))
    alone = [model.generate_text(x, p) for x in REPEATING]
    for rows in (1, 3):
        scheduler = Scheduler(model, ServeOptions(max_batch_size=rows, speculative="ngram",
                                                  num_speculative_tokens=4)).start()
        try:
            collectors = [Collector() for _ in REPEATING]
            for prompt, collector in zip(REPEATING, collectors):
                scheduler.submit(model.tokenizer.encode(prompt), p, collector)
            assert all(c.done.wait(60) for c in collectors)
        finally:
            scheduler.stop()
        assert [c.text for c in collectors] == alone
        if not sampled:
            assert scheduler.spec_stats.num_accepted_tokens > 0


def test_speculation_through_the_python_api_and_the_cli(drafting):
    from click.testing import CliRunner

    from runtime.cli import main

    model = drafting
    p = params(max_new_tokens=30)
    plain = model.generate_text(REPEATING[1], p)
    assert "".join(model.stream(REPEATING[1], p, speculative="ngram", num_speculative_tokens=3)) == plain
    assert model.generate_text(REPEATING[1], p, speculative="ngram") == plain
    engine = model.engine("ngram")  # the engine the last call used (k = 4), its counters
    assert engine.spec_stats.num_drafts > 0 and engine.spec_stats.num_accepted_tokens > 0
    folder = str(model.manifest.folder)
    printed = CliRunner().invoke(main, ["generate", folder, REPEATING[1], "-n", "30", "--speculative", "ngram"])
    assert printed.exit_code == 0 and printed.output == plain + "\n"
    bad = CliRunner().invoke(main, ["generate", folder, "x", "--speculative", "ngram", "--num-speculative-tokens", "99"])
    assert bad.exit_code == 2 and "num_speculative_tokens 99 is out of range" in bad.output
    chat = model.chat_session(params(max_new_tokens=6), speculative="ngram")
    first, second = "".join(chat.send("a")), "".join(chat.send("b"))
    rendered = model.apply_chat_template(chat.messages[:3])
    assert second == model.generate_text(rendered, params(max_new_tokens=6), chat=True) and first


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_a_draft_artifact_drafts_and_the_output_is_the_targets(drafting, tiny_text_artifacts, sampled):
    """--speculative DIR: a draft artifact's rows beside the target's. The draft here is the target's weights in
    another layout (--logits all, rings), so under greedy every draft token is accepted; the outputs are plain
    decoding's, alone and in a batch, greedy and seeded."""
    model = drafting
    p = params(max_new_tokens=24, **({"temperature": 1.0, "seed": 5} if sampled else {}))
    alone = [model.generate_text(x, p) for x in PROMPTS[:3]]
    for rows in (1, 3):
        scheduler = Scheduler(model, ServeOptions(max_batch_size=rows, speculative=str(tiny_text_artifacts["static"]),
                                                  num_speculative_tokens=3)).start()
        try:
            collectors = [Collector() for _ in PROMPTS[:3]]
            for prompt, collector in zip(PROMPTS[:3], collectors):
                scheduler.submit(model.tokenizer.encode(prompt), p, collector)
            assert all(c.done.wait(60) for c in collectors)
        finally:
            scheduler.stop()
        assert [c.text for c in collectors] == alone
        stats = scheduler.spec_stats
        assert stats.num_draft_tokens > 0
        if not sampled:
            assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_a_draft_that_cannot_draft_for_the_target_is_refused(drafting, tmp_path, tiny_text_artifacts):
    with pytest.raises(ParamError, match="speculative 'nope' is neither ngram nor an artifact directory"):
        Scheduler(drafting, ServeOptions(speculative="nope"))
    other = add_text_files(tiny_text_artifacts["static"], tmp_path / "other")
    manifest = read_manifest(other, verify=False)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace("<unk>", "<unknown>"))
    write_manifest(other, manifest)
    with pytest.raises(ParamError, match="does not have the target's tokenizer.json"):
        Scheduler(drafting, ServeOptions(speculative=str(other)))


def test_a_graph_without_logits_for_k_positions_is_refused_with_the_fix(tiny_text_artifacts):
    from runtime.serving.scheduler import NotServable

    import dataclasses

    model = runtime.load(tiny_text_artifacts["static"])  # --logits all: takes it; make one that does not
    model.manifest = dataclasses.replace(model.manifest, graph=dataclasses.replace(model.manifest.graph, logits="last"))
    with pytest.raises(NotServable, match="returns the last position's logits only.*num_logits_to_keep"):
        Scheduler(model, ServeOptions(speculative="ngram"))


def test_a_windowed_prefix_is_reusable_exactly_while_no_compaction_came_between(fused):
    """GroupQueryAttention's windowed cache, 16 slots for window 8: it compacts 9 slots at once, so after n tokens
    a row holds its latest resident(n) = n - 9 * ceil((n - 16) / 9) from slot 0. Of 30 tokens (12 held), a prefix of
    m is whole while resident(m) = 12 - (30 - m): m >= 26. At m = 26 the logits after the kept prefix equal a fresh
    computation's; m = 25 is refused. An idle row in a run writes a dummy token: a row of 15 keeps its tokens, a row of
    16 compacts and loses them (the cache forgets the row)."""
    model = runtime.load(fused["window"])
    kv = model.manifest.kv
    assert (kv.sliding_window, kv.window_slots, kv.resident(30)) == (8, 16, 12)
    rng = np.random.default_rng(0)
    tokens = rng.integers(7, 500, size=30)
    cont = rng.integers(7, 500, size=3)

    def filled(cache, row, ids):
        for start in range(0, len(ids), 8):
            cache.feed(slice(row, row + 1), ids[None, start:start + 8])

    def fresh(prefix):
        cache = KVCache(model.backend, 1)
        filled(cache, 0, prefix)
        return cache.feed(slice(0, 1), cont[None])[0]

    def reused(m, force=False):
        cache = KVCache(model.backend, 1)
        filled(cache, 0, tokens)
        assert cache.reusable(0, m) == (m >= 26)
        if force:  # what keep() refuses: cut the row anyway
            del cache.tokens[0][m:]
            cache.lengths[0] = m
        else:
            cache.keep(0, m)
        return cache.feed(slice(0, 1), cont[None])[0]

    np.testing.assert_allclose(reused(26), fresh(tokens[:26]), atol=1e-5)
    assert np.abs(reused(25, force=True) - fresh(tokens[:25])).max() > 1e-3
    with pytest.raises(ValueError, match="cannot keep 25 tokens"):
        reused(25)

    for held, kept in ((15, True), (16, False)):
        cache = KVCache(model.backend, 2)
        filled(cache, 0, tokens[:held])
        filled(cache, 1, tokens[:5])
        cache.feed(slice(0, 2), np.array([[7], [9]]), active=np.array([False, True]))  # row 0 idle
        assert cache.lengths[0] == (held if kept else 0)
        if kept:
            np.testing.assert_allclose(cache.feed(slice(0, 1), cont[None])[0], fresh(tokens[:held]), atol=1e-5)

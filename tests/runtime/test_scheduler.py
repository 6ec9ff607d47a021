"""The serving scheduler in this process, on tiny-gemma3 with the tiny tokenizer: requests that arrive together
with prompts of different lengths, prefilled in chunks (neighbouring rows together where the graph allows) and
decoded together, each give what they give alone; on the unfused static graph, its sliding-window layers on a ring
of 16 slots (window 8, chunks of at most 8 that do not cross its end), and on the GroupQueryAttention one with
every layer's cache full (the kernel takes one row when a chunk continues a cache)."""

from __future__ import annotations

import threading

import pytest

import runtime
from runtime.serving.scheduler import Failed, Finished, Piece, QueueFull, Scheduler

from .conftest import add_text_files

PROMPTS = ["The capital of France is", "Paris", "a b c d e f g h the of and", "the of", "France is the capital",
           "is a in to"]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    from exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("fused")
    export("random:tiny-gemma3", root / "plain", ExportOptions(target="ort", kv_cache="static", max_length=64,
                                                                sliding_cache="full", verify=False, progress=False))
    return add_text_files(root / "plain", root / "text")


@pytest.fixture(params=["unfused", "fused"])
def model(request, tiny_text_artifacts, fused):
    folder = tiny_text_artifacts["static"] if request.param == "unfused" else fused
    loaded = runtime.load(folder)
    assert ("group_query_attention" in loaded.manifest.fusions) == (request.param == "fused")
    assert loaded.manifest.kv.sliding_cache == ("full" if request.param == "fused" else "ring")
    return loaded


class Collector:
    def __init__(self):
        self.pieces, self.finished, self.done = [], None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Piece):
            self.pieces.append(event.text)
        elif isinstance(event, (Finished, Failed)):  # a Failed is no Finished: the assertions on it fail
            self.finished = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def options(**kw):
    return runtime.GenerationOptions(**{"max_new_tokens": 12, **kw})


def test_requests_arriving_together_are_each_what_they_give_alone(model):
    alone = [model.generate_text(p, options()) for p in PROMPTS]
    scheduler = Scheduler(model, max_batch_size=4, max_queue=8, prefill_chunk=3).start()
    try:
        collectors = [Collector() for _ in PROMPTS]
        for prompt, collector in zip(PROMPTS, collectors):  # 6 requests, 4 rows: two wait for a free row
            scheduler.submit(model.tokenizer.encode(prompt), options(), collector)
        assert all(c.done.wait(60) for c in collectors)
    finally:
        scheduler.stop()
    assert [c.text for c in collectors] == alone
    assert all(c.finished.prompt_tokens == len(model.tokenizer.encode(p)) for c, p in zip(collectors, PROMPTS))


def test_a_seeded_request_samples_the_same_whatever_shares_the_batch(model):
    sampled = options(temperature=0.9, top_p=0.9, seed=3)
    alone = model.generate_text(PROMPTS[0], sampled)
    scheduler = Scheduler(model, max_batch_size=3, prefill_chunk=4).start()
    try:
        others = [Collector() for _ in range(2)]
        for prompt, collector in zip(PROMPTS[1:], others):
            scheduler.submit(model.tokenizer.encode(prompt), options(temperature=1.0, seed=None), collector)
        mine = Collector()
        scheduler.submit(model.tokenizer.encode(PROMPTS[0]), sampled, mine)
        assert mine.done.wait(60) and all(c.done.wait(60) for c in others)
    finally:
        scheduler.stop()
    assert mine.text == alone


def test_cancel_frees_the_row_and_a_full_queue_is_refused(model):
    scheduler = Scheduler(model, max_batch_size=1, max_queue=1).start()
    try:
        running, go = threading.Event(), threading.Event()

        class Holding(Collector):  # holds the scheduler at its first piece: the request is in its row meanwhile
            def __call__(self, event):
                super().__call__(event)
                if isinstance(event, Piece) and not running.is_set():
                    running.set()
                    go.wait(30)

        long, waiting = Holding(), Collector()
        first = scheduler.submit(model.tokenizer.encode(PROMPTS[0]), options(max_new_tokens=40), long)
        assert running.wait(30) and scheduler.running == 1
        scheduler.submit(model.tokenizer.encode(PROMPTS[1]), options(), waiting)
        with pytest.raises(QueueFull, match="--max-queue 1"):
            scheduler.submit(model.tokenizer.encode(PROMPTS[2]), options(), Collector())
        scheduler.cancel(first)
        go.set()
        assert long.done.wait(60) and long.finished.reason == "cancelled" and long.finished.completion_tokens < 40
        assert waiting.done.wait(60) and waiting.text == model.generate_text(PROMPTS[1], options())
        assert scheduler.running == 0 and scheduler.queued == 0
    finally:
        scheduler.stop()


def test_a_dynamic_layout_artifact_is_refused_with_the_export_line(tiny_text_artifacts):
    from runtime.serving.scheduler import NotServable

    with pytest.raises(NotServable, match="dynamic KV layout.*--kv-cache static"):
        Scheduler(runtime.load(tiny_text_artifacts["dynamic"]))

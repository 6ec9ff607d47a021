"""Continuous batching: one thread owns the backend and its KV buffers, and requests come and go between steps.

    scheduler = Scheduler(runtime.load(DIR), max_batch_size=8)
    scheduler.start()
    request = scheduler.submit(prompt_ids, options, on_event)     # QueueFull when --max-queue are waiting
    ...  on_event(Piece(text, tokens, logprobs)) ... on_event(Finished(reason, prompt_tokens, completion_tokens))
    scheduler.cancel(request)                                     # its row is free at the next step boundary
    scheduler.stop()

A step of the loop:
    1. rows whose request ended or was cancelled are freed;
    2. waiting requests take the free rows (lowest first, so the rows in use stay packed at the front);
    3. the request that waited longest feeds one chunk of its prompt (at most `prefill_chunk` tokens), with its
       prefilling neighbours in the buffers when they have as much left (one run, each row at its own position):
       while rows decode, the run holds one chunk's worth of tokens, so they wait for one chunk at most; when
       none does, every ready row prefills at once; a row's last chunk gives its first token;
    4. every row from 0 to the last decoding one decodes one token (runtime.generate.decode_rows: each row
       after its own length; a row in between that is free or prefilling decodes a dummy token into its next
       slot, which its own next write overwrites, and keeps its length).
Each request has its own sampler (its options and seed: a seeded request samples the same whatever shares the
batch), its own text stream (stop strings held back, runtime.generate.TextStream), and ends at an end token, a
stop string, max_new_tokens or its cancellation. `on_event` is called from the scheduler's thread: the HTTP
layer hands events to its event loop with call_soon_threadsafe; Triton's model.py sends them as they come.

The static KV layout only: every row has its own length (docs/serving.md has the export line).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..generate import ContextLengthError, TextStream, decode_rows, fit_new_tokens, prefill_rows
from ..sampling import log_softmax_top
from .options import DEFAULT_PREFILL_CHUNK

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """As many requests as --max-queue are waiting already; try again later (HTTP 429)."""


class NotServable(ValueError):
    """The artifact cannot be served as it is; the message says how to export one that can."""


@dataclass(frozen=True)
class Piece:
    """Text the completion gained, the tokens that made it since the last piece, and (when asked) their
    log-probabilities."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple = ()  # per token: (logprob, ((token, logprob), ...) of the top alternatives)


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end token or stop string), "length" (max_new_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(eq=False)
class Request:
    ids: list[int]
    options: object  # runtime.GenerationOptions
    on_event: Callable[[object], None]
    max_new_tokens: int
    logprobs: int | None = None  # top alternatives to report per token (0: only the chosen one's); None: none
    ignore_eos: bool = False  # go on past end tokens, to max_new_tokens
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    """A request in a row of the KV buffers."""

    request: Request
    index: int
    sampler: Callable
    text: TextStream
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens whose text is held back (a character, a stop string)
    pending_logprobs: list = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.ids)

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill."""
        return len(self.request.ids) - self.prefilled


def check_servable(manifest) -> None:
    """NotServable, with the export line that fits, for an artifact the scheduler cannot run."""
    if manifest.kv is None:
        raise NotServable(f"{manifest.folder} was exported for {manifest.graph.task}; serving needs text-generation")
    if manifest.kv.layout != "static":
        raise NotServable(
            f"{manifest.folder} has the dynamic KV layout, whose rows share one length; serving needs the static "
            f"layout, where each row has its own: gemma-export --model {manifest.source or 'SOURCE'} --output DIR "
            "--target ort --kv-cache static --max-length 4096 --logits last"
        )
    if not manifest.path("tokenizer.json").is_file():
        raise NotServable(f"{manifest.folder} has no tokenizer.json; serving takes text (export with --tokenizer DIR)")


class Scheduler:
    def __init__(self, model, max_batch_size: int = 8, max_queue: int = 64,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, metrics=None):
        check_servable(model.manifest)
        backend = model.backend
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive integer")
        self.model, self.backend = model, backend
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_chunk = min(prefill_chunk, backend.max_chunk or prefill_chunk)
        self.context_length = model.context_length
        self.metrics = metrics
        backend.reset(max_batch_size, backend.max_length)
        self.rows: list[_Row | None] = [None] * max_batch_size
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- the API the front ends use --------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="gemma-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, ids: list[int], options, on_event, logprobs: int | None = None,
               ignore_eos: bool = False) -> Request:
        """Queue a request; ValueError (the options, a prompt over the context) or QueueFull, at once."""
        options.check()
        if not ids:
            raise ValueError("the prompt has no tokens")
        max_new = fit_new_tokens(len(ids), options.max_new_tokens, self.context_length, static=True)
        request = Request(list(ids), options, on_event, max_new, logprobs, ignore_eos, next(self._ids))
        with self._wake:
            if not self.alive:
                raise RuntimeError("the scheduler is not running")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            self.waiting.append(request)
            self._wake.notify()
        self._gauges()
        return request

    def cancel(self, request: Request) -> None:
        """End the request: a waiting one leaves the queue, a running one frees its row at the next step."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the requests under way (and waiting) have finished, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while (self.waiting or any(self.rows)) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(min(left, 0.1))
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not any(self.rows):
                    self._wake.wait()
                if self._stopping:
                    for request in [*self.waiting, *(r.request for r in self.rows if r)]:
                        self._end(request, "cancelled")
                    return
                self._retire_cancelled()
                self._admit()
            try:
                self._step()
            except Exception as e:  # a bug or a failing backend: every request under way learns it, the loop goes on
                log.exception("scheduler step failed")
                for index, row in enumerate(self.rows):
                    if row is not None:
                        row.request.on_event(Failed(f"{type(e).__name__}: {e}"))
                        self._free(index)
            self.steps += 1
            self._gauges()

    def _retire_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._end(request, "cancelled")
        for index, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._end(row.request, "cancelled", len(row.generated))
                self._free(index)

    def _admit(self) -> None:
        while self.waiting and None in self.rows:
            request = self.waiting.popleft()
            index = self.rows.index(None)
            options = request.options
            eos = () if request.ignore_eos else self.model.eos_token_ids
            self.rows[index] = _Row(request, index, options.sampler(),
                                    TextStream(self.model.tokenizer, eos, options.stop_strings))
            self.backend.lengths[index] = 0  # the row's earlier request is forgotten: its slots are overwritten

    def _step(self) -> None:
        group, size = self._prefill_group()
        if group:
            chunk = np.array([row.request.ids[row.prefilled: row.prefilled + size] for row in group], np.int64)
            logits = prefill_rows(self.backend, slice(group[0].index, group[-1].index + 1), chunk)
            for row, row_logits in zip(group, logits):
                row.prefilled += size
                if row.decoding:
                    self._sample(row, row_logits)
        decoding = [row for row in self.rows if row is not None and row.decoding and row.generated]
        if not decoding:
            return
        last = max(row.index for row in decoding)
        tokens = np.zeros(last + 1, np.int64)
        for row in decoding:
            tokens[row.index] = row.generated[-1]
        kept = self.backend.lengths[: last + 1].copy()
        logits = decode_rows(self.backend, tokens, slice(0, last + 1))
        active = {row.index for row in decoding}
        for index in range(last + 1):  # rows that only came along keep their length
            if index not in active:
                self.backend.lengths[index] = kept[index]
        for row in decoding:
            self._sample(row, logits[row.index])

    def _prefill_group(self) -> tuple[list[_Row], int]:
        """The rows that prefill this step: the request that waited longest, and its neighbours in the buffers
        that are prefilling too, with as many tokens left at least, each taking a chunk of the same size (their
        own positions: runtime.generate.prefill_rows). While rows are decoding, the group holds one chunk's worth
        of tokens (they wait for one chunk at most); when none is, as many rows as are ready (nobody waits)."""
        prefilling = [row for row in self.rows if row is not None and not row.decoding]
        if not prefilling:
            return [], 0
        oldest = min(prefilling, key=lambda r: r.request.submitted)
        size = min(self.prefill_chunk, oldest.remaining, self.backend.chunk_limit(oldest.prefilled) or oldest.remaining)
        decoding = any(row is not None and row.decoding for row in self.rows)
        budget = max(1, self.prefill_chunk // size) if decoding else len(self.rows)

        over_cache = self.backend.rows_prefill_over_cache

        def joins(index: int) -> bool:
            row = self.rows[index] if 0 <= index < len(self.rows) else None
            return (row is not None and not row.decoding and row.remaining >= size
                    and (self.backend.chunk_limit(row.prefilled) or size) >= size  # a ring's room
                    and (over_cache or row.prefilled == 0 == oldest.prefilled))

        first = last = oldest.index
        while last - first + 1 < budget and (joins(first - 1) or joins(last + 1)):
            if joins(last + 1):
                last += 1
            else:
                first -= 1
        return self.rows[first:last + 1], size

    def _sample(self, row: _Row, logits: np.ndarray) -> None:
        """The row's next token from the logits of its last one: emit its text, or end the request."""
        request = row.request
        history = np.array([request.ids + row.generated], np.int64) if request.options.use_history else None
        token = int(row.sampler(logits[None], history)[0])
        row.generated.append(token)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
            if self.metrics:
                self.metrics.first_token(request.first_token_at - request.submitted)
        elif self.metrics:
            self.metrics.token_latency(time.perf_counter() - row.last_token_at)
        row.last_token_at = time.perf_counter()
        row.pending.append(token)
        if request.logprobs is not None:
            row.pending_logprobs.append(log_softmax_top(logits, token, request.logprobs))
        piece = row.text.push(token)
        done = row.text.stopped or len(row.generated) >= request.max_new_tokens
        if done:
            piece += row.text.finish()
        if piece or done:  # the tokens since the last piece go with the text they made
            request.on_event(Piece(piece, tuple(row.pending), tuple(row.pending_logprobs)))
            row.pending.clear()
            row.pending_logprobs.clear()
        if done:
            self._end(request, "stop" if row.text.stopped else "length", len(row.generated))
            self._free(row.index)

    def _end(self, request: Request, reason: str, generated: int = 0) -> None:
        request.on_event(Finished(reason, len(request.ids), generated))
        if self.metrics:
            self.metrics.finished(reason, len(request.ids), generated)

    def _free(self, index: int) -> None:
        self.rows[index] = None
        self.backend.lengths[index] = 0  # a free row decodes a dummy token into slot 0 when it lies in the range
        with self._wake:
            self._wake.notify_all()  # stop() may be waiting for the rows to empty

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.rows(self.running, self.queued)


__all__ = ["Scheduler", "check_servable", "Request", "Piece", "Finished", "Failed", "QueueFull", "NotServable", "ContextLengthError",
           "DEFAULT_PREFILL_CHUNK"]

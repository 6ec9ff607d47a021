"""The serving engine: continuous batching over one backend, in one thread.

    scheduler = Scheduler(model, ServeOptions(...), metrics).start()
    requests = scheduler.submit(prompt_ids, SamplingParams(...), on_event, n=1)   refused at once: QueueFull,
                                                                                  ParamError, ContextLengthError
    scheduler.cancel(request)

One state per request, as vLLM's v1 scheduler keeps it: its tokens (the prompt, then what it generated) and how
many of them its row's KV holds (`computed`); no prefill or decode phase. A step

    plan      which rows feed how many tokens: a request whose tokens are all computed but its last sampled one
              decodes it (one run over the rows between the first and last such request); prompts catch up in
              chunks, within a token budget while others decode, rows of one chunk size together (one more run)
    execute   the runs, through the KV manager (runtime/kv.py), the one writer of the cache
    update    each request whose tokens are all computed samples its next token from its logits, hands its text
              on, and ends (an end token, a stop string, max tokens, a cancellation)

            submit ──> waiting ──admit──> running ──update──> finished
                                   │  row (prefix reused or copied)      │ the row keeps its tokens: the
                                   │  computed = the prefix's length     │ prefix cache for the next request
                                   └─ a follower waits for a running request that is computing its prefix

Admission (`_admit`): a request takes a row and keeps the longest prefix of its prompt that any row holds: in
place when that row is free (and holds little beyond it), else copied from it (a busy row, or a free one better
kept) into the least recently used free row. A request whose prefix a running request is still computing follows
it and copies the prefix once computed. n > 1: the siblings follow the first over the whole prompt and sample their
first tokens from its logits, each with its own seed (seed + index, as vLLM).

Each request has its own sampler (a seeded request samples the same whatever shares the batch), its own text
stream (stop strings held back, runtime.generate.TextStream), and its events go to `on_event`, called from the
scheduler's thread: the HTTP layer hands them to its event loop; Triton's model.py sends them as they come.
The static KV layout only: every row has its own length (docs/serving.md has the export line).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..generate import ContextLengthError, TextStream, fit_new_tokens
from ..kv import KVCache
from ..params import ParamError, SamplingParams
from ..sampling import log_softmax_top
from ..speculative import DraftModel, NgramProposer, SpecDecodeStats, verify
from .options import ServeOptions

log = logging.getLogger(__name__)

COPY_MIN_TOKENS = 16  # a prefix shorter than this is computed again rather than copied (docs/serving.md)
SPEC_TOKEN_BUDGET = 8  # tokens a speculative decode run feeds in all: k = budget // rows - 1 (docs/speculative.md)


class QueueFull(RuntimeError):
    """As many requests as rows and --max-queue are in already; try again later (HTTP 429)."""


class NotServable(ValueError):
    """The artifact cannot be served as it is; the message says how to export one that can."""


@dataclass(frozen=True)
class Piece:
    """Text the completion gained, the tokens that made it since the last piece, and (when asked) their
    log-probabilities. `index`: the choice (n > 1)."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple = ()  # per token: (logprob, ((token, logprob), ...) of the top alternatives)
    index: int = 0


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end token or stop string), "length" (max_new_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    index: int = 0


@dataclass(frozen=True)
class Failed:
    message: str
    index: int = 0


@dataclass(frozen=True)
class Output:
    """How a request's tokens become its output beyond SamplingParams: a grammar they must follow
    (runtime/serving/grammar.py: structured outputs, a forced tool call), special tokens kept in the text (a native
    tool call's), and end tokens of the request's format beside the model's."""

    grammar: object | None = None  # grammar.Grammar
    special_tokens: bool = False
    end_tokens: tuple[int, ...] = ()


@dataclass(eq=False)
class Request:
    """One completion's state: its tokens and how many its row's KV holds."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[object], None]
    max_new_tokens: int
    output: Output = Output()
    id: int = 0
    index: int = 0  # the choice of an n > 1 request
    tokens: list[int] = field(default_factory=list)  # the prompt, then the generated tokens
    computed: int = 0  # tokens whose KV the row holds
    row: int | None = None
    cached: int = 0  # prompt tokens that came from the prefix cache
    leader: Request | None = None  # the running request computing this one's prefix
    follows: int = 0  # how many of the leader's tokens this one copies once computed
    siblings: list[Request] = field(default_factory=list)  # n > 1: the choices that sample from this one's logits
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    sampler: Callable | None = None
    matcher: object | None = None  # grammar.Matcher: which tokens may come next
    proposer: object | None = None  # speculative.NgramProposer or DraftRow: drafts for it
    text: TextStream | None = None
    pending: list[int] = field(default_factory=list)  # tokens whose text is held back (a character, a stop string)
    pending_logprobs: list = field(default_factory=list)

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def waiting_for_leader(self) -> bool:
        return self.leader is not None


@dataclass(frozen=True)
class Run:
    """One backend run of the plan: rows [start, stop), each feeding `size` tokens; `requests` the ones fed (the
    other rows in the range are idle). A decode run may carry drafts (speculative decoding): each request feeds its
    last token, its draft and filler up to `size`; the logits of every position come back for verification."""

    rows: slice
    size: int
    requests: tuple[Request, ...]
    drafts: dict | None = None  # Request -> its draft tokens (a speculative decode run)


def check_servable(manifest, options: ServeOptions | None = None) -> None:
    """NotServable, with the export line that fits, for an artifact the scheduler cannot run (with `options`)."""
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
    if options is not None and options.speculative and not (manifest.graph.logits == "all"
                                                            or manifest.graph.keeps_logits):
        raise NotServable(f"{manifest.folder} returns the last position's logits only; speculative decoding verifies "
                          "k + 1 positions in one run: export it again (its graph then takes num_logits_to_keep) or "
                          "with --logits all")
    if options is not None and options.speculative not in (None, "ngram") and not (
            Path(options.speculative) / "manifest.json").is_file():
        raise ParamError("speculative", f"speculative {options.speculative!r} is neither ngram nor an artifact "
                                        "directory (no manifest.json there)")


def draft_model(model, options: ServeOptions) -> DraftModel:
    """--speculative DIR: the draft artifact, loaded as the target was, with rows beside the target's; ParamError
    naming `speculative` when it cannot draft for this target."""
    from ..manifest import ArtifactError
    from ..model import load

    folder = Path(options.speculative)
    try:
        # the draft and the target run in turn: the draft's threads sleep between its runs (--no-spin does it for
        # the target's too: docs/speculative.md has both figures)
        draft = load(folder, options.load.replace(spin=False))
    except ArtifactError as e:
        raise ParamError("speculative", f"the draft artifact cannot be loaded: {e}") from None
    target_tokenizer, draft_tokenizer = model.manifest.path("tokenizer.json"), draft.manifest.path("tokenizer.json")
    if (not draft_tokenizer.is_file() or draft_tokenizer.read_bytes() != target_tokenizer.read_bytes()
            or draft.manifest.model.vocab_size != model.manifest.model.vocab_size):
        raise ParamError("speculative", f"the draft artifact {folder} does not have the target's tokenizer.json: "
                                        "draft with an export of a model of the same family and vocabulary")
    if draft.manifest.kv is None or draft.manifest.kv.layout != "static":
        raise ParamError("speculative", f"the draft artifact {folder} needs the static layout (each row its own "
                                        "length): export it with --kv-cache static")
    return DraftModel(draft, options.max_batch_size)


class Scheduler:
    def __init__(self, model, options: ServeOptions | None = None, metrics=None):
        self.options = options = options or ServeOptions()
        check_servable(model.manifest, options)
        self.model = model
        self.kv = KVCache(model.backend, options.max_batch_size)
        self.prefill_chunk = min(options.prefill_chunk, model.backend.max_chunk or options.prefill_chunk)
        self.context_length = model.context_length
        self.metrics = metrics
        self.owner: list[Request | None] = [None] * options.max_batch_size  # the request in each row
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.speculative = options.speculative
        self.draft = draft_model(model, options) if self.speculative not in (None, "ngram") else None
        self.spec_stats = SpecDecodeStats(options.num_speculative_tokens)
        self._grammar_info = None
        self._masks = None  # grammar.MaskBatch, made for the first constrained request
        self._masked = False
        self.steps = 0
        self.prefilled_tokens = 0  # prompt tokens computed (not from the cache): what prefix reuse saves

    # -- the API the front ends use --------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="gemma-scheduler", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, prompt: list[int], params: SamplingParams, on_event, n: int = 1,
               output: Output = Output()) -> list[Request]:
        """Queue a request (n choices of it); ParamError (n, a prompt over the context) or QueueFull, at once."""
        if not prompt:
            raise ParamError("prompt", "the prompt has no tokens")
        rows = self.options.max_batch_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= rows:
            raise ParamError("n", f"n {n!r} is out of range; this server decodes at most {rows} choices together "
                                  "(--max-batch-size)")
        if n > 1 and not self.kv.can_copy:
            raise ParamError("n", f"n {n} needs a backend that copies KV rows (the choices share the prompt's); this "
                                  "one cannot: send n requests instead")
        max_new = fit_new_tokens(len(prompt), params.max_new_tokens, self.context_length, static=True)
        first = next(self._ids)
        group = []
        for index in range(n):
            seeded = params if params.seed is None or index == 0 else params.replace(seed=params.seed + index)
            group.append(Request(list(prompt), seeded, on_event, max_new, output, first, index))
        group[0].siblings = group[1:]
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler is stopping")
            taken = sum(r is not None for r in self.owner) + len(self.waiting)
            if taken + n > rows + self.options.max_queue:
                raise QueueFull(f"{taken} requests are running or waiting already ({rows} rows, --max-queue "
                                f"{self.options.max_queue})")
            self.waiting.extend(group)
            self._wake.notify()
        self._gauges()
        return group

    def cancel(self, request: Request | list[Request]) -> None:
        """End the request (each of a list): a waiting one leaves the queue, a running one frees its row at the
        next step."""
        with self._wake:
            for r in request if isinstance(request, list) else [request]:
                r.cancelled = True
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the requests under way (and waiting) have finished, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while (self.waiting or self.running) and self._thread is not None and self._thread.is_alive():
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
        return sum(r is not None for r in self.owner)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    for request in [*self.waiting, *(r for r in self.owner if r)]:
                        self._end(request, "cancelled")
                    if self._masks is not None:
                        self._masks.close()
                    return
            self.step()

    def step(self) -> None:
        """One step: retire the cancelled, admit the waiting, then plan, execute and update."""
        with self._wake:
            self._retire_cancelled()
            self._admit()
        try:
            runs = self.plan()
            self._start_masks(runs)
            outputs = []
            for run in runs:
                outputs.append(self.execute(run))
                if self._forgotten():  # the runs planned after it counted on what a row held
                    break
            self.update(runs[:len(outputs)], outputs)
        except Exception as e:  # a bug or a failing backend: every request under way learns it, the loop goes on
            log.exception("scheduler step failed")
            for request in [r for r in self.owner if r is not None]:
                request.on_event(Failed(f"{type(e).__name__}: {e}", request.index))
                self._free(request)
        self.steps += 1
        self._gauges()

    def _forgotten(self) -> bool:
        """Whether a run just cost a request what its row held: on GroupQueryAttention's windowed cache, the dummy
        token an idle row computes may compact its window, and the cache then forgets the row (runtime/kv.py). The
        request computes its tokens again from the start (they are all kept: prompt and generated)."""
        lost = [r for r in self.owner if r is not None and self.kv.lengths[r.row] < r.computed]
        for r in lost:
            r.computed = r.cached = int(self.kv.lengths[r.row])
        return bool(lost)

    def generate(self, prompt: list[int], params: SamplingParams, output: Output = Output(),
                 tokens: list[int] | None = None) -> Iterator[str]:
        """The calling thread drives the engine instead of the scheduler's (do not start() it): one request, its
        text pieces as they come (its token ids appended to `tokens`). gemma-run generate and chat take this path
        with --speculative."""
        events = []
        [request] = self.submit(prompt, params, events.append, 1, output)
        try:
            while not request.finished:
                self.step()
                for event in events:
                    if isinstance(event, Failed):
                        raise RuntimeError(f"generation failed: {event.message}")
                    if isinstance(event, Piece) and tokens is not None:
                        tokens.extend(event.tokens)
                    if isinstance(event, Piece) and event.text:
                        yield event.text
                events.clear()
        finally:
            if not request.finished:  # the caller stopped reading
                self.cancel(request)
                self.step()

    def _retire_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._end(request, "cancelled")
        for request in [r for r in self.owner if r is not None and r.cancelled]:
            self._end(request, "cancelled")
            self._free(request)

    # -- admission: a row and the prefix it keeps ----------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting:
            head = self.waiting[0]
            group = [head, *head.siblings] if head.index == 0 else [head]
            free = [row for row, r in enumerate(self.owner) if r is None]
            if len(free) < len(group):
                return
            for request in group:
                self.waiting.remove(request)
            self._place(head, free)
            for sibling in group[1:]:  # they copy the first's whole prompt and sample from its logits
                row = self._lru([row for row, r in enumerate(self.owner) if r is None])
                self._take(sibling, row)
                sibling.leader, sibling.follows = head, len(head.prompt)

    def _place(self, request: Request, free: list[int]) -> None:
        """Give `request` a free row and the longest reusable prefix of its prompt it can have: kept in place in the
        row, or copied from another (busy, or free and better kept). Each way scores the prompt tokens it saves less
        the tokens it forgets (what the row held beyond the prefix; a copy costs COPY_MIN_TOKENS more); the best
        score wins, then the least recently used row (docs/serving.md, "Prefix caching")."""
        kv, prompt = self.kv, request.prompt
        if not self.options.prefix_cache:
            row = self._lru(free)
            self._take(request, row)
            kv.clear(row)
            return
        ways = []  # (score, row, source, tokens kept)
        for row in free:
            n = kv.prefix(row, prompt)
            ways.append((n - (len(kv.tokens[row]) - n), row, row, n))
        source, n = kv.best_prefix(prompt, range(len(self.owner)))
        if kv.can_copy and n >= COPY_MIN_TOKENS:
            ways += [(n - COPY_MIN_TOKENS - len(kv.tokens[row]), row, source, n) for row in free if row != source]
        _, row, source, n = max(ways, key=lambda way: (way[0], -kv.used_at[way[1]]))
        self._take(request, row)
        if source == row:
            kv.keep(row, n)
        else:
            kv.copy(source, row, n)
        request.computed = request.cached = n
        leader, ahead = self._computing(request) if kv.can_copy else (None, 0)
        if ahead >= max(n + 1, COPY_MIN_TOKENS):  # a running request is computing a longer prefix: wait for it
            request.leader, request.follows = leader, ahead
        if self.metrics:
            self.metrics.prefix_query(len(prompt))
            self.metrics.prefix_hit(n)

    def _computing(self, follower: Request) -> tuple[Request | None, int]:
        """The running request still computing the longest prefix of `follower`'s prompt, and that prefix's length."""
        best, length = None, 0
        for request in self.owner:
            if (request is None or request is follower or request.leader is not None
                    or request.computed >= len(request.prompt)):
                continue
            n = 0
            for a, b in zip(request.prompt, follower.prompt[:-1]):
                if a != b:
                    break
                n += 1
            if n > length and n > request.computed:
                best, length = request, n
        return best, length

    def _lru(self, rows: list[int]) -> int:
        return min(rows, key=lambda row: (self.kv.used_at[row], row))

    def _take(self, request: Request, row: int) -> None:
        request.row = row
        self.owner[row] = request
        output = request.output
        eos = () if request.params.ignore_eos else (*self.model.eos_token_ids, *output.end_tokens)
        request.sampler = request.params.sampler()
        request.matcher = output.grammar.matcher() if output.grammar is not None else None
        # drafts for requests the verification can take: not a grammar's (its masks would follow each draft token)
        request.proposer = (None if not self.speculative or request.matcher is not None
                            else self.draft.for_row(row) if self.draft else NgramProposer())
        request.text = TextStream(self.model.tokenizer, eos, request.params.stop, output.special_tokens)

    # -- plan, execute, update ---------------------------------------------------------------------------

    def plan(self) -> list[Run]:
        """The runs of this step: the rows feeding one token together, then one chunk of prompt (see the module's
        doc)."""
        running = [r for r in self.owner if r is not None and not r.waiting_for_leader]
        decoding = [r for r in running if len(r.tokens) - r.computed == 1]
        runs = []
        if decoding:
            drafts = self._drafts(decoding) if self.speculative else {}
            size = 1 + max(map(len, drafts.values()), default=0)
            runs.append(Run(slice(decoding[0].row, decoding[-1].row + 1), size, tuple(decoding),
                            drafts if size > 1 else None))
        prompting = [r for r in running if len(r.tokens) - r.computed > 1]
        if prompting:
            runs.append(self._prompt_run(prompting, busy=bool(decoding)))
        return runs

    def _drafts(self, decoding: list[Request]) -> dict:
        """Each decoding request's draft, within the step's budget: the run feeds every row k + 1 tokens, so k
        shrinks as rows join (SPEC_TOKEN_BUDGET; in a full batch there is no room left, and no speculation: a
        decode step is then bound by compute, not by reading the weights); a row alone drafts all it may. A draft
        stays within the request's max tokens, its row's chunk limit (a ring) and its buffers. A step with a
        constrained request drafts nothing: verification does not follow a grammar's masks."""
        k = self.options.num_speculative_tokens
        if len(decoding) > 1:
            k = min(k, SPEC_TOKEN_BUDGET // len(decoding) - 1)
        if (k < 1 or (len(decoding) > 1 and not self.kv.rows_over_cache)  # the kernel takes one such row a run
                or any(r.matcher is not None for r in decoding)):
            return {}
        # every row of the run feeds k + 1 tokens (filler after a shorter draft, a dummy in an idle row): within
        # each one's chunk limit (a ring's end) and buffers
        for row in range(decoding[0].row, decoding[-1].row + 1):
            length = int(self.kv.lengths[row])
            k = min(k, (self.kv.chunk_limit(length) or k + 1) - 1, self.kv.max_length - length - 1,
                    self.kv.rollback_room(length, k + 1) - 1)
        drafts = {}
        for r in decoding:
            room = min(k, r.max_new_tokens - r.generated - 1)
            if r.proposer is not None and room > 0:
                drafts[r] = r.proposer.propose(r.tokens, room)
        return drafts

    def _prompt_run(self, prompting: list[Request], busy: bool) -> Run:
        """The request that waited longest, and its neighbours in the rows whose prompts have as many tokens left at
        least, each feeding a chunk of the same size. While rows decode the run holds one chunk's worth of tokens
        (they wait for one chunk at most); when none does, as many rows as are ready."""
        oldest = min(prompting, key=lambda r: r.submitted)
        left = len(oldest.tokens) - oldest.computed
        size = min(self.prefill_chunk, left, self.kv.chunk_limit(oldest.computed) or left)
        budget = max(1, self.prefill_chunk // size) if busy else len(self.owner)
        by_row = {r.row: r for r in prompting}
        over_cache = self.kv.rows_over_cache

        def joins(row: int) -> bool:
            r = by_row.get(row)
            return (r is not None and len(r.tokens) - r.computed >= size
                    and (self.kv.chunk_limit(r.computed) or size) >= size  # a ring's room
                    and (over_cache or r.computed == 0 == oldest.computed))

        first = last = oldest.row
        while last - first + 1 < budget and (joins(first - 1) or joins(last + 1)):
            if joins(last + 1):
                last += 1
            else:
                first -= 1
        return Run(slice(first, last + 1), size, tuple(by_row[row] for row in range(first, last + 1)))

    def execute(self, run: Run) -> np.ndarray:
        """The run's logits [rows, V]: each fed request's tokens after what its row holds; idle rows in the range
        compute a dummy token that their cache does not keep."""
        n = run.rows.stop - run.rows.start
        ids = np.zeros((n, run.size), np.int64)
        active = np.zeros(n, bool)
        for r in run.requests:
            i = r.row - run.rows.start
            fed = r.tokens[r.computed:r.computed + run.size]
            if run.drafts is not None:  # the last token, the draft, then filler (its positions are rolled back)
                fed = [*fed, *run.drafts.get(r, ())]
                fed += fed[-1:] * (run.size - len(fed))
            ids[i] = fed
            active[i] = True
        return self.kv.feed(run.rows, ids, active=active, keep=run.size if run.drafts is not None else 1)

    def _start_masks(self, runs: list[Run]) -> None:
        """The grammar masks of the requests that sample after this step, computed while the model runs
        (grammar.MaskBatch, llguidance's threads): collected in update()."""
        sampling = [r for run in runs for r in run.requests if r.computed + run.size == len(r.tokens)]
        sampling += [s for r in sampling if not r.generated for s in r.siblings if not s.finished]
        constrained = [(r.row, r.matcher) for r in sampling if r.matcher is not None]
        self._masked = bool(constrained)
        if constrained:
            if self._masks is None:
                from . import grammar

                self._masks = grammar.MaskBatch(self.grammar_info, len(self.owner))
            self._masks.start(constrained)

    @property
    def grammar_info(self):
        """llguidance's view of the tokenizer (runtime/serving/grammar.py), built on first use (about 2 s for a
        262k vocabulary: `warm_grammar` builds it ahead)."""
        with self._wake:
            if self._grammar_info is None:
                from . import grammar

                self._grammar_info = grammar.TokenizerInfo(self.model.tokenizer, self.model.eos_token_ids,
                                                           self.model.manifest.model.vocab_size)
        return self._grammar_info

    def warm_grammar(self) -> None:
        """Build the grammar engine's tokenizer in a thread, so the first structured request does not wait."""
        def build():
            try:
                self.grammar_info.ll
            except Exception as e:  # llguidance missing: a structured request will say so
                log.info("the grammar engine is not available: %s", e)

        threading.Thread(target=build, name="gemma-grammar", daemon=True).start()

    def update(self, runs: list[Run], outputs: list[np.ndarray]) -> None:
        masks = self._masks.wait() if self._masked else None
        for run, logits in zip(runs, outputs):
            if run.drafts is not None:
                self._verify(run, logits)
                continue
            for r in run.requests:
                r.computed += run.size
                if not r.generated:
                    self.prefilled_tokens += run.size
                if r.computed < len(r.tokens) or r.finished:
                    continue
                row_logits = logits[r.row - run.rows.start]
                siblings = [s for s in r.siblings if not s.finished] if not r.generated else []
                for sibling in siblings:  # the prompt is computed: the other choices copy it
                    self.kv.copy(r.row, sibling.row, len(r.prompt))
                    sibling.computed = sibling.cached = len(sibling.prompt)
                    sibling.leader = None
                self._sample(r, row_logits, masks)
                for sibling in siblings:  # and sample their first token from the same logits
                    self._sample(sibling, row_logits, masks)
        self._follow()

    def _verify(self, run: Run, logits: np.ndarray) -> None:
        """A speculative decode run's update: each request keeps the longest part of its draft the target accepts and
        the target's token after it, exactly as plain decoding samples (runtime/speculative.py); its row forgets the
        rest of what the run wrote."""
        for r in run.requests:
            rows = logits[r.row - run.rows.start]  # [size, V]: after the last token, then after each draft token
            draft = run.drafts.get(r, [])
            history = np.array([r.tokens], np.int64) if r.params.use_history else None
            accepted, token = verify(draft, rows[:len(draft) + 1], r.params, r.sampler.rng, history=history)
            if draft:
                self.spec_stats.observe(len(draft), len(accepted))
                if self.metrics:
                    self.metrics.speculated(len(draft), len(accepted))
            r.computed += 1 + len(accepted)
            for i, t in enumerate([*accepted, token]):
                if self._emit(r, t, rows[i]):
                    break
            if r.row is not None:
                self.kv.rollback(r.row, r.computed)

    def _follow(self) -> None:
        """Followers whose leader has computed their prefix copy it; those whose leader went away compute it."""
        for request in [r for r in self.owner if r is not None and r.leader is not None]:
            leader = request.leader
            if leader.finished and request in leader.siblings:  # it ended before its prompt was computed
                request.leader = None
            elif leader.computed >= request.follows and request not in leader.siblings:
                if leader.row is not None and self.kv.reusable(leader.row, request.follows):
                    self.kv.copy(leader.row, request.row, request.follows)
                    if self.metrics:
                        self.metrics.prefix_hit(request.follows - request.cached)
                    request.computed = request.cached = request.follows
                request.leader = None
            elif leader.finished:
                request.leader = None

    def _sample(self, request: Request, logits: np.ndarray, masks: np.ndarray | None = None) -> None:
        """The request's next token from the logits of its last one (its grammar's mask applied)."""
        params = request.params
        if request.matcher is not None:
            from .grammar import apply_mask

            logits = apply_mask(np.array(logits, np.float32), masks[request.row])
        history = np.array([request.tokens], np.int64) if params.use_history else None
        token = int(request.sampler(logits[None], history)[0])
        if request.matcher is not None and not request.matcher.accept(token):
            request.on_event(Failed(f"the grammar refused token {token}: {request.matcher.error}", request.index))
            self._end(request, "cancelled")
            self._free(request)
            return
        self._emit(request, token, logits)

    def _emit(self, request: Request, token: int, logits: np.ndarray) -> bool:
        """Append the token and hand on its text; end the request when it is done (True then)."""
        request.tokens.append(token)
        params = request.params
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
            if self.metrics:
                self.metrics.first_token(now - request.submitted)
        elif self.metrics:
            self.metrics.token_latency(now - request.last_token_at)
        request.last_token_at = now
        request.pending.append(token)
        if params.logprobs is not None:
            request.pending_logprobs.append(log_softmax_top(logits, token, params.logprobs))
        piece = request.text.push(token)
        grammar_done = request.matcher is not None and request.matcher.done  # only an end token could come
        done = request.text.stopped or grammar_done or request.generated >= request.max_new_tokens
        if done:
            piece += request.text.finish()
        if piece or done:  # the tokens since the last piece go with the text they made
            request.on_event(Piece(piece, tuple(request.pending), tuple(request.pending_logprobs), request.index))
            request.pending.clear()
            request.pending_logprobs.clear()
        if done:
            self._end(request, "stop" if request.text.stopped or grammar_done else "length")
            self._free(request)
        return done

    def _end(self, request: Request, reason: str) -> None:
        if request.finished:
            return
        request.finished = True
        generated = request.generated
        request.on_event(Finished(reason, len(request.prompt), generated, request.cached, request.index))
        if self.metrics:
            self.metrics.finished(reason, len(request.prompt), generated, time.perf_counter() - request.submitted)

    def _free(self, request: Request) -> None:
        """The request leaves its row; the row keeps the tokens it computed (the prefix cache)."""
        if request.row is not None and self.owner[request.row] is request:
            self.owner[request.row] = None
        request.row = None
        with self._wake:
            self._wake.notify_all()  # stop() may be waiting for the rows to empty

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.rows(self.running, self.queued, len(self.owner))


__all__ = ["Scheduler", "check_servable", "Request", "Output", "Piece", "Finished", "Failed", "QueueFull", "NotServable",
           "ContextLengthError"]

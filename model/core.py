"""The engine core: requests in, results out, one loop for every caller (as nano-vllm's LLMEngine).

    core = EngineCore(inference, tasks, SchedulerConfig(...))
    id = core.add(Request("refer", expression="the red circle"), pixels, size)   # validated here, or raises
    while core.busy:
        for f in core.step():                    # one model call: a prefill or a decode step
            f.id, f.result or f.error

It owns the scheduler (model/scheduler.py: which jobs run, in which rows), the runner (the model call and the
running KV-cache state) and the searches (model/decoding.py, model/regions.py, model/phrases.py), and turns a
finished search into a `Result` (model/requests.py). The server's worker (service/worker.py) drives it with the
clock and its deadlines; the offline predictor (model/predictor.py: `locca predict`, `locca eval`), the warm-up,
the benchmarks and the tests drive it to the end. Nothing else runs the decode loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from .decoding import BeamSearch, DecodingOptions, Grammar, Query, budget_for
from .encoder_cache import EncoderCache, image_key
from .phrases import GroundedCaption, link, name_twins, object_phrases
from .regions import RegionOptions, RegionSearch, public
from .requests import Phrase, Region, Request, RequestError, Result, validate
from .scheduler import Decode, Job, Prefill, Scheduler, SchedulerConfig
from .tasks import Tasks

log = logging.getLogger("locca.core")


class Expired(Exception):
    """The request's deadline passed before it finished."""


class ModelCallFailed(Exception):
    """The model call of the batch holding the request raised; the core dropped the batch and goes on."""


@dataclass
class Finished:
    id: int
    result: Result | None = None     # None for a search submitted bare (`submit`): read `search`
    error: Exception | None = None   # Expired, ModelCallFailed, or what answering it raised
    search: object = None            # the finished search (its hypotheses, for callers that want them all)
    timings: dict | None = None      # monotonic seconds: arrival, prefill (start, end), finish (tracing spans)


@dataclass
class Pending:
    """What the core keeps of a queued id besides its scheduler job."""
    timings: dict                       # monotonic seconds of its phases so far (Finished.timings)
    request: Request | None = None      # None: a bare search (`submit`)
    size: tuple[int, int] | None = None


class Runner:
    """Executes a scheduler batch through the inference interface (model/interface.py) and keeps the running
    KV-cache state and the encoded-image cache. It decides nothing: the scheduler chose the rows."""

    def __init__(self, inference, pad_id: int, cache: EncoderCache | None = None):
        self.inference, self.pad_id, self.cache = inference, pad_id, cache
        self.state = None

    def __call__(self, batch: Prefill | Decode) -> np.ndarray:
        """float32 logits: (B, V) after each prompt for a Prefill, (R, V) for a Decode."""
        inf = self.inference
        if isinstance(batch, Prefill):
            new, last = self.prefill(self.encode(batch), batch.queries)
            if not batch.base and self.state is not None:
                # nothing runs: keep none of the old state's rows but its arrays, whose spare rows the new rows
                # join (on CPU a state grows by new arrays; a region search's rows would make them anew for
                # every request that comes alone)
                inf.select(self.state, np.zeros(0, dtype=np.int64))
            self.state = inf.merge(self.state, new) if self.state is not None else new
            return last
        inf.select(self.state, batch.src)
        return inf.step(self.state, batch.tokens, batch.positions)[:, 0]

    def encode(self, batch: Prefill):
        """The prefill's images encoded: the cache's entries where it has them, the encoder for the others
        (kept in the cache for the next questions on them)."""
        inf, cache = self.inference, self.cache
        if cache is None:
            return inf.encode(batch.pixels)
        found = [cache.get(k) for k in batch.keys]
        missing = [i for i, c in enumerate(found) if c is None]
        if not missing:
            return inf.join(found)
        fresh = inf.encode(batch.pixels[missing] if len(missing) < len(found) else batch.pixels)
        for i, cross in zip(missing, inf.split(fresh), strict=True):
            cache.put(batch.keys[i], cross)
            found[i] = cross
        return fresh if len(missing) == len(found) else inf.join(found)

    def prefill(self, cross, queries: list[Query]):
        """One row per query, every prompt in one call, right-padded. Pad tokens write cache slots past their
        prompt; the generated tokens overwrite them before any query can see them (positions decide). Returns
        the state and the logits after each prompt's last token, (Q, V)."""
        lengths = np.array([len(q.prompt) for q in queries])
        Q, P = len(queries), int(lengths.max())
        tokens = np.full((Q, P), self.pad_id, dtype=np.int64)
        for i, q in enumerate(queries):
            tokens[i, : len(q.prompt)] = q.prompt
        state = self.inference.start(cross, np.array([q.image for q in queries]))
        logits = self.inference.step(state, tokens, np.tile(np.arange(P), (Q, 1)))
        return state, logits[np.arange(Q), lengths - 1]

    def reset(self) -> None:
        self.state = None


class EngineCore:
    def __init__(self, inference, tasks: Tasks, config: SchedulerConfig = SchedulerConfig(),
                 options: DecodingOptions = DecodingOptions(), region_options: RegionOptions = RegionOptions(),
                 cache_bytes: int = 0):
        """options: the search of captions, refers and descriptions; region_options: that of ground (every
        object of the image, model/regions.py); cache_bytes: the bound of the encoded-image cache
        (model/encoder_cache.py), 0 for none."""
        self.inference, self.tasks, self.options, self.region_options = inference, tasks, options, region_options
        self.scheduler = Scheduler(config)
        self.cache = EncoderCache(cache_bytes) if cache_bytes else None
        self.runner = Runner(inference, tasks.tok.pad_id, self.cache)
        self.grammar = Grammar(tasks.tok)
        self.image_size, self.max_seq_len = inference.cfg.image_size, inference.cfg.max_seq_len
        self.pending: dict[int, Pending] = {}  # every queued id: its request (None for a bare search), phases
        self._ids = itertools.count()

    # --- requests in ----------------------------------------------------------------------------------
    def add(self, request: Request, pixels: np.ndarray, size: tuple[int, int], id: int | None = None,
            now: float = 0.0, deadline: float = float("inf"), key: bytes | None = None) -> int:
        """Queue a request on an image: pixels (3, S, S) float32, the model's input (model/image.py preprocess),
        size (width, height) as given; key: the pixels' `image_key`, if the caller has it already. Requests on
        the same image (the same key, or without a cache the same array) share its encoder row. Raises
        RequestError (nothing is queued) when the request cannot be answered as asked."""
        request = validate(request, size)
        id = self.submit(self.search(request, size), pixels, id, now, deadline, key)
        self.pending[id].request, self.pending[id].size = request, size
        return id

    def submit(self, search, pixels: np.ndarray, id: int | None = None, now: float = 0.0,
               deadline: float = float("inf"), key: bytes | None = None) -> int:
        """Queue a search of one's own (a BeamSearch of any Query): it finishes with `result` None, read its
        `search`. `add` is this with the search a Request asks for."""
        id = next(self._ids) if id is None else id
        if key is None and self.cache is not None:
            key = image_key(pixels)
        try:
            self.scheduler.add(Job(id, pixels, search, now, deadline, key=key))
        except ValueError as e:  # wider than the rows the scheduler may hold
            raise RequestError(str(e)) from None
        self.pending[id] = Pending({"arrival": time.monotonic()})
        return id

    def search(self, request: Request, size: tuple[int, int]):
        """The search that answers a validated `request` (RequestError when its budget cannot hold the answer)."""
        t, S = self.tasks, self.max_seq_len
        if request.task == "caption":
            query = Query(0, "caption", tuple(t.caption_prompt()), request.max_new_tokens)
            return self._grounded(query) if request.grounded else self._beams(query)
        if request.task == "refer":
            return self._beams(Query(0, "refer", tuple(t.refer_prompt(request.expression)), request.max_new_tokens))
        if request.task == "describe":
            return self._beams(Query(0, "describe", tuple(t.describe_prompt(request.box, *size)),
                                     request.max_new_tokens))
        query = Query(0, "ground", tuple(t.ground_prompt()), request.max_new_tokens)
        if self.region_options.twins:  # a caption beside the regions names twins (model/phrases.py name_twins)
            return self._grounded()
        return RegionSearch(query, self._budget(query), self.grammar, t, S, self.region_options)

    def _budget(self, query: Query) -> int:
        try:
            return budget_for(query, self.options, self.max_seq_len)
        except ValueError as e:
            raise RequestError(str(e), "expression" if query.task == "refer" else "max_new_tokens") from None

    def _beams(self, query: Query) -> BeamSearch:
        o = self.options
        return BeamSearch(query, self._budget(query), o.beam_size, self.grammar, o.length_penalty)

    def _grounded(self, caption: Query | None = None) -> GroundedCaption:
        """A caption (by default the plain one) and the region search, side by side from one prompt row."""
        caption = caption or Query(0, "caption", tuple(self.tasks.caption_prompt()))
        regions = Query(0, "ground", tuple(self.tasks.ground_prompt()))
        return GroundedCaption(self._beams(caption), RegionSearch(regions, self._budget(regions), self.grammar,
                                                                  self.tasks, self.max_seq_len, self.region_options))

    # --- the loop -------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self, now: float | None = None) -> list[Finished]:
        """Expire what is late at `now` (monotonic seconds), run one batch if one is due, and return what
        finished. now=None: no clock (offline): nothing expires and nothing waits for company."""
        late = [] if now is None else self.scheduler.expire(now)
        out = [Finished(job.id, error=Expired("the request's deadline passed"), search=job.search) for job in late]
        for f in out:
            self.pending.pop(f.id, None)
        batch = self.scheduler.schedule(float("inf") if now is None else now)
        if batch is None:
            return out
        t0 = time.monotonic()
        try:
            logits = self.runner(batch)
        except Exception:  # a failed model call fails its jobs, not the core
            log.exception("model call failed; failing its jobs")
            lost = {j.id: j for j in self.scheduler.reset() + (batch.jobs if isinstance(batch, Prefill) else [])}
            self.runner.reset()
            for job_id in lost:
                self.pending.pop(job_id, None)
            return out + [Finished(i, error=ModelCallFailed("the model call failed")) for i in lost]
        t1 = time.monotonic()
        if isinstance(batch, Prefill):
            for job in batch.jobs:
                self.pending[job.id].timings["prefill"] = (t0, t1)
        for job in self.scheduler.postprocess(batch, logits):
            asked = self.pending.pop(job.id)
            timings = {**asked.timings, "finish": t1}
            try:
                result = None if asked.request is None else self.answer(asked.request, job.search, asked.size)
            except Exception as e:  # a bug in parsing one answer fails that request, not the batch
                log.exception("answer failed")
                out.append(Finished(job.id, error=e, search=job.search))
                continue
            out.append(Finished(job.id, result, search=job.search, timings=timings))
        return out

    def run(self) -> list[Finished]:
        """Step until nothing is left (no clock: nothing expires, nothing waits for company)."""
        out: list[Finished] = []
        while self.busy:
            out += self.step()
        return out

    def abort(self, id: int, reason: str = "cancelled") -> bool:
        self.pending.pop(id, None)
        return self.scheduler.abort(id, reason) is not None

    def next_wakeup(self, now: float) -> float | None:
        return self.scheduler.next_wakeup(now)

    def take_stats(self):
        return self.scheduler.take_stats()

    def take_cache_stats(self):
        """The encoded-image cache's counts since the last call (model/encoder_cache.py CacheStats), or None."""
        return None if self.cache is None else self.cache.take_stats()

    def reset(self) -> None:
        """Forget every request and the running state (the encoded images stay: they do not depend on them)."""
        self.scheduler.reset()
        self.runner.reset()
        self.pending.clear()

    # --- results out ----------------------------------------------------------------------------------
    def answer(self, request: Request, search, size: tuple[int, int]) -> Result:
        """A finished search's Result (model/requests.py)."""
        if request.task == "ground":
            if isinstance(search, GroundedCaption):
                text = self.tasks.parse("caption", search.caption.best(1)[0].tokens, *size)["text"]
                found = [public(r) for r in name_twins(text, search.region_search.candidates(*size), size[0])]
            else:
                found = search.regions(*size, request.max_regions)
            return Result("ground", regions=tuple(Region(**r) for r in found[: request.max_regions]))
        beams = search.caption if request.grounded else search
        h = beams.best(1)[0]
        parsed = self.tasks.parse(beams.query.task, h.tokens, *size)
        if request.task == "refer":
            return Result("refer", box=parsed["box"], score=h.mean_logprob)
        if request.task == "describe":
            return Result("describe", text=parsed["text"], box=list(request.box), score=h.mean_logprob)
        phrases = None
        if request.grounded:  # every region found may be a phrase's, the listener's verdict aside
            text, regions = parsed["text"], search.region_search.candidates(*size)
            spans = object_phrases(text)
            texts = [text[a:b] for a, b in spans]
            phrases = tuple(Phrase(t, (a, b), None if k is None else regions[k]["box"],
                                   None if k is None else regions[k]["score"])
                            for t, (a, b), k in zip(texts, spans, link(texts, regions), strict=True))
        return Result("caption", text=parsed["text"], score=h.mean_logprob, phrases=phrases)

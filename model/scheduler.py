"""The scheduler of one engine core: plain synchronous code, `add` / `schedule()` -> batch /
`postprocess(batch, outputs)`, as nano-vllm's; the core (model/core.py) is those calls around one model call.
It never touches the model, so it is unit-tested without one.

Two kinds of batch:
    Prefill  waiting jobs on up to `max_batch` images: encode their images (once each: jobs whose images have
             the same key, the questions of one call or of several on one picture, share its encoder row, and
             count once towards `max_batch`), start one KV-cache row per job, run the prompts, append the rows to
             the running state. While rows are decoding, a long job waits up to `max_wait` seconds for others to
             share its encoder call and prompt step (their decode steps go on meanwhile); an idle core, or a
             short job, goes at once.
    Decode   one token for every beam of every running job (continuous, iteration-level batching over
             KV-cache rows): jobs join after their prefill and leave as soon as they finish, so a short refer
             never waits for a long caption.

Short jobs first: a job that can generate at most `short_tokens` tokens (a refer: four corners and <eos>) is
prefilled before the long ones that wait with it, and while one runs, long jobs that arrive are not prefilled
(up to `max_defer` seconds each): their encoder calls would otherwise sit between a refer's few decode steps,
each as long as several of them. Jobs already decoding never stop. Measured in benchmarks/batching.py.

Each job's search is a `model.decoding.BeamSearch` (or a search with its interface, model/regions.py), laid out
in rows by `next_rows`: a job's output does not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .decoding import BeamSearch, Query, advance_all, log_softmax, next_rows


@dataclass(frozen=True)
class SchedulerConfig:
    """The batching policy, one object from the server's settings (service/settings.py) to the core."""
    max_batch: int = 16           # most images encoded (and their jobs prefilled) together
    max_wait: float = 0.010       # seconds a long job arriving while others decode may wait for company in its
                                  # prefill (an idle core, and short jobs, never wait): measured with wrk, 64
                                  # connections, 1.21x the captions/s of 0 at the same latency at 1 (issue 19)
    max_rows: int = 256           # KV-cache rows the running batch may hold (a ground search takes up to 33)
    short_tokens: int = 8         # jobs that generate at most this many tokens go first (0: arrival order)
    max_defer: float = 0.02       # seconds a long job may be held back for short ones

    def __post_init__(self):
        if self.max_batch < 1 or self.max_rows < 1 or min(self.max_wait, self.max_defer, self.short_tokens) < 0:
            raise ValueError(f"need max_batch, max_rows >= 1 and max_wait, max_defer, short_tokens >= 0: {self}")


# Everything at once, in arrival order: what an offline caller (model/predictor.py) wants of a batch it holds.
ALL_AT_ONCE = SchedulerConfig(max_batch=1 << 30, max_rows=1 << 30, short_tokens=0)


@dataclass
class Job:
    id: int
    pixels: np.ndarray            # (3, S, S) float32, the model's input
    search: BeamSearch
    arrival: float                # seconds (monotonic clock), when `add` was called
    deadline: float = float("inf")
    most_tokens: int = 0          # the most tokens it can generate, as `add` found it (its search's bound)
    key: object = None            # equal for equal images (model/encoder_cache.py image_key); None: the array's
                                  # identity

    def __post_init__(self):
        if self.key is None:
            self.key = ("array", id(self.pixels))  # the job holds the array: no other can take its id meanwhile

    @property
    def width(self) -> int:
        return self.search.width


@dataclass
class Prefill:
    jobs: list[Job]
    pixels: np.ndarray            # (I, 3, S, S), the jobs' distinct images
    keys: list                    # (I,) their keys
    queries: list[Query]          # one per job, `image` indexing `pixels`
    base: int                     # rows of the running state kept before the new ones; 0: start a new state


@dataclass
class Decode:
    jobs: list[Job]
    src: np.ndarray               # (R,) rows of the running state to keep, in this batch's order
    tokens: np.ndarray            # (R, 1)
    positions: np.ndarray         # (R, 1)


@dataclass
class Stats:
    """What happened since the last `take_stats()`, for the metrics (the worker ships it to the server)."""
    prefill_sizes: list[int] = field(default_factory=list)
    decode_sizes: list[int] = field(default_factory=list)
    queue_waits: list[float] = field(default_factory=list)
    decode_steps: int = 0
    tokens: int = 0
    aborted: dict[str, int] = field(default_factory=dict)


def _fill_holes(jobs: list[Job], gone: set[int]) -> list[Job]:
    """`jobs` without `gone`, the last ones moved into the places of those that left rather than every later
    job shifting up: the next step's rows follow this order, so a job that leaves the front of a batch of
    one-row jobs costs the backend one row to move, not every row behind it."""
    n = sum(j.id not in gone for j in jobs)
    tail = iter([j for j in jobs[n:] if j.id not in gone])
    return [next(tail) if j.id in gone else j for j in jobs[:n]]


class Scheduler:
    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        self.config = config
        self.max_batch, self.max_wait, self.max_rows = config.max_batch, config.max_wait, config.max_rows
        self.short_tokens, self.max_defer = config.short_tokens, config.max_defer
        self.waiting: list[Job] = []
        self.running: list[Job] = []   # prefilled, in the order of their rows
        self.rows = 0                  # rows the running state holds after the last batch
        self.stats = Stats()

    # --- requests in and out -----------------------------------------------------------------------
    def add(self, job: Job) -> None:
        if job.width > self.max_rows:
            raise ValueError(f"a job of {job.width} beams cannot fit in {self.max_rows} rows")
        job.most_tokens = job.search.most_tokens()
        self.waiting.append(job)

    def abort(self, job_id: int, reason: str = "cancelled") -> Job | None:
        """Drop a job wherever it is; its rows are simply not kept by the next batch (the work stops)."""
        for jobs in (self.waiting, self.running):
            for i, job in enumerate(jobs):
                if job.id == job_id:
                    if jobs is self.running:  # its place goes to the last running job (_fill_holes)
                        self.running = _fill_holes(self.running, {job_id})
                    else:
                        del jobs[i]  # waiting jobs keep their arrival order
                    self.stats.aborted[reason] = self.stats.aborted.get(reason, 0) + 1
                    self._maybe_empty()
                    return job
        return None

    def expire(self, now: float) -> list[Job]:
        """Drop and return the jobs whose deadline has passed."""
        late = [j for j in self.waiting + self.running if j.deadline <= now]
        for j in late:
            self.abort(j.id, "deadline")
        return late

    # --- the loop ------------------------------------------------------------------------------------
    def schedule(self, now: float) -> Prefill | Decode | None:
        prefill = self._prefill(now)
        if prefill is not None:
            return prefill
        if self.running:
            src, tokens, positions = next_rows([j.search for j in self.running])
            return Decode(list(self.running), src, tokens, positions)
        return None

    def postprocess(self, batch: Prefill | Decode, logits: np.ndarray) -> list[Job]:
        """Feed the model's outputs to the searches; returns the jobs that finished (`job.search.best()`)."""
        done: list[Job] = []
        logp = log_softmax(logits)  # once for every row of the batch, not once per search
        if isinstance(batch, Prefill):  # logits (B, V): after each prompt; the rows went after `base`
            for i, job in enumerate(batch.jobs):
                job.search.rows = [i] * job.width  # every beam starts from the prompt's row
                alive = job.search.advance(logp)
                job.search.src = [batch.base + r for r in job.search.src]
                (self.running if alive else done).append(job)
            self.rows = batch.base + len(batch.jobs)
        else:                           # logits (R, V): the rows of `batch.src`, in order
            self.stats.decode_steps += 1
            self.stats.tokens += len(batch.src)
            self.stats.decode_sizes.append(len(batch.src))
            self.rows = len(batch.src)
            ids = {j.id for j in self.running}
            jobs = [j for j in batch.jobs if j.id in ids]
            done += [j for j, alive in zip(jobs, advance_all([j.search for j in jobs], logp), strict=True)
                     if not alive]
            self.running = _fill_holes(self.running, {j.id for j in done})
        self._maybe_empty()
        return done

    def reset(self) -> list[Job]:
        """Forget every job (the model call failed); returns them so that they can be answered."""
        jobs, self.waiting, self.running, self.rows = self.waiting + self.running, [], [], 0
        return jobs

    # --- policy --------------------------------------------------------------------------------------
    def short(self, job: Job) -> bool:
        """Short by what it could generate when it arrived: a caption near its end is not a short job (else
        some caption nearly done would hold back every new one under a load of captions alone)."""
        return job.most_tokens <= self.short_tokens

    def _candidates(self, now: float) -> list[Job]:
        """The waiting jobs in the order they may be prefilled: short ones first; long ones only when no short
        job waits or runs, or when the longest-waiting of them has been held back `max_defer` already."""
        if not self.short_tokens:
            return self.waiting
        short = [j for j in self.waiting if self.short(j)]
        long = [j for j in self.waiting if not self.short(j)]
        if long and (short or any(self.short(j) for j in self.running)) and now - long[0].arrival < self.max_defer:
            return short
        return short + long

    def _prefill(self, now: float) -> Prefill | None:
        free = self.max_rows - sum(j.width for j in self.running)
        take: list[Job] = []
        index: dict = {}  # a taken image's key -> its place in this prefill's images
        images: list[np.ndarray] = []
        for job in self._candidates(now):
            if (job.key not in index and len(index) == self.max_batch) or job.width > free:
                break
            take.append(job)
            if job.key not in index:
                index[job.key] = len(images)
                images.append(job.pixels)
            free -= job.width
        if not take:
            return None
        full = len(index) == self.max_batch or len(take) < len(self.waiting)  # waiting longer gains nothing
        # Company is worth waiting for only while rows are decoding (their steps go on meanwhile) and for long
        # jobs: an idle core, or a short job, goes at once.
        now_please = not self.running or any(self.short(j) for j in take)
        if not (full or now_please or now - self.waiting[0].arrival >= self.max_wait):
            return None
        taken = {j.id for j in take}
        self.waiting = [j for j in self.waiting if j.id not in taken]
        for job in take:
            self.stats.queue_waits.append(now - job.arrival)
        self.stats.prefill_sizes.append(len(index))
        base = self.rows if self.running else 0
        queries = [dataclasses.replace(j.search.query, image=index[j.key]) for j in take]
        return Prefill(take, np.stack(images), list(index), queries, base)

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until the scheduler has something to do without new input (None: nothing pending)."""
        return 0.0 if self.running or self.waiting else None  # an idle core prefills what waits at once

    def _maybe_empty(self) -> None:
        if not self.running:
            self.rows = 0  # nothing refers to the running state any more: the next prefill starts a new one

    def take_stats(self) -> Stats:
        stats, self.stats = self.stats, Stats()
        return stats

"""The model worker processes, seen from the server's event loop: started, fed, supervised, restarted.

Each worker gets two one-way pipes, read and written by the event loop itself through asyncio's pipe transports
(non-blocking: a request's pixels that do not fit in the pipe while the worker is busy in a model call wait in
the transport's buffer, never blocking the loop), in multiprocessing.Connection's framing, which the worker
reads and writes with its plain Connection ends: no sender or reader thread per worker, no hand-over between
threads per message (measured: the same captions/s under load on 2 cores as with the threads, README).
The loop watches each process's sentinel: when a worker dies, a new one
is started, and every request it held is queued again, once, on the next worker to be ready (inference is
idempotent, and a request that died with its worker never finished): only a request whose second worker dies
too fails, with Unavailable (503 / UNAVAILABLE). Requests wait for a ready worker (the restarted one, or
another) up to their deadline; they are already admitted, so the engine's bounded queue holds them. A worker that
holds requests reports progress (stats) several times a second; one that has sent nothing for `stall_timeout`
seconds while holding requests (stopped, deadlocked in a native call, swapping) is killed, and so restarted.
A model that cannot be loaded is fatal at start, not a restart loop: a worker that fails to load it (or dies
MAX_START_DEATHS times) before any worker was ever ready calls `on_fatal`, and the server exits saying why.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import itertools
import logging
import multiprocessing as mp
import pickle
import struct
import time

import numpy as np

from model.requests import Request, Result

from . import metrics, tracing, worker
from .errors import DeadlineExceeded, Unavailable
from .priority import Spawner
from .worker import WorkerSpec

log = logging.getLogger("locca.pool")
MAX_BACKOFF_S = 30.0
CRASH_WINDOW_S = 60.0  # deaths of a slot within this long count towards its restart delay (a crash loop)
MAX_START_DEATHS = 5  # consecutive deaths of a slot before the model was ever served: give up


class WorkerDied(Exception):
    """The worker holding a request died before answering it (internal: the pool queues it again)."""


class WorkerHandle:
    def __init__(self, slot: int, spec: WorkerSpec, loop: asyncio.AbstractEventLoop, on_message, on_exit,
                 spawner: Spawner):
        ctx = mp.get_context("spawn")  # never fork a process that runs threads and an event loop
        worker_inbox, self._inbox = ctx.Pipe(duplex=False)
        self._outbox, worker_outbox = ctx.Pipe(duplex=False)
        _widen(self._inbox)  # a request's image is ~49 KB: the default 64 KiB pipe holds one
        self.process = ctx.Process(target=worker.main, args=(worker_inbox, worker_outbox, spec),
                                   name=f"locca-worker-{slot}", daemon=True)
        spawner.run(self.process.start)  # with the server's own priority, not the front's (service/priority.py)
        worker_inbox.close()   # only the worker holds these ends now: its death closes the pipes
        worker_outbox.close()
        self.slot, self.loop, self.on_message, self.on_exit = slot, loop, on_message, on_exit
        self.jobs: dict[int, asyncio.Future] = {}
        self.ready, self.info, self.started = False, None, time.monotonic()
        self.heard = self.started  # when the worker last sent anything, or was given work while idle
        self._writer: asyncio.WriteTransport | None = None
        self._reader: asyncio.ReadTransport | None = None
        self._unsent: list[bytes] = []  # frames sent before the pipes' transports were open
        self._gone = False
        loop.create_task(self._open_pipes())
        loop.add_reader(self.process.sentinel, self._exited)

    async def _open_pipes(self) -> None:
        try:
            writer, _ = await self.loop.connect_write_pipe(asyncio.BaseProtocol, self._inbox)
            reader, _ = await self.loop.connect_read_pipe(
                lambda: _Frames(functools.partial(self.on_message, self)), self._outbox)
        except Exception:  # noqa: BLE001 (never seen; a worker it cannot talk to is killed, and so restarted)
            log.exception("cannot open a worker's pipes; killing it", extra={"slot": self.slot})
            self.process.kill()
            return
        if self._gone:  # the worker died while they opened
            writer.close()
            reader.close()
            return
        self._writer, self._reader = writer, reader
        for frame in self._unsent:
            writer.write(frame)
        self._unsent.clear()

    def send(self, msg: tuple) -> None:
        """Queue `msg` for the worker; never blocks (what the pipe cannot take waits in the transport)."""
        frame = _frame(msg)
        if self._writer is None:
            if not self._gone:
                self._unsent.append(frame)
        elif not self._writer.is_closing():  # else the worker is gone: the sentinel reports it
            self._writer.write(frame)

    def _exited(self) -> None:
        self.loop.remove_reader(self.process.sentinel)
        self._gone = True
        for transport in (self._writer, self._reader):
            if transport is not None:
                transport.close()
        self.process.join(0)
        self.on_exit(self)


def _widen(conn, size: int = 1 << 20) -> None:
    """Let the pipe behind `conn` hold `size` bytes (Linux; up to /proc/sys/fs/pipe-max-size, 1 MiB by default),
    so that the requests queued for a busy worker wait inside it, where the worker takes them all at its next
    look, rather than in the event loop's transport, which refills the pipe only when the loop next runs."""
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (AttributeError, OSError):  # not Linux, or a lower limit: the default size works, a little slower
        pass


def _frame(msg: tuple) -> bytes:
    """A message as multiprocessing.Connection.send writes it: a 4-byte big-endian length, then the pickle."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > 0x7FFFFFFF:
        raise ValueError(f"a {len(data)}-byte message to a worker")  # limits keep messages far below (images)
    return struct.pack("!i", len(data)) + data


class _Frames(asyncio.Protocol):
    """A worker's messages as its multiprocessing.Connection.send wrote them (a 4-byte big-endian length, then the
    pickle), read on the event loop: `deliver` gets each whole message, in order."""

    def __init__(self, deliver):
        self.deliver, self.buffer = deliver, bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        messages, start = [], 0
        while len(buf) - start >= 4:
            (n,) = struct.unpack_from("!i", buf, start)
            if n < 0:  # Connection's header for a message over 2 GiB; a worker never sends one
                raise ValueError("a worker's message over 2 GiB")
            if len(buf) - start - 4 < n:
                break
            messages.append(pickle.loads(buf[start + 4:start + 4 + n]))
            start += 4 + n
        del buf[:start]
        for msg in messages:
            self.deliver(msg)


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], retry_after: int = 1, on_fatal=None, stall_timeout: float = 60.0):
        self.specs, self.retry_after, self.stall_timeout = specs, retry_after, stall_timeout
        self.on_fatal = on_fatal             # (message) -> None: the model cannot be served at all
        self.handles: list[WorkerHandle | None] = [None] * len(specs)
        self.failures = [0] * len(specs)     # consecutive deaths before becoming ready (crash loops back off)
        self.deaths: list[list[float]] = [[] for _ in specs]  # when each slot's workers died, the last minute
        self.info: dict | None = None        # the model as the first ready worker described it
        self.closing = False
        self._ids = itertools.count(1)
        self._queue_depths: dict[int, int] = {}
        self._caches: dict[int, dict] = {}  # each slot's last encoded-image cache figures
        self._any_ready: asyncio.Event | None = None  # set while some worker is ready (made in `start`)
        self.spawner: Spawner | None = None           # the thread workers are started from (made in `start`)

    def start(self) -> None:
        self._any_ready = asyncio.Event()
        self.spawner = Spawner()
        for slot in range(len(self.specs)):
            self._spawn(slot)
        self._watch()

    def _watch(self) -> None:
        """Every second: kill a ready worker that holds requests and has been silent for `stall_timeout`."""
        if self.closing:
            return
        now = time.monotonic()
        for h in self.handles:
            if h is not None and h.ready and h.jobs and now - h.heard > self.stall_timeout and h.process.is_alive():
                log.error("worker holds requests and has sent nothing; killing it", extra={
                    "slot": h.slot, "pid": h.process.pid, "silent_s": round(now - h.heard, 1), "requests": len(h.jobs)})
                metrics.WORKER_STALLS.inc()
                h.process.kill()  # the sentinel then fails its requests with 503 and restarts the slot
        asyncio.get_running_loop().call_later(1.0, self._watch)

    def _spawn(self, slot: int) -> None:
        if self.closing:
            return
        spec = self.specs[slot]
        self.handles[slot] = WorkerHandle(slot, spec, asyncio.get_running_loop(), self._on_message, self._on_exit,
                                          self.spawner)
        log.info("worker started", extra={"slot": slot, "device": spec.device,
                                          "pid": self.handles[slot].process.pid})

    @property
    def ready(self) -> bool:
        return any(h is not None and h.ready for h in self.handles)

    def _update_ready(self) -> None:
        metrics.WORKERS_READY.set(sum(1 for h in self.handles if h is not None and h.ready))
        if self._any_ready is not None:
            if self.ready or self.closing:  # closing: wake the waiters, to be told so
                self._any_ready.set()
            else:
                self._any_ready.clear()

    # --- messages ------------------------------------------------------------------------------------
    def _on_message(self, h: WorkerHandle, msg: tuple) -> None:
        if self.handles[h.slot] is not h:
            return  # from a worker already replaced
        h.heard = time.monotonic()
        kind = msg[0]
        if kind == "ready":
            h.ready, h.info, self.failures[h.slot] = True, msg[1], 0
            self.info = self.info or msg[1]
            self._update_ready()
        elif kind == "finished":
            for job_id, result, timings, error in msg[1]:
                self._settle(h, job_id, (result, timings), error)
        elif kind == "stats":
            metrics.record_worker_stats(msg[1], self._queue_depths, self._caches, h.slot)
        elif kind == "failed":
            log.error("worker cannot load the model", extra={"slot": h.slot, "why": msg[1]})
            if self.info is None:  # never served: the model itself is unusable, not a passing fault
                self._fatal(msg[1])

    def _fatal(self, message: str) -> None:
        self.closing = True  # no restarts
        self._update_ready()
        if self.on_fatal is not None:
            self.on_fatal(message)

    @staticmethod
    def _settle(h: WorkerHandle, job_id: int, result: tuple, error: Exception | None) -> None:
        """Answer a job: `result` (its Result, the worker's timings), or `error`."""
        fut = h.jobs.pop(job_id, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _on_exit(self, h: WorkerHandle) -> None:
        was_ready, h.ready = h.ready, False
        self._update_ready()
        self._queue_depths.pop(h.slot, None)
        self._caches.pop(h.slot, None)  # a new worker starts with an empty cache
        for fut in h.jobs.values():
            if not fut.done():
                fut.set_exception(WorkerDied())
        h.jobs.clear()
        if self.closing or self.handles[h.slot] is not h:
            return
        self.failures[h.slot] += 0 if was_ready else 1
        if self.info is None and self.failures[h.slot] >= MAX_START_DEATHS:
            self._fatal(f"the model worker died {self.failures[h.slot]} times while loading the model "
                        f"(exit code {h.process.exitcode}); see its log")
            return
        metrics.WORKER_RESTARTS.inc()
        now = time.monotonic()
        recent = self.deaths[h.slot] = [t for t in self.deaths[h.slot] if now - t < CRASH_WINDOW_S] + [now]
        # a death now and then restarts at once; a slot that keeps dying (before it is ready, or more than once
        # a minute once it served) waits 1, 2, 4 ... up to 30 s, so a crash loop does not spin the machine
        delay = min(MAX_BACKOFF_S, max(2.0 ** self.failures[h.slot] - 1, 2.0 ** (len(recent) - 2) if
                                       len(recent) > 1 else 0.0))
        metrics.WORKER_BACKOFF_SECONDS.labels(str(h.slot)).set(delay)
        if delay:
            metrics.WORKER_BACKOFFS.inc()
            log.error("worker keeps dying; restarting it after a pause", extra={
                "slot": h.slot, "exitcode": h.process.exitcode, "deaths_last_minute": len(recent),
                "deaths_before_ready": self.failures[h.slot], "restart_in_s": delay})
        else:
            log.error("worker died; restarting", extra={"slot": h.slot, "exitcode": h.process.exitcode,
                                                        "restart_in_s": delay})
        asyncio.get_running_loop().call_later(delay, self._spawn, h.slot)

    # --- requests ------------------------------------------------------------------------------------
    async def run(self, requests: list[Request], rgb: np.ndarray, size: tuple[int, int], key: bytes,
                  deadline: float) -> list[Result]:
        """Run a call's requests (its questions on one image, `rgb`: model/image.py `resize`) on the least busy
        ready worker, waiting for one if none is; `deadline` is on the monotonic clock. A call whose worker dies
        is run again, once, on the next ready worker. Cancelling the caller (client gone, gRPC deadline) or
        passing the deadline aborts its jobs in the worker; so does one of them failing."""
        h = await self._ready_worker(deadline)
        try:
            return await self._run_on(h, requests, rgb, size, key, deadline)
        except WorkerDied:
            metrics.REQUESTS_RETRIED.inc()
            log.warning("the worker holding a request died; queueing it again", extra={"slot": h.slot})
        try:
            return await self._run_on(await self._ready_worker(deadline), requests, rgb, size, key, deadline)
        except WorkerDied:
            raise Unavailable("the model workers serving this request died twice; retry",
                              retry_after=self.retry_after) from None

    async def _ready_worker(self, deadline: float) -> WorkerHandle:
        while True:
            if self.closing:
                raise Unavailable("the server is shutting down", retry_after=self.retry_after)
            ready = [h for h in self.handles if h is not None and h.ready]
            if ready:
                return min(ready, key=lambda w: len(w.jobs))
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._any_ready.wait()
            except TimeoutError:
                raise DeadlineExceeded("no model worker was ready before the request's deadline") from None

    async def _run_on(self, h: WorkerHandle, requests: list[Request], rgb: np.ndarray, size: tuple[int, int],
                      key: bytes, deadline: float) -> list[Result]:
        if not h.jobs:
            h.heard = time.monotonic()  # an idle worker is quiet: its silence counts from now
        ids = [next(self._ids) for _ in requests]
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in ids]
        h.jobs.update(zip(ids, futs, strict=True))
        h.send(("add", ids, requests, rgb, size, key, max(0.0, deadline - time.monotonic())))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                answers = await asyncio.gather(*futs)
            for _, timings in answers:
                tracing.record_worker(timings)  # its phases, as spans of this request (service/tracing.py)
            return [result for result, _ in answers]
        except TimeoutError:
            h.send(("abort", ids))
            raise DeadlineExceeded("the request's deadline passed") from None
        except BaseException:  # cancelled, the worker died, or one question failed: the others' work stops
            h.send(("abort", ids))
            raise
        finally:
            for job_id, fut in zip(ids, futs, strict=True):
                h.jobs.pop(job_id, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: the first one raised; the others' go with the call

    async def close(self, timeout: float = 10.0) -> None:
        self.closing = True
        self._update_ready()
        handles = [h for h in self.handles if h is not None]
        for h in handles:
            h.send(("stop",))
        loop = asyncio.get_running_loop()
        for h in handles:
            await loop.run_in_executor(None, h.process.join, timeout)
            if h.process.is_alive():
                h.process.kill()
                await loop.run_in_executor(None, h.process.join, 5)
        if self.spawner is not None:
            self.spawner.close()

"""A model worker: one process per accelerator (one on a CPU), started and supervised by service/pool.py.

It loads the model into an engine core (model/core.py), warms it up, says "ready", then loops: read the server's
messages, `step()` the core (expire late requests, run one batch), send what finished.

Messages, over two one-way pipes (pickled tuples):
    server -> worker   ("add", ids, Requests, rgb, size, key, timeout_s)   ("abort", ids)   ("stop",)
    worker -> server   ("ready", info)   ("finished", [(id, Result, timings, None) | (id, None, None, ServiceError)])
                       ("stats", dict); timings: the request's phases (model/core.py), spans in the server
                       ("failed", message): the model cannot be loaded; the worker exits
"finished" carries every request a step finished (or an "add" rejected): one message, one wake-up of the server's
event loop, however many answers (at 64 captions in flight a decode step finishes two or three).
An "add" carries every question a call asks of its image (one request, or the expressions of a refer call
that lists several), with the image once: they share its encoder row. rgb: the image resized, (S, S, 3) uint8
(model/image.py `resize`; the worker normalises it): a quarter of the bytes of float pixels to pickle. key: its
image_key (model/encoder_cache.py), computed by the server where it decoded the image.
An error crosses the pipe whole (its type is its REST status and gRPC code, service/errors.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from model.core import EngineCore
from model.image import normalize
from model.requests import Request, RequestError, of_item
from model.scheduler import SchedulerConfig

from .errors import from_core

log = logging.getLogger("locca.worker")
STATS_EVERY_S = 0.25
ACTIVITY = ("prefill_sizes", "decode_sizes", "queue_waits", "decode_steps", "tokens", "aborted")


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    model: str
    backend: str
    device: str
    threads: int            # intra-op threads (service/bundle.py worker_threads); 0: the backend's default
    spin_wait: bool         # ONNX Runtime's pool threads spin between parallel sections (service/settings.py)
    scheduler: SchedulerConfig
    cache_bytes: int        # the encoded-image cache's bound (model/encoder_cache.py); 0: none
    warmup: bool
    log_level: str
    log_json: bool
    parent_pid: int


def main(inbox, outbox, spec: WorkerSpec) -> None:
    """Process entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server coordinates shutdown; a Ctrl-C or SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # to the process group must not kill work it is draining
    from . import logs
    logs.setup(spec.log_level, spec.log_json, worker=spec.index)
    from export.backends import load_inference

    t0 = time.perf_counter()
    try:
        loaded = load_inference(spec.model, spec.backend, spec.device, spec.threads or None, spin=spec.spin_wait)
        worker = Worker(EngineCore(loaded.inference, loaded.tasks, spec.scheduler, cache_bytes=spec.cache_bytes),
                        inbox, outbox, spec.parent_pid)
        if spec.warmup:
            worker.warm_up()
    except Exception as e:  # noqa: BLE001 (a missing, corrupt or incompatible model: say so, and exit)
        log.exception("cannot load the model")
        outbox.send(("failed", f"cannot load the model {spec.model} ({spec.backend} on {spec.device}): "
                               f"{type(e).__name__}: {e}"))
        raise SystemExit(3) from None
    info = {"backend": loaded.backend, "device": loaded.device, "config": dataclasses.asdict(loaded.cfg),
            "meta": loaded.meta, "pid": os.getpid(), "threads": spec.threads, "spin_wait": spec.spin_wait}
    log.info("worker ready", extra={"seconds": round(time.perf_counter() - t0, 2), **info})
    outbox.send(("ready", info))
    worker.loop()


class Worker:
    def __init__(self, core: EngineCore, inbox, outbox, parent_pid: int):
        self.core, self.inbox, self.outbox, self.parent_pid = core, inbox, outbox, parent_pid
        self.stopping = False

    def loop(self) -> None:
        last_stats, last_depth = time.monotonic(), None
        while not self.stopping:
            wait = self.core.next_wakeup(time.monotonic())
            self.receive(STATS_EVERY_S if wait is None else min(wait, STATS_EVERY_S))
            if os.getppid() != self.parent_pid:
                log.warning("the server process is gone; exiting")
                return
            self.step()
            if time.monotonic() - last_stats >= STATS_EVERY_S:
                stats = self.stats()
                depth = (stats["waiting"], stats["running"])
                if depth != last_depth or any(stats[k] for k in ACTIVITY):  # an idle worker stays quiet
                    self.outbox.send(("stats", stats))
                last_depth, last_stats = depth, time.monotonic()

    def receive(self, timeout: float) -> None:
        try:
            if not self.inbox.poll(timeout):
                return
            while True:
                self.handle(self.inbox.recv())
                if not self.inbox.poll(0):
                    return
        except EOFError:  # the server closed the pipe
            self.stopping = True

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, ids, requests, rgb, size, key, timeout = msg
            now, pixels = time.monotonic(), normalize(rgb)
            for i, (job_id, request) in enumerate(zip(ids, requests, strict=True)):
                try:
                    self.core.add(request, pixels, size, job_id, now, now + timeout, key)
                except RequestError as e:  # the call fails: its other questions are not worth answering
                    for other in ids[:i]:
                        self.core.abort(other, "rejected")
                    error = from_core(of_item(e, i) if len(ids) > 1 else e)
                    self.outbox.send(("finished", [(job_id, None, None, error)]))
                    return
        elif kind == "abort":
            for job_id in msg[1]:
                self.core.abort(job_id)
        elif kind == "stop":
            self.stopping = True

    def step(self) -> None:
        finished = self.core.step(time.monotonic())
        if finished:
            self.outbox.send(("finished", [(f.id, f.result, f.timings, None) if f.error is None
                                           else (f.id, None, None, from_core(f.error)) for f in finished]))

    def stats(self) -> dict:
        s, cache = self.core.take_stats(), self.core.take_cache_stats()
        return {**dataclasses.asdict(s), "waiting": len(self.core.scheduler.waiting),
                "running": len(self.core.scheduler.running),
                "cache": None if cache is None else dataclasses.asdict(cache)}

    def warm_up(self) -> None:
        """One request of each task through the whole path, so the first client pays no first-call costs."""
        size = self.core.image_size
        pixels = np.zeros((3, size, size), np.float32)
        for request in (Request("caption"), Request("refer", expression="the shape"),
                        Request("describe", box=(0.0, 0.0, size / 2, size / 2)), Request("ground")):
            self.core.add(request, pixels, (size, size))
        self.core.run()
        self.core.take_stats()
        self.core.take_cache_stats()
        self.core.reset()

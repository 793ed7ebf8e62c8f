"""A model worker: one process per accelerator (one on a CPU), started and supervised by service/pool.py.

It loads the model, warms it up, says "ready", then loops: read the server's messages, expire late jobs,
`schedule()` a batch, run it (service/runner.py), `postprocess()` the logits, send the answers.

Messages, over two one-way pipes (pickled tuples):
    server -> worker   ("add", id, Task, pixels, timeout_s)   ("abort", id)   ("stop",)
    worker -> server   ("ready", info)   ("result", id, answer)   ("error", id, code, message)   ("stats", Stats)
                       ("failed", message): the model cannot be loaded; the worker exits
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from .errors import ServiceError
from .jobs import Task, Tasker
from .runner import Runner
from .scheduler import Job, Prefill, Scheduler

log = logging.getLogger("locca.worker")
STATS_EVERY_S = 0.25
ACTIVITY = ("prefill_sizes", "decode_sizes", "queue_waits", "decode_steps", "tokens", "aborted")


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    model: str
    backend: str
    device: str
    threads: int
    max_batch: int
    max_wait: float
    max_rows: int
    short_tokens: int
    max_defer: float
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
    from model.predictor import Predictor

    t0 = time.perf_counter()
    try:
        loaded = load_inference(spec.model, spec.backend, spec.device, spec.threads or None)
        worker = Worker(Tasker(Predictor(loaded.inference, loaded.tasks)),
                        Runner(loaded.inference, loaded.tok.pad_id),
                        Scheduler(spec.max_batch, spec.max_wait, spec.max_rows, spec.short_tokens,
                                  spec.max_defer), inbox, outbox, spec.parent_pid)
        if spec.warmup:
            worker.warm_up()
    except Exception as e:  # noqa: BLE001 (a missing, corrupt or incompatible model: say so, and exit)
        log.exception("cannot load the model")
        outbox.send(("failed", f"cannot load the model {spec.model} ({spec.backend} on {spec.device}): "
                               f"{type(e).__name__}: {e}"))
        raise SystemExit(3) from None
    info = {"backend": loaded.backend, "device": loaded.device, "config": dataclasses.asdict(loaded.cfg),
            "meta": loaded.meta, "pid": os.getpid()}
    log.info("worker ready", extra={"seconds": round(time.perf_counter() - t0, 2), **info})
    outbox.send(("ready", info))
    worker.loop()


class Worker:
    def __init__(self, tasker: Tasker, runner: Runner, scheduler: Scheduler, inbox, outbox, parent_pid: int):
        self.tasker, self.runner, self.scheduler = tasker, runner, scheduler
        self.inbox, self.outbox, self.parent_pid = inbox, outbox, parent_pid
        self.tasks: dict[int, Task] = {}
        self.stopping = False

    def loop(self) -> None:
        last_stats, last_depth = time.monotonic(), None
        while not self.stopping:
            wait = self.scheduler.next_wakeup(time.monotonic())
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
            _, job_id, task, pixels, timeout = msg
            try:
                search = self.tasker.search(task)
                now = time.monotonic()
                self.scheduler.add(Job(job_id, pixels, search, now, now + timeout))
                self.tasks[job_id] = task
            except ServiceError as e:
                self.outbox.send(("error", job_id, e.code, e.message))
            except ValueError as e:  # a job wider than the scheduler's rows (settings forbid it)
                self.outbox.send(("error", job_id, "bad_request", str(e)))
        elif kind == "abort":
            if self.scheduler.abort(msg[1]) is not None:
                self.tasks.pop(msg[1], None)
        elif kind == "stop":
            self.stopping = True

    def step(self) -> None:
        now = time.monotonic()
        for job in self.scheduler.expire(now):
            self.tasks.pop(job.id, None)
            self.outbox.send(("error", job.id, "deadline_exceeded", "the request's deadline passed"))
        batch = self.scheduler.schedule(now)
        if batch is None:
            return
        try:
            logits = self.runner(batch)
        except Exception:  # noqa: BLE001 (a failed model call fails its jobs, not the worker)
            log.exception("model call failed; failing its jobs")
            lost = {j.id: j for j in self.scheduler.reset() + (batch.jobs if isinstance(batch, Prefill) else [])}
            self.runner.reset()
            for job_id in lost:
                self.tasks.pop(job_id, None)
                self.outbox.send(("error", job_id, "internal", "the model call failed"))
            return
        for job in self.scheduler.postprocess(batch, logits):
            task = self.tasks.pop(job.id)
            try:
                self.outbox.send(("result", job.id, self.tasker.answer(task, job.search)))
            except Exception as e:  # noqa: BLE001
                log.exception("answer failed")
                self.outbox.send(("error", job.id, "internal", f"answer failed: {e}"))

    def stats(self) -> dict:
        s = self.scheduler.take_stats()
        return {**dataclasses.asdict(s), "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.running)}

    def warm_up(self) -> None:
        """One job of each kind through the whole path, so the first request pays no first-call costs."""
        size = self.tasker.predictor.image_size
        pixels = np.zeros((3, size, size), np.float32)
        tasks = [Task("caption", (size, size)), Task("refer", (size, size), expression="the shape"),
                 Task("describe", (size, size), box=(0.0, 0.0, size / 2, size / 2)),
                 Task("propose", (size, size))]
        for i, task in enumerate(tasks):
            self.scheduler.add(Job(-1 - i, pixels, self.tasker.search(task), 0.0))
        while self.scheduler.waiting or self.scheduler.running:
            batch = self.scheduler.schedule(float("inf"))
            self.scheduler.postprocess(batch, self.runner(batch))
        self.scheduler.take_stats()
        self.runner.reset()

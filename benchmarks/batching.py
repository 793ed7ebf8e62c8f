"""Section 3: continuous against static batching on a mixed workload, in the worker's own code.

The server's worker loop (service/worker.py: the engine core, model/core.py, built by bench_server.InProcess
with the server's default settings) is replayed in this process with closed-loop clients: `captioners` clients
asking for long captions (the quarter of the request pool whose captions our model makes longest) and one
client asking refer questions; each sends its next request the moment its last is answered. Three admission
policies, the same model calls:
    continuous  (the server's) a request joins the running batch at the next step, short jobs first: a refer
                is prefilled before waiting captions, and captions that arrive while it decodes wait (up to
                the scheduler's max_defer) instead of running their encoder between its steps;
    arrival     continuous batching in arrival order (short_job_tokens = 0): every waiting request is
                prefilled before the next decode step;
    static      a batch is formed when the worker is idle and runs until its last request is done; what
                arrives meanwhile waits for the next batch (in arrival order).
The refer client alone, on an otherwise idle worker, gives the idle latency. The HTTP layer is left out: the
server's overhead is measured by bench_server.py (0.6 ms at the p50).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from model.requests import Request

from .bench_server import InProcess


@dataclass(frozen=True)
class Call:
    kind: str                 # caption | refer
    pixels: np.ndarray        # (3, S, S), preprocessed once
    size: tuple[int, int]
    expression: str | None = None

    @property
    def request(self) -> Request:
        return Request(self.kind, expression=self.expression)


def replay(local: InProcess, clients: list[list[Call]], policy: str, window: float) -> dict[str, list[float]]:
    """Latencies (seconds) by kind of the requests answered within `window` seconds after every client has had
    one answer. clients[i] is client i's requests, sent in turn."""
    if policy not in ("continuous", "arrival", "static"):
        raise ValueError(f"unknown policy {policy!r}")
    sched, short_tokens = local.core.scheduler, local.core.scheduler.short_tokens
    if policy != "continuous":
        sched.short_tokens = 0  # arrival order: the server's scheduler without its short-jobs-first rule
    try:
        return _replay(local, clients, policy, window)
    finally:
        sched.short_tokens = short_tokens


def _replay(local: InProcess, clients: list[list[Call]], policy: str, window: float) -> dict[str, list[float]]:
    core = local.core
    held: list[tuple[int, Call]] = []    # static: arrived, waiting for the worker to be idle
    jobs: dict[int, tuple[int, Call, float]] = {}  # id -> client, call, arrival
    sent = [0] * len(clients)
    answered: set[int] = set()
    lat: dict[str, list[float]] = {}
    start = end = None
    next_id = 0

    def send(i: int, now: float) -> None:
        nonlocal next_id
        call = clients[i][sent[i] % len(clients[i])]
        sent[i] += 1
        jobs[next_id] = (i, call, now)
        if policy == "static":
            held.append((next_id, call))
        else:
            core.add(call.request, call.pixels, call.size, next_id, now)
        next_id += 1

    now = time.monotonic()
    for i in range(len(clients)):
        send(i, now)
    while jobs:
        if policy == "static" and not core.busy:
            for id, call in held[:core.scheduler.max_batch]:
                core.add(call.request, call.pixels, call.size, id, time.monotonic())
            del held[:core.scheduler.max_batch]
        done = core.step(time.monotonic())  # the server's max_wait is 0: nothing waits for company
        now = time.monotonic()
        for f in done:
            i, call, arrival = jobs.pop(f.id)
            answered.add(i)
            if start is not None and start < now <= end:
                lat.setdefault(call.kind, []).append(now - arrival)
            if start is None and len(answered) == len(clients):
                start, end = now, now + window
            if end is None or now < end:
                send(i, now)
    core.reset()
    return lat


def mixed(local: InProcess, captions: list[Call], refers: list[Call], captioners: int, window: float,
          turns: int = 2) -> dict:
    """Refer latency idle, and under mixed load with each policy; p50 in ms. The three runs take `turns` turns
    (a share of the window each), so that a change in the machine's load falls on all of them."""
    load = [captions[i::captioners] or captions for i in range(captioners)]
    runs: dict[str, dict[str, list[float]]] = {"idle": {}, "continuous": {}, "arrival": {}, "static": {}}
    for _ in range(turns):
        for name, clients, policy, share in (("idle", [refers], "continuous", 0.5),
                                             ("continuous", load + [refers], "continuous", 1.0),
                                             ("arrival", load + [refers], "arrival", 1.0),
                                             ("static", load + [refers], "static", 1.0)):
            for kind, lat in replay(local, clients, policy, share * window / turns).items():
                runs[name].setdefault(kind, []).extend(lat)
    out = {"captioners": captioners, "window_s": window}
    for name, lat in runs.items():
        r = np.array(lat.get("refer", [np.nan]))
        out[name] = {"refer_p50_ms": 1e3 * float(np.median(r)), "refer_n": int(np.isfinite(r).sum()),
                     "caption_p50_ms": 1e3 * float(np.median(lat["caption"])) if "caption" in lat else None,
                     "caption_n": len(lat.get("caption", []))}
    out["continuous_over_idle"] = out["continuous"]["refer_p50_ms"] / out["idle"]["refer_p50_ms"]
    out["arrival_over_idle"] = out["arrival"]["refer_p50_ms"] / out["idle"]["refer_p50_ms"]
    out["static_over_idle"] = out["static"]["refer_p50_ms"] / out["idle"]["refer_p50_ms"]
    return out

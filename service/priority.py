"""The model workers get the CPU first: the server lowers the scheduling priority of its own threads (HTTP, gRPC,
image decoding, pipes) by `front_nice`, and starts its workers from one thread it leaves as it was.

Why: a worker's every model call serves all the requests in its batch, while the front's work for one request
(parse it, decode its image, write its answer) is small and can wait a moment. Where the two share cores (a
small machine, a container with a CPU limit), the kernel otherwise shares the cores evenly among every runnable
thread, and the front's threads take turns with the worker. Measured on 2 cores under wrk at 64 connections, a
different image per request, 4 alternating rounds: with the same priority the worker spent 12-14% of its time
runnable but waiting for a CPU and the server answered 134-154 captions/s (mean 144); with the front 5 lower,
5-6% and 156-166 (mean 162, 1.13x). Where cores are spare, nothing waits and the priority changes nothing.

Linux only (a thread's nice value is its own there; elsewhere this does nothing). Raising a nice value needs no
privilege, and lowering it again does, which is why the workers are started from a thread that was never
raised: a process starts with the nice value of the thread that starts it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("locca.priority")


class Spawner:
    """A thread that keeps the server's original priority, to start worker processes from."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="locca-spawn")
        self.native_id = self._executor.submit(threading.get_native_id).result()  # the thread exists from now

    def run(self, fn, *args):
        return self._executor.submit(fn, *args).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def lower_threads(increment: int, keep: set[int]) -> int:
    """Add `increment` to the nice value of every thread of this process but those in `keep` (native ids);
    threads they start later inherit it. Returns how many threads were changed."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return 0
    changed = 0
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid in keep:
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
            changed += 1
        except (ProcessLookupError, PermissionError) as e:  # a thread that just ended; a sandbox that forbids it
            log.debug("cannot renice thread", extra={"tid": tid, "why": str(e)})
    return changed

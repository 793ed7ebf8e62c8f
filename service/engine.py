"""The engine both transports call: admission control, deadlines, images decoded off the event loop, and
the worker pool. REST (service/rest.py) and gRPC (service/grpc_server.py) only convert messages.

Admission: at most `max_queue` requests are held at once (429 / RESOURCE_EXHAUSTED beyond, before any work is
done), none before the model was first served or while draining (503 / UNAVAILABLE); while a worker restarts,
admitted requests wait for it (service/pool.py), and readiness says 503 / NOT_SERVING meanwhile. Deadline:
the shorter of the client's and `request_timeout_s`, on the monotonic clock, enforced here and in the worker.
Images: the header is read on the event loop (limits, pixel count); the pixels are decoded by a thread pool, or
on the loop itself when nothing else is in flight and the image is small (INLINE_DECODE_PIXELS).
Cancellation: cancelling the awaiting task (a REST client that went away, a gRPC deadline or cancel) aborts
the job in its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from model.config import SIZES
from model.encoder_cache import image_key
from model.requests import API_CALLS, MAX_REGIONS, Request, RequestError, Result, of_item, validate

from . import images, metrics, tracing
from .body import Buffers
from .errors import DeadlineExceeded, QueueFull, Unavailable, from_core
from .pool import WorkerPool
from .settings import Settings

# A call that arrives while no other is in flight decodes its image on the event loop, up to this many pixels
# (a 275x381 PNG scene decodes in 1.5 ms here, so about 15 ms at the bound): handing it to a decoding thread and
# back costs two thread wake-ups, about 0.8 ms of a caption's 13 at one request at a time on this machine, and
# there is nothing else to serve meanwhile.
# Under load, and for larger images, the threads decode, off the loop.
INLINE_DECODE_PIXELS = 1 << 20


class Engine:
    def __init__(self, settings: Settings, pool: WorkerPool, model_name: str, image_threads: int):
        """image_threads: the threads decoding images (service/bundle.py image_threads)."""
        self.settings, self.pool, self.model_name = settings, pool, model_name
        self.limits = images.Limits(settings.max_image_bytes, settings.max_image_pixels)
        self.executor = ThreadPoolExecutor(image_threads, thread_name_prefix="locca-image")
        self.buffers = Buffers(settings.max_buffered_bytes)  # REST bodies and gRPC messages held at once
        self.in_flight, self.draining = 0, False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.pool.ready and not self.draining

    # --- the three calls -----------------------------------------------------------------------------
    async def caption(self, image: bytes, max_new_tokens: int | None = None, timeout: float | None = None,
                      grounded: bool = False) -> Result:
        return (await self._run(image, timeout, [Request("caption", grounded=grounded,
                                                         max_new_tokens=max_new_tokens)]))[0]

    async def refer(self, image: bytes, expressions: str | Sequence[str], timeout: float | None = None):
        """The box of an expression (a Result), or of each of several on the image (a list of them, in order,
        from one encoder pass)."""
        many = not isinstance(expressions, str)
        results = await self._run(image, timeout, [Request("refer", expression=e) for e in
                                                   (expressions if many else [expressions])], many)
        return results if many else results[0]

    async def ground(self, image: bytes, box: Sequence[float] | None = None, max_regions: int = MAX_REGIONS,
                     timeout: float | None = None, boxes: Sequence[Sequence[float]] | None = None):
        """Describe `box` (a Result), or each of `boxes` (a list of them, in order, from one encoder pass), or
        without either find every object (at most `max_regions`)."""
        if boxes is not None:
            return await self._run(image, timeout, [Request("describe", box=tuple(b)) for b in boxes], True)
        request = Request("ground", max_regions=max_regions) if box is None else Request("describe", box=tuple(box))
        return (await self._run(image, timeout, [request]))[0]

    async def _run(self, image: bytes, timeout: float | None, requests: list[Request],
                   many: bool = False) -> list[Result]:
        """Admit, decode the image, validate each request against it (model/requests.py validate: the one place,
        before anything is queued; a call's questions, 1 to MAX_QUESTIONS as the transports' schemas allow, are
        named by their place in it), and run them on a worker, together: they share the image's encoder pass."""
        limit = self.settings.request_timeout_s if timeout is None else min(timeout, self.settings.request_timeout_s)
        deadline = time.monotonic() + limit
        with self._admit(len(requests)):
            loop = asyncio.get_running_loop()
            image_size = self.pool.info["config"]["image_size"]
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    with tracing.phase("image decode"):
                        im = images.open_image(image, self.limits)  # the header: the limits, the pixel count
                        if self.in_flight == len(requests) and im.width * im.height <= INLINE_DECODE_PIXELS:
                            rgb, size, key = self._load(im, image_size)  # nothing else to serve meanwhile
                        else:
                            rgb, size, key = await loop.run_in_executor(self.executor, self._load, im, image_size)
            except TimeoutError:
                raise DeadlineExceeded("the request's deadline passed") from None
            checked = []
            for i, request in enumerate(requests):
                try:
                    checked.append(validate(request, size))
                except RequestError as e:
                    raise from_core(of_item(e, i) if many else e) from None
            return await self.pool.run(checked, rgb, size, key, deadline)

    def _load(self, im, image_size: int):
        """The model's image (an images.open_image), resized (uint8: the worker makes it the model's pixels), the
        image's size, and its key (the encoded-image cache's, and the one that lets a call's questions share an
        encoder row)."""
        t0 = time.perf_counter()
        try:
            rgb, size = images.load_opened(im, image_size)
            return rgb, size, image_key(rgb)
        finally:
            metrics.IMAGE_SECONDS.observe(time.perf_counter() - t0)

    @contextlib.contextmanager
    def _admit(self, n: int = 1):
        """Hold `n` of the `max_queue` places (a call's questions) while the call runs; a call larger than
        the whole queue is admitted only into an empty one."""
        retry = self.settings.retry_after_s
        with tracing.phase("admission"):
            if self.draining:
                raise Unavailable("the server is shutting down", retry_after=retry)
            if self.pool.info is None:  # not served yet: loading. After that, a restart's arrivals wait (pool.run)
                raise Unavailable("the model is not ready yet", retry_after=retry)
            if self.in_flight and self.in_flight + n > self.settings.max_queue:
                raise QueueFull(f"{self.in_flight} requests are queued or running; retry later", retry_after=retry)
        self.in_flight += n
        self._idle.clear()
        metrics.IN_FLIGHT.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= n
            metrics.IN_FLIGHT.set(self.in_flight)
            if self.in_flight == 0:
                self._idle.set()

    # --- operations ----------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Stop admitting; wait for the requests in flight. True if they all finished in time."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def model_info(self) -> dict:
        info = self.pool.info
        if info is None:
            raise Unavailable("the model is not loaded yet", retry_after=self.settings.retry_after_s)
        cfg = info["config"]
        return {"name": self.model_name, "size": size_name(cfg), "tasks": list(API_CALLS),
                "backend": info["backend"], "device": info["device"], "config": cfg,
                "step": info["meta"].get("step")}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def size_name(cfg: dict) -> str:
    """The named size (model/config.py's SIZES) whose dimensions the model has, or "custom"."""
    dims = ("image_size", "patch_size", "enc_width", "enc_depth", "enc_heads", "dec_width", "dec_depth", "dec_heads")
    for name, size in SIZES.items():
        if all(getattr(size, d) == cfg.get(d) for d in dims):
            return name
    return "custom"

"""The server process: REST (uvicorn) and gRPC (grpc.aio) on one event loop, the engine, the worker pool.

Start: resolve the model (service/bundle.py), open both ports (so /healthz answers at once, /readyz says 503),
start the workers; ready when a worker has loaded and warmed up its model.
SIGTERM / SIGINT: stop admitting (503 / UNAVAILABLE, /readyz 503, gRPC health NOT_SERVING), let the requests in
flight finish (up to drain_timeout_s), close both servers, stop the workers, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import uvicorn

from . import bundle, logs, priority, tracing
from .engine import Engine
from .pool import WorkerPool
from .settings import Settings
from .worker import WorkerSpec

log = logging.getLogger("locca.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: shutdown is ours (drain first, then close)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def worker_specs(settings: Settings, source: bundle.Source) -> list[WorkerSpec]:
    devices = bundle.devices(settings)
    threads = bundle.worker_threads(settings, devices)
    return [WorkerSpec(index=i, model=source.path, backend=source.backend, device=device, threads=threads,
                       spin_wait=settings.spin_wait, scheduler=settings.scheduler(),
                       cache_bytes=settings.encoder_cache_mb << 20,
                       warmup=settings.warmup, log_level=settings.log_level,
                       log_json=settings.log_json, parent_pid=os.getpid())
            for i, device in enumerate(devices)]


async def serve(settings: Settings) -> int:
    from .grpc_server import GrpcServer  # noqa: PLC0415 (generates the stubs on first use)
    from .rest import build_app  # noqa: PLC0415

    if tracing.configure():
        log.info("exporting traces over OTLP", extra={"endpoint": os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")})
    source = await asyncio.to_thread(bundle.resolve, settings)
    specs = worker_specs(settings, source)
    stop, fatal = asyncio.Event(), []

    def on_fatal(message: str) -> None:  # the workers cannot load the model: exit rather than never be ready
        fatal.append(message)
        stop.set()

    pool = WorkerPool(specs, settings.retry_after_s, on_fatal, stall_timeout=settings.worker_stall_timeout_s)
    devices = [s.device for s in specs]
    decoders = bundle.image_threads(settings, devices, specs[0].threads)
    engine = Engine(settings, pool, bundle.model_name(settings.model), decoders)
    rest = _Uvicorn(uvicorn.Config(build_app(engine, settings), host=settings.host, port=settings.port,
                                   log_config=None, access_log=False, lifespan="off",
                                   timeout_graceful_shutdown=5, timeout_keep_alive=settings.keep_alive_s))
    grpc_server = GrpcServer(engine, settings)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await grpc_server.start()
    rest_task = asyncio.create_task(rest.serve())
    pool.start()
    reniced = priority.lower_threads(settings.front_nice, keep={pool.spawner.native_id})
    log.debug("front threads reniced", extra={"threads": reniced, "increment": settings.front_nice})
    log.info("serving", extra={"rest": f"{settings.host}:{settings.port}",
                               "grpc": f"{settings.host}:{settings.grpc_port}", "backend": source.backend,
                               "model": source.path, "devices": devices,
                               "loop": type(loop).__module__.split(".")[0], "image_threads": decoders})
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({stopped, rest_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if rest_task.done():  # uvicorn could not start (port taken, ...)
        log.error("the REST server stopped unexpectedly")
        code = 1
    if fatal:
        log.error(f"cannot serve the model: {fatal[0]}")
        code = 2
    log.info("shutting down: draining", extra={"in_flight": engine.in_flight})
    drained = await engine.drain(settings.drain_timeout_s)
    if not drained:
        log.warning("drain timed out", extra={"in_flight": engine.in_flight})
    rest.should_exit = True
    await grpc_server.stop(grace=2.0)
    with contextlib.suppress(Exception):
        await rest_task
    await pool.close()
    engine.close()
    stopped.cancel()
    log.info("stopped", extra={"drained": drained})
    return code


def loop_factory(choice: str):
    """The event loop `--loop` asks for: uvloop's (auto: where it is installed), or None for asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed (pip install uvloop, or --loop asyncio)") from None
        return None
    return uvloop.new_event_loop


def run(settings: Settings) -> int:
    logs.setup(settings.log_level, settings.log_json)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
            return runner.run(serve(settings))
    except (FileNotFoundError, bundle.InvalidModel) as e:
        log.error(str(e))
        return 2

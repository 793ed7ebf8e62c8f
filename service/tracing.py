"""OpenTelemetry tracing: the W3C `traceparent` in and out on REST and gRPC, and a span for each phase of a request.

    POST /v1/caption  (or locca.v1.LocCa/Caption)     the transport's server span, a child of the caller's
                                                      (FastAPI opens it for REST, with spans of its own within)
      admission                                       the bounded queue's check
      image decode                                    the image bytes to pixels, in the thread pool
      queue wait                                      in the worker, from its arrival to its prefill
      prefill                                         the batch that encoded its image and ran its prompt
      decode                                          from that prefill to its last token
      response                                        the answer as JSON or protobuf

The worker keeps the times of its phases (model/core.py) and sends them with the answer; the server records them
as spans under the request's, so one trace holds every phase and only the server exports.

Off by default: without the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER=otlp) the API's no-op tracer records nothing, and a
request that brings a traceparent gets the same one back. With them, spans go to an OTLP/HTTP collector in
batches (OTEL_SERVICE_NAME, default locca-serve; OTEL_BSP_* tune the batching), as the SDK documents.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from opentelemetry import context, propagate, trace

TRACER = trace.get_tracer("locca.serve")


def configure() -> bool:
    """Export spans over OTLP/HTTP if the OTEL_* variables ask for it; True when they do."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none")
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if exporter != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: this server exports traces over OTLP only (otlp or "
                         "none)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "locca-serve")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


@contextmanager
def server_span(name: str, carrier: dict):
    """The transport's span of one request, a child of the caller's traceparent in `carrier` (headers or gRPC
    metadata, lower-case keys), current while the request is handled. Yields it and the traceparent to send back.
    Where the framework has opened the request's server span already (FastAPI does, from the same header), that
    one is the request's span."""
    current = trace.get_current_span()
    if current.get_span_context().is_valid:
        yield current, _traceparent()
        return
    parent = propagate.extract(carrier)
    span = TRACER.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
    token = context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span, _traceparent()
    finally:
        context.detach(token)
        span.end()


def _traceparent() -> str | None:
    out: dict = {}
    propagate.inject(out)
    return out.get("traceparent")


def phase(name: str):
    """A child span of the current one, for a phase of the request run here."""
    return TRACER.start_as_current_span(name)


def record_worker(timings: dict) -> None:
    """The worker's phases (monotonic seconds: arrival, prefill start and end, finish) as child spans of the
    current one. The monotonic clock is the machine's, shared by the server and its workers."""
    span = trace.get_current_span()
    if not span.is_recording() or not timings:
        return
    offset = time.time_ns() - time.monotonic_ns()

    def ns(t: float) -> int:
        return offset + int(t * 1e9)

    arrival, (start, end), finish = timings["arrival"], timings["prefill"], timings["finish"]
    for name, a, b in (("queue wait", arrival, start), ("prefill", start, end), ("decode", end, finish)):
        TRACER.start_span(name, start_time=ns(a)).end(end_time=ns(max(a, b)))

"""The gRPC transport (grpc.aio): locca.v1.LocCa from proto/locca/v1/locca.proto, grpc.health.v1 and
server reflection. The servicer converts messages and calls the engine, nothing more.

A client's deadline bounds the request (it is passed to the engine), and when the client cancels or its
deadline passes grpc.aio cancels the handler, which aborts the job in its worker. Errors: a ServiceError's
gRPC code and message; RESOURCE_EXHAUSTED and UNAVAILABLE carry trailing metadata `retry-after` (seconds) and
the standard `grpc-retry-pushback-ms` (gRFC A6), which a channel's retry policy (service config) honours.
Metadata `x-request-id` is honoured and returned, as the REST header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from model.requests import Result

from . import auth, logs, metrics, protos, tracing
from .engine import Engine
from .errors import InvalidRequest, QueueFull, ServiceError
from .schemas import MAX_REGIONS, CaptionParams, GroundParams, ReferParams
from .settings import Settings

pb, pb_grpc = protos.load()
log = logging.getLogger("locca.grpc")


def _box(b) -> pb.Box:
    return pb.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3])


def to_pb(result: Result | list[Result], expressions: list[str] | None = None):
    """A Result (model/requests.py) as its gRPC response: the one place one becomes a message. The results of
    a call that asked several questions: a refer's in `results`, a describe's regions in one list."""
    if isinstance(result, list):
        if result and result[0].task == "refer":
            return pb.ReferResponse(results=[pb.ReferResult(expression=e, box=_box(r.box), score=r.score)
                                             for r, e in zip(result, expressions, strict=True)])
        return pb.GroundResponse(regions=[region for r in result for region in to_pb(r).regions])
    if result.task == "caption":
        return pb.CaptionResponse(caption=result.text, score=result.score, phrases=[
            pb.Phrase(text=p.text, start=p.span[0], end=p.span[1], score=p.score or 0.0,
                      **({} if p.box is None else {"box": _box(p.box)})) for p in result.phrases or ()])
    if result.task == "refer":
        return pb.ReferResponse(box=_box(result.box), score=result.score)
    if result.task == "describe":
        return pb.GroundResponse(regions=[pb.Region(box=_box(result.box), text=result.text, score=result.score)])
    return pb.GroundResponse(regions=[pb.Region(box=_box(r.box), text=r.text, score=r.score) for r in result.regions])


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes do not parse as its message (truncated, invalid UTF-8 in a string): handed to the
    servicer, which answers INVALID_ARGUMENT, rather than raised in the deserializer, which grpc answers UNKNOWN."""
    message: str
    reason: str


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(cls.DESCRIPTOR.full_name, str(e))
    return parse


def handlers(servicer) -> grpc.GenericRpcHandler:
    """locca.v1.LocCa's methods, as the generated add_LocCaServicer_to_server registers them, but parsed by
    `_parser`."""
    service = pb.DESCRIPTOR.services_by_name["LocCa"]
    return grpc.method_handlers_generic_handler(service.full_name, {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name), request_deserializer=_parser(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
        for m in service.methods})


def _params(model, **values):
    try:
        return model(**values)
    except ValidationError as e:
        raise InvalidRequest("; ".join(f"{'.'.join(map(str, x['loc'])) or 'request'}: {x['msg']}" for x in e.errors())) from None


class LoccaServicer(pb_grpc.LocCaServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def Caption(self, request, context):
        async def work(timeout):
            p = _params(CaptionParams, max_new_tokens=request.max_new_tokens or None, grounded=request.grounded)
            result = await self.engine.caption(request.image, p.max_new_tokens, timeout, p.grounded)
            with tracing.phase("response"):
                return to_pb(result)
        return await self._call(context, "Caption", work, request)

    async def Refer(self, request, context):
        async def work(timeout):
            many = list(request.expressions) or None  # proto3: an unset string is "", a list's absence empty
            p = _params(ReferParams, expression=(request.expression or None) if many else request.expression,
                        expressions=many)
            result = await self.engine.refer(request.image, p.expressions or p.expression, timeout)
            with tracing.phase("response"):
                return to_pb(result, p.expressions)
        return await self._call(context, "Refer", work, request)

    async def Ground(self, request, context):
        async def work(timeout):
            box = None
            if request.HasField("box"):
                b = request.box
                box = [b.x0, b.y0, b.x1, b.y1]
            boxes = [[b.x0, b.y0, b.x1, b.y1] for b in request.boxes] or None
            p = _params(GroundParams, box=box, boxes=boxes, max_regions=request.max_regions or MAX_REGIONS)
            result = await self.engine.ground(request.image, p.box, p.max_regions, timeout, p.boxes)
            with tracing.phase("response"):
                return to_pb(result)
        return await self._call(context, "Ground", work, request)

    async def _call(self, context, method: str, work, request):
        metadata = dict(context.invocation_metadata() or ())
        rid = logs.new_request_id(metadata.get("x-request-id"))
        token = logs.request_id.set(rid)
        status, t0, held = "OK", time.perf_counter(), 0
        with tracing.server_span(f"locca.v1.LocCa/{method}", metadata) as (_, traceparent):
            try:
                await context.send_initial_metadata((("x-request-id", rid),
                                                     *((("traceparent", traceparent),) if traceparent else ())))
                if isinstance(request, Malformed):
                    raise InvalidRequest(f"the request is not a valid {request.message}: {request.reason}")
                size = request.ByteSize()  # held until answered, under the budget REST bodies share
                if not self.engine.buffers.take(size):
                    raise QueueFull("the server is receiving too much at once; retry later",
                                    retry_after=self.engine.settings.retry_after_s)
                held = size
                return await work(context.time_remaining())
            except ServiceError as e:
                status = e.grpc_code.name
                if e.retry_after:
                    context.set_trailing_metadata((("retry-after", str(e.retry_after)),
                                                   ("grpc-retry-pushback-ms", str(round(1000 * e.retry_after)))))
                await context.abort(e.grpc_code, e.message)
            except asyncio.CancelledError:
                status = "CANCELLED"  # client cancelled, or its deadline passed: the job was aborted
                raise
            except Exception:  # a bug: logged, and answered INTERNAL with no details rather than grpc's UNKNOWN
                status = "INTERNAL"
                log.exception("request failed")
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                self.engine.buffers.give(held)
                seconds = time.perf_counter() - t0
                endpoint = f"grpc:{method}"
                metrics.REQUESTS.labels(endpoint, status).inc()
                metrics.REQUEST_DURATION.labels(endpoint, status).observe(seconds)
                log.info("request", extra={"method": method, "status": status, "seconds": round(seconds, 4)})
                logs.request_id.reset(token)


class GrpcServer:
    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes),
                                               ("grpc.max_send_message_length", 16 << 20)],
                                      interceptors=auth.grpc_interceptors(settings))
        self.server.add_generic_rpc_handlers((handlers(LoccaServicer(engine)),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (protos.SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{settings.host}:{settings.grpc_port}"
        if not self.server.add_insecure_port(address):
            raise OSError(f"cannot bind gRPC to {address}")
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._follow_readiness())

    async def _follow_readiness(self) -> None:
        """grpc.health.v1 mirrors /readyz: SERVING once warmed up, NOT_SERVING before and while draining."""
        last = None
        while True:
            status = (health_pb2.HealthCheckResponse.SERVING if self.engine.ready
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            if status != last:
                for name in ("", protos.SERVICE):
                    await self.health.set(name, status)
                last = status
            await asyncio.sleep(0.1)

    async def stop(self, grace: float) -> None:
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

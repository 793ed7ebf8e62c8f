"""The REST transport: FastAPI routes that read a request, call the engine, and shape the answer.

Each POST takes `multipart/form-data` (file part `image`, other fields as form fields) or `application/json`
(the image base64-encoded); anything else is 415. The body is read under `max_body_bytes` (413). A client
that disconnects while its request is queued or decoding cancels it: the engine aborts the job in its worker.
Optional header `X-Request-Timeout` (seconds) shortens the request's deadline (504 when it passes).
`render=png` (query parameter or field) answers with the image and the answer drawn on it (service/render.py);
the demo page is at `/` (service/demo.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import demo, logs, metrics, render, tracing
from . import schemas as api
from .auth import ApiKeys, RestApiKeys
from .body import BodyGuard, body_doc, client_timeout, read_request
from .engine import Engine
from .errors import Internal, InvalidRequest, ServiceError, Unavailable
from .settings import Settings

log = logging.getLogger("locca.rest")
ENDPOINTS = {"/v1/caption", "/v1/refer", "/v1/ground", "/v1/models", "/healthz", "/readyz", "/metrics", "/docs",
             "/openapi.json"}
QUIET = {"/healthz", "/readyz", "/metrics"}
ERRORS = {s: {"model": api.ErrorResponse, "description": d} for s, d in [
    (400, "undecodable image, bad box or empty expression"),
    (401, "API keys are on (LOCCA_API_KEYS) and the request carries none of them as `Authorization: Bearer`"),
    (408, "the body did not arrive within body_timeout_s"), (413, "body or image over the limits"),
    (415, "unsupported content type"), (422, "request does not match the schema"),
    (429, "queue full (see Retry-After)"), (503, "not ready or draining"), (504, "the request's deadline passed")]}
PNG = {200: {"content": {"image/png": {}},
             "description": "the answer (JSON), or with render=png the image with the answer drawn on it"}}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error_response(e: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class RequestContext:
    """ASGI middleware: request id (X-Request-ID in and out), metrics and one log line per request. While the
    server drains, every answer says `Connection: close`, so that clients stop reusing connections before
    the server closes them (a request sent on a kept-alive connection as it closes is lost unanswered)."""

    def __init__(self, app, engine=None):
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = logs.new_request_id(headers.get("x-request-id", ""))
        token = logs.request_id.set(rid)
        status, t0 = 499, time.perf_counter()  # 499: the client went away before an answer was sent
        span_name = f"{scope['method']} {scope['path']}"
        with tracing.server_span(span_name, headers) as (request_span, traceparent):

            async def send_with_id(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                    if traceparent:
                        message["headers"].append((b"traceparent", traceparent.encode()))
                    if self.engine is not None and self.engine.draining:
                        message["headers"].append((b"connection", b"close"))
                await send(message)

            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                status = 500 if status == 499 else status  # unhandled: Starlette's outermost layer answers 500
                raise
            finally:
                path = scope["path"]
                endpoint = path if path in ENDPOINTS else "other"
                seconds = time.perf_counter() - t0
                metrics.REQUESTS.labels(endpoint, str(status)).inc()
                metrics.REQUEST_DURATION.labels(endpoint, str(status)).observe(seconds)
                log.log(logging.DEBUG if path in QUIET else logging.INFO, "request", extra={
                    "method": scope["method"], "path": path, "status": status, "seconds": round(seconds, 4)})
                logs.request_id.reset(token)
                request_span.set_attribute("http.response.status_code", status)


async def until_disconnect(request: Request, work):
    """Await the engine, but cancel it (stopping the job) if the client disconnects first."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ServiceError):
        await task
    raise ClientGone()


def build_app(engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="LocCa Serve", version="1", description=(
        "LocCa (Wan et al., NeurIPS 2024): captions, referring expressions and grounded captions. Boxes are "
        "[x0, y0, x1, y1] in pixels of the image as sent, after EXIF orientation. The contract: "
        "docs/api.md; gRPC: proto/locca/v1/locca.proto on the gRPC port."))
    app.add_middleware(BodyGuard, seconds=settings.body_timeout_s, buffers=engine.buffers,
                       limit=settings.max_body_bytes, retry_after=settings.retry_after_s)
    if keys := ApiKeys.from_settings(settings):
        app.add_middleware(RestApiKeys, keys=keys)
    app.add_middleware(RequestContext, engine=engine)  # outermost: it sees (counts, logs) every answer, 401s included
    limit = settings.max_body_bytes
    demo.add_routes(app)

    async def answer(request: Request, p, image: bytes, task: str, work):
        """Await the engine's answer: JSON, or with render=png (query parameter or field) the image with the
        answer drawn on it; the image is decoded again, under the same limits, off the event loop."""
        how = request.query_params.get("render") or p.render or "json"
        if how not in ("json", "png"):
            work.close()  # the engine's coroutine, never started
            raise InvalidRequest(f"render must be json or png, not {how!r}")
        answered = await until_disconnect(request, work)
        with tracing.phase("response"):
            result = api.to_json(answered, getattr(p, "expressions", None) or getattr(p, "expression", None))
            if how == "json":
                return result
            png = await asyncio.get_running_loop().run_in_executor(
                engine.executor, render.render_png, image, task, result, engine.limits)
            return Response(png, media_type="image/png", headers={"X-Locca-Result": json.dumps(result)})

    @app.exception_handler(ServiceError)
    async def _service_error(_, e: ServiceError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone while its body was being read
    async def _gone(_, e):
        return Response(status_code=499)

    @app.exception_handler(Exception)  # a bug: the contract's error shape; the server logs the traceback
    async def _bug(_, e: Exception):
        return error_response(Internal("internal error"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error_response(InvalidRequest(str(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(e.detail)}}, status_code=e.status_code)

    @app.post("/v1/caption", response_model=api.CaptionResponse, responses={**ERRORS, **PNG},
              openapi_extra=body_doc(api.CaptionRequest), response_model_exclude_unset=True,
              summary="Caption an image; with grounded, also the box of each object phrase")
    async def caption(request: Request):
        p, image = await read_request(request, api.CaptionRequest, api.CaptionParams, limit)
        work = engine.caption(image, p.max_new_tokens, client_timeout(request), p.grounded)
        return await answer(request, p, image, "caption", work)

    @app.post("/v1/refer", response_model=api.ReferResponse | api.ReferManyResponse, responses={**ERRORS, **PNG},
              openapi_extra=body_doc(api.ReferRequest),
              summary="Find the box a referring expression names, or the box of each of several expressions")
    async def refer(request: Request):
        p, image = await read_request(request, api.ReferRequest, api.ReferParams, limit)
        work = engine.refer(image, p.expressions or p.expression, client_timeout(request))
        return await answer(request, p, image, "refer", work)

    @app.post("/v1/ground", response_model=api.GroundResponse, responses={**ERRORS, **PNG},
              openapi_extra=body_doc(api.GroundRequest),
              summary="Describe a box (or each of several), or find every object: boxes and descriptions")
    async def ground(request: Request):
        p, image = await read_request(request, api.GroundRequest, api.GroundParams, limit)
        work = engine.ground(image, p.box, p.max_regions, client_timeout(request), p.boxes)
        return await answer(request, p, image, "ground", work)

    @app.get("/v1/models", response_model=api.ModelInfo, responses={s: ERRORS[s] for s in (401, 503)},
             summary="The served model")
    async def models():
        return engine.model_info()

    @app.get("/healthz", summary="200 while the process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: ERRORS[503]}, summary="200 once warmed up; 503 before and while draining")
    async def readyz():
        if engine.draining:
            raise Unavailable("draining", retry_after=settings.retry_after_s)
        if not engine.ready:
            raise Unavailable("the model is not ready yet", retry_after=settings.retry_after_s)
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app

"""Reading a REST request: content type (415), body size (413), JSON or multipart, schema (422), the image's
bytes, and the optional X-Request-Timeout header; and the OpenAPI description of such a body."""

from __future__ import annotations

import asyncio
import json

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from .errors import InvalidRequest, QueueFull, RequestTimeout, TooLarge, UnsupportedMediaType
from .schemas import b64_image

DRAIN_EXTRA_BYTES = 8 << 20  # read (and drop) this much past the limit so the client gets its 413


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_EXTRA_BYTES:
        # Declared far over the limit: answer at once rather than wait for bytes that may never come.
        raise TooLarge(f"the body is over the {limit}-byte limit (Content-Length {declared})")
    chunks, size = [], 0
    too_large = declared.isdigit() and int(declared) > limit
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or size > limit
        if too_large:
            if size > limit + DRAIN_EXTRA_BYTES:
                break
            continue
        chunks.append(chunk)
    if too_large:
        raise TooLarge(f"the body is over the {limit}-byte limit")
    return b"".join(chunks)


async def read_request(request: Request, full: type[BaseModel], params: type[BaseModel], limit: int):
    """-> (validated params, image bytes), from a JSON or a multipart body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("application/json", "multipart/form-data"):
        raise UnsupportedMediaType(f"content type {media or 'none'!r}: send application/json or multipart/form-data")
    body = await read_body(request, limit)
    try:
        if media == "application/json":
            data = parse_json(body)
            if not isinstance(data, dict):
                raise InvalidRequest("the body must be a JSON object")
            req = full.model_validate(data)
            return params.model_validate(req.model_dump(exclude={"image"})), b64_image(req.image)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except Exception as e:  # noqa: BLE001 (python-multipart / starlette parse errors)
            raise InvalidRequest(f"malformed multipart body: {getattr(e, 'detail', e)}") from None
        fields = {k: v for k, v in form.items() if k != "image"}
        image = form.get("image")
        if image is None:
            raise InvalidRequest("the form needs a file part `image`")
        data = await image.read() if isinstance(image, UploadFile) else b64_image(image)
        return params.model_validate(fields), data
    except ValidationError as e:
        raise InvalidRequest(_explain(e)) from None


def parse_json(body: bytes):
    """A JSON body -> its value. orjson first: 5x the standard library on a 300 KB base64 image, on the event
    loop. What it refuses goes to the standard library, whose answers stay the API's: NaN is read (and then
    refused as a box, 400 bad_box), and its errors are the messages clients see."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("the body is not valid JSON: nested too deeply") from None


def _explain(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())


class Buffers:
    """The bytes of request bodies (REST) and messages (gRPC) held at once, under one budget shared by both
    fronts (one event loop: no lock)."""

    def __init__(self, budget: int):
        self.budget, self.held = budget, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.budget:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class BodyGuard:
    """ASGI middleware bounding what request bodies cost while they arrive and are held:

    * time: a body must have arrived `seconds` after its headers, else 408 (a client that trickles its body, or
      declares more than it sends, would otherwise hold a connection and its buffer as long as it likes);
    * memory: the bodies of all requests in progress, with the gRPC messages being served, together stay under
      the budget of `buffers` (each body counted up to `limit`, max_body_bytes: read_body keeps no more). A body that would go over is read to its end and
      dropped, and answered 429 with Retry-After, as a full queue is: a flood of large uploads costs
      bandwidth, not memory, before admission control (engine.py) ever sees it.
    Only the body is timed and counted, not the answer."""

    def __init__(self, app, seconds: float, buffers: Buffers, limit: int, retry_after: int = 1):
        self.app, self.seconds, self.buffers, self.limit, self.retry_after = app, seconds, buffers, limit, retry_after

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline, complete, mine = asyncio.get_running_loop().time() + self.seconds, False, 0

        async def next_message():
            nonlocal complete
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                complete = True
                raise RequestTimeout(f"the body did not arrive within {self.seconds:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def receive_guarded():
            nonlocal mine
            if complete:
                return await receive()
            message = await next_message()
            size = min(len(message.get("body", b"")), self.limit - mine)
            if not self.buffers.take(size):
                while not complete:  # drop the rest, so that the client reads its 429
                    await next_message()
                raise QueueFull("the server is receiving too much at once; retry later",
                                retry_after=self.retry_after)
            mine += size
            return message

        try:
            return await self.app(scope, receive_guarded, send)
        finally:
            self.buffers.give(mine)


def client_timeout(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest("X-Request-Timeout must be a number of seconds") from None
    if not value > 0:
        raise InvalidRequest("X-Request-Timeout must be positive")
    return value


def body_doc(full: type[BaseModel]) -> dict:
    """OpenAPI: the request body in both accepted content types."""
    schema = full.model_json_schema()
    form = {**schema, "properties": {**schema["properties"], "image": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}

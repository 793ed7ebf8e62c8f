"""Python clients of the LocCa server: REST (sync and async, httpx) and gRPC, typed, with timeouts and
retries on 429 / 503 (RESOURCE_EXHAUSTED / UNAVAILABLE) that honour Retry-After.

    from client import LoccaClient
    with LoccaClient("http://127.0.0.1:8000") as c:
        print(c.caption(Image.open("scene.png")).caption)
        print(c.refer(open("scene.png", "rb").read(), "the red circle").box)

An image is bytes (sent as is), a PIL image (sent as PNG) or a local path (read by the client).
`api_key`: sent as `Authorization: Bearer <key>` (REST header, gRPC metadata) to a server with LOCCA_API_KEYS.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from PIL import Image

RETRY_STATUS = {429, 503}
RETRY_GRPC = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


@dataclass(frozen=True)
class Phrase:
    text: str                     # an object phrase of the caption: caption[span[0]:span[1]]
    span: tuple[int, int]
    box: list[float] | None       # None: no region found was this phrase's
    score: float | None


@dataclass(frozen=True)
class Caption:
    caption: str
    score: float
    phrases: list[Phrase] | None = None   # grounded captions only


@dataclass(frozen=True)
class Referral:
    expression: str
    box: list[float]
    score: float


@dataclass(frozen=True)
class Region:
    box: list[float]
    text: str
    score: float


@dataclass
class LoccaError(Exception):
    status: int | str              # HTTP status, or the gRPC status name
    code: str                      # the contract's error code (REST) or the gRPC status name, lowercase
    message: str
    retry_after: float | None = None
    request_id: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def image_bytes(image: bytes | str | Path | Image.Image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
    return Path(image).read_bytes()


def _delay(retry_after: float | None, attempt: int, cap: float) -> float:
    return min(cap, retry_after if retry_after is not None else 0.1 * 2 ** attempt)


# --- REST --------------------------------------------------------------------------------------------
def _request(path: str, image, fields: dict, encoding: str, request_id: str | None, timeout: float | None) -> dict:
    headers = {"X-Request-ID": request_id} if request_id else {}
    if timeout is not None:
        headers["X-Request-Timeout"] = str(timeout)
    fields = {k: v for k, v in fields.items() if v is not None}
    data = image_bytes(image)
    if encoding == "json":
        body = {"image": base64.b64encode(data).decode(), **fields}
        return {"method": "POST", "url": path, "json": body, "headers": headers}
    form = {k: json.dumps(v) if isinstance(v, list | bool) else str(v) for k, v in fields.items()}
    return {"method": "POST", "url": path, "files": {"image": ("image", data)}, "data": form, "headers": headers}


def _error(r: httpx.Response) -> LoccaError:
    try:
        err = r.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", r.text[:200]
    ra = r.headers.get("retry-after")
    return LoccaError(r.status_code, code, message, float(ra) if ra else None, r.headers.get("x-request-id"))


def _typed(path: str, body: dict):
    if path.endswith("caption"):
        phrases = body.get("phrases")
        return Caption(body["caption"], body["score"], None if phrases is None else [
            Phrase(p["text"], tuple(p["span"]), p["box"], p["score"]) for p in phrases])
    if path.endswith("refer"):
        if "results" in body:
            return [Referral(r["expression"], r["box"], r["score"]) for r in body["results"]]
        return Referral(body["expression"], body["box"], body["score"])
    return [Region(r["box"], r["text"], r["score"]) for r in body["regions"]]


class LoccaClient:
    """Blocking REST client. `encoding`: "multipart" (default) or "json" (base64 image)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 3,
                 max_backoff: float = 10.0, encoding: str = "multipart", api_key: str | None = None):
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=_auth(api_key))
        self.retries, self.max_backoff, self.encoding = retries, max_backoff, encoding

    def caption(self, image, max_new_tokens: int | None = None, grounded: bool = False, **kw) -> Caption:
        """grounded: also the box of each object phrase (`Caption.phrases`)."""
        return self._post("/v1/caption", image, {"max_new_tokens": max_new_tokens, "grounded": grounded or None},
                          **kw)

    def refer(self, image, expression: str | list[str], **kw) -> Referral | list[Referral]:
        """A list of expressions: a Referral each, in order, from one call (one pass of the image's encoder)."""
        fields = {"expression": expression} if isinstance(expression, str) else {"expressions": list(expression)}
        return self._post("/v1/refer", image, fields, **kw)

    def ground(self, image, box=None, max_regions: int | None = None, boxes=None, **kw) -> list[Region]:
        """box: [x0, y0, x1, y1], any sequence of numbers (a tuple, a numpy array); boxes: several of them,
        described in one call (a Region each, in order)."""
        box = None if box is None else [float(v) for v in box]
        boxes = None if boxes is None else [[float(v) for v in b] for b in boxes]
        return self._post("/v1/ground", image, {"box": box, "boxes": boxes, "max_regions": max_regions}, **kw)

    def models(self) -> dict:
        return self.http.get("/v1/models").raise_for_status().json()

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    def _post(self, path, image, fields, request_id: str | None = None, timeout: float | None = None):
        req = _request(path, image, fields, self.encoding, request_id, timeout)
        for attempt in range(self.retries + 1):
            r = self.http.request(**req)
            if r.status_code == 200:
                return _typed(path, r.json())
            err = _error(r)
            if r.status_code not in RETRY_STATUS or attempt == self.retries:
                raise err
            time.sleep(_delay(err.retry_after, attempt, self.max_backoff))

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncLoccaClient(LoccaClient):
    """The same calls, awaitable (httpx.AsyncClient); for load tests and async services."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 3,
                 max_backoff: float = 10.0, encoding: str = "multipart", max_connections: int = 100,
                 api_key: str | None = None):
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_auth(api_key),
                                      limits=httpx.Limits(max_connections=max_connections))
        self.retries, self.max_backoff, self.encoding = retries, max_backoff, encoding

    async def models(self) -> dict:
        return (await self.http.get("/v1/models")).raise_for_status().json()

    async def ready(self) -> bool:
        return (await self.http.get("/readyz")).status_code == 200

    async def _post(self, path, image, fields, request_id: str | None = None, timeout: float | None = None):
        req = _request(path, image, fields, self.encoding, request_id, timeout)
        for attempt in range(self.retries + 1):
            r = await self.http.request(**req)
            if r.status_code == 200:
                return _typed(path, r.json())
            err = _error(r)
            if r.status_code not in RETRY_STATUS or attempt == self.retries:
                raise err
            await asyncio.sleep(_delay(err.retry_after, attempt, self.max_backoff))

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


# --- gRPC --------------------------------------------------------------------------------------------
class LoccaGrpcClient:
    """Blocking gRPC client over proto/locca/v1/locca.proto. `timeout` is each call's gRPC deadline."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 30.0, retries: int = 3,
                 max_backoff: float = 10.0, api_key: str | None = None):
        from service import protos  # noqa: PLC0415 (generates the stubs on first use; stdlib only, no server)

        self.pb, pb_grpc = protos.load()
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.LocCaStub(self.channel)
        self.timeout, self.retries, self.max_backoff = timeout, retries, max_backoff
        self.metadata = tuple((k.lower(), v) for k, v in _auth(api_key).items())

    def caption(self, image, max_new_tokens: int | None = None, timeout: float | None = None,
                grounded: bool = False) -> Caption:
        r = self._call(self.stub.Caption, self.pb.CaptionRequest(image=image_bytes(image), grounded=grounded,
                                                                 max_new_tokens=max_new_tokens or 0), timeout)
        phrases = [Phrase(p.text, (p.start, p.end), _box(p.box) if p.HasField("box") else None,
                          p.score if p.HasField("box") else None) for p in r.phrases]
        return Caption(r.caption, r.score, phrases if grounded else None)

    def refer(self, image, expression: str | list[str], timeout: float | None = None) -> Referral | list[Referral]:
        """A list of expressions: a Referral each, in order, from one call (one pass of the image's encoder)."""
        if not isinstance(expression, str):
            r = self._call(self.stub.Refer, self.pb.ReferRequest(image=image_bytes(image),
                                                                 expressions=list(expression)), timeout)
            return [Referral(x.expression, _box(x.box), x.score) for x in r.results]
        r = self._call(self.stub.Refer, self.pb.ReferRequest(image=image_bytes(image), expression=expression), timeout)
        return Referral(expression, _box(r.box), r.score)

    def ground(self, image, box: list[float] | None = None, max_regions: int | None = None,
               timeout: float | None = None, boxes: list[list[float]] | None = None) -> list[Region]:
        req = self.pb.GroundRequest(image=image_bytes(image), max_regions=max_regions or 0)
        if box is not None:
            req.box.CopyFrom(self.pb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3]))
        for b in boxes or ():
            req.boxes.append(self.pb.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3]))
        r = self._call(self.stub.Ground, req, timeout)
        return [Region(_box(g.box), g.text, g.score) for g in r.regions]

    def _call(self, method, request, timeout: float | None):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                ra, again = pushback(dict(e.trailing_metadata() or ()))
                if e.code() not in RETRY_GRPC or attempt == self.retries or not again:
                    raise LoccaError(e.code().name, e.code().name.lower(), e.details() or "", ra) from None
                time.sleep(_delay(ra, attempt, self.max_backoff))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pushback(trailers: dict) -> tuple[float | None, bool]:
    """(seconds to wait or None, whether to retry at all) from a gRPC error's trailers. The standard
    `grpc-retry-pushback-ms` (gRFC A6) wins: a non-negative integer is the wait, anything else means do not
    retry; without it, the server's `retry-after` seconds; without either, the caller's own backoff."""
    if "grpc-retry-pushback-ms" in trailers:
        ms = trailers["grpc-retry-pushback-ms"]
        return (int(ms) / 1000, True) if ms.isdigit() else (None, False)
    return (float(trailers["retry-after"]), True) if "retry-after" in trailers else (None, True)


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _box(b) -> list[float]:
    return [b.x0, b.y0, b.x1, b.y1]

"""Optional API-key authentication, off by default: with LOCCA_API_KEYS set, every call of the model API
(REST /v1/*, gRPC locca.v1.LocCa) must carry `Authorization: Bearer <key>` (gRPC: metadata `authorization`)
with one of the keys, else 401 `unauthorized` / UNAUTHENTICATED. Probes, metrics and docs stay open
(/healthz, /readyz, /metrics, /docs, /openapi.json, grpc.health.v1, reflection): kubelets and Prometheus
carry no keys, and none of them reveals an answer.

Keys are compared in constant time (hmac.compare_digest), against every configured key whatever the
outcome, so the time taken tells nothing about how much of a key was right or which key matched.
"""

from __future__ import annotations

import hmac
import json

import grpc

from . import metrics, protos
from .errors import Unauthorized
from .settings import Settings

CHALLENGE = [(b"www-authenticate", b'Bearer realm="locca"')]


class ApiKeys:
    def __init__(self, keys: list[str]):
        self.keys = [k.encode() for k in keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        keys = settings.api_key_list()
        return cls(keys) if keys else None

    def allows(self, authorization: str | None) -> bool:
        """`authorization` is the header's value: `Bearer <key>` (the scheme in any case)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        given = token.strip().encode("utf-8", "replace")
        ok = False
        for key in self.keys:  # no early exit: every key is compared every time
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"

    @staticmethod
    def denied(authorization: str | None) -> Unauthorized:
        if not authorization:
            return Unauthorized("this server needs an API key: send `Authorization: Bearer <key>`")
        return Unauthorized("the API key is not valid")


class RestApiKeys:
    """ASGI middleware: 401 (with WWW-Authenticate: Bearer) for a /v1/ request without a valid key, before its
    body is read."""

    def __init__(self, app, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        if self.keys.allows(given):
            return await self.app(scope, receive, send)
        body = json.dumps(self.keys.denied(given).body()).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *CHALLENGE]})
        await send({"type": "http.response.body", "body": body})


class GrpcApiKeys(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a locca.v1.LocCa call without a valid key in metadata `authorization`."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{protos.SERVICE}/"):
            return await continuation(details)
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if isinstance(given, bytes):
            given = given.decode("latin-1")
        if self.keys.allows(given):
            return await continuation(details)
        error, method = self.keys.denied(given), details.method.rsplit("/", 1)[-1]

        async def deny(request, context):
            metrics.REQUESTS.labels(f"grpc:{method}", error.grpc_code.name).inc()
            await context.abort(error.grpc_code, error.message)

        return grpc.unary_unary_rpc_method_handler(deny)


def grpc_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    keys = ApiKeys.from_settings(settings)
    return [GrpcApiKeys(keys)] if keys else []

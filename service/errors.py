"""The one set of service errors: each knows its REST status, its gRPC code and its stable `code` string.

Both transports turn a ServiceError into their own error shape (REST: `{"error": {"code", "message"}}`,
gRPC: status code + details); nothing else decides a status. What the engine core raises (a RequestError) or
finishes a request with becomes one here (`from_core`), in the worker, and crosses the pipe whole.
"""

from __future__ import annotations

import grpc

from model.core import Expired, ModelCallFailed
from model.requests import RequestError


class ServiceError(Exception):
    status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    code = "internal"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadImage(ServiceError):
    status, grpc_code, code = 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_image"


class BadBox(ServiceError):
    status, grpc_code, code = 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_box"


class BadExpression(ServiceError):
    status, grpc_code, code = 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_expression"


class BadRequest(ServiceError):
    """Well formed but impossible, e.g. a token budget too small for the task's grammar."""
    status, grpc_code, code = 400, grpc.StatusCode.INVALID_ARGUMENT, "bad_request"


class Unauthorized(ServiceError):
    """API keys are on (LOCCA_API_KEYS) and the request carries none of them."""
    status, grpc_code, code = 401, grpc.StatusCode.UNAUTHENTICATED, "unauthorized"


class RequestTimeout(ServiceError):
    """The client took longer than body_timeout_s to send its request's body."""
    status, grpc_code, code = 408, grpc.StatusCode.DEADLINE_EXCEEDED, "request_timeout"


class TooLarge(ServiceError):
    status, grpc_code, code = 413, grpc.StatusCode.INVALID_ARGUMENT, "too_large"


class UnsupportedMediaType(ServiceError):
    status, grpc_code, code = 415, grpc.StatusCode.INVALID_ARGUMENT, "unsupported_media_type"


class InvalidRequest(ServiceError):
    """The request does not match the schema (missing field, wrong type, out of range)."""
    status, grpc_code, code = 422, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"


class QueueFull(ServiceError):
    status, grpc_code, code = 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"


class Unavailable(ServiceError):
    """Not ready yet, draining, or the worker holding the request died; retrying is right."""
    status, grpc_code, code = 503, grpc.StatusCode.UNAVAILABLE, "unavailable"


class DeadlineExceeded(ServiceError):
    status, grpc_code, code = 504, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded"


class Internal(ServiceError):
    pass


def from_core(e: Exception) -> ServiceError:
    """The service error of what the engine core (model/core.py) raised or finished a request with."""
    if isinstance(e, RequestError):
        return {"bad_box": BadBox, "bad_expression": BadExpression}.get(e.code, BadRequest)(e.message)
    if isinstance(e, Expired):
        return DeadlineExceeded(str(e))
    if isinstance(e, ModelCallFailed):
        return Internal(str(e))
    return Internal(f"{type(e).__name__}: {e}")

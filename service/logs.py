"""Structured logs: one JSON object a line on stderr, with the request id of the request being served.

The request id comes from the client's X-Request-ID header (or x-request-id gRPC metadata) when it is a
sane token, else it is made up; it is returned to the client and carried by every log line of the request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# LogRecord attributes that are not "extra" fields
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                        "color_message"}


def new_request_id(given: str | None = None) -> str:
    return given if given and _SANE_ID.match(given) else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def __init__(self, **static):
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), **self.static}
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = request_id.get()
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        line = f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        line += "".join(f" {k}={v}" for k, v in extra.items()) + (f" request_id={rid}" if rid else "")
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup(level: str = "info", as_json: bool = True, **static) -> None:
    """Route the root logger (and uvicorn's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(**static) if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # service/rest.py logs each request itself

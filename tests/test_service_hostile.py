"""Hostile input against a real server: every class of bad request gets the contract's 4xx with a message
that says what is wrong, nothing reaches beyond the request's own bytes, and the server stays ready with no
5xx and no worker lost. Then schemathesis fuzzes the OpenAPI schema (a bounded run; `make fuzz` runs longer).

The classes (issue 9): empty, truncated and non-image bodies; decompression bombs and huge dimensions; wrong
content types; invalid JSON and fields of the wrong type; NaN, inverted and out-of-range boxes; oversized
expressions and bodies; absurd max_new_tokens / max_regions; strings that look like URLs or file paths;
malformed headers; the same over gRPC, and gRPC messages that do not parse.
"""

import base64
import contextlib
import io
import json
import math
import os
import socket
import struct
import threading
import time
import zlib

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode

from client.sdk import pushback
from model import checkpoint
from model.config import BoxConfig
from model.shapes import generate_scene
from service import launch, protos

pb, pb_grpc = protos.load()
LIMITS = {"max_body_bytes": 2_000_000, "max_image_bytes": 1_500_000, "max_image_pixels": 4_000_000,
          "body_timeout_s": 1.5, "max_buffered_bytes": 4_000_000}
J = {"Content-Type": "application/json"}


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


SCENE = generate_scene(3)
IMAGE = encode(SCENE.image)
B64 = base64.b64encode(IMAGE).decode()
W, H = SCENE.image.size


# --- crafted files: headers that declare what the bytes do not hold -----------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, extra: bytes = b"") -> bytes:
    """A PNG whose header says width x height RGB, with a tiny IDAT: a bomb if it were ever decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + png_chunk(b"IEND", b""))


def ztxt_bomb() -> bytes:
    """A 64x64 PNG carrying a zTXt chunk that inflates to 64 MB (from ~64 KB)."""
    text = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
    good = encode(Image.new("RGB", (64, 64)))
    return good[:33] + text + good[33:]  # right after IHDR (8 + 25 bytes)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


# --- the server -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, tok):
    path = tmp_path_factory.mktemp("model") / "checkpoint.safetensors"
    checkpoint.save(path, tiny_model, tok, BoxConfig(bins=64))
    s = launch.start(tmp_path_factory.mktemp("log") / "serve.log", model=path, backend="torch", threads=1,
                     **LIMITS)
    try:
        s.wait("/readyz")
        yield s
    finally:
        s.stop()


def post(server, path, timeout=60, **kw):
    return httpx.post(server.url + path, timeout=timeout, **kw)


def raw_json(text: str | bytes) -> dict:
    return {"content": text.encode() if isinstance(text, str) else text, "headers": J}


# (name, path, httpx keywords, status, error code or None, words the message must hold)
CASES = [
    # empty, truncated, not an image
    ("empty JSON body", "/v1/caption", raw_json(b""), 422, "invalid_request", "not valid JSON"),
    ("empty multipart body", "/v1/caption", {"content": b"", "headers": {
        "Content-Type": "multipart/form-data; boundary=x"}}, 422, "invalid_request", "image"),
    ("empty image part", "/v1/caption", {"files": {"image": b""}}, 400, "bad_image", "empty"),
    ("empty base64 image", "/v1/caption", {"json": {"image": ""}}, 400, "bad_image", "empty"),
    ("truncated PNG", "/v1/caption", {"files": {"image": IMAGE[:len(IMAGE) // 3]}}, 400, "bad_image", "decoded"),
    ("truncated JPEG", "/v1/caption", {"files": {"image": encode(SCENE.image, "JPEG")[:600]}}, 400, "bad_image",
     "decoded"),
    ("PNG signature only", "/v1/caption", {"files": {"image": IMAGE[:8]}}, 400, "bad_image", ""),
    ("truncated base64", "/v1/caption", {"json": {"image": B64[:-3]}}, 400, "bad_image", "base64"),
    ("text as image", "/v1/caption", {"files": {"image": b"hello, I am not an image"}}, 400, "bad_image",
     "accepted format"),
    ("PDF as image", "/v1/caption", {"files": {"image": b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n"}}, 400, "bad_image", ""),
    ("SVG as image", "/v1/caption", {"files": {"image": b'<svg xmlns="http://www.w3.org/2000/svg"><image '
                                                        b'href="file:///etc/passwd"/></svg>'}}, 400, "bad_image", ""),
    ("EPS as image (never handed to Ghostscript)", "/v1/caption", {"files": {"image": b"%!PS-Adobe-3.0 EPSF-3.0\n"
                                                                             b"%%BoundingBox: 0 0 10 10\n"}},
     400, "bad_image", "accepted format"),
    ("ICO (a format outside the contract)", "/v1/caption", {"files": {"image": encode(Image.new("RGB", (16, 16)),
                                                                                       "ICO")}},
     400, "bad_image", "accepted format"),
    # decompression bombs and huge dimensions: refused from the header, before anything is decoded
    ("PNG declaring 50000x50000", "/v1/caption", {"files": {"image": png_declaring(50000, 50000)}}, 413,
     "too_large", "pixels"),
    ("PNG declaring 2^31-1 x 1", "/v1/caption", {"files": {"image": png_declaring(2**31 - 1, 1)}}, 413,
     "too_large", ""),
    ("GIF declaring 65535x65535", "/v1/caption", {"files": {"image": gif_declaring(65535, 65535)}}, 413,
     "too_large", ""),
    ("JPEG declaring 60000x60000", "/v1/caption", {"files": {"image": jpeg_declaring(60000, 60000)}}, 413,
     "too_large", ""),
    ("BMP declaring 50000x50000", "/v1/caption", {"files": {"image": bmp_declaring(50000, 50000)}}, 413,
     "too_large", ""),
    ("zTXt text bomb", "/v1/caption", {"files": {"image": ztxt_bomb()}}, 400, "bad_image", ""),
    ("PNG declaring 0x0", "/v1/caption", {"files": {"image": png_declaring(0, 0)}}, 400, "bad_image", ""),
    # wrong content types
    ("text/plain", "/v1/caption", {"content": B64, "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported_media_type", "multipart/form-data"),
    ("image/png", "/v1/caption", {"content": IMAGE, "headers": {"Content-Type": "image/png"}}, 415,
     "unsupported_media_type", ""),
    ("no content type", "/v1/caption", {"content": IMAGE}, 415, "unsupported_media_type", "none"),
    ("urlencoded form", "/v1/caption", {"data": {"image": B64}}, 415, "unsupported_media_type", ""),
    ("multipart without a boundary", "/v1/caption", {"content": b"--x\r\n", "headers": {
        "Content-Type": "multipart/form-data"}}, 422, "invalid_request", "boundary"),
    # invalid JSON
    ("unclosed JSON", "/v1/caption", raw_json("{"), 422, "invalid_request", "not valid JSON"),
    ("JSON null", "/v1/caption", raw_json("null"), 422, "invalid_request", "JSON object"),
    ("JSON array", "/v1/caption", raw_json(json.dumps([B64])), 422, "invalid_request", "JSON object"),
    ("JSON nested 100000 deep", "/v1/caption", raw_json('{"image": ' + "[" * 100_000), 422, "invalid_request",
     "nested"),
    ("JSON 5000-digit integer", "/v1/caption", raw_json('{"image": "", "max_new_tokens": ' + "9" * 5000 + "}"),
     422, "invalid_request", "not valid JSON"),
    ("JSON not UTF-8", "/v1/refer", raw_json(b'{"image": "' + B64.encode() + b'", "expression": "\xff\xfe"}'), 422,
     "invalid_request", "not valid JSON"),
    ("JSON lone surrogate", "/v1/refer", raw_json('{"image": "' + B64 + '", "expression": "\\ud800"}'), 422,
     "invalid_request", "expression"),
    # fields of the wrong type
    ("no image", "/v1/caption", {"json": {}}, 422, "invalid_request", "image"),
    ("image null", "/v1/caption", {"json": {"image": None}}, 422, "invalid_request", "image"),
    ("image number", "/v1/caption", {"json": {"image": 12}}, 422, "invalid_request", "image"),
    ("image object", "/v1/caption", {"json": {"image": {"url": "x"}}}, 422, "invalid_request", "image"),
    ("no file part", "/v1/caption", {"files": {"picture": IMAGE}}, 422, "invalid_request", "image"),
    ("two images", "/v1/caption", {"files": [("image", ("a.png", IMAGE)), ("image", ("b.png", IMAGE))]}, 422,
     "invalid_request", "files"),
    ("100 form fields", "/v1/caption", {"files": {"image": IMAGE}, "data": {f"f{i}": "x" for i in range(100)}},
     422, "invalid_request", "fields"),
    ("expression number", "/v1/refer", {"json": {"image": B64, "expression": 5}}, 422, "invalid_request",
     "expression"),
    ("expression list", "/v1/refer", {"json": {"image": B64, "expression": ["a"]}}, 422, "invalid_request",
     "expression"),
    ("expression as a file part", "/v1/refer", {"files": {"image": IMAGE, "expression": ("e.txt", b"x")}}, 422,
     "invalid_request", ""),
    ("max_new_tokens text", "/v1/caption", {"json": {"image": B64, "max_new_tokens": "many"}}, 422,
     "invalid_request", "max_new_tokens"),
    ("max_new_tokens 3.5", "/v1/caption", {"json": {"image": B64, "max_new_tokens": 3.5}}, 422, "invalid_request",
     "max_new_tokens"),
    ("max_regions 2.5", "/v1/ground", {"json": {"image": B64, "max_regions": 2.5}}, 422, "invalid_request",
     "max_regions"),
    ("box text", "/v1/ground", {"json": {"image": B64, "box": "a,b,c,d"}}, 422, "invalid_request", "box"),
    ("box object", "/v1/ground", {"json": {"image": B64, "box": {"x0": 1}}}, 422, "invalid_request", "box"),
    ("box of lists", "/v1/ground", {"json": {"image": B64, "box": [[1], [2], [3], [4]]}}, 422, "invalid_request",
     "box"),
    ("box of 3", "/v1/ground", {"json": {"image": B64, "box": [1, 2, 3]}}, 422, "invalid_request", "box"),
    ("box of 5", "/v1/ground", {"json": {"image": B64, "box": [1, 2, 3, 4, 5]}}, 422, "invalid_request", "box"),
    ("form box unclosed JSON", "/v1/ground", {"files": {"image": IMAGE}, "data": {"box": "[1, 2"}}, 422,
     "invalid_request", "box"),
    ("form box nested 100000 deep", "/v1/ground", {"files": {"image": IMAGE}, "data": {"box": "[" * 100_000}}, 422,
     "invalid_request", "box"),
    ("box of booleans", "/v1/ground", {"json": {"image": B64, "box": [True, True, 50, 50]}}, 422,
     "invalid_request", "not true or false"),
    ("max_regions true", "/v1/ground", {"json": {"image": B64, "max_regions": True}}, 422, "invalid_request",
     "max_regions"),
    ("max_new_tokens true", "/v1/caption", {"json": {"image": B64, "max_new_tokens": True}}, 422,
     "invalid_request", "max_new_tokens"),
    # NaN, inverted, out-of-range boxes
    ("box NaN", "/v1/ground", raw_json('{"image": "' + B64 + '", "box": [NaN, 1, 5, 5]}'), 400, "bad_box",
     "finite"),
    ("box Infinity", "/v1/ground", raw_json('{"image": "' + B64 + '", "box": [0, 0, Infinity, 5]}'), 400, "bad_box",
     "finite"),
    ("box 1e400", "/v1/ground", raw_json('{"image": "' + B64 + '", "box": [0, 0, 1e400, 5]}'), 400, "bad_box",
     "finite"),
    ("form box nan", "/v1/ground", {"files": {"image": IMAGE}, "data": {"box": "nan,1,5,5"}}, 400, "bad_box",
     "finite"),
    ("form box -inf", "/v1/ground", {"files": {"image": IMAGE}, "data": {"box": "-inf,1,5,5"}}, 400, "bad_box",
     "finite"),
    ("box inverted", "/v1/ground", {"json": {"image": B64, "box": [50, 50, 10, 10]}}, 400, "bad_box", "x0 < x1"),
    ("box of zero area", "/v1/ground", {"json": {"image": B64, "box": [10, 10, 10, 40]}}, 400, "bad_box",
     "x0 < x1"),
    ("box outside the image", "/v1/ground", {"json": {"image": B64, "box": [W + 1, 0, W + 9, 9]}}, 400, "bad_box",
     "outside"),
    ("box far negative", "/v1/ground", {"json": {"image": B64, "box": [-1e308, -1e308, -1e300, -1e300]}}, 400,
     "bad_box", "outside"),
    # oversized expressions and bodies
    ("expression of 257 characters", "/v1/refer", {"json": {"image": B64, "expression": "x" * 257}}, 422,
     "invalid_request", "256"),
    ("expression of 1 MB", "/v1/refer", {"json": {"image": B64, "expression": "x" * 1_000_000}}, 422,
     "invalid_request", "256"),
    ("expression of 256 emoji (too many tokens)", "/v1/refer", {"json": {"image": B64,
                                                                         "expression": "\U0001F600" * 256}},
     400, "bad_request", "positions"),
    ("empty expression", "/v1/refer", {"json": {"image": B64, "expression": ""}}, 400, "bad_expression", "empty"),
    ("blank expression", "/v1/refer", {"json": {"image": B64, "expression": "\t \n"}}, 400, "bad_expression",
     "empty"),
    ("body over the limit", "/v1/caption", {"content": b"{" + b" " * 2_100_000 + b"}", "headers": J}, 413,
     "too_large", "limit"),
    ("chunked body over the limit", "/v1/caption", {"content": iter([b" " * 65536] * 40), "headers": J}, 413,
     "too_large", "limit"),
    ("image over the limit", "/v1/caption", {"files": {"image": b"\x89PNG" + os.urandom(1_600_000)}}, 413,
     "too_large", "limit"),
    ("base64 image over the body limit", "/v1/caption", {"json": {"image": base64.b64encode(b"\0" * 1_600_000)
                                                                  .decode()}}, 413, "too_large", "limit"),
    # absurd numbers
    ("max_new_tokens 0", "/v1/caption", {"json": {"image": B64, "max_new_tokens": 0}}, 422, "invalid_request",
     "max_new_tokens"),
    ("max_new_tokens -1", "/v1/caption", {"json": {"image": B64, "max_new_tokens": -1}}, 422, "invalid_request",
     "max_new_tokens"),
    ("max_new_tokens 10^30", "/v1/caption", {"json": {"image": B64, "max_new_tokens": 10**30}}, 422,
     "invalid_request", "max_new_tokens"),
    ("max_new_tokens 1e400", "/v1/caption", raw_json('{"image": "' + B64 + '", "max_new_tokens": 1e400}'), 422,
     "invalid_request", "max_new_tokens"),
    ("max_new_tokens 1 (under the grammar)", "/v1/caption", {"json": {"image": B64, "max_new_tokens": 1}}, 400,
     "bad_request", ""),
    ("max_regions 0", "/v1/ground", {"json": {"image": B64, "max_regions": 0}}, 422, "invalid_request",
     "max_regions"),
    ("max_regions 10^9", "/v1/ground", {"json": {"image": B64, "max_regions": 10**9}}, 422, "invalid_request",
     "max_regions"),
    ("max_regions NaN", "/v1/ground", raw_json('{"image": "' + B64 + '", "max_regions": NaN}'), 422,
     "invalid_request", "max_regions"),
    ("form max_regions 1e3", "/v1/ground", {"files": {"image": IMAGE}, "data": {"max_regions": "1e3"}}, 422,
     "invalid_request", "max_regions"),
    # URLs and paths are never followed: an image is bytes
    ("image as an http URL", "/v1/caption", {"json": {"image": "http://169.254.169.254/latest/meta-data/"}}, 400,
     "bad_image", ""),
    ("image as a file URL", "/v1/caption", {"json": {"image": "file:///etc/passwd"}}, 400, "bad_image", ""),
    ("image as a path", "/v1/caption", {"json": {"image": "/etc/passwd"}}, 400, "bad_image", ""),
    ("image as a path that is valid base64", "/v1/caption", {"json": {"image": "/etc/hostname/"}}, 400,
     "bad_image", ""),
    ("form image as a URL field", "/v1/caption", {"data": {"image": "https://example.com/a.png"},
                                                  "files": {"x": b""}}, 400, "bad_image", ""),
    # headers and methods
    ("X-Request-Timeout text", "/v1/caption", {"json": {"image": B64}, "headers": {"X-Request-Timeout": "soon"}},
     422, "invalid_request", "X-Request-Timeout"),
    ("X-Request-Timeout NaN", "/v1/caption", {"json": {"image": B64}, "headers": {"X-Request-Timeout": "nan"}},
     422, "invalid_request", "X-Request-Timeout"),
    ("X-Request-Timeout negative", "/v1/caption", {"json": {"image": B64}, "headers": {"X-Request-Timeout": "-1"}},
     422, "invalid_request", "X-Request-Timeout"),
    ("render=gif", "/v1/caption?render=gif", {"json": {"image": B64}}, 422, "invalid_request", "render"),
]


@pytest.mark.parametrize("name,path,kw,status,code,words", CASES, ids=[c[0] for c in CASES])
def test_hostile_rest(server, name, path, kw, status, code, words):
    r = post(server, path, **kw)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == code and words.lower() in err["message"].lower(), (name, err)


# Odd but acceptable: served, not refused.
SERVED = [
    ("box partly outside is clipped", "/v1/ground", {"json": {"image": B64, "box": [-1e308, -5, 1e308, 20]}}),
    ("box as a JSON string", "/v1/ground", {"json": {"image": B64, "box": "1,2,30,40"}}),
    ("expression with NUL and controls", "/v1/refer", {"json": {"image": B64, "expression": "a\x00b\x1b[31m"}}),
    ("expression as a URL (text, never fetched)", "/v1/refer", {"json": {"image": B64,
                                                                         "expression": "http://127.0.0.1:1/x"}}),
    ("expression not UTF-8 in a form", "/v1/refer", {"files": {"image": IMAGE, "expression": (None, b"\xff\xfe")}}),
    ("JSON in UTF-16", "/v1/caption", raw_json(json.dumps({"image": B64}).encode("utf-16"))),
    ("data URL image", "/v1/caption", {"json": {"image": "data:image/png;base64," + B64}}),
    ("1 x 3,000,000 image", "/v1/ground", {"files": {"image": encode(Image.new("L", (1, 3_000_000)))},
                                           "data": {"max_regions": "2"}}),
    ("3,000,000 x 1 image, rendered", "/v1/refer?render=png", {"files": {"image": encode(
        Image.new("RGB", (3_000_000, 1)))}, "data": {"expression": "the \u202e\u0000 thing"}}),
    ("LAB TIFF", "/v1/caption", {"files": {"image": encode(SCENE.image.convert("LAB"), "TIFF")}}),
    ("1-bit PNG", "/v1/caption", {"files": {"image": encode(SCENE.image.convert("1"))}}),
    ("X-Request-Timeout inf", "/v1/caption", {"json": {"image": B64}, "headers": {"X-Request-Timeout": "inf"}}),
    ("X-Request-ID not UTF-8", "/v1/caption", {"json": {"image": B64}, "headers": {"X-Request-ID": b"\xe9\xff"}}),
]


@pytest.mark.parametrize("name,path,kw", SERVED, ids=[c[0] for c in SERVED])
def test_odd_but_valid_requests_are_served(server, name, path, kw):
    r = post(server, path, **kw)
    assert r.status_code == 200, (name, r.text[:300])


def test_declared_body_far_over_the_limit_is_refused_without_waiting_for_it(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 99999999999\r\n\r\n{")
        assert c.recv(64).startswith(b"HTTP/1.1 413")


def test_a_stalled_or_trickled_body_is_408_after_body_timeout(server):
    for trickle in (False, True):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
            c.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
            t0 = time.monotonic()
            c.settimeout(0.2)
            answer, took = b"", None
            while not answer.endswith(b"}}") and time.monotonic() - t0 < 8:
                if trickle and not answer:
                    c.sendall(b" ")  # a byte every 0.2 s: never idle, never done
                with contextlib.suppress(TimeoutError):
                    answer += c.recv(1000)
                    took = took or time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer, answer
        limit = LIMITS["body_timeout_s"]
        assert took >= limit - 0.1, f"408 after {took:.2f} s: before the {limit} s body timeout ran out"
        assert took <= limit + 2.5, f"408 only after {took:.2f} s: the {limit} s body timeout was not enforced"


def test_bodies_held_at_once_stay_under_the_budget(server):
    """Three 1.9 MB bodies in progress at once against a 4 MB budget: the third is read, dropped and 429."""
    body = b'{"image": "' + b"A" * 1_900_000 + b'"}'
    head = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    conns = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        for c in conns:  # all but the last 100 kB of each
            c.sendall(head + body[:-100_000])
            time.sleep(0.2)
        answers = []
        for c in reversed(conns):
            c.sendall(body[-100_000:])
            answers.append(c.recv(300))
    finally:
        for c in conns:
            c.close()
    third, second, first = answers
    assert third.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in third.lower(), third
    assert first.startswith(b"HTTP/1.1 400") and second.startswith(b"HTTP/1.1 400"), (first, second)
    assert post(server, "/v1/caption", files={"image": IMAGE}).status_code == 200  # the budget is free again


def test_grpc_messages_share_the_budget_with_rest_bodies(server):
    """Two 1.9 MB REST bodies in progress hold 3.8 of the 4 MB budget: a 1 MB gRPC message is refused with
    RESOURCE_EXHAUSTED and retry-after; once they are gone the same message is admitted (and, being no image,
    refused for that)."""
    body = b'{"image": "' + b"A" * 1_900_000 + b'"}'
    head = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    message = pb.CaptionRequest(image=b"\x00" * 1_000_000)
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.LocCaStub(ch)
        conns = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        try:
            for c in conns:
                c.sendall(head + body[:-100_000])
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as e:
                stub.Caption(message, timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
            assert "too much at once" in e.value.details()
            trailers = dict(e.value.trailing_metadata())
            assert trailers["retry-after"] == "1" and trailers["grpc-retry-pushback-ms"] == "1000"
            assert pushback(trailers) == (1.0, True)  # the client's policy waits what the server asks
        finally:
            for c in conns:
                c.close()
        t0 = time.monotonic()  # the server notices the closed connections and frees their bytes
        while True:
            with pytest.raises(grpc.RpcError) as e:
                stub.Caption(message, timeout=10)
            if e.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() - t0 > 5:
                break
            time.sleep(0.1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_raw_http_garbage_gets_4xx(server):
    for payload in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
                    b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
            c.sendall(payload)
            status = int(c.recv(64).split(b" ")[1])
        assert 400 <= status < 500, payload
    assert httpx.get(server.url + "/v1/caption").status_code == 405


class Listener:
    """A local TCP port that counts connections: a URL naming it shows whether the server ever fetched it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port, self.connections = self.sock.getsockname()[1], 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def test_urls_and_paths_in_requests_are_never_followed(server, tmp_path):
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/image.png"
    real = tmp_path / "scene.png"
    real.write_bytes(IMAGE)  # a real image the server could read, if it ever opened a path
    for image in (url, f"file://{real}", str(real), str(real) + "/"):
        r = post(server, "/v1/caption", json={"image": image})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image", (image, r.text)
        r = post(server, "/v1/caption", data={"image": image}, files={"other": b""})
        assert r.status_code == 400, (image, r.text)
    # a file part's name is only a name: the bytes are what is read
    r = post(server, "/v1/caption", files={"image": (str(real), b"not an image")})
    assert r.status_code == 400
    for text in (url, "file:///etc/passwd", "/etc/passwd"):
        assert post(server, "/v1/refer", json={"image": B64, "expression": text}).status_code == 200
        assert post(server, "/v1/refer?render=png", json={"image": B64, "expression": text}).status_code == 200
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.LocCaStub(ch)
        for image in (url.encode(), str(real).encode()):
            with pytest.raises(grpc.RpcError) as e:
                stub.Caption(pb.CaptionRequest(image=image), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.Refer(pb.ReferRequest(image=IMAGE, expression=url), timeout=30)
    assert listener.connections == 0


GRPC_CASES = [
    ("empty request", "Caption", pb.CaptionRequest().SerializeToString(), "empty"),
    ("junk bytes", "Caption", b"\xff\xff\xff\xff", "not a valid locca.v1.CaptionRequest"),
    ("truncated message", "Caption", pb.CaptionRequest(image=IMAGE).SerializeToString()[:100], "not a valid"),
    ("expression not UTF-8", "Refer", b"\x0a\x01x\x12\x02\xff\xfe", "not a valid locca.v1.ReferRequest"),
    ("truncated image", "Caption", pb.CaptionRequest(image=IMAGE[:200]).SerializeToString(), "decoded"),
    ("bomb", "Caption", pb.CaptionRequest(image=png_declaring(50000, 50000)).SerializeToString(), "pixels"),
    ("NaN box", "Ground", pb.GroundRequest(image=IMAGE, box=pb.Box(x0=math.nan, y0=0, x1=5, y1=5))
     .SerializeToString(), "finite"),
    ("infinite box", "Ground", pb.GroundRequest(image=IMAGE, box=pb.Box(x0=0, y0=0, x1=math.inf, y1=5))
     .SerializeToString(), "finite"),
    ("inverted box", "Ground", pb.GroundRequest(image=IMAGE, box=pb.Box(x0=9, y0=9, x1=1, y1=1))
     .SerializeToString(), "x0 < x1"),
    ("all-zero box", "Ground", pb.GroundRequest(image=IMAGE, box=pb.Box()).SerializeToString(), "x0 < x1"),
    ("max_regions 2^31-1", "Ground", pb.GroundRequest(image=IMAGE, max_regions=2**31 - 1).SerializeToString(),
     "max_regions"),
    ("max_regions -1", "Ground", pb.GroundRequest(image=IMAGE, max_regions=-1).SerializeToString(), "max_regions"),
    ("max_new_tokens -2^31", "Caption", pb.CaptionRequest(image=IMAGE, max_new_tokens=-2**31).SerializeToString(),
     "max_new_tokens"),
    ("expression of 10000", "Refer", pb.ReferRequest(image=IMAGE, expression="x" * 10000).SerializeToString(),
     "256"),
    ("empty expression", "Refer", pb.ReferRequest(image=IMAGE).SerializeToString(), "empty"),
]


@pytest.mark.parametrize("name,method,message,words", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_hostile_grpc(server, name, method, message, words):
    with grpc.insecure_channel(server.grpc_target) as ch:
        call = ch.unary_unary(f"/locca.v1.LocCa/{method}", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(message, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value.code(), e.value.details())
    assert words.lower() in e.value.details().lower(), (name, e.value.details())


def test_grpc_message_over_the_limit_is_resource_exhausted(server):
    with grpc.insecure_channel(server.grpc_target) as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.LocCaStub(ch).Caption(pb.CaptionRequest(image=b"x" * 2_100_000), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- schemathesis: requests generated from the server's own OpenAPI schema ---------------------------------
FUZZ_EXAMPLES = int(os.environ.get("LOCCA_FUZZ_EXAMPLES", "25"))  # per operation; `make fuzz` sets more


def fuzz(operation, mode: GenerationMode, statuses: list[int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def run(case):
        r = case.call(timeout=60)
        statuses.append(r.status_code)
        assert r.status_code < 500, (case.method, case.path, mode, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["code"], r.text[:300]
        # Status codes, content types and bodies as documented. Not judged: a schema-valid request refused
        # (a string is not always an image: 400) and a "wrong type" accepted (a form's fields are all text).
        case.validate_response(r, excluded_checks=[schemathesis.checks.positive_data_acceptance,
                                                   schemathesis.checks.negative_data_rejection])

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # an operation without parameters has nothing to get wrong


def test_openapi_fuzz_gets_no_5xx(server):
    """Every operation of /openapi.json, with requests that fit the schema and requests that do not."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    statuses = []
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode, statuses)
    assert len(statuses) >= 4 * FUZZ_EXAMPLES and any(400 <= s < 500 for s in statuses), statuses


def test_still_ready_with_no_5xx_and_no_worker_lost(server):
    """Last in the module: after all of the above, the server is ready, served nothing 5xx, lost no worker."""
    assert server.get("/readyz").status_code == 200
    assert server.metric("locca_worker_restarts_total") == 0
    fives = [line for line in server.get("/metrics").text.splitlines()  # /readyz said 503 before ready
             if line.startswith("locca_requests_total{") and "/readyz" not in line
             and ('status="5' in line or "INTERNAL" in line or "UNKNOWN" in line)]
    assert not [f for f in fives if not f.endswith(" 0.0")], fives
    assert post(server, "/v1/caption", files={"image": IMAGE}).status_code == 200

"""Fuzz targets (hypothesis) for the two places where a request's bytes are parsed, in-process, no server:
image decoding (service/images.py) and request reading (service/body.py, service/schemas.py).

The property is the same everywhere: any input either gives a well-formed result within the limits, or one of
the contract's client errors (a ServiceError with a 4xx status); nothing else may escape, since anything else
would be a 500. The inputs are mutations of real files of every accepted format (bytes flipped, cut,
inserted), headers that declare any size, and JSON / multipart bodies built from the request fields.

`make fuzz` runs these with LOCCA_FUZZ_EXAMPLES=2000 (default here 150 each, a few seconds).
"""

import asyncio
import io
import json
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from model.requests import RequestError, check_box
from model.shapes import generate_scene
from service import images
from service import schemas as api
from service.body import read_request
from service.errors import ServiceError, from_core

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the corrupt files it reads
EXAMPLES = int(os.environ.get("LOCCA_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = images.Limits(max_bytes=1 << 20, max_pixels=1_000_000)
BODY_LIMIT = 1 << 20


def client_error(e: BaseException) -> bool:
    return isinstance(e, ServiceError) and 400 <= e.status < 500


def seeds() -> list[bytes]:
    """One small file of every accepted format, and several modes and compressions."""
    im = generate_scene(0).image.resize((48, 32))
    out = []
    for fmt, mode, kw in [("PNG", "RGB", {}), ("PNG", "P", {}), ("PNG", "RGBA", {}), ("PNG", "I;16", {}),
                          ("JPEG", "RGB", {"quality": 50}), ("JPEG", "CMYK", {}), ("JPEG", "L", {"progressive": True}),
                          ("WEBP", "RGB", {}), ("WEBP", "RGBA", {"lossless": True}), ("BMP", "RGB", {}),
                          ("BMP", "P", {}), ("GIF", "P", {}), ("TIFF", "RGB", {}), ("TIFF", "RGB", {
                              "compression": "tiff_lzw"}), ("TIFF", "RGB", {"compression": "tiff_adobe_deflate"}),
                          ("TIFF", "F", {}), ("TIFF", "1", {"compression": "group4"}), ("TIFF", "LAB", {})]:
        x = im.convert("L").convert(mode) if mode == "I;16" else im.convert(mode)
        buf = io.BytesIO()
        x.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
        if not data:
            break
    return bytes(data)


def png_declaring(width: int, height: int, color_type: int, depth: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b""))


image_inputs = st.one_of(
    mutated(),
    st.binary(max_size=2048),
    st.builds(png_declaring, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([0, 2, 3, 4, 6]),
              st.sampled_from([1, 2, 4, 8, 16])),
)


@FUZZ
@given(data=image_inputs)
def test_image_decoding_gives_an_image_within_limits_or_a_client_error(data):
    try:
        pixels, (w, h) = images.load(data, LIMITS, 32)
    except Exception as e:  # noqa: BLE001 (the property: only the contract's errors)
        assert client_error(e), f"{type(e).__name__}: {e}"
        return
    assert pixels.shape == (3, 32, 32) and pixels.dtype.name == "float32"
    assert 0 < w * h <= LIMITS.max_pixels


@FUZZ
@given(box=st.lists(st.one_of(st.floats(), st.integers(-2**70, 2**70), st.booleans()), min_size=0, max_size=6),
       size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)))
def test_a_box_is_clipped_inside_the_image_or_refused(box, size):
    try:
        x0, y0, x1, y1 = check_box(box, *size)
    except Exception as e:  # noqa: BLE001 (the property: only the contract's errors)
        assert isinstance(e, RequestError) and client_error(from_core(e)), f"{type(e).__name__}: {e}"
        return
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


# --- request bodies -----------------------------------------------------------------------------------
FIELDS = ["image", "max_new_tokens", "expression", "box", "max_regions", "render"]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=4), max_leaves=12)
field_values = st.one_of(json_values, st.just("aGVsbG8="), st.just("data:image/png;base64,"), st.sampled_from(
    ["1,2,3,4", "[1,2,3,4]", "nan,0,1,1", "[", "", "32", "-1", "1e999", "png", "json"]))


@st.composite
def json_body(draw) -> tuple[str, bytes]:
    if draw(st.booleans()):
        obj = draw(st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6))
        text = json.dumps(obj)
    else:
        text = draw(st.text(max_size=200))
    return "application/json", text.encode("utf-8", "surrogatepass")


@st.composite
def multipart_body(draw) -> tuple[str, bytes]:
    boundary = "fuzzboundary"
    parts = []
    for name in draw(st.lists(st.sampled_from(FIELDS + ["other"]), max_size=6)):
        if draw(st.booleans()):
            head = f'Content-Disposition: form-data; name="{name}"; filename="f"\r\nContent-Type: image/png'
            value = draw(st.one_of(mutated(), st.binary(max_size=64)))
        else:
            head = f'Content-Disposition: form-data; name="{name}"'
            value = draw(st.text(max_size=30)).encode("utf-8", "surrogatepass")
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    if draw(st.booleans()):  # cut anywhere
        body = body[:draw(st.integers(0, len(body)))]
    return f"multipart/form-data; boundary={boundary}", body


bodies = st.one_of(json_body(), multipart_body(),
                   st.tuples(st.sampled_from(["", "text/plain", "multipart/form-data", "application/json; x=\"",
                                              "multipart/form-data; boundary="]), st.binary(max_size=256)))
MODELS = [(api.CaptionRequest, api.CaptionParams), (api.ReferRequest, api.ReferParams),
          (api.GroundRequest, api.GroundParams)]


def read(content_type: str, body: bytes, full, params):
    headers = [(b"content-type", content_type.encode("latin-1", "replace"))] if content_type else []
    headers.append((b"content-length", str(len(body)).encode()))
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/x", "headers": headers, "query_string": b""},
                      receive)
    return asyncio.run(read_request(request, full, params, BODY_LIMIT))


@FUZZ
@given(body=bodies, models=st.sampled_from(MODELS))
def test_request_reading_gives_valid_params_or_a_client_error(body, models):
    content_type, data = body
    try:
        p, image = read(content_type, data, *models)
    except Exception as e:  # noqa: BLE001
        assert client_error(e), f"{type(e).__name__}: {e}"
        return
    assert isinstance(p, models[1]) and isinstance(image, bytes)
    if isinstance(p, api.GroundParams) and p.box is not None:
        assert len(p.box) == 4 and all(isinstance(v, float) for v in p.box)


def test_seeds_decode():
    """The seeds themselves are valid files, so mutations start from deep inside every decoder."""
    for data in SEEDS:
        _, size = images.load(data, LIMITS, 32)
        assert size == (48, 32)
    assert len({Image.open(io.BytesIO(d)).format for d in SEEDS}) == len(images.FORMATS)


# --- the fast parsers answer as the standard library's ------------------------------------------------------
# The REST path reads JSON with orjson and base64 with pybase64 (speed, on the event loop); what they accept
# and what they refuse must be what the standard library accepts and refuses, with the same values. One
# difference, by design: orjson reads an integer beyond 64 bits as a float, and every integer field of the API
# is bounded far below that, so such a value is 422 either way (test below).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN, 1 != 1.0, as written


@FUZZ
@given(JSON_VALUES, st.booleans())
def test_a_json_body_reads_as_the_standard_library_reads_it(value, pretty):
    from service.body import parse_json
    body = json.dumps(value, indent=2 if pretty else None).encode()
    assert _same(parse_json(body), json.loads(body))


@FUZZ
@given(st.binary(max_size=300))
def test_bytes_that_are_not_json_are_refused_as_the_standard_library_refuses_them(body):
    from service.body import parse_json
    from service.errors import InvalidRequest
    try:
        expected = json.loads(body)
    except (ValueError, RecursionError):
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            parse_json(body)
    else:
        assert _same(parse_json(body), expected)


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["", "data:image/png;base64,"]), st.sampled_from([0, 76]))
def test_base64_decodes_as_the_standard_library_decodes_it(data, prefix, wrap):
    import base64
    text = base64.b64encode(data).decode()
    if wrap:  # MIME-style line breaks
        text = "\n".join(text[i:i + wrap] for i in range(0, len(text), wrap))
    assert api.b64_image(prefix + text) == data


@FUZZ
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n -_é", max_size=40))
def test_text_that_is_not_base64_is_refused_as_the_standard_library_refuses_it(text):
    import base64
    import binascii
    import re
    try:
        expected = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        with pytest.raises(ServiceError, match="not valid base64"):
            api.b64_image(text)
    else:
        assert api.b64_image(text) == expected


def test_an_integer_beyond_64_bits_in_an_integer_field_is_refused_either_way():
    from service.body import parse_json
    body = b'{"image": "", "max_new_tokens": 100000000000000000000000}'
    for data in (parse_json(body), json.loads(body)):  # a float from orjson, an int from the standard library
        with pytest.raises(ValidationError) as e:
            api.CaptionRequest.model_validate(data)
        assert "max_new_tokens" in str(e.value)

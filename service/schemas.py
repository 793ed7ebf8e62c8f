"""The REST contract as pydantic models (docs/api.md); the gRPC adapter validates its numbers with
the same `*Params` models, so both transports accept exactly the same requests.

Schema violations (missing field, wrong type, out of range) are 422; well-typed but unusable values (an
undecodable image, a bad box, an empty expression) are 400, checked with the request (model/requests.py
validate). `to_json` is the one place a Result (model/requests.py) becomes a REST answer.
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Annotated, Literal

import pybase64
from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from model.requests import MAX_QUESTIONS, MAX_REGIONS, Result

from .errors import BadImage

MAX_NEW_TOKENS = 512         # the model's positions clip it further (48 for `tiny`)
MAX_EXPRESSION_CHARS = 256


def _not_bool(v):
    """pydantic's lax mode reads true as 1: a number field must hold a number (or, in a form, its text)."""
    if isinstance(v, bool):
        raise ValueError("expected a number, not true or false")
    return v


Number = Annotated[float, BeforeValidator(_not_bool)]
Count = Annotated[int, BeforeValidator(_not_bool)]
Box = Annotated[list[Number], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in pixels of the "
                                    "image as sent (after EXIF orientation), x0 < x1, y0 < y1")]
Render = Annotated[Literal["json", "png"] | None, Field(description=(
    "`png`: answer with the image and the answer drawn on it (image/png, the JSON answer in the X-Locca-Result "
    "header) instead of JSON; also accepted as the query parameter `?render=png`"))]
IMAGE_DOC = ("the image, base64-encoded (a `data:image/...;base64,` prefix is accepted); PNG, JPEG, WebP, BMP, "
             "GIF (first frame) or TIFF, any mode; in a multipart form: the file part `image`")


class CaptionParams(BaseModel):
    max_new_tokens: Count | None = Field(None, ge=1, le=MAX_NEW_TOKENS,
                                       description="token budget of the caption (default: the server's, 32)")
    grounded: bool = Field(False, description="also link each object phrase of the caption to its box "
                           "(`phrases`: text, character span, box); in a form: true or false")
    render: Render = None


def _no_grounded(data):
    """`grounded` belongs to /v1/caption: a refer or ground request that sets it would silently lose it."""
    if isinstance(data, dict) and "grounded" in data:
        raise ValueError("`grounded` is a /v1/caption field: a grounded caption is asked of /v1/caption")
    return data


Expression = Annotated[str, Field(max_length=MAX_EXPRESSION_CHARS)]


def _one_of(p, one: str, many: str, needed: bool):
    """A call asks one question (`one`) or several (`many`), not both; `needed`: one of them it must."""
    if getattr(p, one) is not None and getattr(p, many) is not None:
        raise ValueError(f"give `{one}` or `{many}`, not both")
    if needed and getattr(p, one) is None and getattr(p, many) is None:
        raise ValueError(f"give `{one}` (one question) or `{many}` (several, one encoder pass)")
    return p


def _json_list(v):
    """A list in a form field is text: JSON. (A JSON body's list arrives as one already.)"""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except (ValueError, RecursionError):
        raise ValueError("a list in a form field is JSON text, e.g. [\"the red circle\", \"the square\"] or "
                         "[[0, 0, 10, 10], [5, 5, 20, 30]]") from None


class ReferParams(BaseModel):
    expression: Expression | None = Field(None, description=(
        "a referring expression (non-empty); or, instead, `expressions`"))
    expressions: list[Expression] | None = Field(None, min_length=1, max_length=MAX_QUESTIONS, description=(
        f"several referring expressions of the same image (1-{MAX_QUESTIONS}, each non-empty), answered from one "
        "pass of its encoder: `results`, a box per expression, in order. In a form: JSON text `[\"...\", ...]`"))
    render: Render = None

    _no_grounded = model_validator(mode="before")(_no_grounded)

    @model_validator(mode="after")
    def _one(self):
        return _one_of(self, "expression", "expressions", needed=True)

    _expressions_text = field_validator("expressions", mode="before")(_json_list)


class GroundParams(BaseModel):
    box: Box | None = Field(None, description="a box to describe; without one, the model proposes regions. In "
                            "a form: JSON text `[x0,y0,x1,y1]` or `x0,y0,x1,y1`")
    boxes: list[Box] | None = Field(None, min_length=1, max_length=MAX_QUESTIONS, description=(
        f"instead of `box`: several boxes of the same image to describe (1-{MAX_QUESTIONS}), answered from one "
        "pass of its encoder: `regions` holds one per box, in order. In a form: JSON text `[[x0,y0,x1,y1], ...]`"))
    max_regions: Count = Field(MAX_REGIONS, ge=1, le=MAX_REGIONS, description=(
        "without a box: the most regions answered (every object found, best first, up to this many; "
        f"1-{MAX_REGIONS}, default {MAX_REGIONS})"))
    render: Render = None

    _no_grounded = model_validator(mode="before")(_no_grounded)

    @model_validator(mode="after")
    def _one(self):
        return _one_of(self, "box", "boxes", needed=False)

    _boxes_text = field_validator("boxes", mode="before")(_json_list)

    @field_validator("box", mode="before")
    @classmethod
    def _box_text(cls, v):
        """Form fields are text: accept JSON `[x0, y0, x1, y1]` or `x0,y0,x1,y1`; an empty field is no box."""
        if not isinstance(v, str):
            return v
        text = v.strip()
        if not text:
            return None
        if text.startswith("["):
            try:
                return json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's depth
                raise ValueError("box is not valid JSON") from None
        return [p.strip() for p in text.split(",")]


class CaptionRequest(CaptionParams):
    image: str = Field(description=IMAGE_DOC)


class ReferRequest(ReferParams):
    image: str = Field(description=IMAGE_DOC)


class GroundRequest(GroundParams):
    image: str = Field(description=IMAGE_DOC)


class Phrase(BaseModel):
    text: str = Field(description="an object phrase of the caption, e.g. `large red circle`")
    span: list[int] = Field(min_length=2, max_length=2, description="[start, end) character offsets of `text` "
                            "in `caption` (Unicode code points)")
    box: Box | None = Field(description="the object's box, or null when no region found was its")
    score: float | None = Field(description="mean log-probability of the region's generated tokens")


class CaptionResponse(BaseModel):
    caption: str
    score: float = Field(description="mean log-probability of the generated tokens")
    phrases: list[Phrase] | None = Field(None, description="with `grounded`: the caption's object phrases, "
                                         "in order, each with its box")


class ReferResponse(BaseModel):
    expression: str
    box: Box
    score: float = Field(description="mean log-probability of the generated tokens")


class ReferManyResponse(BaseModel):
    results: list[ReferResponse] = Field(description="with `expressions`: one answer per expression, in order")


class Region(BaseModel):
    box: Box
    text: str
    score: float = Field(description="mean log-probability of the generated tokens")


class GroundResponse(BaseModel):
    regions: list[Region]


class ModelInfo(BaseModel):
    name: str
    size: str = Field(description="the named size (tiny, S/16, B/16, L/14) or custom")
    tasks: list[str]
    backend: str
    device: str
    config: dict[str, int | float | str] = Field(description="the model's dimensions (model/config.py ModelConfig)")
    step: int | None = Field(None, description="training step of the checkpoint")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


_DATA_URL = re.compile(r"^data:[\w/+.\-]*(;[\w=\-]+)*;base64,", re.IGNORECASE)


def b64_image(text: str) -> bytes:
    """Base64 text -> bytes; a data URL's prefix and whitespace (line breaks every 76 characters) are allowed.
    The usual text, one unbroken line, is decoded as it is: removing whitespace from hundreds of kilobytes with
    a regular expression costs more than the decoding."""
    if text[:5].lower() == "data:":
        text = _DATA_URL.sub("", text, count=1)
    try:
        return pybase64.b64decode(text, validate=True)  # SIMD: 0.01 ms for 300 KB, against 0.6 ms for binascii
    except (binascii.Error, ValueError):
        pass
    try:
        return pybase64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("the image is not valid base64") from None


def to_json(result: Result | list[Result], expression: str | list[str] | None = None) -> dict:
    """A Result as its REST answer (the *Response models above); a refer's answer repeats its expression. The
    results of a call that asked several questions: a refer's in `results`, a describe's regions in one list."""
    if isinstance(result, list):
        if result and result[0].task == "refer":
            return {"results": [to_json(r, e) for r, e in zip(result, expression, strict=True)]}
        return {"regions": [region for r in result for region in to_json(r)["regions"]]}
    if result.task == "caption":
        out = {"caption": result.text, "score": result.score}
        if result.phrases is not None:
            out["phrases"] = [{"text": p.text, "span": list(p.span), "box": p.box, "score": p.score}
                              for p in result.phrases]
        return out
    if result.task == "refer":
        return {"expression": expression, "box": result.box, "score": result.score}
    if result.task == "describe":
        return {"regions": [{"box": result.box, "text": result.text, "score": result.score}]}
    return {"regions": [{"box": r.box, "text": r.text, "score": r.score} for r in result.regions]}

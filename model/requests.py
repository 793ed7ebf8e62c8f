"""What is asked of a model and what it answers: one request type, one result type, validated in one place.

Every caller speaks these: the server's transports (REST, gRPC) build a `Request`, the worker's engine core
(model/core.py) validates it once before anything is queued and answers a `Result`, and only the transports and
the CLI turn a Result into JSON, protobuf or text. `locca predict` and `locca eval` use the same two types.

The tasks, one name each, and the paper's task (LocCa, Wan et al. 2024) behind each:

    name      paper  asks                                 answers
    caption   Cap    the image                            text (with grounded=True also its phrases' boxes)
    refer     ARef   a referring expression               the box it refers to
    describe  GCap   a box                                text: the expression of what is in it
    ground    GCap   nothing: every object of the image   regions: box and expression of each object found

The REST and gRPC calls are /v1/caption, /v1/refer and /v1/ground (describe when a box is given, else ground).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_TASKS = {"caption": "Cap", "refer": "ARef", "describe": "GCap", "ground": "GCap"}
TASKS = tuple(PAPER_TASKS)
API_CALLS = ("caption", "refer", "ground")  # /v1/<call> and the gRPC methods: ground is describe when given a box
MAX_REGIONS = 32  # the most regions a ground answer may hold, and the default: more than a scene holds
MAX_QUESTIONS = 64  # the most questions (expressions to refer, boxes to describe) one call may ask of its image


class RequestError(ValueError):
    """A request that cannot be answered as asked. `code` is the service's stable error code (service/errors.py
    maps it to a status), `field` the part of the request at fault."""
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field

    def __reduce__(self):  # crosses the worker's pipe whole: type, message and field
        return type(self), (self.message, self.field)


def of_item(e: RequestError, index: int) -> RequestError:
    """`e`, raised by the question at `index` of a call that asks several, naming it: `expressions[2]: the
    expression is empty`."""
    name = f"{_LISTS.get(e.field, e.field or 'questions')}[{index}]"
    return type(e)(f"{name}: {e.message}", name)


class BadBox(RequestError):
    code = "bad_box"


class BadExpression(RequestError):
    code = "bad_expression"


_LISTS = {"expression": "expressions", "box": "boxes"}  # a field of one question -> the call's list of them


@dataclass(frozen=True)
class Request:
    task: str                                           # caption | refer | describe | ground
    expression: str | None = None                       # refer
    box: tuple[float, float, float, float] | None = None  # describe: pixels of the image as given
    grounded: bool = False                              # caption: also the box of each object phrase
    max_new_tokens: int | None = None                   # None: the model's positions left after the prompt
    max_regions: int = MAX_REGIONS                      # ground: the most regions answered, best first


@dataclass(frozen=True)
class Region:
    box: list[float]                # [x0, y0, x1, y1], pixels of the image as given
    text: str
    score: float                    # mean log-probability of the generated tokens


@dataclass(frozen=True)
class Phrase:
    text: str                       # an object phrase of the caption, e.g. "large red circle"
    span: tuple[int, int]           # [start, end) character offsets in the caption
    box: list[float] | None         # its object's box, or None when no region found was its
    score: float | None


@dataclass(frozen=True)
class Result:
    """One request's answer. caption: text, score (and phrases when grounded); refer: box, score; describe:
    text, score and the box described (clipped to the image); ground: regions."""
    task: str
    text: str | None = None
    box: list[float] | None = None
    score: float | None = None
    regions: tuple[Region, ...] | None = None
    phrases: tuple[Phrase, ...] | None = None


def check_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """A box in pixels of the image as given -> the box clipped to the image. Coordinates must be finite with
    x0 < x1 and y0 < y1; a box partly outside the image is clipped to it; one with nothing inside is refused."""
    if len(box) != 4:
        raise BadBox(f"a box is four numbers [x0, y0, x1, y1], got {len(box)}", "box")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise BadBox("box coordinates must be finite numbers", "box")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise BadBox(f"a box needs x0 < x1 and y0 < y1, got {[x0, y0, x1, y1]}", "box")
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
               min(max(y1, 0.0), height))
    if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
        raise BadBox(f"the box {[x0, y0, x1, y1]} lies outside the {width}x{height} image", "box")
    return clipped


def validate(request: Request, size: tuple[int, int]) -> Request:
    """Everything about a request that does not need the model: its task and the fields that task takes, a
    non-empty expression, a box inside the image (returned clipped), the limits on tokens and regions. The token
    budget against the model's positions is checked where the prompt is built (model/core.py, the same call)."""
    task = request.task
    if task not in TASKS:
        raise RequestError(f"unknown task {task!r}; one of {', '.join(TASKS)}", "task")
    if request.grounded and task != "caption":
        raise RequestError("grounded applies to captions only", "grounded")
    if (request.expression is not None) != (task == "refer"):
        raise RequestError("refer takes an expression, and only refer does", "expression")
    if (request.box is not None) != (task == "describe"):
        raise RequestError("describe takes a box, and only describe does", "box")
    if request.max_new_tokens is not None and request.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}", "max_new_tokens")
    if not 1 <= request.max_regions <= MAX_REGIONS:
        raise RequestError(f"max_regions must be in 1..{MAX_REGIONS}, got {request.max_regions}", "max_regions")
    if task == "refer" and not request.expression.strip():
        raise BadExpression("the expression is empty", "expression")
    if task == "describe":
        return Request(task, box=check_box(request.box, *size), max_new_tokens=request.max_new_tokens)
    return request

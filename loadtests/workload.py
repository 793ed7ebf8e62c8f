"""The load test's workload: shapes-world scenes and a realistic mix of requests about them.

No Locust in here (importing it monkey-patches the process with gevent), so the tests and any other driver
can draw the same requests. locustfile.py sends them over REST and gRPC.

The mix, from how a grounding model is used: mostly captions and referring expressions, fewer regions.
`ground` without a box is the expensive call: it finds every object, a region search of up to 33 KV-cache rows
beside a caption (docs/ground.md), whatever `max_regions` keeps of its answer.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from model.shapes import generate_scene

MIX = {"caption": 40, "refer": 35, "describe": 15, "ground": 10}  # weights, in percent (tasks: model/requests.py)
MAX_REGIONS = 3  # asked of a ground without a box: its answer is cut to the best 3 (the search is the same)


@dataclass(frozen=True)
class Scene:
    seed: int
    png: bytes
    width: int
    height: int
    caption: str
    expressions: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # x0, y0, x1, y1 in pixels, one per expression


@dataclass(frozen=True)
class Call:
    kind: str                 # a key of MIX: describe is /v1/ground with a box, ground without one
    scene: Scene
    fields: dict = field(default_factory=dict)  # the request's fields besides the image (REST names)

    @property
    def path(self) -> str:
        return "/v1/" + ("ground" if self.kind == "describe" else self.kind)

    @property
    def name(self) -> str:
        """The name Locust reports it under: the path, and which of its tasks."""
        return self.path + (f" [{self.kind}]" if self.path == "/v1/ground" else "")

    @property
    def grpc_name(self) -> str:
        """The same for gRPC: the locca.v1.LocCa method, and which ground."""
        return self.name.removeprefix("/v1/").capitalize()


def scenes(count: int = 64, first_seed: int = 0) -> list[Scene]:
    out = []
    for seed in range(first_seed, first_seed + count):
        s = generate_scene(seed)
        buf = io.BytesIO()
        s.image.save(buf, "PNG")
        out.append(Scene(seed, buf.getvalue(), s.width, s.height, s.caption, tuple(s.expressions),
                         tuple(tuple(float(v) for v in o.box) for o in s.objects)))
    return out


def draw(rng: random.Random, pool: list[Scene]) -> Call:
    scene = rng.choice(pool)
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    i = rng.randrange(len(scene.expressions))
    if kind == "refer":
        return Call(kind, scene, {"expression": scene.expressions[i]})
    if kind == "describe":
        return Call(kind, scene, {"box": list(scene.boxes[i])})
    if kind == "ground":
        return Call(kind, scene, {"max_regions": MAX_REGIONS})
    return Call(kind, scene)


def check(call: Call, body: dict) -> str | None:
    """What is wrong with a 200 answer to `call` (the contract's shapes, ../shared/specs/api.md), or None."""
    try:
        if call.kind == "caption":
            return None if isinstance(body["caption"], str) and _num(body["score"]) else f"bad caption {body}"
        if call.kind == "refer":
            return _box_problem(body["box"], call.scene) or (None if _num(body["score"]) else f"bad score {body}")
        regions = body["regions"]
        if call.kind == "describe" and len(regions) != 1:
            return f"a box gave {len(regions)} regions, not 1"
        if len(regions) > call.fields.get("max_regions", 32):
            return f"{len(regions)} regions, more than max_regions"
        for r in regions:
            if problem := _box_problem(r["box"], call.scene):
                return problem
            if not isinstance(r["text"], str) or not _num(r["score"]):
                return f"bad region {r}"
        return None
    except (KeyError, TypeError) as e:
        return f"malformed answer ({e!r}): {str(body)[:200]}"


def _num(v) -> bool:
    return isinstance(v, int | float)


def _box_problem(box, scene: Scene) -> str | None:
    if len(box) != 4 or not all(_num(v) for v in box):
        return f"not a box: {box}"
    x0, y0, x1, y1 = box
    eps = 1e-3
    if not (-eps <= x0 < x1 <= scene.width + eps and -eps <= y0 < y1 <= scene.height + eps):
        return f"box {box} is not inside the {scene.width}x{scene.height} image with x0 < x1, y0 < y1"
    return None


def users_at(t: float, users: int, run_time: float) -> int | None:
    """The "steps" load shape: 1, 2, 4, ... below `users` across the first half of `run_time`, each for an
    equal share, then `users` for the second half; None once `run_time` has passed (the test stops)."""
    if t >= run_time:
        return None
    lower = [2 ** i for i in range(users.bit_length()) if 2 ** i < users]
    if not lower or t >= run_time / 2:
        return users
    return lower[int(t / (run_time / 2 / len(lower)))]

"""`locca eval --url URL`: the held-out evaluation through a running server's REST API, as a client sees it.

Every scene is sent as a PNG: one grounded caption, one ground without a box (every object found), and for
each object a refer with its expression and a ground with its box; `workers` requests are in flight at once. The answers
are scored by model/evaluate.score, the same metrics as `locca eval CHECKPOINT`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from model.evaluate import SceneAnswers
from model.shapes import Scene

from .client import LoccaClient, image_bytes


def answers_over_rest(url: str, scenes: list[Scene], workers: int = 8, api_key: str | None = None,
                      max_regions: int | None = None, progress: bool = True) -> list[SceneAnswers]:
    with LoccaClient(url, timeout=120, retries=8, api_key=api_key) as client:
        if not client.ready():
            raise SystemExit(f"the server at {url} is not ready (GET /readyz); start it with `locca serve`")

        def ask(scene: Scene) -> SceneAnswers:
            data = image_bytes(scene.image)  # PNG-encoded once for the scene's 2 + 2 x objects requests
            caption = client.caption(data, grounded=True)
            return SceneAnswers(
                caption.caption,
                [{"box": r.box, "text": r.text} for r in client.ground(data, max_regions=max_regions)],
                [client.refer(data, e).box for e in scene.expressions],
                [client.ground(data, box=o.box)[0].text for o in scene.objects],
                [{"text": p.text, "box": p.box} for p in caption.phrases])

        with ThreadPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(ask, scenes), total=len(scenes), disable=not progress, desc="eval",
                             unit="scene"))


def regions_over_rest(url: str, scenes: list[Scene], workers: int = 8, api_key: str | None = None,
                      progress: bool = True) -> list[list[dict]]:
    """Every scene's regions (ground without a box), as `locca eval --url` scores crowded scenes."""
    with LoccaClient(url, timeout=120, retries=8, api_key=api_key) as client:
        def ask(scene: Scene) -> list[dict]:
            return [{"box": r.box, "text": r.text} for r in client.ground(image_bytes(scene.image))]

        with ThreadPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(ask, scenes), total=len(scenes), disable=not progress, desc="crowded",
                             unit="scene"))

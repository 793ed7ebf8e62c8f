"""`locca eval --url URL`: the held-out evaluation through a running server's REST API, as a client sees it.
locca/cli.py runs `run` here when --url is given: model/evaluate.py, which evaluates a checkpoint, does not
import the client.

Every scene is sent as a PNG: one grounded caption, one ground without a box (every object found), and for
each object a refer with its expression and a ground with its box; `workers` requests are in flight at once. The answers
are scored by model/evaluate.score, the same metrics as `locca eval CHECKPOINT`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from model.evaluate import SceneAnswers, asked, proposal_scores, report, score
from model.shapes import Scene

from .sdk import LoccaClient, image_bytes


def answers_over_rest(url: str, scenes: list[Scene], workers: int = 8, api_key: str | None = None,
                      max_regions: int | None = None, progress: bool = True) -> list[SceneAnswers]:
    def ask(client: LoccaClient, scene: Scene) -> SceneAnswers:
        data = image_bytes(scene.image)  # PNG-encoded once for the scene's 2 + 2 x objects requests
        caption = client.caption(data, grounded=True)
        return SceneAnswers(
            caption.caption,
            [{"box": r.box, "text": r.text} for r in client.ground(data, max_regions=max_regions)],
            [client.refer(data, e).box for e in scene.expressions],
            [client.ground(data, box=o.box)[0].text for o in scene.objects],
            [{"text": p.text, "box": p.box} for p in caption.phrases])

    return _each_scene(url, scenes, ask, workers, api_key, progress, "eval")


def regions_over_rest(url: str, scenes: list[Scene], workers: int = 8, api_key: str | None = None,
                      progress: bool = True) -> list[list[dict]]:
    """Every scene's regions (ground without a box), as `locca eval --url` scores crowded scenes."""
    def ask(client: LoccaClient, scene: Scene) -> list[dict]:
        return [{"box": r.box, "text": r.text} for r in client.ground(image_bytes(scene.image))]

    return _each_scene(url, scenes, ask, workers, api_key, progress, "crowded")


def _each_scene(url: str, scenes: list[Scene], ask, workers: int, api_key: str | None, progress: bool,
                desc: str) -> list:
    """ask(client, scene) for every scene, `workers` at once, in order, against a ready server."""
    with LoccaClient(url, timeout=120, retries=8, api_key=api_key) as client:
        if not client.ready():
            raise SystemExit(f"the server at {url} is not ready (GET /readyz); start it with `locca serve`")
        with ThreadPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(lambda scene: ask(client, scene), scenes), total=len(scenes),
                             disable=not progress, desc=desc, unit="scene"))


def run(args) -> int:
    """`locca eval --url URL` with `locca eval`'s flags (model/evaluate.add_arguments): every part asked."""
    _, scenes, crowded = asked(args)
    t0 = time.perf_counter()
    metrics = score(scenes, answers_over_rest(args.url, scenes, args.workers, args.api_key))
    if crowded:
        regions = regions_over_rest(args.url, crowded, args.workers, args.api_key)
        metrics |= {f"crowded_{k}": v for k, v in proposal_scores(crowded, regions).items()}
    metrics |= {"seconds": time.perf_counter() - t0, "url": args.url}
    return report(metrics, args.json)


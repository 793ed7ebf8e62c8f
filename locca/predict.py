"""`locca predict`: ask a model about one image, in this process or through a running server (--url); print
the answer as JSON, in the REST contract's shape (docs/api.md), and draw it (--out).

    locca predict scene.png --task caption
    locca predict scene.png --task caption --grounded --out grounded.png  # and the box of each object phrase
    locca predict scene.png --task refer --expression "the red circle" --out refer.png
    locca predict scene.png --task ground --out regions.png              # every object: box and description
    locca predict scene.png --task ground --box 10,20,80,90                # describe this box
    locca predict scene.png --task refer --expression "the square" --url http://127.0.0.1:8000

The image is decoded as the server decodes it (EXIF orientation applied, any mode to RGB), and the model in
this process answers with the server's own prompts, searches and parsing (model/predictor.py), so both modes
give the same answer for the same model. The annotated image is service/render.py's, as `render=png` returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The command runs the model here (service/predict.py) or asks a server as its client (--url), so it lives in
# the command line's package, above both: the server's package may not import the client (tests/test_layers.py).
from service import images, render
from service.predict import LOCAL_LIMITS, answer, load_predictor
from service.schemas import MAX_REGIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="an image file (PNG, JPEG, WebP, BMP, GIF, TIFF)")
    p.add_argument("--task", choices=render.TASKS, default="caption", help="what to ask (default caption)")
    p.add_argument("--expression", help="refer: the referring expression, e.g. 'the red circle'")
    p.add_argument("--box", help="ground: a box to describe, x0,y0,x1,y1 in pixels (default: every object)")
    p.add_argument("--max-regions", type=int, default=MAX_REGIONS,
                   help=f"ground without --box: most regions answered, 1-{MAX_REGIONS} (default {MAX_REGIONS})")
    p.add_argument("--grounded", action="store_true", help="caption: also the box of each object phrase")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption: token budget")
    p.add_argument("--out", help="write the image with the answer drawn on it here (PNG)")
    p.add_argument("--url", help="ask the server at this URL (e.g. http://127.0.0.1:8000) instead of loading "
                                 "the model here")
    p.add_argument("--model", default="models/locca-tiny-shapes",
                   help="local: a checkpoint, a directory holding one, or an ONNX bundle (%(default)s)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="local: the backend")
    p.add_argument("--device", default="cpu", help="local: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--timeout", type=float, default=60.0, help="--url: seconds to wait for the answer")
    p.add_argument("--api-key", default=os.environ.get("LOCCA_API_KEY"),
                   help="--url: the server's API key, if it requires one (default: $LOCCA_API_KEY)")


def parse_box(text: str | None) -> list[float] | None:
    if text is None:
        return None
    parts = text.strip().strip("[]").split(",")
    if len(parts) != 4:
        raise ValueError(f"--box takes four numbers x0,y0,x1,y1, got {text!r}")
    return [float(v) for v in parts]


def local(image, task: str, args, box: list[float] | None) -> dict:
    predictor = load_predictor(args.model, args.backend, args.device)
    return answer(predictor, image, task, args.expression, box, args.max_regions, args.max_new_tokens,
                  args.grounded)


def remote(data: bytes, task: str, args, box: list[float] | None) -> dict:
    import httpx  # noqa: PLC0415

    from client import LoccaClient  # noqa: PLC0415

    try:
        return _ask_server(LoccaClient(args.url, timeout=args.timeout, api_key=args.api_key), data, task, args, box)
    except httpx.HTTPError as e:
        raise OSError(f"no answer from {args.url}: {e}") from None


def _ask_server(client, data: bytes, task: str, args, box: list[float] | None) -> dict:
    with client as c:
        if task == "caption":
            r = c.caption(data, args.max_new_tokens, grounded=args.grounded)
            phrases = [{"text": p.text, "span": list(p.span), "box": p.box, "score": p.score}
                       for p in r.phrases or ()]
            return {"caption": r.caption, "score": r.score, **({"phrases": phrases} if args.grounded else {})}
        if task == "refer":
            r = c.refer(data, args.expression)
            return {"expression": r.expression, "box": r.box, "score": r.score}
        regions = c.ground(data, box, args.max_regions)
        return {"regions": [{"box": r.box, "text": r.text, "score": r.score} for r in regions]}


def run(args: argparse.Namespace) -> int:
    from client import LoccaError  # noqa: PLC0415
    from service.errors import ServiceError  # noqa: PLC0415

    task = args.task
    try:
        if task == "refer" and not (args.expression or "").strip():
            raise ValueError("--task refer needs --expression")
        if not 1 <= args.max_regions <= MAX_REGIONS:
            raise ValueError(f"--max-regions must be 1..{MAX_REGIONS}")
        box = parse_box(args.box) if task == "ground" else None
        data = Path(args.image).read_bytes()
        image = images.decode(data, LOCAL_LIMITS)
        result = remote(data, task, args, box) if args.url else local(image, task, args, box)
    except (ValueError, OSError, ServiceError, LoccaError) as e:
        print(f"locca predict: {e.message if isinstance(e, ServiceError) else e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_bytes(render.to_png(render.annotate(image, task, result), task, result))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0

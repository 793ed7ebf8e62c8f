"""`locca predict`: ask a model about one image, in this process or through a running server (--url); print
the answer as JSON, in the REST contract's shape (shared/specs/api.md), and draw it (--out).

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
import sys
from pathlib import Path

from . import images, render
from .schemas import MAX_REGIONS

# A local file is the user's own: limits only against decompression bombs, well above the server's defaults.
LOCAL_LIMITS = images.Limits(max_bytes=1 << 30, max_pixels=200_000_000)


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


def parse_box(text: str | None) -> list[float] | None:
    if text is None:
        return None
    parts = text.strip().strip("[]").split(",")
    if len(parts) != 4:
        raise ValueError(f"--box takes four numbers x0,y0,x1,y1, got {text!r}")
    return [float(v) for v in parts]


def load_predictor(model: str, backend: str = "torch", device: str = "cpu"):
    """The model in this process, behind model/predictor.py's Predictor (the server's workers build theirs
    the same way: service/worker.py)."""
    from export.backends import load_inference  # noqa: PLC0415 (torch only when the model runs here)
    from model.predictor import Predictor  # noqa: PLC0415

    loaded = load_inference(model, backend, device)
    return Predictor(loaded.inference, loaded.tasks)


def answer(predictor, image, task: str, expression: str | None = None, box: list[float] | None = None,
           max_regions: int = MAX_REGIONS, max_new_tokens: int | None = None, grounded: bool = False) -> dict:
    """Predictor.run's answer shaped as the server's (service/jobs.py Tasker.answer)."""
    from model.predictor import Ask  # noqa: PLC0415

    if task == "caption":
        (out,) = predictor.run([image], [Ask(0, "grounded" if grounded else "caption", max_new_tokens=max_new_tokens)])
        return {"caption": out["text"], "score": out["score"], **({"phrases": out["phrases"]} if grounded else {})}
    if task == "refer":
        (out,) = predictor.run([image], [Ask(0, "refer", expression=expression)])
        return {"expression": expression, "box": out["box"], "score": out["score"]}
    if box is None:
        (out,) = predictor.run([image], [Ask(0, "propose", max_regions=max_regions)])
        return out
    box = images.check_box(box, *image.size)
    (out,) = predictor.run([image], [Ask(0, "describe", box=box)])
    return {"regions": [{"box": box, "text": out["text"], "score": out["score"]}]}


def local(image, task: str, args, box: list[float] | None) -> dict:
    predictor = load_predictor(args.model, args.backend, args.device)
    return answer(predictor, image, task, args.expression, box, args.max_regions, args.max_new_tokens,
                  args.grounded)


def remote(data: bytes, task: str, args, box: list[float] | None) -> dict:
    import httpx  # noqa: PLC0415

    from .client import LoccaClient  # noqa: PLC0415

    try:
        return _ask_server(LoccaClient(args.url, timeout=args.timeout), data, task, args, box)
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
    from .client import LoccaError  # noqa: PLC0415
    from .errors import ServiceError  # noqa: PLC0415

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

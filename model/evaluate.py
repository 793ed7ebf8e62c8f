"""`locca eval`: held-out shapes scenes through the model, the spec's metrics as a table and JSON.

    locca eval models/locca-tiny-shapes/checkpoint.safetensors --scenes 1000     # in-process (PyTorch)
    locca eval --url http://127.0.0.1:8000 --scenes 1000                          # a running server, over REST
    locca eval CHECKPOINT --only refer                                            # referring expressions alone

Metrics (shapes-world spec, Evaluation):
    refer_acc50        share of referring expressions whose predicted box has IoU >= 0.5 with the true box
    refer_miou         mean IoU of those boxes
    caption_exact      share of captions equal to the reference
    caption_cider      CIDEr of the captions (pycocoevalcap), one reference per image
    describe_exact     share of given boxes described by exactly the object's referring expression
    proposal_precision share of the regions found (ground without a box) that are right: box IoU >= 0.5 with an
                       object and text that object's referring expression
    proposal_recall    share of the objects that some region found is right for
    phrase_acc         share of a grounded caption's object phrases whose box has IoU >= 0.5 with their object
                       (the k-th phrase "large red circle" is the k-th such object from the left)
    crowded_*          proposals on scenes of `--crowded-objects` (8) objects, more than the spec's 6 (issue 16)
Held-out scenes (model/heldout.py) use seeds that no training scene has.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field

import numpy as np
from pycocoevalcap.cider.cider import Cider
from tqdm import tqdm

from .heldout import heldout_scenes
from .predictor import Predictor
from .regions import iou
from .requests import MAX_REGIONS, Request
from .shapes import Scene


def _cider_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+|[^\sa-z]", text.lower()))


@dataclass
class SceneAnswers:
    """What a model answered about one scene, however it was asked (in-process or over the API)."""
    caption: str
    regions: list[dict]          # proposals without a box: {"box": [x0, y0, x1, y1], "text": str}, best first
    refer_boxes: list[list[float]] = field(default_factory=list)   # one per object, for its expression
    describe_texts: list[str] = field(default_factory=list)        # one per object, for its box
    phrases: list[dict] = field(default_factory=list)              # grounded caption: {"text", "box" or None}


def proposal_scores(scenes: list[Scene], regions: list[list[dict]]) -> dict:
    """Precision and recall of the regions found without a box (module docstring), and regions per scene."""
    right = found = objects = n = 0
    for s, rs in zip(scenes, regions, strict=True):
        hits = [[iou(r["box"], o.box) >= 0.5 and r["text"] == e for o, e in zip(s.objects, s.expressions,
                                                                                 strict=True)] for r in rs]
        right += sum(any(h) for h in hits)
        found += sum(any(h[k] for h in hits) for k in range(len(s.objects)))
        objects += len(s.objects)
        n += len(rs)
    return {"proposal_precision": right / n if n else 0.0, "proposal_recall": found / objects,
            "proposals_per_scene": n / len(scenes)}


def phrase_accuracy(scenes: list[Scene], answers: list[SceneAnswers]) -> float:
    """Share of grounded-caption phrases whose box has IoU >= 0.5 with their object (module docstring)."""
    right = total = 0
    for s, a in zip(scenes, answers, strict=True):
        left_to_right = sorted(s.objects, key=lambda o: (o.centre[0], o.centre[1]))
        seen: dict[str, int] = {}
        for p in a.phrases:
            k, seen[p["text"]] = seen.get(p["text"], 0), seen.get(p["text"], 0) + 1
            same = [o for o in left_to_right if o.phrase == p["text"]]
            total += 1
            right += p["box"] is not None and k < len(same) and iou(p["box"], same[k].box) >= 0.5
    return right / total if total else 0.0


PARTS = ("refer", "caption", "describe", "ground")  # what `evaluate` can be limited to (--only)


def score(scenes: list[Scene], answers: list[SceneAnswers], parts: tuple[str, ...] = PARTS) -> dict:
    """The spec's metrics of `answers` against the truth of `scenes` (one SceneAnswers per scene), for the
    `parts` asked: refer (refer_*), caption (caption_*), describe (describe_exact), ground (proposal_*,
    phrase_acc)."""
    out: dict = {"scenes": len(scenes)}
    if "refer" in parts:
        ious = np.array([iou(box, o.box) for s, a in zip(scenes, answers, strict=True)
                         for box, o in zip(a.refer_boxes, s.objects, strict=True)])
        out |= {"refer_acc50": float((ious >= 0.5).mean()), "refer_miou": float(ious.mean())}
    if "caption" in parts:
        captions = {i: [_cider_tokens(a.caption)] for i, a in enumerate(answers)}
        references = {i: [_cider_tokens(s.caption)] for i, s in enumerate(scenes)}
        cider, _ = Cider().compute_score(references, captions)
        out |= {"caption_exact": float(np.mean([captions[k] == references[k] for k in captions])),
                "caption_cider": float(cider)}
    if "describe" in parts:
        out["describe_exact"] = float(np.mean([t == e for s, a in zip(scenes, answers, strict=True)
                                               for t, e in zip(a.describe_texts, s.expressions, strict=True)]))
    if "ground" in parts:
        out |= {**proposal_scores(scenes, [a.regions for a in answers]), "phrase_acc": phrase_accuracy(scenes, answers)}
    return out


def evaluate(inference, tasks, scenes: list[Scene], batch_images: int = 32, max_regions: int = MAX_REGIONS,
             progress: bool = True, parts: tuple[str, ...] = PARTS) -> dict:
    """The `parts` (default: every task) on every scene through model/predictor.Predictor, scored. A part left
    out is not asked at all: parts=("refer",) decodes only the referring expressions (a localisation probe)."""
    if unknown := set(parts) - set(PARTS):
        raise ValueError(f"unknown evaluation parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    predictor = Predictor(inference, tasks)
    answers: list[SceneAnswers] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(scenes), batch_images), disable=not progress, desc="eval", unit="batch"):
        chunk = scenes[start:start + batch_images]
        asks: list[tuple[int, Request]] = []
        for j, s in enumerate(chunk):
            if "ground" in parts:  # a grounded caption is also the caption
                asks += [(j, Request("caption", grounded=True)), (j, Request("ground", max_regions=max_regions))]
            elif "caption" in parts:
                asks.append((j, Request("caption")))
            if "refer" in parts:
                asks += [(j, Request("refer", expression=e)) for e in s.expressions]
            if "describe" in parts:
                asks += [(j, Request("describe", box=tuple(o.box))) for o in s.objects]
        out = iter(predictor.run([s.image for s in chunk], asks))
        for s in chunk:
            a = SceneAnswers("", [])
            if "ground" in parts:
                caption, ground = next(out), next(out)
                a.caption, a.regions = caption.text, [dataclasses.asdict(r) for r in ground.regions]
                a.phrases = [{"text": p.text, "box": p.box} for p in caption.phrases]
            elif "caption" in parts:
                a.caption = next(out).text
            if "refer" in parts:
                a.refer_boxes = [next(out).box for _ in s.objects]
            if "describe" in parts:
                a.describe_texts = [next(out).text for _ in s.objects]
            answers.append(a)
    return {**score(scenes, answers, parts), "seconds": time.perf_counter() - t0}


def evaluate_crowded(inference, tasks, scenes: list[Scene], batch_images: int = 32, progress: bool = True) -> dict:
    """Regions found on crowded scenes (no box given), scored as `crowded_*`."""
    predictor, regions = Predictor(inference, tasks), []
    for start in tqdm(range(0, len(scenes), batch_images), disable=not progress, desc="crowded", unit="batch"):
        chunk = scenes[start:start + batch_images]
        found = predictor.run([s.image for s in chunk], [(j, Request("ground")) for j in range(len(chunk))])
        regions += [[dataclasses.asdict(r) for r in f.regions] for f in found]
    return {f"crowded_{k}": v for k, v in proposal_scores(scenes, regions).items()}


def table(metrics: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"{'metric':<{w}}  value", f"{'-' * w}  -----"] + [f"{k:<{w}}  {v}" for k, v in rows])


def add_arguments(p):
    p.add_argument("checkpoint", nargs="?", help="a checkpoint.safetensors (a run's, during or after training)")
    p.add_argument("--url", default=None, help="evaluate a running server instead, through its REST API "
                   "(e.g. http://127.0.0.1:8000): what a client of `locca serve` gets")
    p.add_argument("--workers", type=int, default=8, help="--url: requests in flight at once (default 8)")
    p.add_argument("--api-key", default=None, help="--url: the server's API key, if it requires one")
    p.add_argument("--scenes", type=int, default=1000, help="held-out scenes to evaluate (default 1000)")
    p.add_argument("--offset", type=int, default=None, help="first held-out seed (default: the eval range)")
    p.add_argument("--batch-images", type=int, default=32, help="images encoded and decoded together")
    p.add_argument("--crowded", type=int, default=200, help="also this many scenes of --crowded-objects objects, "
                   "for crowded_proposal_recall / _precision (default 200; 0: none)")
    p.add_argument("--crowded-objects", type=int, default=8, help="objects in each crowded scene (default 8, more "
                   "than the spec's 6)")
    p.add_argument("--only", default=None, metavar="PARTS",
                   help=f"evaluate only these parts, comma-separated from {','.join(PARTS)} (e.g. --only refer: the "
                        "referring expressions alone, no captions or proposals; in-process only)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")


def asked(args) -> tuple[tuple[str, ...], list[Scene], list[Scene]]:
    """`locca eval`'s flags checked, in-process or over --url: (parts, scenes, crowded scenes)."""
    if (args.checkpoint is None) == (args.url is None):
        raise SystemExit("locca eval: give either a checkpoint or --url URL (a running server)")
    parts = PARTS if args.only is None else tuple(p.strip() for p in args.only.split(",") if p.strip())
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"locca eval --only {args.only!r}: choose parts from {', '.join(PARTS)}")
    if args.url and parts != PARTS:
        raise SystemExit("locca eval: --only evaluates a checkpoint in-process; over --url every part is asked")
    scenes = heldout_scenes(args.scenes, args.offset)
    crowded = heldout_scenes(args.crowded, args.offset, args.crowded_objects) if args.crowded and "ground" in parts \
        else []
    return parts, scenes, crowded


def report(metrics: dict, json_path: str | None) -> int:
    """Print the metrics as a table and, if asked, write them to a JSON file."""
    print(table(metrics))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


def run(args) -> int:
    """`locca eval CHECKPOINT`. `locca eval --url URL` never comes here: locca/cli.py runs client/remote_eval.py
    instead, as the model layer does not import the client."""
    from .checkpoint import load
    from .inference import TorchInference

    parts, scenes, crowded = asked(args)
    bundle = load(args.checkpoint)
    inference = TorchInference(bundle.model)
    metrics = evaluate(inference, bundle.tasks, scenes, args.batch_images, parts=parts)
    if crowded:
        metrics |= evaluate_crowded(inference, bundle.tasks, crowded, args.batch_images)
    metrics["checkpoint_step"] = bundle.meta.get("step")
    return report(metrics, args.json)

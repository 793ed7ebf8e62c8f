"""`locca eval`: held-out shapes scenes through the model, the spec's metrics as a table and JSON.

Metrics (shapes-world spec, Evaluation):
    refer_acc50        share of referring expressions whose predicted box has IoU >= 0.5 with the true box
    refer_miou         mean IoU of those boxes
    caption_exact      share of captions equal to the reference
    caption_cider      CIDEr of the captions (pycocoevalcap), one reference per image
    describe_exact     share of given boxes described by exactly the object's referring expression
    proposal_precision share of proposed regions (no box given) whose box has IoU >= 0.5 with an object and
                       whose text is that object's referring expression
Held-out scenes use seeds from EVAL_SEED_OFFSET on (model/train.py), disjoint from every training scene.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
from pycocoevalcap.cider.cider import Cider
from tqdm import tqdm

from .predictor import Ask, Predictor, iou
from .shapes import Scene, generate_scene


def heldout_scenes(n: int, offset: int | None = None) -> list[Scene]:
    from .train import EVAL_SEED_OFFSET
    start = EVAL_SEED_OFFSET if offset is None else offset
    return [generate_scene(start + i) for i in range(n)]


def _cider_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z]+|[^\sa-z]", text.lower()))


def evaluate(inference, tasks, scenes: list[Scene], batch_images: int = 32, max_regions: int = 5,
             progress: bool = True) -> dict:
    predictor = Predictor(inference, tasks)
    refer_iou, describe_ok, proposals_ok, n_proposals = [], [], 0, 0
    captions, references = {}, {}
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(scenes), batch_images), disable=not progress, desc="eval", unit="batch"):
        chunk = scenes[start:start + batch_images]
        asks, meta = [], []
        for j, s in enumerate(chunk):
            asks.append(Ask(j, "caption"))
            meta.append(("caption", start + j, s.caption))
            asks.append(Ask(j, "propose", max_regions=max_regions))
            meta.append(("propose", start + j, s))
            for obj, expr in zip(s.objects, s.expressions, strict=True):
                asks.append(Ask(j, "refer", expression=expr))
                meta.append(("refer", obj.box, None))
                asks.append(Ask(j, "describe", box=obj.box))
                meta.append(("describe", expr, None))
        answers = predictor.run([s.image for s in chunk], asks)
        for (kind, a, b), ans in zip(meta, answers, strict=True):
            if kind == "caption":
                captions[a], references[a] = [_cider_tokens(ans["text"])], [_cider_tokens(b)]
            elif kind == "refer":
                refer_iou.append(iou(ans["box"], a))
            elif kind == "describe":
                describe_ok.append(ans["text"] == a)
            else:
                for r in ans["regions"]:
                    n_proposals += 1
                    proposals_ok += any(iou(r["box"], o.box) >= 0.5 and r["text"] == e
                                        for o, e in zip(b.objects, b.expressions, strict=True))
    exact = [captions[k][0] == references[k][0] for k in captions]
    cider, _ = Cider().compute_score(references, captions)
    ious = np.array(refer_iou)
    return {"scenes": len(scenes), "refer_acc50": float((ious >= 0.5).mean()), "refer_miou": float(ious.mean()),
            "caption_exact": float(np.mean(exact)), "caption_cider": float(cider),
            "describe_exact": float(np.mean(describe_ok)),
            "proposal_precision": proposals_ok / n_proposals if n_proposals else 0.0,
            "proposals_per_scene": n_proposals / len(scenes), "seconds": time.perf_counter() - t0}


def table(metrics: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"{'metric':<{w}}  value", f"{'-' * w}  -----"] + [f"{k:<{w}}  {v}" for k, v in rows])


def add_arguments(p):
    p.add_argument("checkpoint", help="a checkpoint.safetensors (a run's, during or after training)")
    p.add_argument("--scenes", type=int, default=1000, help="held-out scenes to evaluate (default 1000)")
    p.add_argument("--offset", type=int, default=None, help="first held-out seed (default: the eval range)")
    p.add_argument("--batch-images", type=int, default=32, help="images encoded and decoded together")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")


def run(args) -> int:
    from .checkpoint import load
    from .inference import TorchInference

    bundle = load(args.checkpoint)
    scenes = heldout_scenes(args.scenes, args.offset)
    metrics = evaluate(TorchInference(bundle.model), bundle.tasks, scenes, args.batch_images)
    metrics["checkpoint_step"] = bundle.meta.get("step")
    print(table(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0

"""How should /ground find every object? The candidates of issue 16, measured side by side (docs/ground.md).

    python scripts/ground_study.py --scenes 300 --crowded 100 --json docs/ground_study.json

Each method answers "every object: box and referring expression" for held-out scenes (1-6 objects, the spec's)
and for crowded ones (8 objects), in this process on ONNX Runtime (one thread, the server's backend), one image
at a time. A region is right when its box has IoU >= 0.5 with an object and its text is that object's
referring expression; precision = right regions / regions, recall = objects found / objects. Latency is the
median per image, and its ratio to a plain caption's on the same images (the issue's bound: 3x).

    beam8            the previous /ground: beam search, 8 beams, best-first, boxes de-duplicated at IoU 0.5
    caption+aref     caption -> object phrases -> ARef of "the <phrase>" for each (twins: "on the left" /
                     "on the right"), texts from the spec's rule over the caption's objects
    corners          model/regions.py without the listener or the caption: every likely first corner, one
                     region per text and place
    corners+listen   ... keeping a region only where ARef puts its text back on its box
    corners+listen+twins   ... beside a caption that names twins (the server's default)
    ... rows merged at IoU x   ... where rows whose boxes overlap a likelier row's by x stop before their text
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from export.backends import load_inference
from model.decoding import BeamSearch, DecodingOptions, Query, budget_for
from model.evaluate import proposal_scores
from model.heldout import heldout_scenes
from model.image import preprocess
from model.phrases import object_phrases
from model.predictor import Predictor
from model.regions import RegionOptions, iou
from model.requests import Request
from model.shapes import ShapeObject, expressions_for
from service.bundle import resolve
from service.settings import Settings


def beam8(p: Predictor, image) -> list[dict]:
    q = Query(0, "ground", tuple(p.tasks.ground_prompt()))
    search = BeamSearch(q, budget_for(q, DecodingOptions(), p.core.max_seq_len), 8, p.core.grammar)
    p.core.submit(search, preprocess(image, p.image_size))
    p.core.run()
    kept: list[dict] = []
    for h in sorted(search.best(8), key=lambda h: -h.mean_logprob):
        r = {**p.tasks.parse("ground", h.tokens, *image.size), "score": h.mean_logprob}
        if r["score"] < -1.0 and kept:
            break
        if all(iou(r["box"], k["box"]) < 0.5 for k in kept):
            kept.append(r)
    return kept


def caption_aref(p: Predictor, image) -> list[dict]:
    (cap,) = p.run([image], [(0, Request("caption"))])
    phrases = [cap.text[a:b] for a, b in object_phrases(cap.text)]
    exprs = []
    for i, ph in enumerate(phrases):
        twins = [j for j, q in enumerate(phrases) if q == ph]
        where = "" if len(twins) == 1 else (" on the left" if twins[0] == i else " on the right")
        exprs.append(f"the {ph}{where}")
    if not exprs:
        return []
    boxes = [a.box for a in p.run([image], [(0, Request("refer", expression=e)) for e in exprs])]
    objects = []
    for ph, box in zip(phrases, boxes, strict=True):
        words = ph.split()
        if len(words) != 3:
            continue
        objects.append(ShapeObject(words[2], words[1], words[0], tuple(box)))
    try:
        texts = expressions_for(objects, image.size[0])
    except ValueError:  # three alike: the caption was wrong
        texts = [f"the {o.phrase}" for o in objects]
    return [{"box": list(o.box), "text": t} for o, t in zip(objects, texts, strict=True)]


def corners(options: RegionOptions):
    def find(p: Predictor, image) -> list[dict]:
        p.core.region_options = options
        (out,) = p.run([image], [(0, Request("ground"))])
        return [dataclasses.asdict(r) for r in out.regions]
    return find


METHODS = {
    "beam8": beam8,
    "caption+aref": caption_aref,
    "corners": corners(RegionOptions(listen=False, twins=False)),
    "corners+listen": corners(RegionOptions(twins=False)),
    "corners+listen+twins": corners(RegionOptions()),
    "... rows merged at IoU 0.7": corners(RegionOptions(same_box_iou=0.7)),
    "... rows merged at IoU 0.5": corners(RegionOptions(same_box_iou=0.5)),
}


def timed(fn, p, images) -> tuple[list, list[float]]:
    out, times = [], []
    for im in images:
        t0 = time.perf_counter()
        out.append(fn(p, im))
        times.append(time.perf_counter() - t0)
    return out, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/locca-tiny-shapes", help="checkpoint or bundle (%(default)s)")
    ap.add_argument("--scenes", type=int, default=300, help="held-out scenes of 1-6 objects (default 300)")
    ap.add_argument("--crowded", type=int, default=100, help="held-out scenes of 8 objects (default 100)")
    ap.add_argument("--offset", type=int, default=1_200_000_000, help="first held-out seed (%(default)s)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    ap.add_argument("--list", action="store_true", help="list the methods and exit")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.list:
        print("\n".join(METHODS))
        return
    src = resolve(Settings(model=args.model, backend="onnxruntime"))  # exported on first use, as `serve` does
    loaded = load_inference(src.path, src.backend, threads=1)
    p = Predictor(loaded.inference, loaded.tasks)
    scenes, crowded = heldout_scenes(args.scenes, args.offset), heldout_scenes(args.crowded, args.offset, count=8)
    _, cap_times = timed(lambda p, im: p.run([im], [(0, Request("caption"))]), p, [s.image for s in scenes])
    caption_ms = 1e3 * float(np.median(cap_times))
    results = {"model": args.model, "scenes": args.scenes, "crowded_scenes": args.crowded, "offset": args.offset,
               "caption_ms": caption_ms, "methods": {}}
    print(f"caption: {caption_ms:.1f} ms per image (median)")
    print(f"{'method':<28}{'precision':>10}{'recall':>8}{'per scene':>10}{'8-obj P':>9}{'8-obj R':>9}"
          f"{'ms':>8}{'x caption':>10}")
    for name in args.methods.split(","):
        fn = METHODS[name]
        regions, times = timed(fn, p, [s.image for s in scenes])
        crowd, _ = timed(fn, p, [s.image for s in crowded]) if crowded else ([], [])
        r = proposal_scores(scenes, regions)
        c = proposal_scores(crowded, crowd) if crowded else {}
        ms = 1e3 * float(np.median(times))
        results["methods"][name] = {**r, **{f"crowded_{k}": v for k, v in c.items()}, "ms": ms,
                                    "over_caption": ms / caption_ms}
        print(f"{name:<28}{r['proposal_precision']:>10.3f}{r['proposal_recall']:>8.3f}"
              f"{r['proposals_per_scene']:>10.2f}{c.get('proposal_precision', float('nan')):>9.3f}"
              f"{c.get('proposal_recall', float('nan')):>9.3f}{ms:>8.1f}{ms / caption_ms:>10.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""High-level prediction on PIL images: caption, refer, describe a box, propose regions.

Used by `locca eval`, `locca predict` and the tests; the server's engine schedules the same queries with
continuous batching. Boxes go in and come out in pixels of the image as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .decoding import DecodingOptions, Hypothesis, Query, decode
from .image import preprocess
from .tasks import Tasks


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Ask:
    """One question about one image of the batch."""
    image: int
    task: str                                  # caption | refer | describe | propose
    expression: str | None = None              # refer
    box: Sequence[float] | None = None         # describe
    max_new_tokens: int | None = None
    max_regions: int = 5                       # propose


class Predictor:
    def __init__(self, inference, tasks: Tasks, options: DecodingOptions = DecodingOptions(),
                 propose_beam: int = 8, min_region_score: float = -1.0):
        """propose_beam: beams searched for region proposals; min_region_score: proposals whose mean token
        log-probability is below this are dropped (they describe nothing in the image)."""
        self.inference, self.tasks, self.options = inference, tasks, options
        self.image_size = inference.cfg.image_size
        self.propose_beam, self.min_region_score = propose_beam, min_region_score

    def encode(self, images: Sequence[Image.Image]):
        return self.inference.encode(np.stack([preprocess(im, self.image_size) for im in images]))

    def query(self, ask: Ask, size: tuple[int, int]) -> Query:
        t = self.tasks
        prompt = {"caption": t.caption_prompt,
                  "refer": lambda: t.refer_prompt(ask.expression),
                  "describe": lambda: t.describe_prompt(ask.box, *size),
                  "propose": t.propose_prompt}[ask.task]()
        return Query(ask.image, ask.task, tuple(prompt), ask.max_new_tokens)

    def run(self, images: Sequence[Image.Image], asks: Sequence[Ask]) -> list[dict]:
        """Answer every ask; images are encoded once. Returns one dict per ask, in order."""
        cross = self.encode(images)
        sizes = [im.size for im in images]
        out: list[dict | None] = [None] * len(asks)
        greedy = [i for i, a in enumerate(asks) if a.task != "propose"]
        queries = [self.query(asks[i], sizes[asks[i].image]) for i in greedy]
        for i, hyps in zip(greedy, decode(self.inference, cross, queries, self.tasks.tok, self.options),
                           strict=True):
            out[i] = self.answer(asks[i], hyps[0], sizes[asks[i].image])
        propose = [i for i, a in enumerate(asks) if a.task == "propose"]
        if propose:  # beam search, all proposals of the batch in one call
            opts = DecodingOptions(beam_size=self.propose_beam, num_return=self.propose_beam,
                                   max_new_tokens=self.options.max_new_tokens)
            queries = [self.query(asks[i], sizes[asks[i].image]) for i in propose]
            for i, hyps in zip(propose, decode(self.inference, cross, queries, self.tasks.tok, opts), strict=True):
                out[i] = {"regions": self.regions(hyps, sizes[asks[i].image], asks[i].max_regions)}
        return out

    def answer(self, ask: Ask, h: Hypothesis, size) -> dict:
        parsed = self.tasks.parse(ask.task, h.tokens, *size)
        return {**parsed, "score": h.mean_logprob}

    def regions(self, hyps: list[Hypothesis], size, max_regions: int) -> list[dict]:
        """Best-first distinct regions: a hypothesis whose box overlaps a better one (IoU >= 0.5) is dropped."""
        kept: list[dict] = []
        for h in sorted(hyps, key=lambda h: -h.mean_logprob):
            r = {**self.tasks.parse("propose", h.tokens, *size), "score": h.mean_logprob}
            if r["score"] < self.min_region_score and kept:
                break
            if all(iou(r["box"], k["box"]) < 0.5 for k in kept):
                kept.append(r)
            if len(kept) == max_regions:
                break
        return kept

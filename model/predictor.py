"""High-level prediction on PIL images: caption (grounded or not), refer, describe a box, find every object.

Used by `locca eval`, `locca predict` and the tests; the server's engine schedules the same queries with
continuous batching. Boxes go in and come out in pixels of the image as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .decoding import BeamSearch, DecodingOptions, Grammar, Hypothesis, Query, budget_for, run
from .image import preprocess
from .phrases import GroundedCaption, link, name_twins, object_phrases
from .regions import RegionOptions, RegionSearch, iou, public  # noqa: F401 (iou: the callers')
from .tasks import Tasks

DEFAULT_REGIONS = 32   # most regions /ground answers unless asked for fewer: more than a scene holds


@dataclass(frozen=True)
class Ask:
    """One question about one image of the batch."""
    image: int
    task: str                                  # caption | grounded (caption + phrase boxes) | refer | describe
                                               # | propose
    expression: str | None = None              # refer
    box: Sequence[float] | None = None         # describe
    max_new_tokens: int | None = None
    max_regions: int = DEFAULT_REGIONS         # propose


class Predictor:
    def __init__(self, inference, tasks: Tasks, options: DecodingOptions = DecodingOptions(),
                 region_options: RegionOptions = RegionOptions()):
        """options: the search of captions, refers and descriptions; region_options: that of proposals
        (every object of the image, model/regions.py)."""
        self.inference, self.tasks, self.options, self.region_options = inference, tasks, options, region_options
        self.image_size = inference.cfg.image_size
        self.grammar = Grammar(tasks.tok)

    def encode(self, images: Sequence[Image.Image]):
        return self.inference.encode(np.stack([preprocess(im, self.image_size) for im in images]))

    def query(self, ask: Ask, size: tuple[int, int]) -> Query:
        t = self.tasks
        prompt = {"caption": t.caption_prompt,
                  "grounded": t.caption_prompt,
                  "refer": lambda: t.refer_prompt(ask.expression),
                  "describe": lambda: t.describe_prompt(ask.box, *size),
                  "propose": t.propose_prompt}[ask.task]()
        return Query(ask.image, "caption" if ask.task == "grounded" else ask.task, tuple(prompt),
                     ask.max_new_tokens)

    def search(self, ask: Ask, size: tuple[int, int]):
        """The search that answers `ask` (raises ValueError when its budget cannot hold the answer)."""
        S = self.inference.cfg.max_seq_len
        query = self.query(ask, size)
        budget = budget_for(query, self.options, S)
        if ask.task == "propose" and not self.region_options.twins:
            return RegionSearch(query, budget, self.grammar, self.tasks, S, self.region_options)
        if ask.task == "propose":  # a caption beside the regions names twins (model/phrases.py name_twins)
            return self._grounded(ask.image)
        if ask.task == "grounded":
            return self._grounded(ask.image, query, budget)
        return BeamSearch(query, budget, self.options.beam_size, self.grammar, self.options.length_penalty)

    def _grounded(self, image: int, caption: Query | None = None, budget: int | None = None) -> GroundedCaption:
        """A caption (by default, the plain one of `image`) and the region search, side by side."""
        S = self.inference.cfg.max_seq_len
        caption = caption or Query(image, "caption", tuple(self.tasks.caption_prompt()))
        budget = budget or budget_for(caption, self.options, S)
        regions = Query(image, "propose", tuple(self.tasks.propose_prompt()))
        return GroundedCaption(
            BeamSearch(caption, budget, self.options.beam_size, self.grammar, self.options.length_penalty),
            RegionSearch(regions, budget_for(regions, self.options, S), self.grammar, self.tasks, S,
                         self.region_options))

    def run(self, images: Sequence[Image.Image], asks: Sequence[Ask]) -> list[dict]:
        """Answer every ask; images are encoded once. Returns one dict per ask, in order."""
        cross = self.encode(images)
        sizes = [im.size for im in images]
        searches = [self.search(a, sizes[a.image]) for a in asks]
        run(self.inference, cross, searches, self.tasks.tok.pad_id)
        return [self.answer(a, s, sizes[a.image]) for a, s in zip(asks, searches, strict=True)]

    def answer(self, ask: Ask, search, size) -> dict:
        """A finished search's answer: {"regions"} for propose; {"text", "score", "phrases"} for grounded
        (phrases: text, span, and box or None); {"box" and/or "text", "score"} otherwise."""
        if ask.task == "propose" and isinstance(search, GroundedCaption):
            text = self.tasks.parse("caption", search.caption.best(1)[0].tokens, *size)["text"]
            found = name_twins(text, search.region_search.candidates(*size), size[0])
            return {"regions": [public(r) for r in found][: ask.max_regions]}
        if ask.task == "propose":
            return {"regions": search.regions(*size, ask.max_regions)}
        caption = search.caption if ask.task == "grounded" else search
        h: Hypothesis = caption.best(1)[0]
        out = {**self.tasks.parse(caption.query.task, h.tokens, *size), "score": h.mean_logprob}
        if ask.task == "grounded":  # every region found may be a phrase's, the listener's verdict aside
            regions = search.region_search.candidates(*size)
            spans = object_phrases(out["text"])
            texts = [out["text"][a:b] for a, b in spans]
            out["phrases"] = [{"text": t, "span": [a, b], "box": None if k is None else regions[k]["box"],
                               "score": None if k is None else regions[k]["score"]}
                              for t, (a, b), k in zip(texts, spans, link(texts, regions), strict=True)]
        return out

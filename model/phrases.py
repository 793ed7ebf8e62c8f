"""Grounded captions: the object phrases of a caption, each linked to a region the model found (issue 16).

`GroundedCaption` searches a caption and the image's regions (model/regions.py) side by side from one prompt
row; the rest of this module reads the answer.

A shapes-world caption lists every object as `a <size> <colour> <shape>`, left to right by box centre, joined
by `, ` and ` and ` (docs/shapes-world.md, Texts). `object_phrases` finds each phrase's character span;
`link` pairs the phrases with regions (box + referring expression, model/regions.py): a region may stand for a
phrase when every attribute word of its expression is in the phrase ("the red circle" for "large red circle");
twins, one phrase twice, take their regions in the caption's left-to-right order. A model trained on other captions needs its own phrase finder; `link`
holds for any data whose expressions name attributes of their objects.

`name_twins` gives twins their expressions. Two objects alike in every attribute are named by where they are
("the small red circle on the left"), and the default model almost never writes that: it calls both "the red
circle" (issue 16 measured it: 4% of twins described right, on true boxes). A caption that lists the same
phrase twice says which regions are twins; the spec's rule then names them from their boxes.
"""

from __future__ import annotations

import re

import numpy as np

from .regions import RegionSearch, iou
from .shapes import TWIN_VERTICAL_FRACTION

_JOINS = re.compile(r", | and ")
_ARTICLES = ("a ", "an ", "the ")
_WHERE = ("on", "at")  # the position words of a twin's expression start here ("on the left", "at the top")


class GroundedCaption:
    """A caption and every region of its image, searched side by side from one prompt row: the regions' prompt
    <bos> <GCap> shares slot 0 (<bos>) with the caption's <bos> <Cap>, so their search starts in a copy of the
    caption's row by feeding <GCap> at position 1, and no second prefill is needed. The caption's object
    phrases are linked to the regions afterwards (`link`, `name_twins`)."""

    def __init__(self, caption, regions: RegionSearch):
        self.caption, self.region_search = caption, regions
        regions.share_row(1)
        self.query = caption.query
        self.width = caption.width + regions.width
        self.parts = [caption, regions]
        self.live = [1, 1]           # rows each part holds in the next logits (one each after the prefill)
        self.rows: list[int] = []
        self.src: list[int] = []
        self.done = False

    def advance(self, logp: np.ndarray) -> bool:
        offset, self.src = 0, []
        for k, part in enumerate(self.parts):
            if part.done:
                continue
            part.rows, offset = self.rows[offset: offset + self.live[k]], offset + self.live[k]
            if part.advance(logp):
                self.src += part.src
            self.live[k] = len(part.src)
        self.done = not self.src
        return not self.done

    def tokens(self) -> np.ndarray:
        return np.concatenate([p.tokens() for p in self.parts if not p.done])

    def positions(self) -> np.ndarray:
        return np.concatenate([p.positions() for p in self.parts if not p.done])

    def most_tokens(self) -> int:
        return max(p.most_tokens() for p in self.parts if not p.done) if not self.done else 0


def object_phrases(caption: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the object phrases of `caption`, in order, without their article."""
    starts = [0] + [m.end() for m in _JOINS.finditer(caption)]
    ends = [m.start() for m in _JOINS.finditer(caption)] + [len(caption)]
    spans = []
    for s, e in zip(starts, ends, strict=True):
        for article in _ARTICLES:
            if caption.startswith(article, s):
                s += len(article)
                break
        if s < e:
            spans.append((s, e))
    return spans


def attribute_words(expression: str) -> list[str]:
    """The words of a referring expression that name attributes: without `the` and any position words."""
    words = expression.split()
    if words and words[0] == "the":
        words = words[1:]
    for i, w in enumerate(words):
        if w in _WHERE:
            return words[:i]
    return words


def link(phrases: list[str], regions: list[dict]) -> list[int | None]:
    """For each phrase, the index of its region in `regions` or None. A region may be a phrase's when its text
    fits the phrase (`compatible`); regions that fit fewer phrases, then heavier ones (a region's "weight", 1
    without one: the probability of the rows that found it, so a stray corner does not take a real object's
    phrase), are given first, each phrase text at most as many regions as the caption has of it. A phrase the
    caption lists more than once (twins) takes its regions in the caption's order, left to right by box centre.
    The caption's order is used only there: a caption that swaps two neighbours still links both."""
    occurrences: dict[str, list[int]] = {}
    for i, p in enumerate(phrases):
        occurrences.setdefault(p, []).append(i)
    fits = [[p for p in occurrences if compatible(p, r["text"])] for r in regions]
    pairs = sorted((len(fits[j]), -float(regions[j].get("weight", 1.0)), j, p)
                   for j in range(len(regions)) for p in fits[j])
    given: dict[str, list[int]] = {p: [] for p in occurrences}
    taken: set[int] = set()
    for _, _, j, p in pairs:
        if j not in taken and len(given[p]) < len(occurrences[p]):
            given[p].append(j)
            taken.add(j)
    out: list[int | None] = [None] * len(phrases)
    for p, idx in occurrences.items():
        for i, j in zip(idx, sorted(given[p], key=lambda j: _centre(regions[j]["box"])), strict=False):
            out[i] = j
    return out


def compatible(phrase: str, text: str) -> bool:
    """A region described as `text` may be the object of `phrase`: every attribute word of it is the phrase's."""
    words = attribute_words(text)
    return bool(words) and set(words) <= set(phrase.split())


def name_twins(caption: str, candidates: list[dict], width: float) -> list[dict]:
    """The regions to answer from `candidates` (model/regions.py: box, text, score, agrees, weight), best
    first: those the listener agreed with, and the twins the caption names (module docstring), each pair the
    two heaviest regions that fit its phrase, named by the shapes-world rule (left / right by box centre x;
    top / bottom when the centres are closer than TWIN_VERTICAL_FRACTION of the width in x)."""
    out = [dict(c) for c in candidates]
    phrases = [caption[a:b] for a, b in object_phrases(caption)]
    for phrase in sorted({p for p in phrases if phrases.count(p) == 2}):
        fit = sorted((c for c in out if compatible(phrase, c["text"])), key=lambda c: -c["weight"])
        pair = [fit[0], next((c for c in fit[1:] if iou(c["box"], fit[0]["box"]) == 0), None)] if fit else []
        if len(pair) < 2 or pair[1] is None:
            continue
        (ax, ay), (bx, by) = (_centre(c["box"]) for c in pair)
        if abs(ax - bx) < TWIN_VERTICAL_FRACTION * width:
            where = ("at the top", "at the bottom") if ay < by else ("at the bottom", "at the top")
        else:
            where = ("on the left", "on the right") if ax < bx else ("on the right", "on the left")
        for c, w in zip(pair, where, strict=True):
            c["text"], c["agrees"] = f"the {phrase} {w}", True
    kept: list[dict] = []
    for c in sorted((c for c in out if c["agrees"]), key=lambda c: -c["score"]):
        if not any(k["text"] == c["text"] and iou(k["box"], c["box"]) >= 0.5 for k in kept):
            kept.append(c)
    return kept


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2

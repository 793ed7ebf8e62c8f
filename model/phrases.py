"""Grounded captions: the object phrases of a caption, each linked to a region the model found (issue 16).

A shapes-world caption lists every object as `a <size> <colour> <shape>`, left to right by box centre, joined
by `, ` and ` and ` (shared/specs/shapes-world.md, Texts). `object_phrases` finds each phrase's character span;
`link` pairs the phrases with regions (box + referring expression, model/regions.py): a region may stand for a
phrase when every attribute word of its expression is in the phrase ("the red circle" for "large red circle"),
and the pairing keeps the caption's left-to-right order (the longest order-keeping pairing, as a longest common
subsequence), which tells twins apart. A model trained on other captions needs its own phrase finder; `link`
holds for any data whose expressions name attributes of their objects.

`name_twins` gives twins their expressions. Two objects alike in every attribute are named by where they are
("the small red circle on the left"), and the default model almost never writes that: it calls both "the red
circle" (issue 16 measured it: 4% of twins described right, on true boxes). A caption that lists the same
phrase twice says which regions are twins; the spec's rule then names them from their boxes.
"""

from __future__ import annotations

import re

from .regions import iou
from .shapes import TWIN_VERTICAL_FRACTION

_JOINS = re.compile(r", | and ")
_ARTICLES = ("a ", "an ", "the ")
_WHERE = ("on", "at")  # the position words of a twin's expression start here ("on the left", "at the top")


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
    """For each phrase (caption order), the index of its region in `regions` or None: of the pairings that keep
    both orders (phrases as written, regions by box centre x, then y) and pair only compatible ones, the one
    with the most pairs, then the heaviest (a region's "weight", 1 without one: the probability of the rows
    that found it, so a stray corner does not take a real object's phrase)."""
    order = sorted(range(len(regions)), key=lambda i: _centre(regions[i]["box"]))
    weight = [float(regions[i].get("weight", 1.0)) for i in order]
    top = max(weight, default=1.0) or 1.0
    ok = [[compatible(p, regions[i]["text"]) for i in order] for p in phrases]
    P, R = len(phrases), len(order)
    # best[i][j]: the best (pairs, weight) among phrases[i:] and order[j:]
    best = [[(0, 0.0)] * (R + 1) for _ in range(P + 1)]
    for i in range(P - 1, -1, -1):
        for j in range(R - 1, -1, -1):
            take = (best[i + 1][j + 1][0] + 1, best[i + 1][j + 1][1] + weight[j] / top) if ok[i][j] else (-1, 0.0)
            best[i][j] = max(best[i + 1][j], best[i][j + 1], take)
    out: list[int | None] = [None] * P
    i = j = 0
    while i < P and j < R:
        if ok[i][j] and best[i][j] == (best[i + 1][j + 1][0] + 1, best[i + 1][j + 1][1] + weight[j] / top):
            out[i], i, j = order[j], i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
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

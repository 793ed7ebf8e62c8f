"""Grounded captions: the object phrases of a caption, each linked to a region the model found (issue 16).

A shapes-world caption lists every object as `a <size> <colour> <shape>`, left to right by box centre, joined
by `, ` and ` and ` (shared/specs/shapes-world.md, Texts). `object_phrases` finds each phrase's character span;
`link` pairs the phrases with regions (box + referring expression, model/regions.py): a region may stand for a
phrase when every attribute word of its expression is in the phrase ("the red circle" for "large red circle"),
and the pairing keeps the caption's left-to-right order (the longest order-keeping pairing, as a longest common
subsequence), which tells twins apart. A model trained on other captions needs its own phrase finder; `link`
holds for any data whose expressions name attributes of their objects.
"""

from __future__ import annotations

import re

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
    """For each phrase (caption order), the index of its region in `regions` or None: the longest pairing
    that keeps both orders (phrases as written, regions by box centre x, then y) and pairs only compatible ones."""
    order = sorted(range(len(regions)), key=lambda i: ((regions[i]["box"][0] + regions[i]["box"][2]) / 2,
                                                      (regions[i]["box"][1] + regions[i]["box"][3]) / 2))
    words = [set(p.split()) for p in phrases]
    attrs = [attribute_words(regions[i]["text"]) for i in order]
    ok = [[bool(a) and set(a) <= w for a in attrs] for w in words]
    P, R = len(phrases), len(order)
    best = [[0] * (R + 1) for _ in range(P + 1)]  # best[i][j]: pairs among phrases[i:], order[j:]
    for i in range(P - 1, -1, -1):
        for j in range(R - 1, -1, -1):
            best[i][j] = max(best[i + 1][j], best[i][j + 1], best[i + 1][j + 1] + 1 if ok[i][j] else 0)
    out: list[int | None] = [None] * P
    i = j = 0
    while i < P and j < R:
        if ok[i][j] and best[i][j] == best[i + 1][j + 1] + 1:
            out[i], i, j = order[j], i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return out

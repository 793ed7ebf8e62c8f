"""Annotated images: an answer's boxes and texts drawn over the image they are about.

One drawing for every surface that shows one: the REST answer with `render=png` (service/rest.py) and
`locca predict --out` (locca/predict.py). The demo page (service/static/demo.js) draws the same boxes in the
browser, with the same colours.

Boxes are the API's: `[x0, y0, x1, y1]` in pixels of the image as displayed (after EXIF orientation), x1 and
y1 exclusive, as in the shapes world. The outline lies inside the box: its outer edge runs along the first and
last pixel rows and columns the box covers, so an outline drawn around an object touches the object's own
edge pixels. The picture keeps the image's size: a pixel of the answer is a pixel of the image.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from model.requests import API_CALLS

from .images import Limits, decode

# Saturated colours of middling luminance: they stand out on the shapes world's light background (190-250 per
# channel) and differ from its objects' colours (red, green, blue, yellow, purple, black); regions take them
# in order. service/static/demo.js holds the same list.
PALETTE = ((255, 20, 147), (0, 150, 255), (255, 120, 0), (0, 150, 136), (230, 0, 230), (150, 75, 0),
           (128, 128, 0), (70, 90, 120))
TASKS = API_CALLS


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def labelled_boxes(task: str, result: dict) -> list[tuple[list[float], str]]:
    """(box, label) pairs of an answer in the REST contract's shape, in drawing order."""
    if task == "refer":  # one expression, or several (`results`)
        return [(r["box"], r["expression"]) for r in result.get("results", [result])]
    if task == "ground":
        regions = result["regions"]
        if len(regions) == 1:
            return [(regions[0]["box"], regions[0]["text"])]
        return [(r["box"], f"{i + 1}. {r['text']}") for i, r in enumerate(regions)]
    if task == "caption":  # a grounded caption: each phrase's box, labelled with the phrase
        return [(p["box"], p["text"]) for p in result.get("phrases") or () if p["box"] is not None]
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font (no file is read from disk, so this works anywhere, offline)."""
    return ImageFont.load_default(size=size)


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """A box in continuous pixel coordinates -> the first and last pixel column and row it covers, inclusive,
    clipped to the image; None when nothing of it is inside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    c0, r0 = max(0, round(x0)), max(0, round(y0))
    c1, r1 = min(width - 1, max(c0, round(x1) - 1)), min(height - 1, max(r0, round(y1) - 1))
    if c0 > c1 or r0 > r1:
        return None
    return c0, r0, c1, r1


def annotate(image: Image.Image, task: str, result: dict) -> Image.Image:
    """A copy of `image` (RGB, as displayed) with the answer's boxes outlined and labelled, each in its own
    colour; a caption is written in a band under the image (the only case that adds pixels, below it)."""
    im = image.convert("RGB")  # a copy, whatever the mode
    w, h = im.size
    side = min(w, h)
    line = max(2, round(side / 160))
    size = max(12, min(28, round(side / 18)))
    draw = ImageDraw.Draw(im)
    boxes = labelled_boxes(task, result)
    placed = []
    for i, (box, label) in enumerate(boxes):
        px = pixel_box(box, w, h)
        if px is None:
            continue
        c0, r0, c1, r1 = px
        width = max(1, min(line, (c1 - c0 + 1) // 4, (r1 - r0 + 1) // 4))
        draw.rectangle(px, outline=colour(i), width=width)
        placed.append((px, label, colour(i)))
    tags: list[tuple[int, int, int, int]] = []
    for px, label, fill in placed:  # labels after every box, so no outline crosses a label
        tags.append(_label(draw, px, label, fill, size, w, h, tags))
    if task == "caption":  # phrases written in their boxes' colours
        boxed = [p for p in result.get("phrases") or () if p["box"] is not None]
        return _caption_band(im, result["caption"], size,
                             [(*p["span"], colour(i)) for i, p in enumerate(boxed)])
    return im


def _label(draw: ImageDraw.ImageDraw, px, text: str, fill, size: int, w: int, h: int, taken) -> tuple:
    """A filled tag with the text at the first free place of: above the box, below it, inside its top, inside
    its bottom (free: inside the image and clear of the tags already drawn). Returns the tag's rectangle."""
    f = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    pad = max(2, size // 6)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    c0, r0, _, r1 = px
    x = min(max(0, c0), max(0, w - tw))
    places = [(x, y, x + tw - 1, y + th - 1) for y in (r0 - th, r1 + 1, r0, r1 + 1 - th)]
    inside = [p for p in places if p[1] >= 0 and p[3] < h] or [(x, 0, x + tw - 1, th - 1)]
    rect = next((p for p in inside if not any(_overlap(p, t) for t in taken)), inside[0])
    draw.rectangle(rect, fill=fill)
    draw.text((rect[0] + pad - left, rect[1] + pad - top), text, font=f, fill=_ink(fill))
    return rect


def _overlap(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _ink(fill) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `fill` (relative luminance, ITU-R BT.709)."""
    r, g, b = fill
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else (255, 255, 255)


def _caption_band(im: Image.Image, text: str, size: int, spans=()) -> Image.Image:
    """The caption under the image, wrapped at words; a word inside one of `spans` ((start, end, colour),
    character offsets) is written in that colour."""
    f = font(size)
    pad = max(4, size // 3)
    probe = ImageDraw.Draw(im)
    lines = _wrap(probe, text, f, im.width - 2 * pad)
    line_h = probe.textbbox((0, 0), "Ag", font=f)[3] + pad // 2
    out = Image.new("RGB", (im.width, im.height + len(lines) * line_h + 2 * pad), (255, 255, 255))
    out.paste(im, (0, 0))
    draw = ImageDraw.Draw(out)
    space = draw.textlength(" ", font=f)
    for k, line in enumerate(lines):
        x = pad
        for start, word in line:
            ink = next((c for a, b, c in spans if a <= start < b), (0, 0, 0))
            draw.text((x, im.height + pad + k * line_h), word, font=f, fill=ink)
            x += draw.textlength(word, font=f) + space
    return out


def _wrap(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> list[list[tuple[int, str]]]:
    """Lines of (offset, word) that fit in `width`; a word too long for a line has one of its own."""
    lines: list[list[tuple[int, str]]] = [[]]
    for m in re.finditer(r"\S+", text):
        trial = " ".join(w for _, w in lines[-1] + [(m.start(), m.group())])
        if lines[-1] and draw.textlength(trial, font=f) > width:
            lines.append([])
        lines[-1].append((m.start(), m.group()))
    return lines


def to_png(image: Image.Image, task: str | None = None, result: dict | None = None) -> bytes:
    """PNG bytes; the answer rides along as text chunks `locca:task` and `locca:result` (JSON)."""
    info = PngInfo()
    if task is not None:
        info.add_text("locca:task", task)
    if result is not None:
        info.add_text("locca:result", json.dumps(result))
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info, optimize=False)
    return buf.getvalue()


def render_png(data: bytes, task: str, result: dict, limits: Limits) -> bytes:
    """Request image bytes + its answer -> the annotated PNG. The image is decoded exactly as it was for the
    model (same limits, EXIF orientation applied), so the boxes land where the answer says."""
    return to_png(annotate(decode(data, limits), task, result), task, result)

"""Shapes world: conformance with the shared vectors and images, generator statistics, determinism."""

import itertools
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.shapes import (
    COLOURS,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    ShapeObject,
    caption_for,
    expressions_for,
    generate_scene,
    render,
    scene_to_record,
)

# the project's shared material: $LOCCA_SHARED, else shared/ beside the checkout (../shared from its root)
SHARED = Path(os.environ.get("LOCCA_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
CONFORMANCE = SHARED / "data" / "shapes-conformance"


@pytest.fixture(scope="module")
def vectors() -> list[dict]:
    # No skip: without the vectors nothing says that this generator reads the spec like the others.
    path = CONFORMANCE / "scenes.jsonl"
    assert path.is_file(), f"conformance vectors missing: {path} (set LOCCA_SHARED to the shared/ folder)"
    scenes = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(scenes) == 500
    return scenes


def objects_of(scene: dict) -> list[ShapeObject]:
    return [ShapeObject(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in scene["objects"]]


# ---------------------------------------------------------------------------------------------- texts


def test_texts_match_every_conformance_vector(vectors):
    for scene in vectors:
        objects = objects_of(scene)
        assert caption_for(objects) == scene["caption"], scene["id"]
        assert expressions_for(objects, scene["width"]) == [o["expression"] for o in scene["objects"]], scene[
            "id"
        ]


def obj(shape="circle", colour="red", size="small", at=(0, 0), side=10):
    return ShapeObject(shape, colour, size, (at[0], at[1], at[0] + side, at[1] + side))


def test_caption_order_and_joining():
    assert caption_for([obj(size="large")]) == "a large red circle"
    # Same centre x: the smaller y comes first.
    objects = [obj("square", at=(50, 60)), obj("cross", at=(0, 0)), obj("triangle", at=(50, 10))]
    assert caption_for(objects) == "a small red cross, a small red triangle and a small red square"


def test_expression_picks_the_first_unique_attribute_set():
    objects = [
        obj("circle", "red", "large", at=(0, 0)),
        obj("circle", "blue", "large", at=(100, 0)),
        obj("circle", "blue", "small", at=(200, 0)),
        obj("square", "blue", "small", at=(0, 100)),
    ]
    assert expressions_for(objects, 300) == [
        "the red circle",
        "the large blue circle",
        "the small circle",
        "the square",
    ]
    # {size, shape} comes before {size, colour, shape}.
    objects = [obj("cross", "red", "large"), obj("cross", "red", "small", at=(100, 0))]
    assert expressions_for(objects, 300) == ["the large cross", "the small cross"]


def test_twins_left_right_and_top_bottom():
    left, right = obj(at=(10, 50)), obj(at=(200, 10))
    assert expressions_for([right, left], 300) == [
        "the small red circle on the right",
        "the small red circle on the left",
    ]
    # Centres 29 px apart on a 300 px canvas: under 10 % of the width, so top/bottom.
    low, high = obj(at=(39, 100)), obj(at=(10, 20))
    assert expressions_for([low, high], 300) == [
        "the small red circle at the bottom",
        "the small red circle at the top",
    ]
    # Exactly 10 % apart is not "less than": left/right again.
    assert expressions_for([obj(at=(40, 100)), high], 300)[0] == "the small red circle on the right"


def test_three_identical_objects_are_rejected():
    with pytest.raises(ValueError, match="at most two"):
        expressions_for([obj(at=(0, 0)), obj(at=(20, 0)), obj(at=(40, 0))], 100)


# ---------------------------------------------------------------------------------------------- rendering


def background_mask(shape: tuple[int, int], objects: list[ShapeObject], margin: int = 2) -> np.ndarray:
    mask = np.ones(shape, dtype=bool)
    for o in objects:
        x0, y0, x1, y1 = o.box
        mask[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    return mask


def analyse(image: np.ndarray, objects: list[ShapeObject]):
    """Background colour and noise std, and per object its shape mask and mean colour."""
    pixels = image.astype(np.float64)
    bg = pixels[background_mask(image.shape[:2], objects)]  # (N, 3)
    colour = np.median(bg, axis=0)
    out = []
    for o in objects:
        x0, y0, x1, y1 = o.box
        crop = pixels[y0:y1, x0:x1]
        mask = np.abs(crop - colour).max(axis=-1) > 60  # 10 sigma of noise; objects differ by far more
        out.append((mask, crop[mask].mean(axis=0)))
    return colour, bg.std(axis=0), out


def check_noise(colour, std):
    for c, s in zip(colour, std, strict=True):
        # Clipping at 255 narrows the noise of the brightest backgrounds.
        assert (abs(s - 6) < 0.35) if c <= 240 else (4.5 < s < 6.5), (colour, std)


def test_render_matches_the_reference_images(vectors):
    for scene in vectors[:30]:
        objects = objects_of(scene)
        reference = np.asarray(Image.open(CONFORMANCE / scene["image"]).convert("RGB"))
        assert reference.shape == (scene["height"], scene["width"], 3)
        ours = render(scene["width"], scene["height"], objects, np.random.default_rng(scene["id"]))
        assert ours.mode == "RGB" and ours.size == (scene["width"], scene["height"])
        ref_bg, ref_std, ref_objects = analyse(reference, objects)
        bg, std, our_objects = analyse(np.asarray(ours), objects)
        check_noise(ref_bg, ref_std)
        check_noise(bg, std)
        assert all(190 - 1 <= c <= 250 + 1 for c in bg)
        for o, (ref_mask, ref_mean), (mask, mean) in zip(objects, ref_objects, our_objects, strict=True):
            iou = (mask & ref_mask).sum() / (mask | ref_mask).sum()
            assert iou >= 0.9, (scene["id"], o, iou)
            base = np.asarray(COLOURS[o.colour])
            lo, hi = (
                np.clip(base - 15, 0, 255) - 2.5,
                np.clip(base + 15, 0, 255) + 2.5,
            )  # jitter + noise of the mean
            for m in (ref_mean, mean):
                assert np.all((lo <= m) & (m <= hi)), (scene["id"], o, m)


def test_render_is_vectorised():
    objects = generate_scene(3, render_image=False).objects
    rng = np.random.default_rng(0)
    render(400, 400, objects, rng)  # warm the mask cache
    start = time.perf_counter()
    for _ in range(5):
        render(400, 400, objects, rng)
    assert (time.perf_counter() - start) / 5 < 0.1  # ~10 ms here; a per-pixel loop takes seconds


# ---------------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def layouts():
    return [generate_scene(seed, render_image=False) for seed in range(2000)]


def test_generator_statistics(layouts):
    widths = [s.width for s in layouts]
    heights = [s.height for s in layouts]
    assert 160 <= min(widths) < 170 and 390 < max(widths) <= 400
    assert 160 <= min(heights) < 170 and 390 < max(heights) <= 400
    counts = Counter(len(s.objects) for s in layouts)
    assert set(counts) == set(range(1, 7))
    assert all(250 < n < 420 for n in counts.values()), counts  # 333 expected, sd 17
    objects = [o for s in layouts for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)


def test_boxes_follow_the_spec(layouts):
    for s in layouts:
        m = min(s.width, s.height)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert all(isinstance(v, int) for v in o.box)
            assert 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
            assert x1 - x0 == y1 - y0
            lo, hi = SIZE_FRACTIONS[o.size]
            assert lo * m - 0.5 <= x1 - x0 <= hi * m + 0.5  # nearest-pixel rounding
        for a, b in itertools.combinations(s.objects, 2):
            gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
            gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gap_x, gap_y) >= 4, (a, b)


def test_texts_of_generated_scenes(layouts):
    twins = 0
    for s in layouts:
        assert max(Counter(o.phrase for o in s.objects).values()) <= 2
        assert s.caption == caption_for(s.objects)
        assert s.expressions == expressions_for(s.objects, s.width)
        assert len(set(s.expressions)) == len(s.expressions)  # each one picks out a single object
        twins += any(e.endswith(("left", "right", "top", "bottom")) for e in s.expressions)
    assert twins > 0


def test_same_seed_same_scene_and_pixels():
    a, b, c = generate_scene(42), generate_scene(42), generate_scene(43)
    assert (a.width, a.height, a.objects, a.caption, a.expressions) == (
        b.width,
        b.height,
        b.objects,
        b.caption,
        b.expressions,
    )
    assert a.image.mode == "RGB" and a.image.size == (a.width, a.height)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.width, a.height, a.objects) != (c.width, c.height, c.objects)
    assert generate_scene(42, render_image=False).objects == a.objects


def test_scene_to_record():
    scene = generate_scene(7, render_image=False)
    record = scene_to_record(scene, "images/000007.png")
    assert record["image"] == "images/000007.png"
    assert (record["width"], record["height"], record["caption"]) == (
        scene.width,
        scene.height,
        scene.caption,
    )
    assert [r["box"] for r in record["regions"]] == [[float(v) for v in o.box] for o in scene.objects]
    assert [r["expression"] for r in record["regions"]] == scene.expressions
    json.dumps(record)


def resolve(expression: str, objects: list[ShapeObject]) -> list[ShapeObject]:
    """An independent reading of an expression: the objects it can mean."""
    words = expression.split()
    found = [
        o
        for o in objects
        if {o.size, o.colour, o.shape} >= set(words[1:]) & set(SHAPES + SIZES + tuple(COLOURS))
    ]
    if len(found) == 2 and words[-1] in ("left", "right", "top", "bottom"):
        axis = 0 if words[-1] in ("left", "right") else 1
        first = min(found, key=lambda o: o.centre[axis])
        found = [first] if words[-1] in ("left", "top") else [o for o in found if o is not first]
    return found


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**63))
def test_every_expression_picks_out_its_object(seed):
    scene = generate_scene(seed, render_image=False)
    for o, expression in zip(scene.objects, scene.expressions, strict=True):
        assert resolve(expression, scene.objects) == [o], (expression, scene.objects)

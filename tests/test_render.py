"""Annotated images (service/render.py): boxes on the right pixels of non-square and EXIF-rotated images, one
colour per region, readable labels; and `render=png` end to end through a real server's REST API."""

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from model.shapes import generate_scene
from service import render
from service.images import Limits

LIMITS = Limits(max_bytes=10_000_000, max_pixels=10_000_000)
WHITE = (255, 255, 255)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def px(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return im.getpixel((x, y))


def assert_outline(im: Image.Image, box, colour, clear=("left", "right", "above", "below")):
    """The outline's outer edge runs along the box's first and last pixel rows and columns; the middle and
    the pixels just outside on the `clear` sides (those without a label) are untouched."""
    c0, r0, c1, r1 = render.pixel_box(box, *im.size)
    mid_x, mid_y = (c0 + c1) // 2, (r0 + r1) // 2
    for x, y in [(c0, mid_y), (c1, mid_y), (mid_x, r1), (mid_x, r0), (c0, r1), (c1, r1)]:
        assert px(im, x, y) == colour, (x, y)
    assert px(im, mid_x, mid_y) != colour
    outside = {"left": (c0 - 1, mid_y), "right": (c1 + 1, mid_y), "above": (mid_x, r0 - 1), "below": (mid_x, r1 + 1)}
    for side in clear:
        x, y = outside[side]
        if 0 <= x < im.width and 0 <= y < im.height:
            assert px(im, x, y) != colour, (side, x, y)


@pytest.mark.parametrize("size", [(300, 120), (90, 260)])
def test_box_on_its_pixels_in_non_square_images(size):
    w, h = size
    box = [0.2 * w, 0.4 * h, 0.7 * w, 0.9 * h]  # low enough that the label goes above it
    out = render.annotate(Image.new("RGB", size, WHITE), "refer", {"expression": "the thing", "box": box})
    assert out.size == size
    assert_outline(out, box, render.PALETTE[0], clear=("left", "right", "below"))
    c0, r0, c1, _ = render.pixel_box(box, w, h)
    assert (c0, r0, c1) == (round(0.2 * w), round(0.4 * h), round(0.7 * w) - 1)
    # the label: a tag of the box's colour right above it, with text in a contrasting ink
    tag = np.asarray(out.crop((c0, max(0, r0 - 16), min(w, c0 + 40), r0)))
    assert (tag == render.PALETTE[0]).all(-1).mean() > 0.4
    assert (tag == render._ink(render.PALETTE[0])).all(-1).any()


def test_pixel_box_is_the_exclusive_end_convention():
    # shapes-world boxes are [x0, y0, x1, y1) in pixels: a 10-pixel object at 5 covers columns 5..14
    assert render.pixel_box([5, 5, 15, 15], 100, 100) == (5, 5, 14, 14)
    assert render.pixel_box([-20, -5, 300, 40.4], 100, 50) == (0, 0, 99, 39)   # clipped to the image
    assert render.pixel_box([200, 0, 300, 10], 100, 50) is None                  # nothing inside
    assert render.pixel_box([3.0, 3.0, 3.2, 3.2], 10, 10) == (3, 3, 3, 3)         # at least one pixel
    assert render.pixel_box([float("nan"), 0, 1, 1], 10, 10) is None


def test_boxes_follow_exif_orientation():
    """A landscape JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to display) is
    drawn on upright: the picture has the displayed size and the box lands in displayed coordinates."""
    stored = Image.new("RGB", (240, 160), (200, 200, 200))
    stored.paste((0, 0, 0), (0, 0, 40, 30))  # a marker at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif)
    box = [20, 150, 140, 230]  # in the displayed 160 x 240 image
    out = Image.open(io.BytesIO(render.render_png(data, "refer", {"expression": "x", "box": box}, LIMITS)))
    assert out.size == (160, 240)
    assert_outline(out.convert("RGB"), box, render.PALETTE[0], clear=("left", "right", "below"))
    # rotated clockwise, the stored top-left marker is now at the top right
    assert sum(px(out, 150, 10)) < 60 and sum(px(out, 10, 10)) > 500


def test_regions_get_distinct_colours_and_numbered_labels():
    scene = generate_scene(0)
    regions = [{"box": list(o.box), "text": e, "score": -1.0} for o, e in zip(scene.objects, scene.expressions,
                                                                                strict=True)]
    assert len(regions) == 4
    assert [label for _, label in render.labelled_boxes("ground", {"regions": regions})][:2] == \
        [f"1. {scene.expressions[0]}", f"2. {scene.expressions[1]}"]
    out = render.annotate(scene.image, "ground", {"regions": regions})
    assert len({render.colour(i) for i in range(len(regions))}) == len(regions)
    for i, r in enumerate(regions):
        c0, r0, c1, r1 = render.pixel_box(r["box"], *out.size)
        # the bottom edge (labels sit above a box or below it, never on another's bottom edge in this scene)
        assert px(out, (c0 + c1) // 2, r1) == render.colour(i) or px(out, c0, (r0 + r1) // 2) == render.colour(i)


def test_caption_band_and_png_metadata():
    scene = generate_scene(2)
    result = {"caption": scene.caption, "score": -0.5}
    data = render.to_png(render.annotate(scene.image, "caption", result), "caption", result)
    out = Image.open(io.BytesIO(data))
    assert out.width == scene.width and out.height > scene.height
    band = np.asarray(out.convert("L"))[scene.height:]
    assert (band < 80).any() and (band == 255).mean() > 0.5  # dark text on white
    assert out.text["locca:task"] == "caption" and json.loads(out.text["locca:result"]) == result
    with pytest.raises(ValueError):
        render.labelled_boxes("segment", {})


# --- end to end: render=png through the REST API -------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundled_server):  # tests/conftest.py: images over 1 M pixels are 413 there
    return bundled_server


def test_render_png_over_rest(server):
    scene = generate_scene(3)
    image = encode(scene.image)
    form = {"expression": scene.expressions[0]}
    plain = httpx.post(server.url + "/v1/refer", files={"image": image}, data=form, timeout=30)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"  # the default
    r = httpx.post(server.url + "/v1/refer?render=png", files={"image": image}, data=form, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert json.loads(r.headers["x-locca-result"]) == plain.json()
    out = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert out.size == scene.image.size
    assert_outline(out, plain.json()["box"], render.PALETTE[0], clear=("left", "right"))
    # every pixel away from the drawing is the image's own
    c0, r0, c1, r1 = render.pixel_box(plain.json()["box"], *out.size)
    a, b = np.asarray(out).copy(), np.asarray(scene.image).copy()
    a[max(0, r0 - 40):r1 + 40, :] = b[max(0, r0 - 40):r1 + 40, :] = 0
    assert (a == b).all()


def test_render_field_in_json_body_with_exif_rotated_image(server):
    import base64

    stored = Image.new("RGB", (200, 120), (220, 220, 220))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display: 120 x 200
    body = {"image": base64.b64encode(encode(stored, "JPEG", quality=95, exif=exif)).decode(), "render": "png",
            "box": [10, 100, 90, 180]}
    r = httpx.post(server.url + "/v1/ground", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    out = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert out.size == (120, 200)
    (region,) = json.loads(r.headers["x-locca-result"])["regions"]
    assert region["box"] == [10, 100, 90, 180]
    assert_outline(out, region["box"], render.PALETTE[0], clear=("left", "right", "below"))


def test_render_errors_and_limits(server):
    image = encode(generate_scene(1).image)
    r = httpx.post(server.url + "/v1/ground?render=gif", files={"image": image}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.post(server.url + "/v1/caption", files={"image": image}, data={"render": "svg"}, timeout=30)
    assert r.status_code == 422
    big = encode(Image.new("RGB", (1200, 1000), WHITE))  # over this server's max_image_pixels
    r = httpx.post(server.url + "/v1/refer?render=png", files={"image": big}, data={"expression": "x"}, timeout=30)
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"

"""Request images: bytes -> RGB pixels under explicit limits (boxes are checked with the request, model/requests.py).

Only the formats of the contract are ever opened (Pillow's other plugins, some of which shell out or parse
exotic containers, are never tried); the pixel count is checked from the header before anything is decoded.
Runs in a thread pool, off the event loop (service/engine.py).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.image import normalize, resize

from .errors import BadImage, TooLarge

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int


def decode(data: bytes, limits: Limits) -> Image.Image:
    """Encoded image -> RGB image as displayed: EXIF orientation applied, first frame, alpha over white.

    Every failure is the client's: over a limit is TooLarge, anything else BadImage. Pillow documents no
    closed set of exceptions for malformed files (its plugins parse with struct, index tables, convert modes),
    and a crafted file must never become a 500, so anything raised here is the image's fault.
    """
    return decode_opened(open_image(data, limits))


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """The first half of `decode`: the image's header read (its format, its size), the limits checked, no pixel
    decoded yet: cheap enough for the event loop, which then knows what decoding the rest will cost."""
    if not data:
        raise BadImage("the image is empty")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"the image has {len(data)} bytes; the limit is {limits.max_bytes}")
    with _clients_fault():
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = im.size
        if w * h > limits.max_pixels:
            raise TooLarge(f"the image has {w}x{h} pixels; the limit is {limits.max_pixels} pixels")
        return im


def decode_opened(im: Image.Image) -> Image.Image:
    """The second half: an `open_image` image's pixels, as `decode` describes."""
    with _clients_fault():
        im.load()  # the first frame of an animation or a multi-page TIFF
        try:
            ImageOps.exif_transpose(im, in_place=True)  # (a copy of the whole image otherwise)
        except Exception:  # noqa: BLE001 (a broken EXIF block: keep the pixels as stored)
            pass
        return to_rgb(im)


@contextlib.contextmanager
def _clients_fault():
    """Whatever Pillow raises on an image is the client's error (see `decode`); Pillow's own bomb check (a
    warning at MAX_IMAGE_PIXELS) becomes an error (ours comes first anyway)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as e:
        raise TooLarge(f"the image is too large to decode: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image in an accepted format ({', '.join(FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 (truncated, corrupt or unconvertible: see `decode`)
        raise BadImage(f"the image cannot be decoded: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB. 16- and 32-bit integer images are scaled from 0..65535 (not clipped at 255);
    transparent pixels become white rather than whatever colour they happen to store."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode != "F" and (im.mode != "I" or a.max(initial=0) > 255):
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # (convert to its own mode copies the whole image)


def load(data: bytes, limits: Limits, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> the model's pixels (3, S, S) float32, and (width, height) of the image as displayed."""
    rgb, size = load_rgb(data, limits, image_size)
    return normalize(rgb), size


def load_rgb(data: bytes, limits: Limits, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> the model's image resized, (S, S, 3) uint8 (model/image.py: `normalize` makes it the model's
    pixels), and (width, height) of the image as displayed."""
    return load_opened(open_image(data, limits), image_size)


def load_opened(im: Image.Image, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_rgb` of an `open_image` image."""
    im = decode_opened(im)
    return resize(im, image_size), im.size

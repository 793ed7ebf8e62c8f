"""Image preprocessing shared by training, evaluation, export checks and the server."""

from __future__ import annotations

import numpy as np
from PIL import Image


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> (3, size, size) float32 in [-1, 1].

    The image is resized to a square without keeping its aspect ratio: boxes are normalised by the image's
    own width and height (the codec), so a stretched image and its normalised boxes stay consistent, and
    every pixel of the input is used.
    """
    return normalize(resize(image, size))


def resize(image: Image.Image, size: int) -> np.ndarray:
    """The first half of `preprocess`: (size, size, 3) uint8, the image as the model sees it. A quarter of the
    bytes of the model input, from which that follows exactly: what the server sends its workers."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # (convert to its own mode would copy it)
    return np.asarray(rgb.resize((size, size), Image.BILINEAR))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """The second half: (S, S, 3) uint8 -> (3, S, S) float32 in [-1, 1], big_vision's value_range(-1, 1)."""
    x = rgb.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))

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
    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0  # (S, S, 3), big_vision's value_range(-1, 1)
    return np.ascontiguousarray(x.transpose(2, 0, 1))

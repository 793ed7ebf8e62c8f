"""Offline prediction on PIL images: requests (model/requests.py) in, results out, through the engine core.

Used by `locca eval`, `locca predict` and the tests. Every request of a call goes into one batch (the core's
ALL_AT_ONCE policy) and each image is encoded once, however many requests ask about it; the server's worker
drives the same core with its own policy and clock. Boxes go in and come out in pixels of the image as given.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .core import EngineCore
from .decoding import DecodingOptions
from .image import preprocess
from .regions import RegionOptions, iou  # noqa: F401 (iou: the callers')
from .requests import Request, Result
from .scheduler import ALL_AT_ONCE
from .tasks import Tasks


class Predictor:
    def __init__(self, inference, tasks: Tasks, options: DecodingOptions = DecodingOptions(),
                 region_options: RegionOptions = RegionOptions()):
        self.core = EngineCore(inference, tasks, ALL_AT_ONCE, options, region_options)
        self.inference, self.tasks, self.image_size = inference, tasks, inference.cfg.image_size

    def run(self, images: Sequence[Image.Image], requests: Sequence[tuple[int, Request]]) -> list[Result]:
        """Answer each (index into `images`, request) pair; one Result per pair, in order. Raises the first
        request's RequestError, having queued nothing, when one cannot be answered as asked."""
        pixels = [preprocess(im, self.image_size) for im in images]
        ids = []
        try:
            for i, request in requests:
                ids.append(self.core.add(request, pixels[i], images[i].size))
        except Exception:
            for id in ids:
                self.core.abort(id)
            raise
        done = {f.id: f for f in self.core.run()}
        return [done[id].result for id in ids]

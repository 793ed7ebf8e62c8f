"""Answer one image in this process as the server answers it: what `locca predict` (locca/predict.py) runs
without --url, and what docs/make_examples.py and the tests compare a server's answers with.

The model in this process answers with the server's own prompts, searches and parsing (model/predictor.py), so
`locca predict` gives the same answer here as through a running server for the same model.
"""

from __future__ import annotations

from . import images
from .schemas import MAX_REGIONS, to_json

# A local file is the user's own: limits only against decompression bombs, well above the server's defaults.
LOCAL_LIMITS = images.Limits(max_bytes=1 << 30, max_pixels=200_000_000)


def load_predictor(model: str, backend: str = "torch", device: str = "cpu"):
    """The model in this process, behind model/predictor.py's Predictor (the server's workers build theirs
    the same way: service/worker.py)."""
    from export.backends import load_inference  # noqa: PLC0415 (torch only when the model runs here)
    from model.predictor import Predictor  # noqa: PLC0415

    loaded = load_inference(model, backend, device)
    return Predictor(loaded.inference, loaded.tasks)


def answer(predictor, image, task: str, expression: str | None = None, box: list[float] | None = None,
           max_regions: int = MAX_REGIONS, max_new_tokens: int | None = None, grounded: bool = False) -> dict:
    """The Predictor's Result for one API call (caption, refer, ground), as the server answers it in JSON."""
    from model.requests import Request  # noqa: PLC0415

    if task == "caption":
        request = Request("caption", grounded=grounded, max_new_tokens=max_new_tokens)
    elif task == "refer":
        request = Request("refer", expression=expression)
    else:
        request = Request("ground", max_regions=max_regions) if box is None else Request("describe", box=tuple(box))
    (result,) = predictor.run([image], [(0, request)])
    return to_json(result, expression)

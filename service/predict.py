"""Answer one image in this process as the server answers it: what `locca predict` (locca/predict.py) runs
without --url, and what docs/make_examples.py and the tests compare a server's answers with.

The model in this process answers with the server's own prompts, searches and parsing (model/predictor.py), so
`locca predict` gives the same answer here as through a running server for the same model.
"""

from __future__ import annotations

from . import images
from .schemas import MAX_REGIONS

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
    """Predictor.run's answer shaped as the server's (service/jobs.py Tasker.answer)."""
    from model.predictor import Ask  # noqa: PLC0415

    if task == "caption":
        (out,) = predictor.run([image], [Ask(0, "grounded" if grounded else "caption", max_new_tokens=max_new_tokens)])
        return {"caption": out["text"], "score": out["score"], **({"phrases": out["phrases"]} if grounded else {})}
    if task == "refer":
        (out,) = predictor.run([image], [Ask(0, "refer", expression=expression)])
        return {"expression": expression, "box": out["box"], "score": out["score"]}
    if box is None:
        (out,) = predictor.run([image], [Ask(0, "propose", max_regions=max_regions)])
        return out
    box = images.check_box(box, *image.size)
    (out,) = predictor.run([image], [Ask(0, "describe", box=box)])
    return {"regions": [{"box": box, "text": out["text"], "score": out["score"]}]}

"""What the server asks of a worker (`Task`), turned into a search, and a finished search into an answer.

Searches, region finding and parsing are model/predictor.py's: the server answers exactly what `Predictor.run`
answers for the same image and question.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.predictor import DEFAULT_REGIONS, Ask, Predictor

from .errors import BadRequest

KINDS = ("caption", "grounded", "refer", "describe", "propose")


@dataclass(frozen=True)
class Task:
    kind: str                              # caption | grounded (caption + phrase boxes) | refer
                                           # | describe (ground with a box) | propose (ground without one)
    size: tuple[int, int]                  # (width, height) of the image as displayed
    expression: str | None = None          # refer
    box: tuple[float, ...] | None = None   # describe, in pixels of the image as displayed
    max_new_tokens: int | None = None
    max_regions: int = DEFAULT_REGIONS     # propose

    @property
    def ask(self) -> Ask:
        return Ask(0, self.kind, self.expression, self.box, self.max_new_tokens, self.max_regions)


class Tasker:
    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def search(self, task: Task):
        if task.kind not in KINDS:
            raise BadRequest(f"unknown task {task.kind!r}")
        try:
            return self.predictor.search(task.ask, task.size)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def answer(self, task: Task, search) -> dict:
        out = self.predictor.answer(task.ask, search, task.size)
        if task.kind == "propose":
            return out
        if task.kind in ("caption", "grounded"):
            return {"caption": out["text"], "score": out["score"], **({"phrases": out["phrases"]}
                                                                         if task.kind == "grounded" else {})}
        if task.kind == "refer":
            return {"box": out["box"], "score": out["score"]}
        return {"regions": [{"box": list(task.box), "text": out["text"], "score": out["score"]}]}

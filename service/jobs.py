"""What the server asks of a worker (`Task`), turned into a beam search, and a finished search into an answer.

Prompts, search widths, region de-duplication and parsing are model/predictor.py's: the server answers
exactly what `Predictor.run` answers for the same image and question.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.decoding import BeamSearch, DecodingOptions, Grammar, budget_for
from model.predictor import Ask, Predictor

from .errors import BadRequest

KINDS = ("caption", "refer", "describe", "propose")


@dataclass(frozen=True)
class Task:
    kind: str                              # caption | refer | describe (ground with a box) | propose
    size: tuple[int, int]                  # (width, height) of the image as displayed
    expression: str | None = None          # refer
    box: tuple[float, ...] | None = None   # describe, in pixels of the image as displayed
    max_new_tokens: int | None = None
    max_regions: int = 5                   # propose


class Tasker:
    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.grammar = Grammar(predictor.tasks.tok)
        self.max_seq_len = predictor.inference.cfg.max_seq_len

    def options(self, kind: str) -> DecodingOptions:
        """The search Predictor.run uses for the task: its options, or `propose_beam` beams for proposals."""
        p = self.predictor
        if kind == "propose":
            return DecodingOptions(beam_size=p.propose_beam, num_return=p.propose_beam,
                                   max_new_tokens=p.options.max_new_tokens)
        return p.options

    def search(self, task: Task) -> BeamSearch:
        if task.kind not in KINDS:
            raise BadRequest(f"unknown task {task.kind!r}")
        ask = Ask(0, task.kind, task.expression, task.box, task.max_new_tokens, task.max_regions)
        query = self.predictor.query(ask, task.size)
        opts = self.options(task.kind)
        try:
            budget = budget_for(query, opts, self.max_seq_len)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return BeamSearch(query, budget, opts.beam_size, self.grammar, opts.length_penalty)

    def answer(self, task: Task, search: BeamSearch) -> dict:
        p = self.predictor
        hyps = search.best(self.options(task.kind).num_return)
        if task.kind == "propose":
            return {"regions": p.regions(hyps, task.size, task.max_regions)}
        ask = Ask(0, task.kind, task.expression, task.box, task.max_new_tokens, task.max_regions)
        out = p.answer(ask, hyps[0], task.size)
        if task.kind == "caption":
            return {"caption": out["text"], "score": out["score"]}
        if task.kind == "refer":
            return {"box": out["box"], "score": out["score"]}
        return {"regions": [{"box": list(task.box), "text": out["text"], "score": out["score"]}]}

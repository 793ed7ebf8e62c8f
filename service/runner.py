"""The model call of a worker step: runs a scheduler batch through the inference interface
(model/inference.py: encode / start / step / select / merge) and keeps the running KV-cache state.

Nothing here decides anything: the scheduler (service/scheduler.py) chose the rows, this only executes.
"""

from __future__ import annotations

import numpy as np

from model.decoding import prefill

from .scheduler import Decode, Prefill


class Runner:
    def __init__(self, inference, pad_id: int):
        self.inference, self.pad_id = inference, pad_id
        self.state = None  # the backend's DecodeState of the running rows

    def __call__(self, batch: Prefill | Decode) -> np.ndarray:
        """Returns float32 logits: (B, V) after each prompt for a Prefill, (R, V) for a Decode."""
        inf = self.inference
        if isinstance(batch, Prefill):
            cross = inf.encode(batch.pixels)
            new, last = prefill(inf, cross, batch.queries, self.pad_id)
            if not batch.base and self.state is not None:
                # nothing runs: keep no rows of the old state but its arrays, whose spare rows the new rows
                # join (on CPU a state grows by new arrays; a region search's rows would make them anew for
                # every request that comes alone)
                inf.select(self.state, np.zeros(0, dtype=np.int64))
            self.state = inf.merge(self.state, new) if self.state is not None else new
            return last
        inf.select(self.state, batch.src)
        return inf.step(self.state, batch.tokens, batch.positions)[:, 0]

    def reset(self) -> None:
        self.state = None

"""Which shapes-world scenes are trained on and which are held out: disjoint ranges of seeds.

Training scene i is generate_scene(TRAIN_SEED_OFFSET + i) (model/train.py; a config's data_start moves it
along); evaluation (model/evaluate.py) draws scenes from EVAL_SEED_OFFSET on, which training never reaches.
Both import this module, so neither imports the other for its seeds.
"""

from __future__ import annotations

from .shapes import Scene, generate_scene

TRAIN_SEED_OFFSET = 0              # training scene i is generate_scene(i)
EVAL_SEED_OFFSET = 1_000_000_000   # held-out scenes: seeds from here on, never reached by training
CROWDED_OFFSET = 500_000_000       # added to the held-out seeds for the crowded scenes (another range of seeds)


def heldout_scenes(n: int, offset: int | None = None, count: int | None = None) -> list[Scene]:
    """n held-out scenes; count: that many objects each (crowded scenes, from seeds CROWDED_OFFSET further on)."""
    start = EVAL_SEED_OFFSET if offset is None else offset
    if count is not None:
        start += CROWDED_OFFSET
    return [generate_scene(start + i, count=count) for i in range(n)]

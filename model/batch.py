"""Raw examples -> training tensors: the three LocCa targets of every image, from one encoder pass.

An example is a dict with `image` (PIL), `width`, `height`, `caption` (str or None), `regions`
([{"box": [x0, y0, x1, y1], "expression": str}]) and `index` (its position in the data stream). The region
used by ARef and the one used by GCap are drawn with a generator seeded by (seed, index), so a batch is a
pure function of the examples: workers, ranks and resumed runs all build the same tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from .image import preprocess
from .tasks import Tasks

TASK_NAMES = ("Cap", "ARef", "GCap")


class Collator:
    def __init__(self, tasks: Tasks, image_size: int, max_len: int, seed: int = 0):
        self.tasks, self.image_size, self.max_len, self.seed = tasks, image_size, max_len, seed

    def targets(self, ex: dict) -> list[list[int]]:
        """The Cap, ARef and GCap sequences of one example ([] where the example has no such target)."""
        t, w, h = self.tasks, ex["width"], ex["height"]
        rng = np.random.default_rng([self.seed, ex["index"]])
        seqs = [t.cap_sequence(ex["caption"]) if ex.get("caption") else []]
        regions = ex["regions"]
        if regions:
            a, g = regions[rng.integers(len(regions))], regions[rng.integers(len(regions))]
            seqs += [t.aref_sequence(a["expression"], a["box"], w, h), t.gcap_sequence(g["expression"], g["box"], w, h)]
        else:
            seqs += [[], []]
        return [s[: self.max_len] for s in seqs]  # over-long texts are cut (and lose their <eos>)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [self.targets(ex) for ex in examples]
        T = max(len(s) for per in seqs for s in per)
        tokens = torch.full((len(examples), 3, T), self.tasks.tok.pad_id, dtype=torch.long)
        for b, per in enumerate(seqs):
            for k, s in enumerate(per):
                tokens[b, k, : len(s)] = torch.tensor(s, dtype=torch.long)
        pixels = torch.from_numpy(np.stack([preprocess(ex["image"], self.image_size) for ex in examples]))
        return {"pixels": pixels, "tokens": tokens, "index": torch.tensor([ex["index"] for ex in examples])}

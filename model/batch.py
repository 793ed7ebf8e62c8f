"""Raw examples -> training tensors: the three LocCa targets of every image, from one encoder pass.

An example is a dict with `image` (PIL), `width`, `height`, `caption` (str or None), `regions`
([{"box": [x0, y0, x1, y1], "expression": str}]) and `index` (its position in the data stream). Each image
gives K = 1 + 2R target sequences: its caption, then R ARef and R GCap targets on distinct regions (R =
`regions_per_image`; fewer when the image has fewer regions, the rest left empty). Regions are drawn with a
generator seeded by (seed, index), so a batch is a pure function of the examples: workers, ranks and resumed
runs all build the same tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from .image import preprocess
from .tasks import Tasks

TASK_NAMES = ("Cap", "ARef", "GCap")


def task_layout(regions_per_image: int) -> list[int]:
    """Task index (0 Cap, 1 ARef, 2 GCap) of each of the K target sequences of an image."""
    return [0] + [1] * regions_per_image + [2] * regions_per_image


class Collator:
    def __init__(self, tasks: Tasks, image_size: int, max_len: int, seed: int = 0, regions_per_image: int = 1):
        self.tasks, self.image_size, self.max_len, self.seed = tasks, image_size, max_len, seed
        self.regions = regions_per_image

    def targets(self, ex: dict) -> list[list[int]]:
        """The Cap, ARef... and GCap... sequences of one example ([] where the example has no such target)."""
        t, w, h, R = self.tasks, ex["width"], ex["height"], self.regions
        rng = np.random.default_rng([self.seed, ex["index"]])
        regions = ex["regions"]
        seqs = [t.cap_sequence(ex["caption"]) if ex.get("caption") else []]
        if R == 1 and regions:  # one region each, drawn independently for ARef and GCap
            aref, gcap = [regions[rng.integers(len(regions))]], [regions[rng.integers(len(regions))]]
        else:
            aref = [regions[i] for i in rng.permutation(len(regions))[:R]]
            gcap = [regions[i] for i in rng.permutation(len(regions))[:R]]
        seqs += [t.aref_sequence(r["expression"], r["box"], w, h) for r in aref] + [[]] * (R - len(aref))
        seqs += [t.gcap_sequence(r["expression"], r["box"], w, h) for r in gcap] + [[]] * (R - len(gcap))
        return [s[: self.max_len] for s in seqs]  # over-long texts are cut (and lose their <eos>)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [self.targets(ex) for ex in examples]
        T = max(len(s) for per in seqs for s in per)
        tokens = torch.full((len(examples), len(seqs[0]), T), self.tasks.tok.pad_id, dtype=torch.long)
        for b, per in enumerate(seqs):
            for k, s in enumerate(per):
                tokens[b, k, : len(s)] = torch.tensor(s, dtype=torch.long)
        pixels = torch.from_numpy(np.stack([preprocess(ex["image"], self.image_size) for ex in examples]))
        return {"pixels": pixels, "tokens": tokens, "index": torch.tensor([ex["index"] for ex in examples])}

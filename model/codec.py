"""The box codec: the only code that knows how a box becomes location tokens and back.

    pixel box [x0, y0, x1, y1]  <->  normalised [0, 1] box  <->  four bin indices  <->  token ids

Conventions (shapes-world spec, following PaliGemma): boxes are [x0, y0, x1, y1] in pixels with x1, y1
exclusive; coordinates are normalised by the image width / height; the four tokens are written in
`order` ("yxyx" = y0 x0 y1 x1 by default); `bins` location tokens <loc0000>..<loc{bins-1}>.

Rounding:
- "floor" (default): bin k covers [k/bins, (k+1)/bins) and decodes to its centre (k + 0.5)/bins;
  coordinate 1.0 falls in the last bin. Round-trip error <= 0.5/bins of the image side.
- "round": k = round(c * (bins - 1)), decodes to k / (bins - 1): 0 and 1 are exact;
  round-trip error <= 0.5/(bins - 1).
Either way the error is at most half a bin; out-of-range coordinates are clipped to the image first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import BoxConfig

# index into [x0, y0, x1, y1] for each written position
_PERMUTATION = {"yxyx": (1, 0, 3, 2), "xyxy": (0, 1, 2, 3)}


class BoxCodec:
    def __init__(self, cfg: BoxConfig, loc_offset: int = 0):
        """loc_offset: token id of <loc0000>; the location tokens are contiguous ids."""
        self.cfg = cfg
        self.bins = cfg.bins
        self.loc_offset = loc_offset
        self.perm = _PERMUTATION[cfg.order]

    # --- normalised <-> bins -------------------------------------------------------------
    def to_bins(self, norm_box: Sequence[float]) -> list[int]:
        """[x0, y0, x1, y1] in [0, 1] (clipped) -> four bin indices in x0 y0 x1 y1 order."""
        c = np.clip(np.asarray(norm_box, dtype=np.float64), 0.0, 1.0)
        if self.cfg.rounding == "floor":
            k = np.minimum(np.floor(c * self.bins), self.bins - 1)
        else:
            k = np.rint(c * (self.bins - 1))
        return [int(v) for v in k]

    def from_bins(self, bins: Sequence[int]) -> list[float]:
        k = np.asarray(bins, dtype=np.float64)
        if self.cfg.rounding == "floor":
            return [float(v) for v in (k + 0.5) / self.bins]
        return [float(v) for v in k / (self.bins - 1)]

    @property
    def half_bin(self) -> float:
        """Largest round-trip error, as a fraction of the image side."""
        return 0.5 / self.bins if self.cfg.rounding == "floor" else 0.5 / (self.bins - 1)

    # --- pixels <-> normalised ---------------------------------------------------------------
    @staticmethod
    def normalise(box: Sequence[float], width: float, height: float) -> list[float]:
        x0, y0, x1, y1 = box
        return [x0 / width, y0 / height, x1 / width, y1 / height]

    @staticmethod
    def denormalise(norm_box: Sequence[float], width: float, height: float) -> list[float]:
        x0, y0, x1, y1 = norm_box
        return [float(x0 * width), float(y0 * height), float(x1 * width), float(y1 * height)]

    # --- tokens ------------------------------------------------------------------------------
    def encode(self, box: Sequence[float], width: float, height: float) -> list[int]:
        """Pixel box -> four token ids, in the configured order."""
        k = self.to_bins(self.normalise(box, width, height))
        return [self.loc_offset + k[i] for i in self.perm]

    def decode(self, tokens: Sequence[int], width: float, height: float) -> list[float]:
        """Four token ids in the configured order -> pixel box [x0, y0, x1, y1]."""
        if len(tokens) != 4 or not all(self.is_loc(t) for t in tokens):
            raise ValueError(f"a box is four location tokens, got {list(tokens)}")
        k = [0] * 4
        for pos, i in enumerate(self.perm):
            k[i] = int(tokens[pos]) - self.loc_offset
        return self.denormalise(self.from_bins(k), width, height)

    def is_loc(self, token: int) -> bool:
        return self.loc_offset <= int(token) < self.loc_offset + self.bins

    def coordinate_slot(self, position: int) -> int:
        """Which of x0, y0, x1, y1 (0..3) the position-th written location token holds."""
        return self.perm[position]

"""Recipe study arm (issue 4, docs/recipe-study.md): 32 location bins instead of 64 (coarser boxes, an easier
classification; half a bin is 1/64 of the image side, still well inside IoU 0.5 for the smallest objects).

    locca train --config recipe_bins32 --out runs/study/bins32
"""

from model.config import BoxConfig
from model.configs.recipe_base import CONFIG as BASE

CONFIG = BASE.replace(box=BoxConfig(bins=32))

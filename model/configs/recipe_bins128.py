"""Recipe study arm (issue 4, docs/recipe-study.md): 128 location bins instead of 64 (one bin per input pixel).

    locca train --config recipe_bins128 --out runs/study/bins128
"""

from model.config import BoxConfig
from model.configs.recipe_base import CONFIG as BASE

CONFIG = BASE.replace(box=BoxConfig(bins=128))

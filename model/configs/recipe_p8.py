"""Recipe study arm (issue 4, docs/recipe-study.md): 96 px input, patch 8 (a 12x12 grid of 144 visual tokens
instead of 8x8 = 64 at 128 px / patch 16): finer positions for the decoder to point at.

    locca train --config recipe_p8 --out runs/study/p8
"""

from model.configs.recipe_base import CONFIG as BASE

CONFIG = BASE.replace(model=BASE.model.replace(image_size=96, patch_size=8))

"""Base of the localisation recipe study (issue 4; docs/recipe-study.md): every arm is this config plus one
`--set` change, trained for the same number of images and evaluated on the same 200 held-out scenes:

    locca train --config recipe_base --out runs/study/base
    locca train --config recipe_base --out runs/study/lr3e-3 --set lr=3e-3

The starting point is the long-run recipe (shapes_tiny_long) on a budget of 400 steps x 32 images.
"""

from model.configs.shapes_tiny_long import CONFIG as LONG

CONFIG = LONG.replace(steps=400, warmup_steps=50, precision="fp32", eval_every=0, eval_scenes=200,
                      ckpt_every=100, log_every=20)

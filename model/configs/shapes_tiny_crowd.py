"""Leg 6 of the default model (issue 16): the leg recipe, with a quarter of the scenes crowded (7 or 8 objects,
more than the spec's 6; their ARef and GCap targets only), so that proposals and descriptions hold up on images
with more objects than the model is judged on. It starts from the bundled default model (leg 5) and trains on
the stream after every scene the legs before it saw.

    locca train --config shapes_tiny_crowd --out runs/crowd --time-limit 65
    python scripts/make_bundle.py runs/crowd models/locca-tiny-shapes
    locca eval runs/crowd/checkpoint.safetensors --scenes 1000
"""

from model.configs.shapes_tiny_leg import CONFIG as LEG

CONFIG = LEG.replace(steps=2400, lr=3e-4, warmup_steps=100, data_start=409_600, crowd_prob=0.25)

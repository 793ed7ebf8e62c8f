"""One leg of the default model's long run (issue 4), a session's worth of CPU: it starts from the weights and
tokenizer of the bundled default model and trains on with the long-run recipe, with a fresh warm-up and a
cosine decay that ends inside the leg. Run directories do not outlive a session here, so the committed bundle
is the run's state between legs: a leg that evaluates better than the bundle replaces it, and the next leg
starts from that (models/locca-tiny-shapes/MODEL_CARD.md lists the legs).

    locca train --config shapes_tiny_leg --out runs/leg --time-limit 70
    locca eval runs/leg/checkpoint.safetensors --scenes 1000 --json runs/leg/eval.json

Scenes: each leg starts its part of the endless training stream after the scenes of the legs before it
(`data_start`), so no leg repeats another's. Legs 1-5 (2026-11-29) used scenes 16,000-409,599; the next
starts after them. The bundled model's card lists the legs and their commands.
"""

from model.configs.shapes_tiny_long import CONFIG as LONG

CONFIG = LONG.replace(init_from="models/locca-tiny-shapes/checkpoint.safetensors", steps=2000, warmup_steps=100,
                      eval_every=0, ckpt_every=100, data_start=409_600)

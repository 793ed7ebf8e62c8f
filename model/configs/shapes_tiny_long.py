"""The long run of the default model (issue 4), resumed across sessions:

    locca train --config shapes_tiny_long --out runs/shapes_tiny_long

Starts from the interim recipe (shapes_tiny) and adds what should make localisation cheaper to learn on a CPU:
three ARef and three GCap targets per image instead of one (the encoder pass, the costly part, is shared, so an
image teaches ~3x more boxes for ~1.4x the compute), sin-cos initialised location embeddings, batch 32.
"""

from model.config import SIZES, BoxConfig, TrainConfig

CONFIG = TrainConfig(
    model=SIZES["tiny"],
    box=BoxConfig(bins=64),
    vocab_size=320,
    regions_per_image=3,
    steps=30_000,
    batch_size=32,
    lr=1e-3,
    warmup_steps=500,
    loc_sigma=1.0,
    loc_init="sincos",
    precision="fp32",  # bf16 autocast was slower for this model on the CPUs here (README, Training)
    num_workers=1,
    log_every=20,
    ckpt_every=250,
    eval_every=2000,
    eval_scenes=200,
)

"""The default model: tiny LocCa on the shapes world, CPU-trainable.

    locca train --config shapes_tiny --out runs/shapes_tiny

Departures from the paper's recipe, all for a 2-core CPU budget: a 4 M-parameter model at 128 px; 64 location
bins instead of 1024 (the spec allows fewer for a small model; half a bin is 1/128 of the image side);
fixed 2-D sin-cos position embeddings in the encoder and Gaussian soft targets over neighbouring location bins
(sigma 1 bin), which the first localisation runs (issue 4) found to matter most.
"""

from model.config import SIZES, BoxConfig, TrainConfig

CONFIG = TrainConfig(
    model=SIZES["tiny"],
    box=BoxConfig(bins=64),
    vocab_size=320,
    steps=2000,
    batch_size=16,
    lr=1e-3,
    warmup_steps=100,
    loc_sigma=1.0,
    precision="fp32",  # bf16 autocast was slower for this model on the CPUs here (README, Training)
    num_workers=1,
    log_every=20,
    ckpt_every=250,
    eval_every=1000,
    eval_scenes=200,
)

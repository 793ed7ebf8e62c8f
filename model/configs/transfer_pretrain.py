"""Pretraining arm of the encoder-transfer experiment (model/transfer.py, docs/transfer.md): the `micro` LocCa on
the shapes world. `locca transfer` trains it twice per seed, changing only the objective:

    LocCa     task_weights = (1, 1, 1)   Cap + ARef + GCap
    Cap-only  task_weights = (1, 0, 0)   Cap alone (the ARef and GCap targets are not even decoded)

Same scenes, same seed, same images and steps. The recipe is the default model's at a quarter of its pixels
(64 px, patch 8: the same 8x8 grid of visual tokens), with 32 location bins (Acc@0.5 ceiling 0.998), and a
few-objects-first curriculum, which the recipe study found to help localisation most.
"""

from model.config import SIZES, BoxConfig, TrainConfig

CONFIG = TrainConfig(
    model=SIZES["micro"],
    box=BoxConfig(bins=32),
    vocab_size=320,
    tokenizer_texts=5000,  # the shapes world's words are few; a run starts in seconds, not a minute
    steps=2500,
    batch_size=32,
    lr=2e-3,
    warmup_steps=100,
    loc_sigma=1.0,
    loc_init="sincos",
    regions_per_image=3,
    curriculum_steps=800,
    precision="fp32",
    num_workers=1,
    log_every=50,
    ckpt_every=500,
    eval_every=0,
)

"""A few steps of a very small model: the test suite's training, DDP and resume runs.

    locca train --config smoke --out runs/smoke
"""

from model.config import SIZES, BoxConfig, TrainConfig

CONFIG = TrainConfig(
    model=SIZES["tiny"].replace(image_size=64, enc_width=64, enc_depth=1, enc_heads=2, enc_mlp=128,
                                dec_width=64, dec_depth=1, dec_heads=2, dec_mlp=128, max_seq_len=40),
    box=BoxConfig(bins=32),
    vocab_size=300,
    tokenizer_texts=300,
    steps=8,
    batch_size=4,
    warmup_steps=2,
    num_workers=1,
    log_every=2,
    ckpt_every=4,
    eval_every=0,
    precision="fp32",
)

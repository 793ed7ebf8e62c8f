"""Configs for LocCa models, one dataclass per concern, validated on construction.

Named sizes live in one table, `SIZES`. The encoder dimensions are the standard ViT ones
(Dosovitskiy et al., ICLR 2021, Table 1; Zhai et al., "Scaling ViTs", for S). LocCa (Wan et al.,
NeurIPS 2024) pretrains ViT-B/16 and ViT-L/14 at 224 px with a 32,000-token SentencePiece
vocabulary and a transformer decoder taken from CapPa (Tschannen et al., NeurIPS 2023): 6 layers
with the encoder's width, heads and MLP size (big_vision `configs/proj/cappa/pretrain.py`:
`decoder_num_layers = 6`, the other decoder dims "0 = same as the encoder"; 64 text tokens).
`tiny` is ours: the CPU default of this project, trained on the shapes world.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POSEMB_TYPES = ("learned", "sincos2d")
LOC_ORDERS = ("yxyx", "xyxy")  # yxyx = y0 x0 y1 x1 (PaliGemma, the spec's default)
LOC_ROUNDINGS = ("floor", "round")


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 224          # square input side, pixels
    patch_size: int = 16
    enc_width: int = 768           # D, encoder width
    enc_depth: int = 12
    enc_heads: int = 12
    enc_mlp: int = 3072
    enc_posemb: str = "learned"    # "learned" or "sincos2d" (fixed 2-D sin-cos, MAE / big_vision)
    dec_width: int = 768           # E, decoder width
    dec_depth: int = 6
    dec_heads: int = 12
    dec_mlp: int = 3072
    max_seq_len: int = 64          # decoder positions: prompt + generated tokens
    vocab_size: int = 33_054       # set from the tokenizer when a model is built for it
    dropout: float = 0.0

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "enc_width", "enc_depth", "enc_heads", "enc_mlp",
                  "dec_width", "dec_depth", "dec_heads", "dec_mlp", "max_seq_len", "vocab_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for w, h, name in ((self.enc_width, self.enc_heads, "enc"), (self.dec_width, self.dec_heads, "dec")):
            if w % h:
                raise ValueError(f"{name}_width {w} is not divisible by {name}_heads {h}")
        if self.enc_posemb not in POSEMB_TYPES:
            raise ValueError(f"enc_posemb must be one of {POSEMB_TYPES}, got {self.enc_posemb!r}")
        if self.enc_posemb == "sincos2d" and self.enc_width % 4:
            raise ValueError("sincos2d position embeddings need enc_width divisible by 4")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class BoxConfig:
    """How a box becomes location tokens (see model/codec.py, the only code that uses it)."""
    bins: int = 1024               # number of location tokens <loc0000>..<loc{bins-1}>
    order: str = "yxyx"
    rounding: str = "floor"        # floor: bin k covers [k/bins, (k+1)/bins), decodes to its centre

    def __post_init__(self):
        if not 2 <= self.bins <= 4096:
            raise ValueError(f"bins must be in [2, 4096], got {self.bins}")
        if self.order not in LOC_ORDERS:
            raise ValueError(f"order must be one of {LOC_ORDERS}, got {self.order!r}")
        if self.rounding not in LOC_ROUNDINGS:
            raise ValueError(f"rounding must be one of {LOC_ROUNDINGS}, got {self.rounding!r}")


def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{n} must be a positive integer, got {v!r}")


# Named sizes. vocab_size is a placeholder overwritten by the tokenizer the model is built for
# (32,000 text pieces + 1024 location tokens + specials for the paper's sizes).
SIZES: dict[str, ModelConfig] = {
    # ours: ~4 M parameters, CPU-trainable on the shapes world
    "tiny": ModelConfig(image_size=128, patch_size=16, enc_width=192, enc_depth=4, enc_heads=3, enc_mlp=768,
                        enc_posemb="sincos2d", dec_width=192, dec_depth=3, dec_heads=3, dec_mlp=768,
                        max_seq_len=48, vocab_size=1100),
    # smaller still: the encoder-transfer experiment's size (model/transfer.py), 10 runs in ~100 CPU minutes
    "micro": ModelConfig(image_size=64, patch_size=8, enc_width=128, enc_depth=3, enc_heads=4, enc_mlp=512,
                         enc_posemb="sincos2d", dec_width=128, dec_depth=2, dec_heads=4, dec_mlp=512,
                         max_seq_len=48, vocab_size=1100),
    "S/16": ModelConfig(enc_width=384, enc_depth=12, enc_heads=6, enc_mlp=1536,
                        dec_width=384, dec_depth=6, dec_heads=6, dec_mlp=1536),
    "B/16": ModelConfig(enc_width=768, enc_depth=12, enc_heads=12, enc_mlp=3072,
                        dec_width=768, dec_depth=6, dec_heads=12, dec_mlp=3072),
    "L/14": ModelConfig(patch_size=14, enc_width=1024, enc_depth=24, enc_heads=16, enc_mlp=4096,
                        dec_width=1024, dec_depth=6, dec_heads=16, dec_mlp=4096),
}
# Parameter counts of the paper's encoders, for the README table (ViT paper, Table 1; S from
# "How to train your ViT" / big_vision): 22 M, 86 M, 304 M.
PAPER_ENCODER_PARAMS = {"S/16": 22e6, "B/16": 86e6, "L/14": 304e6}


def get_size(name: str, **overrides) -> ModelConfig:
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}")
    return SIZES[name].replace(**overrides) if overrides else SIZES[name]





PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Configs are code: one small file per experiment in model/configs/."""
    model: ModelConfig = SIZES["tiny"]
    box: BoxConfig = BoxConfig()
    vocab_size: int = 512              # specials + byte-level BPE pieces, trained at the start of a run
    data: str = "shapes"               # "shapes" (generated, endless) or a JSONL records file (model/records.py)
    tokenizer_texts: int = 20_000      # examples whose texts train the tokenizer
    seed: int = 0
    steps: int = 10_000
    batch_size: int = 32               # images per step, over all DDP ranks (each image gives 3 targets)
    lr: float = 1e-3
    warmup_steps: int = 500            # linear warm-up, then cosine decay to min_lr
    min_lr: float = 1e-5
    weight_decay: float = 0.05         # AdamW, on weight matrices only
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Cap, ARef, GCap
    regions_per_image: int = 1         # ARef and GCap targets per image (distinct regions; all share one encoder pass)
    loc_sigma: float = 0.0             # soft location targets: Gaussian over neighbouring bins (in bins); 0 = one-hot
    loc_init: str = "random"           # "sincos": location-token embeddings start as sin-cos codes of the bin index
    cap_parallel_prob: float = 0.0     # CapPa parallel prediction: share of captions decoded from <mask> inputs
    data_start: int = 0                # shapes data: index of the first scene (a later leg starts after earlier ones)
    curriculum_steps: int = 0          # shapes data: the most objects per scene grows from 1 to all over these steps
    crowd_prob: float = 0.0            # shapes data: share of scenes with more objects than the spec's 6 (ARef and
    crowd_objects: tuple[int, ...] = (7, 8)  # GCap targets only), so /ground copes with crowded images (issue 16)
    init_from: str | None = None       # start from this checkpoint's weights and tokenizer (fine-tune, or go on
                                       # with a run whose optimizer state is gone); model and box configs must match
    init_encoder_from: str | None = None  # copy only the encoder's weights from this checkpoint; the decoder, its
                                       # cross-attention and the token and position embeddings start fresh
    freeze_encoder: bool = False       # the encoder gets no gradients, stays in eval mode and is not optimised
                                       # (a frozen-encoder probe, model/transfer.py)
    precision: str = "auto"            # auto: bf16 autocast where the hardware has bf16 units, else fp32
    num_workers: int = 2               # data-loading processes per rank
    log_every: int = 20
    ckpt_every: int = 250
    eval_every: int = 1000             # 0 = only at the end
    eval_scenes: int = 200             # held-out scenes for the evaluation during training

    def __post_init__(self):
        _positive(self, "vocab_size", "tokenizer_texts", "steps", "batch_size", "log_every", "ckpt_every",
                  "eval_scenes", "regions_per_image")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError("need lr > 0 and 0 <= min_lr <= lr")
        if len(self.task_weights) != 3 or min(self.task_weights) < 0 or sum(self.task_weights) == 0:
            raise ValueError("task_weights are three non-negative weights (Cap, ARef, GCap), not all zero")
        if self.loc_sigma < 0 or not 0 <= self.cap_parallel_prob <= 1 or self.num_workers < 0:
            raise ValueError("need loc_sigma >= 0, cap_parallel_prob in [0, 1], num_workers >= 0")
        if self.loc_init not in ("random", "sincos"):
            raise ValueError(f"loc_init must be 'random' or 'sincos', got {self.loc_init!r}")
        if not 0 <= self.crowd_prob <= 1 or not all(1 <= n <= 64 for n in self.crowd_objects):
            raise ValueError("need crowd_prob in [0, 1] and crowd_objects in [1, 64]")
        if self.init_from and self.init_encoder_from:
            raise ValueError("init_from and init_encoder_from exclude each other: a whole model, or an encoder")
        if self.eval_every < 0 or self.curriculum_steps < 0 or self.data_start < 0:
            raise ValueError("eval_every, curriculum_steps and data_start must be >= 0")

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

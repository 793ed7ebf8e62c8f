"""Engine-level measurements: our engine against Hugging Face `generate()` (section 1), the encoder's share of
the machine's peak (section 4), and latency against output length and images per batch (section 5).

Every measurement is a timer (a callable that runs once and returns seconds); the timers of a section take
turns, round after round, so that load from other processes on a shared machine falls on all of them alike,
and medians over the rounds are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.predictor import Predictor
from model.regions import iou
from model.requests import Request

from .flops import encode_flops, request_flops, sync
from .peers import engine_generate, hf_encode, hf_generate

Timer = Callable[[], float]


@dataclass
class Contender:
    """One way to run the model: a name, a precision, and either our inference object or HF's model."""
    name: str          # e.g. "ours ort fp32", "hf generate fp32"
    precision: str     # fp32 | int8 | bf16 | fp16
    inference: object = None   # ours: model/inference.py's interface
    hf: object = None          # the peer: a VisionEncoderDecoderModel
    tasks: object = None       # ours: prompts and parsing, for the accuracy check
    device: str = "cpu"
    max_batch: int | None = None  # the largest batch it takes (TensorRT: its profile's), if it has one

    @property
    def peer(self) -> bool:
        return self.hf is not None


def take_turns(timers: dict, rounds: int, warmup: int = 1) -> dict:
    """Run every timer `warmup` times, then `rounds` rounds of one run each; returns median seconds per key."""
    for t in timers.values():
        for _ in range(warmup):
            t()
    samples = {k: [] for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            samples[k].append(t())
    return {k: statistics.median(v) for k, v in samples.items()}


def timer(call: Callable[[], object], device: str) -> Timer:
    def run() -> float:
        t = time.perf_counter()
        call()
        sync(device)  # a GPU works asynchronously: wait for it (our `step` returns host logits anyway)
        return time.perf_counter() - t
    return run


def _inputs(c: Contender, batch: int, image_size: int):
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    return torch.from_numpy(pixels).to(c.device, next(c.hf.parameters()).dtype) if c.peer else pixels


def generate_timer(c: Contender, batch: int, new_tokens: int, image_size: int) -> Timer:
    x = _inputs(c, batch, image_size)
    if c.peer:
        return timer(lambda: hf_generate(c.hf, x, new_tokens), c.device)
    return timer(lambda: engine_generate(c.inference, x, new_tokens), c.device)


def encode_timer(c: Contender, batch: int, image_size: int) -> Timer:
    """Ours: `encode`, the ViT and every layer's cross-attention K/V. HF: its ViT (it computes the cross K/V in
    its first decoder step)."""
    x = _inputs(c, batch, image_size)
    if c.peer:
        return timer(lambda: hf_encode(c.hf, x), c.device)
    return timer(lambda: c.inference.encode(x), c.device)


def versus_peer(contenders: list[Contender], batches, new_tokens: int, rounds: int, cfg) -> list[dict]:
    """Section 1: seconds per call of `new_tokens` greedy tokens for each contender and batch size, and of its
    encoder alone (the rest, per token, is the decoder's share)."""
    timers = {(c.name, b): generate_timer(c, b, new_tokens, cfg.image_size) for b in batches for c in contenders}
    timers |= {(c.name, b, "encode"): encode_timer(c, b, cfg.image_size) for b in batches for c in contenders}
    med = take_turns(timers, rounds)
    return [{"name": c.name, "precision": c.precision, "peer": c.peer, "batch": b, "new_tokens": new_tokens,
             "seconds": med[c.name, b], "images_per_s": b / med[c.name, b],
             "tokens_per_s": b * new_tokens / med[c.name, b], "encode_seconds": med[c.name, b, "encode"],
             "decode_seconds_per_token": (med[c.name, b] - med[c.name, b, "encode"]) / new_tokens,
             "model_flops": b * request_flops(cfg, new_tokens)} for b in batches for c in contenders]


def refer_accuracy(c: Contender, scenes, batch: int = 32) -> dict:
    """Refer on every object of `scenes` (our real decoding: prompts, grammar, parsing): Acc@0.5 and boxes."""
    predictor, boxes, ious = Predictor(c.inference, c.tasks), [], []
    for s0 in range(0, len(scenes), batch):
        chunk = scenes[s0:s0 + batch]
        asks = [(j, Request("refer", expression=e)) for j, s in enumerate(chunk) for e in s.expressions]
        truth = [o.box for s in chunk for o in s.objects]
        for ans, box in zip(predictor.run([s.image for s in chunk], asks), truth, strict=True):
            boxes.append(ans.box)
            ious.append(iou(ans.box, box))
    return {"refer_acc50": float(np.mean(np.array(ious) >= 0.5)), "boxes": boxes}


def encoder_sweep(contenders: list[Contender], batches, rounds: int, cfg) -> list[dict]:
    """Section 4: the encoder's model FLOP/s at each batch size (the caller divides by the peak of its dtype)."""
    pairs = [(c, b) for c in contenders for b in batches if b <= (c.max_batch or b)]
    med = take_turns({(c.name, b): encode_timer(c, b, cfg.image_size) for c, b in pairs}, rounds)
    return [{"name": c.name, "precision": c.precision, "batch": b, "seconds": med[c.name, b],
             "flops_per_s": b * encode_flops(cfg) / med[c.name, b]} for c, b in pairs]


def scaling(contenders: list[Contender], lengths, images, new_tokens: int, rounds: int, cfg) -> dict:
    """Section 5: seconds per call against output length (batch 1) and against images per call."""
    timers = {("length", n, c.name): generate_timer(c, 1, n, cfg.image_size) for n in lengths for c in contenders}
    timers |= {("images", b, c.name): generate_timer(c, b, new_tokens, cfg.image_size)
               for b in images for c in contenders}
    med = take_turns(timers, rounds)
    return {axis: [{"name": c.name, axis_key: v, "seconds": med[axis, v, c.name]}
                   for c in contenders for v in values]
            for axis, axis_key, values in (("length", "new_tokens", lengths), ("images", "batch", images))}

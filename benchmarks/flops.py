"""The limit: model FLOPs counted analytically, and the machine's peak matrix-multiply rate measured.

Letters as in model/model.py (N visual tokens, D / E encoder / decoder width, M MLP width, L decoder layers,
V vocabulary, P patch side). A multiply-add is 2 FLOPs. Model FLOPs count the work the model needs, not what
a kernel happens to do: attention over the t + 1 visible cache slots (the graphs read all S slots, masked),
no padding, no recomputation, as in the MFU of PaLM (Chowdhery et al. 2022, appendix B).

    encoder, per image     2 N (3 P^2) D                               patch embedding
                         + enc_depth [2 N (4 D^2 + 2 D M) + 4 N^2 D]    qkv, proj, MLP; QK^T and AV
    cross K/V, per image   L 2 N D (2 E)                                once per image (model.cross_kv)
    decoder, per token     L [2 E (6 E) + 4 E M + 4 E (t + 1) + 4 E N] + 2 E V
                           (qkv, proj, cross q and proj; MLP; self-attention over t + 1 slots; cross-attention
                           over N tokens; tied logits) for the token at position t
"""

from __future__ import annotations

import time

import torch

from model.config import ModelConfig


def encode_flops(c: ModelConfig) -> int:
    """One image through the encoder and the per-layer cross-attention K/V: what `inference.encode` does."""
    N, D, M = c.num_patches, c.enc_width, c.enc_mlp
    patch = 2 * N * 3 * c.patch_size ** 2 * D
    layer = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D
    cross = c.dec_depth * 2 * N * D * 2 * c.dec_width
    return patch + c.enc_depth * layer + cross


def token_flops(c: ModelConfig, t: int) -> int:
    """One token at position t through the decoder (it attends to slots 0..t), logits included."""
    E, M, N = c.dec_width, c.dec_mlp, c.num_patches
    layer = 2 * E * 6 * E + 4 * E * M + 4 * E * (t + 1) + 4 * E * N
    return c.dec_depth * layer + 2 * E * c.vocab_size


def request_flops(c: ModelConfig, fed: int) -> int:
    """One image and `fed` decoder tokens at positions 0..fed-1 (a prompt of p tokens and n generated ones
    feed p + n - 1: the last token generated is never fed back)."""
    return encode_flops(c) + sum(token_flops(c, t) for t in range(fed))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_matmul(device: str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> float:
    """The best rate (FLOP/s) of square matrix products over about `seconds`, with torch's threads as set:
    512 and 1024 a side on a CPU (fast enough for many samples: on a shared machine the best sample is the one
    nothing interrupted), 4096 and 8192 on a GPU. On CUDA, fp32 means fp32: TF32 stays off (torch's default)."""
    sizes, reps = ((512, 1024), 1) if device == "cpu" else ((4096, 8192), 10)
    g = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    with torch.inference_mode():
        for n in sizes:
            a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
            out = torch.empty(n, n, device=device, dtype=dtype)
            torch.mm(a, b, out=out)  # warm-up: allocation, kernel choice
            sync(device)
            end = time.perf_counter() + seconds / len(sizes)
            while time.perf_counter() < end:
                t = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b, out=out)
                sync(device)
                best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def peaks(device: str, seconds: float = 2.0) -> dict[str, float]:
    return {"fp32": peak_matmul(device, torch.float32, seconds), "bf16": peak_matmul(device, torch.bfloat16, seconds)}

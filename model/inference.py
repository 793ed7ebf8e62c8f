"""The inference interface, and its PyTorch implementation.

Every backend (PyTorch here, ONNX Runtime and TensorRT in export/) implements the same four calls, so the
decoding strategies and the server's scheduler never know which one runs:

    encode(pixels)                     (B, 3, S, S) float32 numpy -> Cross (per-image cross-attention K/V)
    start(cross, images)               a DecodeState with one row per entry of `images` (an image index each)
    step(state, tokens, positions)     (R, T) int64 numpy each, positions consecutive in each row -> logits
                                       (R, T, V) float32 numpy; the new keys/values are written into the
                                       state's self-attention cache
    select(state, rows)                keep / reorder / repeat rows (beam search, finished sequences)
    merge(a, b)                        a state holding a's rows then b's (continuous batching: new requests
                                       join a running batch); both have the same number of cache slots

Tokens and logits cross the interface as numpy arrays; caches stay in the backend's own memory (a CUDA
tensor on a GPU) and are only ever touched by the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .model import LocCa


@dataclass
class TorchCross:
    k: torch.Tensor  # (L, B, H, N, Dh)
    v: torch.Tensor


@dataclass
class TorchState:
    cache_k: torch.Tensor  # (L, R, H, S, Dh)
    cache_v: torch.Tensor
    cross_k: torch.Tensor  # (L, R, H, N, Dh): each row's image
    cross_v: torch.Tensor

    @property
    def rows(self) -> int:
        return self.cache_k.shape[1]


class TorchInference:
    name = "torch"

    def __init__(self, model: LocCa, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype=dtype).eval()
        self.cfg: ModelConfig = model.cfg

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> TorchCross:
        p = self.model.tok_emb.weight
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, p.dtype)
        return TorchCross(*self.model.cross_kv(self.model.encode(x)))

    @torch.inference_mode()
    def start(self, cross: TorchCross, images: np.ndarray, slots: int | None = None) -> TorchState:
        idx = torch.as_tensor(np.asarray(images, dtype=np.int64), device=self.device)
        k, v = self.model.empty_cache(len(idx), slots)
        return TorchState(k, v, cross.k.index_select(1, idx), cross.v.index_select(1, idx))

    @torch.inference_mode()
    def step(self, state: TorchState, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)
        p = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=self.device)
        logits = self.model.decode_step(t, p, state.cache_k, state.cache_v, state.cross_k, state.cross_v)
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def select(self, state: TorchState, rows: np.ndarray) -> None:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        for name in ("cache_k", "cache_v", "cross_k", "cross_v"):
            setattr(state, name, getattr(state, name).index_select(1, idx))

    @torch.inference_mode()
    def merge(self, a: TorchState, b: TorchState) -> TorchState:
        return TorchState(*(torch.cat([getattr(a, n), getattr(b, n)], dim=1)
                            for n in ("cache_k", "cache_v", "cross_k", "cross_v")))

"""The inference interface (model/interface.py) on PyTorch: TorchInference over a LocCa module, its caches
torch tensors on the model's device."""

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

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.k, self.v))


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
    def split(self, cross: TorchCross) -> list[TorchCross]:
        return [TorchCross(cross.k[:, i:i + 1].clone(), cross.v[:, i:i + 1].clone()) for i in range(cross.k.shape[1])]

    @torch.inference_mode()
    def join(self, crosses: list[TorchCross]) -> TorchCross:
        if len(crosses) == 1:
            return crosses[0]  # `start` copies the rows it takes
        return TorchCross(torch.cat([c.k for c in crosses], dim=1), torch.cat([c.v for c in crosses], dim=1))

    @torch.inference_mode()
    def merge(self, a: TorchState, b: TorchState) -> TorchState:
        return TorchState(*(torch.cat([getattr(a, n), getattr(b, n)], dim=1)
                            for n in ("cache_k", "cache_v", "cross_k", "cross_v")))

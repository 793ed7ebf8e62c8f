"""The inference interface: the seven calls through which decoding and the server run a model, whichever
backend runs it (PyTorch: model/inference.py; ONNX Runtime and TensorRT: export/onnx_backend.py).

    encode(pixels)                     (B, 3, S, S) float32 numpy -> Cross (per-image cross-attention K/V)
    start(cross, images)               a DecodeState with one row per entry of `images` (an image index each)
    step(state, tokens, positions)     (R, T) int64 numpy each, positions consecutive in each row -> logits
                                       (R, T, V) float32 numpy; the new keys/values are written into the
                                       state's self-attention cache
    select(state, rows)                keep / reorder / repeat rows (beam search, finished sequences)
    merge(a, b)                        a state holding a's rows then b's (continuous batching: new requests
                                       join a running batch); both have the same number of cache slots
    split(cross)                       one Cross per image of `cross`, each owning its memory (the encoded-
                                       image cache, model/encoder_cache.py, keeps one without its batch)
    join(crosses)                      one Cross of the images of `crosses`, in order

A Cross has `nbytes`, the memory its keys and values hold (the cache's bound counts it).

Tokens and logits cross the interface as numpy arrays; caches stay in the backend's own memory (a CUDA
tensor on a GPU) and are only ever touched by the backend, so Cross and DecodeState are opaque here.

A backend does not inherit from `Inference`: a class with these calls is one (structural typing, PEP 544),
and `isinstance(x, Inference)` checks that it has them. Neither torch nor onnxruntime is imported here, so
code that only names the interface loads neither.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .config import ModelConfig

Cross = Any        # the backend's per-image cross-attention keys/values, as `encode` returns them; `.nbytes`
DecodeState = Any  # the backend's rows: self-attention caches and each row's cross K/V


@runtime_checkable
class Inference(Protocol):
    name: str         # the backend: "torch", "onnxruntime"
    cfg: ModelConfig  # the model's dimensions: image size, vocabulary, cache slots (max_seq_len)

    def encode(self, pixels: np.ndarray) -> Cross: ...

    def start(self, cross: Cross, images: np.ndarray, slots: int | None = None) -> DecodeState: ...

    def step(self, state: DecodeState, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    def select(self, state: DecodeState, rows: np.ndarray) -> None: ...

    def merge(self, a: DecodeState, b: DecodeState) -> DecodeState: ...

    def split(self, cross: Cross) -> list[Cross]: ...

    def join(self, crosses: list[Cross]) -> Cross: ...

"""LocCa: a ViT encoder and a transformer decoder that reads captions and boxes out of its visual tokens.

Wan et al., "LocCa: Visual Pretraining with Location-aware Captioners", NeurIPS 2024. The encoder runs once
per image; the decoder cross-attends to its tokens. Boxes are location tokens of the decoder's vocabulary,
so captioning (Cap), referring (ARef) and grounded captioning (GCap) are all next-token prediction.

Modules only: tokenisation, losses and search live elsewhere (model/tasks.py, model/train.py,
model/decoding.py). The self-attention KV cache is explicit tensors. `decode_layers` reads it and returns the new
tokens' keys and values for the cache's owner to write: that pure form exports to ONNX and runs under ONNX
Runtime and TensorRT, where tensors cannot be updated in place. `decode_step`, the same function for eager
PyTorch, writes the cache in place and then attends.

Dimension letters:
    B batch            N visual tokens (grid**2)     D encoder width      E decoder width
    H heads            Dh head dim (E // H)          L decoder layers     T tokens in this call
    S cache slots (max sequence length)              V vocabulary size    K targets per image
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


def sincos_2d(grid: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE; big_vision `posemb_sincos_2d`): (grid*grid, width)."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4 - 1 or 1))
    y = y.flatten()[:, None] * omega[None]
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def split_heads(x: Tensor, heads: int) -> Tensor:
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)  # (B, H, T, Dh)


def merge_heads(x: Tensor) -> Tensor:
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, E)


class EncoderBlock(nn.Module):
    """Pre-LN ViT block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = MLP(width, mlp)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)  # 3 x (B, N, D)
        a = F.scaled_dot_product_attention(*(split_heads(t, self.heads) for t in (q, k, v)))
        x = x + self.proj(merge_heads(a))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.enc_width, cfg.patch_size, stride=cfg.patch_size)
        if cfg.enc_posemb == "learned":
            self.pos = nn.Parameter(torch.randn(cfg.num_patches, cfg.enc_width) * 0.02)
        else:
            self.register_buffer("pos", sincos_2d(cfg.grid, cfg.enc_width), persistent=False)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.enc_width, cfg.enc_heads, cfg.enc_mlp)
                                    for _ in range(cfg.enc_depth))
        self.ln = nn.LayerNorm(cfg.enc_width)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, N, D)
        x = x + self.pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention to the visual tokens, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, self.heads = cfg.dec_width, cfg.dec_heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(E), nn.LayerNorm(E), nn.LayerNorm(E)
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)
        self.cross_q = nn.Linear(E, E)
        self.cross_kv = nn.Linear(cfg.enc_width, 2 * E)  # applied once per image, see LocCa.cross_kv
        self.cross_proj = nn.Linear(E, E)
        self.mlp = MLP(E, cfg.dec_mlp)

    def forward(self, x: Tensor, cross_k: Tensor, cross_v: Tensor, past_k: Tensor | None = None,
                past_v: Tensor | None = None, mask: Tensor | None = None, write_at: Tensor | None = None):
        """x (B, T, E); cross_k/v (B, H, N, Dh). Returns x and the new tokens' keys and values (B, H, T, Dh).

        Without a past: causal attention over x (training). With a past (B, H, S, Dh), either
        - `mask` from decode_mask (B, 1, T, S + T): attention over the past slots and the new tokens, the past
          only read (LocCa.decode_layers, the exported graph), or
        - `write_at` positions (B, T) and `mask` from visible_slots (B, 1, T, S): the new keys/values written
          into the past in place first, then one attention over it (LocCa.decode_step, eager PyTorch)."""
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))  # (B, H, T, Dh)
        if past_k is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif write_at is None:
            a = past_attention(q, k, v, past_k, past_v, mask)
        else:
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            past_k[rows, :, write_at, :] = k.transpose(1, 2)  # indexed dims first: (B, T, H, Dh)
            past_v[rows, :, write_at, :] = v.transpose(1, 2)
            a = F.scaled_dot_product_attention(q, past_k, past_v, attn_mask=mask)
        x = x + self.proj(merge_heads(a))
        a = F.scaled_dot_product_attention(split_heads(self.cross_q(self.ln2(x)), self.heads), cross_k, cross_v)
        x = x + self.cross_proj(merge_heads(a))
        x = x + self.mlp(self.ln3(x))
        return x, k, v


def decode_mask(positions: Tensor, slots: int, dtype: torch.dtype) -> Tensor:
    """The additive attention mask of a decode call, (B, 1, T, S + T): 0 where visible, -inf elsewhere.

    A call's tokens sit at consecutive positions in each row (a prompt, or one generated token), so a query
    sees the past slots before the row's first new position, and the new tokens at or before its own. Past
    slots from there on are about to be overwritten (prefill padding, a previous request): never read."""
    slot = torch.arange(slots, device=positions.device)
    past = slot[None, None, :] < positions[:, :1, None]                      # (B, 1, S)
    new = positions[:, None, :] <= positions[:, :, None]                      # (B, T, T)
    visible = torch.cat([past.expand(-1, positions.shape[1], -1), new], -1)  # (B, T, S + T)
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(visible, zero, torch.full_like(zero, float("-inf")))[:, None]


def visible_slots(positions: Tensor, slots: int) -> Tensor:
    """(B, 1, T, S) bool: slot s is visible to the query at position p when s <= p."""
    slot = torch.arange(slots, device=positions.device)
    return (slot[None, None, :] <= positions[:, :, None])[:, None]


def past_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention of q (B, H, T, Dh) over the past slots and the new keys together, without writing the
    new keys into the past: scores against each, one softmax over both, values summed from each. Writing them
    first would copy the whole cache on every step wherever tensors cannot be updated in place (ONNX graphs);
    this way a step reads the cache and its caller writes T new slots (model/inference.py, export/)."""
    scale = q.shape[-1] ** -0.5
    # the scale on each product, not on their concatenation: ONNX Runtime folds it into each MatMul (one node less)
    scores = torch.cat([(q @ past_k.transpose(-1, -2)) * scale, (q @ k.transpose(-1, -2)) * scale], -1) + mask
    p = scores.softmax(-1)
    S = past_k.shape[2]
    return p[..., :S] @ past_v + p[..., S:] @ v


class LocCa(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dec_width)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dec_width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.dec_depth))
        self.ln = nn.LayerNorm(cfg.dec_width)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # --- inference interface ----------------------------------------------------------------
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, image_size, image_size) normalised pixels -> visual tokens (B, N, D)."""
        return self.encoder(pixels)

    def cross_kv(self, visual: Tensor) -> tuple[Tensor, Tensor]:
        """Visual tokens -> per-layer cross-attention keys and values, each (L, B, H, N, Dh), once per image."""
        kv = self.cross_kv_layers(visual)
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])

    def cross_kv_layers(self, visual: Tensor) -> list[tuple[Tensor, Tensor]]:
        """cross_kv as one (keys, values) pair per layer, each (B, H, N, Dh): the exported encoder's outputs."""
        H = self.cfg.dec_heads
        return [tuple(split_heads(t, H) for t in b.cross_kv(visual).chunk(2, dim=-1)) for b in self.blocks]

    def empty_cache(self, batch: int, slots: int | None = None, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        """Self-attention cache, keys and values each (L, B, H, S, Dh), zero-filled."""
        c = self.cfg
        shape = (c.dec_depth, batch, c.dec_heads, slots or c.max_seq_len, c.dec_width // c.dec_heads)
        p = self.tok_emb.weight
        z = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return z, z.clone()

    def decode_step(self, tokens: Tensor, positions: Tensor, cache_k: Tensor, cache_v: Tensor,
                    cross_k: Tensor, cross_v: Tensor) -> Tensor:
        """Run T new tokens (B, T) at `positions` (B, T), consecutive in each row, through the decoder; write
        their keys and values into the caches (L, B, H, S, Dh) in place, at those positions. Returns logits
        (B, T, V). Each query sees the slots at or before its position; slots past a sequence's current length
        may hold anything (prefill padding, a previous request): positions decide what is visible.

        The same function as decode_layers followed by writing its new keys/values, computed the way eager PyTorch runs it
        fastest (write, then one fused attention: 12% less time a step at batch 1 on the tiny model, equal at
        32); tests/test_model.py checks the two agree."""
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, T, E)
        mask = visible_slots(positions, cache_k.shape[3])
        for layer, block in enumerate(self.blocks):
            x, _, _ = block(x, cross_k[layer], cross_v[layer], cache_k[layer], cache_v[layer], mask, write_at=positions)
        return self.logits(x)

    def decode_layers(self, tokens: Tensor, positions: Tensor, past_k, past_v, cross_k, cross_v):
        """The decode step as a pure function of per-layer tensors (a stacked tensor indexes the same way): the
        caches are only read, and the new tokens' keys and values come back as L tensors (B, H, T, Dh) each
        for the caller to write. These are the exported decoder's inputs and outputs (export/onnx_export.py)."""
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, T, E)
        mask = decode_mask(positions, past_k[0].shape[2], x.dtype)
        new_k, new_v = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block(x, cross_k[layer], cross_v[layer], past_k[layer], past_v[layer], mask)
            new_k.append(k)
            new_v.append(v)
        return self.logits(x), new_k, new_v

    def logits(self, x: Tensor) -> Tensor:
        return self.ln(x) @ self.tok_emb.weight.T  # tied input/output embeddings (as in whisper)

    # --- training ------------------------------------------------------------------------------
    def forward(self, pixels: Tensor, tokens: Tensor, lengths: list[int] | None = None) -> Tensor:
        """One encoder pass, the decoder on every target of every image (teacher forcing).

        pixels (B, 3, S, S); tokens (B, K, T): K target sequences per image (LocCa: Cap, ARef, GCap).
        lengths: optional longest real length of each of the K targets; the decoder then runs each target
        trimmed to its own length (a box target is a third of a caption's), and logits past it are zero. A
        length of 0 skips the target (all its logits zero): a task the run gives no weight costs nothing.
        Returns logits (B, K, T, V) where position t predicts token t + 1.
        """
        B, K, T = tokens.shape
        ck, cv = self.cross_kv(self.encode(pixels))  # (L, B, H, N, Dh): once per image, shared by its K targets
        if lengths is None:
            return self._decode(tokens.reshape(B * K, T), ck.repeat_interleave(K, dim=1),
                                cv.repeat_interleave(K, dim=1)).view(B, K, T, -1)
        out = [F.pad(self._decode(tokens[:, k, :n], ck, cv), (0, 0, 0, T - n)) if n else None  # (B, T, V)
               for k, n in enumerate(lengths)]
        like = next((o for o in out if o is not None), ck.new_zeros(B, T, self.cfg.vocab_size))
        return torch.stack([torch.zeros_like(like) if o is None else o for o in out], dim=1)

    def _decode(self, tokens: Tensor, ck: Tensor, cv: Tensor) -> Tensor:
        """Full-sequence causal decoding without a cache: tokens (R, T), cross K/V (L, R, H, N, Dh)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)[None]
        for layer, block in enumerate(self.blocks):
            x, _, _ = block(x, ck[layer], cv[layer])
        return self.logits(x)


@torch.no_grad()
def init_location_embeddings(model: LocCa, offset: int, bins: int) -> None:
    """Start the location-token embeddings as 1-D sin-cos codes of the bin index (scaled to the embedding's
    init std), so that neighbouring bins start with similar embeddings, and, through the tied output layer,
    similar logits: a near miss is near from the first step."""
    E = model.cfg.dec_width
    pos = torch.arange(bins, dtype=torch.float32)[:, None]
    # angles from 1 radian per bin down to 1 / (4 * bins): the slowest code never wraps across the bins
    freq = (4.0 * bins) ** -(torch.arange(E // 2, dtype=torch.float32) / (E // 2))
    code = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)
    weight = model.tok_emb.weight
    weight[offset:offset + bins, : code.shape[1]] = code * weight.std()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



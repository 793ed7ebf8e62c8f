"""The LocCa training loss: next-token cross-entropy over every target, with optional soft location targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import TASK_NAMES
from .tokenizer import LoccaTokenizer

PREFIX = 2  # <bos> <task>: given, never predicted


def locca_loss(logits: Tensor, tokens: Tensor, tok: LoccaTokenizer, task_weights=(1.0, 1.0, 1.0),
               loc_sigma: float = 0.0, layout: list[int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """logits (B, K, T, V) from inputs tokens (B, K, T); layout[k] is the task (0 Cap, 1 ARef, 2 GCap) of
    target k (default: target k is task k). Position t predicts token t + 1, from the first token
    after the task prefix on. Each sequence's loss is the mean over its target tokens, and each task's loss the
    mean over the sequences that have it: when every example has every target (the shapes world), the loss
    does not depend on how a batch is split over DDP ranks.

    loc_sigma > 0 replaces the one-hot target of a location token by a Gaussian over the neighbouring bins
    (sigma in bins): a box one bin off is nearly right, and the loss should say so.
    """
    B, K, T, V = logits.shape
    logp = F.log_softmax(logits[:, :, PREFIX - 1:-1].float(), dim=-1)  # (B, K, T', V)
    target = tokens[:, :, PREFIX:]  # (B, K, T')
    valid = target != tok.pad_id
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, K, T')
    if loc_sigma > 0:
        is_loc = tok.loc_offset <= target
        if is_loc.any():
            bins = torch.arange(tok.num_loc, device=logits.device, dtype=torch.float32)
            k = (target[is_loc] - tok.loc_offset).float()  # (M,)
            q = torch.exp(-0.5 * ((bins[None] - k[:, None]) / loc_sigma) ** 2)
            q = q / q.sum(-1, keepdim=True)  # (M, bins)
            loc_logp = logp[is_loc][:, tok.loc_offset:tok.loc_offset + tok.num_loc]
            nll = nll.masked_scatter(is_loc, -(q * loc_logp).sum(-1))
    per_seq = (nll * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # (B, K)
    has = valid.any(-1).float()  # (B, K): the example has this target
    layout = list(range(K)) if layout is None else layout
    onehot = F.one_hot(torch.tensor(layout, device=logits.device), 3).float()  # (K, 3)
    count = has.sum(0) @ onehot  # (3,) sequences of each task
    per_task = ((per_seq * has).sum(0) @ onehot) / count.clamp(min=1)  # (3,)
    w = torch.tensor(task_weights, device=logits.device, dtype=torch.float32) * (count > 0)
    loss = (w * per_task).sum() / w.sum().clamp(min=1e-8)
    return loss, {name: per_task[i].detach() for i, name in enumerate(TASK_NAMES) if i in layout}

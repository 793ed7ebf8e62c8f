"""Cached decoding equals full recomputation, for every task, prompt length mix and batch composition."""

import numpy as np
import pytest
import torch

from model.inference import TorchInference


def task_sequences(tasks, box=(40, 30, 120, 90), w=200, h=150):
    return [tasks.cap_sequence("a small blue square and a large red circle"),
            tasks.aref_sequence("the red circle on the left", box, w, h),
            tasks.gcap_sequence("the large circle at the top", box, w, h)]


def pad(seqs, value):
    T = max(map(len, seqs))
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs])


@torch.no_grad()
def test_cached_steps_equal_the_training_forward_for_all_three_tasks(tiny_model, tasks, tok):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 128, 128)
    seqs = task_sequences(tasks)
    tokens = pad(seqs, tok.pad_id)  # (K, T)
    K, T = tokens.shape
    full = tiny_model(pixels, tokens[None].expand(2, K, T))  # (B, K, T, V)

    ck, cv = (t.repeat_interleave(K, dim=1) for t in tiny_model.cross_kv(tiny_model.encode(pixels)))
    rows = tokens.repeat(2, 1)  # (B*K, T), row b*K + k
    k, v = tiny_model.empty_cache(2 * K)
    prefill = 3  # prompt in one call, then one token at a time
    logits = tiny_model.decode_step(rows[:, :prefill], torch.arange(prefill).expand(2 * K, -1), k, v, ck, cv)
    steps = [logits]
    for t in range(prefill, T):
        logits = tiny_model.decode_step(rows[:, t:t + 1], torch.full((2 * K, 1), t), k, v, ck, cv)
        steps.append(logits)
    cached = torch.cat(steps, dim=1).view(2, K, T, -1)
    for task in range(K):
        n = len(seqs[task])
        diff = (cached[:, task, :n] - full[:, task, :n]).abs().max().item()
        assert diff <= 1e-5, f"task {task}: max |cached - full| = {diff}"


@torch.no_grad()
def test_rows_at_different_positions_in_one_batch_match_each_alone(tiny_model, tasks):
    """Continuous batching mixes sequences of different lengths: a row's logits must not depend on its
    neighbours, on padding, or on what stale cache slots past its position hold."""
    inf = TorchInference(tiny_model)
    pixels = np.random.default_rng(2).standard_normal((2, 3, 128, 128)).astype(np.float32)
    cross = inf.encode(pixels)
    seqs = task_sequences(tasks)
    alone = []
    for i, s in enumerate(seqs):
        st = inf.start(cross, np.array([i % 2]))
        alone.append(inf.step(st, np.array([s]), np.arange(len(s))[None])[0])
    st = inf.start(cross, np.array([i % 2 for i in range(3)]))
    st.cache_k = torch.randn_like(st.cache_k)  # stale garbage in every slot
    st.cache_v = torch.randn_like(st.cache_v)
    T = max(map(len, seqs))
    batch = np.array([s + [0] * (T - len(s)) for s in seqs])
    together = inf.step(st, batch, np.tile(np.arange(T), (3, 1)))
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(together[i, : len(s)], alone[i], atol=1e-5)


@torch.no_grad()
def test_decode_step_equals_the_pure_decode_layers_plus_a_cache_write(tiny_model):
    """decode_step (write in place, then attend: eager PyTorch) and decode_layers (read the past, return the new
    keys/values: the exported graph) are one function: same logits, and the same cache once the caller writes."""
    g = torch.Generator().manual_seed(4)
    c, B, S = tiny_model.cfg, 3, tiny_model.cfg.max_seq_len
    ck, cv = tiny_model.cross_kv(tiny_model.encode(torch.randn(B, 3, 128, 128, generator=g)))
    k, v = (torch.randn(c.dec_depth, B, c.dec_heads, S, c.dec_width // c.dec_heads, generator=g) for _ in range(2))
    for T, starts in ((5, [0, 0, 0]), (1, [7, 0, 30]), (4, [2, 11, S - 4])):
        positions = torch.tensor(starts)[:, None] + torch.arange(T)
        tokens = torch.randint(0, c.vocab_size, (B, T), generator=g)
        pure, new_k, new_v = tiny_model.decode_layers(tokens, positions, k, v, ck, cv)
        k2, v2 = k.clone(), v.clone()
        for cache, new in ((k2, torch.stack(new_k)), (v2, torch.stack(new_v))):
            for b in range(B):
                cache[:, b, :, positions[b]] = new[:, b]
        eager = tiny_model.decode_step(tokens, positions, k, v, ck, cv)  # writes k and v in place
        torch.testing.assert_close(eager, pure, atol=1e-5, rtol=0)
        torch.testing.assert_close(k[0], k2[0], atol=0, rtol=0)  # layer 0's keys/values: the same arithmetic
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=0)      # later layers' inputs went through attention
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cross_attention_keys_are_computed_once_per_image_and_shared(tiny_model, tok):
    pixels = torch.randn(3, 3, 128, 128)
    tokens = torch.randint(tok.text_start, tok.loc_offset, (3, 2, 6))
    both = tiny_model(pixels, tokens)
    one = tiny_model(pixels[:1], tokens[:1])
    torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=0)


@torch.no_grad()
def test_trimmed_per_task_decoding_equals_the_padded_batch(tiny_model, tasks, tok):
    seqs = task_sequences(tasks)
    tokens = pad(seqs, tok.pad_id)[None].expand(2, -1, -1)
    pixels = torch.randn(2, 3, 128, 128)
    full = tiny_model(pixels, tokens)
    lengths = [len(s) for s in seqs]
    trimmed = tiny_model(pixels, tokens, lengths)
    for k, n in enumerate(lengths):
        torch.testing.assert_close(trimmed[:, k, :n], full[:, k, :n], atol=1e-5, rtol=0)
        assert (trimmed[:, k, n:] == 0).all()


def test_sincos_location_init_makes_neighbouring_bins_similar(tok):
    from model.config import get_size
    from model.model import LocCa, init_location_embeddings

    model = LocCa(get_size("tiny", vocab_size=tok.vocab_size))
    init_location_embeddings(model, tok.loc_offset, tok.num_loc)
    e = model.tok_emb.weight[tok.loc_offset:].detach()
    e = e / e.norm(dim=1, keepdim=True)
    sim = [(e[20] @ e[20 + d]).item() for d in (1, 4, 16, 40)]
    assert sim == sorted(sim, reverse=True) and sim[0] > 0.9
    text = model.tok_emb.weight[tok.text_start:tok.loc_offset]
    assert text.std().item() == pytest.approx(0.02, rel=0.2)  # text embeddings untouched

"""Constrained decoding: every output parses, whatever the weights; batched search equals a naive reference.
Searches run through the engine core (model/core.py), the one driver of the decode loop."""

import numpy as np
import pytest
import torch

from model.config import get_size
from model.core import EngineCore
from model.decoding import (
    BeamSearch,
    DecodingOptions,
    Grammar,
    GrammarState,
    Query,
    advance_all,
    budget_for,
    log_softmax,
)
from model.inference import TorchInference
from model.model import LocCa
from model.scheduler import ALL_AT_ONCE
from model.tasks import GRAMMARS


def decode(inf, pixels, queries, tasks, options=DecodingOptions()):
    """Each query's `num_return` best hypotheses, its image pixels[q.image], all queries in one batch."""
    core, images = EngineCore(inf, tasks, ALL_AT_ONCE, options), list(pixels)
    S = inf.cfg.max_seq_len
    searches = [BeamSearch(q, budget_for(q, options, S), options.beam_size, core.grammar, options.length_penalty)
                for q in queries]
    for q, search in zip(queries, searches, strict=True):
        core.submit(search, images[q.image])
    core.run()
    return [s.best(options.num_return) for s in searches]


def queries_for(tasks, rng, n_images):
    qs = []
    for i in range(n_images):
        w, h = rng.integers(50, 500, size=2)
        x0, y0 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
        box = [x0, y0, rng.uniform(x0 + 5, w), rng.uniform(y0 + 5, h)]
        qs += [Query(i, "caption", tuple(tasks.caption_prompt()), int(rng.integers(2, 20))),
               Query(i, "refer", tuple(tasks.refer_prompt("the small red circle on the left"))),
               Query(i, "describe", tuple(tasks.describe_prompt(box, w, h)), int(rng.integers(2, 12))),
               Query(i, "ground", tuple(tasks.ground_prompt()), int(rng.integers(7, 20)))]
    return qs


def assert_well_formed(task, tokens, tok, budget):
    assert tokens[-1] == tok.eos_id and tok.eos_id not in tokens[:-1] and len(tokens) <= budget
    body = tokens[:-1]
    if GRAMMARS[task][0][0] == "loc":
        locs = body[:4]
        assert all(tok.is_loc(t) for t in locs)
        assert locs[2] > locs[0] and locs[3] > locs[1], "second corner must come after the first"
        body = body[4:]
        if task == "refer":
            assert body == []
            return
        assert body[0] == tok.sep_id
        body = body[1:]
    assert len(body) >= 1 and all(tok.is_text(t) for t in body)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beam", [1, 3])
def test_every_output_is_well_formed_on_random_weights(seed, beam, tok, tasks):
    torch.manual_seed(seed)
    model = LocCa(get_size("tiny", vocab_size=tok.vocab_size))
    for p in model.parameters():  # sharpen the random distribution so that it has strong, wrong opinions
        p.data.mul_(1 + 3 * (seed % 3))
    inf = TorchInference(model)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    qs = queries_for(tasks, rng, 2)
    results = decode(inf, pixels, qs, tasks, DecodingOptions(beam_size=beam, num_return=beam))
    for q, hyps in zip(qs, results, strict=True):
        assert len(hyps) == beam
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert_well_formed(q.task, h.tokens, tok, q.max_new_tokens or model.cfg.max_seq_len - len(q.prompt))
            assert len(h.logprobs) == len(h.tokens) and all(lp <= 0 for lp in h.logprobs)
            parsed = tasks.parse(q.task, h.tokens, 300, 200)
            if "box" in parsed:
                x0, y0, x1, y1 = parsed["box"]
                assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200


@torch.no_grad()
def test_batched_greedy_equals_naive_recomputation(tiny_model, tok, tasks):
    """Reference: no cache, no batching; the whole sequence re-run through the training forward each step."""
    inf = TorchInference(tiny_model)
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    qs = queries_for(tasks, rng, 2)
    got = decode(inf, pixels, qs, tasks, DecodingOptions(max_new_tokens=12))
    grammar = Grammar(tok)
    for q, hyps in zip(qs, got, strict=True):
        seq, state = list(q.prompt), GrammarState(GRAMMARS[q.task], q.max_new_tokens or 12)
        while True:
            logits = tiny_model(torch.from_numpy(pixels[q.image:q.image + 1]), torch.tensor([[seq]]))[0, 0, -1]
            t = int(np.argmax(np.where(grammar.allowed(state), log_softmax(logits.numpy()), -np.inf)))
            seq.append(t)
            state.advance(t, tok)
            if t == tok.eos_id:
                break
        assert hyps[0].tokens == seq[len(q.prompt):]


def test_batch_composition_does_not_change_results(tiny_model, tok, tasks):
    inf = TorchInference(tiny_model)
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    qs = queries_for(tasks, rng, 2)
    together = decode(inf, pixels, qs, tasks, DecodingOptions(beam_size=2))
    for q, hyps in zip(qs, together, strict=True):
        alone = decode(inf, pixels, [q], tasks, DecodingOptions(beam_size=2))[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        np.testing.assert_allclose([h.score for h in alone], [h.score for h in hyps], atol=1e-4)


def test_a_budget_too_small_for_the_grammar_is_refused(tiny_model, tok, tasks):
    S = tiny_model.cfg.max_seq_len
    with pytest.raises(ValueError, match="refer"):
        budget_for(Query(0, "refer", tuple(tasks.refer_prompt("x")), 4), DecodingOptions(), S)
    long_prompt = tuple(tasks.refer_prompt("the red circle " * 30))
    with pytest.raises(ValueError, match="positions"):
        budget_for(Query(0, "refer", long_prompt), DecodingOptions(), S)


def test_options_are_validated():
    with pytest.raises(ValueError):
        DecodingOptions(beam_size=2, num_return=3)
    with pytest.raises(ValueError):
        DecodingOptions(max_new_tokens=0)


@pytest.mark.parametrize("task", sorted(GRAMMARS))
def test_greedy_fast_path_takes_the_general_beam_paths_choices(task, tok):
    """BeamSearch runs one beam through `_greedy`; the general `_beams`, given width 1, must choose the same
    tokens with the same log-probabilities and scores, on peaked, flat and tied logits alike."""
    grammar, rng = Grammar(tok), np.random.default_rng(len(task))
    for trial in range(20):
        q = Query(0, task, (1, 2, 3))
        fast, general = (BeamSearch(q, int(rng.integers(9, 24)), 1, grammar) for _ in range(2))
        general.states[0].budget = fast.states[0].budget
        while True:
            logits = rng.standard_normal((3, tok.vocab_size)).astype(np.float32) * (0.1 + trial % 4 * 3)
            if trial % 5 == 0:
                logits[:, ::2] = logits[:, :1]  # ties between allowed tokens: the first one wins in both
            logp = log_softmax(logits)  # what the scheduler hands the searches
            fast.rows = general.rows = [1]
            a, b = fast._greedy(logp[1]), general._beams(logp)
            assert a == b and fast.seqs == general.seqs and fast.lps == general.lps
            assert fast.src == general.src and fast.scores.tolist() == general.scores.tolist()
            if not a:
                break
        assert [(h.tokens, h.score) for h in fast.finished] == [(h.tokens, h.score) for h in general.finished]
        assert len(fast.finished) == 1


def test_advancing_a_batch_together_equals_one_by_one(tok):
    """`advance_all` (a decode step's searches; the greedy ones choose their tokens in one masked argmax) leaves
    every search where its own `advance` does: greedy searches of every task at different points of their
    grammars beside beam searches, on peaked, flat and tied logits, with rows where nothing allowed is possible
    (all -inf) or the model gave NaN."""
    grammar, rng = Grammar(tok), np.random.default_rng(0)

    def searches():
        budgets = np.random.default_rng(1).integers(9, 24, size=3 * len(GRAMMARS))
        return [BeamSearch(Query(0, task, (1, 2, 3)), int(b), width, grammar)
                for (task, width), b in zip([(t, w) for t in sorted(GRAMMARS) for w in (1, 1, 2)], budgets,
                                            strict=True)]

    together, alone = searches(), searches()
    for step in range(40):
        live = [i for i, s in enumerate(together) if not s.done]
        if not live:
            break
        r = 0
        for i in live:  # each live search's beams in rows of their own, as next_rows lays them out
            together[i].rows = alone[i].rows = list(range(r, r + together[i].width))
            r += together[i].width
        logits = rng.standard_normal((r, tok.vocab_size)).astype(np.float32) * (0.1 + step % 4 * 3)
        if step % 5 == 0:
            logits[:, ::2] = logits[:, :1]  # ties between allowed tokens: the first one wins either way
        logp = log_softmax(logits)
        greedy = [i for i in live if together[i].width == 1]
        if step == 3:
            logp[together[greedy[0]].rows[0]] = -np.inf  # nothing allowed is possible: the search ends, unfinished
        if step == 4:
            logp[together[greedy[-1]].rows[0]] = np.nan   # a broken model's row: the same either way
        got = advance_all([together[i] for i in live], logp)
        assert got == [alone[i].advance(logp) for i in live]
        for i in live:
            a, b = together[i], alone[i]
            assert (a.seqs, a.lps, a.src, a.done) == (b.seqs, b.lps, b.src, b.done)
            assert a.scores.tolist() == b.scores.tolist()
            assert [(h.tokens, h.score) for h in a.finished] == [(h.tokens, h.score) for h in b.finished]
    assert all(s.done for s in together) and any(s.finished for s in together)


def test_the_default_budget_is_every_position_the_prompt_leaves():
    """A six-object scene's caption takes up to ~50 tokens: a fixed default budget (it was 32) cut a quarter of
    the held-out captions short. With none set, a query may use all of the model's positions."""
    q = Query(0, "caption", (1, 2))
    assert budget_for(q, DecodingOptions(), 48) == 46
    assert budget_for(q, DecodingOptions(max_new_tokens=20), 48) == 20
    assert budget_for(Query(0, "caption", (1, 2), 10), DecodingOptions(max_new_tokens=20), 48) == 10
    assert budget_for(Query(0, "caption", (1, 2), 100), DecodingOptions(), 48) == 46


def test_log_softmax_of_a_batch_is_row_for_row_that_of_each_row():
    """The scheduler normalises a step's logits once for the whole batch; a search reads its rows. Bit for bit
    the numbers it would get normalising its own rows alone, so an answer never depends on its batch."""
    rng = np.random.default_rng(3)
    for rows in (1, 2, 5, 33, 200):
        x = (rng.standard_normal((rows, 384)) * rng.uniform(0.1, 40)).astype(np.float32)
        batch = log_softmax(x)
        for i in range(rows):
            np.testing.assert_array_equal(batch[i], log_softmax(x[i]))

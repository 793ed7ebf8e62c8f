"""Decoding: options, the box grammar as logit constraints, and batched beam search (greedy = beam 1).

Built from small parts, as whisper's decoding.py: a frozen options dataclass, the inference interface of
model/inference.py (any backend), a grammar that masks the logits so that every output parses, and one
search loop. A query is one prompt to continue; a batch mixes tasks, prompt lengths and budgets freely.

Every hypothesis ends with <eos>: when a text budget is about to run out, <eos> is forced, and budgets too
small for a task's grammar are refused up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tasks import GRAMMARS, MIN_NEW_TOKENS
from .tokenizer import LoccaTokenizer


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 1            # 1 = greedy search
    num_return: int = 1           # hypotheses returned per query, best first (<= beam_size)
    max_new_tokens: int = 32      # budget of a query that sets none (clipped to the model's positions)
    length_penalty: float = 1.0   # rank by sum(logp) / len**length_penalty; 1.0 ranks by mean log-probability

    def __post_init__(self):
        if self.beam_size < 1 or not 1 <= self.num_return <= self.beam_size:
            raise ValueError("need beam_size >= 1 and 1 <= num_return <= beam_size")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


@dataclass(frozen=True)
class Query:
    image: int                      # index of the image in the encoded batch
    task: str                       # a key of tasks.GRAMMARS: caption, refer, describe, propose
    prompt: tuple[int, ...]
    max_new_tokens: int | None = None


@dataclass
class Hypothesis:
    tokens: list[int]               # generated ids, ending with <eos>
    logprobs: list[float]           # per generated token, under the model's unconstrained distribution
    score: float = 0.0              # ranking score (see DecodingOptions.length_penalty)

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


@dataclass
class GrammarState:
    """Where a sequence is in its task's grammar."""
    phases: tuple[tuple[str, int], ...]
    budget: int                     # tokens it may still generate
    phase: int = 0
    count: int = 0                  # tokens generated in the current phase
    locs: list[int] = field(default_factory=list)

    def copy(self) -> GrammarState:
        return GrammarState(self.phases, self.budget, self.phase, self.count, list(self.locs))

    def advance(self, token: int, tok: LoccaTokenizer) -> None:
        kind, n = self.phases[self.phase]
        self.budget -= 1
        self.count += 1
        if kind == "loc":
            self.locs.append(token)
        if kind != "text" and self.count == n and self.phase + 1 < len(self.phases):
            self.phase, self.count = self.phase + 1, 0


class Grammar:
    """Turns grammar states into masks of allowed next tokens."""

    def __init__(self, tok: LoccaTokenizer):
        self.tok = tok
        V = tok.vocab_size
        ids = np.arange(V)
        self.loc = (ids >= tok.loc_offset) & (ids < tok.loc_offset + tok.num_loc)
        self.first_corner = self.loc & (ids < tok.loc_offset + tok.num_loc - 1)  # leaves room for the second
        self.text = (ids >= tok.text_start) & (ids < tok.loc_offset)
        self.text_or_eos = self.text | (ids == tok.eos_id)
        self.sep = ids == tok.sep_id
        self.eos = ids == tok.eos_id
        self.ids = ids

    def allowed(self, s: GrammarState) -> np.ndarray:
        kind, _ = s.phases[s.phase]
        if kind == "loc":
            if s.count >= 2:  # y1 after y0 and x1 after x0: the k-th corner comes after the (k-2)-th
                return self.loc & (self.ids > s.locs[s.count - 2])
            return self.first_corner
        if kind == "sep":
            return self.sep
        if kind == "eos":
            return self.eos
        if s.count == 0:
            return self.text
        return self.eos if s.budget <= 1 else self.text_or_eos


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def budget_for(query: Query, options: DecodingOptions, max_seq_len: int) -> int:
    budget = min(query.max_new_tokens or options.max_new_tokens, max_seq_len - len(query.prompt))
    if budget < MIN_NEW_TOKENS[query.task]:
        raise ValueError(f"{query.task}: a prompt of {len(query.prompt)} tokens leaves {budget} of the model's "
                         f"{max_seq_len} positions; the task needs {MIN_NEW_TOKENS[query.task]}")
    return budget


def decode(inference, cross, queries: list[Query], tok: LoccaTokenizer,
           options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Beam search over all queries at once; returns `num_return` hypotheses per query, best first."""
    if not queries:
        return []
    grammar, W, S = Grammar(tok), options.beam_size, inference.cfg.max_seq_len
    Q = len(queries)
    budgets = [budget_for(q, options, S) for q in queries]

    # Prefill all prompts in one call, right-padded. Pad tokens write cache slots past their prompt; those
    # slots are overwritten by the generated tokens before any query can see them (positions decide).
    lengths = np.array([len(q.prompt) for q in queries])
    P = int(lengths.max())
    tokens = np.full((Q, P), tok.pad_id, dtype=np.int64)
    for i, q in enumerate(queries):
        tokens[i, : len(q.prompt)] = q.prompt
    state = inference.start(cross, np.array([q.image for q in queries]))
    logits = inference.step(state, tokens, np.tile(np.arange(P), (Q, 1)))
    last = logits[np.arange(Q), lengths - 1]  # (Q, V)

    # Rows are (query, beam) pairs of the live queries; only beam 0 of each starts alive.
    live = list(range(Q))
    inference.select(state, np.repeat(np.arange(Q), W))
    last = np.repeat(last, W, axis=0)
    scores = np.tile(np.r_[0.0, np.full(W - 1, -np.inf)], Q)
    states = [GrammarState(GRAMMARS[queries[q].task], budgets[q]) for q in range(Q) for _ in range(W)]
    seqs: list[list[int]] = [[] for _ in range(Q * W)]
    lps: list[list[float]] = [[] for _ in range(Q * W)]
    finished: list[list[Hypothesis]] = [[] for _ in range(Q)]

    while live:
        logp = log_softmax(last)  # (R, V), R = len(live) * W
        mask = np.stack([grammar.allowed(s) for s in states])
        cand = np.where(mask, logp, -np.inf) + scores[:, None]
        V = cand.shape[1]
        next_live, beams = [], []  # beams: (source row, token, score, grammar state, tokens, logprobs)
        for j, q in enumerate(live):
            block = cand[j * W:(j + 1) * W].ravel()
            cont = []
            for idx in np.argsort(-block, kind="stable")[: 2 * W]:
                if not np.isfinite(block[idx]) or len(cont) == W:
                    break
                row, t = j * W + int(idx) // V, int(idx) % V
                seq, lp = seqs[row] + [t], lps[row] + [float(logp[row, t])]
                if t == tok.eos_id:
                    finished[q].append(Hypothesis(seq, lp, float(np.sum(lp)) / len(lp) ** options.length_penalty))
                    continue
                st = states[row].copy()
                st.advance(t, tok)
                cont.append((row, t, float(block[idx]), st, seq, lp))
            if len(finished[q]) >= W or not cont:
                continue  # this query is done
            while len(cont) < W:  # a tight grammar left fewer continuations: pad with dead beams
                row, t, _, st, seq, lp = cont[-1]
                cont.append((row, t, -np.inf, st.copy(), seq, lp))
            next_live.append(q)
            beams += cont
        if not next_live:
            break
        live = next_live
        src, new_tok, new_scores, states, seqs, lps = (list(c) for c in zip(*beams, strict=True))
        scores = np.array(new_scores, dtype=np.float64)
        inference.select(state, np.array(src))
        positions = np.array([len(queries[live[r // W]].prompt) + len(seqs[r]) - 1 for r in range(len(seqs))])
        last = inference.step(state, np.array(new_tok, dtype=np.int64)[:, None], positions[:, None])[:, 0]

    out = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h.score)
        out.append(hyps[: options.num_return])
    return out

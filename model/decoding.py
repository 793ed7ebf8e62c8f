"""Decoding: options, the box grammar as logit constraints, and batched beam search (greedy = beam 1).

Built from small parts, as whisper's decoding.py: a frozen options dataclass, a grammar that masks the logits so
that every output parses, and the search of one query, a step at a time. A query is one prompt to continue; the
engine core (model/core.py) lays searches out in rows of one batch, which mixes tasks, prompt lengths and
budgets freely, and runs them through the inference interface (model/interface.py, any backend).

Every hypothesis ends with <eos>: when a text budget is about to run out, <eos> is forced, and budgets too
small for a task's grammar are refused up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .tasks import GRAMMARS, MIN_NEW_TOKENS
from .tokenizer import LoccaTokenizer


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 1            # 1 = greedy search
    num_return: int = 1           # hypotheses returned per query, best first (<= beam_size)
    max_new_tokens: int | None = None  # budget of a query that sets none; None: the model's positions left
                                       # after the prompt (a budget is always clipped to those)
    length_penalty: float = 1.0   # rank by sum(logp) / len**length_penalty; 1.0 ranks by mean log-probability

    def __post_init__(self):
        if self.beam_size < 1 or not 1 <= self.num_return <= self.beam_size:
            raise ValueError("need beam_size >= 1 and 1 <= num_return <= beam_size")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


@dataclass(frozen=True)
class Query:
    image: int                      # index of the image in the encoded batch
    task: str                       # a key of tasks.GRAMMARS: caption, refer, describe, ground (model/requests.py TASKS)
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
    budget, asked = max_seq_len - len(query.prompt), query.max_new_tokens or options.max_new_tokens
    if asked:
        budget = min(asked, budget)
    if budget < MIN_NEW_TOKENS[query.task]:
        raise ValueError(f"{query.task}: a prompt of {len(query.prompt)} tokens leaves {budget} of the model's "
                         f"{max_seq_len} positions; the task needs {MIN_NEW_TOKENS[query.task]}")
    return budget


class BeamSearch:
    """One query's beam search, `width` beams wide (greedy = 1), one step at a time.

    The search owns no model state. Its beams live in rows of whatever batch the caller runs: before each
    step the caller sets `rows` (the rows of the logits array that hold this query's beams), `advance` picks
    the next beams from them and leaves `src` (the row each next beam continues), `tokens()` and
    `positions()` for the next step call. The engine core (model/core.py) drives every search this way, so a
    query gets the same search alone, in a batch, or joining a running one.
    """

    def __init__(self, query: Query, budget: int, width: int, grammar: Grammar, length_penalty: float = 1.0):
        self.query, self.width, self.grammar, self.length_penalty = query, width, grammar, length_penalty
        self.scores = np.r_[0.0, np.full(width - 1, -np.inf)]  # only beam 0 starts alive
        self.states = [GrammarState(GRAMMARS[query.task], budget) for _ in range(width)]
        self.seqs: list[list[int]] = [[] for _ in range(width)]
        self.lps: list[list[float]] = [[] for _ in range(width)]
        self.finished: list[Hypothesis] = []
        self.rows: list[int] = []   # rows of the next `advance` call's logits holding the beams, set by the caller
        self.src: list[int] = []    # after `advance`: the row of those logits each next beam continues
        self.done = False

    def advance(self, logp: np.ndarray) -> bool:
        """One step: read this query's rows of `logp` (R, V), the step's log-probabilities (`log_softmax` of the
        model's logits, which the scheduler takes once for the whole batch: row for row the same numbers as one
        row at a time), and pick the next beams. False once done."""
        return self._greedy(logp[self.rows[0]]) if self.width == 1 else self._beams(logp)

    def _beams(self, logp: np.ndarray) -> bool:
        W, tok = self.width, self.grammar.tok
        logp = logp[self.rows]  # (W, V)
        mask = np.stack([self.grammar.allowed(s) for s in self.states])
        block = (np.where(mask, logp, -np.inf) + self.scores[:, None]).ravel()
        V = logp.shape[1]
        cont = []  # (source beam, token, score, grammar state, tokens, logprobs)
        for idx in np.argsort(-block, kind="stable")[: 2 * W]:
            if not np.isfinite(block[idx]) or len(cont) == W:
                break
            beam, t = int(idx) // V, int(idx) % V
            seq, lp = self.seqs[beam] + [t], self.lps[beam] + [float(logp[beam, t])]
            if t == tok.eos_id:
                self.finished.append(Hypothesis(seq, lp, float(np.sum(lp)) / len(lp) ** self.length_penalty))
                continue
            st = self.states[beam].copy()
            st.advance(t, tok)
            cont.append((beam, t, float(block[idx]), st, seq, lp))
        if len(self.finished) >= W or not cont:
            self.done, self.src = True, []
            return False
        while len(cont) < W:  # a tight grammar left fewer continuations: pad with dead beams
            beam, t, _, st, seq, lp = cont[-1]
            cont.append((beam, t, -np.inf, st.copy(), seq, lp))
        beams, _, scores, self.states, self.seqs, self.lps = (list(c) for c in zip(*cont, strict=True))
        self.scores = np.array(scores, dtype=np.float64)
        self.src = [self.rows[b] for b in beams]
        return True

    def _greedy(self, logp: np.ndarray) -> bool:
        """`advance` for one beam, `logp` its row (V,): the same choice (the first best allowed token), without
        the sort over W * V candidates or the copies that keeping several beams apart needs. Requests are
        mostly greedy, and at batch 1 this loop's Python time is a visible part of a step."""
        scores = np.where(self.grammar.allowed(self.states[0]), logp, -np.inf)
        t = int(np.argmax(scores))
        return self._take(t, float(scores[t]))

    def _take(self, t: int, lp: float) -> bool:
        """A greedy search's step once its token is chosen: `t`, the first best allowed token, and `lp` its
        log-probability (-inf where nothing allowed is possible)."""
        if not math.isfinite(lp):  # nothing allowed is possible (or the model gave NaN)
            self.done, self.src = True, []
            return False
        seq, lps = self.seqs[0], self.lps[0]
        if t == self.grammar.tok.eos_id:
            lp_all = lps + [lp]
            self.finished.append(Hypothesis(seq + [t], lp_all,
                                            float(np.sum(lp_all)) / len(lp_all) ** self.length_penalty))
            self.done, self.src = True, []
            return False
        seq.append(t)
        lps.append(lp)
        self.states[0].advance(t, self.grammar.tok)
        self.scores[0] += lp
        self.src = [self.rows[0]]
        return True

    def most_tokens(self) -> int:
        """The most tokens any beam may still generate: its budget, or fewer where no text is left in its
        grammar (a refer's four corners and <eos>). The scheduler prefers jobs with few (model/scheduler.py)."""
        most = 0
        for s in self.states:
            rest = s.phases[s.phase:]
            fixed = None if any(kind == "text" for kind, _ in rest) else sum(n for _, n in rest) - s.count
            most = max(most, s.budget if fixed is None else min(s.budget, fixed))
        return most

    def tokens(self) -> np.ndarray:
        """(W,) the token each beam feeds next."""
        return np.array([s[-1] for s in self.seqs], dtype=np.int64)

    def positions(self) -> np.ndarray:
        """(W,) the positions of those tokens."""
        return np.array([len(self.query.prompt) + len(s) - 1 for s in self.seqs], dtype=np.int64)

    def best(self, n: int) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: -h.score)[:n]


def advance_all(searches: list, logp: np.ndarray) -> list[bool]:
    """`advance` every search on the step's `logp` (R, V), in order; True for each still alive. The greedy
    beam searches (most requests) choose their tokens together, in one masked argmax over their rows: the same
    choices as one by one, without a numpy call per row for each."""
    greedy = [i for i, s in enumerate(searches) if type(s) is BeamSearch and s.width == 1]
    if len(greedy) < 2:
        return [s.advance(logp) for s in searches]
    alive: list[bool | None] = [None] * len(searches)
    masks = np.stack([searches[i].grammar.allowed(searches[i].states[0]) for i in greedy])
    scores = np.where(masks, logp[[searches[i].rows[0] for i in greedy]], -np.inf)
    tokens = scores.argmax(axis=1)
    for i, t, lp in zip(greedy, tokens.tolist(), scores[np.arange(len(greedy)), tokens].tolist(), strict=True):
        alive[i] = searches[i]._take(t, lp)
    return [s.advance(logp) if a is None else a for s, a in zip(searches, alive, strict=True)]


def next_rows(searches: list[BeamSearch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay running searches out as the rows of the next step call, in order: each search's `rows` become
    its slice of that call. Returns the rows to keep from the current state (for `select`), and the
    (R, 1) tokens and positions to step."""
    src: list[int] = []
    for s in searches:  # a search's live rows are its `src` (a beam search's: always `width`)
        s.rows = list(range(len(src), len(src) + len(s.src)))
        src += s.src
    tokens = np.concatenate([s.tokens() for s in searches])[:, None]
    positions = np.concatenate([s.positions() for s in searches])[:, None]
    return np.array(src, dtype=np.int64), tokens, positions

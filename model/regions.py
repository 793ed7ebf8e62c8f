"""Every object of an image, boxed and described: the search behind `/v1/ground` without a box (issue 16).

Prompted with `<bos> <GCap>`, LocCa's decoder writes the box of *one* object and its referring expression: the
distribution over the first location token (y0) is a mixture over the objects of the image, each a bump a few
bins wide. Greedy or beam search follows its highest mode and finds one or two objects (47% of them, issue 16);
this search enumerates the modes instead, in one batch of rows:

    1. corners   every y0 bin with probability >= `min_y_prob` (at most `max_y`), then in each of those rows the
                 peaks of x0 given y0 (local maxima >= `min_x_prob`, at most `x_peaks`): one row per top-left
                 corner, at most `max_rows` rows, the likeliest corners first;
    2. complete  each row greedily, under the task's grammar: y1, x1, <sep>, the expression, <eos>;
    3. group     rows by their expression: a referring expression picks out one object, so rows with the same
                 text found the same object (or are wrong); each group's box is its medoid (the box with the most
                 probability-weighted overlap with the group's others);
    4. listen    ask the model back (ARef, `<bos> <ARef> text <sep>` fed into the group's row) where that
                 expression is, and keep the group only where that box agrees with it (IoU >= 0.5): the
                 speaker-listener check of referring-expression generation (Mao et al., 2016; Yu et al., 2017),
                 which drops descriptions the model itself would not resolve to the box they describe.

It is one search of at most `max_rows` rows that the scheduler batches like any beam search (model/decoding.py
`BeamSearch`'s interface: `rows`, `advance`, `src`, `tokens`, `positions`), so it joins running batches and its
answer does not depend on them. How this compares with beam search and with caption -> phrase -> refer, measured:
docs/ground.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decoding import Grammar, GrammarState, Query
from .tasks import GRAMMARS, MIN_NEW_TOKENS, Tasks


@dataclass(frozen=True)
class RegionOptions:
    min_y_prob: float = 0.005     # y0 bins below this probability start no row
    max_y: int = 24               # most y0 bins branched
    min_x_prob: float = 0.05      # x0 peaks below this probability (given y0) start no row
    x_peaks: int = 3              # most x0 peaks per y0 bin
    max_rows: int = 32            # most rows at once (corners kept by joint probability)
    same_box_iou: float = 1.0     # once a row's box is written, rows whose boxes overlap a likelier row's this
                                  # much stop there (1.0: only identical boxes): fewer rows write texts
    listen: bool = True           # keep only regions whose text the model's ARef resolves back to their box
    agree_iou: float = 0.5        # ... with at least this IoU
    twins: bool = True            # caption the image beside, and name the twins it lists (model/phrases.py)

    def __post_init__(self):
        if not (0 < self.min_y_prob < 1 and 0 < self.min_x_prob < 1):
            raise ValueError("min_y_prob and min_x_prob are probabilities in (0, 1)")
        if min(self.max_y, self.x_peaks, self.max_rows) < 1 or not 0 < self.agree_iou <= 1:
            raise ValueError("need max_y, x_peaks, max_rows >= 1 and agree_iou in (0, 1]")


def iou(a, b) -> float:
    """IoU of two [x0, y0, x1, y1] boxes (any units: IoU does not change when x and y are scaled apart)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def peaks(p: np.ndarray, threshold: float, k: int) -> list[int]:
    """Indices of the local maxima of `p` (no neighbour higher) at or above `threshold`, best first, at most k."""
    left = np.r_[-np.inf, p[:-1]]
    right = np.r_[p[1:], -np.inf]
    idx = np.flatnonzero((p >= threshold) & (p >= left) & (p >= right))
    return [int(i) for i in idx[np.argsort(-p[idx], kind="stable")][:k]]


@dataclass
class Branch:
    """One row: a sequence being fed (its prompt) or generated."""
    ids: list[int]                 # prompt then generated tokens
    prompt: int                    # how many of `ids` are prompt
    cached: int                    # how many of `ids` are in the row's cache
    state: GrammarState
    lps: list[float] = field(default_factory=list)   # log-probability of each generated token
    lead: float = 0.0              # log-probability of the corner that started it (ranks the rows)
    checks: tuple[int, ...] = ()   # listen: the regions (indices into `found`) whose text it resolves

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt:]


@dataclass
class Region:
    tokens: list[int]              # the box's four location tokens, <sep>, the expression's text tokens
    score: float                   # mean log-probability of the generated tokens (box, <sep>, text, <eos>)
    weight: float                  # probability mass of the rows that found it (the group's)
    listened: list[int] | None = None  # the four location tokens the model's ARef gave for its text


class RegionSearch:
    """Enumerates the objects of one image (module docstring). Driven as `BeamSearch` is; `regions()` after."""

    def __init__(self, query: Query, budget: int, grammar: Grammar, tasks: Tasks, seq_len: int,
                 options: RegionOptions = RegionOptions()):
        """seq_len: the model's positions (a listener's prompt and box must fit in them)."""
        self.query, self.grammar, self.tasks, self.options = query, grammar, tasks, options
        self.tok, self.seq_len = grammar.tok, seq_len
        self.width = options.max_rows           # rows it may hold at once (the scheduler's budget)
        prompt = list(query.prompt)
        # The prefill puts the job's prompt in its row's cache; `share_row` is for a search that starts from
        # another's row (a grounded caption's: <bos> <Cap> leaves the slot 0 that <bos> <GCap> needs)
        self.branches = [Branch(prompt, len(prompt), len(prompt), GrammarState(GRAMMARS["ground"], budget))]
        self.found: list[Region] = []
        self.done_rows: list[Branch] = []       # proposing rows that wrote a box and a text
        self.rows: list[int] = []
        self.src: list[int] = []
        self.started = self.listening = self.done = False

    def share_row(self, cached: int) -> None:
        """Start from a row whose cache holds only the first `cached` tokens of this search's prompt."""
        self.branches[0].cached = cached

    # --- the interface the scheduler drives --------------------------------------------------------------
    def advance(self, logp: np.ndarray) -> bool:
        """Read this search's rows of `logp`, the step's log-probabilities (one row per live branch, in order;
        model/decoding.py `BeamSearch.advance`), move every branch on. Rows keep their order (a branch that ends
        leaves a gap, its branches follow it), so the backend moves few."""
        if self.started:                      # the step that made these logits cached one token of each
            for b in self.branches:
                b.cached += 1
        self.started = True
        rows = self.rows[: len(self.branches)]
        fed = [k for k, b in enumerate(self.branches) if b.cached == len(b.ids)]  # the others feed a prompt
        logp = logp[[rows[k] for k in fed]] if fed else None
        greedy = [i for i, k in enumerate(fed) if not self._corner(self.branches[k])]
        picked: dict[int, int] = {}
        if greedy:  # every greedy pick of the step at once: argmax over the allowed tokens of each row
            allowed = np.stack([self.grammar.allowed(self.branches[fed[i]].state) for i in greedy])
            picks = np.where(allowed, logp[greedy], -np.inf).argmax(axis=1)
            picked = dict(zip(greedy, picks.tolist(), strict=True))
        nxt: list[tuple[int, Branch]] = []    # (row of `logits` it continues, branch)
        at = dict(zip(fed, range(len(fed)), strict=True))
        for k, (row, b) in enumerate(zip(rows, self.branches, strict=True)):
            if k not in at:                   # still feeding its prompt: these logits are not for it
                nxt.append((row, b))
                continue
            i = at[k]
            if i not in picked:               # a corner: branch
                nxt += [(row, c) for c in self._branch(logp[i], b)]
                continue
            t = picked[i]
            b.ids.append(t)
            b.lps.append(float(logp[i, t]))
            if t != self.tok.eos_id:
                b.state.advance(t, self.tok)
                nxt.append((row, b))
            elif self.listening:
                for j in b.checks:
                    self.found[j].listened = b.generated[:4]
            elif len(b.generated) >= 7 and b.generated[4] == self.tok.sep_id:
                self.done_rows.append(b)
        if not self.listening:
            nxt = self._cap(nxt)
            if not nxt:                       # every proposing row is done: group, then listen
                nxt = self._listeners(self.rows[0] if self.rows else 0)
        self.branches = [b for _, b in nxt]
        self.src = [r for r, _ in nxt]
        self.done = not nxt
        return not self.done

    def _corner(self, b: Branch) -> bool:
        """Is b's next token a first corner's (y0 or x0), where the search branches?"""
        return not self.listening and b.state.phase == 0 and b.state.count < 2

    def tokens(self) -> np.ndarray:
        """(R,) the token each live row feeds next: the next of its prompt, or the one it generated last."""
        return np.array([b.ids[b.cached] for b in self.branches], dtype=np.int64)

    def positions(self) -> np.ndarray:
        return np.array([b.cached for b in self.branches], dtype=np.int64)

    def most_tokens(self) -> int:
        return self.branches[0].state.budget if self.branches else 0

    # --- the phases ----------------------------------------------------------------------------------
    def _branch(self, logp: np.ndarray, b: Branch) -> list[Branch]:
        """y0: every bin likely enough (a wide bump is several corners; the duplicates group later); x0 given
        y0: its peaks. The last bin is left for the second corner, as the grammar does."""
        o, tok = self.options, self.tok
        loc = logp[tok.loc_offset: tok.loc_offset + tok.num_loc - 1]
        loc = loc - np.logaddexp.reduce(loc)  # the probabilities among the corners the grammar allows
        p = np.exp(loc)
        if b.state.count == 0:
            order = np.argsort(-loc, kind="stable")[: o.max_y]
            picks = [int(y) for y in order if p[y] >= o.min_y_prob] or [int(order[0])]
        else:
            picks = peaks(p, o.min_x_prob, o.x_peaks) or [int(np.argmax(loc))]
        out = []
        for k in picks:
            state = b.state.copy()
            state.advance(tok.loc_offset + k, tok)
            out.append(Branch(b.ids + [tok.loc_offset + k], b.prompt, b.cached, state, b.lps + [float(loc[k])],
                              b.lead + float(loc[k])))
        return out

    def _cap(self, nxt: list[tuple[int, Branch]]) -> list[tuple[int, Branch]]:
        """Of rows whose boxes, just written, are the same (or overlap `same_box_iou`), the likeliest; then at
        most `max_rows` rows, the likeliest corners (the kept ones in their order)."""
        boxed = [k for k, (_, b) in enumerate(nxt) if len(b.generated) == 4]  # a box written this step
        gone: set[int] = set()
        if boxed:
            boxes = {k: self._norm(nxt[k][1].generated[:4]) for k in boxed}
            kept: list[int] = []
            for k in sorted(boxed, key=lambda k: -nxt[k][1].lead):
                if any(iou(boxes[k], boxes[j]) >= self.options.same_box_iou for j in kept):  # identical: 1.0
                    gone.add(k)
                else:
                    kept.append(k)
        keep = [k for k in range(len(nxt)) if k not in gone]
        if len(keep) > self.options.max_rows:
            keep = sorted(sorted(keep, key=lambda k: -nxt[k][1].lead)[: self.options.max_rows])
        return [nxt[k] for k in keep]

    def _groups(self) -> list[Region]:
        """Rows -> regions: rows with the same text whose boxes overlap (a chain of overlaps) found one object;
        its box is the medoid of theirs, weighted by their corners' probabilities. Two such clusters with one
        text (twins described alike, or a stray corner) stay two regions; the listener tells them apart."""
        by_text: dict[tuple[int, ...], list[Branch]] = {}
        for b in self.done_rows:
            by_text.setdefault(tuple(b.generated[5:-1]), []).append(b)
        regions = []
        for group in by_text.values():
            boxes = [self._norm(b.generated[:4]) for b in group]
            for cluster in _overlapping(boxes):
                w = {i: float(np.exp(group[i].lead)) for i in cluster}
                best = max(cluster, key=lambda i: sum(w[j] * iou(boxes[i], boxes[j]) for j in cluster))
                b = group[best]
                regions.append(Region(b.generated[:-1], float(np.mean(b.lps)), sum(w.values())))
        return sorted(regions, key=lambda r: -r.score)

    def _listeners(self, row: int) -> list[tuple[int, Branch]]:
        """Group the finished rows into regions, then (options.listen) one ARef row per distinct text, in
        `row` (any row of this image: the listener's prompt overwrites its cache from slot 0)."""
        self.found = self._groups()
        if not self.options.listen:
            return []
        self.listening = True
        out, texts = [], {}
        for i, r in enumerate(self.found):
            texts.setdefault(tuple(r.tokens[5:]), []).append(i)
        for text, members in texts.items():
            prompt = self.tasks.refer_prompt(self.tok.decode(list(text)).strip())
            budget = self.seq_len - len(prompt)
            if budget < MIN_NEW_TOKENS["refer"]:
                continue                      # no room to listen: the regions stay unchecked
            out.append((row, Branch(prompt, len(prompt), 0, GrammarState(GRAMMARS["refer"], budget),
                                    checks=tuple(members))))
        return out

    def _norm(self, locs: list[int]) -> list[float]:
        """Four location tokens -> the box in the unit square, [x0, y0, x1, y1]."""
        return self.tasks.codec.decode(locs, 1.0, 1.0)

    # --- the answer ------------------------------------------------------------------------------------
    def agrees(self, r: Region) -> bool:
        """The listener put r's text on r's box (or did not listen)."""
        return r.listened is None or iou(self._norm(r.tokens[:4]), self._norm(r.listened)) >= self.options.agree_iou

    def candidates(self, width: float, height: float) -> list[dict]:
        """Every region found, best first, in pixels, with `agrees` (the listener's verdict)."""
        return [{**self.tasks.parse("ground", r.tokens, width, height), "score": r.score,
                 "agrees": self.agrees(r), "weight": r.weight} for r in self.found]

    def regions(self, width: float, height: float, max_regions: int) -> list[dict]:
        """The regions found, best first: box (pixels), text, score; those the listener disowned left out."""
        return [public(r) for r in self.candidates(width, height) if r["agrees"]][:max_regions]


def public(region: dict) -> dict:
    """A region as answered: box, text, score."""
    return {k: region[k] for k in ("box", "text", "score")}


def _overlapping(boxes: list[list[float]]) -> list[list[int]]:
    """Indices of `boxes` in clusters: two boxes that overlap at all are in one cluster (single linkage)."""
    parent = list(range(len(boxes)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(boxes)):
        for j in range(i):
            if iou(boxes[i], boxes[j]) > 0:
                parent[root(i)] = root(j)
    clusters: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        clusters.setdefault(root(i), []).append(i)
    return list(clusters.values())

"""Finding every object (model/regions.py) and grounded captions (model/phrases.py), issue 16.

A scripted model stands in for LocCa where the search's logic is under test: it knows a scene's objects and
answers as a trained model would (the first corner a mixture over the objects, a few bins wide; the rest of a
box and its text given the corner; ARef the box of an expression), so the tests can say exactly which regions
the search must find. Random weights check what must hold for any model: well-formed, bounded, batch-independent.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import get_size
from model.core import EngineCore
from model.decoding import Grammar, Query
from model.inference import TorchInference
from model.model import LocCa
from model.phrases import attribute_words, link, object_phrases
from model.predictor import Predictor
from model.regions import RegionOptions, RegionSearch, iou, peaks
from model.requests import Request
from model.scheduler import ALL_AT_ONCE

# --- a scripted model -------------------------------------------------------------------------------------


class Scripted:
    """The inference interface over rows that are token lists; logits from `world(image, tokens)`."""

    def __init__(self, world, vocab: int, seq_len: int = 48):
        self.world, self.V = world, vocab
        self.cfg = SimpleNamespace(max_seq_len=seq_len, image_size=32)
        self.steps = 0

    def encode(self, pixels):
        return list(range(len(pixels)))

    def start(self, cross, images, slots=None):
        return [[int(cross[i]), []] for i in images]

    def step(self, state, tokens, positions):
        self.steps += 1
        out = np.full((len(state), tokens.shape[1], self.V), -30.0, dtype=np.float32)
        for r, (row, toks, pos) in enumerate(zip(state, tokens, positions, strict=True)):
            for k, (t, p) in enumerate(zip(toks, pos, strict=True)):
                row[1] = row[1][:p] + [int(t)]  # the slot of position p, and nothing after it is seen
                out[r, k] = self.world(row[0], row[1])
        return out

    def select(self, state, rows):
        state[:] = [[state[i][0], list(state[i][1])] for i in rows]

    def merge(self, a, b):
        return a + b


def scene_world(tok, tasks, objects, caption="", liar=None):
    """objects: [(y0, x0, y1, x1) bins, text]. liar: an expression ARef resolves to a box of its own."""
    L = tok.loc_offset
    enc = {text: tok.encode(text) for _, text in objects}
    cap = tok.encode(caption) if caption else []

    def logits(image, seq):
        z = np.full(tok.vocab_size, -30.0, dtype=np.float32)
        if seq[:2] == [tok.bos_id, tok.cap_id]:
            gen = seq[2:]
            z[cap[len(gen)] if len(gen) < len(cap) else tok.eos_id] = 10
        elif seq[:2] == [tok.bos_id, tok.gcap_id]:
            gen = seq[2:]
            if not gen:  # the first corner: a bump over y0 - 1 .. y0 + 1 for each object
                for (y0, *_), _ in objects:
                    for d, w in ((-1, 1.0), (0, 2.0), (1, 1.0)):
                        z[L + y0 + d] = np.logaddexp(z[L + y0 + d], np.log(w))
                return z
            y = gen[0] - L
            near = [o for o in objects if abs(o[0][0] - y) <= 1]
            if len(gen) == 1:  # x0 given y0: the objects whose first corner is near
                for (_, x0, *_), _ in near or objects[:1]:
                    z[L + x0] = 0.0
                return z
            x = gen[1] - L
            box, text = min(near or objects, key=lambda o: abs(o[0][1] - x) + abs(o[0][0] - y))
            rest = [L + box[2], L + box[3], tok.sep_id, *enc[text], tok.eos_id]
            z[rest[len(gen) - 2] if len(gen) - 2 < len(rest) else tok.eos_id] = 10
        elif seq[:2] == [tok.bos_id, tok.aref_id]:
            sep = seq.index(tok.sep_id) if tok.sep_id in seq else None
            if sep is None:
                return z
            text = tok.decode(seq[2:sep]).strip()
            box = liar[1] if liar and text == liar[0] else next(b for b, t in objects if t == text)
            gen = seq[sep + 1:]
            out = [L + box[0], L + box[1], L + box[2], L + box[3], tok.eos_id]
            z[out[len(gen)] if len(gen) < len(out) else tok.eos_id] = 10
        return z

    return logits


def find(tok, tasks, world, options=RegionOptions(), images=1):
    inf = Scripted(world, tok.vocab_size)
    grammar = Grammar(tok)
    searches = [RegionSearch(Query(i, "ground", tuple(tasks.ground_prompt())), 46, grammar, tasks, 48, options)
                for i in range(images)]
    run(inf, tasks, searches, np.zeros((images, 3, 32, 32), np.float32))
    return searches, inf


def run(inf, tasks, searches, pixels):
    """The searches to the end through the engine core, search i on image pixels[i], all in one batch."""
    core = EngineCore(inf, tasks, ALL_AT_ONCE)
    for search, image in zip(searches, list(pixels), strict=True):
        core.submit(search, image)
    core.run()


OBJECTS = [((10, 5, 20, 15), "the red circle"),
           ((10, 40, 18, 48), "the square"),           # same first corner row as the circle
           ((40, 20, 55, 35), "the large blue cross"),
           ((42, 50, 50, 58), "the small blue cross")]  # first corners two bins apart


def test_every_object_is_found_once_with_its_text(tok, tasks):
    (s,), _ = find(tok, tasks, scene_world(tok, tasks, OBJECTS))
    regions = s.regions(64, 64, 32)
    L = tok.loc_offset
    got = sorted((r["text"], r["box"]) for r in regions)
    want = sorted((t, tasks.codec.decode([L + k for k in box], 64, 64)) for box, t in OBJECTS)
    assert got == want, "each object once, with its exact box (not a neighbouring corner's) and its text"
    assert [r["score"] for r in regions] == sorted((r["score"] for r in regions), reverse=True)


def test_max_regions_and_the_row_budget_bound_the_search(tok, tasks):
    world = scene_world(tok, tasks, OBJECTS)
    (s,), _ = find(tok, tasks, world)
    assert len(s.regions(64, 64, 2)) == 2
    (s,), _ = find(tok, tasks, world, RegionOptions(max_rows=3))
    assert len(s.regions(64, 64, 32)) <= 3, "no more corners followed than rows allowed"


def test_the_listener_drops_a_text_that_does_not_name_its_box(tok, tasks):
    liar = ("the square", (50, 2, 60, 12))  # ARef puts "the square" elsewhere
    (s,), _ = find(tok, tasks, scene_world(tok, tasks, OBJECTS, liar=liar))
    assert "the square" not in [r["text"] for r in s.regions(64, 64, 32)]
    (s,), _ = find(tok, tasks, scene_world(tok, tasks, OBJECTS, liar=liar), RegionOptions(listen=False))
    assert "the square" in [r["text"] for r in s.regions(64, 64, 32)]


def test_a_search_answers_the_same_alone_and_beside_others(tok, tasks):
    world = scene_world(tok, tasks, OBJECTS)
    (alone,), _ = find(tok, tasks, world)
    together, _ = find(tok, tasks, world, images=3)
    for s in together:
        assert s.regions(64, 64, 32) == alone.regions(64, 64, 32)


def test_a_grounded_caption_links_each_phrase_to_its_box(tok, tasks):
    objects = [((10, 5, 20, 15), "the small red circle on the left"), ((30, 25, 40, 35), "the blue square"),
               ((10, 45, 20, 55), "the small red circle on the right")]
    caption = "a small red circle, a large blue square and a small red circle"
    inf = Scripted(scene_world(tok, tasks, objects, caption), tok.vocab_size)
    predictor = Predictor(inf, tasks)
    image = Image.new("RGB", (64, 64))
    (out,) = predictor.run([image], [(0, Request("caption", grounded=True))])
    assert out.text == caption
    assert [p.text for p in out.phrases] == ["small red circle", "large blue square", "small red circle"]
    for p in out.phrases:
        assert caption[p.span[0]:p.span[1]] == p.text
    want = [tasks.codec.decode([tok.loc_offset + k for k in objects[i][0]], 64, 64) for i in (0, 1, 2)]
    assert [p.box for p in out.phrases] == want, "twins in left-to-right order"
    (plain,) = predictor.run([image], [(0, Request("caption"))])
    assert plain.text == out.text and plain.score == out.score and plain.phrases is None


# --- any weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_regions_are_well_formed_and_distinct_on_random_weights(seed, tok, tasks):
    torch.manual_seed(seed)
    model = LocCa(get_size("tiny", vocab_size=tok.vocab_size)).eval()
    for p in model.parameters():
        p.data.mul_(1 + 2 * seed)
    inf = TorchInference(model)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    grammar, options = Grammar(tok), RegionOptions(max_rows=8)
    searches = [RegionSearch(Query(i, "ground", tuple(tasks.ground_prompt())), 12, grammar, tasks, 48, options)
                for i in range(2)]
    widths = []
    original = inf.step

    def step(state, tokens, positions):
        widths.append(len(tokens))
        return original(state, tokens, positions)

    inf.step = step
    run(inf, tasks, searches, pixels)
    assert max(widths) <= 2 * options.max_rows
    for s in searches:
        regions = s.regions(300, 200, 32)
        for r in regions:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200 and r["text"] and r["score"] <= 0
        for i, a in enumerate(regions):
            for b in regions[i + 1:]:
                assert a["text"] != b["text"], "one region per referring expression"


# --- pieces -----------------------------------------------------------------------------------------------


def test_peaks():
    p = np.array([0.0, 0.2, 0.1, 0.05, 0.3, 0.3, 0.0, 0.04])
    assert peaks(p, 0.05, 5) == [4, 5, 1]
    assert peaks(p, 0.05, 2) == [4, 5]
    assert peaks(p, 0.5, 3) == []


def test_object_phrases_and_attribute_words():
    c = "a large red circle, a small blue square and a small green triangle"
    assert [c[a:b] for a, b in object_phrases(c)] == ["large red circle", "small blue square", "small green triangle"]
    assert object_phrases("a black cross") == [(2, 13)]
    assert object_phrases("") == []
    assert attribute_words("the small red circle at the top") == ["small", "red", "circle"]
    assert attribute_words("the circle") == ["circle"]


def test_link_keeps_order_and_compatibility():
    phrases = ["large red circle", "small blue square", "small blue square", "black cross"]
    regions = [{"box": [60, 0, 70, 10], "text": "the small blue square on the right"},
               {"box": [0, 0, 10, 10], "text": "the circle"},
               {"box": [30, 0, 40, 10], "text": "the small blue square on the left"},
               {"box": [90, 0, 99, 10], "text": "the green diamond"}]  # no phrase for it; no region for the cross
    assert link(phrases, regions) == [1, 2, 0, None]
    assert link([], regions) == []
    assert link(phrases, []) == [None] * 4
    # a caption that lists two neighbours out of order still links both; a stray corner described like an
    # object loses to the object's heavier region
    swapped = ["small blue square", "large red circle"]
    two = [{"box": [0, 0, 10, 10], "text": "the red circle"}, {"box": [30, 0, 40, 10], "text": "the square"}]
    assert link(swapped, two) == [1, 0]
    stray = [{"box": [0, 0, 10, 10], "text": "the red circle", "weight": 0.01},
             {"box": [50, 0, 60, 10], "text": "the red circle", "weight": 0.3}]
    assert link(["large red circle"], stray) == [1]


# --- the bundled model ------------------------------------------------------------------------------------


def test_the_bundled_model_finds_most_objects_once_each():
    """The default model on held-out scenes (the full figures: docs/ground.md): a broken search finds ~half."""
    from model.checkpoint import load
    from model.evaluate import proposal_scores
    from model.heldout import heldout_scenes

    bundle = load("models/locca-tiny-shapes/checkpoint.safetensors")
    predictor = Predictor(TorchInference(bundle.model), bundle.tasks)
    scenes = heldout_scenes(24, offset=2_000_000_000)
    answers = predictor.run([s.image for s in scenes], [(i, Request("ground")) for i in range(len(scenes))])
    regions = [[dataclasses.asdict(r) for r in a.regions] for a in answers]
    got = proposal_scores(scenes, regions)
    assert got["proposal_recall"] >= 0.85 and got["proposal_precision"] >= 0.9, got
    for rs in regions:
        for i, a in enumerate(rs):
            assert not any(a["text"] == b["text"] and iou(a["box"], b["box"]) >= 0.5 for b in rs[i + 1:])

"""The encoded-image cache (model/encoder_cache.py) and the engine core around it: the byte bound holds under a
flood of distinct images, the least recently used entry goes first, different images never share an entry, a
hit gives the answer a miss gives (and the answer without any cache), and the encoder runs once per image."""

import dataclasses

import numpy as np
import pytest
import torch

from model.core import EngineCore
from model.encoder_cache import EncoderCache, image_key
from model.image import preprocess
from model.inference import TorchInference
from model.requests import Request
from model.scheduler import ALL_AT_ONCE
from model.shapes import generate_scene


@dataclasses.dataclass
class Blob:
    """A stand-in Cross: only its size matters to the cache."""
    nbytes: int
    name: str = ""


def test_the_byte_bound_holds_and_the_least_recently_used_goes_first():
    cache = EncoderCache(1000)
    for i in range(3):
        cache.put(b"k%d" % i, Blob(300, str(i)))
    assert cache.bytes == 900 and len(cache) == 3
    assert cache.get(b"k0").name == "0"  # k0 is now the most recently used: k1 goes first
    cache.put(b"k3", Blob(300, "3"))
    assert b"k1" not in cache and all(k in cache for k in (b"k0", b"k2", b"k3"))
    cache.put(b"big", Blob(1001))  # larger than the whole bound: not kept, nothing evicted for it
    assert b"big" not in cache and len(cache) == 3
    cache.put(b"k2", Blob(600, "2'"))  # replacing an entry counts its new size once
    assert cache.bytes <= 1000 and cache.get(b"k2").name == "2'"
    stats = cache.take_stats()
    assert (stats.hits, stats.misses, stats.evictions) == (2, 0, 2) and stats.bytes == cache.bytes
    assert cache.get(b"k1") is None and cache.take_stats().misses == 1  # counts start again after take_stats


def test_a_flood_of_distinct_images_never_goes_over_the_bound(rng):
    cache = EncoderCache(10_000)
    for _i in range(2000):
        cache.put(image_key(rng.random((3, 4, 4), dtype=np.float32)), Blob(int(rng.integers(1, 3000))))
        assert cache.bytes <= 10_000
        assert cache.bytes == sum(b.nbytes for b in cache._entries.values())
    assert cache.take_stats().evictions > 1900


def test_image_keys_tell_every_difference_apart(rng):
    a = rng.random((3, 8, 8), dtype=np.float32)
    assert image_key(a) == image_key(a.copy())
    b = a.copy()
    b[2, 7, 7] = np.nextafter(b[2, 7, 7], 2)  # one value, one ulp
    assert image_key(b) != image_key(a)
    assert image_key(a.reshape(3, 4, 16)) != image_key(a)  # the same bytes, another shape
    assert image_key(a.astype(np.float64)) != image_key(a)
    assert image_key(np.asfortranarray(a)) == image_key(a)  # the values, not the memory layout


@pytest.fixture(scope="module")
def inference(tiny_model, one_thread):
    return TorchInference(tiny_model)


class CountingEncoder:
    """The inference interface, counting the images the encoder is asked to encode."""

    def __init__(self, inference):
        self.inner, self.encoded = inference, 0

    def encode(self, pixels):
        self.encoded += len(pixels)
        return self.inner.encode(pixels)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def asks(scene):
    box = tuple(float(v) for v in scene.objects[0].box)
    return [Request("refer", expression=e) for e in scene.expressions[:3]] + [
        Request("describe", box=box, max_new_tokens=6), Request("caption", max_new_tokens=8)]


def answer_all(core, scenes, copies=True):
    """Every ask of every scene, each with its own copy of the pixels (as the server's requests are)."""
    ids = {}
    for i, scene in enumerate(scenes):
        pixels = preprocess(scene.image, core.image_size)
        for k, request in enumerate(asks(scene)):
            ids[core.add(request, pixels.copy() if copies else pixels, scene.image.size)] = (i, k)
    return {ids[f.id]: f.result for f in core.run()}


def test_a_hit_answers_as_a_miss_and_as_no_cache(inference, tasks):
    scenes = [generate_scene(seed) for seed in range(3)]
    counting = CountingEncoder(inference)
    cached = EngineCore(counting, tasks, ALL_AT_ONCE, cache_bytes=64 << 20)
    first = answer_all(cached, scenes)  # misses: every image encoded once, its 5 requests sharing the row
    assert counting.encoded == 3
    stats = cached.take_cache_stats()
    assert (stats.misses, stats.hits, stats.entries) == (3, 0, 3)
    again = answer_all(cached, scenes)  # hits: no encoder call at all
    assert counting.encoded == 3 and cached.take_cache_stats().hits == 3
    plain = answer_all(EngineCore(inference, tasks, ALL_AT_ONCE), scenes)
    assert len(first) == len(plain) == sum(len(asks(s)) for s in scenes)
    for key, result in plain.items():
        for other in (first[key], again[key]):
            assert dataclasses.replace(other, score=0.0) == dataclasses.replace(result, score=0.0)
            assert other.score == pytest.approx(result.score, abs=1e-4)


def test_a_prefill_of_cached_and_new_images_encodes_only_the_new(inference, tasks):
    scenes = [generate_scene(seed) for seed in range(4)]
    counting = CountingEncoder(inference)
    core = EngineCore(counting, tasks, ALL_AT_ONCE, cache_bytes=64 << 20)
    answer_all(core, scenes[:2])
    core.take_stats()
    mixed = answer_all(core, [scenes[3], scenes[0], scenes[2], scenes[1]])
    assert core.take_stats().prefill_sizes == [4] and counting.encoded == 2 + 2  # one prefill: two cached, two new
    alone = answer_all(EngineCore(inference, tasks, ALL_AT_ONCE), [scenes[3], scenes[0], scenes[2], scenes[1]])
    for key, result in alone.items():
        assert dataclasses.replace(mixed[key], score=0.0) == dataclasses.replace(result, score=0.0)


def test_different_images_never_share_an_entry(inference, tasks):
    """Two scenes that differ in one pixel value get two entries, and each its own answers."""
    scene = generate_scene(7)
    core = EngineCore(inference, tasks, ALL_AT_ONCE, cache_bytes=64 << 20)
    pixels = preprocess(scene.image, core.image_size)
    nudged = pixels.copy()
    nudged[:, :16, :16] = 1.0  # a white corner
    request = Request("caption", max_new_tokens=8)
    core.add(request, pixels, scene.image.size)
    core.add(request, nudged, scene.image.size)
    core.run()
    stats = core.take_cache_stats()
    assert stats.entries == 2 and stats.misses == 2
    direct = inference.encode(np.stack([pixels, nudged]))
    cached = [core.cache.get(image_key(p)) for p in (pixels, nudged)]
    for one, i in zip(cached, range(2), strict=True):
        torch.testing.assert_close(one.k[:, 0], direct.k[:, i], atol=1e-5, rtol=1e-5)


def test_the_bound_holds_in_the_core_under_a_flood_of_images(inference, tasks):
    per_image = inference.encode(np.zeros((1, 3, inference.cfg.image_size, inference.cfg.image_size),
                                          np.float32)).nbytes
    core = EngineCore(inference, tasks, dataclasses.replace(ALL_AT_ONCE, max_batch=4), cache_bytes=3 * per_image)
    rng = np.random.default_rng(1)
    for _ in range(10):
        core.add(Request("caption", max_new_tokens=2), rng.random((3, 128, 128), dtype=np.float32), (128, 128))
    core.run()
    stats = core.take_cache_stats()
    assert stats.misses == 10 and stats.entries == 3 and stats.evictions == 7 and stats.bytes <= 3 * per_image


def test_split_then_join_gives_the_batch_back(inference):
    pixels = np.random.default_rng(2).random((3, 3, 128, 128), dtype=np.float32)
    cross = inference.encode(pixels)
    parts = inference.split(cross)
    assert len(parts) == 3 and all(p.nbytes * 3 == cross.nbytes for p in parts)
    joined = inference.join([parts[2], parts[0]])
    torch.testing.assert_close(joined.k, cross.k[:, [2, 0]])
    torch.testing.assert_close(joined.v, cross.v[:, [2, 0]])
    assert parts[0].k.untyped_storage().nbytes() * 3 == cross.k.untyped_storage().nbytes()  # its own memory

"""Box codec properties: round trips within half a bin, clipping, order, configurable bins and rounding."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.codec import BoxCodec
from model.config import BoxConfig

sizes = st.integers(16, 4096)
coords = st.floats(0.0, 1.0, allow_nan=False)
configs = st.builds(BoxConfig, bins=st.sampled_from([16, 64, 100, 1024]), order=st.sampled_from(["yxyx", "xyxy"]),
                    rounding=st.sampled_from(["floor", "round"]))


@settings(max_examples=300, deadline=None)
@given(configs, sizes, sizes, coords, coords, coords, coords, st.integers(0, 5000))
def test_round_trip_error_is_at_most_half_a_bin(cfg, w, h, a, b, c, d, offset):
    codec = BoxCodec(cfg, loc_offset=offset)
    box = [min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h]
    tokens = codec.encode(box, w, h)
    assert len(tokens) == 4 and all(codec.is_loc(t) for t in tokens)
    back = codec.decode(tokens, w, h)
    for got, want, side in zip(back, box, (w, h, w, h), strict=True):
        assert abs(got - want) <= codec.half_bin * side * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(configs, sizes, sizes, st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=4, max_size=4))
def test_out_of_range_boxes_are_clipped_into_the_image(cfg, w, h, box):
    codec = BoxCodec(cfg)
    back = codec.decode(codec.encode(box, w, h), w, h)
    for v, side in zip(back, (w, h, w, h), strict=True):
        assert 0.0 <= v <= side


def test_default_order_is_y0_x0_y1_x1_and_1024_bins():
    codec = BoxCodec(BoxConfig(), loc_offset=10)
    # x0 = 0.25, y0 = 0.5, x1 = 0.75, y1 = 1.0 of a 400 x 200 image
    assert codec.encode([100, 100, 300, 200], 400, 200) == [10 + 512, 10 + 256, 10 + 1023, 10 + 768]


def test_round_mode_is_exact_at_the_edges():
    codec = BoxCodec(BoxConfig(bins=64, rounding="round"))
    assert codec.decode(codec.encode([0, 0, 333, 77], 333, 77), 333, 77) == [0.0, 0.0, 333.0, 77.0]


def test_decode_refuses_anything_but_four_location_tokens():
    codec = BoxCodec(BoxConfig(bins=16), loc_offset=100)
    for bad in ([100, 101, 102], [100, 101, 102, 99], [100, 101, 102, 116]):
        with pytest.raises(ValueError):
            codec.decode(bad, 10, 10)

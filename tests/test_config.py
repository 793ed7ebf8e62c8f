"""Contract tests over every named model size: tiny is built and run for real, the paper's sizes on the
meta device (no memory), with their parameter counts checked against the papers' encoders."""

import pytest
import torch

from model.config import PAPER_ENCODER_PARAMS, SIZES, BoxConfig, ModelConfig, get_size
from model.model import LocCa, count_parameters


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_builds_with_consistent_shapes(name):
    cfg = get_size(name, vocab_size=33_054)
    with torch.device("meta"):
        model = LocCa(cfg)
        visual = model.encode(torch.empty(2, 3, cfg.image_size, cfg.image_size))
        ck, cv = model.cross_kv(visual)
        k, v = model.empty_cache(2)
        logits = model.decode_step(torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3), k, v, ck, cv)
    head_dim = cfg.dec_width // cfg.dec_heads
    assert visual.shape == (2, cfg.num_patches, cfg.enc_width)
    assert ck.shape == (cfg.dec_depth, 2, cfg.dec_heads, cfg.num_patches, head_dim)
    assert k.shape == (cfg.dec_depth, 2, cfg.dec_heads, cfg.max_seq_len, head_dim)
    assert logits.shape == (2, 3, cfg.vocab_size)
    n = count_parameters(model)
    print(f"{name}: {n / 1e6:.1f} M parameters, encoder {count_parameters(model.encoder) / 1e6:.1f} M")
    if name in PAPER_ENCODER_PARAMS:
        # the ViT papers' encoder counts include a classifier head / cls token we do not have: within 3 %
        assert abs(count_parameters(model.encoder) - PAPER_ENCODER_PARAMS[name]) / PAPER_ENCODER_PARAMS[name] < 0.03


def test_tiny_is_a_cpu_model(tok):
    model = LocCa(get_size("tiny", vocab_size=tok.vocab_size))
    assert 2e6 <= count_parameters(model) <= 6e6
    logits = model(torch.randn(2, 3, 128, 128), torch.zeros(2, 3, 5, dtype=torch.long))
    assert logits.shape == (2, 3, 5, tok.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad", [dict(image_size=100), dict(enc_heads=5), dict(enc_posemb="rope"),
                                 dict(dropout=1.0), dict(dec_depth=0), dict(vocab_size=-1)])
def test_invalid_model_configs_are_refused(bad):
    with pytest.raises(ValueError):
        get_size("tiny", **bad)


@pytest.mark.parametrize("bad", [dict(bins=1), dict(order="xxyy"), dict(rounding="ceil")])
def test_invalid_box_configs_are_refused(bad):
    with pytest.raises(ValueError):
        BoxConfig(**bad)


def test_unknown_size_names_the_choices():
    with pytest.raises(KeyError, match="tiny"):
        get_size("XL/8")
    assert ModelConfig().grid == 14

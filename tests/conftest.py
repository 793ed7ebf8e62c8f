"""Shared fixtures: a small tokenizer and random-weight tiny models, built once per session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.codec import BoxCodec
from model.config import BoxConfig, get_size
from model.model import LocCa
from model.tasks import Tasks
from model.tokenizer import LoccaTokenizer

TEXTS = [
    "a large red circle, a small blue square and a small green triangle",
    "the red circle on the left", "the large circle at the top", "the small purple cross at the bottom",
    "a small yellow diamond and a large black cross", "the green square on the right",
]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tok() -> LoccaTokenizer:
    return LoccaTokenizer.train(TEXTS * 20, vocab_size=320, loc_bins=64)


@pytest.fixture(scope="session")
def tasks(tok) -> Tasks:
    return Tasks(tok, BoxCodec(BoxConfig(bins=64), tok.loc_offset))


@pytest.fixture(scope="session")
def tiny_model(tok) -> LocCa:
    torch.manual_seed(0)
    return LocCa(get_size("tiny", vocab_size=tok.vocab_size)).eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

"""Shared fixtures: a small tokenizer and random-weight tiny models, built once per session."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model import checkpoint
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


@pytest.fixture(scope="session")
def quick_model_path(tmp_path_factory, tiny_model, tok):
    """The random tiny model saved as a checkpoint (step 7), nudged towards <eos> (the final LayerNorm's bias
    along the tied <eos> embedding adds ~4 to its logit) so that texts end after a few tokens, as a trained
    model's do: quicker server and benchmark tests."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        e = model.tok_emb.weight[tok.eos_id]
        model.ln.bias.copy_(4.0 * e / e.dot(e))
    path = tmp_path_factory.mktemp("quick_model") / "checkpoint.safetensors"
    checkpoint.save(path, model, tok, BoxConfig(bins=64), step=7)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: the suite shares 2 cores, and spinning pools fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def bundled_server(tmp_path_factory):
    """A real server of the bundled default model (torch backend), started once for the tests that only
    need one to answer: the demo page, render=png, `locca predict --url`. Images over 1 M pixels are 413."""
    from service import launch

    with launch.launch(tmp_path_factory.mktemp("bundled") / "serve.log", model="models/locca-tiny-shapes",
                       backend="torch", threads=1, max_image_pixels=1_000_000) as server:
        yield server

"""The encoder-transfer experiment (issue 17): encoder-only initialisation, a frozen encoder, refer-only evaluation,
and `locca transfer` end to end at smoke scale."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.configs import load
from model.evaluate import evaluate
from model.heldout import heldout_scenes
from model.inference import TorchInference
from model.train import copy_encoder, train
from model.transfer import FLOOR, Job, plan

ROOT = Path(__file__).resolve().parents[1]
SMOKE = load("smoke")
DEFAULT = ROOT / "models" / "locca-tiny-shapes" / "checkpoint.safetensors"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A smoke model trained for a few steps: the encoder the other runs start from."""
    return train(SMOKE.replace(steps=3), tmp_path_factory.mktemp("source") / "run", progress=False)


def test_init_encoder_from_copies_the_encoder_and_nothing_else(source):
    src = checkpoint.load(source)
    torch.manual_seed(123)
    fresh = checkpoint.build(SMOKE.model, src.tok, SMOKE.box)
    model = checkpoint.build(SMOKE.model, src.tok, SMOKE.box)
    model.load_state_dict(fresh.state_dict())
    copy_encoder(model, source)
    assert _same(model.encoder, src.model.encoder) and not _same(fresh.encoder, src.model.encoder)
    for part in ("blocks", "tok_emb", "pos_emb", "ln"):  # decoder, cross-attention, embeddings: as initialised
        assert _same(getattr(model, part), getattr(fresh, part))
        assert not _same(getattr(model, part), getattr(src.model, part))
    other = checkpoint.build(SMOKE.model.replace(enc_width=96), src.tok, SMOKE.box)
    with pytest.raises(ValueError, match="enc_width 64 here 96"):
        copy_encoder(other, source)


def test_frozen_encoder_stays_bit_identical_while_the_decoder_learns(source, tmp_path):
    cfg = SMOKE.replace(init_encoder_from=str(source), freeze_encoder=True, task_weights=(0.0, 1.0, 0.0))
    out = tmp_path / "probe"
    first = checkpoint.load(train(cfg, out, stop_after=1, progress=False)).model
    second = checkpoint.load(train(cfg, out, stop_after=1, progress=False)).model  # one more step, resumed
    src = checkpoint.load(source).model
    assert _same(first.encoder, src.encoder) and _same(second.encoder, src.encoder)
    assert not _same(first.blocks, second.blocks) and not _same(first.tok_emb, second.tok_emb)
    optimised = torch.load(out / "train_state.pt", weights_only=True)["optimizer"]["state"]
    assert len(optimised) == sum(1 for n, _ in first.named_parameters() if not n.startswith("encoder."))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["Cap"] is None and row["GCap"] is None and row["ARef"] > 0  # only ARef is trained and logged
    with pytest.raises(ValueError, match="exclude each other"):
        SMOKE.replace(init_from=str(source), init_encoder_from=str(source))


def test_refer_only_evaluation_equals_the_full_evaluations_refer_figures():
    bundle = checkpoint.load(DEFAULT)
    inference, scenes = TorchInference(bundle.model), heldout_scenes(12, offset=1_700_000_000)
    full = evaluate(inference, bundle.tasks, scenes, progress=False)
    refer = evaluate(inference, bundle.tasks, scenes, progress=False, parts=("refer",))
    assert refer["refer_acc50"] == full["refer_acc50"] and refer["refer_miou"] == full["refer_miou"]
    assert refer["refer_acc50"] > 0.8  # the default model: a real figure, not a vacuous equality
    assert not {"caption_exact", "describe_exact", "proposal_recall", "phrase_acc"} & set(refer)
    caption = evaluate(inference, bundle.tasks, scenes, progress=False, parts=("caption",))
    assert caption["caption_cider"] == pytest.approx(full["caption_cider"]) and "refer_acc50" not in caption
    with pytest.raises(ValueError, match="unknown evaluation parts"):
        evaluate(inference, bundle.tasks, scenes, parts=("refer", "boxes"))


def test_the_plan_pairs_arms_per_seed_and_probes_wait_for_their_encoder():
    jobs = plan([0, 1])
    assert [j.name for j in jobs[:4]] == ["pretrain-locca-s0", "pretrain-cap-s0", "pretrain-locca-s1",
                                          "pretrain-cap-s1"]
    assert {j.name for j in jobs if j.arm == FLOOR} == {"probe-random-s0", "probe-random-s1"}
    assert Job.parse("probe-cap-s1").needs == "pretrain-cap-s1" and Job.parse("probe-random-s0").needs is None
    for bad in ("pretrain-random-s0", "probe-locca-1", "train-cap-s0"):
        with pytest.raises(ValueError, match="no transfer job"):
            Job.parse(bad)


def test_locca_transfer_runs_every_arm_and_reports(tmp_path):
    probe = tmp_path / "probe_smoke.py"
    probe.write_text("from model.configs import load\n"
                     "CONFIG = load('smoke').replace(task_weights=(0.0, 1.0, 0.0), freeze_encoder=True, "
                     "data_start=1000)\n")
    cmd = [sys.executable, "-m", "locca.cli", "transfer", "--out", str(tmp_path / "runs"), "--seeds", "0",
           "--scenes", "3", "--points", "2", "--pretrain", "smoke", "--probe", str(probe), "--set", "steps=4",
           "--report", str(tmp_path / "report.json"), "--plot", str(tmp_path / "plot.png")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    by = {r["job"]: r for r in report["results"]}
    assert set(by) == {"pretrain-locca-s0", "pretrain-cap-s0", "probe-locca-s0", "probe-cap-s0", "probe-random-s0"}
    assert [p["step"] for p in by["probe-cap-s0"]["curve"]] == [2, 4]
    assert "refer_acc50" in by["pretrain-locca-s0"] and "refer_acc50" not in by["pretrain-cap-s0"]
    assert set(report["summary"]["probe"]) == {"locca", "cap", "random"} and "| random" in done.stdout
    gap = report["summary"]["locca_minus_cap"]["refer_acc50"]["values"]
    assert gap == [by["probe-locca-s0"]["refer_acc50"] - by["probe-cap-s0"]["refer_acc50"]]
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    runs = tmp_path / "runs"
    for arm in ("locca", "cap"):  # each probe read its own arm's encoder, frozen throughout
        probe_model = checkpoint.load(runs / f"probe-{arm}-s0" / "checkpoint.safetensors").model
        assert _same(probe_model.encoder, checkpoint.load(runs / f"pretrain-{arm}-s0" /
                                                          "checkpoint.safetensors").model.encoder)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # everything done: skipped
    assert again.returncode == 0 and "started" not in again.stderr + again.stdout

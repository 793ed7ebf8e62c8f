"""Training: losses, CapPa inputs, exact resume, DDP over two CPU processes, evaluation and the CLI."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import checkpoint
from model.configs import available, load
from model.evaluate import evaluate
from model.heldout import heldout_scenes
from model.inference import TorchInference
from model.losses import locca_loss
from model.train import lr_at, parallel_inputs, train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = load("smoke")


def test_configs_load_and_validate():
    assert {"smoke", "shapes_tiny"} <= set(available())
    assert load("shapes_tiny").box.bins == load("shapes_tiny").box.bins
    with pytest.raises(KeyError, match="smoke"):
        load("nope")
    with pytest.raises(ValueError):
        SMOKE.replace(warmup_steps=SMOKE.steps)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = SMOKE.replace(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(cfg, 100) == pytest.approx(1e-5)


def test_loss_ignores_prefix_and_padding_and_soft_targets_reward_near_misses(tok, tasks):
    seq = tasks.aref_sequence("the red circle", [10, 10, 50, 50], 100, 100)
    tokens = torch.tensor([[seq + [tok.pad_id] * 3]] * 2)  # (B=2, K=1, T)
    V = tok.vocab_size

    def predicting(offset):  # logits that put the location tokens `offset` bins from the truth
        x = torch.full((2, 1, tokens.shape[-1], V), -8.0)
        for t in range(1, tokens.shape[-1]):  # position t - 1 predicts token t
            x[:, :, t - 1, tokens[0, 0, t] + (offset if tok.is_loc(tokens[0, 0, t]) else 0)] = 8.0
        return x

    hard = [locca_loss(predicting(d), tokens, tok, (1, 0, 0))[0] for d in (0, 1, 5)]
    soft = [locca_loss(predicting(d), tokens, tok, (1, 0, 0), loc_sigma=1.0)[0] for d in (0, 1, 5)]
    assert hard[0] < 1e-3  # pads and the <bos> <task> prefix cost nothing
    assert hard[1] == pytest.approx(hard[2])  # one-hot targets: one bin off is as wrong as five
    assert soft[0] < soft[1] < soft[2] and soft[2] - soft[1] > 1.0  # soft targets: a near miss costs less


def test_cappa_inputs_mask_only_caption_tokens(tok, tasks):
    cfg = SMOKE.replace(cap_parallel_prob=1.0)
    seqs = [tasks.cap_sequence("a small red circle"), tasks.aref_sequence("the circle", [1, 1, 5, 5], 9, 9),
            tasks.gcap_sequence("the circle", [1, 1, 5, 5], 9, 9)]
    T = max(map(len, seqs))
    tokens = torch.tensor([[s + [tok.pad_id] * (T - len(s)) for s in seqs]])
    inputs = parallel_inputs(tokens, torch.tensor([0]), cfg, tok)
    n = len(seqs[0])
    assert (inputs[0, 0, 2:n] == tok.mask_id).all() and (inputs[0, 0, :2] == tokens[0, 0, :2]).all()
    assert (inputs[0, 0, n:] == tok.pad_id).all() and torch.equal(inputs[0, 1:], tokens[0, 1:])
    assert torch.equal(parallel_inputs(tokens, torch.tensor([0]), SMOKE, tok), tokens)


def test_resume_continues_bit_for_bit(tmp_path):
    straight = train(SMOKE, tmp_path / "straight", progress=False)
    train(SMOKE, tmp_path / "split", stop_after=3, progress=False)  # stops mid-way, between checkpoints
    assert json.loads((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    resumed = train(SMOKE, tmp_path / "split", progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load(resumed).meta["step"] == SMOKE.steps
    assert (tmp_path / "split" / "curves.png").stat().st_size > 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "locca.cli", "train", "--config", "smoke",
           "--out", str(tmp_path / "ddp"), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == SMOKE.steps and rows[-1]["world"] == 2
    single = train(SMOKE, tmp_path / "single", progress=False)
    a, b = load_file(str(tmp_path / "ddp" / "checkpoint.safetensors")), load_file(str(single))
    # same global batch split over two ranks: the same updates up to float summation order
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_eval_runs_on_a_checkpoint_and_reports_every_metric(tmp_path):
    ckpt = train(SMOKE, tmp_path / "run", progress=False)
    bundle = checkpoint.load(ckpt)
    metrics = evaluate(TorchInference(bundle.model), bundle.tasks, heldout_scenes(8), progress=False)
    for key in ("refer_acc50", "refer_miou", "caption_exact", "caption_cider", "describe_exact",
                "proposal_precision"):
        assert 0.0 <= metrics[key] <= 10.0
    out = subprocess.run([sys.executable, "-m", "locca.cli", "eval", str(ckpt), "--scenes", "4", "--json",
                          str(tmp_path / "m.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refer_acc50" in out.stdout and json.loads((tmp_path / "m.json").read_text())["scenes"] == 4


def test_collator_gives_every_image_distinct_regions_and_empty_targets_when_short(tasks, tok):
    from model.batch import Collator, task_layout
    from model.records import ShapesStream

    examples = list(ShapesStream(0, num_scenes=6))
    batch = Collator(tasks, 64, 48, seed=0, regions_per_image=3)(examples)
    tokens = batch["tokens"]
    assert tokens.shape[:2] == (6, 7) and task_layout(3) == [0, 1, 1, 1, 2, 2, 2]
    for ex, per in zip(examples, tokens, strict=True):
        n = min(3, len(ex["regions"]))
        has = (per != tok.pad_id).any(-1).tolist()
        assert has == [True] + [True] * n + [False] * (3 - n) + [True] * n + [False] * (3 - n)
        arefs = {tuple(per[k][per[k] != tok.pad_id].tolist()) for k in range(1, 1 + n)}
        assert len(arefs) == n  # distinct regions
        assert all(per[k][1].item() == tok.aref_id for k in range(1, 1 + n))
    loss, parts = locca_loss(torch.zeros(6, 7, tokens.shape[-1], tok.vocab_size), tokens, tok, layout=task_layout(3))
    assert set(parts) == {"Cap", "ARef", "GCap"} and torch.isfinite(loss)


def test_init_from_starts_from_the_checkpoint_and_rejects_another_model(tmp_path):
    first = train(SMOKE, tmp_path / "first", progress=False)
    cfg = SMOKE.replace(init_from=str(first), steps=2, warmup_steps=0, lr=1e-9, min_lr=0.0)
    second = train(cfg, tmp_path / "second", progress=False)
    a, b = checkpoint.load(first), checkpoint.load(second)
    assert a.tok.to_json() == b.tok.to_json()  # the checkpoint's tokenizer, not a newly trained one
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)  # lr ~0: the weights are where they started
    wider = SMOKE.replace(model=SMOKE.model.replace(dec_depth=SMOKE.model.dec_depth + 1))
    with pytest.raises(ValueError, match="init_from"):
        train(wider.replace(init_from=str(first)), tmp_path / "third", progress=False)


def test_curriculum_starts_with_one_object_and_ends_with_the_spec():
    from model.records import ShapesStream
    from model.shapes import MAX_OBJECTS, generate_scene

    stream = ShapesStream(0, curriculum_scenes=60)
    assert [stream.max_objects(i) for i in (0, 9, 10, 30, 59, 60)] == [1, 1, 2, 4, 6, 6]
    assert all(len(stream.scene(i).objects) == 1 for i in range(5))
    assert stream.scene(3).caption == stream.scene(3).caption  # a pure function of the index
    late = stream.scene(100)
    assert late.caption == generate_scene(100).caption and MAX_OBJECTS == 6


def test_a_checkpoint_stored_in_fp16_loads_as_fp32_at_half_the_size(tmp_path, tiny_model, tok):
    from model.config import BoxConfig

    checkpoint.save(tmp_path / "fp32.safetensors", tiny_model, tok, BoxConfig(bins=64))
    checkpoint.save(tmp_path / "fp16.safetensors", tiny_model, tok, BoxConfig(bins=64), dtype=torch.float16)
    sizes = [(tmp_path / f"{n}.safetensors").stat().st_size for n in ("fp32", "fp16")]
    assert sizes[1] < 0.55 * sizes[0]
    half = checkpoint.load(tmp_path / "fp16.safetensors").model
    assert all(p.dtype == torch.float32 for p in half.parameters())
    a, b = tiny_model.state_dict(), half.state_dict()
    assert all(torch.allclose(a[k].float(), b[k], rtol=1e-3, atol=1e-4) for k in a)


def test_learning_curves_have_an_eval_panel_only_when_the_run_evaluated(tmp_path):
    from PIL import Image

    from model.plot import plot_run

    row = {"loss": 1.0, "Cap": 0.5, "ARef": 1.5, "GCap": 1.2, "lr": 1e-3, "images_per_s": 30.0}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **row}) + "\n" for s in (20, 40)))
    two = Image.open(plot_run(tmp_path, tmp_path / "a.png")).size
    ev = {"refer_acc50": 0.5, "caption_exact": 0.4, "describe_exact": 0.3, "proposal_precision": 0.2}
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": 40, **ev}) + "\n")
    three = Image.open(plot_run(tmp_path, tmp_path / "b.png")).size
    assert two[1] == three[1] and three[0] == pytest.approx(1.5 * two[0], rel=0.02)

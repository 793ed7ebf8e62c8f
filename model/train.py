"""Multi-task LocCa training: one encoder pass per image, the decoder on its Cap, ARef and GCap targets.

    locca train --config shapes_tiny --out runs/tiny                      # one process
    torchrun --nproc_per_node 2 -m locca.cli train --config shapes_tiny   # DDP (gloo on CPU, nccl on GPU)

A run directory holds `checkpoint.safetensors` (weights + configs + tokenizer, what export and serve read),
`train_state.pt` (optimizer, step; loaded with weights_only=True), `metrics.jsonl`, `eval.jsonl`,
`curves.png` and `config.json`. Running the same command again resumes where the run stopped, bit for bit:
batches are a pure function of the step (model/records.py shards the stream by step, model/batch.py seeds
per-example choices by stream index), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint
from .batch import TASK_NAMES, Collator, task_layout
from .codec import BoxCodec
from .config import TrainConfig
from .evaluate import evaluate
from .heldout import TRAIN_SEED_OFFSET, heldout_scenes
from .inference import TorchInference
from .losses import PREFIX, locca_loss
from .model import init_location_embeddings
from .records import RecordsDataset, ShapesStream, read_records
from .shapes import generate_scene
from .tasks import Tasks
from .tokenizer import LoccaTokenizer


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # CPUs without bf16 units emulate it, slower than fp32
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def corpus(cfg: TrainConfig):
    """Texts the tokenizer is trained on: captions and expressions of the first training examples."""
    if cfg.data == "shapes":
        for i in range(cfg.tokenizer_texts):
            s = generate_scene(TRAIN_SEED_OFFSET + i, render_image=False)
            yield s.caption
            yield from s.expressions
    else:
        for n, r in enumerate(read_records(cfg.data)):
            if n == cfg.tokenizer_texts:
                return
            if r.get("caption"):
                yield r["caption"]
            yield from (g["expression"] for g in r["regions"])


def dataset(cfg: TrainConfig, start: int, local_batch: int):
    if cfg.data == "shapes":
        return ShapesStream(TRAIN_SEED_OFFSET + cfg.data_start, start=start, batch_size=local_batch,
                            curriculum_scenes=cfg.curriculum_steps * cfg.batch_size, crowd_prob=cfg.crowd_prob,
                            crowd_objects=cfg.crowd_objects)
    return RecordsDataset(cfg.data, shuffle_seed=cfg.seed, start=start, batch_size=local_batch)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay weight matrices and embeddings (nanoGPT), not biases and LayerNorm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def parallel_inputs(tokens: torch.Tensor, index: torch.Tensor, cfg: TrainConfig, tok: LoccaTokenizer):
    """CapPa (Tschannen et al., 2023): for a share of the captions, the decoder sees only <mask> inputs after
    the task prefix and must predict every caption token from the image alone. Drawn per example from
    (seed, stream index), so resumed and DDP runs draw the same."""
    if cfg.cap_parallel_prob == 0:
        return tokens
    draw = torch.tensor([np.random.default_rng([cfg.seed, int(i), 1]).random() for i in index])
    rows = draw < cfg.cap_parallel_prob  # (B,)
    inputs = tokens.clone()
    cap = inputs[:, 0, PREFIX:]
    inputs[:, 0, PREFIX:] = torch.where(rows[:, None] & (cap != tok.pad_id), tok.mask_id, cap)
    return inputs


ENCODER_FIELDS = ("image_size", "patch_size", "enc_width", "enc_depth", "enc_heads", "enc_mlp", "enc_posemb")


def copy_encoder(model: torch.nn.Module, path: str | Path) -> None:
    """Load only the encoder's weights from the checkpoint at `path` into `model` (init_encoder_from); the
    decoder, its cross-attention projections and the embeddings keep their fresh initialisation."""
    source = checkpoint.load(path).model
    differ = [f"{f} {getattr(source.cfg, f)} here {getattr(model.cfg, f)}" for f in ENCODER_FIELDS
              if getattr(source.cfg, f) != getattr(model.cfg, f)]
    if differ:
        raise ValueError(f"init_encoder_from {path}: its encoder differs from this config's ({'; '.join(differ)}); "
                         "make the config's encoder fields those of the checkpoint")
    model.encoder.load_state_dict(source.encoder.state_dict())


def train_mode(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Training mode, except a frozen encoder (freeze_encoder), which stays in eval mode."""
    model.train()
    if cfg.freeze_encoder:
        model.encoder.eval()


class Run:
    """Files of a run directory."""

    def __init__(self, out: Path):
        self.out = out
        self.ckpt, self.state = out / "checkpoint.safetensors", out / "train_state.pt"
        self.metrics, self.evals, self.plot = out / "metrics.jsonl", out / "eval.jsonl", out / "curves.png"
        self.config, self.tokenizer = out / "config.json", out / "tokenizer.json"


def _log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def train(cfg: TrainConfig, out: str | Path, stop_after: int | None = None, time_limit: float | None = None,
          device: str | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run in `out`. stop_after: steps to run in this call; time_limit: minutes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    local_batch = cfg.batch_size // world
    run = Run(Path(out))
    lead = rank == 0
    if lead:
        run.out.mkdir(parents=True, exist_ok=True)

    resuming = run.state.is_file() and run.ckpt.is_file()
    if resuming:
        bundle = checkpoint.load(run.ckpt)
        saved = json.loads(run.config.read_text())
        if saved != _jsonable(cfg):
            raise ValueError(f"{run.out} holds a run with another config; use a new --out or the same config")
        tok, model = bundle.tok, bundle.model
    else:
        if lead:
            run.config.write_text(json.dumps(_jsonable(cfg), indent=1))
            if cfg.init_from:
                checkpoint.load(cfg.init_from).tok.save(run.tokenizer)
            else:
                LoccaTokenizer.train(corpus(cfg), cfg.vocab_size, cfg.box.bins).save(run.tokenizer)
        if world > 1:
            dist.barrier()  # every rank reads the tokenizer rank 0 trained
        tok = LoccaTokenizer.load(run.tokenizer)
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            start = checkpoint.load(cfg.init_from)
            if start.model.cfg != cfg.model.replace(vocab_size=start.tok.vocab_size) or start.box != cfg.box:
                raise ValueError(f"init_from {cfg.init_from}: its model or box config differs from this config's; "
                                 "make the config's model and box those of the checkpoint")
            model = start.model
        else:
            model = checkpoint.build(cfg.model, tok, cfg.box)
            if cfg.loc_init == "sincos":
                init_location_embeddings(model, tok.loc_offset, tok.num_loc)
            if cfg.init_encoder_from:
                copy_encoder(model, cfg.init_encoder_from)
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
    model.to(dev)
    train_mode(model, cfg)
    tasks = Tasks(tok, BoxCodec(cfg.box, tok.loc_offset))
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=dev.type == "cuda")
    step = 0
    if resuming:
        state = torch.load(run.state, map_location=dev, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"].cpu())
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if world > 1 else model

    loader = DataLoader(dataset(cfg, step * local_batch, local_batch), batch_size=local_batch,
                        num_workers=cfg.num_workers, persistent_workers=False,
                        collate_fn=Collator(tasks, cfg.model.image_size, cfg.model.max_seq_len, cfg.seed,
                                            cfg.regions_per_image),
                        prefetch_factor=4 if cfg.num_workers else None)
    bf16 = use_bf16(cfg, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    layout = task_layout(cfg.regions_per_image)
    last = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    deadline = None if time_limit is None else time.monotonic() + 60 * time_limit
    bar = tqdm(total=cfg.steps, initial=step, disable=not (lead and progress), dynamic_ncols=True,
               desc=f"train {run.out.name}", unit="step")
    window, t0, seen = [], time.perf_counter(), 0
    for batch in loader:
        if step >= last or (deadline is not None and time.monotonic() > deadline):
            break
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        tokens = batch["tokens"].to(dev, non_blocking=True)
        inputs = parallel_inputs(batch["tokens"], batch["index"], cfg, tok).to(dev)
        lengths = (tokens != tok.pad_id).sum(-1).amax(0).tolist()  # longest of each task in this batch
        lengths = [n if cfg.task_weights[task] else 0 for n, task in zip(lengths, layout, strict=True)]
        with autocast:
            logits = ddp(batch["pixels"].to(dev, non_blocking=True), inputs, lengths)
        loss, parts = locca_loss(logits, tokens, tok, cfg.task_weights, cfg.loc_sigma, layout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        seen += len(tokens) * world
        window.append(torch.stack([loss.detach(), *parts.values(), gnorm.detach()]))
        if step % cfg.log_every == 0 or step == last:
            stats = torch.stack(window).mean(0)
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            elapsed = time.perf_counter() - t0
            row = {"step": step, "loss": stats[0].item(),
                   **{name: stats[1 + i].item() if cfg.task_weights[i] else None  # a task not trained: no loss
                      for i, name in enumerate(TASK_NAMES)},
                   "grad_norm": stats[4].item(), "lr": lr,
                   "images_per_s": seen / elapsed, "bf16": bf16, "world": world}
            window, t0, seen = [], time.perf_counter(), 0
            if lead:
                _log(run.metrics, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.0f}")
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == last:
            save_state(run, model, tok, cfg, opt, step, lead, world)
        if lead and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            evaluate_during_training(run, model, tasks, cfg, step, dev)
            train_mode(model, cfg)
        if world > 1 and cfg.eval_every and step % cfg.eval_every == 0:
            dist.barrier()
    bar.close()
    save_state(run, model, tok, cfg, opt, step, lead, world)
    if lead:
        from .plot import plot_run
        plot_run(run.out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.ckpt


def save_state(run: Run, model, tok, cfg: TrainConfig, opt, step: int, lead: bool, world: int) -> None:
    if lead:
        checkpoint.save(run.ckpt, model, tok, cfg.box, step=step, images=step * cfg.batch_size)
        tmp = run.state.with_suffix(".tmp")
        torch.save({"optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state()}, tmp)
        tmp.replace(run.state)
    if world > 1:
        dist.barrier()


def evaluate_during_training(run: Run, model, tasks: Tasks, cfg: TrainConfig, step: int, dev) -> dict:
    model.eval()
    metrics = evaluate(TorchInference(model, dev), tasks, heldout_scenes(cfg.eval_scenes), progress=False)
    _log(run.evals, {"step": step, **metrics})
    return metrics


def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def add_arguments(p):
    from . import configs

    p.add_argument("--config", required=True,
                   help=f"training config: one of {', '.join(configs.available())}, or a path to a .py file "
                        "defining CONFIG = TrainConfig(...)")
    p.add_argument("--out", default=None, help="run directory (default runs/CONFIG); an existing run resumes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, VALUE as JSON (e.g. --set steps=2000 --set lr=5e-4)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many minutes (resume later)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def parse_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    kw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a TrainConfig field")
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value  # a bare string, e.g. --set data=records.jsonl
    for key in ("betas", "task_weights"):
        if key in kw:
            kw[key] = tuple(kw[key])
    return cfg.replace(**kw)


def run(args) -> int:
    from . import configs

    cfg = parse_overrides(configs.load(args.config), args.set)
    out = args.out or f"runs/{Path(args.config).stem}"
    ckpt = train(cfg, out, args.stop_after, args.time_limit, args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {ckpt}")
    return 0

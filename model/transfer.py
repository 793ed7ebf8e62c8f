"""`locca transfer`: LocCa's central claim in miniature. Does pretraining the encoder with ARef and GCap beside Cap
give a visual encoder that localises better when frozen, while captions stay as good?

    locca transfer --out runs/transfer --report docs/transfer.json --plot docs/transfer.png   # ~100 min, 2 cores

For every seed it runs (configs as code: model/configs/transfer_pretrain.py and transfer_probe.py):
    pretrain-locca-sS   the micro LocCa on Cap + ARef + GCap            then its captions (and refers) on held-out scenes
    pretrain-cap-sS     the same model, scenes, seed and steps on Cap alone           then its captions
    probe-ARM-sS        a fresh decoder trained on ARef alone over ARM's frozen encoder (ARM = locca, cap, or
                        random: a frozen randomly initialised encoder, the floor), evaluated with refer-only
                        decoding on held-out scenes at several points of its training (the curve)
Jobs run as subprocesses, `--jobs` at a time with the cores shared out between them; each logs to its run
directory and writes result.json there when done, so running the command again skips finished jobs and resumes
a stopped one where its checkpoint left it. The report (JSON), a table and the plot come from those results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ARMS = {"locca": (1.0, 1.0, 1.0), "cap": (1.0, 0.0, 0.0)}  # pretraining objectives: task weights (Cap, ARef, GCap)
FLOOR = "random"                                          # the probe of a frozen randomly initialised encoder
SEED_SCENES = 10_000_000                                  # seed s trains on scenes from s * SEED_SCENES on


@dataclass(frozen=True)
class Job:
    kind: str   # pretrain | probe
    arm: str    # locca | cap | random (probes only)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.arm}-s{self.seed}"

    @property
    def needs(self) -> str | None:
        """The job whose checkpoint this one starts from."""
        return f"pretrain-{self.arm}-s{self.seed}" if self.kind == "probe" and self.arm != FLOOR else None

    @classmethod
    def parse(cls, name: str) -> Job:
        kind, arm, seed = name.split("-")
        if kind not in ("pretrain", "probe") or arm not in (*ARMS, FLOOR) or (kind, arm) == ("pretrain", FLOOR) \
                or not seed.startswith("s") or not seed[1:].isdigit():
            raise ValueError(f"no transfer job {name!r} (expected pretrain-{{locca,cap}}-sN or "
                             f"probe-{{locca,cap,random}}-sN)")
        return cls(kind, arm, int(seed[1:]))


def plan(seeds: list[int]) -> list[Job]:
    """Every job, in the order they are started: pretraining first (the probes wait for it), the floor last."""
    return ([Job("pretrain", arm, s) for s in seeds for arm in ARMS]
            + [Job("probe", arm, s) for s in seeds for arm in ARMS] + [Job("probe", FLOOR, s) for s in seeds])


def job_config(job: Job, root: Path, pretrain: str = "transfer_pretrain", probe: str = "transfer_probe",
               overrides: tuple[str, ...] = ()):
    from . import configs
    from .train import parse_overrides

    base = configs.load(pretrain if job.kind == "pretrain" else probe)
    cfg = base.replace(seed=job.seed, data_start=base.data_start + job.seed * SEED_SCENES)
    if job.kind == "pretrain":
        cfg = cfg.replace(task_weights=ARMS[job.arm])
    elif job.needs:
        cfg = cfg.replace(init_encoder_from=str(root / job.needs / "checkpoint.safetensors"))
    return parse_overrides(cfg, list(overrides))


def run_job(job: Job, root: Path, scenes: int, points: int, **config) -> dict:
    """Train and evaluate one job in this process; its result.json is the record that it is done."""
    import torch

    from . import checkpoint
    from .evaluate import evaluate
    from .heldout import heldout_scenes
    from .inference import TorchInference
    from .train import train

    out = root / job.name
    cfg = job_config(job, root, **config)
    held = heldout_scenes(scenes)
    t0 = time.perf_counter()

    def evaluated(ckpt: Path, parts: tuple[str, ...]) -> dict:
        bundle = checkpoint.load(ckpt)
        return evaluate(TorchInference(bundle.model), bundle.tasks, held, parts=parts, progress=False)

    result = {"job": job.name, "kind": job.kind, "arm": job.arm, "seed": job.seed, "steps": cfg.steps,
              "images": cfg.steps * cfg.batch_size, "threads": torch.get_num_threads()}
    if job.kind == "pretrain":
        ckpt = train(cfg, out, progress=False)
        result["train_minutes"] = (time.perf_counter() - t0) / 60
        result |= evaluated(ckpt, ("caption", "refer") if cfg.task_weights[1] else ("caption",))
    else:  # the curve: train to each point, evaluate refers there (a stopped run resumes bit for bit)
        curve = []
        for k in range(1, points + 1):
            until = round(cfg.steps * k / points)
            ckpt = out / "checkpoint.safetensors"
            done = json.loads(checkpoint.read_header(ckpt)["meta"])["step"] if ckpt.is_file() else 0
            if done < until:
                train(cfg, out, stop_after=until - done, progress=False)
            m = evaluated(ckpt, ("refer",))
            curve.append({"step": until, "images": until * cfg.batch_size, **m})
            print(json.dumps(curve[-1]), flush=True)
        result |= {k: v for k, v in curve[-1].items() if k.startswith("refer_")}
        result |= {"curve": curve, "minutes": (time.perf_counter() - t0) / 60}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def drive(root: Path, seeds: list[int], jobs: int, scenes: int, points: int, extra: list[str]) -> list[dict]:
    """Run every job of the plan not done yet as a subprocess, `jobs` at a time; return every result."""
    todo = [j for j in plan(seeds) if not (root / j.name / "result.json").is_file()]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    bar = tqdm(total=len(plan(seeds)), initial=len(plan(seeds)) - len(todo), desc="transfer jobs", unit="job")
    while todo or running:
        for job in [j for j in todo if not j.needs or (root / j.needs / "result.json").is_file()]:
            if len(running) == jobs:
                break
            (root / job.name).mkdir(parents=True, exist_ok=True)
            log = root / job.name / "log.txt"
            cmd = [sys.executable, "-m", "locca.cli", "transfer", "--job", job.name, "--out", str(root),
                   "--scenes", str(scenes), "--points", str(points), *extra]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            with log.open("a") as f:
                running[job.name] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log)
            todo.remove(job)
            bar.write(f"started {job.name} ({threads} thread{'s' * (threads > 1)}; log {log})")
        time.sleep(2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode:
                for p, _ in running.values():
                    p.terminate()
                tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                raise SystemExit(f"transfer job {name} failed (exit {proc.returncode}); its log {log} ends:\n{tail}")
            bar.update(1)
            bar.write(f"done {name}")
    bar.close()
    return [json.loads((root / j.name / "result.json").read_text()) for j in plan(seeds)]


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(results: list[dict]) -> dict:
    """Mean and spread over seeds of each arm's probe and pretraining figures."""
    out: dict = {"probe": {}, "pretrain": {}}
    for kind, keys in (("probe", ("refer_acc50", "refer_miou")),
                       ("pretrain", ("caption_exact", "caption_cider", "refer_acc50", "train_minutes"))):
        for arm in (*ARMS, FLOOR):
            rows = [r for r in results if r["kind"] == kind and r["arm"] == arm]
            if rows:
                out[kind][arm] = {k: _spread([r[k] for r in rows]) for k in keys if k in rows[0]}
    probe = {(r["arm"], r["seed"]): r for r in results if r["kind"] == "probe"}
    seeds = sorted({seed for arm, seed in probe if arm == "locca" and ("cap", seed) in probe})
    if seeds:  # the paired difference: both arms of a seed saw the same scenes from the same initialisation
        out["locca_minus_cap"] = {k: _spread([probe["locca", s][k] - probe["cap", s][k] for s in seeds])
                                  for k in ("refer_acc50", "refer_miou")}
    return out


def table(summary: dict) -> str:
    def cell(arm: str, kind: str, key: str) -> str:
        s = summary[kind].get(arm, {}).get(key)
        return "-" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}"

    head = ("arm (encoder)", "probe refer Acc@0.5", "probe refer mIoU", "caption exact", "caption CIDEr")
    rows = [(arm, cell(arm, "probe", "refer_acc50"), cell(arm, "probe", "refer_miou"),
             cell(arm, "pretrain", "caption_exact"), cell(arm, "pretrain", "caption_cider"))
            for arm in (*ARMS, FLOOR)]
    if gap := summary.get("locca_minus_cap"):
        g = gap["refer_acc50"]
        rows.append(("locca - cap (paired by seed)", f"{g['mean']:+.3f} ± {g['std']:.3f}",
                     f"{gap['refer_miou']['mean']:+.3f} ± {gap['refer_miou']['std']:.3f}", "", ""))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


LABELS = {"locca": "LocCa encoder (Cap+ARef+GCap)", "cap": "Cap-only encoder", FLOOR: "random frozen encoder"}


def plot(results: list[dict], path: Path) -> None:
    """Probe refer Acc@0.5 against probe training images: one thin line per seed, the mean over seeds bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, colour in zip((*ARMS, FLOOR), ("tab:blue", "tab:orange", "tab:gray"), strict=True):
        curves = [r["curve"] for r in results if r["kind"] == "probe" and r["arm"] == arm]
        if not curves:
            continue
        x = [p["images"] for p in curves[0]]
        for c in curves:
            ax.plot(x, [p["refer_acc50"] for p in c], color=colour, lw=0.8, alpha=0.5)
        mean = [statistics.fmean(c[i]["refer_acc50"] for c in curves) for i in range(len(x))]
        ax.plot(x, mean, color=colour, lw=2.2, marker="o", label=f"{LABELS[arm]} (mean of {len(curves)} seeds)")
    ax.set(xlabel="probe training images (frozen encoder, fresh decoder, ARef only)",
           ylabel="held-out refer Acc@0.5", ylim=(0, 1), title="Frozen-encoder referring-expression probe")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p):
    p.add_argument("--out", default="runs/transfer", help="directory of the runs (default runs/transfer); "
                   "running again skips finished jobs and resumes a stopped one")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, each a full set of arms "
                   "(default 0 1)")
    p.add_argument("--jobs", type=int, default=2, help="jobs at once, the cores shared out (default 2)")
    p.add_argument("--scenes", type=int, default=1000, help="held-out scenes every evaluation uses (default 1000)")
    p.add_argument("--points", type=int, default=4, help="evaluations along each probe's training (default 4)")
    p.add_argument("--pretrain", default="transfer_pretrain", help="pretraining config (default transfer_pretrain)")
    p.add_argument("--probe", default="transfer_probe", help="probe config (default transfer_probe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field of every job (as locca train --set; e.g. steps=8 for a "
                        "smoke run)")
    p.add_argument("--report", default=None, help="write the results and their summary to this JSON file")
    p.add_argument("--plot", default=None, help="draw the probe curves to this PNG")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # run one job in this process (the driver's call)


def run(args) -> int:
    root = Path(args.out)
    config = {"pretrain": args.pretrain, "probe": args.probe, "overrides": tuple(args.set)}
    if args.job:
        run_job(Job.parse(args.job), root, args.scenes, args.points, **config)
        return 0
    if args.jobs < 1 or args.points < 1 or args.scenes < 1:
        raise SystemExit("locca transfer: --jobs, --points and --scenes must be at least 1")
    for job in plan(args.seeds):  # fail on a bad config or --set before anything starts
        job_config(job, root, **config)
    extra = ["--pretrain", args.pretrain, "--probe", args.probe, *(f"--set={s}" for s in args.set)]
    results = drive(root, args.seeds, args.jobs, args.scenes, args.points, extra)
    summary = summarise(results)
    print(table(summary))
    if args.report:
        Path(args.report).write_text(json.dumps({"summary": summary, "results": results,
                                                 "command": " ".join(sys.argv)}, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return 0

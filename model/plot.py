"""Learning curves of a run directory as a PNG: losses per task, learning rate, throughput, eval metrics."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "curves.png"
    metrics, evals = _rows(run_dir / "metrics.jsonl"), _rows(run_dir / "eval.jsonl")
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))  # no empty eval panel
    if metrics:
        steps = [m["step"] for m in metrics]
        for key in ("loss", "Cap", "ARef", "GCap"):
            if metrics[-1].get(key) is not None:  # a task the run gives no weight has no loss
                axes[0].plot(steps, [m[key] for m in metrics], label=key, lw=1.5 if key == "loss" else 1)
        axes[0].set_yscale("log")
        axes[0].set(title="training loss", xlabel="step")
        axes[0].legend()
        axes[1].plot(steps, [m["lr"] for m in metrics], color="tab:gray")
        axes[1].set(title="learning rate", xlabel="step")
        ax2 = axes[1].twinx()
        ax2.plot(steps, [m["images_per_s"] for m in metrics], color="tab:green", alpha=0.6)
        ax2.set_ylabel("images/s", color="tab:green")
    if evals:
        steps = [e["step"] for e in evals]
        for key in ("refer_acc50", "caption_exact", "describe_exact", "proposal_precision"):
            if key in evals[-1]:
                axes[2].plot(steps, [e[key] for e in evals], marker="o", label=key)
        axes[2].set(title="held-out evaluation", xlabel="step", ylim=(0, 1))
        axes[2].legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

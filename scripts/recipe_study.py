"""Table and learning curves of the recipe study (issue 4): every run directory under runs/study/.

    python scripts/recipe_study.py runs/study --out docs/recipe-study.png

Prints a markdown table (the last held-out evaluation of each arm, and its final training losses, averaged over
the last 5 logged steps) and draws the ARef loss of every arm against images seen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path, help="folder of run directories (one per arm)")
    p.add_argument("--out", type=Path, default=Path("docs/recipe-study.png"), help="PNG of the curves")
    args = p.parse_args()
    arms = sorted(d for d in args.study.iterdir() if (d / "metrics.jsonl").is_file())
    print("| arm | images | ARef loss | GCap loss | Cap loss | refer Acc@0.5 | refer mIoU | caption exact | "
          "describe exact | proposal precision | images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for d in arms:
        m, e = rows(d / "metrics.jsonl"), rows(d / "eval.jsonl")
        if (d / "eval.json").is_file():  # `locca eval --json` after training
            e.append(json.loads((d / "eval.json").read_text()))
        batch = json.loads((d / "config.json").read_text())["batch_size"]
        tail = m[-5:]
        mean = {k: sum(r[k] for r in tail) / len(tail) for k in ("ARef", "GCap", "Cap", "images_per_s")}
        last = e[-1] if e else {}
        cells = [f"{last[k]:.3f}" if k in last else "-" for k in
                 ("refer_acc50", "refer_miou", "caption_exact", "describe_exact", "proposal_precision")]
        print(f"| {d.name} | {m[-1]['step'] * batch:,} | {mean['ARef']:.3f} | {mean['GCap']:.3f} | {mean['Cap']:.3f} | "
              + " | ".join(cells) + f" | {mean['images_per_s']:.1f} |")
        images = [r["step"] * batch for r in m]
        ax[0].plot(images, [r["ARef"] for r in m], label=d.name)
        ax[1].plot(images, [r["GCap"] for r in m], label=d.name)
    for a, title in zip(ax, ("ARef loss (expression -> box)", "GCap loss (box -> expression)"), strict=True):
        a.set(title=title, xlabel="training images", yscale="log")
        a.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"\ncurves: {args.out}")


if __name__ == "__main__":
    main()

"""A training run's checkpoint -> the committed default bundle: the same model, weights stored in fp16 (half
the bytes in git; `model.checkpoint.load` builds the model in fp32 from them), plus the run's curves.

    python scripts/make_bundle.py runs/leg1 models/locca-tiny-shapes
    locca eval models/locca-tiny-shapes/checkpoint.safetensors --scenes 1000 --json models/locca-tiny-shapes/eval.json

Evaluate the bundle written here, not the run's fp32 checkpoint: those are the weights that are served.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from model import checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory (its checkpoint.safetensors and curves.png)")
    p.add_argument("out", type=Path, help="bundle directory; its checkpoint.safetensors is replaced")
    args = p.parse_args()
    bundle = checkpoint.load(args.run / "checkpoint.safetensors")
    checkpoint.save(args.out / "checkpoint.safetensors", bundle.model, bundle.tok, bundle.box,
                    dtype=torch.float16, **{**bundle.meta, "weights_dtype": "float16"})
    if (args.run / "curves.png").is_file():
        shutil.copy(args.run / "curves.png", args.out / "curves.png")
    print(f"{args.out / 'checkpoint.safetensors'}: step {bundle.meta.get('step')}, weights in fp16")


if __name__ == "__main__":
    main()

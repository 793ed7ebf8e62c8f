"""Build the TensorRT engines of a bundle on a GPU machine and check them against the CPU fp32 outputs.

    python -m export.trt_build models/locca-tiny-shapes/onnx --max-batch 64      # on a machine with a GPU

Needs onnxruntime-gpu and TensorRT's libraries (pip install .[gpu] tensorrt-cu12, versions matching the
onnxruntime release: see its TensorRT EP requirements table). The engines are built for the profiles of
export/trt_options.py into `--cache-dir` (default: the bundle's trt_cache/). The first load builds them
(minutes); the script exists so that this happens at deploy time, not on a user's first request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from model.interface import Inference

from .bundle_format import read_bundle
from .onnx_backend import OnnxInference
from .trt_options import trt_provider_options


def run_story(inf: Inference, pixels: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Encode, prefill at batch len(pixels), select, then decode steps at mixed positions: every logits."""
    rng, c = np.random.default_rng(seed), inf.cfg
    B, out = len(pixels), []
    state = inf.start(inf.encode(pixels), np.arange(B))
    out.append(inf.step(state, rng.integers(0, c.vocab_size, (B, 4)), np.tile(np.arange(4), (B, 1))))
    inf.select(state, np.arange(B)[::-1])
    for p in range(4, 12):
        out.append(inf.step(state, rng.integers(0, c.vocab_size, (B, 1)), np.full((B, 1), p) + np.arange(B)[:, None] % 3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="an fp32 (or fp16) bundle directory written by `locca export`")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch (rows) the engines accept")
    p.add_argument("--opt-batch", type=int, default=8, help="batch the engines are tuned for")
    p.add_argument("--no-fp16", action="store_true", help="build fp32 engines")
    p.add_argument("--cache-dir", default=None, help="engine and timing cache (default: BUNDLE/trt_cache)")
    p.add_argument("--device", default="tensorrt", help="tensorrt[:i] (default) or cuda[:i] to check the CUDA EP")
    p.add_argument("--tol", type=float, default=None, help="largest |logits - CPU fp32| accepted "
                   "(default 1e-3 for fp32 engines, 5e-2 for fp16)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    bundle = read_bundle(args.bundle)
    fp16 = not args.no_fp16 or bundle.manifest["precision"] == "fp16"
    trt = trt_provider_options(bundle, args.max_batch, args.opt_batch, fp16, args.cache_dir) \
        if args.device.startswith("tensorrt") else None
    t0 = time.perf_counter()
    gpu = OnnxInference(bundle, device=args.device, trt_options=trt)
    report = {"device": gpu.device, "fp16": fp16, "providers": gpu.decoder.get_providers(),
              "build_s": time.perf_counter() - t0, "batches": {}}
    cpu = OnnxInference(bundle, device="cpu")
    tol = args.tol or (5e-2 if fp16 else 1e-3)
    ok = True
    for B in sorted({1, args.opt_batch, args.max_batch}):
        c = bundle.cfg
        px = np.random.default_rng(B).standard_normal((B, 3, c.image_size, c.image_size)).astype(np.float32)
        run_story(gpu, px)  # warm-up: first calls at a new shape allocate
        t1 = time.perf_counter()
        got = run_story(gpu, px)
        dt = (time.perf_counter() - t1) / len(got)
        ref = run_story(cpu, px)
        err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True))
        argmax = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(got, ref, strict=True)]))
        report["batches"][B] = {"max_abs_logit_diff": err, "argmax_agreement": argmax, "ms_per_call": 1e3 * dt}
        ok &= err <= tol
    report["ok"], report["tol"] = ok, tol
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

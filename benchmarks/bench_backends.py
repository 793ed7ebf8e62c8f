"""Eager PyTorch vs ONNX Runtime (fp32, int8) behind the one inference interface, measured side by side.

    python benchmarks/bench_backends.py                                   # the default bundle, 1 thread
    python benchmarks/bench_backends.py --model runs/shapes_tiny/checkpoint.safetensors --threads 2

A benchmark, not a test. Per step: one decoder call of T = 1 token per row at batch B (`step`, numpy in and
out, as the decoding loop sees it). Per request, end to end through model/predictor.Predictor (preprocess,
encode, prefill, steps until <eos>, the grammar, parsing): "caption" is one greedy caption of an image;
"scene" is every task on an image as `locca eval` asks them (caption, ground with beam search 8, refer and
describe for each object). At batch 32 that is 32 images in one call, reported per call and per request. The backends take turns, round after
round, so that background load falls on all of them alike; figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.backends import find_checkpoint, load_inference  # noqa: E402
from model.heldout import heldout_scenes  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from model.requests import Request  # noqa: E402


def bundles(model: Path, fp32: str | None, int8: str | None, tmp: Path) -> tuple[Path, Path]:
    """The ONNX bundles to compare: given, or exported from the checkpoint into `tmp`."""
    from export.onnx_export import export, int8_from

    f = Path(fp32) if fp32 else export(find_checkpoint(model), tmp / "fp32")
    return f, Path(int8) if int8 else int8_from(f, tmp / "int8")


def step_timer(inf, batch: int, steps: int):
    """A callable timing `steps` single-token steps at batch `batch` (after a 2-token prefill)."""
    c = inf.cfg
    pixels = np.random.default_rng(0).standard_normal((batch, 3, c.image_size, c.image_size)).astype(np.float32)
    cross = inf.encode(pixels)
    tokens = np.full((batch, 1), 9, dtype=np.int64)

    def run() -> float:
        state = inf.start(cross, np.arange(batch))
        inf.step(state, np.full((batch, 2), 1, dtype=np.int64), np.tile(np.arange(2), (batch, 1)))
        t0 = time.perf_counter()
        for p in range(2, 2 + steps):
            inf.step(state, tokens, np.full((batch, 1), p, dtype=np.int64))
        return (time.perf_counter() - t0) / steps
    return run


def request_timer(loaded, scenes, batch: int, kind: str):
    """kind "caption": one greedy caption per image; "scene": every task on each image, as `locca eval`
    asks them (caption, ground, refer and describe for each object)."""
    predictor = Predictor(loaded.inference, loaded.tasks)
    images, asks = [s.image for s in scenes[:batch]], []
    for j, s in enumerate(scenes[:batch]):
        asks.append((j, Request("caption")))
        if kind == "scene":
            asks.append((j, Request("ground")))
            for obj, expr in zip(s.objects, s.expressions, strict=True):
                asks += [(j, Request("refer", expression=expr)), (j, Request("describe", box=tuple(obj.box)))]

    def run() -> float:
        t0 = time.perf_counter()
        predictor.run(images, asks)
        return time.perf_counter() - t0
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/locca-tiny-shapes", help="checkpoint (file or directory)")
    p.add_argument("--onnx", default=None, help="fp32 ONNX bundle (default: exported from --model)")
    p.add_argument("--int8", default=None, help="int8 ONNX bundle (default: quantized from the fp32 one)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every backend (default 1)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=7, help="rounds of turns; medians are reported")
    p.add_argument("--steps", type=int, default=20, help="decoder steps timed per round")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "bench_backends.json"),
                   help="where to write the figures (default benchmarks/results/bench_backends.json)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = bundles(Path(args.model), args.onnx, args.int8, Path(tmp))
        loaded = {"torch": load_inference(args.model, "torch", threads=args.threads),
                  "ort_fp32": load_inference(fp32, "onnxruntime", threads=args.threads),
                  "ort_int8": load_inference(int8, "onnxruntime", threads=args.threads)}
        scenes = heldout_scenes(max(args.batches))
        timers = {}
        for b in args.batches:
            for name, ld in loaded.items():
                timers["step", b, name] = step_timer(ld.inference, b, args.steps)
                for kind in ("caption", "scene"):
                    timers[kind, b, name] = request_timer(ld, scenes, b, kind)
        for t in timers.values():  # warm-up: first runs allocate and (ORT) plan
            t()
        samples = {k: [] for k in timers}
        for _ in range(args.rounds):
            for k, t in timers.items():
                samples[k].append(t())
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}

    rows, out = [], {"threads": args.threads, "rounds": args.rounds, "model": args.model,
                     "step": loaded["torch"].meta.get("step"), "results": []}
    head = f"{'measure':<22}{'batch':>6}{'torch ms':>11}{'ort fp32 ms':>13}{'ort int8 ms':>13}{'fp32 x':>8}{'int8 x':>8}"
    for (kind, b, name) in timers:
        if name != "torch":
            continue
        t, f, i = (ms[kind, b, n] for n in loaded)
        label = "per step" if kind == "step" else f"per {'request' if b == 1 else 'call'} ({kind})"
        rows.append(f"{label:<22}{b:>6}{t:>11.3f}{f:>13.3f}{i:>13.3f}{t / f:>8.2f}{t / i:>8.2f}")
        if kind != "step" and b > 1:
            rows.append(f"{'  per request':<22}{b:>6}{t / b:>11.3f}{f / b:>13.3f}{i / b:>13.3f}{t / f:>8.2f}{t / i:>8.2f}")
        out["results"].append({"measure": kind, "batch": b, "torch_ms": t, "ort_fp32_ms": f, "ort_int8_ms": i,
                               "speedup_fp32": t / f, "speedup_int8": t / i})
    print(f"threads={args.threads}  rounds={args.rounds}  model={args.model} (step {out['step']})")
    print(head, "-" * len(head), *rows, sep="\n")
    print("x = torch time / onnxruntime time")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

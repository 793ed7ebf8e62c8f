"""Who writes the KV cache: the decoder graph (it returns the whole updated cache) or its caller (the graph
returns the new keys/values and the caller writes them into its arrays in place)?

    python benchmarks/bench_cache_write.py                      # the default model, 1 thread
    python benchmarks/bench_cache_write.py --threads 2 --batch 1 32 64

A benchmark, not a test. Both graphs are exported here from the same checkpoint: "graph writes" is the bundle
format before locca-onnx/2 (`decode_layers`, then the new slots scattered into the past inside the graph,
the whole caches returned and fed back on the next step); "caller writes" is export/onnx_backend as it is
(the graph returns the new keys/values; a numpy assignment writes them). Each timer runs `--steps`
single-token decode steps after a 2-token prefill; the two take turns round after round and the table shows
medians, so background load falls on both alike. Outputs are checked equal before timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.backends import find_checkpoint  # noqa: E402
from export.bundle_format import io_names  # noqa: E402
from export.onnx_backend import OnnxInference, session_options  # noqa: E402
from export.onnx_export import DecoderGraph, _export, example_inputs, export  # noqa: E402
from model import checkpoint  # noqa: E402


class GraphWrites(DecoderGraph):
    """The format-1 decoder: the step's keys/values scattered into the past inside the graph."""

    def forward(self, tokens, positions, *tensors):
        logits, *new = super().forward(tokens, positions, *tensors)
        index = positions[:, None, :, None].expand_as(new[0])
        return logits, *(past.scatter(2, index, n) for past, n in zip(tensors[:len(new)], new, strict=True))


def export_graph_writes(ckpt: Path, out: Path) -> Path:
    from torch.export import Dim  # noqa: PLC0415

    model = checkpoint.load(ckpt).model.eval()
    L, B, T, S = model.cfg.dec_depth, Dim("batch"), Dim("tokens"), Dim("slots")
    names = io_names(L)
    names = {**names, "decoder_out": ["logits", *(f"{s}_{i}" for s in ("present_k", "present_v") for i in range(L))]}
    _, tokens, positions, caches = example_inputs(model, batch=2, tokens=3)
    dyn = ({0: B, 1: T}, {0: B, 1: T}, tuple([{0: B, 2: S}] * (2 * L) + [{0: B}] * (2 * L)))
    with torch.no_grad():
        _export(GraphWrites(model), (tokens, positions, *caches), dyn, names, "decoder", out)
    return out


def timers(inf: OnnxInference, old, batch: int, steps: int):
    c, L = inf.cfg, inf.cfg.dec_depth
    pixels = np.random.default_rng(0).standard_normal((batch, 3, c.image_size, c.image_size)).astype(np.float32)
    cross = inf.encode(pixels)
    names = io_names(L)["decoder_in"]
    tok = np.full((batch, 1), 9, dtype=np.int64)

    def caller_writes() -> tuple[float, np.ndarray]:
        state = inf.start(cross, np.arange(batch))
        inf.step(state, np.ones((batch, 2), np.int64), np.tile(np.arange(2), (batch, 1)))
        t0 = time.perf_counter()
        for p in range(2, 2 + steps):
            logits = inf.step(state, tok, np.full((batch, 1), p, dtype=np.int64))
        return (time.perf_counter() - t0) / steps, logits

    def graph_writes() -> tuple[float, np.ndarray]:
        state = inf.start(cross, np.arange(batch))
        tensors = state.tensors()
        run = lambda t, p: old.run(None, dict(zip(names, [t, p, *tensors], strict=True)))  # noqa: E731
        out = run(np.ones((batch, 2), np.int64), np.tile(np.arange(2), (batch, 1)))
        t0 = time.perf_counter()
        for p in range(2, 2 + steps):
            tensors[:2 * L] = out[1:]
            out = run(tok, np.full((batch, 1), p, dtype=np.int64))
        return (time.perf_counter() - t0) / steps, out[0]

    return {"graph writes": graph_writes, "caller writes": caller_writes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/locca-tiny-shapes", help="a checkpoint or a directory holding one")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both sessions (default 1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="rows per step (default 1 8 32)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    p.add_argument("--rounds", type=int, default=9, help="rounds per batch size (default 9)")
    a = p.parse_args(argv)
    ckpt = find_checkpoint(Path(a.model))
    with tempfile.TemporaryDirectory() as tmp:
        inf = OnnxInference(export(ckpt, Path(tmp) / "new"), threads=a.threads)
        import onnxruntime as ort  # noqa: PLC0415

        old = ort.InferenceSession(str(export_graph_writes(ckpt, Path(tmp) / "old.onnx")),
                                   session_options(a.threads), providers=["CPUExecutionProvider"])
        print(f"decode step, ms (median of {a.rounds} rounds of {a.steps} steps), {a.threads} thread(s), "
              f"cache {inf.cfg.max_seq_len} slots, {inf.cfg.dec_depth} layers")
        print(f"{'batch':>6} {'graph writes':>13} {'caller writes':>14} {'speed-up':>9}")
        for b in a.batch:
            fs = timers(inf, old, b, a.steps)
            ref = {n: f()[1] for n, f in fs.items()}  # warm-up, and the two must agree
            np.testing.assert_allclose(ref["graph writes"], ref["caller writes"], atol=1e-4)
            t = {n: [] for n in fs}
            for _ in range(a.rounds):
                for n, f in fs.items():
                    t[n].append(f()[0])
            m = {n: statistics.median(v) * 1e3 for n, v in t.items()}
            print(f"{b:>6} {m['graph writes']:>13.3f} {m['caller writes']:>14.3f} "
                  f"{m['graph writes'] / m['caller writes']:>8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

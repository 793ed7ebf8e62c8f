"""Where the time of an exported bundle goes, op by op: ONNX Runtime's profiler on the encoder and on one decode
step, and how much of a decode step's attention is memory.

    python benchmarks/profile_graphs.py                          # the default bundle, batches 1 and 32
    python benchmarks/profile_graphs.py --batches 8 --position 30 --bundle models/locca-tiny-shapes/onnx

For each batch size it prints, for the encoder and for one decoder call of one token (at `--position`, every
cache at its full length) of decoder.onnx and, where the bundle has it, of decoder_cpu.onnx as the backend runs
it (caches bound in place), the kernel time per op type (mean per run; the profiler's own overhead inflates small
kernels, so read shares, not absolute times), the run time without the profiler, and the largest nodes. Then
two tests (skip them with --no-tests), each a tiny graph run at every batch size:
- one layer's cross-attention (scores, softmax, values) as the decoder writes it, once on inputs that stay in
  cache and once rotating through 8 input sets that do not: the ratio is how much of it waits for memory;
- 24 weight MatMuls in a chain (256 x 256), with 24 distinct weights (6.3 MB: they come from L3 or memory)
  and with one shared by all (262 kB: it stays in L2): MLAS's matrix rate at that many rows, and how much of
  it reading the weights costs.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.bundle_format import CPU_DECODER, io_names, read_bundle  # noqa: E402
from export.onnx_backend import session_options  # noqa: E402


def timed(run, n: int) -> float:
    """Median seconds of `n` calls, after 3 untimed ones."""
    for _ in range(3):
        run()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def plain_run(feeds: dict, outputs: list[str]):
    """`op_profile`'s `runner` for a graph fed from numpy: one `run`."""
    return lambda sess: lambda: sess.run(outputs, feeds)


def in_place_run(feeds: dict, layers: int):
    """`op_profile`'s `runner` for decoder_cpu.onnx as the backend runs it: each cache bound as its layer's past
    and present (copies of the feeds' caches, written in place run after run at the same slots)."""
    names = io_names(layers)
    past = dict(zip(names["decoder_in"][2:2 + 2 * layers], names["decoder_cpu_out"][1:], strict=True))

    def make(sess):
        io = sess.io_binding()
        for name, x in feeds.items():
            if name in past:
                value = ort.OrtValue.ortvalue_from_numpy(x.copy())
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(past[name], value)
            else:
                io.bind_cpu_input(name, x)

        def run():
            io.bind_output("logits", "cpu")
            sess.run_with_iobinding(io)
        return run
    return make


def op_profile(path: Path, runner, runs: int, threads: int) -> dict:
    """Kernel time per op type and per node (microseconds per run) from ONNX Runtime's profiler, and the median
    run time without it. runner(session) -> a callable that runs the graph once (plain_run, in_place_run)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.enable_profiling, so.profile_file_prefix = True, f"{tmp}/prof"
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        run = runner(sess)
        for _ in range(runs):
            run()
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node, shapes = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[node, e["args"]["op_name"]] += e["dur"]
            shapes[node] = [next(iter(s.values())) for s in e["args"].get("input_type_shape", [])]
    plain = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return {"ops": {k: v / runs for k, v in by_op.items()}, "nodes": {k: v / runs for k, v in by_node.items()},
            "shapes": shapes, "run_us": 1e6 * timed(runner(plain), runs)}


def decoder_feeds(cfg, batch: int, position: int, rng) -> dict:
    H, Dh, S, N = cfg.dec_heads, cfg.dec_width // cfg.dec_heads, cfg.max_seq_len, cfg.num_patches
    feeds = {"tokens": np.ones((batch, 1), np.int64), "positions": np.full((batch, 1), position, np.int64)}
    for name in io_names(cfg.dec_depth)["decoder_in"][2:]:
        feeds[name] = rng.standard_normal((batch, H, S if name.startswith("past") else N, Dh)).astype(np.float32)
    return feeds


def print_profile(title: str, prof: dict, top: int) -> None:
    total = sum(prof["ops"].values())
    print(f"\n{title}: {prof['run_us'] / 1e3:.3f} ms a run without the profiler; kernel time under it, per op type:")
    for op, us in sorted(prof["ops"].items(), key=lambda kv: -kv[1]):
        if us >= 0.01 * total:
            print(f"   {op:<26}{us / 1e3:>9.3f} ms {100 * us / total:>5.1f}%")
    print(f"   largest {top} nodes:")
    for (node, op), us in sorted(prof["nodes"].items(), key=lambda kv: -kv[1])[:top]:
        print(f"   {us / 1e3:>9.3f} ms  {op:<20} {' x '.join(str(s) for s in prof['shapes'][node])}")


def attention_graph(batch: int, heads: int, keys: int, dh: int) -> bytes:
    """The decoder's cross-attention for one token as export/onnx_export.attention writes it."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    ins = [helper.make_tensor_value_info(n, f, [batch, heads, t, dh]) for n, t in (("q", 1), ("k", keys), ("v", keys))]
    graph = helper.make_graph(nodes, "cross_attention", ins, [helper.make_tensor_value_info("o", f, None)],
                              [helper.make_tensor("scale", f, [], [dh ** -0.5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def attention_memory(cfg, batch: int, runs: int, threads: int, rng) -> dict:
    """Median microseconds of one layer's cross-attention on one input set (it stays in cache) and on 8 taken in
    turn (24 MB at batch 32: they do not)."""
    H, Dh, N = cfg.dec_heads, cfg.dec_width // cfg.dec_heads, cfg.num_patches
    sess = ort.InferenceSession(attention_graph(batch, H, N, Dh), session_options(threads),
                                providers=["CPUExecutionProvider"])
    sets = [{"q": rng.standard_normal((batch, H, 1, Dh)).astype(np.float32),
             "k": rng.standard_normal((batch, H, N, Dh)).astype(np.float32),
             "v": rng.standard_normal((batch, H, N, Dh)).astype(np.float32)} for _ in range(8)]
    turn = iter(range(1 << 62))
    hot = timed(lambda: sess.run(None, sets[0]), runs)
    cold = timed(lambda: sess.run(None, sets[next(turn) % 8]), runs)
    return {"batch": batch, "kv_mb": 2 * batch * H * N * Dh * 4 / 1e6, "hot_us": 1e6 * hot, "cold_us": 1e6 * cold}


def weight_chain(rows: int, distinct: bool, n: int = 24, width: int = 256) -> bytes:
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng, inits, nodes, prev = np.random.default_rng(0), [], [], "x"
    for i in range(n):
        name = f"w{i if distinct else 0}"
        if distinct or i == 0:
            w = (0.05 * rng.standard_normal((width, width))).astype(np.float32)
            inits.append(numpy_helper.from_array(w, name))
        nodes.append(helper.make_node("MatMul", [prev, name], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def weight_rate(rows: int, runs: int, threads: int, n: int = 24, width: int = 256) -> dict:
    """GFLOP/s of `weight_chain` at `rows` rows, weights from L3 or memory (distinct) and from L2 (shared)."""
    x = np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)
    flops = n * 2 * rows * width * width
    out = {"rows": rows}
    for distinct in (True, False):
        sess = ort.InferenceSession(weight_chain(rows, distinct, n, width), session_options(threads),
                                    providers=["CPUExecutionProvider"])
        out["distinct" if distinct else "shared"] = flops / timed(lambda s=sess: s.run(None, {"x": x}), runs) / 1e9
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="models/locca-tiny-shapes/onnx", help="an exported fp32 bundle (locca export)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    p.add_argument("--position", type=int, default=16, help="position of the decoded token (default 16)")
    p.add_argument("--runs", type=int, default=50, help="profiled runs per graph and batch (default 50)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, as locca bench)")
    p.add_argument("--top", type=int, default=8, help="largest nodes listed (default 8)")
    p.add_argument("--no-tests", dest="tests", action="store_false", help="skip the attention and MatMul tests")
    args = p.parse_args(argv)
    bundle = read_bundle(args.bundle)
    cfg, rng, names = bundle.cfg, np.random.default_rng(0), io_names(bundle.cfg.dec_depth)
    for b in args.batches:
        pixels = rng.standard_normal((b, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        print_profile(f"encoder, batch {b}", op_profile(bundle.dir / "encoder.onnx", plain_run(
            {"pixels": pixels}, names["encoder_out"][1:]), args.runs, args.threads), args.top)
        feeds = decoder_feeds(cfg, b, args.position, rng)
        print_profile(f"decoder.onnx, batch {b}, one token at position {args.position}",
                      op_profile(bundle.dir / "decoder.onnx", plain_run(feeds, names["decoder_out"]), args.runs,
                                 args.threads), args.top)
        if CPU_DECODER in bundle.manifest["files"]:
            print_profile(f"{CPU_DECODER}, batch {b}, one token at position {args.position}, cache in place",
                          op_profile(bundle.dir / CPU_DECODER, in_place_run(feeds, cfg.dec_depth), args.runs,
                                     args.threads), args.top)
    if args.tests:
        print("\none layer's cross-attention for one token: inputs in cache vs 8 rotating input sets")
        print(f"   {'batch':>5} {'K+V MB':>8} {'in cache us':>12} {'rotating us':>12} {'ratio':>6}")
        for r in (attention_memory(cfg, b, max(args.runs, 100), args.threads, rng) for b in args.batches):
            print(f"   {r['batch']:>5} {r['kv_mb']:>8.2f} {r['hot_us']:>12.1f} {r['cold_us']:>12.1f}"
                  f" {r['cold_us'] / r['hot_us']:>6.2f}")
        print("\n24 weight MatMuls (256 x 256) in a chain: GFLOP/s with 24 distinct weights (6.3 MB) and with one")
        for r in (weight_rate(b, max(args.runs, 100), args.threads) for b in args.batches):
            print(f"   rows {r['rows']:>4}: {r['distinct']:6.1f} distinct (L3)   {r['shared']:6.1f} shared (L2)")


if __name__ == "__main__":
    main()

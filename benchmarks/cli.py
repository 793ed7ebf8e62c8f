"""`locca bench`: our engine and server against what a user would run instead, side by side in one run.

    locca bench                      # --quick (default): every section, under 5 minutes on 2 CPU cores
    locca bench --full               # longer windows, more rounds and sizes (about 7 minutes on 2 cores)
    locca bench --device cuda        # the GPU mode: PyTorch CUDA (fp32, bf16), ONNX Runtime CUDA / TensorRT
                                     # where the installed onnxruntime has them, HF on the GPU

Sections (each prints its progress; the table at the end says which goals of issue 8 were met):
  1. engine vs Hugging Face: the same dimensions as a transformers VisionEncoderDecoderModel, `generate()`
     greedy with its KV cache, against our engine (ONNX Runtime, PyTorch; fp32, int8, bf16), the same number
     of new tokens, batch 1 and 32; and the refer accuracy each of our variants keeps (held-out scenes)
  2. serving: `locca serve` against a plain FastAPI app calling generate() per request, caption requests at
     1, 8, 32 and 64 concurrent clients: throughput, p50 and p99 latency; and /v1/ground without a box (every
     object) against /v1/caption on the same scenes, one client (issue 16); `--workers 2` against one at the
     most clients (issue 21)
  3. continuous vs static batching: refer latency among long captions, against an idle worker
  4. the limit: measured peak matrix-multiply rate, analytic model FLOPs (benchmarks/flops.py), the encoder's
     and the whole request's model FLOPs utilisation
  5. scaling: latency against output length and against images per call
  6. efficiency (issue 19): the server's caption answers/s at 32, 64 and 128 connections from wrk (if installed),
     a different image per request, against the in-process engine on the same kind of requests (all queued at
     once, and in closed loops of as many clients as connections: the most any server could make of them)
  7. REC client: 4 referring expressions per image as 4 calls without the encoded-image cache, 4 calls with it,
     and 1 call with `expressions`: questions/s
Every contender runs with the same number of threads (--threads). Writes benchmarks/results/bench_DEVICE_MODE
.json and .png, and copies the plot to docs/bench_DEVICE.png for the README.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class BenchConfig:
    new_tokens: int = 32                         # tokens per request in sections 1, 4 and 5 (both sides)
    batches: tuple[int, ...] = (1, 32)           # section 1
    rounds: int = 5                              # rounds of turns; medians are reported
    levels: tuple[int, ...] = (1, 8, 32, 64)     # section 2: concurrent clients
    window_s: float = 4.0                        # section 2: seconds measured per level and server
    mixed_window_s: float = 6.0                  # section 3: seconds measured per policy
    captioners: int = 8                          # section 3: long-caption clients beside the refer client
    accuracy_scenes: int = 100                   # section 1: held-out scenes for refer accuracy
    encoder_batches: tuple[int, ...] = (1, 8, 32, 64)
    lengths: tuple[int, ...] = (4, 8, 16, 32, 44)
    images: tuple[int, ...] = (1, 4, 16, 32)
    pool: int = 32                               # distinct scenes the servers are sent
    peak_s: float = 2.0                          # seconds per dtype measuring the peak, at the start and the end
    saturation: tuple[int, ...] = (32, 64, 128)  # section 6: connections
    saturation_window_s: float = 6.0             # section 6: seconds measured per level (after a ramp half as long)
    engine_requests: int = 256                   # section 6: captions queued at once in the in-process engine
    rec_clients: int = 8                         # section 7: REC clients, closed loops
    rec_window_s: float = 4.0                    # section 7: seconds measured per way, per round
    rec_rounds: int = 3                          # section 7: rounds of the three ways

    def __post_init__(self):
        if min(self.batches + self.levels + self.encoder_batches + self.lengths + self.images) < 1:
            raise ValueError("batch sizes, levels and lengths must be >= 1")
        if self.rounds < 1 or self.window_s <= 0 or self.mixed_window_s <= 0 or self.captioners < 1:
            raise ValueError("need rounds >= 1, positive windows and captioners >= 1")


MODES = {
    "quick": BenchConfig(),
    "full": BenchConfig(rounds=9, window_s=15.0, mixed_window_s=20.0, accuracy_scenes=500, saturation_window_s=20.0,
                        rec_window_s=10.0, rec_rounds=3,
                        encoder_batches=(1, 2, 4, 8, 16, 32, 64, 128), lengths=(2, 4, 8, 16, 24, 32, 40, 46),
                        images=(1, 2, 4, 8, 16, 32, 64), pool=64),
    # a few seconds, every code path, for tests/test_bench.py: no figure from it means anything
    "smoke": BenchConfig(new_tokens=4, batches=(1, 2), rounds=1, levels=(1, 2), window_s=0.3, mixed_window_s=0.3,
                         captioners=2, accuracy_scenes=2, encoder_batches=(1, 2), lengths=(2, 4), images=(1, 2),
                         pool=4, peak_s=0.1, saturation=(2, 4), saturation_window_s=1.0, engine_requests=8,
                         rec_clients=2, rec_window_s=1.0, rec_rounds=1),
}
SECTIONS = ("engine", "serving", "batching", "limit", "scaling", "efficiency", "rec")


def add_arguments(p) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the default: < 5 min on 2 cores")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="longer and wider")
    p.set_defaults(mode="quick")
    p.add_argument("--model", default="models/locca-tiny-shapes", help="model bundle (checkpoint; ONNX exported on demand)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU mode)")
    p.add_argument("--threads", type=int, default=1, help=(
        "intra-op threads of every contender, ours and the peers (default 1: on the 2-core machine the other "
        "core runs the clients, the servers' HTTP and the neighbours' jobs)"))
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and the plot")
    p.add_argument("--docs", default="docs", help="where the plot is copied for the README ('' = nowhere)")


def run(args) -> int:
    from . import report
    cfg, sections = MODES[args.mode], [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device != "cpu":  # a GPU needs far larger batches to fill
        cfg = dataclasses.replace(cfg, encoder_batches=cfg.encoder_batches + (256, 1024), images=cfg.images + (128,))
    t0 = time.perf_counter()
    results = bench(cfg, args.model, args.device, args.threads, sections, mode=args.mode)
    results["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(report.table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{'cpu' if args.device == 'cpu' else 'gpu'}_{args.mode}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    report.plot(results, stem.with_suffix(".png"))
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stem.with_suffix(".png"), Path(args.docs) / f"{stem.name.rsplit('_', 1)[0]}.png")
    print(f"wrote {stem}.json and .png ({results['meta']['seconds']} s)")
    return 0


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def meta(cfg: BenchConfig, model: str, device: str, threads: int, mode: str) -> dict:
    import onnxruntime
    import transformers
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
            "command": "locca bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
            "device": device, "gpu": gpu, "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "threads": threads, "model": model, "config": dataclasses.asdict(cfg),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()}}


def bench(cfg: BenchConfig, model: str, device: str = "cpu", threads: int = 1, sections=SECTIONS,
          mode: str = "quick", backends=("onnxruntime", "torch")) -> dict:
    """Run the chosen sections; returns everything measured (the JSON written by `run`)."""
    from . import batching, engine, flops
    from .contenders import contenders, request_pool
    torch.set_num_threads(threads)
    res = {"meta": meta(cfg, model, device, threads, mode)}
    with tempfile.TemporaryDirectory() as tmp:
        say(f"loading our backends and the Hugging Face peer ({device}, {threads} thread(s))")
        cs, mcfg, onnx_dir = contenders(model, device, threads, Path(tmp), backends)
        ours = [c for c in cs if not c.peer]
        res["meta"] |= {"model_config": dataclasses.asdict(mcfg), "contenders": [c.name for c in cs],
                        "default": ours[0].name}
        say("4. peak matrix-multiply rate (fp32, bf16), measured again at the end")
        peaks = [flops.peaks(device, cfg.peak_s)]
        res["flops"] = {"encode_per_image": flops.encode_flops(mcfg), "new_tokens": cfg.new_tokens,
                        "request": flops.request_flops(mcfg, cfg.new_tokens)}
        if "engine" in sections:
            say(f"1. engine vs HF generate(): {cfg.new_tokens} tokens, batches {cfg.batches}, {cfg.rounds} rounds")
            res["engine"] = engine.versus_peer(cs, cfg.batches, cfg.new_tokens, cfg.rounds, mcfg)
            say(f"1. refer accuracy of our variants, {cfg.accuracy_scenes} held-out scenes")
            res["accuracy"] = accuracy(ours, cfg.accuracy_scenes)
        if "limit" in sections:
            say(f"4. encoder model FLOPs utilisation, batches {cfg.encoder_batches}")
            # int8 is left out: it has no measured peak to be a share of
            res["encoder"] = engine.encoder_sweep([c for c in ours if c.precision != "int8"], cfg.encoder_batches,
                                                  cfg.rounds, mcfg)
        if "scaling" in sections:
            say(f"5. scaling: lengths {cfg.lengths}, images per call {cfg.images}")
            picks = [ours[0]] + [c for c in cs if c.peer and c.precision == "fp32"]
            res["scaling"] = engine.scaling(picks, cfg.lengths, cfg.images, cfg.new_tokens, cfg.rounds, mcfg)
        if "batching" in sections or "serving" in sections:
            pool = request_pool(ours[0], cfg.pool)
        if "batching" in sections:
            say(f"3. continuous vs static batching: {cfg.captioners} long-caption clients + 1 refer client")
            worker = batching_worker(ours[0], onnx_dir, model, device, threads)
            res["batching"] = batching.mixed(worker, pool.captions, pool.refers, cfg.captioners, cfg.mixed_window_s)
        if "serving" in sections:
            res["serving"] = serve(cfg, model, device, threads, pool, mcfg, tmp)
        if "efficiency" in sections:
            res["efficiency"] = efficiency(cfg, model, device, threads, ours[0], tmp)
        if "rec" in sections:
            res["rec"] = rec(cfg, model, device, threads, ours[0], tmp)
    peaks.append(flops.peaks(device, cfg.peak_s))
    res["peak"] = {k: max(p[k] for p in peaks) for k in peaks[0]}  # the best sample is the least interrupted
    res["peak_runs"] = peaks
    for r in res.get("encoder", []):  # half precision against the bf16 peak (fp16's is the same on GPUs)
        r["mfu"] = r["flops_per_s"] / res["peak"]["fp32" if r["precision"] == "fp32" else "bf16"]
    return res


def accuracy(ours: list, scenes: int) -> dict:
    """Refer Acc@0.5 of each of our variants, its change in points from the first (fp32, the server's backend),
    and the share of boxes identical to that one's."""
    from model.heldout import heldout_scenes

    from .engine import refer_accuracy
    held = heldout_scenes(scenes)
    runs = [refer_accuracy(c, held) for c in ours]
    ref = runs[0]
    rows = [{"name": c.name, "precision": c.precision, "refer_acc50": r["refer_acc50"],
             "delta_points": 100 * (r["refer_acc50"] - ref["refer_acc50"]),
             "same_box": float(np.mean([a == b for a, b in zip(r["boxes"], ref["boxes"], strict=True)]))}
            for c, r in zip(ours, runs, strict=True)]
    return {"scenes": scenes, "questions": len(ref["boxes"]), "rows": rows}


def batching_worker(default, onnx_dir, model: str, device: str, threads: int):
    """The server's worker code in this process, on the backend the server would use (bench_server.InProcess)."""
    from service.settings import Settings

    from .bench_server import InProcess
    backend = backend_of(default)
    return InProcess(Settings(model=str(onnx_dir if backend == "onnxruntime" else model), backend=backend,
                              threads=threads, workers=1, device=device))


def serve(cfg: BenchConfig, model: str, device: str, threads: int, pool, mcfg, tmp: str) -> dict:
    from . import serving
    from .flops import request_flops
    ours_req, naive_req = serving.caption_requests(pool.images, pool.caption_tokens)
    fed = [pool.prompt + n - 1 for n in pool.caption_tokens]  # decoder tokens of each caption request
    out = {"mean_new_tokens": float(np.mean(pool.caption_tokens)),
           "flops_per_request": float(np.mean([request_flops(mcfg, f) for f in fed]))}
    say("2. serving: starting our server (locca serve) and the naive one (FastAPI + HF generate())")
    with serving.our_server(model, threads, device, f"{tmp}/ours.log") as o, \
            serving.naive_server(model, threads, device, "fp32", f"{tmp}/naive.log") as n:
        out["ours"], out["naive"] = [], []
        turns = [("ours", o, ours_req, lambda: serving.batch_counters(o)), ("naive", n, naive_req, None)]
        for i, level in enumerate(cfg.levels):  # the servers take turns, level by level, each going first in turn
            for name, server, reqs, probe in turns if i % 2 == 0 else turns[::-1]:
                out[name] += serving.sweep(server.url, reqs, [level], cfg.window_s, probe=probe)
                r = out[name][-1]
                say(f"2. {name}, {level} clients: {r['throughput']:.1f} req/s, p50 {r['p50_ms']:.0f} ms")
        out["ground"] = ground_vs_caption(o.url, ours_req, cfg.window_s, cfg.rounds)
        out["workers"] = two_workers(o, model, threads, device, ours_req, max(cfg.levels), cfg.window_s, tmp)
    return out


def efficiency(cfg: BenchConfig, model: str, device: str, threads: int, default, tmp: str) -> dict:
    """Section 6: the server's caption answers/s under load, each request another image, against the engine."""
    from model.image import preprocess
    from model.shapes import generate_scene
    from service.launch import launch
    from service.settings import Settings

    from . import efficiency as eff
    size = default.inference.cfg.image_size
    say(f"6. efficiency: the in-process engine, {cfg.engine_requests} captions at once, the server's scheduler")
    scenes = [generate_scene(seed) for seed in range(1_700_000_000, 1_700_000_000 + cfg.engine_requests)]
    loaded = [(preprocess(scene.image, size), scene.image.size) for scene in scenes]
    config = Settings().scheduler()
    engine = eff.Engine(default.inference, default.tasks, config, loaded)
    rate = max(engine.round() for _ in range(2))
    say(f"6. engine: {rate:.1f} captions/s")
    # as many images as the server could be sent at 1.25x the engine's rate, so that none is sent twice
    warm = max(1.0, cfg.saturation_window_s / 2)
    seconds = len(cfg.saturation) * (warm + max(1.0, cfg.saturation_window_s)) + warm  # + the first warm-up
    n = int(1.25 * rate * seconds) + 2 * sum(cfg.saturation)
    say(f"6. making {n} more distinct scenes (no image is sent twice)")
    images = eff.distinct_images(n, offset=1_700_000_000 + cfg.engine_requests)
    shared = eff.beside_busy_core(engine, [data for data, _ in images[:64]], size, cfg.rounds)
    say(f"6. the engine beside a core busy decoding PNG images (the front's work): {100 * shared['ratio']:.0f}% of "
        f"its captions/s alone ({len(shared['alone'])} alternating pairs)")
    same = eff.same_concurrency(engine, cfg.saturation, cfg.rounds)
    say("6. the engine at the server's concurrency (closed loops of that many clients), of its speed with every "
        "request queued at once: " + ", ".join(f"{100 * x['ratio']:.0f}% at {x['clients']}" for x in same))
    with launch(f"{tmp}/efficiency.log", model=model, backend=backend_of(default), threads=threads,
                device=device) as server:
        generator, rows = eff.server_levels(server, [data for data, _ in images], cfg.saturation,
                                            cfg.saturation_window_s, warm,
                                            between=lambda: (engine.round(), engine.cpu_ms[-1]))
    for r, at in zip(rows, same, strict=True):  # each level against the engine's turns just before and after it
        (rate_before, cpu_before), (rate_after, cpu_after) = r.pop("before"), r.pop("after")  # (captions/s, CPU ms)
        r["engine"], r["engine_cpu_ms"] = (rate_before + rate_after) / 2, (cpu_before + cpu_after) / 2
        r["efficiency"] = r["throughput"] / r["engine"]
        r["of_shared"] = r["efficiency"] / shared["ratio"]  # of the engine as fast as it runs beside a busy core
        r["of_same_concurrency"] = r["efficiency"] / at["ratio"]  # of the engine holding as many requests
        r["closed_cpu_ms"] = float(np.median(at["cpu_ms"]))
        say(f"6. server, {r['clients']} connections ({generator}): {r['throughput']:.1f} captions/s = "
            f"{100 * r['efficiency']:.0f}% of the engine's {r['engine']:.1f} around it, p99 {r['p99_ms']:.0f} ms, "
            f"{100 * r['of_shared']:.0f}% of it beside a busy core, "
            f"{100 * r['of_same_concurrency']:.0f}% of it at {r['clients']} clients, "
            f"{r['non_2xx']} not 2xx, {r['cache_hits']:.0f} cache hits; CPU ms per answer: front "
            f"{r['front_cpu_ms']:.2f} ({r['front_cores']:.2f} cores), worker {r['worker_cpu_ms']:.2f} "
            f"({r['worker_cores']:.2f} cores), the engine {r['engine_cpu_ms']:.2f} "
            f"({r['closed_cpu_ms']:.2f} at {r['clients']} clients)")
    peak, best = max(r["throughput"] for r in rows), max(r["efficiency"] for r in rows)
    return {"generator": generator, "scheduler": dataclasses.asdict(config), "server": rows,
            "engine": {"requests": len(loaded), "throughput": float(np.median(engine.runs)), "runs": engine.runs,
                       "cpu_ms": engine.cpu_ms},
            "beside_busy_core": shared, "same_concurrency": same,
            "at_most_clients_vs_peak": rows[-1]["throughput"] / peak,
            # the same with each level's answers/s taken relative to the engine around it: the machine's drift out
            "at_most_clients_vs_peak_of_engine": rows[-1]["efficiency"] / best}


def backend_of(default) -> str:
    """The server backend of our default contender: ONNX Runtime, or PyTorch (a GPU without onnxruntime-gpu,
    or a run that left ONNX out)."""
    return "onnxruntime" if default.name.startswith("ours ort") else "torch"


def rec(cfg: BenchConfig, model: str, device: str, threads: int, default, tmp: str) -> dict:
    """Section 7: a referring-expression client's 4 questions per image, three ways."""
    from service.launch import launch

    from . import efficiency as eff
    n = int(cfg.rec_rounds * 3 * (cfg.rec_window_s * 100 + 4 * cfg.rec_clients))  # < 100 images/s
    say(f"7. REC client: {n} distinct scenes, 4 expressions each, {cfg.rec_clients} clients")
    work = [(data, (scene.expressions * 4)[:4]) for data, scene in eff.distinct_images(n, offset=1_800_000_000)]
    backend = backend_of(default)
    with launch(f"{tmp}/rec_cached.log", model=model, backend=backend, threads=threads, device=device) as cached, \
            launch(f"{tmp}/rec_uncached.log", model=model, backend=backend, threads=threads, device=device,
                   encoder_cache_mb=0) as uncached:
        return eff.rec(cached.url, uncached.url, work, cfg.rec_clients, cfg.rec_window_s, cfg.rec_rounds, say)


def two_workers(one, model: str, threads: int, device: str, requests: list, clients: int, window: float,
                tmp: str) -> dict:
    """Issue 21: `locca serve --workers 2` against the one-worker server `one`, caption requests at `clients`
    clients, taking turns twice. On a 2-core host the second worker competes for the cores the first, the
    front and the clients use: this says what it costs or gains there."""
    from . import serving
    say(f"2. two workers against one: captions at {clients} clients")
    rows: dict[str, list[dict]] = {"1": [], "2": []}
    with serving.our_server(model, threads, device, f"{tmp}/two.log", workers=2) as two:
        for k in range(2):
            for name, server in (("1", one), ("2", two)) if k == 0 else (("2", two), ("1", one)):
                rows[name] += serving.sweep(server.url, requests, [clients], window)
    out = {name: {"throughput": float(np.median([r["throughput"] for r in rs])),
                  "p50_ms": float(np.median([r["p50_ms"] for r in rs]))} for name, rs in rows.items()}
    say(f"2. {clients} clients: two workers {out['2']['throughput']:.1f} req/s, one {out['1']['throughput']:.1f}")
    return {"clients": clients, "one": out["1"], "two": out["2"],
            "ratio": out["2"]["throughput"] / out["1"]["throughput"]}


def ground_vs_caption(url: str, captions: list, window: float, rounds: int) -> dict:
    """/v1/ground without a box (every object, its region search beside a caption) against /v1/caption, one
    client, the same scenes: each scene asked both ways in turn (which goes first alternates), every scene of
    the pool `rounds` times, or more until `window` seconds have passed; p50 of each."""
    import httpx
    lat: dict[str, list[float]] = {"caption": [], "ground": []}
    t0, k = time.perf_counter(), 0
    with httpx.Client(base_url=url, timeout=120) as http:
        while k < rounds * len(captions) or time.perf_counter() - t0 < window:
            files, _ = captions[k % len(captions)]
            for name in ("caption", "ground") if k % 2 == 0 else ("ground", "caption"):
                start = time.perf_counter()
                http.post(f"/v1/{name}", files=files).raise_for_status()
                lat[name].append(time.perf_counter() - start)
            k += 1
    out = {name: 1e3 * float(np.median(v)) for name, v in lat.items()}
    say(f"2. one client: ground (every object) p50 {out['ground']:.0f} ms, caption p50 {out['caption']:.0f} ms")
    return {"caption_p50_ms": out["caption"], "ground_p50_ms": out["ground"],
            "ratio": out["ground"] / out["caption"], "requests": k}

"""Sections 6 and 7 of `locca bench` (issue 19): the server at the engine's speed, and a referring-expression
client's questions.

6. efficiency: caption requests, each carrying another image, at 32, 64 and 128 concurrent connections from an
   external load generator (wrk, when it is installed: Debian's `wrk`; else this process's own closed-loop
   httpx clients, which take CPU from the server on a small machine and are reported as such), against the
   in-process engine on the same kind of requests: the server's worker code (model/core.py, the server's
   scheduler settings, no cache) with every request queued at once and its image already decoded, so it
   measures the model and the scheduler alone. The engine takes a turn before each level and after the last
   (the server idle meanwhile), so that each level is compared with the engine measured just around it: on a
   shared machine the speed of both drifts by tens of percent within minutes. Efficiency = server answers/s
   / the mean of the engine's two turns around it. The server
   runs with its defaults (the encoded-image cache on); no image is sent twice, and the cache's hit count over
   each level is reported to show it (it must be 0).
   Beside a busy core: before the levels, the engine takes turns alone and beside a process that decodes the
   requests' PNG images without pause (what the server's front does, at full tilt), alternating. On a machine
   whose cores the worker and the front share (2 here), the worker runs at best about as the engine does beside
   that neighbour (a harsher one than the front, which leaves some of its core idle): the ratio measures what
   the sharing alone costs, whatever the server's own code does.
   At the server's concurrency: the engine in closed loops of as many clients as each level has connections
   (each answer at once replaced by a new request), alternating with all at once: no server with that many
   connections holds more requests, so the ratio is the most any server could make of them.
7. REC client: a client that asks 4 referring expressions of each image, as 4 calls to a server without the
   encoded-image cache, as 4 calls with it, and as 1 call with `expressions` (4 of them), `clients` such
   clients in closed loops, a new image each time: questions answered per second, and each image's time
   until its 4th answer.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from model.core import EngineCore
from model.requests import Request
from model.shapes import generate_scene
from service.launch import ROOT

WRK_SCRIPT = ROOT / "loadtests" / "wrk_images.lua"


# --- 6. efficiency ------------------------------------------------------------------------------------
class Engine:
    """The engine core in this process on `loaded` [(pixels, size)]: each round queues them all at once (the
    server's scheduler `config`, no clock: nothing waits for company, the queue is full from the start) and
    returns captions/s."""

    def __init__(self, inference, tasks, config, loaded: list):
        self.core, self.loaded = EngineCore(inference, tasks, config), loaded
        self.runs: list[float] = []
        self.cpu_ms: list[float] = []  # CPU milliseconds per answer of each round (this process: the engine)
        for pixels, size in loaded[: min(8, len(loaded))]:  # warm: first-call costs of each batch shape
            self.core.add(Request("caption"), pixels, size)
        self.core.run()

    def round(self, record: bool = True) -> float:
        """One round: captions/s (and CPU ms per answer kept beside it in `runs` and `cpu_ms`, if `record`)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for pixels, size in self.loaded:
            self.core.add(Request("caption"), pixels, size)
        done = self.core.run()
        assert len(done) == len(self.loaded) and all(f.error is None for f in done)
        rate = len(done) / (time.perf_counter() - t0)
        if record:
            self.runs.append(rate)
            self.cpu_ms.append(1e3 * (time.process_time() - c0) / len(done))
        return rate

    def closed_loop(self, clients: int) -> tuple[float, float]:
        """`clients` in closed loops on the core, as the server's connections are: each answer replaced at once by
        a new request, the core stepped with the clock (a long job waits up to max_wait for company, as in the
        worker). Returns captions/s and CPU ms per answer over len(loaded) answers, counted from the first
        `clients` answers on; the jobs still in the loop at the end are dropped."""
        core, loaded, sent = self.core, self.loaded, 0

        def send() -> None:
            nonlocal sent
            pixels, size = loaded[sent % len(loaded)]
            sent += 1
            core.add(Request("caption"), pixels, size, now=time.monotonic())

        for _ in range(clients):
            send()
        done, goal, t0, c0 = 0, clients + len(loaded), 0.0, 0.0
        while done < goal:
            for f in core.step(time.monotonic()):
                assert f.error is None
                done += 1
                if done == clients:  # the loop is full and turning: count from here
                    t0, c0 = time.perf_counter(), time.process_time()
                send()
        t1, c1 = time.perf_counter(), time.process_time()
        core.reset()
        return len(loaded) / (t1 - t0), 1e3 * (c1 - c0) / len(loaded)


def _against_all_at_once(engine: Engine, turn, pairs: int) -> tuple[list[float], list[float], float]:
    """`pairs` alternating turns: the engine's round (all at once, unrecorded), then `turn()` (captions/s).
    Returns the rounds' captions/s, the turns' and the median of each pair's ratio (turn / round): on a machine
    whose speed drifts, each turn is weighed against its neighbour."""
    rounds, turns = [], []
    for _ in range(pairs):
        rounds.append(engine.round(record=False))
        turns.append(turn())
    return rounds, turns, float(np.median(np.divide(turns, rounds)))


def same_concurrency(engine: Engine, levels, pairs: int) -> list[dict]:
    """The engine at each level's concurrency: `pairs` alternating turns of a closed loop of that many clients
    (`Engine.closed_loop`) and of all at once; ratio: the median of each pair's (closed loop / all at once).
    No server with that many connections can hold more requests at once, so this is what the scheduler makes of
    them, HTTP, images and pipes aside."""
    out = []
    for clients in levels:
        cpu_ms: list[float] = []

        def closed(clients=clients, cpu_ms=cpu_ms) -> float:
            rate, ms = engine.closed_loop(clients)
            cpu_ms.append(ms)
            return rate

        all_at_once, rates, ratio = _against_all_at_once(engine, closed, pairs)
        out.append({"clients": clients, "closed": rates, "cpu_ms": cpu_ms, "all_at_once": all_at_once,
                    "ratio": ratio})
    return out


def _decode_until(stop, images: list[bytes], size: int) -> None:
    """The busy neighbour: the server's image decoding (service/images.py) of `images`, round and round."""
    from service.images import Limits, load_rgb
    limits, i = Limits(1 << 30, 1 << 30), 0
    while not stop.is_set():
        load_rgb(images[i % len(images)], limits, size)
        i += 1


def beside_busy_core(engine: Engine, images: list[bytes], size: int, pairs: int = 3) -> dict:
    """The engine's captions/s alone and beside a process decoding `images` without pause, `pairs` alternating
    turns of each; ratio: the median of each pair's (beside / alone)."""
    ctx = mp.get_context("spawn")

    def beside() -> float:
        stop = ctx.Event()
        neighbour = ctx.Process(target=_decode_until, args=(stop, images, size), daemon=True)
        neighbour.start()
        try:
            time.sleep(1.0)  # started (imports) and decoding
            return engine.round(record=False)
        finally:
            stop.set()
            neighbour.join(10)

    alone, busy, ratio = _against_all_at_once(engine, beside, pairs)
    return {"alone": alone, "beside": busy, "ratio": ratio}


def _scene_png(seed: int) -> tuple[bytes, object]:
    scene = generate_scene(seed)
    buf = io.BytesIO()
    scene.image.save(buf, "PNG")
    return buf.getvalue(), dataclasses.replace(scene, image=None)


def distinct_images(n: int, offset: int) -> list[tuple[bytes, object]]:
    """n scenes from seed `offset` on (held out: training never draws seeds this high), as (PNG bytes, scene
    without its image), made in a process per core (about 20 ms each) and kept as bytes: thousands of decoded
    scenes would not fit in memory."""
    seeds = range(offset, offset + n)
    if n < 64:
        return [_scene_png(s) for s in seeds]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return list(tqdm(pool.map(_scene_png, seeds, chunksize=32), total=n, desc="scenes", unit="scene",
                         leave=False, disable=None))


def write_bodies(images: list[bytes], directory: Path, **fields) -> int:
    """One JSON caption request per image (with `fields` besides), 0.json, 1.json, ... (loadtests/wrk_images.lua
    sends them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(images):
        (directory / f"{i}.json").write_text(json.dumps({"image": base64.b64encode(data).decode(), **fields}))
    return len(images)


def wrk(url: str, connections: int, seconds: float, bodies: Path, count: int, offset: int = 0) -> dict:
    """One wrk run (one thread: it holds hundreds of connections, and takes the least CPU from the server)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "--latency",
           "-s", str(WRK_SCRIPT), url, "--", str(bodies), str(count), str(offset)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 120).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))
    bad = int(re.search(r"non-2xx answers: (\d+)", out).group(1))

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    return {"throughput": rate, "requests": done, "non_2xx": bad, "p50_ms": pct("50"), "p99_ms": pct("99")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used, all its threads (/proc, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """The CPU the server's own process (the front: HTTP, image decoding, pipes) and its model workers use over
    a window, per answer: where a request's CPU goes, beside the engine's (`Engine.cpu_ms`)."""

    def __init__(self, server):
        self.server, self.pids = server, {"front": [server.proc.pid], "worker": server.worker_pids()}

    def answered(self) -> float:
        """Requests the server has answered, every endpoint and status (locca_requests_total)."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.server.get("/metrics").text.splitlines()
                   if line.startswith("locca_requests_total{"))

    def start(self) -> None:
        self.n0 = self.answered()
        self.c0 = {k: sum(map(cpu_seconds, pids)) for k, pids in self.pids.items()}

    def stop(self, window: float) -> dict:
        """Since `start`: CPU ms per answer (the answers the server counted, those still in flight when the load
        generator stopped included) and cores busy over the load generator's `window` seconds."""
        used = {k: sum(map(cpu_seconds, pids)) - self.c0[k] for k, pids in self.pids.items()}
        answers = max(self.answered() - self.n0, 1)
        return {**{f"{k}_cpu_ms": 1e3 * v / answers for k, v in used.items()},
                **{f"{k}_cores": v / window for k, v in used.items()}}


def server_levels(server, images: list[bytes], levels, window: float, warm_s: float,
                  between=lambda: None) -> tuple[str, list[dict]]:
    """Caption answers/s of `server` at each number of connections, each request another image of `images`
    (never one twice). between(): called before each level and after the last (the engine's turns), its
    results in each row as "before" and "after". -> (the load generator used, one row per level)."""
    hits = lambda: server.metric("locca_encoder_cache_lookups_total", 'result="hit"')  # noqa: E731
    steps = lambda: (server.metric("locca_batch_size_sum", 'kind="decode"'),  # noqa: E731
                     server.metric("locca_batch_size_count", 'kind="decode"'))
    rows, offset, turns, meter = [], 0, [between()], CpuMeter(server)

    def decode_rows(before: tuple) -> float:
        """The worker's mean rows per decode step since `before` (steps()), each step counted once however long
        it took: below the requests the worker holds on average in time (README, issue 19)."""
        (s0, n0), (s1, n1) = before, steps()
        return (s1 - s0) / max(n1 - n0, 1)

    def finish(row: dict) -> None:
        turns.append(between())
        rows.append({**row, "before": turns[-2], "after": turns[-1]})

    if shutil.which("wrk"):
        with tempfile.TemporaryDirectory() as tmp:
            count = write_bodies(images, Path(tmp))
            # first, every batch shape the levels will meet (ONNX Runtime's first call at a shape allocates):
            # unmeasured, at the most connections
            offset += wrk(f"{server.url}/v1/caption", max(levels), warm_s, Path(tmp), count, offset)["requests"]
            offset += max(levels)
            for c in levels:
                warm = wrk(f"{server.url}/v1/caption", c, warm_s, Path(tmp), count, offset)  # ramp up
                offset += warm["requests"] + c
                before, rows_before = hits(), steps()
                meter.start()
                row = wrk(f"{server.url}/v1/caption", c, window, Path(tmp), count, offset)
                offset += row["requests"] + c
                if offset > count:  # wrk goes round again: the cache hits below then say how often
                    print(f"warning: {count} images were too few; some were sent twice", file=sys.stderr)
                time.sleep(0.5)  # the worker ships its counts 4 times a second
                finish({"clients": c, **row, "cache_hits": hits() - before, **meter.stop(window),
                        "decode_rows": decode_rows(rows_before)})
        return "wrk", rows
    from . import serving
    reqs = [({"image": ("scene.png", im, "image/png")}, {}) for im in images]
    for c in levels:
        before, rows_before = hits(), steps()
        meter.start()
        row = serving.sweep(server.url, reqs[offset:], [c], window)[0]
        offset += int(row["requests"] * 1.5) + 2 * c
        time.sleep(0.5)
        finish({**row, "non_2xx": 0, "cache_hits": hits() - before, **meter.stop(window),
                "decode_rows": decode_rows(rows_before)})
    return "httpx (in the benchmark's process)", rows


# --- 7. REC client ------------------------------------------------------------------------------------
async def _rec_loop(url: str, work: list[tuple[bytes, list[str]]], clients: int, window: float, batched: bool):
    """Closed loops: each client takes the next image, asks its expressions (one call each, in turn, or one
    call with all of them), then takes the next. Returns the questions answered within the window (opened once
    every client has had an answer) and the time to the last answer of each image finished in it."""
    state = {"next": 0}
    answers: list[float] = []                # when each question was answered
    images: list[tuple[float, float]] = []   # (start, end) per image
    phase: dict[str, float] = {}
    ready: set[int] = set()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def ask(i: int, data: bytes, fields: dict, questions: int) -> dict:
            r = await http.post("/v1/refer", files={"image": ("scene.png", data, "image/png")}, data=fields)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
            end = time.perf_counter()
            answers.extend([end] * questions)
            ready.add(i)
            if "start" not in phase and len(ready) == clients:
                phase["start"], phase["end"] = end, end + window
            return r.json()

        async def client(i: int) -> None:
            while time.perf_counter() < phase.get("end", float("inf")):
                if state["next"] >= len(work):
                    raise RuntimeError(f"{len(work)} images are too few for the window: raise the pool")
                data, expressions = work[state["next"]]
                state["next"] += 1
                start = time.perf_counter()
                if batched:
                    got = (await ask(i, data, {"expressions": json.dumps(expressions)}, len(expressions)))["results"]
                else:
                    got = [await ask(i, data, {"expression": e}, 1) for e in expressions]
                assert [a["expression"] for a in got] == expressions
                images.append((start, time.perf_counter()))

        await asyncio.gather(*(client(i) for i in range(clients)))
    lat = [e - s for s, e in images if phase["start"] < e <= phase["end"]]
    if not lat:
        raise RuntimeError(f"no image was finished within the {window} s window: lengthen it")
    return {"started": state["next"], "images": len(lat),
            "questions_per_s": sum(phase["start"] < t <= phase["end"] for t in answers) / window,
            "image_p50_ms": 1e3 * float(np.median(lat)), "image_p99_ms": 1e3 * float(np.percentile(lat, 99))}


def rec(cached_url: str, uncached_url: str, work: list[tuple[bytes, list[str]]], clients: int, window: float,
        rounds: int, say) -> dict:
    """The three ways, taking turns `rounds` times (which goes first rotates); medians. Each run takes images
    no run before it used, so the cache only ever helps within an image's own questions."""
    modes = {"4 calls, no cache": (uncached_url, False), "4 calls, cache": (cached_url, False),
             "1 call of 4": (cached_url, True)}
    names, runs, used = list(modes), {m: [] for m in modes}, 0
    for k in range(rounds):
        for name in names[k % 3:] + names[:k % 3]:
            url, batched = modes[name]
            r = asyncio.run(_rec_loop(url, work[used:], clients, window, batched))
            used += r.pop("started")
            runs[name].append(r)
            say(f"7. REC, {name}: {r['questions_per_s']:.1f} questions/s, image p50 {r['image_p50_ms']:.0f} ms")
    out = {name: {key: float(np.median([r[key] for r in rs])) for key in rs[0]} for name, rs in runs.items()}
    base = out["4 calls, no cache"]["questions_per_s"]
    for row in out.values():
        row["vs_uncached"] = row["questions_per_s"] / base
    return {"clients": clients, "questions_per_image": len(work[0][1]), "rounds": rounds, "modes": out,
            "runs": runs}

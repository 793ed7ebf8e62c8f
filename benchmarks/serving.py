"""Section 2: our server against the naive one (benchmarks/naive_server.py), caption requests over HTTP at
1, 8, 32 and 64 concurrent clients, both on this machine, both with the same threads and model dimensions.

Each level is a closed loop: every client sends its next request as soon as its last one is answered. The
measurement window opens once every client has had one answer (the queue has reached its steady state) and
lasts `window` seconds; throughput is the answers completed inside it, latencies are theirs. Then the clients
stop sending and wait for what they have in flight, so the next level starts on an idle server. Both servers
run throughout and take turns level by level (bench's `serve`), so a change in the machine's load falls on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import httpx
import numpy as np

from service.launch import ROOT, ServerProcess, free_port, launch

WARM_LIMIT_S = 300.0  # a level whose clients cannot all get one answer in this long is an error


async def _closed_loop(url: str, requests: list[tuple[dict, dict]], clients: int, window: float,
                       path: str = "/v1/caption") -> dict:
    records: list[tuple[float, float]] = []
    answered: set[int] = set()
    phase: dict[str, float] = {}
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=WARM_LIMIT_S, limits=limits) as http:
        async def client(i: int) -> None:
            k = i
            while time.perf_counter() < phase.get("end", float("inf")):
                files, data = requests[k % len(requests)]
                k += clients
                start = time.perf_counter()
                r = await http.post(path, files=files, data=data)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
                end = time.perf_counter()
                records.append((start, end))
                answered.add(i)
                if "start" not in phase and len(answered) == clients:
                    phase["start"], phase["end"] = end, end + window
                if "start" not in phase and end - t0 > WARM_LIMIT_S:
                    raise TimeoutError(f"{url}: not every one of {clients} clients answered in {WARM_LIMIT_S} s")

        await asyncio.gather(*(client(i) for i in range(clients)))
    lat = np.array([e - s for s, e in records if phase["start"] < e <= phase["end"]])
    return {"clients": clients, "requests": len(lat), "throughput": len(lat) / window,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}


def sweep(url: str, requests: list[tuple[dict, dict]], levels, window: float, probe=None,
          path: str = "/v1/caption") -> list[dict]:
    """One closed loop per level. probe: a callable returning counters of the server (dict of floats); each
    row gets their change over its level under "server". path: the endpoint the requests are posted to."""
    rows = []
    for c in levels:
        before = probe() if probe else {}
        rows.append(asyncio.run(_closed_loop(url, requests, c, window, path)))
        if probe:
            rows[-1]["server"] = {k: v - before[k] for k, v in probe().items()}
    return rows


@contextlib.contextmanager
def naive_server(model: str, threads: int, device: str, dtype: str, log_path: str):
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.naive_server", "--model", str(model), "--port",
                                 str(port), "--threads", str(threads), "--device", device, "--dtype", dtype],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, 0, log_path)
    try:
        server.wait("/readyz", timeout=180)
        yield server
    finally:
        server.stop()


def our_server(model: str, threads: int, device: str, log_path: str, workers: int = 1):
    """`locca serve` (service/launch.py): one worker (or `workers`), its default backend (ONNX Runtime) on a
    CPU, PyTorch on a GPU (the lent GPU machines have no onnxruntime-gpu), every other setting its default but
    the encoded-image cache, off: this section's clients send the pool's 32 images round and round, which the
    cache would serve without the encoder, unlike the naive server (and /v1/ground after /v1/caption on the
    same scene would find it encoded). Sections 6 and 7 measure the server with the cache on."""
    backend = "onnxruntime" if device == "cpu" else "torch"
    return launch(log_path, model=model, backend=backend, threads=threads, workers=workers, device=device,
                  encoder_cache_mb=0)


def batch_counters(server: ServerProcess) -> dict[str, float]:
    """Our server's batching, from /metrics: prefill calls and the images they encoded, decode steps and rows."""
    m = server.metric
    return {"prefills": m("locca_batch_size_count", 'kind="prefill"'),
            "prefill_images": m("locca_batch_size_sum", 'kind="prefill"'),
            "decode_steps": m("locca_batch_size_count", 'kind="decode"'),
            "decode_rows": m("locca_batch_size_sum", 'kind="decode"')}


def caption_requests(images: list[bytes], new_tokens: list[int]) -> tuple[list, list]:
    """The same images for both servers; the naive one is told how many tokens ours generates for each."""
    ours = [({"image": ("scene.png", im, "image/png")}, {}) for im in images]
    naive = [({"image": ("scene.png", im, "image/png")}, {"new_tokens": str(n)})
             for im, n in zip(images, new_tokens, strict=True)]
    return ours, naive

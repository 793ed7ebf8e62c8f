"""The server's own overhead: p50 latency over HTTP against the same requests run in-process, concurrency 1.

    python benchmarks/bench_server.py [--requests 40] [--backend onnxruntime] [--json out.json]

In-process = exactly the work a model worker does for a request (decode and preprocess the image, the engine
core's steps until it finishes, the answer as JSON), called directly in this process. HTTP = the
real server (`locca serve` in a subprocess, one worker, the same backend and thread count) answering the same
requests one at a time through httpx. Both run in this one invocation, interleaved request by request, so
machine noise hits both alike; the figure is the difference of medians (goal: within 3 ms, issue 6).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import httpx
import numpy as np

from export.backends import load_inference
from model.core import EngineCore
from model.requests import Request
from model.shapes import generate_scene
from service import images
from service.bundle import devices, resolve
from service.launch import launch
from service.schemas import to_json
from service.settings import Settings


def requests_for(n: int) -> list[tuple[str, bytes, dict]]:
    out = []
    for i in range(n):
        scene = generate_scene(2_000_000_000 + i)
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG")
        kind = ("caption", "refer", "ground")[i % 3]
        fields = {"expression": scene.expressions[0]} if kind == "refer" else {}
        if kind == "ground":
            fields = {"box": json.dumps(list(scene.objects[0].box))}
        out.append((kind, buf.getvalue(), fields))
    return out


class InProcess:
    def __init__(self, settings: Settings):
        src = resolve(settings)
        loaded = load_inference(src.path, src.backend, devices(settings)[0], settings.threads or None)
        self.backend = src.backend
        self.core = EngineCore(loaded.inference, loaded.tasks, settings.scheduler())
        self.limits = images.Limits(settings.max_image_bytes, settings.max_image_pixels)
        self.size = loaded.cfg.image_size

    def __call__(self, kind: str, data: bytes, fields: dict) -> dict:
        pixels, size = images.load(data, self.limits, self.size)
        if kind == "caption":
            request = Request("caption")
        elif kind == "refer":
            request = Request("refer", expression=fields["expression"])
        else:
            request = Request("describe", box=tuple(json.loads(fields["box"])))
        self.core.add(request, pixels, size)
        (done,) = self.core.run()
        self.core.reset()
        return to_json(done.result, request.expression)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60, help="requests per path (default 60)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    settings = Settings(backend=args.backend, threads=args.threads, workers=1)
    local = InProcess(settings)
    reqs = requests_for(args.requests)
    lat = {"in-process": {}, "http": {}}
    with launch("/tmp/locca-bench-server.log", backend=args.backend, threads=args.threads, workers=1) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        for kind, data, fields in reqs[:6]:  # warm both paths
            local(kind, data, fields)
            client.post(f"/v1/{kind}", files={"image": ("s.png", data, "image/png")}, data=fields)
        for kind, data, fields in reqs:
            t = time.perf_counter()
            want = local(kind, data, fields)
            lat["in-process"].setdefault(kind, []).append(time.perf_counter() - t)
            t = time.perf_counter()
            r = client.post(f"/v1/{kind}", files={"image": ("s.png", data, "image/png")}, data=fields)
            lat["http"].setdefault(kind, []).append(time.perf_counter() - t)
            r.raise_for_status()
            got = r.json()
            same = (got.get("caption") == want.get("caption") and got.get("box") == want.get("box")
                    and [g["text"] for g in got.get("regions", [])] == [w["text"] for w in want.get("regions", [])])
            assert same, f"{kind}: server {got} != in-process {want}"

    rows = []
    print(f"backend {local.backend}, {args.threads} threads, {args.requests} requests, concurrency 1\n")
    print(f"{'task':<10}{'in-process p50':>16}{'HTTP p50':>12}{'overhead':>12}{'ratio':>8}")
    for kind in ("caption", "refer", "ground", "all"):
        pick = (lambda d: sum(d.values(), [])) if kind == "all" else (lambda d, k=kind: d[k])
        a, b = statistics.median(pick(lat["in-process"])), statistics.median(pick(lat["http"]))
        rows.append({"task": kind, "in_process_p50_ms": 1e3 * a, "http_p50_ms": 1e3 * b,
                     "overhead_ms": 1e3 * (b - a), "ratio": b / a})
        print(f"{kind:<10}{1e3 * a:>13.1f} ms{1e3 * b:>9.1f} ms{1e3 * (b - a):>9.1f} ms{b / a:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": local.backend, "threads": args.threads, "rows": rows,
                       "raw_ms": {k: {t: list(np.round(np.array(v) * 1e3, 3)) for t, v in d.items()}
                                  for k, d in lat.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

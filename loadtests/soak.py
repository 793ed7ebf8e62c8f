"""Soak: minutes of mixed load at about twice the measured capacity, with nothing lost.

    make soak                                    # 10 minutes against its own `locca serve` (make serve's model)
    python loadtests/soak.py --time 60           # a shorter run
    python loadtests/soak.py --url http://HOST:8000 --grpc HOST:50051    # a server already running

1. Capacity: a closed loop of `--queue` clients (as many as the server holds at once, so none is refused)
   for `--measure` s after a warm-up: answers per second.
2. Soak: an open loop, Poisson arrivals at `--factor` x capacity for `--time` s, whatever the answers; the
   load test's mix (workload.py: 40 % captions, 35 % refer, 15 % describe a box, 10 % ground every object), 3 in
   4 over REST (1 in 4 of those JSON), 1 in 4 over gRPC. Every answer is checked against the contract.
3. Report (`--out`, default loadtests/results/): soak.json (summary and a 10-s timeline), soak.md, soak.png
   (offered and accepted throughput, rejection rate, p50 / p99 of accepted requests, memory, over time).

Nothing lost means: every request sent got an answer from the server (an HTTP status or a gRPC status) before
the client's own timeout, which is longer than the server's request deadline. Exit status 1 if any request
was lost, any answer was a 500 / INTERNAL, or any 200 broke the contract.

API keys: the client sends LOCCA_API_KEY, or else the first of LOCCA_API_KEYS (which its own server gets).

Memory: with its own server, the resident memory of the server process and its workers (/proc); against
`--url`, the server process's `process_resident_memory_bytes` from /metrics (workers not included).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import workload  # noqa: E402

from service import launch, protos  # noqa: E402

GRPC_STATUS = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
WINDOW_S = 10.0


@dataclass
class Outcome:
    sent: float             # s since the soak began, when the request was actually sent
    seconds: float          # until the answer (or the client gave up)
    lag: float              # how late the load generator sent it against its schedule
    transport: str          # rest | json | grpc
    kind: str               # a key of workload.MIX
    status: int | None      # HTTP status (gRPC mapped by GRPC_STATUS, others 500); None: lost, no answer
    problem: str | None = None  # a 200 that broke the contract, or why it was lost


class RawHttp:
    """A minimal HTTP/1.1 client for the load generator: keep-alive connections, requests encoded once, answers
    with Content-Length (all the server sends). httpx costs several times the CPU per request, and on a small
    shared machine the generator then falls behind the schedule it exists to keep (a first soak did)."""

    def __init__(self, url: str, timeout: float, headers: dict, idle_s: float = 4.0):
        u = httpx.URL(url)
        self.host, self.port, self.timeout, self.idle_s = u.host, u.port or 80, timeout, idle_s
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []

    def _take(self):
        while self.idle:
            since, reader, writer = self.idle.pop()
            if time.monotonic() - since < self.idle_s and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{self.extra}\r\n").encode("latin-1")
        async with asyncio.timeout(self.timeout):
            reader, writer = self._take() or await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(head + body)
                await writer.drain()
                status, length, close = int((await reader.readline()).split()[1]), 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection":
                        close = "close" in value.lower()
                data = await reader.readexactly(length)
            except BaseException:
                writer.close()
                raise
        if close:
            writer.close()
        else:
            self.idle.append((time.monotonic(), reader, writer))
        return status, data

    def close(self) -> None:
        for _, _, writer in self.idle:
            writer.close()


class Load:
    def __init__(self, url: str, grpc_target: str, timeout: float, api_key: str | None, seed: int):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = RawHttp(url, timeout, headers)
        self.bodies: dict[tuple, tuple[bytes, str]] = {}
        self.pb, pb_grpc = protos.load()
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = pb_grpc.LocCaStub(self.channel)
        self.metadata = (("authorization", headers["Authorization"]),) if api_key else ()
        self.timeout, self.rng, self.scenes = timeout, random.Random(seed), workload.scenes(32)

    def next(self) -> tuple[str, workload.Call]:
        r = self.rng.random()
        transport = "grpc" if r < 0.25 else ("json" if r < 0.25 + 0.75 / 4 else "rest")
        return transport, workload.draw(self.rng, self.scenes)

    async def send(self, transport: str, call: workload.Call, t0: float, due: float | None = None) -> Outcome:
        sent = time.perf_counter()
        lag = 0.0 if due is None else max(0.0, sent - t0 - due)
        try:
            if transport == "grpc":
                status, body = await self._grpc(call)
            else:
                status, body = await self._rest(call, transport == "json")
            problem = workload.check(call, body) if status == 200 else None
        except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError,
                grpc.aio.AioRpcError) as e:
            status, problem = None, f"{type(e).__name__}: {e}"[:200]
        return Outcome(sent - t0, time.perf_counter() - sent, lag, transport, call.kind, status, problem)

    def body(self, call: workload.Call, as_json: bool) -> tuple[bytes, str]:
        """The request's body and content type, encoded once per distinct request."""
        key = (as_json, call.path, call.scene.seed, json.dumps(call.fields, sort_keys=True))
        if key not in self.bodies:
            if as_json:
                req = httpx.Request("POST", "http://x", json={"image": base64.b64encode(call.scene.png).decode(),
                                                             **call.fields})
            else:
                form = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in call.fields.items()}
                req = httpx.Request("POST", "http://x", files={"image": ("scene.png", call.scene.png)}, data=form)
            self.bodies[key] = (req.read(), req.headers["content-type"])
        return self.bodies[key]

    async def _rest(self, call: workload.Call, as_json: bool) -> tuple[int, dict]:
        content, content_type = self.body(call, as_json)
        status, data = await self.http.post(call.path, content, content_type)
        return status, (json.loads(data) if status == 200 else {})

    async def _grpc(self, call: workload.Call) -> tuple[int, dict]:
        pb, image = self.pb, call.scene.png
        try:
            if call.kind == "caption":
                r = await self.stub.Caption(pb.CaptionRequest(image=image), timeout=self.timeout,
                                            metadata=self.metadata)
                return 200, {"caption": r.caption, "score": r.score}
            if call.kind == "refer":
                r = await self.stub.Refer(pb.ReferRequest(image=image, expression=call.fields["expression"]),
                                          timeout=self.timeout, metadata=self.metadata)
                return 200, {"box": [r.box.x0, r.box.y0, r.box.x1, r.box.y1], "score": r.score}
            req = pb.GroundRequest(image=image, max_regions=call.fields.get("max_regions", 0))
            if "box" in call.fields:
                req.box.CopyFrom(pb.Box(**dict(zip(("x0", "y0", "x1", "y1"), call.fields["box"], strict=True))))
            r = await self.stub.Ground(req, timeout=self.timeout, metadata=self.metadata)
            return 200, {"regions": [{"box": [g.box.x0, g.box.y0, g.box.x1, g.box.y1], "text": g.text,
                                      "score": g.score} for g in r.regions]}
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "Deadline Exceeded" == e.details():
                raise  # the client's own deadline, not the server's answer: lost
            return GRPC_STATUS.get(e.code().name, 500), {}

    async def close(self) -> None:
        self.http.close()
        await self.channel.close()


async def capacity(load: Load, clients: int, warmup: float, measure: float) -> float:
    """Answers per second of a closed loop of `clients`, over `measure` s after `warmup` s."""
    t0 = time.perf_counter()
    done: list[Outcome] = []

    async def client():
        while time.perf_counter() - t0 < warmup + measure:
            done.append(await load.send(*load.next(), t0))

    await asyncio.gather(*(client() for _ in range(clients)))
    answered = [o for o in done if o.status == 200 and warmup <= o.sent + o.seconds <= warmup + measure]
    return len(answered) / measure


async def soak(load: Load, rate: float, seconds: float, memory, seed: int) -> tuple[list[Outcome], list]:
    """Open loop at `rate` requests/s (Poisson) for `seconds`; `memory()` -> MB, sampled every 5 s."""
    rng, t0 = np.random.default_rng(seed), time.perf_counter()
    tasks, samples, at, next_sample = [], [], 0.0, 0.0
    while at < seconds:
        now = time.perf_counter() - t0
        if now >= next_sample:
            samples.append((now, memory()))
            next_sample = now + 5.0
        if at > now:
            await asyncio.sleep(min(at - now, next_sample - now))
            continue
        tasks.append(asyncio.create_task(load.send(*load.next(), t0, due=at)))
        at += rng.exponential(1.0 / rate)
        await asyncio.sleep(0)  # behind schedule or not, let the requests already due go out
    outcomes = await asyncio.gather(*tasks)
    samples.append((time.perf_counter() - t0, memory()))
    return outcomes, samples


def timeline(outcomes: list[Outcome], samples: list, seconds: float) -> list[dict]:
    rows = []
    for w in range(int(np.ceil(seconds / WINDOW_S))):
        lo, hi = w * WINDOW_S, (w + 1) * WINDOW_S
        sent = [o for o in outcomes if lo <= o.sent < hi]
        ok = [o.seconds for o in sent if o.status == 200]
        mem = [m for t, m in samples if lo <= t < hi]
        rows.append({"t": lo, "offered_rps": len(sent) / WINDOW_S, "accepted_rps": len(ok) / WINDOW_S,
                     "rejected_share": sum(o.status == 429 for o in sent) / max(1, len(sent)),
                     "p50_s": float(np.percentile(ok, 50)) if ok else None,
                     "p99_s": float(np.percentile(ok, 99)) if ok else None,
                     "memory_mb": mem[-1] if mem else None})
    return rows


def summarize(outcomes: list[Outcome], samples: list, cap: float, rate: float, seconds: float) -> dict:
    ok = [o.seconds for o in outcomes if o.status == 200]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = "lost" if o.status is None else str(o.status)
        statuses[key] = statuses.get(key, 0) + 1
    mem = [m for _, m in samples]
    after_1min = [m for t, m in samples if t >= 60] or mem
    return {
        "capacity_rps": round(cap, 2), "offered_rps": round(rate, 2), "seconds": seconds,
        "sent_rps": round(len(outcomes) / seconds, 2),
        "generator_lag_p99_s": round(float(np.percentile([o.lag for o in outcomes], 99)), 3) if outcomes else None,
        "sent": len(outcomes), "answered": sum(o.status is not None for o in outcomes),
        "lost": sum(o.status is None for o in outcomes), "statuses": statuses,
        "contract_violations": sum(o.problem is not None and o.status == 200 for o in outcomes),
        "accepted_rps": round(len(ok) / seconds, 2),
        "rejection_rate": round(statuses.get("429", 0) / max(1, len(outcomes)), 4),
        "accepted_p50_s": round(float(np.percentile(ok, 50)), 3) if ok else None,
        "accepted_p95_s": round(float(np.percentile(ok, 95)), 3) if ok else None,
        "accepted_p99_s": round(float(np.percentile(ok, 99)), 3) if ok else None,
        "rejected_p99_s": round(float(np.percentile([o.seconds for o in outcomes if o.status == 429], 99)), 3)
        if statuses.get("429") else None,
        "memory_mb": {"start": round(mem[0], 1), "after_1_min": round(after_1min[0], 1),
                      "end": round(mem[-1], 1), "max": round(max(mem), 1)} if mem else None,
    }


def plot(rows: list[dict], samples: list, summary: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [r["t"] / 60 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ax[0].plot(t, [r["offered_rps"] for r in rows], label="offered")
    ax[0].plot(t, [r["accepted_rps"] for r in rows], label="accepted (200)")
    ax[0].axhline(summary["capacity_rps"], color="grey", ls=":", label="measured capacity")
    ax[0].set_ylabel("requests / s")
    ax[0].set_ylim(bottom=0)
    ax[0].legend(loc="lower right")
    ax[1].plot(t, [100 * r["rejected_share"] for r in rows], color="C3")
    ax[1].set_ylabel("rejected (429) %")
    ax[2].plot(t, [r["p50_s"] for r in rows], label="p50")
    ax[2].plot(t, [r["p99_s"] for r in rows], label="p99")
    ax[2].set_ylabel("accepted latency, s")
    ax[2].set_ylim(bottom=0)
    ax[2].legend(loc="lower right")
    mem = [(t / 60, m) for t, m in samples if m is not None]
    ax[3].plot([t for t, _ in mem], [m for _, m in mem], color="C2")
    ax[3].set_ylabel("memory, MB")
    ax[3].set_ylim(0, 1.2 * max([m for _, m in mem], default=1))
    ax[3].set_xlabel("minutes")
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(f"soak: {summary['offered_rps']:.1f} req/s offered ({summary['offered_rps'] / max(1e-9, summary['capacity_rps']):.1f}x "
                 f"capacity), {summary['sent']} requests, {summary['lost']} lost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(summary: dict, meta: dict) -> str:
    s, m = summary, summary["memory_mb"] or {}
    return "\n".join([
        f"# Soak, {meta['date']}", "", f"`{meta['command']}` on {meta['machine']}", "",
        f"Server: {meta['server']}", "",
        "| measure | value |", "|---|---|",
        f"| measured capacity | {s['capacity_rps']} req/s |",
        f"| offered (open loop, Poisson) | {s['offered_rps']} req/s for {s['seconds']:.0f} s (sent: "
        f"{s['sent_rps']} req/s; generator lag p99 {s['generator_lag_p99_s']} s) |",
        f"| requests sent / answered / lost | {s['sent']} / {s['answered']} / {s['lost']} |",
        f"| answers by status | {', '.join(f'{k}: {v}' for k, v in sorted(s['statuses'].items()))} |",
        f"| accepted throughput | {s['accepted_rps']} req/s |",
        f"| rejection rate (429) | {100 * s['rejection_rate']:.1f} % |",
        f"| accepted p50 / p95 / p99 | {s['accepted_p50_s']} / {s['accepted_p95_s']} / {s['accepted_p99_s']} s |",
        f"| 429 p99 | {s['rejected_p99_s']} s |",
        f"| memory start / after 1 min / end / max | {m.get('start')} / {m.get('after_1_min')} / {m.get('end')} / "
        f"{m.get('max')} MB |",
        f"| 200s breaking the contract | {s['contract_violations']} |", ""])


def rss_mb(server: launch.ServerProcess) -> float:
    total = 0
    for pid in [server.proc.pid, *server.worker_pids()]:
        try:
            total += int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])
        except (OSError, TypeError):
            pass
    return total / 1024


def metrics_rss_mb(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
        return float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)[1]) / 2**20
    except (httpx.HTTPError, TypeError):
        return None


async def main_async(args, url: str, grpc_target: str, memory) -> dict:
    keys = [k for k in os.environ.get("LOCCA_API_KEYS", "").split(",") if k.strip()]
    key = os.environ.get("LOCCA_API_KEY") or (keys[0].strip() if keys else None)
    load = Load(url, grpc_target, args.client_timeout, key, args.seed)
    try:
        print(f"measuring capacity: {args.queue} clients, {args.measure:.0f} s", flush=True)
        cap = await capacity(load, args.queue, warmup=5.0, measure=args.measure)
        rate = args.factor * cap
        print(f"capacity {cap:.2f} req/s; soaking at {rate:.2f} req/s for {args.time:.0f} s", flush=True)
        outcomes, samples = await soak(load, rate, args.time, memory, args.seed)
    finally:
        await load.close()
    summary = summarize(outcomes, samples, cap, rate, args.time)
    return {"summary": summary, "timeline": timeline(outcomes, samples, args.time), "memory": samples,
            "lost": [asdict(o) for o in outcomes if o.status is None][:50],
            "violations": [asdict(o) for o in outcomes if o.problem and o.status == 200][:50]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", type=float, default=600, help="soak seconds (default 600)")
    p.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    p.add_argument("--measure", type=float, default=30, help="seconds of the capacity measurement")
    p.add_argument("--queue", type=int, default=32, help="the server's max_queue (its own server is started "
                   "with it; also the capacity measurement's clients)")
    p.add_argument("--url", help="a running server's REST URL (default: start one)")
    p.add_argument("--grpc", help="its gRPC target (default: the URL's host, port 50051)")
    p.add_argument("--client-timeout", type=float, default=90, help="a request unanswered after this is lost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.url:
        url, grpc_target = args.url.rstrip("/"), args.grpc or f"{httpx.URL(args.url).host}:50051"
        memory = lambda: metrics_rss_mb(url)  # noqa: E731
        described = f"{url} (running)"
    else:
        server = launch.start(out / "soak-serve.log", max_queue=args.queue, log_level="warning")
        print(f"starting a server (log: {out / 'soak-serve.log'})", flush=True)
        server.wait("/readyz", timeout=900)
        url, grpc_target = server.url, server.grpc_target
        memory = lambda: rss_mb(server)  # noqa: E731
        info = httpx.get(url + "/v1/models", timeout=10).json()
        described = (f"`locca serve`, {info['name']} ({info['size']}), {info['backend']} on {info['device']}, "
                     f"LOCCA_MAX_QUEUE={args.queue}, other settings default")
    try:
        result = asyncio.run(main_async(args, url, grpc_target, memory))
    finally:
        if server is not None:
            server.stop()
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python loadtests/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{os.cpu_count()} CPUs ({cpu[1].strip() if cpu else 'unknown'}), load average "
                       f"{os.getloadavg()[0]:.1f} at the end", "server": described}
    result["meta"] = meta
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak.md").write_text(markdown(result["summary"], meta))
    plot(result["timeline"], result["memory"], result["summary"], out / "soak.png")
    print((out / "soak.md").read_text())
    s = result["summary"]
    if s["generator_lag_p99_s"] and s["generator_lag_p99_s"] > 1.0:
        print("warning: the load generator fell behind its schedule (lag p99 > 1 s): the server got less than "
              "the offered load; see sent_rps", file=sys.stderr)
    failed = s["lost"] or s["statuses"].get("500") or s["contract_violations"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reliability against a real server of small capacity (4 requests held at most) with API keys on: floods far
over capacity get only 200s and 429s (with Retry-After), accepted requests keep a bounded p99 and memory stays
flat; a worker killed mid-batch under a flood is replaced with 503s (never a hang) for what it held; a hung
worker costs its requests their deadline (504), not a hang, and one frozen while holding requests longer than
worker_stall_timeout_s is killed and replaced (503); SIGTERM mid-flood drains. Then API keys, a
missing or corrupt model failing at start with a clear message, and checkpoints that never unpickle."""

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from client import LoccaClient, LoccaError, LoccaGrpcClient
from export import bundle_format
from model import checkpoint
from model.config import BoxConfig
from model.shapes import generate_scene
from service import launch, protos
from service.settings import Settings

pb, pb_grpc = protos.load()
ROOT = Path(__file__).resolve().parent.parent
QUEUE = 4
KEY = "test-key-0123456789abcdef"
STALL_S = 4.0  # worker_stall_timeout_s of the module's server
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_model, tok):
    path = tmp_path_factory.mktemp("model") / "checkpoint.safetensors"
    checkpoint.save(path, tiny_model, tok, BoxConfig(bins=64))
    return path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = launch.start(tmp_path_factory.mktemp("log") / "serve.log", model=model_path, backend="torch", threads=1,
                     max_queue=QUEUE, max_batch_size=QUEUE, max_rows=33, retry_after_s=1, drain_timeout_s=60,
                     worker_stall_timeout_s=STALL_S, api_keys=f"another-key-abcdefghijklmnop,{KEY}",
                     # the floods repeat 4 images: with the encoded-image cache all but 4 requests would skip the
                     # encoder, and the server would no longer be over capacity at the floods' rates
                     encoder_cache_mb=0)
    try:
        s.wait("/readyz")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def images():
    out = []
    for seed in range(4):
        buf = io.BytesIO()
        generate_scene(seed).image.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def rss_mb(server) -> float:
    """Resident memory of the server process and its workers, MB."""
    total = 0
    for pid in [server.proc.pid, *server.worker_pids()]:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])
    return total / 1024


def request_for(i: int, images: list[bytes]) -> dict:
    data = images[i % len(images)]
    kind = i % 3
    if kind == 0:
        return {"url": "/v1/caption", "files": {"image": data}, "data": {"max_new_tokens": "8"}}
    if kind == 1:
        return {"url": "/v1/refer", "files": {"image": data}, "data": {"expression": "the red circle"}}
    return {"url": "/v1/ground", "files": {"image": data}, "data": {"box": "10,10,120,90"}}


async def flood(url: str, images: list[bytes], seconds: float, rate: float, during=None, starts=None) -> list[tuple]:
    """Open loop: a new request every 1/rate s for `seconds`, whatever the answers; `during` (a callable) runs
    halfway. -> (status or exception name, seconds, Retry-After) per request, every request answered, in the
    order sent; `starts`, a list, gets each request's start (perf_counter) in the same order."""
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60,
                                 limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)) as c:
        async def one(i):
            t0 = time.perf_counter()
            if starts is not None:
                starts.append(t0)
            try:
                r = await c.post(**request_for(i, images))
                return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")
            except httpx.HTTPError as e:
                return type(e).__name__, time.perf_counter() - t0, None

        tasks, t0, i = [], time.perf_counter(), 0
        while (now := time.perf_counter() - t0) < seconds:
            if during and now >= seconds / 2:
                during()
                during = None
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, i / rate - (time.perf_counter() - t0)))
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)  # nothing may hang


def p99(xs):
    return float(np.percentile(xs, 99)) if xs else 0.0


def test_a_flood_gets_only_200_and_429_with_bounded_latency_and_flat_memory(server, images):
    alone = []
    with LoccaClient(server.url, retries=0, api_key=KEY) as c:
        for i in range(6):
            t0 = time.perf_counter()
            c.http.post(**request_for(i, images)).raise_for_status()
            alone.append(time.perf_counter() - t0)
    # Over capacity: 80 requests/s, about twice what this server (QUEUE = 4, one thread) answered on 2 cores.
    # Far more would measure the client's own event loop rather than the server.
    rate = 80.0
    memory, rounds = [], []
    for _ in range(4):
        results = asyncio.run(flood(server.url, images, seconds=3.0, rate=rate))
        rounds.append(results)
        memory.append(rss_mb(server))
    results = [r for rnd in rounds for r in rnd]
    statuses = {s for s, _, _ in results}
    assert statuses <= {200, 429}, statuses
    assert all(ra == "1" for s, _, ra in results if s == 429)
    accepted = [t for s, t, _ in results if s == 200]
    rejected = [t for s, t, _ in results if s == 429]
    assert len(accepted) >= 10 and len(rejected) >= len(results) / 10, (len(accepted), len(rejected))
    # An accepted request waits behind at most QUEUE - 1 others; a 429 costs no model time at all.
    bound = 5.0 + 3 * QUEUE * max(alone)
    assert p99(accepted) < bound, (p99(accepted), bound, max(alone))
    assert p99(rejected) < 2.0, p99(rejected)
    # The first round warms the allocators; after it, memory stays flat.
    assert max(memory[1:]) - memory[0] < 40, memory
    # Once the flood stops the server is fully ready at once.
    assert server.get("/readyz").status_code == 200
    assert server.metric("locca_requests_in_flight") == 0
    with LoccaClient(server.url, retries=0, api_key=KEY) as c:
        assert c.caption(images[0], max_new_tokens=6).caption
    print(f"flood: {len(results)} requests, {len(accepted)} accepted, p99 {p99(accepted):.2f}s "
          f"(alone max {max(alone):.2f}s), 429 p99 {p99(rejected) * 1000:.0f} ms, memory {memory} MB")


def test_grpc_flood_gets_ok_or_resource_exhausted(server, images):
    async def run():
        async with grpc.aio.insecure_channel(server.grpc_target) as ch:
            stub = pb_grpc.LocCaStub(ch)

            async def one(i):
                try:
                    await stub.Caption(pb.CaptionRequest(image=images[i % 4], max_new_tokens=6), timeout=60,
                                       metadata=(("authorization", f"Bearer {KEY}"),))
                    return "OK", None
                except grpc.aio.AioRpcError as e:
                    return e.code().name, dict(e.trailing_metadata() or ()).get("retry-after")
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(60))), timeout=90)

    results = asyncio.run(run())
    assert {s for s, _ in results} <= {"OK", "RESOURCE_EXHAUSTED"}, results
    assert "OK" in {s for s, _ in results} and "RESOURCE_EXHAUSTED" in {s for s, _ in results}
    assert all(ra == "1" for s, ra in results if s == "RESOURCE_EXHAUSTED")


def test_a_worker_killed_mid_flood_is_replaced_and_nothing_hangs(server, images):
    (pid,) = server.worker_pids()
    restarts, retried = server.metric("locca_worker_restarts_total"), server.metric("locca_requests_retried_total")

    def kill():
        os.kill(pid, signal.SIGKILL)

    results = asyncio.run(flood(server.url, images, seconds=3.0, rate=40, during=kill))
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429}, set(statuses)  # issue 21: those it held run again, arrivals wait
    assert server.metric("locca_requests_retried_total") > retried, "the killed worker held requests"
    assert all(ra == "1" for s, _, ra in results if s == 429)
    server.wait("/readyz", timeout=60)
    assert server.worker_pids() != [pid]
    assert server.metric("locca_worker_restarts_total") == restarts + 1
    with LoccaClient(server.url, retries=0, api_key=KEY) as c:
        assert c.caption(images[1], max_new_tokens=6).caption


def test_with_two_workers_a_killed_one_loses_nothing(model_path, images, tmp_path):
    """Issue 21's chaos test with two workers: one is killed mid-flood; its requests move to the survivor (or
    its own replacement), every request is answered 200 or 429, and both workers serve again after. On the
    standard library's event loop (--loop asyncio), where the other tests run on uvloop: the worker pipes'
    transports (service/pool.py) work on both."""
    with launch.launch(tmp_path / "serve.log", model=model_path, backend="torch", threads=1, workers=2,
                       max_queue=QUEUE, max_batch_size=QUEUE, max_rows=33, retry_after_s=1,
                       api_keys=KEY, loop="asyncio") as two:
        assert '"loop": "asyncio"' in two.log_path.read_text()
        first = two.worker_pids()
        assert len(first) == 2
        retried = two.metric("locca_requests_retried_total")
        results = asyncio.run(flood(two.url, images, seconds=3.0, rate=40,
                                    during=lambda: os.kill(first[0], signal.SIGKILL)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429}, set(statuses)
        assert statuses.count(200) >= len(statuses) // 2, "the survivor kept answering"
        assert two.metric("locca_requests_retried_total") > retried, "the killed worker held requests"
        two.wait("/readyz", timeout=60)
        deadline = time.monotonic() + 60
        while two.metric("locca_workers_ready") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert two.metric("locca_workers_ready") == 2 and first[0] not in two.worker_pids()
        assert two.metric("locca_worker_restarts_total") == 1


def test_a_worker_that_keeps_dying_is_restarted_after_a_pause(model_path, images, tmp_path):
    """Issue 21's crash-loop guard: the first death restarts at once; the second within a minute waits 1 s, and
    the log and the metrics say why."""
    with launch.launch(tmp_path / "serve.log", model=model_path, backend="torch", threads=1, api_keys=KEY) as s:
        pauses = []
        for _ in range(2):
            (pid,) = s.worker_pids()
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            while s.worker_pids() in ([pid], []) and time.monotonic() - t0 < 30:
                time.sleep(0.02)
            pauses.append(time.monotonic() - t0)
            s.wait("/readyz", timeout=60)
        assert s.metric("locca_worker_restarts_total") == 2 and s.metric("locca_worker_backoffs_total") == 1
        assert s.metric("locca_worker_backoff_seconds", 'slot="0"') == 1.0
        assert pauses[1] >= 1.0 > pauses[0], pauses
        log = (tmp_path / "serve.log").read_text()
        assert '"msg": "worker keeps dying; restarting it after a pause"' in log and '"restart_in_s": 1.0' in log
        with LoccaClient(s.url, retries=0, api_key=KEY) as c:
            assert c.caption(images[0], max_new_tokens=6).caption


def test_a_hung_worker_costs_its_requests_their_deadline_not_a_hang(server, images):
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/caption", files={"image": images[0]}, timeout=30,
                       headers={**AUTH, "X-Request-Timeout": "1.5"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.perf_counter() - t0 < 5
        with LoccaGrpcClient(server.grpc_target, retries=0, api_key=KEY) as g, pytest.raises(LoccaError) as e:
            g.caption(images[0], timeout=1.5)
        assert e.value.status == "DEADLINE_EXCEEDED"
    finally:
        os.kill(pid, signal.SIGCONT)
    with LoccaClient(server.url, retries=0, api_key=KEY) as c:
        assert c.caption(images[0], max_new_tokens=6).caption


def test_a_worker_frozen_while_holding_requests_is_killed_and_replaced(server, images):
    (pid,) = server.worker_pids()
    restarts, stalls = server.metric("locca_worker_restarts_total"), server.metric("locca_worker_stalls_total")
    os.kill(pid, signal.SIGSTOP)  # frozen: no progress and no messages, but alive
    try:
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/caption", files={"image": images[0]}, timeout=60,
                       headers={**AUTH, "X-Request-Timeout": "30"})
        waited = time.perf_counter() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert r.status_code == 200, r.text  # issue 21: queued again on the worker that replaced the frozen one
    assert STALL_S - 0.5 <= waited < STALL_S + 20, "killed after the stall timeout, long before the deadline"
    server.wait("/readyz", timeout=60)
    assert server.worker_pids() != [pid]
    assert server.metric("locca_worker_stalls_total") == stalls + 1
    assert server.metric("locca_worker_restarts_total") == restarts + 1
    with LoccaClient(server.url, retries=0, api_key=KEY) as c:
        assert c.caption(images[0], max_new_tokens=6).caption


def test_api_keys_rest(server, images):
    post = lambda headers: httpx.post(server.url + "/v1/caption", files={"image": images[0]}, data={  # noqa: E731
        "max_new_tokens": "6"}, headers=headers, timeout=30)
    for headers, why in (({}, "needs an API key"), ({"Authorization": "Bearer nope"}, "not valid"),
                         ({"Authorization": KEY}, "not valid"), ({"Authorization": f"Basic {KEY}"}, "not valid"),
                         ({"Authorization": f"Bearer {KEY}x"}, "not valid"),
                         ({"Authorization": f"Bearer {KEY[:-1]}"}, "not valid"),
                         ({"Authorization": "Bearer \u00e9\u00e9".encode()}, "not valid")):
        r = post(headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized" and why in r.json()["error"]["message"]
    assert post(AUTH).status_code == 200
    assert post({"Authorization": "bearer another-key-abcdefghijklmnop"}).status_code == 200  # any key, any case
    assert httpx.get(server.url + "/v1/models").status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(server.url + open_path).status_code == 200, open_path
    assert 'locca_requests_total{endpoint="/v1/caption",status="401"}' in server.get("/metrics").text


def test_api_keys_grpc(server, images):
    with LoccaGrpcClient(server.grpc_target, retries=0) as g, pytest.raises(LoccaError) as e:
        g.caption(images[0])
    assert e.value.status == "UNAUTHENTICATED" and "API key" in e.value.message
    with LoccaGrpcClient(server.grpc_target, retries=0, api_key="wrong-key-0123456789") as g, \
            pytest.raises(LoccaError) as e:
        g.caption(images[0])
    assert e.value.status == "UNAUTHENTICATED"
    with LoccaGrpcClient(server.grpc_target, retries=0, api_key=KEY) as g:
        assert g.caption(images[0], max_new_tokens=6).caption
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(server.grpc_target) as ch:  # health stays open to probes
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_sigterm_mid_flood_drains_and_exits_0(server, images):
    """Last: stops the module's server."""
    sent = []

    def term():
        sent.append(time.perf_counter())
        server.proc.send_signal(signal.SIGTERM)

    starts = []
    results = asyncio.run(flood(server.url, images, seconds=3.0, rate=40, during=term, starts=starts))
    before = [s for (s, _, _), t in zip(results, starts, strict=True) if t < sent[0]]
    after = [s for (s, _, _), t in zip(results, starts, strict=True) if t >= sent[0]]
    # sent before SIGTERM: answered (200 / 429, or 503 if read after it); after: answered until the server has
    # the signal, 503 while it drains, then (the server closing its connections and its port) refused at the
    # connection, or, a request racing the close of a kept-alive connection, dropped unread: never an error
    # status, never a hang
    assert set(before) <= {200, 429, 503} and 200 in before, set(before)
    assert set(after) <= {200, 429, 503, "ConnectError", "ReadError", "RemoteProtocolError"}, set(after)
    assert 503 in after or "ConnectError" in after
    assert server.proc.wait(60) == 0
    assert '"drained": true' in server.log()


# --- start-up faults: a missing or corrupt model stops the server at once, saying why ----------------------
def start_failing(tmp_path, name, **settings):
    return launch.start(tmp_path / f"{name}.log", threads=1, **settings)


def test_a_missing_or_corrupt_model_fails_at_start_with_a_clear_message(tmp_path, model_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_path.read_bytes()[:-1000])
    garbage = tmp_path / "garbage" / "checkpoint.safetensors"
    garbage.parent.mkdir()
    garbage.write_bytes(os.urandom(5000))
    header = checkpoint.read_header(model_path)
    state = load_file(str(model_path))
    state.pop(next(iter(state)))  # complete and well formed, but a tensor short: only loading it can tell
    short = tmp_path / "short.safetensors"
    save_file(state, str(short), metadata=header)
    bundle = tmp_path / "onnx"  # an ONNX bundle whose files do not match their manifest
    bundle.mkdir()
    files = {n: "0" * 64 for n in ("encoder.onnx", "decoder.onnx", "tokenizer.json", "config.json")}
    for n in files:
        (bundle / n).write_text("{}")
    (bundle / "manifest.json").write_text(json.dumps({"format": bundle_format.FORMAT, "files": files}))
    cases = {
        "missing": ({"model": tmp_path / "nothing-here", "backend": "torch"}, "no model at"),
        "truncated": ({"model": truncated, "backend": "torch"}, "truncated"),
        "garbage": ({"model": garbage.parent, "backend": "torch"}, "not a usable LocCa checkpoint"),
        "short": ({"model": short, "backend": "torch"}, "cannot load the model"),
        "onnx": ({"model": bundle, "backend": "onnxruntime"}, "does not match its sha256"),
    }
    servers = {name: start_failing(tmp_path, name, **kw) for name, (kw, _) in cases.items()}
    for name, (_, words) in cases.items():
        s = servers[name]
        try:
            code = s.proc.wait(90)
        finally:
            s.stop()
        log = s.log()
        assert code == 2, (name, code, log)
        assert words in log, (name, log)
        assert log.count('"worker started"') <= 1, (name, "no restart loop")


def test_checkpoints_never_unpickle():
    """Every torch.load in the code passes weights_only=True; checkpoints are safetensors; pickles are read
    only by model/convert.py's DataOnlyUnpickler (which refuses every global), and by service/pool.py from its
    own worker processes, over pipes that only the server and that child hold (what multiprocessing's
    Connection.recv did there before; no request's bytes are ever unpickled)."""
    for path in [*ROOT.glob("model/*.py"), *ROOT.glob("export/*.py"), *ROOT.glob("service/*.py"),
                 *ROOT.glob("locca/*.py")]:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "allow_pickle=True" not in text, path
        if path.name == "pool.py":
            assert re.findall(r"\bpickle\.(?:load|loads|Unpickler)\b", text) == ["pickle.loads"], path  # _Frames
        elif path.name != "convert.py":
            assert not re.search(r"\bpickle\.(load|loads|Unpickler)\b", text), path
    assert Settings().api_key_list() == []  # and API keys are off by default


def test_answers_say_connection_close_while_draining():
    """RequestContext: once the engine drains, clients are told not to reuse the connection."""
    from types import SimpleNamespace

    from service.rest import RequestContext

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def answer(draining: bool) -> dict:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "GET", "path": "/readyz", "headers": []}
        await RequestContext(app, engine=SimpleNamespace(draining=draining))(scope, receive, send)
        return dict(sent[0]["headers"])

    assert asyncio.run(answer(True)).get(b"connection") == b"close"
    assert b"connection" not in asyncio.run(answer(False))


def test_locca_predict_url_sends_its_api_key(model_path, images, tmp_path, capsys, monkeypatch):
    from locca.cli import main

    monkeypatch.delenv("LOCCA_API_KEY", raising=False)
    path = tmp_path / "scene.png"
    path.write_bytes(images[0])
    with launch.launch(tmp_path / "serve.log", model=model_path, backend="torch", threads=1, api_keys=KEY) as keyed:
        assert main(["predict", str(path), "--url", keyed.url]) == 2
        assert "unauthorized" in capsys.readouterr().err.lower()
        assert main(["predict", str(path), "--url", keyed.url, "--api-key", KEY, "--max-new-tokens", "4"]) == 0
        assert json.loads(capsys.readouterr().out)["caption"]

"""Operations against a real server with a deliberately small capacity (one region search decodes at a time,
8 requests held at most): 429 / RESOURCE_EXHAUSTED with Retry-After, client retries, a disconnecting client,
a request deadline and a gRPC deadline each stop their queued work, and SIGTERM drains in-flight requests."""

import io
import threading
import time

import httpx
import pytest
from PIL import Image

from client import LoccaClient, LoccaError, LoccaGrpcClient
from locca.cli import COMMANDS
from model import checkpoint
from model.config import BoxConfig
from model.shapes import generate_scene
from service import launch

QUEUE = 8


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, tok):
    path = tmp_path_factory.mktemp("model") / "checkpoint.safetensors"
    checkpoint.save(path, tiny_model, tok, BoxConfig(bins=64))
    s = launch.start(tmp_path_factory.mktemp("log") / "serve.log", model=path, backend="torch", threads=1,
                     max_queue=QUEUE, max_rows=33, max_batch_size=1, retry_after_s=1, drain_timeout_s=60,
                     encoder_cache_mb=1)
    try:
        s.wait("/readyz")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def image():
    return png(generate_scene(11).image)


def propose(server, image, timeout=60.0, **kw):
    return httpx.post(server.url + "/v1/ground", files={"image": image}, timeout=timeout, **kw)


class Background:
    """`n` region proposals in threads: each takes all 8 rows, so they decode one after another."""

    def __init__(self, server, image, n):
        self.results = []
        self.threads = [threading.Thread(target=lambda: self.results.append(propose(server, image)))
                        for _ in range(n)]
        for t in self.threads:
            t.start()
        end = time.monotonic() + 30
        while server.metric("locca_requests_in_flight") < n and time.monotonic() < end:
            time.sleep(0.002)

    def join(self) -> list[int]:
        for t in self.threads:
            t.join(120)
        return [r.status_code for r in self.results]


def aborted(server) -> float:
    return sum(server.metric("locca_requests_aborted_total", f'reason="{r}"') for r in ("cancelled", "deadline"))


def wait_for_abort(server, before: float) -> float:
    end = time.monotonic() + 10
    while (now := aborted(server)) <= before and time.monotonic() < end:
        time.sleep(0.05)  # worker stats arrive every 0.25 s
    return now


def test_serve_is_a_locca_command():
    assert COMMANDS["serve"][0] == "service.cli"


def test_the_encoded_image_cache_stays_within_its_bytes_under_a_flood_of_images(server):
    """1 MiB holds 3 images of the tiny model (288 KiB each): 12 distinct images evict 9 or more, the bytes
    never exceed the bound, and an image sent again within the last 3 is a hit."""
    def lookups():
        return {r: server.metric("locca_encoder_cache_lookups_total", f'result="{r}"') for r in ("hit", "miss")}

    before, evicted = lookups(), server.metric("locca_encoder_cache_evictions_total")
    images = [png(generate_scene(5000 + i).image) for i in range(12)]
    with LoccaClient(server.url, retries=0) as c:
        for data in images:
            c.caption(data, max_new_tokens=2)
            assert server.metric("locca_encoder_cache_bytes") <= 1 << 20
        c.caption(images[-1], max_new_tokens=2)
    end = time.monotonic() + 5
    while lookups()["hit"] == before["hit"] and time.monotonic() < end:
        time.sleep(0.1)  # worker stats arrive every 0.25 s
    after = lookups()
    assert after["miss"] - before["miss"] == 12 and after["hit"] - before["hit"] == 1
    assert server.metric("locca_encoder_cache_evictions_total") - evicted >= 9
    assert 0 < server.metric("locca_encoder_cache_bytes") <= 1 << 20
    assert server.metric("locca_encoder_cache_entries") <= 3


def test_a_call_with_more_questions_than_the_queue_holds_runs_alone(server, image):
    """10 expressions against a queue of 8: admitted into an empty queue (else it could never run), 429 beside
    other requests."""
    expressions = [f"the shape number {i}" for i in range(10)]
    with LoccaClient(server.url, retries=0) as c:
        assert len(c.refer(image, expressions)) == 10
        busy = Background(server, image, 2)
        with pytest.raises(LoccaError) as e:
            c.refer(image, expressions)
        assert e.value.status == 429
        assert busy.join() == [200, 200]


def test_queue_full_is_429_with_retry_after_and_clients_retry(server, image):
    bg = Background(server, image, QUEUE)
    r = propose(server, image)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    with LoccaGrpcClient(server.grpc_target, retries=0) as g, pytest.raises(LoccaError) as e:
        g.ground(image)
    assert e.value.status == "RESOURCE_EXHAUSTED" and e.value.retry_after == 1
    # a client that retries, honouring Retry-After, gets through once the queue drains
    with LoccaClient(server.url, retries=30) as c:
        assert c.caption(image, max_new_tokens=4).caption
    assert bg.join() == [200] * QUEUE


def test_a_disconnected_client_stops_its_work(server, image):
    bg = Background(server, image, QUEUE - 1)  # the probe waits behind 7 proposals of >= 32 decode steps
    before = aborted(server)
    with pytest.raises(httpx.TimeoutException):
        propose(server, image, timeout=0.1)  # gives up and closes the connection while queued
    assert wait_for_abort(server, before) == before + 1
    assert bg.join() == [200] * (QUEUE - 1)


def test_a_request_deadline_stops_work(server, image):
    bg = Background(server, image, QUEUE - 1)
    before = aborted(server)
    r = propose(server, image, headers={"X-Request-Timeout": "0.1"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert wait_for_abort(server, before) == before + 1
    assert bg.join() == [200] * (QUEUE - 1)


def test_a_grpc_deadline_stops_work(server, image):
    bg = Background(server, image, QUEUE - 1)
    before = aborted(server)
    with LoccaGrpcClient(server.grpc_target, retries=0) as g, pytest.raises(LoccaError) as e:
        g.ground(image, timeout=0.1)
    assert e.value.status == "DEADLINE_EXCEEDED"
    assert wait_for_abort(server, before) == before + 1
    assert bg.join() == [200] * (QUEUE - 1)


def test_sigterm_drains_in_flight_requests_and_exits_0(server, image):
    bg = Background(server, image, 5)
    server.proc.send_signal(15)
    time.sleep(0.3)
    r = httpx.get(server.url + "/readyz", timeout=5)
    assert r.status_code == 503
    r = httpx.post(server.url + "/v1/caption", files={"image": image}, timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert bg.join() == [200] * 5, "every request in flight at SIGTERM completes"
    assert server.proc.wait(60) == 0
    assert '"drained": true' in server.log()


def test_worker_pipe_frames_are_multiprocessing_connections_own():
    """service/pool.py writes and reads a worker's pipes on the event loop in Connection's framing: the worker's
    plain Connection.recv reads what `_frame` writes, and `_Frames` reads what Connection.send writes, however
    the bytes arrive (one at a time, or several messages at once)."""
    import multiprocessing as mp
    import os

    import numpy as np

    from model.requests import Request, Result
    from service.pool import _frame, _Frames

    rgb = np.arange(128 * 128 * 3, dtype=np.uint8).reshape(128, 128, 3)  # a real add's size: over a pipe's chunk
    add = ("add", [1, 2], [Request("caption"), Request("refer", expression="the red circle")], rgb, (275, 381),
           b"k" * 16, 29.5)
    reader, writer = mp.Pipe(duplex=False)
    threading.Thread(target=lambda: os.write(writer.fileno(), _frame(add) + _frame(("stop",))), daemon=True).start()
    got = reader.recv()
    assert got[:3] == add[:3] and (got[3] == rgb).all() and got[4:] == add[4:] and reader.recv() == ("stop",)

    finished = ("finished", [(1, Result("caption", text="a red circle", score=-0.5), {"arrival": 1.0}, None)])
    sent = [("ready", {"pid": 7}), finished, ("stats", {"waiting": 0})]
    reader, writer = mp.Pipe(duplex=False)
    for msg in sent:
        writer.send(msg)
    writer.close()
    stream = b""
    while chunk := os.read(reader.fileno(), 1 << 16):
        stream += chunk
    for size in (1, 7, len(stream)):
        delivered = []
        frames = _Frames(delivered.append)
        for i in range(0, len(stream), size):
            frames.data_received(stream[i:i + size])
        assert delivered == sent and not frames.buffer, size

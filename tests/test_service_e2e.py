"""End to end: a real `locca serve` subprocess on free local ports (torch backend, a tiny random-weight model),
real httpx and gRPC clients, real inference. The contract of shared/specs/api.md, endpoint by endpoint and
error by error, over REST and gRPC; 64 concurrent requests; image modes and EXIF; a killed worker."""

import asyncio
import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from client import AsyncLoccaClient, LoccaClient, LoccaError, LoccaGrpcClient
from model.regions import iou
from model.shapes import generate_scene
from service import bundle, images, launch, predict, protos
from service.settings import Settings

pb, pb_grpc = protos.load()
LIMITS = {"max_body_bytes": 2_000_000, "max_image_bytes": 1_500_000, "max_image_pixels": 4_000_000}


def png(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(quick_model_path):  # tests/conftest.py
    return quick_model_path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = launch.start(tmp_path_factory.mktemp("log") / "serve.log", model=model_path, backend="torch", threads=1,
                     **LIMITS)
    try:
        s.wait("/healthz")
        # the ports open before the worker has loaded its model: not ready yet
        image = png(generate_scene(0).image)
        early = {"readyz": s.get("/readyz").status_code,
                 "caption": httpx.post(s.url + "/v1/caption", files={"image": image}, timeout=10)}
        with LoccaGrpcClient(s.grpc_target, retries=0) as g:
            try:
                g.caption(image)
                early["grpc"] = "OK"
            except LoccaError as e:
                early["grpc"] = e.status
        s.early = early
        s.wait("/readyz")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in range(8)]


@pytest.fixture(scope="module")
def rest(server):
    with LoccaClient(server.url, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def rpc(server):
    with LoccaGrpcClient(server.grpc_target, retries=0) as c:
        yield c


def test_not_ready_before_warm_up_then_ready(server):
    assert server.early["readyz"] == 503
    r = server.early["caption"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"]
    assert server.early["grpc"] == "UNAVAILABLE"
    assert server.get("/healthz").status_code == 200 and server.get("/readyz").status_code == 200


def test_models_docs_metrics(server, model_path):
    m = server.get("/v1/models").json()
    assert (m["name"], m["size"], m["backend"], m["device"], m["step"]) == \
        (model_path.parent.name, "tiny", "torch", "cpu", 7)
    assert m["tasks"] == ["caption", "refer", "ground"]
    for key in ("image_size", "patch_size", "enc_width", "dec_width", "enc_depth", "dec_depth", "enc_heads",
                "dec_heads", "vocab_size"):
        assert isinstance(m["config"][key], int)
    assert "swagger" in server.get("/docs").text.lower()
    spec = server.get("/openapi.json").json()
    for path in ("/v1/caption", "/v1/refer", "/v1/ground"):
        assert set(spec["paths"][path]["post"]["requestBody"]["content"]) == {"application/json",
                                                                               "multipart/form-data"}
    text = server.get("/metrics").text
    for name in ("locca_requests_total", "locca_request_duration_seconds", "locca_queue_depth",
                 "locca_queue_wait_seconds", "locca_batch_size", "locca_decode_steps_total",
                 "locca_generated_tokens_total", "locca_worker_restarts_total"):
        assert f"# TYPE {name}" in text


def test_every_task_agrees_across_multipart_json_and_grpc(server, rest, rpc, scenes, model_path):
    s = scenes[1]
    w, h = s.image.size
    data = png(s.image)
    with LoccaClient(server.url, retries=0, encoding="json") as js:
        for c in (rest, js, rpc):
            cap = c.caption(data, max_new_tokens=9)
            ref = c.refer(data, s.expressions[0])
            described = c.ground(data, box=[10, 20, 110, 90.5])
            proposed = c.ground(data, max_regions=3)
            grounded = c.caption(data, grounded=True)
            got = (cap, ref, described, proposed, grounded)
            if c is rest:
                first = got
                continue
            assert cap.caption == first[0].caption and cap.score == pytest.approx(first[0].score, abs=1e-4)
            assert grounded.caption == first[4].caption and cap.phrases is None
            assert [(p.text, p.span, p.box is None) for p in grounded.phrases] == \
                [(p.text, p.span, p.box is None) for p in first[4].phrases]
            for p, q in zip(grounded.phrases, first[4].phrases, strict=True):
                assert p.box is None or p.box == pytest.approx(q.box, abs=1e-3)
            assert ref.box == pytest.approx(first[1].box, abs=1e-3)
            assert [r.text for r in described] == [r.text for r in first[2]]
            assert np.allclose([r.box for r in proposed], [r.box for r in first[3]], atol=1e-3)
    cap, ref, described, proposed, grounded = first
    assert cap.caption and cap.score <= 0
    plain = post(server, "/v1/caption", files={"image": data}).json()
    assert set(plain) == {"caption", "score"}, "a plain caption answers as before"
    raw = post(server, "/v1/caption", files={"image": data}, data={"grounded": "true"}).json()
    assert set(raw) == {"caption", "score", "phrases"}
    assert all(set(p) == {"text", "span", "box", "score"} for p in raw["phrases"]), "a null box is still there"
    for p in grounded.phrases:  # each phrase is the caption's own text at its span
        assert grounded.caption[p.span[0]:p.span[1]] == p.text
    x0, y0, x1, y1 = ref.box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and ref.expression == s.expressions[0]
    assert len(described) == 1 and described[0].box == [10, 20, 110, 90.5] and described[0].text
    local = predict.answer(predict.load_predictor(str(model_path)), images.decode(data, predict.LOCAL_LIMITS),
                           "ground", max_regions=3)["regions"]  # the same model in this process
    assert len(proposed) == len(local) and [r.text for r in proposed] == [r["text"] for r in local]
    assert all(0 <= r.box[0] < r.box[2] <= w and 0 <= r.box[1] < r.box[3] <= h for r in proposed)
    every = rest.ground(data)  # the default: every region found, up to 32, best first, no object twice
    assert len(every) <= 32 and [r.score for r in every] == sorted((r.score for r in every), reverse=True)
    assert [r.text for r in every[:3]] == [r.text for r in proposed]
    for i, a in enumerate(every):
        assert not any(a.text == b.text and iou(a.box, b.box) >= 0.5 for b in every[i + 1:])


def metric(server, sample: str) -> float:
    """A sample's value on /metrics (`name{labels}` as exposed), 0 when absent."""
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def cache_lookups(server) -> tuple[float, float]:
    return (metric(server, 'locca_encoder_cache_lookups_total{result="miss"}'),
            metric(server, 'locca_encoder_cache_lookups_total{result="hit"}'))


def settled(read, timeout=5.0):
    """`read()` once it holds still: the same twice in a row, longer apart than workers ship their counts."""
    deadline, last = time.monotonic() + timeout, read()
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still changing after {timeout} s: {last}")


def same_answers(got, want, box_tol=0.0):
    """The same boxes and texts in the same order; scores up to float reassociation across batch shapes (and
    boxes up to `box_tol`: gRPC's are float32)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.box == pytest.approx(w.box, abs=box_tol) and g.score == pytest.approx(w.score, abs=1e-4)
        assert getattr(g, "expression", None) == getattr(w, "expression", None)
        assert getattr(g, "text", None) == getattr(w, "text", None)


def test_many_questions_in_one_call_equal_the_single_calls(server, rest, rpc, scenes):
    """expressions on /v1/refer and boxes on /v1/ground (REST multipart and JSON, gRPC): one answer per
    question, in order, equal to asking each alone; the call's image is encoded once, and then served from the
    encoded-image cache."""
    s = generate_scene(1234)  # an image no other test sends: its first call misses the cache
    data = png(s.image)
    expressions = (s.expressions * 4)[:4]
    boxes = [list(o.box) for o in s.objects[:3]] + [[5, 5, 60, 50]]
    before = settled(lambda: cache_lookups(server))
    many = rest.refer(data, expressions)
    after = settled(lambda: cache_lookups(server))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0), "four questions, one encoder pass"
    assert [r.expression for r in many] == expressions
    same_answers(many, [rest.refer(data, e) for e in expressions])  # asked alone (cache hits now)
    assert settled(lambda: cache_lookups(server))[1] - after[1] == len(expressions)
    described = rest.ground(data, boxes=boxes)
    assert len(described) == 4
    same_answers(described, [rest.ground(data, box=b)[0] for b in boxes])
    with LoccaClient(server.url, retries=0, encoding="json") as js:
        assert js.refer(data, expressions) == many and js.ground(data, boxes=boxes) == described
    same_answers(rpc.refer(data, expressions), many, 1e-3)
    same_answers(rpc.ground(data, boxes=boxes), described, 1e-3)
    png_answer = post(server, "/v1/refer?render=png", files={"image": data},
                      data={"expressions": json.dumps(expressions[:2])})
    assert png_answer.headers["content-type"] == "image/png"
    assert len(json.loads(png_answer.headers["x-locca-result"])["results"]) == 2


@pytest.mark.parametrize("path,body,status,words", [
    ("/v1/refer", {"expressions": []}, 422, "at least 1"),
    ("/v1/refer", {"expressions": ["the circle"] * 65}, 422, "at most 64"),
    ("/v1/refer", {"expressions": ["the circle", "  "]}, 400, "expressions[1]: the expression is empty"),
    ("/v1/refer", {"expressions": ["the circle", "x" * 300]}, 422, "expressions.1"),
    ("/v1/refer", {"expressions": "the circle"}, 422, "expressions"),
    ("/v1/refer", {"expression": "the circle", "expressions": ["the square"]}, 422, "not both"),
    ("/v1/refer", {}, 422, "`expressions`"),
    ("/v1/ground", {"boxes": []}, 422, "at least 1"),
    ("/v1/ground", {"boxes": [[0, 0, 10, 10]] * 65}, 422, "at most 64"),
    ("/v1/ground", {"boxes": [[0, 0, 10, 10], [5000, 5000, 5010, 5010]]}, 400, "boxes[1]: the box"),
    ("/v1/ground", {"boxes": [[0, 0, 10, 10], [30, 30, 20, 40]]}, 400, "boxes[1]: a box needs x0 < x1"),
    ("/v1/ground", {"boxes": [[0, 0, 10]]}, 422, "boxes.0"),
    ("/v1/ground", {"box": [0, 0, 10, 10], "boxes": [[0, 0, 10, 10]]}, 422, "not both"),
])
def test_many_questions_bad_input_names_the_item(server, scenes, path, body, status, words):
    r = post(server, path, json={"image": base64.b64encode(png(scenes[0].image)).decode(), **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_many_questions_bad_input_over_grpc(server, scenes):
    stub = pb_grpc.LocCaStub(grpc.insecure_channel(server.grpc_target))
    data = png(scenes[0].image)
    for method, request, words in [
            (stub.Refer, pb.ReferRequest(image=data, expressions=["the circle"] * 65), "at most 64"),
            (stub.Refer, pb.ReferRequest(image=data, expressions=["the circle", ""]), "expressions[1]: the expression"),
            (stub.Refer, pb.ReferRequest(image=data, expression="a", expressions=["b"]), "not both"),
            (stub.Ground, pb.GroundRequest(image=data, boxes=[pb.Box(x0=0, y0=0, x1=9, y1=9),
                                                             pb.Box(x0=900, y0=900, x1=990, y1=990)]), "boxes[1]"),
            (stub.Ground, pb.GroundRequest(image=data, box=pb.Box(x0=0, y0=0, x1=9, y1=9),
                                           boxes=[pb.Box(x0=0, y0=0, x1=9, y1=9)]), "not both")]:
        with pytest.raises(grpc.RpcError) as e:
            method(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), e.value.details()


def nice_values(pid: int) -> list[int]:
    """The nice value of each thread of a process (/proc/PID/task/TID/stat, field 19)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        out.append(int(stat[stat.rindex(")") + 2:].split()[16]))
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux: per-thread nice values")
def test_the_front_runs_below_its_workers_priority(server):
    """service/priority.py: every thread of the server process but one (the one that starts workers) runs 5
    nicer than the workers, whose threads keep the priority the server was started with."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the test's, which the server inherited
    front = nice_values(server.proc.pid)
    assert front.count(base) == 1 and front.count(min(19, base + 5)) == len(front) - 1 >= 5, front
    for pid in server.worker_pids():
        assert set(nice_values(pid)) == {base}


def test_the_server_runs_on_uvloop_with_httptools(server):
    """service/app.py --loop auto: uvloop where it is installed (a pinned dependency), uvicorn's C parser."""
    log = server.log_path.read_text(errors="replace")  # the whole log: its start has scrolled out of log()
    serving = [json.loads(line) for line in log.splitlines() if '"serving"' in line]
    assert serving and serving[0]["loop"] == "uvloop", log[:3000]
    assert serving[0]["image_threads"] == bundle.image_threads(Settings(), ["cpu"], 1)  # auto, beside 1 thread
    import uvicorn.protocols.http.httptools_impl  # noqa: F401,PLC0415 (importable: uvicorn's "auto" takes it)


def test_request_ids(server, scenes):
    r = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(server.url + "/healthz").headers["x-request-id"]) == 32
    with grpc.insecure_channel(server.grpc_target) as ch:
        _, call = pb_grpc.LocCaStub(ch).Caption.with_call(pb.CaptionRequest(image=png(scenes[0].image)),
                                                          metadata=(("x-request-id", "rpc-9"),), timeout=30)
        assert dict(call.initial_metadata())["x-request-id"] == "rpc-9"


def post(server, path, headers=None, **kw):
    return httpx.post(server.url + path, headers=headers, timeout=30, **kw)


def error(r, status, code=None):
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code
    return r.json()["error"]["message"]


def test_rest_errors(server, scenes):
    s = scenes[2]
    data, b64 = png(s.image), base64.b64encode(png(s.image)).decode()
    raw = lambda body: post(server, "/v1/ground", content=body, headers={"Content-Type": "application/json"})  # noqa: E731
    error(post(server, "/v1/caption", files={"image": b"not an image"}), 400, "bad_image")
    error(post(server, "/v1/caption", json={"image": "%%%"}), 400, "bad_image")
    error(post(server, "/v1/caption", files={"image": data[: len(data) // 2]}), 400, "bad_image")  # truncated
    error(raw('{"image": "' + b64 + '", "box": [NaN, 1, 5, 5]}'), 400, "bad_box")
    error(post(server, "/v1/ground", json={"image": b64, "box": [50, 5, 10, 40]}), 400, "bad_box")
    error(post(server, "/v1/ground", files={"image": data}, data={"box": "5000,5000,6000,6000"}), 400, "bad_box")
    error(post(server, "/v1/refer", json={"image": b64, "expression": "  "}), 400, "bad_expression")
    error(post(server, "/v1/refer", files={"image": data}, data={"expression": ""}), 400, "bad_expression")
    error(post(server, "/v1/caption", json={"image": b64, "max_new_tokens": 1}), 400, "bad_request")
    error(post(server, "/v1/caption", content=b"x" * 2_100_000, headers={"Content-Type": "application/json"}),
          413, "too_large")
    error(post(server, "/v1/caption", files={"image": np.random.default_rng(0).bytes(1_600_000)}), 413, "too_large")
    error(post(server, "/v1/caption", files={"image": png(Image.new("L", (2100, 2000)))}), 413, "too_large")
    error(post(server, "/v1/caption", content=data, headers={"Content-Type": "image/png"}), 415,
          "unsupported_media_type")
    error(post(server, "/v1/caption", content=data), 415)
    for bad in ({}, {"image": b64, "max_new_tokens": "many"}, {"image": b64, "max_regions": 0},
                {"image": b64, "box": [1, 2, 3]}, {"image": b64, "max_regions": 1000}, [b64]):
        error(post(server, "/v1/ground" if "box" in bad or "max_regions" in bad else "/v1/caption", json=bad), 422,
              "invalid_request")
    error(post(server, "/v1/refer", json={"image": b64}), 422, "invalid_request")
    # grounded belongs to /v1/caption; max_regions is 1..32
    assert "/v1/caption" in error(post(server, "/v1/refer", json={"image": b64, "expression": "the circle",
                                                                  "grounded": True}), 422, "invalid_request")
    error(post(server, "/v1/ground", files={"image": data}, data={"grounded": "true"}), 422, "invalid_request")
    error(post(server, "/v1/caption", json={"image": b64, "grounded": "maybe"}), 422, "invalid_request")
    error(post(server, "/v1/ground", json={"image": b64, "max_regions": 33}), 422, "invalid_request")
    error(post(server, "/v1/refer", json={"image": b64, "expression": "x" * 300}), 422)
    error(post(server, "/v1/ground", files={"image": data}, data={"box": "[1, 2"}), 422)
    error(post(server, "/v1/caption", files={"nope": data}), 422)
    error(post(server, "/v1/caption", content=b"{", headers={"Content-Type": "application/json"}), 422)
    error(post(server, "/v1/caption", json={"image": b64}, headers={"X-Request-Timeout": "soon"}), 422)
    error(post(server, "/v1/caption", json={"image": b64}, headers={"X-Request-Timeout": "0.000001"}), 504,
          "deadline_exceeded")
    error(httpx.get(server.url + "/v1/nothing"), 404, "not_found")
    # a box partly outside the image is clipped to it (the documented rule); form boxes as JSON or x0,y0,x1,y1
    w, h = s.image.size
    for box in (json.dumps([-10, 5, w + 50, 40]), f"-10,5,{w + 50},40"):
        r = post(server, "/v1/ground", files={"image": data}, data={"box": box})
        assert r.status_code == 200 and r.json()["regions"][0]["box"] == [0, 5, w, 40]


def test_grpc_errors_health_and_reflection(server, rpc, scenes):
    data = png(scenes[3].image)
    for call, code in ((lambda: rpc.caption(b"junk"), "INVALID_ARGUMENT"),
                       (lambda: rpc.refer(data, ""), "INVALID_ARGUMENT"),
                       (lambda: rpc.ground(data, box=[9, 9, 1, 1]), "INVALID_ARGUMENT"),
                       (lambda: rpc.ground(data, max_regions=-1), "INVALID_ARGUMENT"),
                       (lambda: rpc.ground(data, max_regions=33), "INVALID_ARGUMENT"),
                       (lambda: rpc.caption(data, max_new_tokens=1), "INVALID_ARGUMENT"),
                       (lambda: rpc.ground(data, timeout=0.001), "DEADLINE_EXCEEDED")):
        with pytest.raises(LoccaError) as e:
            call()
        assert e.value.status == code
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "locca.v1.LocCa"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in next(stream).list_services_response.service}
    assert {"locca.v1.LocCa", "grpc.health.v1.Health"} <= names


def test_image_modes_and_exif(rest, scenes):
    s = scenes[4]
    rgb = s.image
    w, h = rgb.size
    assert w != h
    base = rest.caption(png(rgb), max_new_tokens=6)
    gray = rgb.convert("L")
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    i16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert i16.mode == "I;16"
    same_as = [(png(rgb.convert("RGBA")), rgb), (png(rgb, "BMP"), rgb), (png(rgb, "TIFF"), rgb),
               (png(rgb, "WEBP", lossless=True), rgb), (png(pal), pal.convert("RGB")), (png(i16), gray),
               (png(gray.convert("LA")), gray), (png(pal, "GIF"), pal.convert("RGB"))]
    for data, reference in same_as:
        assert rest.caption(data, max_new_tokens=6).caption == rest.caption(png(reference), max_new_tokens=6).caption
    assert rest.caption(png(rgb), max_new_tokens=6) == base
    for data in (png(rgb.convert("CMYK"), "JPEG"), png(rgb.convert("CMYK"), "TIFF"), png(rgb, "JPEG")):
        assert rest.caption(data, max_new_tokens=6).caption
    # EXIF orientation 6: stored rotated, displayed upright; boxes are in the displayed image's pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = png(rgb.rotate(90, expand=True), exif=exif.tobytes())
    box = [w - 60.0, 2.0, w - 1.0, h - 3.0]  # only inside the image as displayed (w > h or not)
    assert rest.caption(stored, max_new_tokens=6) == rest.caption(png(rgb), max_new_tokens=6)
    assert rest.ground(stored, box=box) == rest.ground(png(rgb), box=box)
    regions = rest.ground(stored)
    assert regions == rest.ground(png(rgb))
    assert all(r.box[2] <= w and r.box[3] <= h for r in regions)


def mixed_requests(scenes):
    out = []
    for i in range(64):
        s, kind = scenes[i % len(scenes)], i % 4
        if kind == 0:
            out.append(("caption", s.image, {"max_new_tokens": 3 + i % 13}))
        elif kind == 1:
            out.append(("refer", s.image, {"expression": s.expressions[i % len(s.expressions)]}))
        elif kind == 2:
            out.append(("ground", s.image, {"box": [float(v) for v in s.objects[0].box]}))
        else:
            out.append(("ground", s.image, {"max_regions": 1 + i % 5}))
    return [(k, png(im), kw) for k, im, kw in out]


def same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    fields = [f for f in vars(a) if f != "score"]
    return all(getattr(a, f) == getattr(b, f) for f in fields) and abs(a.score - b.score) < 1e-4


def test_64_concurrent_requests_equal_one_by_one(server, rest, scenes):
    requests = mixed_requests(scenes)
    alone = [getattr(rest, kind)(data, **kw) for kind, data, kw in requests]

    async def together():
        async with AsyncLoccaClient(server.url, retries=0) as c:
            return await asyncio.gather(*(getattr(c, kind)(data, **kw) for kind, data, kw in requests))

    batched_before = server.metric("locca_batch_size_count", 'kind="decode"') - \
        server.metric("locca_batch_size_bucket", 'kind="decode",le="1.0"')
    concurrent = asyncio.run(together())
    for (kind, _, kw), a, b in zip(requests, alone, concurrent, strict=True):
        assert same(a, b), (kind, kw, a, b)
    time.sleep(0.6)  # worker stats arrive every 0.25 s
    batched = server.metric("locca_batch_size_count", 'kind="decode"') - \
        server.metric("locca_batch_size_bucket", 'kind="decode",le="1.0"')
    assert batched > batched_before, "decode steps ran more than one row at once"


def test_a_killed_worker_is_replaced_and_its_requests_answered(server, scenes):
    """Issue 21: the requests a killed worker held are queued again on its replacement, and answered."""
    data = png(scenes[5].image)
    results = []
    retried = server.metric("locca_requests_retried_total")

    def call():
        results.append(post(server, "/v1/ground", files={"image": data}))

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    end = time.monotonic() + 30
    while server.metric("locca_requests_in_flight") < 4 and time.monotonic() < end:
        time.sleep(0.005)
    (pid,) = server.worker_pids()
    import os
    import signal
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    statuses = [r.status_code for r in results]
    assert statuses == [200] * 24, statuses
    assert server.metric("locca_requests_retried_total") - retried >= 4, "those in flight ran again"
    server.wait("/readyz", timeout=60)
    assert server.worker_pids() != [pid]
    assert post(server, "/v1/ground", files={"image": data}).status_code == 200
    assert server.metric("locca_worker_restarts_total") == 1

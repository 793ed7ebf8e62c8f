"""OpenTelemetry (issue 20): the caller's W3C traceparent in and out on REST and gRPC, a request's phases as spans
under its server span, the worker's included, exported over OTLP/HTTP to a real receiver; off by default."""

import http.server
import io
import threading
import time

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from model.shapes import generate_scene
from service import launch, protos

pb, pb_grpc = protos.load()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
PHASES = {"admission", "image decode", "queue wait", "prefill", "decode", "response"}


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on 127.0.0.1: the spans every export brought, by trace id."""

    def __init__(self):
        self.spans, self.lock = [], threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.spans += [s for r in export.resource_spans for ss in r.scope_spans for s in ss.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def trace(self, trace_id: str, names: set[str], timeout: float = 20.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = {s.name: s for s in self.spans if s.trace_id.hex() == trace_id}
            if names <= set(got):
                return got
            time.sleep(0.05)
        raise AssertionError(f"spans of trace {trace_id}: {sorted(got)}, expected {sorted(names)}")



@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def traced(receiver, quick_model_path, tmp_path_factory):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
           "OTEL_BSP_SCHEDULE_DELAY": "50"}  # the standard variables; spans leave within 50 ms
    with launch.launch(tmp_path_factory.mktemp("log") / "serve.log", env=env, model=quick_model_path,
                       backend="torch", threads=1) as server:
        yield server


@pytest.fixture(scope="module")
def png():
    buf = io.BytesIO()
    generate_scene(3).image.save(buf, "PNG")
    return buf.getvalue()


def check_nesting(spans: dict, server_name: str):
    server = spans[server_name]
    assert server.parent_span_id.hex() == PARENT, "the server span is a child of the caller's"
    by_id = {s.span_id: s for s in spans.values()}

    def ancestors(span):
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            yield span.span_id
    for name in PHASES:
        span = spans[name]
        assert server.span_id in set(ancestors(span)), f"{name} is within the request's span"
        assert server.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= server.end_time_unix_nano + 5_000_000, name  # clocks: within 5 ms
    queue, prefill, decode = spans["queue wait"], spans["prefill"], spans["decode"]
    assert queue.end_time_unix_nano <= prefill.start_time_unix_nano + 1 and prefill.end_time_unix_nano <= \
        decode.start_time_unix_nano + 1, "the worker's phases in order"


def test_a_rest_request_is_one_trace_under_the_callers(traced, receiver, png):
    trace_id = TRACE[:-4] + "0001"
    r = httpx.post(f"{traced.url}/v1/caption", files={"image": ("s.png", png, "image/png")},
                   headers={"traceparent": f"00-{trace_id}-{PARENT}-01"}, timeout=60)
    assert r.status_code == 200
    version, tid, span_id, flags = r.headers["traceparent"].split("-")
    assert tid == trace_id and span_id != PARENT, "the server's span, in the caller's trace"
    spans = receiver.trace(trace_id, PHASES | {"POST /v1/caption"})
    check_nesting(spans, "POST /v1/caption")
    assert spans["POST /v1/caption"].span_id.hex() == span_id


def test_a_grpc_request_is_one_trace_under_the_callers(traced, receiver, png):
    trace_id = TRACE[:-4] + "0002"
    with grpc.insecure_channel(traced.grpc_target) as ch:
        _, call = pb_grpc.LocCaStub(ch).Refer.with_call(
            pb.ReferRequest(image=png, expression="the red circle"), timeout=60,
            metadata=(("traceparent", f"00-{trace_id}-{PARENT}-01"),))
        returned = dict(call.initial_metadata())["traceparent"]
    assert returned.split("-")[1] == trace_id
    check_nesting(receiver.trace(trace_id, PHASES | {"locca.v1.LocCa/Refer"}), "locca.v1.LocCa/Refer")


def test_without_otel_variables_nothing_is_recorded_and_the_traceparent_comes_back(bundled_server, png):
    sent = f"00-{TRACE}-{PARENT}-01"
    r = httpx.post(f"{bundled_server.url}/v1/refer", files={"image": ("s.png", png, "image/png")},
                   data={"expression": "the red circle"}, headers={"traceparent": sent}, timeout=60)
    assert r.status_code == 200 and r.headers["traceparent"] == sent
    assert "traceparent" not in httpx.get(f"{bundled_server.url}/healthz").headers  # none sent, none made up

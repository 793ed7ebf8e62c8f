"""Locust load test of LocCa Serve: REST users and gRPC users asking about shapes-world scenes.

    make loadtest                                    # headless against LOCCA_URL; CSV, HTML and a plot in loadtests/results/
    locust -f loadtests/locustfile.py -H http://127.0.0.1:8000            # the web UI, http://127.0.0.1:8089
    locust -f loadtests/locustfile.py --headless -H URL -u 32 -t 60s RestUser   # REST only

Users are closed loops (no think time unless LOCCA_LOADTEST_WAIT seconds), so the user count is the
number of requests in flight. Each draws a call from loadtests/workload.py (caption / refer / describe a
box / ground: every object, on 64 rendered scenes with their own referring expressions and boxes) and fails it
on any non-200 answer or one that breaks the contract's shapes. 3 in 4 REST requests are multipart, 1 in 4
JSON with a base64 image. The gRPC user calls through client/sdk.py with retries off, so a
RESOURCE_EXHAUSTED counts as the failure it is.

Load shape (LOCCA_LOADTEST_SHAPE): "steps" (default) doubles the users, 1, 2, 4, ... up to -u, across the first
half of -t and holds -u for the second half, so one run gives throughput and latency against users
(loadtests/plot.py); "constant" is Locust's own ramp to -u at -r per second.
Every request is also written to LOCCA_LOADTEST_OUT/requests.csv (default loadtests/results) for the plot.

Settings: LOCCA_GRPC_TARGET (default: the -H host, port 50051), LOCCA_LOADTEST_SCENES (64),
LOCCA_LOADTEST_SEED (0), LOCCA_LOADTEST_JSON_SHARE (0.25), LOCCA_LOADTEST_TIMEOUT (60 s per request).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, LoadTestShape, User, between, events, task
from urllib3 import encode_multipart_formdata

grpc_gevent.init_gevent()  # before any channel: gRPC's blocking calls then yield to the other users

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # workload.py; the repository's packages

import workload  # noqa: E402

from client import LoccaError, LoccaGrpcClient  # noqa: E402

SCENES = workload.scenes(int(os.environ.get("LOCCA_LOADTEST_SCENES", "64")),
                         int(os.environ.get("LOCCA_LOADTEST_SEED", "0")))
JSON_SHARE = float(os.environ.get("LOCCA_LOADTEST_JSON_SHARE", "0.25"))
TIMEOUT = float(os.environ.get("LOCCA_LOADTEST_TIMEOUT", "60"))
WAIT = float(os.environ.get("LOCCA_LOADTEST_WAIT", "0"))
OUT = Path(os.environ.get("LOCCA_LOADTEST_OUT", HERE / "results"))
API_KEY = os.environ.get("LOCCA_API_KEY") or None  # for a server with LOCCA_API_KEYS: sent as a bearer token


class RestUser(FastHttpUser):
    weight = 3
    wait_time = between(0, WAIT)
    connection_timeout = network_timeout = TIMEOUT

    def on_start(self):
        self.rng = random.Random()

    @task
    def call(self):
        c = workload.draw(self.rng, SCENES)
        if self.rng.random() < JSON_SHARE:
            body = json.dumps({"image": base64.b64encode(c.scene.png).decode(), **c.fields})
            ctype = "application/json"
        else:
            form = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in c.fields.items()}
            body, ctype = encode_multipart_formdata({"image": ("scene.png", c.scene.png, "image/png"), **form})
        headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {API_KEY}"} if API_KEY else {})}
        with self.client.post(c.path, data=body, headers=headers, name=c.name,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
            elif problem := workload.check(c, r.json()):
                r.failure(problem)


class GrpcUser(User):
    weight = 1
    wait_time = between(0, WAIT)

    def on_start(self):
        self.rng = random.Random()
        self.target = os.environ.get("LOCCA_GRPC_TARGET") or f"{urlparse(self.host).hostname}:50051"
        self.client = LoccaGrpcClient(self.target, timeout=TIMEOUT, retries=0, api_key=API_KEY)

    def on_stop(self):
        self.client.close()

    @task
    def call(self):
        c = workload.draw(self.rng, SCENES)
        start, t0, error, body = time.time(), time.perf_counter(), None, {}
        try:
            if c.kind == "caption":
                r = self.client.caption(c.scene.png)
                body = {"caption": r.caption, "score": r.score}
            elif c.kind == "refer":
                r = self.client.refer(c.scene.png, c.fields["expression"])
                body = {"box": r.box, "score": r.score}
            else:
                regions = self.client.ground(c.scene.png, c.fields.get("box"), c.fields.get("max_regions"))
                body = {"regions": [vars(g) for g in regions]}
            if problem := workload.check(c, body):
                error = AssertionError(problem)
        except LoccaError as e:
            error = e
        self.environment.events.request.fire(
            request_type="grpc", name=c.grpc_name, start_time=start,
            response_time=(time.perf_counter() - t0) * 1000, response_length=len(str(body)),
            exception=error, context={}, url=self.target)


if os.environ.get("LOCCA_LOADTEST_SHAPE", "steps") == "steps":
    class Steps(LoadTestShape):
        """1, 2, 4, ... users across the first half of --run-time, then --users for the second half."""

        use_common_options = True

        def tick(self):
            opts = self.runner.environment.parsed_options
            users = workload.users_at(self.get_run_time(), opts.num_users or 1, opts.run_time or 60)
            return None if users is None else (users, 100)  # within a second: each step is one concurrency


# ---- every request, with the user count it ran at, for loadtests/plot.py ------------------------------------
_samples: list[tuple] = []


@events.request.add_listener
def _record(request_type, name, response_time, exception, start_time=None, context=None, **kw):
    runner = getattr(_record, "runner", None)
    users = runner.user_count if runner else 0
    _samples.append((round(time.time(), 3), users, request_type, name, round(response_time, 2), int(exception is not None)))


@events.init.add_listener
def _init(environment, **kw):
    _record.runner = environment.runner


@events.test_stop.add_listener
def _write(environment, **kw):
    if not _samples:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "users", "type", "name", "response_time_ms", "failed"])
        w.writerows(_samples)

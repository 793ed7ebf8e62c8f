"""`locca bench` on a tiny random model, in seconds: every section's code path, the table, the JSON and the plot,
and the analytic FLOPs against torch's own counter. No timing is asserted: so short a run measures nothing."""

import json
import math
import os
import threading
import time

import numpy as np
import pytest
import torch
import uvicorn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import report, serving
from benchmarks.bench_server import requests_for
from benchmarks.cli import MODES, bench
from benchmarks.flops import encode_flops, token_flops
from benchmarks.naive_server import build_app
from benchmarks.peers import engine_generate, hf_generate, hf_model
from model import checkpoint
from model.inference import TorchInference
from service.launch import free_port


@pytest.fixture(scope="module")
def model_path(quick_model_path):  # tests/conftest.py
    return quick_model_path


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.fixture(scope="module")
def naive_rows(model_path):
    """The closed-loop client against the naive server's app (in a thread here), at 1 and 3 clients."""
    cfg = checkpoint.load(model_path).model.cfg
    server = uvicorn.Server(uvicorn.Config(build_app(cfg), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        _, naive = serving.caption_requests([d for _, d, _ in requests_for(2)], [3, 5])
        return serving.sweep(f"http://127.0.0.1:{server.config.port}", naive, (1, 3), 0.3)
    finally:
        server.should_exit = True
        thread.join(10)


def test_closed_loop_against_the_naive_server(naive_rows):
    assert [r["clients"] for r in naive_rows] == [1, 3]
    assert all(r["requests"] > 0 and r["throughput"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in naive_rows)


def test_in_process_sections_table_json_and_plot(model_path, naive_rows, tmp_path):
    res = bench(MODES["smoke"], str(model_path), sections=("engine", "limit", "scaling", "batching"), mode="smoke",
                backends=("torch",))  # the ONNX paths are test_export's; an export would take this test 20 s
    json.loads(json.dumps(res))
    assert res["meta"]["default"] == "ours torch fp32" and res["peak"]["fp32"] > 0
    assert {(r["name"], r["batch"]) for r in res["engine"]} == {
        (n, b) for n in ("ours torch fp32", "ours torch bf16", "hf generate fp32") for b in (1, 2)}
    assert all(finite(r["seconds"]) and r["seconds"] > 0 for r in res["engine"] + res["encoder"])
    assert [r["name"] for r in res["accuracy"]["rows"]] == ["ours torch fp32", "ours torch bf16"]
    assert res["accuracy"]["rows"][0]["same_box"] == 1.0 and res["accuracy"]["questions"] > 0
    assert all(0 < r["mfu"] and finite(r["mfu"]) for r in res["encoder"])
    assert {r["new_tokens"] for r in res["scaling"]["length"]} == {2, 4}
    b = res["batching"]
    assert b["idle"]["refer_n"] > 0 and b["continuous"]["refer_n"] > 0 and b["static"]["refer_n"] > 0
    assert finite(b["continuous_over_idle"]) and finite(b["static_over_idle"])
    # the serving section's report, on the naive server's rows standing in for both servers
    res["serving"] = {"mean_new_tokens": 4.0, "flops_per_request": 1e8, "ours": naive_rows, "naive": naive_rows}
    goals = report.goals(res)
    assert [g["goal"][:2] for g in goals] == ["1.", "1.", "1.", "2.", "3.", "4."]
    # ... and the lines of issues 16 and 21, on the same rows: a goal for /ground, a line for two workers
    p50, rate = naive_rows[0]["p50_ms"], naive_rows[0]["throughput"]
    res["serving"] |= {"ground": {"caption_p50_ms": p50, "ground_p50_ms": 2 * p50, "ratio": 2.0, "requests": 4},
                       "workers": {"clients": 3, "one": naive_rows[-1], "two": naive_rows[-1], "ratio": 1.0}}
    goals = report.goals(res)
    assert [g["goal"][:2] for g in goals] == ["1.", "1.", "1.", "2.", "2.", "3.", "4."] and goals[4]["met"]
    assert "/v1/ground without a box" in report.table(res) and "--workers 2 against 1" in report.table(res)
    assert rate > 0
    assert all(finite(g["value"]) and isinstance(g["met"], bool) for g in goals)
    text = report.table(res)
    for part in ("1. engine vs HF", "2. serving", "3. refer p50", "4. encoder model FLOPs", "5. scaling",
                 "goal (issues 8, 19)"):
        assert part in text
    report.plot(res, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_both_sides_generate_exactly_the_tokens_asked(tiny_model):
    pixels = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    assert engine_generate(TorchInference(tiny_model), pixels, 5).shape == (2, 5)
    assert hf_generate(hf_model(tiny_model.cfg), torch.from_numpy(pixels), 5).shape == (2, 6)  # start token + 5


def test_analytic_flops_match_torchs_counter(tiny_model):
    """encode_flops against FlopCounterMode on encode + cross K/V; token_flops for a step at the last position,
    where attending to every cache slot (what the graph does) is what the formula counts."""
    c, m = tiny_model.cfg, tiny_model
    # the math attention is matmuls the counter sees (it has no formula for the CPU's fused attention kernel)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc:
            ck, cv = m.cross_kv(m.encode(torch.zeros(1, 3, c.image_size, c.image_size)))
        assert fc.get_total_flops() == encode_flops(c)
        k, v = m.empty_cache(1)
        S = c.max_seq_len
        with FlopCounterMode(display=False) as fc:
            m.decode_step(torch.ones(1, 1, dtype=torch.long), torch.full((1, 1), S - 1), k, v, ck, cv)
        assert fc.get_total_flops() == token_flops(c, S - 1)


def test_efficiency_and_rec_sections(model_path, monkeypatch, tmp_path):
    """Sections 6 and 7 against real servers (PyTorch backend: no export), with the load generator this machine
    has (wrk, or the httpx fallback), then the fallback forced; the table's lines, the goals and the plot."""
    res = bench(MODES["smoke"], str(model_path), sections=("efficiency", "rec"), mode="smoke", backends=("torch",))
    json.loads(json.dumps(res))
    e = res["efficiency"]
    assert e["engine"]["throughput"] > 0 and [r["clients"] for r in e["server"]] == [2, 4]
    assert all(r["throughput"] > 0 and r["non_2xx"] == 0 and r["cache_hits"] == 0 for r in e["server"])
    assert all(finite(r["efficiency"]) for r in e["server"])
    shared = e["beside_busy_core"]  # the engine beside a process decoding PNGs: measured in alternating pairs
    assert len(shared["alone"]) == len(shared["beside"]) >= 1 and min(shared["alone"] + shared["beside"]) > 0
    assert finite(shared["ratio"]) and shared["ratio"] > 0
    assert all(r["of_shared"] == pytest.approx(r["efficiency"] / shared["ratio"]) for r in e["server"])
    same = e["same_concurrency"]  # the engine in closed loops of as many clients as each level has connections
    assert [x["clients"] for x in same] == [2, 4]
    assert all(len(x["closed"]) == len(x["all_at_once"]) >= 1 and min(x["closed"] + x["all_at_once"]) > 0
               and min(x["cpu_ms"]) > 0 and finite(x["ratio"]) for x in same)
    assert all(r["of_same_concurrency"] == pytest.approx(r["efficiency"] / x["ratio"])
               and r["closed_cpu_ms"] == pytest.approx(float(np.median(x["cpu_ms"])))
               for r, x in zip(e["server"], same, strict=True))
    # where an answer's CPU went: the server's process and its worker both worked, as did the engine
    assert all(r["front_cpu_ms"] > 0 and r["worker_cpu_ms"] > 0 and r["engine_cpu_ms"] > 0 for r in e["server"])
    assert all(0 < r["worker_cores"] < len(os.sched_getaffinity(0)) + 0.5 for r in e["server"])
    assert all(1 <= r["decode_rows"] <= r["clients"] for r in e["server"])  # the requests inside the worker
    modes = res["rec"]["modes"]
    assert list(modes) == ["4 calls, no cache", "4 calls, cache", "1 call of 4"]
    assert all(m["questions_per_s"] > 0 for m in modes.values()) and modes["4 calls, no cache"]["vs_uncached"] == 1
    goals = [g["goal"][:2] for g in report.goals(res)]
    assert goals == ["6.", "6.", "6.", "7."]
    text = report.table(res)
    assert "6. efficiency" in text and "7. REC client" in text and "CPU ms per answer" in text
    assert "beside a core busy decoding PNGs" in text and "the engine at the server's concurrency" in text
    report.plot(res, tmp_path / "bench.png")
    monkeypatch.setattr("benchmarks.efficiency.shutil.which", lambda name: None)
    fallback = bench(MODES["smoke"], str(model_path), sections=("efficiency",), mode="smoke", backends=("torch",))
    assert fallback["efficiency"]["generator"].startswith("httpx")
    assert all(r["throughput"] > 0 and r["cache_hits"] == 0 for r in fallback["efficiency"]["server"])

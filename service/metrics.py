"""Every Prometheus metric of the server, in one place, named by the Prometheus conventions.

Workers are separate processes: they count in their scheduler and ship the counts with their "stats"
messages (service/worker.py); `record_worker_stats` turns those into the metrics below, served at /metrics
by the one server process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter("locca_requests_total", "Requests answered, by endpoint and status",
                   ["endpoint", "status"])
REQUEST_DURATION = Histogram("locca_request_duration_seconds", "Time to answer a request, by endpoint and status",
                             ["endpoint", "status"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("locca_requests_in_flight", "Requests admitted and not yet answered (a call that asks several "
                  "questions of its image counts each)")
QUEUE_DEPTH = Gauge("locca_queue_depth", "Requests waiting in the workers' schedulers for their prefill")
QUEUE_WAIT = Histogram("locca_queue_wait_seconds", "Time from arrival at a worker to the request's prefill",
                       buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("locca_batch_size", "Batch sizes: images per prefill, KV-cache rows per decode step",
                       ["kind"], buckets=BATCH_BUCKETS)
DECODE_STEPS = Counter("locca_decode_steps_total", "Decode steps run (one token for every running row)")
TOKENS = Counter("locca_generated_tokens_total", "Tokens generated, counting every beam")
ABORTED = Counter("locca_requests_aborted_total", "Requests whose work a worker stopped, by reason",
                  ["reason"])
WORKER_RESTARTS = Counter("locca_worker_restarts_total", "Model worker processes that died and were restarted")
WORKER_BACKOFFS = Counter("locca_worker_backoffs_total", "Worker restarts held back because the slot keeps dying "
                          "(a crash loop: more than one death in a minute)")
WORKER_BACKOFF_SECONDS = Gauge("locca_worker_backoff_seconds", "The last restart delay of a worker slot",
                               ["slot"])
REQUESTS_RETRIED = Counter("locca_requests_retried_total", "Requests queued again after the worker holding them "
                           "died (each at most once)")
WORKER_STALLS = Counter("locca_worker_stalls_total", "Model workers killed (then restarted) for holding requests "
                        "without a sign of progress for worker_stall_timeout_s")
WORKERS_READY = Gauge("locca_workers_ready", "Model workers loaded, warmed up and serving")
ENCODER_CACHE_LOOKUPS = Counter("locca_encoder_cache_lookups_total", "Images a prefill looked up in the "
                                "encoded-image cache, by result (hit: the encoder skipped)", ["result"])
ENCODER_CACHE_EVICTIONS = Counter("locca_encoder_cache_evictions_total", "Encoded images dropped from the cache "
                                  "to keep it within encoder_cache_mb")
ENCODER_CACHE_BYTES = Gauge("locca_encoder_cache_bytes", "Bytes the encoded-image caches hold, all workers")
ENCODER_CACHE_ENTRIES = Gauge("locca_encoder_cache_entries", "Encoded images the caches hold, all workers")
IMAGE_SECONDS = Histogram("locca_image_decode_seconds", "Time to decode and preprocess a request image",
                          buckets=LATENCY_BUCKETS)


def record_worker_stats(stats: dict, queue_depths: dict[int, int], caches: dict[int, dict], worker: int) -> None:
    """queue_depths, caches: each worker's last queue depth and encoded-image cache figures, summed here."""
    for n in stats["prefill_sizes"]:
        BATCH_SIZE.labels("prefill").observe(n)
    for n in stats["decode_sizes"]:
        BATCH_SIZE.labels("decode").observe(n)
    for s in stats["queue_waits"]:
        QUEUE_WAIT.observe(s)
    DECODE_STEPS.inc(stats["decode_steps"])
    TOKENS.inc(stats["tokens"])
    for reason, n in stats["aborted"].items():
        ABORTED.labels(reason).inc(n)
    queue_depths[worker] = stats["waiting"]
    QUEUE_DEPTH.set(sum(queue_depths.values()))
    if (cache := stats["cache"]) is not None:
        ENCODER_CACHE_LOOKUPS.labels("hit").inc(cache["hits"])
        ENCODER_CACHE_LOOKUPS.labels("miss").inc(cache["misses"])
        ENCODER_CACHE_EVICTIONS.inc(cache["evictions"])
        caches[worker] = cache
        ENCODER_CACHE_BYTES.set(sum(c["bytes"] for c in caches.values()))
        ENCODER_CACHE_ENTRIES.set(sum(c["entries"] for c in caches.values()))


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST

"""Throughput and latency percentiles against users, from a Locust run's requests.csv (loadtests/locustfile.py).

    python loadtests/plot.py [RESULTS_DIR]      # default loadtests/results: writes loadtest.png and summary.csv

Requests are grouped by the user count they finished at; with the "steps" shape every level is held for a
few seconds, so each group is one closed-loop concurrency. Throughput is a group's successful requests over
the time it spans; percentiles are over its successful requests; failures are counted apart.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PERCENTILES = (50, 95, 99)


def load(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"time": float(r["time"]), "users": int(r["users"]), "name": f'{r["type"]} {r["name"]}'.strip(),
                 "ms": float(r["response_time_ms"]), "failed": r["failed"] == "1"} for r in csv.DictReader(f)]


def summarize(rows: list[dict]) -> list[dict]:
    """One row per user count: users, requests, failures, rps, p50/p95/p99 (ms), and p95 per endpoint."""
    by_users = defaultdict(list)
    for r in rows:
        if r["users"] > 0:
            by_users[r["users"]].append(r)
    out = []
    for users, group in sorted(by_users.items()):
        ok = [r for r in group if not r["failed"]]
        times = [r["time"] for r in group]
        span = max(max(times) - min(times), 1.0)
        ms = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
        row = {"users": users, "requests": len(group), "failures": len(group) - len(ok), "rps": len(ok) / span}
        row.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
        names = defaultdict(list)
        for r in ok:
            names[r["name"]].append(r["ms"])
        row["p95_by_name"] = {n: float(np.percentile(v, 95)) for n, v in sorted(names.items())}
        out.append(row)
    return out


def plot(summary: list[dict], out: Path, title: str = "LocCa Serve load test") -> None:
    users = [s["users"] for s in summary]
    fig, (ax_rps, ax_lat, ax_name) = plt.subplots(1, 3, figsize=(16, 4.8))
    ax_rps.plot(users, [s["rps"] for s in summary], "o-", label="successful req/s")
    for s in summary:
        if s["failures"]:
            ax_rps.annotate(f'{s["failures"]} failed', (s["users"], s["rps"]), color="red", fontsize=8)
    ax_rps.set(title="throughput", ylabel="requests / s", ylim=(0, None))
    for p in PERCENTILES:
        ax_lat.plot(users, [s[f"p{p}"] for s in summary], "o-", label=f"p{p}")
    ax_lat.set(title="latency, all requests", ylabel="ms", ylim=(0, None))
    names = sorted({n for s in summary for n in s["p95_by_name"]})
    for n in names:
        ax_name.plot(users, [s["p95_by_name"].get(n, np.nan) for s in summary], "o-", label=n)
    ax_name.set(title="p95 latency by request", ylabel="ms", ylim=(0, None))
    for ax in (ax_rps, ax_lat, ax_name):
        ax.set_xscale("log", base=2)
        ax.set_xticks(users, [str(u) for u in users])
        ax.set_xlabel("concurrent users")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    total, failed = sum(s["requests"] for s in summary), sum(s["failures"] for s in summary)
    fig.suptitle(f"{title}: {total} requests, {failed} failed")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    results = Path(argv[0] if argv else Path(__file__).resolve().parent / "results")
    rows = load(results / "requests.csv")
    summary = summarize(rows)
    if not summary:
        print(f"no requests in {results / 'requests.csv'}", file=sys.stderr)
        return 1
    plot(summary, results / "loadtest.png")
    with open(results / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["users", "requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms"])
        for s in summary:
            w.writerow([s["users"], s["requests"], s["failures"], f'{s["rps"]:.2f}',
                        *(f'{s[f"p{p}"]:.1f}' for p in PERCENTILES)])
    print(f"{'users':>5} {'requests':>8} {'failed':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for s in summary:
        print(f'{s["users"]:>5} {s["requests"]:>8} {s["failures"]:>6} {s["rps"]:>7.1f} '
              f'{s["p50"]:>8.1f} {s["p95"]:>8.1f} {s["p99"]:>8.1f}')
    print(f"wrote {results / 'loadtest.png'} and {results / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

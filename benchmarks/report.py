"""The bench's results as a table (with the goals of issue 8, met or not) and as one figure."""

from __future__ import annotations

import math
import textwrap

PEER = "hf generate fp32"
POLICIES = {"continuous": "continuous, short first", "arrival": "continuous, arrival order", "static": "static"}


def goals(res: dict) -> list[dict]:
    """Each goal of issue 8 that the run measured: target, measured value, met."""
    out = []

    def goal(name, target, value, met, shown=None):
        out.append({"goal": name, "target": target, "value": value, "measured": shown or f"{value:.2f}x",
                    "met": bool(met) if math.isfinite(value) else False})

    default = res["meta"]["default"]
    if "engine" in res:
        sec = {(r["name"], r["batch"]): r["seconds"] for r in res["engine"]}
        b1, bn = min(b for _, b in sec), max(b for _, b in sec)
        ratio = {(n, b): sec[PEER, b] / s for (n, b), s in sec.items()}
        goal(f"1. latency at batch {b1}, fp32: HF / ours ({default})", ">= 5", ratio[default, b1],
             ratio[default, b1] >= 5)
        goal(f"1. throughput at batch {bn}, fp32: ours / HF", ">= 2", ratio[default, bn], ratio[default, bn] >= 2)
        for a in res["accuracy"]["rows"]:  # each variant against the fp32 of its own backend
            n, base = a["name"], a["name"].replace(a["precision"], "fp32")
            if a["precision"] in ("int8", "bf16") and (base, b1) in sec:
                more = ratio[n, b1] > ratio[base, b1] and ratio[n, bn] > ratio[base, bn]
                goal(f"1. {n}: more than {base} at batch {b1} and {bn}; refer Acc@0.5 change", "> fp32, >= -1 pt",
                     a["delta_points"], more and a["delta_points"] >= -1,
                     f"{ratio[n, b1]:.2f}x, {ratio[n, bn]:.2f}x, {a['delta_points']:+.1f} pt")
    if "serving" in res:
        s = res["serving"]
        level = min((r["clients"] for r in s["ours"]), key=lambda c: abs(c - 32))
        x = _at(s["ours"], level)["throughput"] / _at(s["naive"], level)["throughput"]
        goal(f"2. serving throughput at {level} clients: ours / naive", ">= 4", x, x >= 4)
        if "ground" in s:  # issue 16
            g = s["ground"]
            goal("2. /v1/ground (every object) p50 / /v1/caption p50, 1 client", "<= 3", g["ratio"], g["ratio"] <= 3)
    if "batching" in res:
        x = res["batching"]["continuous_over_idle"]
        goal("3. refer p50 under mixed load / idle (continuous batching)", "<= 2", x, x <= 2)
    if "efficiency" in res:  # issue 19
        e = res["efficiency"]
        for r in e["server"]:
            goal(f"6. server captions/s at {r['clients']} connections ({e['generator'].split()[0]}) / in-process "
                 "engine", ">= 85%", r["efficiency"], r["efficiency"] >= 0.85, f"{100 * r['efficiency']:.0f}%")
        x, y = e["at_most_clients_vs_peak"], e.get("at_most_clients_vs_peak_of_engine", math.nan)
        goal(f"6. throughput at {e['server'][-1]['clients']} connections / the peak (in shares of the engine)",
             ">= 95%", x, x >= 0.95, f"{100 * x:.0f}% ({100 * y:.0f}%)")
    if "rec" in res:
        x = res["rec"]["modes"]["1 call of 4"]["vs_uncached"]
        goal("7. REC questions/s: 1 call of 4 expressions / 4 calls without cache", ">= 2.5", x, x >= 2.5)
    if "encoder" in res:
        best = max((r for r in res["encoder"] if r["name"] == default), key=lambda r: r["mfu"])
        goal(f"4. encoder MFU at its best batch ({best['batch']}), {default}", ">= 50%", best["mfu"],
             best["mfu"] >= 0.5, f"{100 * best['mfu']:.0f}%")
    return out


def _at(rows: list[dict], clients: int) -> dict:
    return next(r for r in rows if r["clients"] == clients)


def saturation(res: dict) -> list[tuple[str, float]]:
    """Model FLOPs utilisation of whole requests at saturation: the engine at its largest batch, the server at
    its most clients (caption requests, their mean length)."""
    out, peak = [], res["peak"]["fp32"]
    default = res["meta"]["default"]
    if "engine" in res:
        r = max((r for r in res["engine"] if r["name"] == default), key=lambda r: r["batch"])
        out.append((f"engine, batch {r['batch']}, {r['new_tokens']} tokens", r["model_flops"] / r["seconds"] / peak))
    if "serving" in res:
        r = max(res["serving"]["ours"], key=lambda r: r["clients"])
        out.append((f"server, {r['clients']} clients, captions of {res['serving']['mean_new_tokens']:.1f} tokens",
                     r["throughput"] * res["serving"]["flops_per_request"] / peak))
    return out


def table(res: dict) -> str:
    m = res["meta"]
    lines = [f"LocCa bench --{m['mode']}  {m['date']}  {m['cpu']}, {m['cores']} cores"
             + (f", {m['gpu']}" if m.get("gpu") else "") + f"  device {m['device']}, {m['threads']} thread(s)",
             f"peak matmul: fp32 {res['peak']['fp32'] / 1e9:.1f} GFLOP/s, bf16 {res['peak']['bf16'] / 1e9:.1f} GFLOP/s;"
             f" model FLOPs: encoder {res['flops']['encode_per_image'] / 1e6:.1f} M per image, request of "
             f"{res['flops']['new_tokens']} tokens {res['flops']['request'] / 1e6:.1f} M"]
    if "engine" in res:
        sec = {(r["name"], r["batch"]): r["seconds"] for r in res["engine"]}
        lines += ["", f"1. engine vs HF generate(): {res['engine'][0]['new_tokens']} new tokens, greedy, KV cache",
                  f"   {'contender':<20}{'batch':>6}{'ms/call':>10}{'images/s':>10}{'vs HF':>8}{'encoder ms':>12}"
                  f"{'ms/token':>10}"]
        lines += [f"   {r['name']:<20}{r['batch']:>6}{1e3 * r['seconds']:>10.1f}{r['images_per_s']:>10.1f}"
                  f"{sec[PEER, r['batch']] / r['seconds']:>8.2f}{1e3 * r['encode_seconds']:>12.1f}"
                  f"{1e3 * r['decode_seconds_per_token']:>10.2f}" for r in res["engine"]]
        a = res["accuracy"]
        lines.append(f"   refer Acc@0.5, {a['questions']} questions on {a['scenes']} held-out scenes: " + ", ".join(
            f"{r['name']} {r['refer_acc50']:.3f} ({r['delta_points']:+.1f} pt, {100 * r['same_box']:.0f}% same boxes)"
            for r in a["rows"]))
    if "serving" in res:
        s = res["serving"]
        lines += ["", f"2. serving, caption requests (mean {s['mean_new_tokens']:.1f} tokens), closed loop",
                  f"   {'clients':>7}{'ours req/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'naive req/s':>13}{'p50 ms':>9}"
                  f"{'p99 ms':>9}{'x':>7}   ours: images per prefill, rows per decode step"]
        for o, n in zip(s["ours"], s["naive"], strict=True):
            b = o.get("server", {})
            lines.append(f"   {o['clients']:>7}{o['throughput']:>12.1f}{o['p50_ms']:>9.0f}{o['p99_ms']:>9.0f}"
                         f"{n['throughput']:>13.1f}{n['p50_ms']:>9.0f}{n['p99_ms']:>9.0f}"
                         f"{o['throughput'] / n['throughput']:>7.2f}   "
                         + (f"{b['prefill_images'] / max(b['prefills'], 1):.1f}, "
                            f"{b['decode_rows'] / max(b['decode_steps'], 1):.1f}" if b else ""))
        if "ground" in s:
            g = s["ground"]
            lines.append(f"   one client, same scenes: /v1/ground without a box (every object) p50 {g['ground_p50_ms']:.0f}"
                         f" ms, /v1/caption p50 {g['caption_p50_ms']:.0f} ms: {g['ratio']:.2f}x")
        if "workers" in s:
            w = s["workers"]
            lines.append(f"   {w['clients']} clients, --workers 2 against 1: {w['two']['throughput']:.1f} against "
                         f"{w['one']['throughput']:.1f} captions/s ({w['ratio']:.2f}x), p50 {w['two']['p50_ms']:.0f}"
                         f" against {w['one']['p50_ms']:.0f} ms")
    if "batching" in res:
        b = res["batching"]
        policies = [p for p in POLICIES if p in b]  # "arrival": runs since 2026-11-30
        lines += ["", f"3. refer p50 among {b['captioners']} long-caption clients: idle {b['idle']['refer_p50_ms']:.1f} ms;"
                  + ";".join(f" {POLICIES[p]} {b[p]['refer_p50_ms']:.1f} ms ({b[p + '_over_idle']:.2f}x idle)"
                             for p in policies),
                  "   the long captions meanwhile: " + "; ".join(
                      f"{p} p50 {b[p]['caption_p50_ms']:.0f} ms, {b[p]['caption_n']} answered in {b['window_s']:.0f} s"
                      for p in policies),
                  "   refers answered in that time (each one an encoder call too): " + "; ".join(
                      f"{p} {b[p]['refer_n']}" for p in policies)]
    if "encoder" in res:
        lines += ["", "4. encoder model FLOPs utilisation (of the measured peak of its dtype), by batch"]
        for name in dict.fromkeys(r["name"] for r in res["encoder"]):
            lines.append(f"   {name:<20}" + "  ".join(f"b{r['batch']} {100 * r['mfu']:.0f}%"
                                                     for r in res["encoder"] if r["name"] == name))
        lines += [f"   whole requests at saturation: {k}: {100 * v:.0f}% MFU" for k, v in saturation(res)]
    if "scaling" in res:
        lines += ["", "5. scaling (ms per call)"]
        for axis, key in (("length", "new_tokens"), ("images", "batch")):
            for name in dict.fromkeys(r["name"] for r in res["scaling"][axis]):
                lines.append(f"   {name:<20}{key:<11}" + "  ".join(
                    f"{r[key]}: {1e3 * r['seconds']:.1f}" for r in res["scaling"][axis] if r["name"] == name))
    if "efficiency" in res:
        e = res["efficiency"]
        lines += ["", f"6. efficiency: caption answers/s, a different image per request; the engine in-process "
                  f"({e['engine']['requests']} at once, the server's scheduler), a turn around each level",
                  f"   {'connections':>11}{'server/s':>10}{'engine/s':>10}{'of engine':>11}{'p50 ms':>9}{'p99 ms':>9}"
                  f"{'not 2xx':>9}{'cache hits':>12}   load generator: {e['generator']}"]
        lines += [f"   {r['clients']:>11}{r['throughput']:>10.1f}{r.get('engine', e['engine']['throughput']):>10.1f}"
                  f"{100 * r['efficiency']:>10.0f}%{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['non_2xx']:>9}"
                  f"{r['cache_hits']:>12.0f}" for r in e["server"]]
        if "beside_busy_core" in e:  # runs before 2026-12-02 (fourth session) lack it
            b = e["beside_busy_core"]
            lines += [f"   the engine beside a core busy decoding PNGs (the front's work): {100 * b['ratio']:.0f}% of its "
                      f"speed alone ({len(b['alone'])} alternating pairs); the server, of the engine so slowed: "
                      + ", ".join(f"{100 * r['of_shared']:.0f}% at {r['clients']}" for r in e["server"])]
        if "same_concurrency" in e:  # runs before 2026-12-02 (fifth session) lack it
            lines += ["   the engine at the server's concurrency (closed loops of as many clients as connections), of its "
                      "speed with every request queued at once: "
                      + ", ".join(f"{100 * x['ratio']:.0f}% at {x['clients']}" for x in e["same_concurrency"])
                      + "; the server, of the engine so limited: "
                      + ", ".join(f"{100 * r['of_same_concurrency']:.0f}% at {r['clients']}" for r in e["server"])]
        if "front_cpu_ms" in e["server"][0]:  # where an answer's CPU goes (runs before 2026-12-02 lack it)
            lines += ["   CPU ms per answer (cores busy): the server's front (HTTP, image decoding, pipes), its "
                      "worker, and the engine alone, all at once and in closed loops of as many clients; the worker's "
                      "mean rows per decode step over the window (a caption is one row; the level's first seconds, "
                      "while the connections fill the worker, count too)",
                      f"   {'connections':>11}{'front':>16}{'worker':>16}{'engine':>9}{'at N':>9}{'rows/step':>11}"]
            lines += [f"   {r['clients']:>11}{r['front_cpu_ms']:>9.2f} ({r['front_cores']:.2f}){r['worker_cpu_ms']:>9.2f}"
                      f" ({r['worker_cores']:.2f}){r['engine_cpu_ms']:>9.2f}{r.get('closed_cpu_ms', math.nan):>9.2f}"
                      f"{r.get('decode_rows', math.nan):>11.1f}" for r in e["server"]]
    if "rec" in res:
        r = res["rec"]
        lines += ["", f"7. REC client: {r['questions_per_image']} expressions per image, {r['clients']} clients, "
                  f"medians of {r['rounds']} rounds",
                  f"   {'way':<20}{'questions/s':>12}{'x':>7}{'image p50 ms':>14}{'image p99 ms':>14}"]
        lines += [f"   {name:<20}{m['questions_per_s']:>12.1f}{m['vs_uncached']:>7.2f}{m['image_p50_ms']:>14.0f}"
                  f"{m['image_p99_ms']:>14.0f}" for name, m in r["modes"].items()]
    lines += ["", f"   {'goal (issues 8, 19)':<72}{'target':>18}{'measured':>26}  met"]
    lines += [f"   {g['goal']:<72}{g['target']:>18}{g['measured']:>26}  {'yes' if g['met'] else 'NO'}"
              for g in goals(res)]
    return "\n".join(lines)


def plot(res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 5, figsize=(27, 9))
    ax = ax.ravel()
    m = res["meta"]
    title = fig.suptitle(f"locca bench --{m['mode']}, {m['date']}: {m['cpu']} ({m['cores']} cores)"
                         + (f", {m['gpu']}" if m.get("gpu") else "") + f", device {m['device']}, {m['threads']} thread(s)")
    if "engine" in res:
        for a, b, key, label in ((ax[0], min, "seconds", "ms per call"), (ax[1], max, "images_per_s", "images/s")):
            batch = b(r["batch"] for r in res["engine"])
            rows = [r for r in res["engine"] if r["batch"] == batch]
            vals = [1e3 * r[key] if key == "seconds" else r[key] for r in rows]
            a.barh([r["name"] for r in rows], vals, color=["tab:gray" if r["peer"] else "tab:blue" for r in rows])
            a.set_title(f"1. batch {batch}, {rows[0]['new_tokens']} tokens: {label}")
            a.invert_yaxis()
    if "serving" in res:
        for key, a, label in (("throughput", ax[2], "requests/s"), ("p50_ms", ax[3], "latency ms (p50, p99 dashed)")):
            for name, style in (("ours", "tab:blue"), ("naive", "tab:gray")):
                rows = res["serving"][name]
                a.plot([r["clients"] for r in rows], [r[key] for r in rows], "o-", color=style, label=name)
                if key == "p50_ms":
                    a.plot([r["clients"] for r in rows], [r["p99_ms"] for r in rows], "o--", color=style)
            a.set_xscale("log", base=2)
            a.set_yscale("log" if key == "p50_ms" else "linear")
            a.set_title(f"2. serving: {label}")
            a.set_xlabel("concurrent clients")
            a.legend()
    if "batching" in res:
        b = res["batching"]
        names = ["idle"] + [p for p in POLICIES if p in b]
        colors = {"idle": "tab:green", "continuous": "tab:blue", "arrival": "tab:cyan", "static": "tab:gray"}
        ax[4].bar(["idle" if n == "idle" else POLICIES[n].replace(", ", "\n") for n in names],
                  [b[n]["refer_p50_ms"] for n in names], color=[colors[n] for n in names])
        ax[4].axhline(2 * b["idle"]["refer_p50_ms"], color="k", ls=":", label="goal: 2x idle")
        ax[4].set_title(f"3. refer p50 ms among {b['captioners']} long captions")
        ax[4].legend()
    if "encoder" in res:
        for name in dict.fromkeys(r["name"] for r in res["encoder"]):
            rows = [r for r in res["encoder"] if r["name"] == name]
            ax[5].plot([r["batch"] for r in rows], [100 * r["mfu"] for r in rows], "o-", label=name)
        ax[5].axhline(50, color="k", ls=":", label="goal 50%")
        ax[5].set_xscale("log", base=2)
        ax[5].set_title("4. encoder MFU % (of measured peak)")
        ax[5].set_xlabel("images per call")
        ax[5].legend(fontsize=8)
    if "scaling" in res:
        for a, axis, key, label in ((ax[6], "length", "new_tokens", "new tokens (batch 1)"),
                                    (ax[7], "images", "batch", "images per call")):
            for name in dict.fromkeys(r["name"] for r in res["scaling"][axis]):
                rows = [r for r in res["scaling"][axis] if r["name"] == name]
                a.plot([r[key] for r in rows], [1e3 * r["seconds"] for r in rows], "o-", label=name)
            a.set_title(f"5. ms per call vs {label}")
            a.set_xlabel(label)
            a.legend(fontsize=8)
    if "efficiency" in res:
        e = res["efficiency"]
        rows = e["server"]
        x = [float(i) for i in range(len(rows))]
        engine = [r.get("engine", e["engine"]["throughput"]) for r in rows]  # the engine's turns around each level
        ax[8].bar([i - 0.2 for i in x], engine, 0.4, color="tab:green", label="in-process engine, around each level")
        ax[8].bar([i + 0.2 for i in x], [r["throughput"] for r in rows], 0.4, color="tab:blue",
                  label=f"server ({e['generator'].split()[0]})")
        def marks(shares, **style):  # a share of the engine around each level, as a line across its bars
            ax[8].hlines([f * v for f, v in zip(shares, engine, strict=True)], [i - 0.4 for i in x],
                         [i + 0.4 for i in x], **style)

        marks([0.85] * len(rows), color="k", ls=":", label="goal: 85% of the engine")
        if "beside_busy_core" in e:
            ratio = e["beside_busy_core"]["ratio"]
            marks([ratio] * len(rows), color="tab:red", ls="--",
                  label=f"the engine beside a busy core ({100 * ratio:.0f}%)")
        if "same_concurrency" in e:
            marks([s["ratio"] for s in e["same_concurrency"]], color="tab:purple", ls="-.",
                  label="the engine holding as many requests as connections")
        for i, r in enumerate(rows):
            ax[8].annotate(f"{100 * r['efficiency']:.0f}%", (x[i] + 0.2, r["throughput"]), ha="center",
                           va="bottom", fontsize=8)
        ax[8].set_xticks(x, [str(r["clients"]) for r in rows])
        ax[8].set_ylim(0, 1.45 * max(engine + [r["throughput"] for r in rows]))  # room for the legend
        ax[8].set_title("6. captions/s, a different image per request")
        ax[8].set_xlabel("connections")
        ax[8].legend(fontsize=7, loc="upper left")
    if "rec" in res:
        modes = res["rec"]["modes"]
        ax[9].bar([n.replace(", ", "\n") for n in modes], [m["questions_per_s"] for m in modes.values()],
                  color=["tab:gray", "tab:cyan", "tab:blue"])
        ax[9].set_title(f"7. REC: questions/s, {res['rec']['questions_per_image']} per image, "
                        f"{res['rec']['clients']} clients")
    used = [a for a in ax if a.has_data()]
    if 0 < len(used) < len(ax):  # sections this run left out (--sections): the others close up, no empty frames
        for a in ax:
            if not a.has_data():
                fig.delaxes(a)
        cols = min(5, len(used))
        grid = fig.add_gridspec(-(-len(used) // cols), cols)
        for i, a in enumerate(used):
            a.set_subplotspec(grid[i // cols, i % cols])
        fig.set_size_inches(5.4 * cols, 4.5 * -(-len(used) // cols))
        title.set_text(textwrap.fill(title.get_text(), 48 * cols))  # a panel or two: the title on several lines
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

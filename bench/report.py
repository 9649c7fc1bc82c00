"""The serving benchmark's outputs: a Markdown table (printed and written), the JSON of every measurement, and a
PNG of throughput and p99 against concurrency (matplotlib, imported only here and only when plotting)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# The done-when targets of the performance issue, checked on every run (a reading, not a test).
TARGET_RATIO_32 = 0.5
TARGET_P99_32_MS = 10.0
TARGET_P50_EXTRA_1_MS = 0.25
TARGET_CNN_RATIO = 0.8


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}{suffix}"


def point_row(point: dict[str, Any]) -> str:
    """One Markdown row: ratio to the floor first, then throughput, latencies, batch, CPU."""
    ratio = point.get("vs_floor")
    label = point["label"]
    if point.get("errors"):
        label += f" ({point['errors']:.0f} errors)"
    inside = ""
    if point.get("in_server_ms") is not None:
        inside = f"{point['in_server_ms']:.2f} ({point['compute_ms']:.2f})"
    return (f"| {point['c']} | {label} | {_num(ratio, 2, 'x')} | {_num(point['rps'])} | {_num(point['p50'], 2)} | "
            f"{_num(point['p99'], 2)} | {inside} | {_num(point.get('batch'), 1)} | "
            f"{_num(point.get('server_cpu_us'))} | {_num(100 * point['client_cpu_share'], 0, '%')} |")


def markdown(result: dict[str, Any]) -> str:
    """The whole run as Markdown: the setup line, the table by concurrency, the targets, the CNN case."""
    meta = result["meta"]
    lines = [
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}; load average {meta['load_before']} before, "
        f"{meta['load_after']} after; {meta['rounds']} interleaved round(s) of {meta['duration']:g} s per point; "
        f"{meta.get('samples_per_request', 1)} sample(s) per request; HTTP load: wrk -t{meta['wrk_threads']}; "
        f"gRPC load: {meta['grpc_processes']} Python grpc.aio processes.",
        "",
        "| c | server | x floor | req/s | p50 ms | p99 ms | in server ms (compute) | mean batch | server CPU us/req "
        "| client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [point_row(p) for p in result["points"]]
    lines += ["", "x floor: requests/s over the bare ASGI floor's at the same c (gRPC rows: over the bare grpc.aio "
              "floor's). client CPU: the load generator's CPU time over the run's wall time (100% = one core; wrk "
              "-t1 at 100% is saturated). in server (compute): capsa-serve's mean time per request from admission "
              "(body read) to the encoded answer, from its request-duration metric, and in brackets its workers' "
              "mean compute time per batch; the rest of the latency is HTTP parsing and writing, the kernel and the "
              "client."]
    idle = [p.get("idle_servers_cpu_share", 0.0) for p in result["points"]]
    if idle:
        lines[-1] += (f" The servers not under load used {100 * sum(idle) / len(idle):.0f}% of a core on average "
                      f"while a point ran (at most {100 * max(idle):.0f}%).")
    for name, reason in result.get("unavailable", {}).items():
        lines.append(f"- {name}: unavailable ({reason})")
    if result.get("targets"):
        lines += ["", "Targets:"] + [f"- {t}" for t in result["targets"]]
    if result.get("cnn"):
        from bench.cnn import markdown as cnn_markdown

        lines += ["", cnn_markdown(result["cnn"])]
    return "\n".join(lines) + "\n"


def targets(points: list[dict[str, Any]], cnn: dict[str, Any] | None) -> list[str]:
    """The issue's done-when targets read off this run, each with PASS/FAIL and the figures: for capsa-serve as
    configured by default, and again for the busy-polling one when the run has it."""
    by = {(p["column"], p["c"]): p for p in points}
    out = []
    floor1 = by.get(("floor-asgi", 1))
    for suffix, label in (("", ""), ("-poll", " (busy-poll)")):
        json32, json1 = by.get((f"v2-json{suffix}", 32)), by.get((f"v2-json{suffix}", 1))
        if json32 and json32.get("vs_floor") is not None:
            ok = json32["vs_floor"] >= TARGET_RATIO_32 and json32["p99"] < TARGET_P99_32_MS
            out.append(f"{'PASS' if ok else 'FAIL'}: V2 JSON{label} at c=32 {json32['vs_floor']:.2f}x the bare floor "
                       f"(>= {TARGET_RATIO_32}), p99 {json32['p99']:.2f} ms (< {TARGET_P99_32_MS:g})")
        if json1 and floor1:
            extra = json1["p50"] - floor1["p50"]
            out.append(f"{'PASS' if extra <= TARGET_P50_EXTRA_1_MS else 'FAIL'}: V2 JSON{label} p50 at c=1 is the "
                       f"floor's + {extra:.2f} ms (<= {TARGET_P50_EXTRA_1_MS})")
        for c in sorted({p["c"] for p in points}):
            binary, js = by.get((f"v2-binary{suffix}", c)), by.get((f"v2-json{suffix}", c))
            if binary and js:
                ratio = binary["rps"] / js["rps"]
                out.append(f"{'PASS' if ratio >= 1.0 else 'FAIL'}: binary{label} at c={c} is {ratio:.2f}x JSON's "
                           "req/s (>= 1)")
    if cnn:
        out.append(f"{'PASS' if cnn['ratio'] >= TARGET_CNN_RATIO else 'FAIL'}: CNN served {cnn['ratio']:.2f}x the "
                   f"in-process forward (>= {TARGET_CNN_RATIO})")
    return out


def plot(result: dict[str, Any], path: Path) -> Path:
    """Throughput and p99 against concurrency, one line per server, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(14, 4.5))
    labels = list(dict.fromkeys(p["label"] for p in result["points"]))
    for label in labels:
        pts = sorted((p for p in result["points"] if p["label"] == label), key=lambda p: p["c"])
        cs = [p["c"] for p in pts]
        ax_rps.plot(cs, [p["rps"] for p in pts], marker="o", label=label)
        ax_p99.plot(cs, [p["p99"] for p in pts], marker="o", label=label)
    concurrencies = sorted({p["c"] for p in result["points"]})
    for ax, title in ((ax_rps, "throughput (req/s)"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_p99.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{result['meta']['command']} ({result['meta']['date']}, load {result['meta']['load_before']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out: Path, png: bool = True) -> list[Path]:
    """Write ``serve.md``, ``serve.json`` and (when matplotlib is installed) ``serve.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "serve.md", out / "serve.json"]
    written[0].write_text(markdown(result))
    written[1].write_text(json.dumps(result, indent=2, default=str) + "\n")
    if png and result["points"]:
        try:
            written.append(plot(result, out / "serve.png"))
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    return written

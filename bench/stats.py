"""Latency summaries (milliseconds) and the readable table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """n, mean and p50/p90/p99/max of a list of durations, in milliseconds."""
    ms = np.asarray(seconds, np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"n": len(ms), "mean_ms": round(float(ms.mean()), 3), "p50_ms": round(float(p50), 3),
            "p90_ms": round(float(p90), 3), "p99_ms": round(float(p99), 3),
            "max_ms": round(float(ms.max()), 3)}


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def bucket_table(buckets: dict[str, dict[str, Any]]) -> list[str]:
    cascade = any("first_floor" in b for b in buckets.values())
    header = ["tokens", "Route p50", "p90", "p99", "floor p50", "p99", "engine p50",
              "Route-floor", "Route/floor", *(["1st-stage floor p50", "Route-1st floor"] if cascade else []),
              "naive p50", "p99", "naive/Route", "other load"]  # fmt: skip
    rows = []
    for name, b in buckets.items():
        route, floor, naive = b["route"], b["floor"], b.get("naive") or {}
        first = [_fmt(b["first_floor"]["p50_ms"]), _fmt(b["route_minus_first_floor_p50_ms"])] if cascade else []
        rows.append([name, _fmt(route["p50_ms"]), _fmt(route["p90_ms"]), _fmt(route["p99_ms"]),
                     _fmt(floor["p50_ms"]), _fmt(floor["p99_ms"]), _fmt(b["engine"]["p50_ms"]),
                     _fmt(b["route_minus_floor_p50_ms"]), _fmt(b["route_over_floor_p50"]), *first,
                     _fmt(naive.get("p50_ms")), _fmt(naive.get("p99_ms")),
                     _fmt(b.get("naive_over_route_p50"), ".1f"), _fmt(b["outside_cpu_cores"])])
    return _rows(header, rows)


def breakdown_table(buckets: dict[str, dict[str, Any]]) -> list[str]:
    stages = list(next(iter(buckets.values()))["breakdown_mean_ms"])
    rows = [[name, *(_fmt(b["breakdown_mean_ms"][s]) for s in stages), _fmt(b["route"]["mean_ms"])]
            for name, b in buckets.items()]
    return _rows(["tokens", *stages, "= Route mean"], rows)


def sweep_table(levels: list[dict[str, Any]]) -> list[str]:
    header = ["in flight", "calls", "decisions/s", "x level 1", "p50 ms", "p99 ms", "mean batch",
              "server CPU ms/dec", "client CPU ms/dec", "other load"]
    rows = [[str(lv["in_flight"]), str(lv["calls"]), _fmt(lv["throughput"], ".0f"),
             _fmt(lv.get("throughput_vs_level_1")), _fmt(lv["latency"]["p50_ms"]),
             _fmt(lv["latency"]["p99_ms"]), _fmt(lv["mean_batch_size"]),
             _fmt(lv["server_cpu_ms_per_decision"]), _fmt(lv["client_cpu_ms_per_decision"]),
             _fmt(lv["outside_cpu_cores"])]
            for lv in levels]
    return _rows(header, rows)


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    rows = [[t["name"], _fmt(t["value"]), t["target"], {True: "met", False: "MISSED"}.get(
        t["met"], "n/a")] for t in targets]
    return _rows(["target", "value", "wanted", ""], rows)


def noise_lines(report: dict[str, Any]) -> list[str]:
    phases = [*report["buckets"].values(), *report["sweep"]]
    worst = max((p["outside_cpu_cores"] or 0.0) for p in phases)
    limit = report["noise"]["max_outside_cores"]
    lines = [f"{report['noise']['measurements_repeated']} measurements repeated because other "
             f"processes kept more than {limit} cores busy."]
    if worst > limit:
        cores = report["machine"]["usable_cpus"]
        lines.append(f"WARNING: other processes still kept up to {worst:.2f} of the {cores} cores "
                     "busy during a measurement (column 'other load'): those figures are unreliable.")
    return [*lines, ""]


def render(report: dict[str, Any]) -> str:
    """The whole report as text (what `python -m bench` prints)."""
    m, rss, rb = report["machine"], report["server_rss_mib"], report["route_batch"]
    tr, replicas = report["transport"], report.get("replicas", 1)
    lines = [
        f"tier-router latency benchmark: model {report['model_version']}, "
        f"profile {report.get('profile', {}).get('name', 'default')}, {m['cpu_model']}, "
        f"{m['usable_cpus']} CPUs, intra-op threads {m['intra_op_threads']}"
        f"{f' in each of {replicas} server processes' if replicas > 1 else ''}, "
        f"load average {report['load_average']['start']} -> {report['load_average']['end']}",
        "",
        *noise_lines(report),
        "Sequential, batch 1, milliseconds (Route over loopback gRPC; floor = tokenize + "
        "encoder.onnx in-process (1st-stage floor: a cascade's first-stage encoder); "
        "naive = sentence-transformers encode + numpy head; "
        "other load = cores kept busy by other processes meanwhile):",
        *bucket_table(report["buckets"]),
        f"empty call (Health.Check over the same channel): p50 {tr['p50_ms']:.2f} ms, "
        f"p99 {tr['p99_ms']:.2f} ms",
        "",
        "Where a Route call's time goes (means, ms; engine = RoutingEngine.route_batch in-process, "
        "batcher + servicer from the server's router_route_seconds):",
        *breakdown_table(report["buckets"]),
        "",
        f"Concurrency sweep (grpc.aio, {report['sweep_bucket']} token prompts):",
        *sweep_table(report["sweep"]),
        "",
        f"RouteBatch, {rb['batch']} prompts per call ({report['sweep_bucket']} tokens): "
        f"{rb['decisions_per_s']:.0f} decisions/s, call p50 {rb['latency']['p50_ms']:.1f} ms, "
        f"p99 {rb['latency']['p99_ms']:.1f} ms",
        f"Server resident memory{' (all replicas)' if replicas > 1 else ''}: "
        f"{rss['after_warmup']:.0f} MiB after warm-up, "
        f"{rss['end']:.0f} MiB at the end",
        *([f"Cascade: the first stage decided {c['first']}, the main encoder {c['main']} "
           f"({c['main'] / (c['first'] + c['main']) * 100:.1f}%)"]
          if (c := report.get("cascade_decisions")) and c["first"] + c["main"] else []),
        *([f"Soak: {s['decisions']} decisions in {s['wall_s']:.0f} s, RSS MiB by decisions: "
           + ", ".join(f"{n}: {m:.0f}" for n, m in s["rss_mib"])
           + f"; growth over the second half {s['growth_second_half_mib']:+.1f} MiB"]
          if (s := report.get("soak")) else []),
        "",
        *targets_table(report["targets"]),
    ]
    return "\n".join(lines)

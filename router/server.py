"""build_server(settings) wires everything; serve() runs it with metrics, health and signals."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.artifacts import load_model
from router.batcher import MicroBatcher
from router.config import Settings
from router.engine import RouteQuery, RouteResult, RoutingEngine
from router.metrics import start_metrics_server
from router.profiles import LiveProfiles
from router.service import ErrorInterceptor, RouterServicer
from router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
WARMUP_TEXTS = ["hi", "What is the capital of France? " * 4, "Summarize the following text. " * 30]


class RouterServer:
    """A built, not yet started, router server. `port` is known before start()."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        model = load_model(settings.model_dir, device=settings.device,
                           intra_op_threads=settings.intra_op_threads)
        self.profiles = LiveProfiles(settings.profiles_path, settings.default_profile, model.models)
        self.engine = RoutingEngine(model, max_batch_tokens=settings.max_batch_tokens)
        self.batcher: MicroBatcher[RouteQuery, RouteResult] = MicroBatcher(
            self.engine.route_batch, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue
        )
        self._watch: asyncio.Task[None] | None = None
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[("grpc.so_reuseport", 0)],  # a second server on the same port must fail, not share
        )
        router_pb2_grpc.add_RouterServicer_to_server(
            RouterServicer(self.batcher, self.profiles, max_batch_request=settings.max_batch_request),
            self.grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start listening (NOT_SERVING), warm the engine up, then report SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        profile = self.profiles.current.get("")
        # Warm up outside the batcher (its queue limit is for callers): the first runs
        # allocate ORT's buffers for short and long inputs, singly and batched.
        for batch in ([WARMUP_TEXTS[0]], [WARMUP_TEXTS[-1]], WARMUP_TEXTS):
            await asyncio.to_thread(self.engine.route_batch, [RouteQuery(t, profile) for t in batch])
        self.batcher.start()
        if self.settings.profiles_reload_seconds > 0:
            self._watch = asyncio.create_task(self._watch_profiles(self.settings.profiles_reload_seconds))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving model %s with profiles %s (default %r, version %s) on %s:%d",
            self.engine.version, sorted(self.profiles.current.profiles), self.profiles.default,
            profile.version, self.settings.host, self.port,
        )

    async def _watch_profiles(self, interval: float) -> None:
        """Poll the profiles file and its price catalog; reload on change (see LiveProfiles)."""
        while True:
            await asyncio.sleep(interval)
            if self.profiles.changed():
                await asyncio.to_thread(self.profiles.reload)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then stop."""
        grace = self.settings.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._watch is not None:
            self._watch.cancel()
        # Drain first, while the transport is fully up: every admitted call gets its answer
        # written before the server sends GOAWAY. New calls meanwhile get UNAVAILABLE.
        try:
            await asyncio.wait_for(self.batcher.stop(), grace)
        except TimeoutError:
            log.warning("batcher did not drain within %.1fs; stopping anyway", grace)
        await self.grpc.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def build_server(settings: Settings) -> RouterServer:
    """Load the model and profiles and wire the server; call inside the event loop that runs it."""
    return RouterServer(settings)


async def serve(settings: Settings) -> None:
    server = build_server(settings)
    metrics = start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, server.profiles.reload)  # reload profiles now
    await stopping.wait()
    log.info("signal received: finishing in-flight calls (grace %.1fs)", settings.grace_seconds)
    await server.stop()
    if metrics is not None:
        metrics.close()
    log.info("stopped")

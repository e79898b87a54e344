"""A promoted model version is served without a restart; a broken one is refused; shadow scoring."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
from pathlib import Path

import grpc
from prometheus_client import REGISTRY

from router.server import build_server
from router.v1 import router_pb2, router_pb2_grpc
from tests.integration.test_server import PROMPTS, settings, wait_for


def copy_version(src: Path, root: Path, name: str) -> Path:
    """The same weights under another version name (what a retrain writes, minus the training)."""
    dst = root / name
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def point_default(root: Path, name: str) -> None:
    tmp = root / "DEFAULT.tmp"
    tmp.write_text(name + "\n")
    tmp.replace(root / "DEFAULT")  # atomically, as training writes it


async def test_promoted_version_is_swapped_in_under_load_and_a_broken_one_refused(tmp_path, model_dir):
    root = tmp_path / "models"
    root.mkdir()
    copy_version(model_dir, root, "v1")
    point_default(root, "v1")
    async with build_server(settings(model_dir=root, model_reload_seconds=0.05)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            assert (await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0]))).model_version == "v1"
            copy_version(model_dir, root, "v2")
            stop = asyncio.Event()

            async def caller(i: int) -> list[str]:
                seen = []
                while not stop.is_set():
                    r = await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[i % 4]))
                    seen.append(r.model_version)
                return seen

            callers = [asyncio.create_task(caller(i)) for i in range(8)]
            await asyncio.sleep(0.2)
            frozen = gc.get_freeze_count()
            point_default(root, "v2")
            await wait_for(lambda: srv.engine.version == "v2")
            assert gc.get_freeze_count() > frozen  # the new engine is frozen out of the collector too
            await asyncio.sleep(0.2)
            stop.set()
            seen = [v for c in await asyncio.gather(*callers) for v in c]  # every call answered
            assert set(seen) == {"v1", "v2"} and seen.count("v2") > 0

            broken = copy_version(model_dir, root, "v3")
            (broken / "head.onnx").write_bytes(b"not onnx")
            point_default(root, "v3")
            await wait_for(lambda: srv.refused == "v3")
            assert srv.engine.version == "v2"  # refused: sha256 mismatch, logged
            assert (await stub.Route(router_pb2.RouteRequest(prompt=PROMPTS[0]))).model_version == "v2"


async def test_shadow_model_scores_beside_without_changing_answers(model_dir):
    async with build_server(settings()) as plain, grpc.aio.insecure_channel(f"127.0.0.1:{plain.port}") as channel:
        expected = [await router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(prompt=p))
                    for p in PROMPTS]

    async with build_server(settings(shadow_model_dir=model_dir)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            shadow = srv.shadow
            assert shadow is not None
            got = []
            for i, p in enumerate(PROMPTS):
                got.append(await stub.Route(router_pb2.RouteRequest(prompt=p)))
                # one at a time: the shadow skips batches while two are pending, by design
                await wait_for(lambda i=i: shadow.compared == i + 1)
        assert [g.tier for g in got] == [e.tier for e in expected]
        assert shadow.disagreed == 0  # the same model as its own shadow agrees with itself


async def test_live_tier_shares_are_tracked():
    async with build_server(settings(drift_window=10)) as srv:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for _ in range(3):
                await stub.Route(router_pb2.RouteRequest(prompt="Hi", workflow="legal-review"))
            for _ in range(12):
                await stub.Route(router_pb2.RouteRequest(prompt="Hi", min_tier="mid", max_tier="mid"))
        shares = srv.drift.live.shares("default", ("budget", "mid", "frontier"))
        assert shares == {"budget": 0.0, "mid": 1.0, "frontier": 0.0}  # the window forgot the first 3
        for tier, share in shares.items():  # what /metrics shows, computed when it is read
            assert REGISTRY.get_sample_value("router_tier_share", {"profile": "default", "tier": tier}) == share

"""Several server processes on one host (README, "Several replicas"): each on its own port, one
decision log shared, the client's one channel spreading calls round-robin. What must hold: both
replicas answer, an outcome that lands on the other replica is still recorded, and the shared log
ends with every decision and every outcome."""

from __future__ import annotations

import time

import grpc

from bench.serverproc import ServerGroup
from router.decisionlog import DecisionLog
from router.v1 import router_pb2, router_pb2_grpc


def test_two_replicas_behind_one_round_robin_channel_share_the_decision_log(model_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'decisions.db'}"
    group = ServerGroup(model_dir, replicas=2, threads=1, decision_log=url)
    try:
        assert group.target.startswith("ipv4:") and group.target.count(",") == 1
        with grpc.insecure_channel(group.target, options=group.channel_options) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            ids = [stub.Route(router_pb2.RouteRequest(prompt="Name three prime numbers."),
                              wait_for_ready=True, timeout=60).decision_id]
            deadline = time.monotonic() + 30  # until the second replica is connected and has answered
            while min(s.histogram("router_route_seconds", method="Route")[1] for s in group.servers) == 0:
                assert time.monotonic() < deadline, "the round-robin channel never reached one replica"
                ids.append(stub.Route(router_pb2.RouteRequest(prompt=f"What is {len(ids)} squared?"),
                                      timeout=10).decision_id)
            for i in range(4):  # both connected now: calls alternate
                ids.append(stub.Route(router_pb2.RouteRequest(prompt=f"Translate 'cat {i}' to French."),
                                      timeout=10).decision_id)
            served = [s.histogram("router_route_seconds", method="Route")[1] for s in group.servers]
            assert min(served) >= 2 and sum(served) == len(ids)
            assert group.histogram("router_route_seconds", method="Route")[1] == len(ids)
            # Each outcome goes to the next replica in turn, for half of them not the one that
            # decided (the last ones before that replica's writer has committed them): all recorded.
            for n, decision_id in enumerate(ids):
                ack = stub.ReportOutcome(router_pb2.OutcomeRequest(decision_id=decision_id, success=n % 2 == 0),
                                         timeout=10)
                assert ack.created and ack.decision_id == decision_id, ack.message
        assert group.rss_mib() > 2 * 50
    finally:
        assert group.stop() == 0
    log = DecisionLog(url, salt="bench")
    try:
        assert log.count() == len(ids) and log.count(with_outcome=True) == len(ids)
    finally:
        log.close()

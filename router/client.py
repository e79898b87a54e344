"""A small client: `python -m router.client "some prompt" [--profile P] [--target HOST:PORT]`."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from router.v1 import router_pb2, router_pb2_grpc


def route(target: str, request: router_pb2.RouteRequest, timeout: float = 10.0) -> router_pb2.RouteResponse:
    with grpc.insecure_channel(target) as channel:
        return router_pb2_grpc.RouterStub(channel).Route(request, timeout=timeout)


def report(target: str, request: router_pb2.OutcomeRequest, timeout: float = 10.0) -> router_pb2.OutcomeResponse:
    with grpc.insecure_channel(target) as channel:
        return router_pb2_grpc.RouterStub(channel).ReportOutcome(request, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.client", description=__doc__)
    parser.add_argument("prompt", help="the prompt to route ('-' reads standard input)")
    parser.add_argument("--profile", default="", help="profile name (default: the server's default)")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address")
    parser.add_argument("--workflow", default="", help="workflow, for profile rules")
    parser.add_argument("--stage", default="", help="stage, for profile rules")
    parser.add_argument("--escalate-from", default="", metavar="TIER", help="this tier's answer failed")
    parser.add_argument("--json", action="store_true", help="print the whole response as JSON")
    parser.add_argument("--outcome", choices=["success", "failure"],
                        help="instead of routing: report the outcome of decision PROMPT (a decision id)")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        if args.outcome:
            ack = report(args.target, router_pb2.OutcomeRequest(decision_id=text, success=args.outcome == "success"))
            print(f"{ack.decision_id}: {ack.message}")
            return 0
        request = router_pb2.RouteRequest(prompt=text, profile=args.profile, workflow=args.workflow,
                                          stage=args.stage)
        if args.escalate_from:
            request.escalation.failed_tier = args.escalate_from
        resp = route(args.target, request)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"tier {resp.tier} ({resp.model})  confidence {resp.confidence:.3f}  reason {resp.reason}")
    for s in resp.scores:
        print(f"  {s.tier:<10} {s.model:<30} quality {s.quality:.3f}  win vs cheapest {s.win_probability:.3f}"
              f"  cost ${s.expected_cost:.5f}")
    saving = resp.frontier_cost - resp.expected_cost
    print(f"cost ${resp.expected_cost:.5f} vs ${resp.frontier_cost:.5f} on the frontier tier (saves ${saving:.5f}; "
          f"{resp.input_tokens} tokens in, {resp.output_tokens} out)")
    print(f"model {resp.model_version} ({resp.encoder})  profile {resp.profile}@{resp.profile_version}  "
          f"decision {resp.decision_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

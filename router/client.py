"""A small client: `python -m router.client "some prompt" [--profile P] [--target HOST:PORT]`."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from router.v1 import router_pb2, router_pb2_grpc


def route(target: str, prompt: str, profile: str = "", timeout: float = 10.0) -> router_pb2.RouteResponse:
    with grpc.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        return stub.Route(router_pb2.RouteRequest(prompt=prompt, profile=profile), timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.client", description=__doc__)
    parser.add_argument("prompt", help="the prompt to route ('-' reads standard input)")
    parser.add_argument("--profile", default="", help="profile name (default: the server's default)")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address")
    parser.add_argument("--json", action="store_true", help="print the whole response as JSON")
    args = parser.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        resp = route(args.target, prompt, args.profile)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"tier {resp.tier} ({resp.model})  confidence {resp.confidence:.3f}  reason {resp.reason}")
    for s in resp.scores:
        print(f"  {s.tier:<10} {s.model:<36} quality {s.quality:.3f}  win vs cheapest {s.win_probability:.3f}")
    print(f"model {resp.model_version}  profile {resp.profile}  decision {resp.decision_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

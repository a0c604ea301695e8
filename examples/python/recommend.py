"""Call recsvc from Python with the generated stubs: what a frontend's backend does on a product page.

    python examples/python/recommend.py --target 127.0.0.1:50051 --user 41

Shows: a channel with the retry policy the README documents, a deadline on every call, an x-request-id,
Recommend (k given and k left unset), reading degraded and the versions, RecordEvents with event ids (and
what a retried call returns), and an INVALID_ARGUMENT error. Prints one ``key=value`` line per step.

The stubs are recsvc's own (``recsvc.v1``). Without recsvc installed, generate them from the proto:
    python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. protos/recsvc/v1/recommender.proto
"""

# ruff: noqa: T201  (a command-line example: its output is the point)
from __future__ import annotations

import argparse
import json
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

# The README's client retry policy ("Client retry policy, deploys and overload"): every Recommender
# method is safe to retry; UNAVAILABLE (a server draining in a deploy) and RESOURCE_EXHAUSTED (overload,
# retried no sooner than the server's grpc-retry-pushback-ms) are retried, with throttling so that a
# failing fleet does not get a retry storm.
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "recsvc.v1.Recommender"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }],
    "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.1},
})  # fmt: skip

DEADLINE_S = 2.0        # per call; the server shares it out among its stages and answers within it


def main() -> None:
    """Run the steps against ``--target`` and print what came back."""
    parser = argparse.ArgumentParser(description="Call recsvc from Python with the generated stubs.")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of recsvc")
    parser.add_argument("--user", default="41", help="user id to recommend for")
    args = parser.parse_args()

    options = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]

        # Recommend with a request id of ours: the server logs it and sends it back in trailing metadata.
        request_id = f"example-{uuid.uuid4().hex[:12]}"
        reply, call = stub.Recommend.with_call(
            pb.RecommendRequest(user_id=args.user, k=5, exclude_item_ids=["SKU-in-cart"]),
            timeout=DEADLINE_S, metadata=[("x-request-id", request_id)],
        )  # fmt: skip
        echoed = dict(call.trailing_metadata() or ()).get("x-request-id")
        print(f"request_id_echoed={json.dumps(echoed == request_id)}")
        # degraded: a stage fell back (e.g. the ranker was unreachable); the items are still usable.
        print(f"recommend k=5 items={len(reply.items)} degraded={json.dumps(reply.degraded)} "
              f"reason={json.dumps(reply.degraded_reason)} "
              f"model_version={reply.model_version} index_version={reply.index_version}")
        for rank, item in enumerate(reply.items, 1):
            print(f"  item {rank} {item.item_id} {item.score:.4f}")

        # k left unset (0): the server's default (10 unless RECSVC_DEFAULT_K says otherwise).
        default = stub.Recommend(pb.RecommendRequest(user_id=args.user), timeout=DEADLINE_S)
        print(f"recommend k=unset items={len(default.items)}")

        # The user viewed the top item and put it in the cart. Each event carries our own id, so that a
        # retry (ours, or gRPC's under the retry policy) cannot store it twice.
        now = Timestamp()
        now.GetCurrentTime()
        top = reply.items[0].item_id
        events = pb.RecordEventsRequest(events=[
            pb.Event(user_id=args.user, item_id=top, type=pb.EVENT_TYPE_VIEW, timestamp=now,
                     event_id=str(uuid.uuid4())),
            pb.Event(user_id=args.user, item_id=top, type=pb.EVENT_TYPE_CART, event_id=str(uuid.uuid4())),
        ])  # fmt: skip
        first = stub.RecordEvents(events, timeout=DEADLINE_S)
        print(f"record accepted={first.accepted} duplicates={first.duplicates}")
        again = stub.RecordEvents(events, timeout=DEADLINE_S)          # the same call, retried
        print(f"record_retry accepted={again.accepted} duplicates={again.duplicates}")

        # Seen items are not recommended again.
        after = stub.Recommend(pb.RecommendRequest(user_id=args.user, k=5), timeout=DEADLINE_S)
        print(f"recommend_after_view top_item_returned={json.dumps(top in {i.item_id for i in after.items})}")

        # A bad request: INVALID_ARGUMENT, details name the field. Not retried (it would fail again).
        try:
            stub.Recommend(pb.RecommendRequest(user_id=args.user, k=-1), timeout=DEADLINE_S)
        except grpc.RpcError as exc:
            print(f"error code={exc.code().name} details={json.dumps(exc.details())}")


if __name__ == "__main__":
    main()

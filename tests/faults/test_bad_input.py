"""Rows "random or truncated bytes to each method" and "NUL, control characters, trailing whitespace in ids".

Against the real stack while 8 closed-loop clients send good Recommend calls: bytes that are not the
method's request message (random, truncated valid requests) to every method, requests whose ids break the
id grammar, and one message over ``max_message_bytes``. Each must get its code (INVALID_ARGUMENT saying
the message could not be parsed / naming the field; RESOURCE_EXHAUSTED), be counted in
``recsvc_requests_total``, leave no traceback in the server's log (parse failures: a few throttled lines),
and cost the good traffic nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from recsvc.offline.data import Dataset
from recsvc.server.servicer import UNPARSEABLE_LOG_INTERVAL_S
from recsvc.v1 import recommender_pb2 as pb
from tests.faults.harness import LoadGen, fault_stack, health_status, record
from tests.support import free_port

REQUESTS = {"Recommend": pb.RecommendRequest, "RecordEvents": pb.RecordEventsRequest, "Prefetch": pb.PrefetchRequest}
MAX_MESSAGE_BYTES = 1_000_000          # below gRPC's own 4 MiB default: proves the setting reaches the server


def garbage(rng: random.Random, items: list[str]) -> list[tuple[str, bytes]]:
    """(method, bytes) that do not parse as the method's request: random bytes and truncated requests."""
    valid = {
        "Recommend": pb.RecommendRequest(user_id="user-1", k=5, context_item_ids=items[:3],
                                         exclude_item_ids=items[3:6]),
        "RecordEvents": pb.RecordEventsRequest(events=[pb.Event(user_id="user-1", item_id=items[0], type=1,
                                                                event_id="event-1")] * 3),
        "Prefetch": pb.PrefetchRequest(user_ids=["user-1", "user-2", "user-3"]),
    }  # fmt: skip
    out = []
    for method, request in valid.items():
        whole = request.SerializeToString()
        out += [(method, whole[:cut]) for cut in range(1, len(whole))]
        out += [(method, rng.randbytes(rng.randint(1, 2000))) for _ in range(60)]
    return [(m, data) for m, data in out if not parses(m, data)]


def parses(method: str, data: bytes) -> bool:
    try:
        REQUESTS[method].FromString(data)
    except DecodeError:
        return False
    return True


def bad_ids(items: list[str]) -> list[tuple[str, object, str]]:
    """(method, request, the field the error must name) for ids that break the grammar."""
    ok = pb.Event(user_id="u", item_id=items[0], type=pb.EVENT_TYPE_VIEW)
    return [
        ("Recommend", pb.RecommendRequest(user_id="user\x00", k=5), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="user-1 ", k=5), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="\tuser-1", k=5), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="user-1", k=5, context_item_ids=[*items[:3], "SKU\x1b[31m"]),
         "context_item_ids[3]"),
        ("Recommend", pb.RecommendRequest(user_id="user-1", k=5, exclude_item_ids=[items[1], "a\u2028b"]),
         "exclude_item_ids[1]"),
        ("Recommend", pb.RecommendRequest(user_id="user\x7f", k=5), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="user\x85", k=5), "user_id"),
        ("RecordEvents", pb.RecordEventsRequest(events=[ok, pb.Event(user_id="u", item_id=items[0] + "\n", type=1)]),
         "events[1].item_id"),
        ("RecordEvents", pb.RecordEventsRequest(events=[pb.Event(user_id="u\r", item_id=items[0], type=1)]),
         "events[0].user_id"),
        ("RecordEvents", pb.RecordEventsRequest(events=[pb.Event(user_id="u", item_id=items[0], type=1,
                                                                 event_id="e-1 ")]), "events[0].event_id"),
        ("Prefetch", pb.PrefetchRequest(user_ids=["u1", "u2\x00"]), "user_ids[1]"),
        ("Prefetch", pb.PrefetchRequest(user_ids=[" u1"]), "user_ids[0]"),
    ]  # fmt: skip


async def send(channel: grpc.aio.Channel, method: str, data: bytes) -> tuple[str, str]:
    try:
        await channel.unary_unary(f"/recsvc.v1.Recommender/{method}")(data, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def requests_total(metrics_port: int) -> Counter[tuple[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Counter[tuple[str, str]] = Counter()
    for m in re.finditer(r'^recsvc_requests_total\{[^}]*method="(\w+)",code="(\w+)"\} (\S+)$', text, re.M):
        out[(m.group(1), m.group(2))] += int(float(m.group(3)))
    return out


async def test_garbage_and_bad_ids_under_load(tmp_path: Path, fault_data: tuple[Path, Dataset]) -> None:
    metrics_port = free_port()
    rng = random.Random(10)
    async with fault_stack(tmp_path, *fault_data, RECSVC_METRICS_PORT=str(metrics_port),
                           RECSVC_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES)) as stack:  # fmt: skip
        payloads = garbage(rng, stack.items)
        wrong_ids = bad_ids(stack.items)
        oversized = pb.PrefetchRequest(user_ids=[f"user-{i:0100d}" for i in range(10_000)]).SerializeToString()
        assert MAX_MESSAGE_BYTES < len(oversized) < 4 * 1024 * 1024
        t0 = time.monotonic()
        gen = LoadGen(stack.target, stack.users, clients=8, retry=False)
        async with gen.background(max_s=50) as load, grpc.aio.insecure_channel(stack.target) as channel:
            await asyncio.sleep(0.5)
            garbage_replies: list[tuple[str, str]] = []
            for start in range(0, len(payloads), 16):            # 16 at a time, beside the good load
                garbage_replies += await asyncio.gather(*(send(channel, m, d) for m, d in payloads[start:start + 16]))
            id_replies = [await send(channel, m, r.SerializeToString()) for m, r, _ in wrong_ids]  # type: ignore[attr-defined]
            oversized_reply = await send(channel, "Prefetch", oversized)
            await asyncio.sleep(max(0.5, 3.0 - (time.monotonic() - t0)))     # at least 3 s of good load
        elapsed = time.monotonic() - t0
        counted = requests_total(metrics_port)
        status = await health_status(stack.target)
        log = stack.server.tail(10**8)

    parse_lines = [line for line in log.splitlines() if "could not be parsed" in line]
    tracebacks = stack.tracebacks()
    invalid = sum(n for (_, code), n in counted.items() if code == "INVALID_ARGUMENT")
    record("random or truncated bytes to each method", "test_bad_input",
           "INVALID_ARGUMENT that says the message could not be parsed, counted, logged without a traceback flood",
           load, garbage_sent=len(payloads), garbage_replies=dict(Counter(c for c, _ in garbage_replies)),
           over_max_message_bytes=oversized_reply[0], counted_invalid_argument=invalid,
           tracebacks_in_log=tracebacks, parse_failure_log_lines=len(parse_lines))  # fmt: skip
    record("NUL, control characters, trailing whitespace in ids", "test_bad_input",
           "INVALID_ARGUMENT naming the field (id grammar documented in the proto)", load,
           bad_id_requests=len(wrong_ids), bad_id_replies=dict(Counter(c for c, _ in id_replies)),
           tracebacks_in_log=tracebacks)  # fmt: skip

    # Every garbage message: INVALID_ARGUMENT saying so.
    assert len(payloads) > 300
    for (method, _), reply in zip(payloads, garbage_replies, strict=True):
        assert reply == ("INVALID_ARGUMENT", f"request: the message could not be parsed as recsvc.v1.{method}Request")
    # Every bad id: INVALID_ARGUMENT naming the field.
    for (_, _, field), (code, details) in zip(wrong_ids, id_replies, strict=True):
        assert code == "INVALID_ARGUMENT" and details.startswith(f"{field}: "), (field, code, details)
    assert oversized_reply[0] == "RESOURCE_EXHAUSTED", oversized_reply
    # Counted under their real code; nothing UNKNOWN, nothing else from the bad requests.
    assert invalid == len(payloads) + len(wrong_ids), counted
    assert not any(code in ("UNKNOWN", "INTERNAL") for _, code in counted), counted
    # The log: no traceback at all; parse failures throttled to about one line per method per interval.
    assert tracebacks == 0
    assert 1 <= len(parse_lines) <= 3 * (math.ceil(elapsed / UNPARSEABLE_LOG_INTERVAL_S) + 1), parse_lines
    assert all("Traceback" not in json.loads(line).get("exc", "") for line in parse_lines)
    # The good traffic did not notice, and the server is healthy.
    assert load.sent > 50 and load.failed_total == 0, load.failed
    assert status == "SERVING"

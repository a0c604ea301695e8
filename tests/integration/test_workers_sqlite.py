"""Worker processes on the embedded SQLite store: an event recorded through one worker reaches every
worker's answers within the change-feed poll, with no Redis anywhere."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from ..support import free_port
from .conftest import Stack, start, wait_until

pytestmark = pytest.mark.integration

POLL_S = 0.1
CHANNELS = 12


def _copy_store(stack: Stack, data_dir: Path) -> None:
    """The session stack's histories, copied consistently (the backup API reads through its WAL)."""
    data_dir.mkdir(parents=True)
    src = sqlite3.connect(stack.tmp / "var" / "history.sqlite3")
    dst = sqlite3.connect(data_dir / "history.sqlite3")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def _recommend(channel: grpc.Channel, user: str) -> tuple[list[str], str]:
    call = pb_grpc.RecommenderStub(channel).Recommend.with_call(pb.RecommendRequest(user_id=user, k=10), timeout=10)
    reply, info = call
    assert not reply.degraded, reply.degraded_reason
    worker = dict(info.trailing_metadata() or ())["x-request-id"].split("-")[0]
    return [i.item_id for i in reply.items], worker


def test_an_event_through_one_worker_reaches_the_others_answers(stack: Stack, tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    _copy_store(stack, data_dir)
    port = free_port()
    env = {**stack.env, "RECSVC_DATA_DIR": str(data_dir), "RECSVC_WORKERS": "2", "RECSVC_PORT": str(port),
           "RECSVC_SQLITE_POLL_S": str(POLL_S), "RECSVC_L1_TTL_S": "600"}  # fmt: skip
    proc = start("workers", ["--log-format", "json", "serve"], env, tmp_path / "workers.log")
    target = f"127.0.0.1:{port}"
    # Separate connections (local subchannel pools), so SO_REUSEPORT spreads them over both workers.
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]
    try:
        wait_until(proc, lambda: proc.tail(10**6).count("recsvc listening on") == 2, 120, "two workers")
        user = "41"
        before = [_recommend(ch, user) for ch in channels]
        workers = {w for _, w in before}
        assert len(workers) == 2, "the connections all reached one worker"
        assert all(items == before[0][0] for items, _ in before)        # both cached the same history
        seen_item = before[0][0][0]
        # Recorded through one worker: the user has now seen the item, so no worker may recommend it.
        event = pb.Event(user_id=user, item_id=seen_item, type=pb.EVENT_TYPE_VIEW, event_id="workers-test-1")
        event.timestamp.GetCurrentTime()
        pb_grpc.RecommenderStub(channels[0]).RecordEvents(pb.RecordEventsRequest(events=[event]), timeout=10)
        time.sleep(POLL_S * 5)
        after = [_recommend(ch, user) for ch in channels]
        assert {w for _, w in after} == workers
        stale = [w for items, w in after if seen_item in items]
        assert stale == [], f"workers {stale} still recommend an item the user was recorded seeing"
    finally:
        for ch in channels:
            ch.close()
        assert proc.stop() == 0, proc.tail()
    assert "Traceback" not in proc.tail(10**6)

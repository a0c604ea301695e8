"""Row "an exception that is not a RecsvcError (a bug, ONNX Runtime, faiss)": INTERNAL with a request id.

The failure is a real one from ONNX Runtime, not a test hook: the published version's query encoder was
exported when the catalog had half as many items (the same graph, a shorter item table). It loads, and
it passes the load-time probe (an empty history), but ONNX Runtime's Gather fails at run time for every
user whose history holds one of the newer items; other users are served. The client must get INTERNAL
with ``internal error (request id X)`` (nothing of ONNX Runtime's message), the server must log each
failed call once under its request id with at most one traceback per interval (not one per request), and
``recsvc_requests_total`` must count them under INTERNAL.

(The unit-level counterpart, a fake ranker raising RuntimeError behind a real server, is
tests/unit/server/test_interceptors.py.)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
from onnx import numpy_helper

from recsvc.bundle import read_manifest, update_manifest
from recsvc.offline.data import Dataset
from recsvc.repository import publish
from recsvc.server.interceptors import REQUEST_ID_KEY, TRACEBACK_INTERVAL_S
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.faults.harness import LoadGen, fault_stack, health_status, record
from tests.faults.test_bad_input import requests_total
from tests.support import free_port


def encoder_for_a_smaller_catalog(bundle: Path, out: Path) -> int:
    """A copy of ``bundle`` whose query encoder's item table has half the rows; returns that row count."""
    shutil.copytree(bundle, out)
    num_items = read_manifest(out).num_items
    model = onnx.load(str(out / "query_encoder.onnx"))
    [table] = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == num_items]
    rows = num_items // 2
    table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(table)[:rows]), table.name))
    onnx.save(model, str(out / "query_encoder.onnx"))
    update_manifest(out)            # checksums as any bundle tool writes them: the files are what they say
    return rows


async def test_onnx_runtime_failure_is_internal_with_a_request_id(
    tmp_path: Path, fault_data: tuple[Path, Dataset]
) -> None:
    bundle, dataset = fault_data
    metrics_port = free_port()
    async with fault_stack(tmp_path, bundle, dataset, start_recsvc=False,
                           RECSVC_METRICS_PORT=str(metrics_port)) as stack:  # fmt: skip
        rows = encoder_for_a_smaller_catalog(bundle, tmp_path / "bundle-v2")
        assert publish(tmp_path / "bundle-v2", tmp_path / "repo") == 2
        stack.server, stack.target = await stack.start_server("server")

        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            # A new user (no history) is served: the version works until a newer item is in a history.
            assert len((await stub.Recommend(pb.RecommendRequest(user_id="brand-new", k=5), timeout=10)).items) == 5
            # The first failure, with an id of ours: its log line must carry the traceback.
            probe, answered = None, 0
            for i, user in enumerate(stack.users[:50]):
                call = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10,
                                      metadata=((REQUEST_ID_KEY, f"probe-{i}"),))  # fmt: skip
                try:
                    await call
                    answered += 1
                except grpc.aio.AioRpcError as exc:
                    probe = (f"probe-{i}", exc)
                    break
            assert probe is not None, "no user's history reached the items the encoder does not know"
            rid, exc = probe
            assert exc.code() == grpc.StatusCode.INTERNAL
            assert exc.details() == f"internal error (request id {rid})"
            assert dict(exc.trailing_metadata() or ())[REQUEST_ID_KEY] == rid

        t0 = time.monotonic()
        tally = await LoadGen(stack.target, stack.users, clients=16, retry=False).run(4.0)
        elapsed = time.monotonic() - t0
        counted = requests_total(metrics_port)
        status = await health_status(stack.target)
        log = [json.loads(line) for line in stack.server.tail(10**8).splitlines() if line.startswith("{")]

    internal_lines = [r for r in log if r["msg"].startswith("internal error in Recommend")]
    with_traceback = [r for r in internal_lines if "Traceback" in r.get("exc", "")]
    record("an exception that is not a RecsvcError (a bug, ONNX Runtime, faiss)", "test_internal_error",
           "INTERNAL with a request id, logged once with the traceback, counted under its real code", tally,
           trigger=f"query encoder exported for {rows} items, catalog has {2 * rows}: ONNX Runtime Gather fails",
           counted_internal=counted[("Recommend", "INTERNAL")], log_lines=len(internal_lines),
           tracebacks_in_log=len(with_traceback))  # fmt: skip

    failed = tally.failed["INTERNAL"]
    assert failed > 20 and tally.failed_total == failed, tally.failed      # nothing but INTERNAL failed
    assert tally.ok > 0                              # users without the newer items are still served
    # Counted under INTERNAL: the load's failures and the probe.
    assert counted[("Recommend", "INTERNAL")] == failed + 1, counted
    assert counted[("Recommend", "OK")] == tally.ok + answered + 1, counted
    # Logged once per failed call, each under its own request id; the probe's line has the traceback.
    assert len(internal_lines) == failed + 1
    assert len({r["request_id"] for r in internal_lines}) == failed + 1
    [probe_line] = [r for r in internal_lines if r["request_id"] == rid]
    assert "Traceback" in probe_line["exc"] and "onnxruntime" in probe_line["exc"]
    # ... and no traceback flood: at most one per interval (one kind of failure here).
    assert 1 <= len(with_traceback) <= math.ceil(elapsed / TRACEBACK_INTERVAL_S) + 1
    assert stack.tracebacks() == len(with_traceback)
    assert status == "SERVING"

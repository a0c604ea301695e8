"""Model updates as a non-event: publish, roll back, a broken version, a Triton restart, all under load.

A real tritonserver (EXPLICIT mode) and `recsvc serve`; `recsvc publish` / `recsvc rollback` run as the
operator would run them. 32 concurrent clients send Recommend calls the whole time and every call must
succeed with a (model, index) version pair that was published together.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from recsvc.bundle import read_manifest
from recsvc.offline.catalog_update import update_catalog
from recsvc.offline.data import Split
from recsvc.repository.rollout import read_serving
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.broken_models import broken_bundle

from .conftest import Stack, running_stack, start, triton_ready, wait_until

pytestmark = pytest.mark.integration


def _index_version(bundle: Path) -> str:
    return read_manifest(bundle).files["item_embeddings.npy"][:12]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory: pytest.TempPathFactory, movielens_split: Split, movielens_bundle: Path) -> Iterator[
        Stack]:  # fmt: skip
    with running_stack(tmp_path_factory.mktemp("rollout"), movielens_split, movielens_bundle,
                       RECSVC_REPOSITORY_POLL_S="0.2", RECSVC_WARM_USERS="0") as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def users(movielens_split: Split) -> list[str]:
    return [str(u) for u in movielens_split.train.user_ids[:300]]


class Load:
    """Concurrent Recommend callers recording every outcome with its latency."""

    def __init__(self, target: str, users: list[str], clients: int = 32) -> None:
        self.target, self.users, self.clients = target, users, clients
        self.ok: list[tuple[float, float, str, str, bool]] = []     # (end time, latency, model, index, degraded)
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    r = await stub.Recommend(pb.RecommendRequest(user_id=rng.choice(self.users), k=10), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                now = time.perf_counter()
                self.ok.append((now, now - t, r.model_version, r.index_version, r.degraded))

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        await asyncio.sleep(1.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def latest_version(self) -> str | None:
        return self.ok[-1][2] if self.ok else None


async def _recsvc(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "recsvc.cli", "--log-format", "text", *args,
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def _until(predicate, limit_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_three_publishes_and_a_rollback_under_load(
    rollouts: Stack, users: list[str], movielens_bundle: Path, tmp_path: Path
) -> None:
    variant = tmp_path / "variant"
    new_items = pd.DataFrame({"item_id": ["NEW-1", "NEW-2"], "category": ["Drama"] * 2})
    update_catalog(movielens_bundle, variant, add=new_items)
    plan = [("2", movielens_bundle), ("3", variant), ("4", movielens_bundle)]
    index_of = {"1": _index_version(movielens_bundle)}        # model version -> index published with it
    for version, bundle in plan:
        index_of[version] = _index_version(bundle)
    async with Load(rollouts.target, users) as load:
        started = time.perf_counter()
        for version, bundle in plan:
            code, out = await _recsvc(rollouts.env, "publish", str(bundle), "--drain-s", "1")
            assert code == 0, out
            assert f"version {version} is serving" in out
            await _until(lambda v=version: load.latest_version() == v, 30, f"the service on version {version}")
            await asyncio.sleep(1.5)
        code, out = await _recsvc(rollouts.env, "rollback", "--drain-s", "1")
        assert code == 0, out
        await _until(lambda: load.latest_version() == "3", 30, "the service back on version 3")
        await asyncio.sleep(1.5)
        finished = time.perf_counter()

    assert not load.failures, f"{len(load.failures)} failed requests, e.g. {load.failures[:3]}"
    window = [r for r in load.ok if started <= r[0] <= finished]
    rate = len(window) / (finished - started)
    latencies = np.array([r[1] for r in window])
    p50, p99 = np.percentile(latencies, 50) * 1e3, np.percentile(latencies, 99) * 1e3
    print(f"\nunder load during 3 publishes + 1 rollback: {len(window)} requests in {finished - started:.1f} s "
          f"({rate:.0f}/s), p50 {p50:.1f} ms, p99 {p99:.1f} ms, 0 failed")  # fmt: skip
    assert rate >= 100, f"the load was too light to mean anything: {rate:.0f} requests/s"
    assert {r[2] for r in load.ok} >= {"1", "2", "3", "4"}
    for _, _, model, index, degraded in load.ok:
        assert index_of[model] == index, f"model {model} answered with index {index}"
        assert not degraded
    state = read_serving(rollouts.tmp / "repo", "ranker")
    assert state is not None and (state.version, state.previous, state.loaded) == (3, 4, (3,))


async def test_a_broken_version_is_refused_and_nothing_fails(
    rollouts: Stack, users: list[str], movielens_bundle: Path, tmp_path: Path
) -> None:
    before = read_serving(rollouts.tmp / "repo", "ranker")
    assert before is not None
    broken = broken_bundle(movielens_bundle, tmp_path / "broken")
    async with Load(rollouts.target, users, clients=16) as load:
        code, out = await _recsvc(rollouts.env, "publish", str(broken), "--drain-s", "1")
        await asyncio.sleep(1.5)
    # Refused before Triton ever loads it: the pre-flight runs the model here first.
    assert code == 2 and f"refused before loading, {before.version} keeps serving" in out, out
    assert "SCORES shape" in out, out
    after = read_serving(rollouts.tmp / "repo", "ranker")
    assert after is not None and after.version == before.version and after.loaded == before.loaded
    assert after.refused and after.refused[-1] > before.version
    assert not load.failures and all(r[2] == str(before.version) and not r[4] for r in load.ok)


async def test_triton_restart_is_recovered_without_operator_action(rollouts: Stack, users: list[str]) -> None:
    async with Load(rollouts.target, users, clients=8) as load:
        # A crash: tritonserver itself is killed. `recsvc triton` would restart it by itself (that is
        # tests/faults/test_triton_crash.py); here the wrapper is stopped too, and an empty Triton started
        # below stands in for the chart's official image coming back after a crash.
        for pid in _children(rollouts.triton.popen.pid):
            os.kill(pid, signal.SIGKILL)
        rollouts.triton.popen.send_signal(signal.SIGTERM)
        await asyncio.to_thread(rollouts.triton.popen.wait, 30)
        killed_at = time.perf_counter()
        await _until(lambda: any(r[4] for r in load.ok if r[0] > killed_at), 30, "degraded answers, Triton down")
        # An official Triton image in EXPLICIT mode comes back with nothing loaded: recsvc must re-pin.
        rollouts.triton = start("triton-2", ["triton", "--no-models"], rollouts.env, rollouts.tmp / "triton-2.log")
        await asyncio.to_thread(wait_until, rollouts.triton, lambda: triton_ready(rollouts.env), 120, "tritonserver")
        back = time.perf_counter()
        await _until(lambda: any(not r[4] for r in load.ok if r[0] > back), 60, "undegraded answers again")
        healed = next(r[0] for r in load.ok if r[0] > back and not r[4])
        await asyncio.sleep(3.0)
    assert not load.failures, f"{len(load.failures)} failed requests, e.g. {load.failures[:3]}"
    print(f"\nTriton down to ranked answers again: {healed - killed_at:.1f} s ({healed - back:.1f} s after it was up)")
    recovered = [r for r in load.ok if r[0] > healed + 0.5]
    assert recovered and not any(r[4] for r in recovered)
    assert "loading it again" in rollouts.server.log.read_text()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out

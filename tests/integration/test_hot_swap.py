"""Hot swap under load: new item indexes (cold-start items, retired items) published while serving.

A real tritonserver and `recsvc serve` (polling the repository every 0.2 s); 16 concurrent clients send
Recommend calls the whole time. Three new versions are published, and the deny list changes, during
the load. Every call must succeed, undegraded, and report a (model, index) version pair that was
published together; nothing a version retired or the deny list denies is ever returned.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from recsvc.bundle import read_manifest
from recsvc.catalog import Catalog
from recsvc.deny import update_deny_list
from recsvc.offline.catalog_update import update_catalog
from recsvc.offline.data import Split
from recsvc.repository import publish
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from .conftest import Proc, running_stack

pytestmark = pytest.mark.integration


@dataclass
class Swapping:
    target: str
    repo: Path
    deny: Path
    bundles: dict[str, Path] = field(default_factory=dict)     # version -> bundle published as it
    server: Proc | None = None


@pytest.fixture(scope="module")
def swapping(tmp_path_factory: pytest.TempPathFactory, movielens_split: Split, movielens_bundle: Path) -> Iterator[
        Swapping]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("swap")
    with running_stack(tmp, movielens_split, movielens_bundle, RECSVC_REPOSITORY_POLL_S="0.2",
                       RECSVC_DENY_POLL_S="0.2", RECSVC_WARM_USERS="0") as running:  # fmt: skip
        yield Swapping(running.target, tmp / "repo", tmp / "var" / "deny_list.txt", {"1": movielens_bundle},
                       running.server)  # fmt: skip


def _index_version(bundle: Path) -> str:
    return read_manifest(bundle).files["item_embeddings.npy"][:12]


async def test_three_swaps_and_a_deny_list_change_under_load_fail_nothing(
    swapping: Swapping, movielens_split: Split, tmp_path: Path
) -> None:
    base = swapping.bundles["1"]
    catalog = Catalog.read(base / "items.parquet")
    popularity = np.load(base / "popularity.npy")
    top = [catalog.sku(int(i)) for i in np.argsort(-popularity)[:40]]
    genre = str(catalog.categories[int(np.argmax(popularity))])
    users = [str(u) for u in movielens_split.train.user_ids[:300]]

    # v2: five cold-start items; v3: v2 with the 20 most popular items retired; v4: the original again.
    update_catalog(base, tmp_path / "v2", add=pd.DataFrame(
        {"item_id": [f"NEW-{i}" for i in range(5)], "title": ["new"] * 5, "category": [genre] * 5}))  # fmt: skip
    retired = top[:20]
    update_catalog(tmp_path / "v2", tmp_path / "v3", retire=retired)
    plan = [tmp_path / "v2", tmp_path / "v3", base]
    pairs = {"1": _index_version(base)}
    for version, bundle in zip(("2", "3", "4"), plan, strict=True):
        pairs[version] = _index_version(bundle)
    denied = top[20:30]

    responses: list[tuple[float, str, str, bool, tuple[str, ...]]] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with grpc.aio.insecure_channel(swapping.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            while not stop.is_set():
                try:
                    reply = await stub.Recommend(pb.RecommendRequest(user_id=rng.choice(users), k=10), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                responses.append((time.monotonic(), reply.model_version, reply.index_version, reply.degraded,
                                  tuple(i.item_id for i in reply.items)))  # fmt: skip

    async def wait_for_version(version: str, limit_s: float = 90) -> float:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if responses and responses[-1][1] == version:
                return time.monotonic()
            await asyncio.sleep(0.1)
        raise AssertionError(f"never switched to version {version}; last {responses[-1][1] if responses else None}")

    clients = [asyncio.create_task(client(i)) for i in range(16)]
    try:
        await asyncio.sleep(2)
        for version, bundle in zip(("2", "3", "4"), plan, strict=True):
            published = await asyncio.to_thread(publish, bundle, swapping.repo)
            assert str(published) == version
            await wait_for_version(version)
            if version == "3":
                await asyncio.to_thread(update_deny_list, swapping.deny, add=denied)
                deny_written = time.monotonic()
            await asyncio.sleep(2)       # steady load on the new version
    finally:
        stop.set()
        await asyncio.gather(*clients)

    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert len(responses) > 300
    by_version = collections.Counter(r[1] for r in responses)
    assert set(by_version) == {"1", "2", "3", "4"}, by_version
    for _, model, index, degraded, items in responses:
        assert pairs[model] == index, f"model {model} answered with index {index}, published with {pairs[model]}"
        assert not degraded
        assert len(items) == 10
        if model == "3":
            assert not set(items) & set(retired)
    # The deny list is in force within its poll interval (0.2 s) plus a request's time.
    after_deny = [r for r in responses if r[0] > deny_written + 1.0]
    assert after_deny and all(not set(r[4]) & set(denied) for r in after_deny)
    # The cold-start items of v2 were served to someone (they sit at their genre's centre).
    assert any(i.startswith("NEW-") for r in responses if r[1] in ("2", "3") for i in r[4])

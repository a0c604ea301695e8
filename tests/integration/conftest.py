"""Real processes: the bundled tritonserver (`recsvc triton`) and the server (`recsvc serve`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsvc.catalog import Catalog
from recsvc.config import Settings
from recsvc.history import SqliteHistoryStore
from recsvc.offline.data import Split, load_movielens, time_split
from recsvc.offline.models.train import TrainConfig, train, write_bundle
from recsvc.repository import publish
from tests.processes import Proc, http_ok, stack_env, start, start_server, triton_ready, wait_until
from tests.support import free_port

__all__ = ["Proc", "Stack", "free_port", "http_ok", "running_stack", "stack_env", "start", "start_server",
           "triton_ready", "wait_until"]

# Short training: enough to beat popularity clearly (see docs/EVALUATION.md for the full run).
# Co-occurrence lists rather than EASE^R's (two dense 9k x 9k inverses, ~1.5 min on 2 cores): the tests
# check that the service serves what was trained, not which lists are best.
FAST = TrainConfig(retrieval_epochs=3, ranker_epochs=1, seed=0, i2i_method="cooccurrence")


@dataclass
class Stack:
    """A running recsvc + Triton over a MovieLens bundle, with the data it was trained on."""

    target: str
    env: dict[str, str]
    split: Split
    catalog: Catalog
    bundle: Path
    triton: Proc
    server: Proc
    tmp: Path


@pytest.fixture(scope="session")
def movielens_split() -> Split:
    return time_split(load_movielens(), test_per_user=5)


@pytest.fixture(scope="session")
def movielens_bundle(tmp_path_factory: pytest.TempPathFactory, movielens_split: Split) -> Path:
    out = tmp_path_factory.mktemp("ml-bundle")
    write_bundle(train(movielens_split.train, FAST, progress=False), movielens_split.train, out)
    return out


@contextlib.contextmanager
def running_stack(tmp: Path, split: Split, bundle: Path, **settings: str) -> Iterator[Stack]:
    """Publish ``bundle``, seed the SQLite store with ``split``'s training events, run Triton and the server.

    ``settings`` are extra RECSVC_* variables for both (e.g. RECSVC_REPOSITORY_POLL_S="0.2").
    """
    env = {**stack_env(tmp, free_port()), **settings}
    version = publish(bundle, tmp / "repo")
    catalog = Catalog.read(tmp / "repo" / "ranker" / str(version) / "bundle" / "items.parquet")

    async def seed() -> None:
        # The server's history store holds exactly the training interactions, so what it serves can
        # be compared with the offline evaluation of the same bundle.
        store = await SqliteHistoryStore.open(tmp / "var" / "history.sqlite3", keep=Settings().history_keep)
        await store.bulk_append(split.train.event_rows())
        await store.close()

    asyncio.run(seed())
    triton = start("triton", ["triton"], env, tmp / "triton.log")
    server = None
    stack = None
    try:
        wait_until(triton, lambda: triton_ready(env), 120, "tritonserver")
        server, target = start_server(env, tmp)
        stack = Stack(target, env, split, catalog, bundle, triton, server, tmp)
        yield stack
    finally:
        if server is not None:
            server.stop()
        # A test may have replaced Triton (a restart): stop whichever runs now.
        (stack.triton if stack is not None else triton).stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, movielens_split: Split, movielens_bundle: Path) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack"), movielens_split, movielens_bundle) as running:
        yield running

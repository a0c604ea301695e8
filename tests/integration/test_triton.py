"""The real bundled tritonserver serving a published tiny bundle through TritonRanker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from recsvc.errors import RankerUnavailable
from recsvc.offline.triton_server import TritonOptions, TritonServer
from recsvc.ranking import OnnxRanker, TritonRanker
from recsvc.ranking.tiny import reference_scores
from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle
from tests.integration.triton_fixture import running_triton
from tests.support import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NUM_ITEMS, L, C = 300, 50, 100
TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_bundle(directory: Path, seed: int) -> tuple[Path, np.ndarray]:
    write_tiny_bundle(directory, num_items=NUM_ITEMS, dim=16, history_len=L, num_candidates=C, seed=seed)
    return directory, np.load(directory / "item_embeddings.npy")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("triton")


@pytest.fixture(scope="module")
def v1(workdir: Path) -> tuple[Path, np.ndarray]:
    return make_bundle(workdir / "bundle-1", seed=1)


@pytest.fixture(scope="module")
def repository(workdir: Path, v1: tuple[Path, np.ndarray]) -> Path:
    assert publish(v1[0], workdir / "repo") == 1
    return workdir / "repo"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triton(repository: Path) -> AsyncIterator[str]:
    async with running_triton(repository) as (_, url):
        yield url


@pytest_asyncio.fixture(loop_scope="module")
async def ranker(triton: str) -> AsyncIterator[TritonRanker]:
    ranker = TritonRanker(triton, timeout_s=10.0)  # generous: CI machines are slow and shared
    yield ranker
    await ranker.close()


def random_batch(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    history = np.full((rows, L), -1, dtype=np.int64)
    for row in range(rows):
        n = int(rng.integers(0, L + 1))
        if n:
            history[row, -n:] = rng.integers(0, NUM_ITEMS, size=n)
    candidates = rng.integers(0, NUM_ITEMS, size=(rows, C))
    candidates[:, C - int(rng.integers(0, 10)) :] = -1
    return history, candidates


async def test_model_is_ready_at_the_published_version(ranker: TritonRanker) -> None:
    assert await ranker.is_server_ready()
    assert await ranker.is_model_ready("1")
    assert not await ranker.is_model_ready("9")


async def test_scores_equal_onnx_runtime_and_the_reference(
    ranker: TritonRanker, repository: Path, v1: tuple[Path, np.ndarray]
) -> None:
    onnx_ranker = OnnxRanker(repository / "ranker" / "1" / "model.onnx", version="1")
    for seed, rows in [(0, 1), (1, 3)]:
        history, candidates = random_batch(seed, rows)
        scores = await ranker.score(history, candidates, version="1")
        assert scores.dtype == np.float32 and scores.shape == (rows, C)
        np.testing.assert_allclose(scores, await onnx_ranker.score(history, candidates, version="1"), **TOL)
        np.testing.assert_allclose(scores, reference_scores(v1[1], history, candidates), **TOL)


async def test_concurrent_calls_all_succeed_and_match(ranker: TritonRanker, v1: tuple[Path, np.ndarray]) -> None:
    batches = [random_batch(100 + i, 1) for i in range(50)]
    results = await asyncio.gather(*(ranker.score(h, c, version="1") for h, c in batches))
    for (history, candidates), scores in zip(batches, results, strict=True):
        np.testing.assert_allclose(scores, reference_scores(v1[1], history, candidates), **TOL)


async def test_batches_above_max_batch_size_are_split(ranker: TritonRanker, v1: tuple[Path, np.ndarray]) -> None:
    history, candidates = random_batch(7, 150)  # config max_batch_size is 64
    scores = await ranker.score(history, candidates, version="1")
    np.testing.assert_allclose(scores, reference_scores(v1[1], history, candidates), **TOL)


async def test_unknown_version_raises_ranker_unavailable(ranker: TritonRanker) -> None:
    with pytest.raises(RankerUnavailable, match="version 9 is not found"):
        await ranker.score(*random_batch(8, 1), version="9")


async def test_rejected_input_raises_ranker_unavailable(ranker: TritonRanker) -> None:
    history, candidates = random_batch(9, 1)
    candidates[0, 0] = NUM_ITEMS  # the backend checks ids against the manifest
    with pytest.raises(RankerUnavailable, match=r"INVALID_ARGUMENT.*outside"):
        await ranker.score(history, candidates, version="1")


async def test_new_version_loads_beside_the_previous_one(
    ranker: TritonRanker, repository: Path, workdir: Path, v1: tuple[Path, np.ndarray]
) -> None:
    bundle2, embeddings2 = make_bundle(workdir / "bundle-2", seed=2)
    assert publish(bundle2, repository) == 2
    await ranker.load_model()  # explicit mode: rescan, load the newest two
    assert await ranker.is_model_ready("2") and await ranker.is_model_ready("1")
    history, candidates = random_batch(10, 2)
    new, old = await asyncio.gather(
        ranker.score(history, candidates, version="2"), ranker.score(history, candidates, version="1")
    )
    np.testing.assert_allclose(new, reference_scores(embeddings2, history, candidates), **TOL)
    np.testing.assert_allclose(old, reference_scores(v1[1], history, candidates), **TOL)


async def test_after_the_server_stops_score_raises_ranker_unavailable(repository: Path, workdir: Path) -> None:
    history, candidates = random_batch(11, 1)
    async with running_triton(repository, log_path=workdir / "stopped.log") as (server, url):
        ranker = TritonRanker(url, timeout_s=10.0)
        await ranker.score(history, candidates, version="1")
        assert await server.stop() == 0
        with pytest.raises(RankerUnavailable, match="UNAVAILABLE"):
            await ranker.score(history, candidates, version="1")
        assert not await ranker.is_server_ready()
        await ranker.close()


async def test_start_up_failure_is_reported_with_the_cause(workdir: Path) -> None:
    empty = workdir / "empty-repo"
    (empty / "ranker").mkdir(parents=True)
    (empty / "ranker" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 8\n')
    grpc_port, http_port, metrics_port = free_ports(3)
    server = TritonServer(
        TritonOptions(model_repository=empty, log_path=workdir / "failed.log", grpc_port=grpc_port,
                      http_port=http_port, metrics_port=metrics_port, startup_timeout_s=60.0)
    )  # fmt: skip
    with pytest.raises(RankerUnavailable, match="exited with status 1 during start-up") as info:
        await server.start()
    # The error lines name the cause (a model with no version to load), not Triton's closing table.
    assert "failed to load model 'ranker': at least one version must be available" in str(info.value)
    assert "CudaDriverHelper" not in str(info.value)  # harmless on CPU, filtered
    assert "+----" not in str(info.value)
    assert server.pid is None

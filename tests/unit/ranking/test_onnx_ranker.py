from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from recsvc.errors import BundleError, InvalidArgument, RankerUnavailable
from recsvc.ranking import PADDING_SCORE, OnnxRanker, Ranker
from recsvc.ranking.tiny import (
    random_embeddings,
    reference_query,
    reference_scores,
    write_tiny_query_encoder,
    write_tiny_ranker,
)

NUM_ITEMS, DIM, L, C = 50, 8, 10, 12


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    return random_embeddings(NUM_ITEMS, DIM, seed=11)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, embeddings: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "ranker.onnx"
    write_tiny_ranker(path, embeddings)
    return path


@pytest.fixture
def ranker(model_path: Path) -> OnnxRanker:
    return OnnxRanker(model_path, version="3")


def random_batch(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    history = rng.integers(-1, NUM_ITEMS, size=(rows, L))
    candidates = rng.integers(-1, NUM_ITEMS, size=(rows, C))
    history[0, : L // 2] = -1  # left padding, as the service sends it
    return history, candidates


def test_onnx_ranker_is_a_ranker(ranker: OnnxRanker) -> None:
    _: Ranker = ranker


def test_reference_is_what_the_formula_says(embeddings: np.ndarray) -> None:
    history = np.array([[-1, -1, 2, 5]])
    candidates = np.array([[7, -1]])
    query = (embeddings[2] + embeddings[5]) / 2
    np.testing.assert_allclose(reference_query(embeddings, history)[0], query, rtol=1e-6)
    scores = reference_scores(embeddings, history, candidates)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores[0, 0], embeddings[7] @ query, rtol=1e-5)
    assert scores[0, 1] == np.float32(PADDING_SCORE)


async def test_scores_equal_the_numpy_reference(ranker: OnnxRanker, embeddings: np.ndarray) -> None:
    history, candidates = random_batch(0, 5)
    scores = await ranker.score(history, candidates, version="3")
    assert scores.dtype == np.float32 and scores.shape == (5, C)
    np.testing.assert_allclose(scores, reference_scores(embeddings, history, candidates), rtol=1e-5, atol=1e-6)


async def test_empty_history_and_padding(ranker: OnnxRanker, embeddings: np.ndarray) -> None:
    history = np.full((2, L), -1, dtype=np.int64)
    candidates = np.full((2, C), -1, dtype=np.int64)
    candidates[:, :3] = [1, 2, 3]
    scores = await ranker.score(history, candidates, version="3")
    np.testing.assert_array_equal(scores[:, :3], 0.0)
    np.testing.assert_array_equal(scores[:, 3:], np.float32(PADDING_SCORE))


async def test_int32_ids_are_accepted(ranker: OnnxRanker, embeddings: np.ndarray) -> None:
    history, candidates = random_batch(1, 2)
    scores = await ranker.score(history.astype(np.int32), candidates.astype(np.int32), version="3")
    np.testing.assert_allclose(scores, reference_scores(embeddings, history, candidates), rtol=1e-5, atol=1e-6)


async def test_concurrent_calls_run_off_the_event_loop(ranker: OnnxRanker, embeddings: np.ndarray) -> None:
    batches = [random_batch(seed, 1) for seed in range(20)]
    results = await asyncio.gather(*(ranker.score(h, c, version="3") for h, c in batches))
    for (history, candidates), scores in zip(batches, results, strict=True):
        np.testing.assert_allclose(scores, reference_scores(embeddings, history, candidates), rtol=1e-5, atol=1e-6)


async def test_zero_rows_are_answered_locally(ranker: OnnxRanker) -> None:
    scores = await ranker.score(np.zeros((0, L), np.int64), np.zeros((0, C), np.int64), version="3")
    assert scores.shape == (0, C) and scores.dtype == np.float32


async def test_another_version_is_unavailable(ranker: OnnxRanker, model_path: Path) -> None:
    history, candidates = random_batch(2, 1)
    with pytest.raises(RankerUnavailable, match="serves version 3"):
        await ranker.score(history, candidates, version="4")
    any_version = OnnxRanker(model_path)
    assert (await any_version.score(history, candidates, version="whatever")).shape == (1, C)


async def test_closed_ranker_is_unavailable(ranker: OnnxRanker) -> None:
    await ranker.close()
    with pytest.raises(RankerUnavailable, match="closed"):
        await ranker.score(*random_batch(3, 1), version="3")


@pytest.mark.parametrize(
    ("history", "candidates", "field"),
    [
        (np.zeros(L, np.int64), np.zeros((1, C), np.int64), "history"),
        (np.zeros((1, L), np.int64), np.zeros((1, 1, C), np.int64), "candidates"),
        (np.zeros((2, L), np.int64), np.zeros((1, C), np.int64), "candidates"),
        (np.zeros((1, L), np.float32), np.zeros((1, C), np.int64), "history"),
    ],
)
async def test_malformed_batches_are_invalid_arguments(
    ranker: OnnxRanker, history: np.ndarray, candidates: np.ndarray, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await ranker.score(history, candidates, version="3")
    assert info.value.field == field


async def test_runtime_failure_is_unavailable(ranker: OnnxRanker) -> None:
    history, candidates = random_batch(4, 1)
    candidates[0, 0] = NUM_ITEMS + 100  # Gather index out of range inside ORT
    with pytest.raises(RankerUnavailable, match="failed"):
        await ranker.score(history, candidates, version="3")


def test_unreadable_model_is_a_bundle_error(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="cannot load ONNX model"):
        OnnxRanker(tmp_path / "bad.onnx")


def test_tiny_query_encoder_matches_its_reference(tmp_path: Path, embeddings: np.ndarray) -> None:
    write_tiny_query_encoder(tmp_path / "q.onnx", embeddings)
    history, _ = random_batch(5, 4)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    (query,) = session.run(["QUERY"], {"HISTORY": history})
    np.testing.assert_allclose(query, reference_query(embeddings, history), rtol=1e-5, atol=1e-6)

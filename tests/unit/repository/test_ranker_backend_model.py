"""The python-backend model (model.py in every version) run outside Triton, with a stand-in pb_utils."""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsvc.ranking.tiny import PADDING_SCORE, reference_scores
from recsvc.repository import publish, version_dir
from recsvc.repository.tiny_bundle import write_tiny_bundle

NUM_ITEMS, L, C = 40, 6, 9


@dataclass
class FakeTensor:
    name: str
    array: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeTritonError(Exception):
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code

    def message(self) -> str:
        return str(self)


@dataclass
class FakeResponse:
    output_tensors: list[FakeTensor]
    error: FakeTritonError | None = None


@dataclass
class FakeRequest:
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


def get_input_tensor_by_name(request: FakeRequest, name: str) -> FakeTensor | None:
    return FakeTensor(name, request.inputs[name]) if name in request.inputs else None


@pytest.fixture(scope="module")
def model_module() -> Iterator[Any]:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor  # type: ignore[attr-defined]
    fake.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    fake.TritonError = FakeTritonError  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = get_input_tensor_by_name  # type: ignore[attr-defined]
    sys.modules["triton_python_backend_utils"] = fake
    try:
        sys.modules.pop("recsvc.repository.ranker_model", None)
        yield importlib.import_module("recsvc.repository.ranker_model")
    finally:
        sys.modules.pop("recsvc.repository.ranker_model", None)
        del sys.modules["triton_python_backend_utils"]


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backend")
    write_tiny_bundle(root / "bundle", num_items=NUM_ITEMS, dim=5, history_len=L, num_candidates=C, seed=3)
    number = publish(root / "bundle", root / "repo")
    return version_dir(root / "repo", "ranker", number)


@pytest.fixture
def model(model_module: Any, version: Path) -> Any:
    instance = model_module.TritonPythonModel()
    config = {"parameters": {"ORT_INTRA_OP_THREADS": {"string_value": "1"}}}
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(version.parent),
            "model_version": version.name,
            "model_name": "ranker",
        }
    )
    yield instance
    instance.finalize()


@pytest.fixture
def embeddings(version: Path) -> np.ndarray:
    return np.load(version / "bundle" / "item_embeddings.npy")


def batch(rng: np.random.Generator, rows: int, cols_h: int = L, cols_c: int = C) -> FakeRequest:
    history = rng.integers(-1, NUM_ITEMS, size=(rows, cols_h))
    candidates = rng.integers(-1, NUM_ITEMS, size=(rows, cols_c))
    return FakeRequest({"HISTORY": history, "CANDIDATES": candidates})


def count_runs(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    rows: list[int] = []
    real = model.session

    class Counting:
        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
            rows.append(feeds["HISTORY"].shape[0])
            return real.run(outputs, feeds)

    monkeypatch.setattr(model, "session", Counting())
    return rows


def test_requests_of_equal_shape_share_one_run_and_get_their_own_rows(
    model: Any, embeddings: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    requests = [batch(rng, rows) for rows in (1, 3, 2)]
    runs = count_runs(model, monkeypatch)
    responses = model.execute(requests)
    assert runs == [6]
    for request, response in zip(requests, responses, strict=True):
        assert response.error is None
        [scores] = response.output_tensors
        assert scores.name == "SCORES" and scores.array.dtype == np.float32
        expected = reference_scores(embeddings, request.inputs["HISTORY"], request.inputs["CANDIDATES"])
        np.testing.assert_allclose(scores.array, expected, rtol=1e-5, atol=1e-6)


def test_requests_of_different_shapes_run_separately(
    model: Any, embeddings: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    requests = [batch(rng, 1), batch(rng, 2, cols_c=4), batch(rng, 1)]
    runs = count_runs(model, monkeypatch)
    responses = model.execute(requests)
    assert sorted(runs) == [2, 2]
    for request, response in zip(requests, responses, strict=True):
        expected = reference_scores(embeddings, request.inputs["HISTORY"], request.inputs["CANDIDATES"])
        np.testing.assert_allclose(response.output_tensors[0].array, expected, rtol=1e-5, atol=1e-6)


def test_padding_candidates_get_the_padding_score(model: Any) -> None:
    history = np.full((1, L), -1, dtype=np.int64)
    candidates = np.full((1, C), -1, dtype=np.int64)
    candidates[0, 0] = 4
    [response] = model.execute([FakeRequest({"HISTORY": history, "CANDIDATES": candidates})])
    scores = response.output_tensors[0].array
    assert scores[0, 0] == 0.0  # empty history: zero query vector
    assert np.all(scores[0, 1:] == np.float32(PADDING_SCORE))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"HISTORY": np.zeros((1, L), np.int64)}, "input CANDIDATES is missing"),
        ({"HISTORY": np.zeros((1, L), np.int32), "CANDIDATES": np.zeros((1, C), np.int64)}, "must be int64"),
        ({"HISTORY": np.zeros((1, L), np.int64), "CANDIDATES": np.full((1, C), NUM_ITEMS)}, "outside"),
        ({"HISTORY": np.full((1, L), -2), "CANDIDATES": np.zeros((1, C), np.int64)}, "outside"),
        ({"HISTORY": np.zeros((2, L), np.int64), "CANDIDATES": np.zeros((1, C), np.int64)}, "rows"),
    ],
)
def test_a_bad_request_gets_an_error_and_the_others_still_get_scores(
    model: Any, inputs: dict[str, np.ndarray], message: str
) -> None:
    rng = np.random.default_rng(2)
    good = batch(rng, 1)
    responses = model.execute([good, FakeRequest(inputs), good])
    assert responses[1].error is not None and message in responses[1].error.message()
    assert responses[1].error.code == FakeTritonError.INVALID_ARG
    assert responses[0].error is None and responses[2].error is None
    np.testing.assert_array_equal(responses[0].output_tensors[0].array, responses[2].output_tensors[0].array)


def test_a_failing_run_fails_only_its_group(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = model.session

    class FailsForWideCandidates:
        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
            if feeds["CANDIDATES"].shape[1] == 4:
                raise RuntimeError("boom")
            return real.run(outputs, feeds)

    monkeypatch.setattr(model, "session", FailsForWideCandidates())
    rng = np.random.default_rng(3)
    responses = model.execute([batch(rng, 1), batch(rng, 1, cols_c=4)])
    assert responses[0].error is None
    assert responses[1].error is not None and "boom" in responses[1].error.message()
    assert responses[1].error.code == FakeTritonError.INTERNAL

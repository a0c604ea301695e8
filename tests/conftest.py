"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from recsvc.offline.data import Dataset, generate_synthetic, time_split
from recsvc.offline.models.train import TrainConfig, Trained, train, write_bundle
from tests.redis_fixture import redis_cluster, redis_server  # noqa: F401  (session fixtures: real redis-server)

TINY_CONFIG = TrainConfig(dim=16, history_len=10, num_candidates=20, retrieval_epochs=10, ranker_epochs=3,
                          batch_size=128, lr=1e-2, ranker_dim=8, ranker_negatives=7, seed=0,
                          blend=False)  # fmt: skip
# The same with the item-to-item source and the blend stage (a bundle served through every stage).
TINY_BLEND_CONFIG = replace(TINY_CONFIG, blend=True, i2i_candidates=12, blend_epochs=20, validation_per_user=3)


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Each test starts with the root logger it would have alone.

    ``recsvc.cli.main`` points the root handler at the stderr of its moment; in a test that stream is the
    test's capture, closed after it: a later test that logs without calling main would write to it.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    """A small synthetic shop: 400 users, 120 items in a few categories."""
    return generate_synthetic(400, 120, num_categories=6, seed=7)


@pytest.fixture(scope="session")
def tiny_trained(tiny_dataset: Dataset) -> Trained:
    return train(time_split(tiny_dataset).train, TINY_CONFIG, progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Dataset, tiny_trained: Trained) -> Path:
    """A real bundle (ONNX files, embeddings, catalog, manifest) from the tiny models."""
    out = tmp_path_factory.mktemp("tiny-bundle")
    write_bundle(tiny_trained, time_split(tiny_dataset).train, out)
    return out


@pytest.fixture(scope="session")
def tiny_blend_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Dataset) -> Path:
    """A real bundle with the item-to-item source and the blend stage."""
    out = tmp_path_factory.mktemp("tiny-blend-bundle")
    split = time_split(tiny_dataset)
    write_bundle(train(split.train, TINY_BLEND_CONFIG, progress=False), split.train, out)
    return out

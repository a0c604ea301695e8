"""Fixtures shared by the pipeline's unit tests: the tiny bundle, published, and loaded for serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.pipeline import ServingBundle, load_serving_bundle


@pytest.fixture
def published(tmp_path: Path, tiny_bundle: Path) -> Path:
    from recsvc.repository import publish

    version = publish(tiny_bundle, tmp_path / "repo")
    return tmp_path / "repo" / "ranker" / str(version)


@pytest.fixture
def bundle(published: Path) -> ServingBundle:
    return load_serving_bundle(published, "1")

"""Fixtures shared by the pipeline's unit tests: the tiny bundle, published, and loaded for serving."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
def coalescer_timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every timeout the coalescer arms (asyncio.wait_for in recsvc.coalesce), in order."""
    import recsvc.coalesce

    timers: list[float] = []
    real_wait_for = asyncio.wait_for

    async def spy(aw, seconds):  # type: ignore[no-untyped-def]
        timers.append(seconds)
        return await real_wait_for(aw, seconds)

    monkeypatch.setattr(recsvc.coalesce.asyncio, "wait_for", spy)
    return timers

"""Fixtures shared by the pipeline's unit tests: the tiny bundle, published, and loaded for serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recsvc.pipeline import ServingBundle, load_serving_bundle


def publish_version(bundle_dir: Path, repo: Path) -> Path:
    """Publish ``bundle_dir`` into ``repo``; the new version's directory."""
    from recsvc.repository import publish

    return repo / "ranker" / str(publish(bundle_dir, repo))


@pytest.fixture
def published(tmp_path: Path, tiny_bundle: Path) -> Path:
    return publish_version(tiny_bundle, tmp_path / "repo")


@pytest.fixture
def bundle(published: Path) -> ServingBundle:
    return load_serving_bundle(published, "1")


@pytest.fixture
def blend_bundle(tmp_path: Path, tiny_blend_bundle: Path) -> ServingBundle:
    """The tiny bundle with the item-to-item source and the blend stage, published and loaded."""
    return load_serving_bundle(publish_version(tiny_blend_bundle, tmp_path / "repo"), "1")


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

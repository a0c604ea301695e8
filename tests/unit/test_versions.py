from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from cachetools import LRUCache

from recsvc.config import Settings
from recsvc.domain import RecommendQuery
from recsvc.errors import RankerUnavailable, Unavailable
from recsvc.history import InMemoryHistoryStore, TieredHistory
from recsvc.pipeline import Pipeline, ServingBundle, load_serving_bundle
from recsvc.ranking import FakeRanker
from recsvc.repository import publish
from recsvc.repository.rollout import ServingState, write_serving
from recsvc.repository.tiny_bundle import write_tiny_bundle
from recsvc.versions import VersionFollower


class Models:
    """Triton as the follower sees it: versions become ready when loaded."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.ready: set[str] = set()
        self.loads = 0
        self.down = False
        self.pinned: list[list[int]] = []

    async def is_model_ready(self, version: str = "") -> bool:
        if self.down:
            raise RankerUnavailable("triton down")
        return version in self.ready

    async def load_model(self, name: str | None = None) -> None:
        self.loads += 1
        self.ready |= {p.name for p in (self.repo / "ranker").iterdir() if p.name.isdigit()}

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        self.loads += 1
        self.pinned.append(sorted(versions))
        self.ready = {str(v) for v in versions}


class GatedRanker(FakeRanker):
    """Holds every score() call until ``gate`` is set, so a request can be caught in flight."""

    def __init__(self, scores: np.ndarray) -> None:
        super().__init__(scores)
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def score(self, history: np.ndarray, candidates: np.ndarray, *, version: str) -> np.ndarray:
        self.entered.set()
        await self.gate.wait()
        return await super().score(history, candidates, version=version)


@pytest.fixture
def repo(tmp_path: Path, tiny_bundle: Path) -> Path:
    publish(tiny_bundle, tmp_path / "repo")
    return tmp_path / "repo"


def _setup(repo: Path) -> tuple[Pipeline, GatedRanker, Models, VersionFollower]:
    settings = Settings(model_repository=repo, repository_poll_s=0, num_candidates=20, max_k=10,
                        request_timeout_s=1.0, grace_s=1.0)  # fmt: skip
    bundle = load_serving_bundle(repo / "ranker" / "1", "1", settings)
    ranker = GatedRanker(np.zeros(len(bundle.catalog), dtype=np.float32))
    pipeline = Pipeline(settings, TieredHistory(InMemoryHistoryStore(), l1=LRUCache(maxsize=10), limit=500),
                        ranker, bundle)  # fmt: skip
    models = Models(repo)
    models.ready.add("1")
    return pipeline, ranker, models, VersionFollower(pipeline, models, settings)


async def test_switch_waits_for_in_flight_requests_on_the_old_version(repo: Path, tiny_bundle: Path) -> None:
    pipeline, ranker, models, follower = _setup(repo)
    old = pipeline.bundle
    assert not await follower.check()                   # nothing newer
    publish(tiny_bundle, repo)
    ranker.gate.clear()
    in_flight = asyncio.create_task(pipeline.recommend(RecommendQuery("u", 5)))
    await ranker.entered.wait()
    assert old.in_flight == 1
    assert await follower.check()                       # loads v2 beside v1, asks Triton to load it, swaps
    assert pipeline.bundle.model_version == "2" and models.loads == 1
    fresh = await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(_unblocked(pipeline, ranker))), 5)
    assert fresh.model_version == "2"
    rec = await in_flight                               # finished on the version it started with
    assert rec.model_version == "1" and len(rec.items) == 5
    await follower.close()                              # the old bundle was retired once idle
    assert old.in_flight == 0
    assert old.retriever.num_items > 0
    with pytest.raises(Unavailable, match="closed"):      # its index is gone
        await old.retriever.search(np.zeros((1, old.manifest.dim), np.float32), 5, [np.empty(0, np.int64)])
    await pipeline.bundle.close()


async def test_a_retired_bundle_is_freed_although_the_start_up_objects_were_frozen(
    repo: Path, tiny_bundle: Path
) -> None:
    import gc
    import weakref

    pipeline, _, _, follower = _setup(repo)
    old = weakref.ref(pipeline.bundle)
    gc.collect()
    gc.freeze()                         # as the server does once its service is built
    try:
        publish(tiny_bundle, repo)
        assert await follower.check()
        await follower.close()          # the old bundle retired: everything unfrozen, a refreeze scheduled
        assert gc.get_freeze_count() == 0
        await asyncio.sleep(1.2)
        assert old() is None and gc.get_freeze_count() > 0      # collected, and the rest frozen again
    finally:
        gc.unfreeze()
        await pipeline.bundle.close()


async def _unblocked(pipeline: Pipeline, ranker: GatedRanker):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(pipeline.recommend(RecommendQuery("v", 5)))
    await asyncio.sleep(0.05)
    ranker.gate.set()
    return await task


async def test_broken_version_is_refused_once_and_the_next_good_one_is_taken(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, _, follower = _setup(repo)
    publish(tiny_bundle, repo)
    (repo / "ranker" / "2" / "bundle" / "item_embeddings.npy").write_bytes(b"corrupt")
    assert not await follower.check()
    assert pipeline.bundle.model_version == "1"
    assert not await follower.check()                   # remembered: not reloaded every poll
    follower._failed[2] = 0.0                           # ...but retried once its pause is over
    assert not await follower.check() and follower._failed[2] > 0.0
    publish(tiny_bundle, repo)
    assert await follower.check() and pipeline.bundle.model_version == "3"
    await follower.close()
    await pipeline.bundle.close()


async def test_a_version_with_fewer_candidates_than_the_setting_is_refused(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline, _, _, follower = _setup(repo)             # RECSVC_NUM_CANDIDATES=20, the tiny bundle's C
    write_tiny_bundle(tmp_path / "c10", num_items=120, history_len=10, num_candidates=10)
    publish(tmp_path / "c10", repo)
    assert not await follower.check()
    assert pipeline.bundle.model_version == "1"         # the current version keeps serving
    assert "num_candidates (RECSVC_NUM_CANDIDATES) is 20, more than the 10 candidates version 2's" in caplog.text
    await follower.close()
    await pipeline.bundle.close()


async def test_triton_not_ready_keeps_the_old_version_and_retries(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, models, follower = _setup(repo)
    publish(tiny_bundle, repo)
    models.down = True
    assert not await follower.check()
    assert pipeline.bundle.model_version == "1"
    models.down = False
    assert await follower.check() and pipeline.bundle.model_version == "2"
    await follower.close()
    await pipeline.bundle.close()


async def test_rollback_by_removing_the_newest_version_switches_back(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, _, follower = _setup(repo)
    publish(tiny_bundle, repo)
    assert await follower.check() and pipeline.bundle.model_version == "2"
    shutil.rmtree(repo / "ranker" / "2")
    assert await follower.check() and pipeline.bundle.model_version == "1"
    await follower.close()
    await pipeline.bundle.close()


async def test_polling_runs_in_an_owned_task(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, _, _ = _setup(repo)
    settings = pipeline.settings.with_overrides(repository_poll_s=0.05)
    follower = VersionFollower(pipeline, Models(repo), settings)
    follower.start()
    publish(tiny_bundle, repo)
    for _ in range(100):
        if pipeline.bundle.model_version == "2":
            break
        await asyncio.sleep(0.05)
    assert pipeline.bundle.model_version == "2" and follower.switches == 1
    await follower.close()
    await pipeline.bundle.close()


async def test_serving_json_decides_and_a_lost_version_is_pinned_again(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, models, follower = _setup(repo)
    publish(tiny_bundle, repo)
    publish(tiny_bundle, repo)
    write_serving(repo, "ranker", ServingState(version=2, loaded=(1, 2)))
    models.ready = {"1", "2"}
    assert await follower.check() and pipeline.bundle.model_version == "2"    # not 3: the rollout said 2
    assert not await follower.check()
    models.ready = set()                                   # Triton restarted: EXPLICIT mode loads nothing
    assert not await follower.check()
    assert follower.repins == 1 and models.pinned == [[1, 2]]               # exactly the rollout's set
    models.down = True                                     # unreachable: nothing to do but wait
    assert not await follower.check() and follower.repins == 1
    await follower.close()
    await pipeline.bundle.close()


class Boom(Exception):
    """Neither RecsvcError nor OSError nor ValueError: what a bug, ONNX Runtime or faiss may raise."""


async def test_a_load_failing_with_any_exception_is_refused_with_back_off_and_logged_once(
    repo: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline, _, models, _ = _setup(repo)
    calls: list[str] = []

    def loader(directory: Path, version: str, settings: Settings):  # type: ignore[no-untyped-def]
        calls.append(version)
        raise Boom("index is garbage")

    follower = VersionFollower(pipeline, models, pipeline.settings, loader=loader)
    publish(tiny_bundle, repo)
    with caplog.at_level("WARNING", logger="recsvc.versions"):
        for _ in range(5):                              # five polls: one load, not a reload storm
            assert not await follower.check()
    assert calls == ["2"] and pipeline.bundle.model_version == "1"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is not None and errors[0].exc_info[0] is Boom
    first_pause = follower._failed[2]
    follower._failed[2] = 0.0                           # its pause is over: tried again, and the pause doubles
    assert not await follower.check()
    assert calls == ["2", "2"] and follower._failed[2] - first_pause > 25.0
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1     # the traceback only once
    await follower.close()
    await pipeline.bundle.close()


async def test_a_bundle_loaded_for_a_switch_that_fails_is_closed(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, models, _ = _setup(repo)
    opened: list[ServingBundle] = []

    def loader(directory: Path, version: str, settings: Settings) -> ServingBundle:
        opened.append(load_serving_bundle(directory, version, settings))
        return opened[-1]

    class Broken(Models):
        async def is_model_ready(self, version: str = "") -> bool:
            if version == "2":
                raise Boom("tritonclient raised something unexpected")
            return await super().is_model_ready(version)

    broken = Broken(repo)
    broken.ready = models.ready
    follower = VersionFollower(pipeline, broken, pipeline.settings, loader=loader)
    publish(tiny_bundle, repo)
    assert not await follower.check()
    assert len(opened) == 1 and pipeline.bundle.model_version == "1"
    with pytest.raises(Unavailable, match="closed"):     # closed, not leaked
        await opened[0].retriever.search(np.zeros((1, opened[0].manifest.dim), np.float32), 5, [np.empty(0, np.int64)])
    assert not await follower.check() and len(opened) == 1     # refused for a while
    await follower.close()
    await pipeline.bundle.close()


async def test_a_damaged_serving_version_is_not_pinned_again(repo: Path, tiny_bundle: Path) -> None:
    from tests.broken_models import damage_model

    pipeline, _, models, follower = _setup(repo)
    write_serving(repo, "ranker", ServingState(version=1, loaded=(1,)))
    damage_model(repo / "ranker" / "1" / "model.onnx", "overwrite")
    models.ready = set()                                # Triton restarted and lost it
    assert not await follower.check()
    assert models.pinned == [] and follower.repins == 1  # refused, not loaded
    assert not await follower.check() and follower.repins == 1     # not re-hashed at every poll
    assert pipeline.bundle.model_version == "1"          # still answering (unranked until it is fixed)
    await follower.close()
    await pipeline.bundle.close()


def _counting_loader(opened: list[ServingBundle]):  # type: ignore[no-untyped-def]
    def loader(directory: Path, version: str, settings: Settings) -> ServingBundle:
        opened.append(load_serving_bundle(directory, version, settings))
        return opened[-1]

    return loader


async def _is_closed(bundle: ServingBundle) -> bool:
    try:
        await bundle.retriever.search(np.zeros((1, bundle.manifest.dim), np.float32), 5, [np.empty(0, np.int64)])
    except Unavailable:
        return True
    return False


async def test_a_triton_outage_loads_the_new_version_once_not_at_every_poll(repo: Path, tiny_bundle: Path) -> None:
    pipeline, _, models, _ = _setup(repo)
    opened: list[ServingBundle] = []
    follower = VersionFollower(pipeline, models, pipeline.settings, loader=_counting_loader(opened))
    publish(tiny_bundle, repo)
    models.down = True                                  # Triton down: RankerUnavailable at every question
    for _ in range(5):                                  # five polls: one load, not a reload storm
        assert not await follower.check()
    assert len(opened) == 1 and pipeline.bundle.model_version == "1"
    assert not await _is_closed(opened[0])              # kept loaded for when Triton is back
    models.down = False
    assert await follower.check() and pipeline.bundle.model_version == "2"
    assert len(opened) == 1 and pipeline.bundle is opened[0]    # switched with the bundle it had kept
    await follower.close()
    await pipeline.bundle.close()


async def test_a_bundle_kept_for_triton_is_closed_when_the_repository_moves_on_or_the_follower_closes(
    repo: Path, tiny_bundle: Path
) -> None:
    pipeline, _, models, _ = _setup(repo)
    opened: list[ServingBundle] = []
    follower = VersionFollower(pipeline, models, pipeline.settings, loader=_counting_loader(opened))
    publish(tiny_bundle, repo)
    models.down = True
    assert not await follower.check() and len(opened) == 1
    shutil.rmtree(repo / "ranker" / "2")                # rolled back while it waited: not wanted any more
    assert not await follower.check()
    assert await _is_closed(opened[0]) and pipeline.bundle.model_version == "1"
    publish(tiny_bundle, repo)                          # version 2 again (a new one): loaded, waits, ...
    assert not await follower.check() and len(opened) == 2
    await follower.close()                              # ... and is closed with the follower
    assert await _is_closed(opened[1]) and not await _is_closed(pipeline.bundle)
    await pipeline.bundle.close()


async def test_the_version_just_loaded_is_not_hashed_again_to_pin_it(
    repo: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recsvc.versions as versions

    hashed: list[list[int]] = []
    real = versions.pinnable_versions

    def recording(repository: Path, model: str, wanted: Sequence[int]) -> list[int]:
        hashed.append(list(wanted))
        return real(repository, model, wanted)

    monkeypatch.setattr(versions, "pinnable_versions", recording)
    pipeline, _, models, follower = _setup(repo)
    publish(tiny_bundle, repo)
    write_serving(repo, "ranker", ServingState(version=2, loaded=(1, 2)))
    assert await follower.check() and pipeline.bundle.model_version == "2"
    assert models.pinned == [[1, 2]]                     # still exactly the rollout's set ...
    assert hashed == [[1]]                               # ... but 2 was checked by the loader, not twice
    await follower.close()
    await pipeline.bundle.close()

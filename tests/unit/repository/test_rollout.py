from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from recsvc.bundle import PADDING_SCORE
from recsvc.errors import ConfigError
from recsvc.ranking import OnnxRanker
from recsvc.repository import publish
from recsvc.repository.rollout import (
    RolloutError,
    check_canary,
    read_serving,
    rollout,
    rollout_lock,
)
from recsvc.repository.tiny_bundle import write_tiny_bundle
from tests.broken_models import broken_bundle


class FakeTriton:
    """Triton as the rollout sees it: explicit version sets, readiness, inference through ONNX Runtime."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.loaded: set[int] = set()
        self.loads: list[list[int]] = []
        self.up = True
        self.never_ready: set[int] = set()

    async def is_server_ready(self) -> bool:
        return self.up

    async def loaded_versions(self) -> set[int]:
        return {v for v in self.loaded if v not in self.never_ready}

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        assert "backend" in config_pbtxt
        self.loads.append(sorted(versions))
        self.loaded = set(versions)

    async def is_model_ready(self, version: str = "") -> bool:
        return int(version) in self.loaded and int(version) not in self.never_ready

    async def score(self, history: np.ndarray, candidates: np.ndarray, *, version: str) -> np.ndarray:
        assert int(version) in self.loaded
        ranker = OnnxRanker(self.repo / "ranker" / version / "model.onnx")
        return await ranker.score(history, candidates, version=version)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_tiny_bundle(out)
    return out


async def test_rollout_loads_beside_checks_switches_then_unloads_the_old(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    publish(bundle, repo)
    triton = FakeTriton(repo)
    with rollout_lock(repo, "ranker"):
        report = await rollout(repo, "ranker", 2, triton, triton, drain_s=0)
    state = read_serving(repo, "ranker")
    assert state is not None and (state.version, state.previous, state.loaded) == (2, 1, (2,))
    assert triton.loads == [[1, 2], [2]]               # both loaded during the switch, then only the new one
    assert [name for name, _ in report.steps][:4] == [
        "pre-flight passed (ONNX Runtime here)", "loaded beside the current version", "ready", "canary passed"]

    # Rollback is a rollout to the previous version.
    await rollout(repo, "ranker", 1, triton, triton, drain_s=0)
    state = read_serving(repo, "ranker")
    assert state is not None and (state.version, state.previous, state.loaded) == (1, 2, (1,))
    assert triton.loads[-2:] == [[1, 2], [1]]


async def test_broken_version_is_refused_and_the_current_one_keeps_serving(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    publish(bundle, repo)
    triton = FakeTriton(repo)
    await rollout(repo, "ranker", 2, triton, triton, drain_s=0)
    publish(broken_bundle(bundle, tmp_path / "broken"), repo)       # static checks pass
    loads = len(triton.loads)
    with pytest.raises(RolloutError, match=r"version 3 refused before loading, 2 keeps serving: canary: SCORES shape "
                                           r"\(8, 101\), expected \(8, 100\)"):  # fmt: skip
        await rollout(repo, "ranker", 3, triton, triton, drain_s=0)
    state = read_serving(repo, "ranker")
    assert state is not None and (state.version, state.loaded, state.refused) == (2, (2,), (3,))
    assert len(triton.loads) == loads and triton.loaded == {2}     # Triton never saw the broken version


async def test_a_version_failing_only_inside_triton_is_unloaded_again(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    for _ in range(3):
        publish(bundle, repo)
    triton = FakeTriton(repo)
    await rollout(repo, "ranker", 2, triton, triton, drain_s=0)
    real_score = triton.score

    async def garbled(history: np.ndarray, candidates: np.ndarray, *, version: str) -> np.ndarray:
        scores = await real_score(history, candidates, version=version)
        # a backend that inverts the order (padding left alone)
        return np.where(candidates >= 0, -scores, scores).astype(np.float32) if version == "3" else scores

    triton.score = garbled  # type: ignore[method-assign]
    with pytest.raises(RolloutError, match="version 3 refused, 2 keeps serving: canary: row 0 ranks differently"):
        await rollout(repo, "ranker", 3, triton, triton, drain_s=0)
    assert triton.loads[-2:] == [[2, 3], [2]] and triton.loaded == {2}


async def test_a_version_that_never_gets_ready_is_refused(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    publish(bundle, repo)
    triton = FakeTriton(repo)
    triton.never_ready.add(2)
    with pytest.raises(RolloutError, match="not ready within"):
        await rollout(repo, "ranker", 2, triton, triton, drain_s=0, ready_timeout_s=0.3)
    state = read_serving(repo, "ranker")
    assert state is not None and state.version == 1 and state.refused == (2,)


async def test_unreachable_triton_refuses_nothing(tmp_path: Path, bundle: Path) -> None:
    repo = tmp_path / "repo"
    publish(bundle, repo)
    triton = FakeTriton(repo)
    triton.up = False
    with pytest.raises(ConfigError, match="Triton is not reachable: version 1 is published but not rolled out"):
        await rollout(repo, "ranker", 1, triton, triton)
    assert read_serving(repo, "ranker") is None
    with pytest.raises(ConfigError, match="no complete version 9"):
        await rollout(repo, "ranker", 9, triton, triton)


def test_canary_checks_shape_values_padding_and_order() -> None:
    expected = np.array([[3.0, 2.0, 1.0, PADDING_SCORE]], dtype=np.float32)
    candidates = np.array([[5, 6, 7, -1]])
    check_canary(expected + np.float32(0.01) * (expected != PADDING_SCORE), expected, candidates)  # FP16-like noise
    with pytest.raises(RolloutError, match="shape"):
        check_canary(expected[:, :3], expected, candidates)
    with pytest.raises(RolloutError, match="NaN"):
        check_canary(np.where(expected == 3.0, np.nan, expected).astype(np.float32), expected, candidates)
    with pytest.raises(RolloutError, match="PADDING_SCORE"):
        check_canary(np.array([[3.0, 2.0, 1.0, 0.0]], np.float32), expected, candidates)
    with pytest.raises(RolloutError, match="ranks differently"):
        check_canary(np.array([[1.0, 2.0, 3.0, PADDING_SCORE]], np.float32), expected, candidates)


async def test_reconcile_brings_another_triton_to_the_rollout_set(tmp_path: Path, bundle: Path) -> None:
    from recsvc.repository.rollout import reconcile

    repo = tmp_path / "repo"
    publish(bundle, repo)
    publish(bundle, repo)
    before = FakeTriton(repo)
    assert await reconcile(repo, "ranker", before) and before.loaded == {2}   # no rollout yet: the newest
    fake = FakeTriton(repo)
    await rollout(repo, "ranker", 1, fake, fake, drain_s=0)
    replica = FakeTriton(repo)                                          # a second Triton, freshly started
    assert await reconcile(repo, "ranker", replica)
    assert replica.loaded == {1}
    assert not await reconcile(repo, "ranker", replica)                # already right: no reload
    replica.loaded = {1, 2}                                             # still holds what a drain released
    assert await reconcile(repo, "ranker", replica) and replica.loaded == {1}


async def test_triton_lost_mid_rollout_refuses_nothing(tmp_path: Path, bundle: Path) -> None:
    from recsvc.errors import RankerUnavailable

    repo = tmp_path / "repo"
    for _ in range(3):
        publish(bundle, repo)
    triton = FakeTriton(repo)
    await rollout(repo, "ranker", 2, triton, triton, drain_s=0)

    async def crash(versions: Sequence[int], config_pbtxt: str) -> None:
        triton.up = False
        raise RankerUnavailable("triton: Socket closed")

    triton.load_versions = crash  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="Triton became unreachable during the rollout of version 3"):
        await rollout(repo, "ranker", 3, triton, triton, drain_s=0)
    state = read_serving(repo, "ranker")
    assert state is not None and (state.version, state.loaded, state.refused) == (2, (2,), ())

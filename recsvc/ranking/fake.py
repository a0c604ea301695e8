"""A scripted ``Ranker`` for unit tests of code that ranks: fixed per-item scores, recorded calls."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsvc.errors import RankerUnavailable
from recsvc.ranking.base import PADDING_SCORE, check_batch

__all__ = ["FakeRanker", "RankCall"]


@dataclass(frozen=True)
class RankCall:
    """One ``score`` call as the fake saw it."""

    history: npt.NDArray[np.int64]
    candidates: npt.NDArray[np.int64]
    version: str


class FakeRanker:
    """Scores candidate ``i`` as ``item_scores[i]`` whatever the history.

    Set ``failure`` to make every call raise it (e.g. ``RankerUnavailable("down")``) to test degraded
    paths; ``versions`` limits the versions it accepts, like a Triton with only those loaded.
    """

    def __init__(self, item_scores: npt.ArrayLike, *, versions: frozenset[str] | None = None) -> None:
        self.item_scores = np.asarray(item_scores, dtype=np.float32)
        self.versions = versions
        self.failure: Exception | None = None
        self.calls: list[RankCall] = []
        self.closed = False

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        """Look the candidates up in ``item_scores``; padding gets PADDING_SCORE."""
        history, candidates = check_batch(history, candidates)
        self.calls.append(RankCall(history.copy(), candidates.copy(), version))
        if self.failure is not None:
            raise self.failure
        if self.closed:
            raise RankerUnavailable("fake ranker is closed")
        if self.versions is not None and version not in self.versions:
            raise RankerUnavailable(f"fake ranker has no version {version!r}")
        scores = self.item_scores[np.clip(candidates, 0, len(self.item_scores) - 1)]
        return np.where(candidates >= 0, scores, np.float32(PADDING_SCORE)).astype(np.float32)

    async def close(self) -> None:
        """Mark closed; later calls raise RankerUnavailable."""
        self.closed = True

"""The Ranker protocol every ranking backend implements, and the input checks they share."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsvc.bundle import PADDING_SCORE
from recsvc.errors import InvalidArgument

__all__ = ["PADDING_SCORE", "Ranker", "check_batch", "empty_scores"]



class Ranker(Protocol):
    """Scores candidate items for users given their histories.

    ``history`` is int64 [B, L] and ``candidates`` int64 [B, C], dense item ids with -1 as padding
    (histories left-padded, most recent last). The result is float32 [B, C]; padded candidate slots get
    a score far below any real one. ``version`` pins the model version so a request never mixes a
    ranker with another version's item index. Failures of the backend raise ``RankerUnavailable``.
    """

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        """Return float32 [B, C] scores."""
        ...

    async def close(self) -> None:
        """Release connections or sessions; the ranker is unusable afterwards."""
        ...


def check_batch(
    history: npt.NDArray[Any], candidates: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Validate shapes and return both arrays as C-contiguous int64 (what every backend sends as is)."""
    if history.ndim != 2:
        raise InvalidArgument("history", f"expected a 2-D [B, L] array, got shape {history.shape}")
    if candidates.ndim != 2:
        raise InvalidArgument("candidates", f"expected a 2-D [B, C] array, got shape {candidates.shape}")
    if history.shape[0] != candidates.shape[0]:
        raise InvalidArgument(
            "candidates", f"batch size {candidates.shape[0]} != history batch size {history.shape[0]}"
        )
    for name, array in (("history", history), ("candidates", candidates)):
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidArgument(name, f"expected integer item ids, got dtype {array.dtype}")
    return (
        np.ascontiguousarray(history, dtype=np.int64),
        np.ascontiguousarray(candidates, dtype=np.int64),
    )


def empty_scores(candidates: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Scores for a batch with no rows (answered locally: no backend accepts B = 0)."""
    return np.zeros((0, candidates.shape[1]), dtype=np.float32)
